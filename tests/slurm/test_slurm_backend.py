"""The Slurm backend against the real local cluster, through a Dagster asset (slurm_defs.py).

Each test gets a fresh settings file, artifact root and submitit folder (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from arena_assets.core import artifacts
from arena_assets.core.settings import StepNeeds, load_settings
from arena_assets.resources.slurm import JobRecord, SlurmBackend, check_identity, sacct

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def _materialize(
    partition: str, config: dict[str, Any] | None = None, raise_on_error: bool = True,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    import slurm_defs

    def run(inst: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [slurm_defs.fold_demo],
            partition_key=partition,
            resources={"compute": slurm_defs._compute()},
            run_config={"ops": {"fold_demo": {"config": config or {}}}},
            instance=inst,
            raise_on_error=raise_on_error,
        )

    if instance is not None:
        return run(instance)
    with dg.DagsterInstance.ephemeral() as inst:  # disposed in the thread that made it
        return run(inst)


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    mats = result.asset_materializations_for_node("fold_demo")
    assert len(mats) == 1
    return {k: v.value for k, v in mats[0].metadata.items()}


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    events = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert events, "the step did not fail"
    data = events[0].step_failure_data
    text = data.error.to_string() if data.error else ""
    if data.user_failure_data is not None:
        text += "\n" + (data.user_failure_data.description or "")
        text += "\n" + json.dumps({k: str(v.value) for k, v in data.user_failure_data.metadata.items()})
    return text


def _records(settings_path: Path) -> list[JobRecord]:
    s = load_settings(settings_path)
    recs = [JobRecord.load(p) for p in Path(s.compute.slurm.folder).glob("*/records/*.json")]
    return [r for r in recs if r is not None]


def _wait_for_record(settings_path: Path, timeout: float = 60) -> JobRecord:
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = _records(settings_path)
        if recs:
            return recs[0]
        time.sleep(0.2)
    raise AssertionError("no job was submitted")


def _wait_state(job_id: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        facts = sacct(job_id)
        state = facts["State"] if facts else ""
        if state in states:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {states} (last {state!r})")


def test_partition_materializes_through_slurm(slurm_settings: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize("2", instance=instance)
    md = _metadata(result)
    facts = sacct(md["job_id"])
    assert facts is not None, "sacct does not know the job id recorded as metadata"
    assert facts["State"] == "COMPLETED" == md["slurm_state"]
    assert md["remote_job_id"] == md["job_id"], "the function did not run inside that Slurm job"
    assert md["node"] == facts["NodeList"]
    out = Path(md["out_dir"])
    assert json.loads((out / "fold.json").read_text())["fold"] == "2"
    s = load_settings(slurm_settings)
    assert artifacts.latest(s.root, "fold_demo", "2") == out
    # the submitit folder of the root run is private (it holds pickles)
    run_folder = Path(s.compute.slurm.folder) / result.run_id
    assert run_folder.is_dir() and (run_folder.stat().st_mode & 0o777) == 0o700
    # the job's log tail was streamed into the Dagster log while it ran
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(f"submitted Slurm job {md['job_id']}" in m for m in logs)
    assert any(f"[slurm {md['job_id']} stdout]" in m and "Job completed successfully" in m for m in logs)


def test_remote_exception_surfaces_with_state(slurm_settings: Path) -> None:
    result = _materialize("1", {"mode": "fail"}, raise_on_error=False)
    assert not result.success
    text = _failure_text(result)
    assert "remote kaboom in fold 1: the tokenizer exploded" in text
    assert "ValueError" in text and "FAILED" in text
    rec = _records(slurm_settings)[0]
    assert sacct(rec.job_id)["State"] == "FAILED"
    assert rec.status == "failed"


def test_impossible_request_refused_at_submit(slurm_settings: Path) -> None:
    t0 = time.time()
    result = _materialize("0", {"step": "demo_big"}, raise_on_error=False)
    assert not result.success
    text = _failure_text(result)
    assert "refused" in text and "More processors requested than permitted" in text
    assert time.time() - t0 < 60
    assert _records(slurm_settings) == [], "nothing may be recorded for a refused job"


def test_scancel_fails_promptly_and_keeps_latest(slurm_settings: Path) -> None:
    s = load_settings(slurm_settings)
    good = _metadata(_materialize("3"))["out_dir"]
    assert artifacts.latest(s.root, "fold_demo", "3") == Path(good)
    for p in Path(s.compute.slurm.folder).glob("*/records/*.json"):
        p.unlink()

    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(r=_materialize("3", {"sleep_s": 240}, raise_on_error=False)))
    th.start()
    rec = _wait_for_record(slurm_settings)
    _wait_state(rec.job_id, {"RUNNING"})
    time.sleep(1.0)
    t0 = time.time()
    subprocess.run(["scancel", rec.job_id], check=True)
    th.join(timeout=90)
    assert not th.is_alive(), "the materialization did not notice the cancelled job"
    assert time.time() - t0 < 60, "a cancelled job must fail the step promptly, not at its time limit"
    result = box["r"]
    assert not result.success
    text = _failure_text(result)
    assert "CANCELLED" in text and rec.job_id in text
    assert artifacts.latest(s.root, "fold_demo", "3") == Path(good), "the good version must stay current"
    assert not Path(rec.out_dir).exists(), "no partial version directory may appear"


# ------------------------------------------------------------------------------ identity
def _ctx(root_run_id: str, partition: str) -> Any:
    import logging

    run = SimpleNamespace(run_id=f"r-{time.time_ns()}", root_run_id=root_run_id)
    return SimpleNamespace(
        run=run, run_id=run.run_id, log=logging.getLogger("test"), asset_key=dg.AssetKey("fold_demo"),
        has_partition_key=True, partition_key=partition,
    )


def test_identity_check_refuses_strangers(slurm_settings: Path, tmp_path: Path) -> None:
    import slurm_jobfns

    s = load_settings(slurm_settings)
    backend = SlurmBackend(s.compute.slurm, s.root)
    needs = StepNeeds(cpus=1, mem_gb=1, time_min=5)
    out1 = artifacts.new_version_dir(s.root, "fold_demo", "0")
    res = backend.run(_ctx("root-A", "0"), "demo", slurm_jobfns.fold_step, ("0",), {}, out1, needs)
    job_id = res.info["job_id"]
    rec = JobRecord.load(backend.record_path("root-A", backend.record_key("fold_demo", "0", "demo")))
    assert rec is not None and rec.job_id == job_id and rec.status == "handed_over"
    facts = sacct(job_id)

    out2 = artifacts.new_version_dir(s.root, "fold_demo", "0")
    ok, why = check_identity(rec, out2, facts)
    assert ok, why
    # a reset cluster: the same id now names another job
    stranger = JobRecord(**{**rec.__dict__, "job_name": "arena-demo-deadbeef"})
    ok, why = check_identity(stranger, out2, facts)
    assert not ok and "stranger" in why
    # sacct does not know the id at all (accounting wiped)
    ok, why = check_identity(rec, out2, None)
    assert not ok and "does not know" in why
    # a record made for another asset partition
    ok, why = check_identity(rec, artifacts.new_version_dir(s.root, "fold_demo", "1"), facts)
    assert not ok
    # a job submitted long before the record was made
    ok, why = check_identity(JobRecord(**{**rec.__dict__, "submitted_at": time.time() + 3600}), out2, facts)
    assert not ok

    # End to end: a stale folder whose record (status "submitted") names job ids that now belong to
    # other jobs must make the next run submit its own job, never adopt the stranger's result.
    stale_path = backend.record_path("root-B", backend.record_key("fold_demo", "0", "demo"))
    JobRecord(
        key="fold_demo|0|demo", job_id=job_id, job_name="arena-demo-0ld0ld00", out_dir=str(out1),
        folder=rec.folder, submitted_at=rec.submitted_at, run_id="old",
    ).save(stale_path)
    out3 = artifacts.new_version_dir(s.root, "fold_demo", "0")
    res3 = backend.run(_ctx("root-B", "0"), "demo", slurm_jobfns.fold_step, ("0",), {}, out3, needs)
    assert res3.info["job_id"] != job_id
    assert Path(res3.out_dir) == out3 and (out3 / "fold.json").exists()
    assert Path(out1).exists(), "the stranger's output must be left alone"


def test_map_runs_one_job_array(slurm_settings: Path) -> None:
    import slurm_jobfns

    s = load_settings(slurm_settings)
    backend = SlurmBackend(s.compute.slurm, s.root)
    needs = StepNeeds(cpus=1, mem_gb=1, time_min=5)
    outs = [artifacts.new_version_dir(s.root, "fold_demo", k) for k in "01234"]
    results = backend.map(_ctx("root-M", "0"), "demo", slurm_jobfns.fold_step, [((k,), {}, o) for k, o in zip("01234", outs)], needs)
    ids = [r.info["job_id"] for r in results]
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(i.split("_")[1] for i in ids) == list("01234"), ids
    for k, r, o in zip("01234", results, outs):
        assert Path(r.out_dir) == o and json.loads((o / "fold.json").read_text())["fold"] == k
        assert r.info["compute"]["state"] == "COMPLETED" == sacct(r.info["job_id"])["State"]
        assert r.info["slurm_job_id"] is not None  # ran inside a Slurm job

    # failing tasks: the Failure names each with its remote traceback, after all have ended
    outs2 = [artifacts.new_version_dir(s.root, "fold_demo", k) for k in "12"]
    with pytest.raises(dg.Failure) as ei:
        backend.map(_ctx("root-M", "0"), "demo", slurm_jobfns.failing_step, [((k,), {}, o) for k, o in zip("12", outs2)], needs)
    text = ei.value.description
    assert "2 of 2 tasks" in text and "remote kaboom in fold 1" in text and "remote kaboom in fold 2" in text
    assert "FAILED" in text and not any(o.exists() for o in outs2)


def test_step_runs_with_its_own_interpreter(slurm_settings: Path) -> None:
    """The quantization step's environment (.venv-quant, no Dagster) runs a step as a Slurm job."""
    import slurm_jobfns

    quant_python = Path(__file__).resolve().parents[2] / ".venv-quant" / "bin" / "python"
    if not quant_python.exists():
        pytest.skip("no .venv-quant (scripts/setup-quant-env.sh)")
    s = load_settings(slurm_settings)
    backend = SlurmBackend(s.compute.slurm, s.root)
    out = artifacts.new_version_dir(s.root, "fold_demo", "0")
    res = backend.run(_ctx("root-Q", "0"), "demo", slurm_jobfns.interpreter_step, (), {}, out,
                      StepNeeds(cpus=1, mem_gb=1, time_min=5), python=str(quant_python))
    assert res.info["executable"].startswith(str(quant_python.parent.parent))
    assert res.info["has_dagster"] is False
    assert res.info["compute"]["state"] == "COMPLETED"
