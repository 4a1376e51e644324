"""Slurm + a real Dagster deployment: ``dagster-daemon`` (queue, pools, run retries, monitoring)
with the project's dagster.yaml, the code location slurm_defs.py, runs launched by the CLI.

(a) a 5-fold backfill keeps all 5 Slurm jobs in flight (pool limit from ``arena-assets pools``);
(b) SIGTERM to a run worker leaves its job RUNNING; the run's retry (same root run id, started by
    the daemon's run retries) re-attaches to it, no second job;
(c) terminating the run as the UI does scancels the job;
(d) a job lost to a node failure (node set DOWN, ``--no-requeue``) is resubmitted once by the
    step's retry (``RetryRequested``) and the run succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from test_slurm_backend import _wait_for_record, _wait_state

from arena_assets.resources.slurm import JobRecord, sacct
from tests.harness import DaemonHarness

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

FOLDS = ["0", "1", "2", "3", "4"]


# ------------------------------------------------------------------------------ helpers
def _jobs_under(folder: Path) -> list[dict[str, str]]:
    """Every Slurm job (allocation line) submitted from ``folder`` (sacct SubmitLine), by id."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", "now-2hours", "-o", "JobID,JobName,State,Submit,Start,End,SubmitLine"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split("|", 6)
        if len(parts) == 7 and str(folder) in parts[6]:
            rows.append(dict(zip(["JobID", "JobName", "State", "Submit", "Start", "End", "SubmitLine"], parts)))
    return sorted(rows, key=lambda r: int(r["JobID"].split("_")[0]))


def _t(s: str) -> float:
    return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of [start, end) intervals open at one time."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def _cancel_jobs_under(folder: Path) -> None:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        job_id, _, cmd = line.partition("|")
        if str(folder) in cmd:
            subprocess.run(["scancel", job_id], check=False)


def _materialization(h: DaemonHarness, partition: str) -> tuple[str, dict[str, Any]]:
    recs = h.instance().fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("fold_demo"), asset_partitions=[partition]), limit=1
    ).records
    assert recs, f"partition {partition} not materialized"
    return recs[0].run_id, {k: v.value for k, v in recs[0].asset_materialization.metadata.items()}


def _event_types(h: DaemonHarness, run_id: str) -> list[str]:
    return [e.dagster_event.event_type_value for e in h.events(run_id) if e.dagster_event is not None]


def deployments(slurm_settings: Path, where: Path, storage: str | None = None) -> Iterator[Callable[..., DaemonHarness]]:
    """Start deployments (``start(sleep_s=..., slurm={...overrides})``); stop them and cancel
    their Slurm jobs at the end. ``storage``: the instance's storage block (None: SQLite under
    the deployment's DAGSTER_HOME; test_slurm_daemon_postgres.py passes PostgreSQL's)."""
    started: list[DaemonHarness] = []
    folder = Path(yaml.safe_load(slurm_settings.read_text())["compute"]["slurm"]["folder"])

    def start(sleep_s: float = 40, slurm: dict[str, Any] | None = None) -> DaemonHarness:
        if slurm:
            cfg = yaml.safe_load(slurm_settings.read_text())
            cfg["compute"]["slurm"].update(slurm)
            slurm_settings.write_text(yaml.safe_dump(cfg))
        h = DaemonHarness(
            where, module="slurm_defs", location_name="slurm_defs",
            storage=storage, env={"ARENA_SETTINGS": str(slurm_settings), "ARENA_TEST_SLEEP_S": str(sleep_s)},
        )
        started.append(h)
        return h.start()

    start.folder = folder  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for h in started:
            h.stop()
        _cancel_jobs_under(folder)


@pytest.fixture
def deploy(slurm_settings: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonHarness]]:
    """A deployment on SQLite (once per test)."""
    yield from deployments(slurm_settings, tmp_path / "deploy")


# ------------------------------------------------------------------------------ (a) parallel backfill
def test_backfill_keeps_all_five_jobs_in_flight(deploy: Any) -> None:
    # 60 s per fold: the five runs start on 2 busy cores over 20-40 s, all before the first job ends
    h = deploy(sleep_s=60)
    # the limit of the settings' pool goes into the instance; dagster.yaml's default_limit (1)
    # would otherwise run the five folds one after the other
    assert h.apply_pools() == {"slurm": {"before": None, "after": 8}}
    bf = h.backfill("fold_sleep_job", FOLDS)
    runs = h.wait_runs_finished(h.backfill_runs(bf, n=5), timeout=700)
    assert sorted(r.tags["dagster/partition"] for r in runs) == FOLDS
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [h.describe(r.run_id) for r in runs]

    job_ids = {}
    for k in FOLDS:
        _, md = _materialization(h, k)
        assert md["slurm_state"] == "COMPLETED" and md["remote_job_id"] == md["job_id"]
        job_ids[k] = md["job_id"]
    assert len(set(job_ids.values())) == 5
    jobs = {j["JobID"]: j for j in _jobs_under(deploy.folder)}
    assert set(jobs) == set(job_ids.values()), (jobs.keys(), job_ids)
    submits = [_t(jobs[i]["Submit"]) for i in job_ids.values()]
    spans = [(_t(jobs[i]["Start"]), _t(jobs[i]["End"])) for i in job_ids.values()]
    first_end = min(e for _, e in spans)
    assert max(submits) < first_end, f"a job was submitted only after another had ended: {jobs}"
    assert max_overlap(spans) >= 2, f"no two Slurm jobs ran at the same time: {spans}"


# ------------------------------------------------------------------------------ (b) stop != cancel
def test_sigterm_to_run_worker_leaves_job_and_retry_reattaches(deploy: Any, slurm_settings: Path) -> None:
    h = deploy()
    h.apply_pools()
    cfg = {"ops": {"fold_demo": {"config": {"sleep_s": 60, "step": "demo_reattach"}}}}
    rid = h.launch("fold_demo_job", partition="3", config=cfg)
    pid = h.run_worker_pid(rid)
    rec = _wait_for_record(slurm_settings, timeout=240)
    _wait_state(rec.job_id, {"RUNNING"}, timeout=240)

    os.kill(pid, signal.SIGTERM)  # a restarted `dagster dev` / code server stops its run workers
    h.wait_status(rid, {"FAILURE"}, timeout=240)
    assert sacct(rec.job_id)["State"] == "RUNNING", "the job must outlive the stopped run worker"
    msgs = h.messages(rid)
    assert any(f"Slurm job(s) {rec.job_id} keep running" in m for m in msgs), h.describe(rid)
    assert not any("cancelled Slurm job" in m for m in msgs)
    left = JobRecord.load(next(Path(deploy.folder).glob("*/records/*.json")))
    assert left is not None and left.status == "submitted"

    # The daemon retries the run (run_retries in dagster.yaml: same root run id, from failure)
    def retried() -> Any:
        later = [r for r in h.runs_of_root(rid) if r.run_id != rid]
        return later if later and all(r.is_finished for r in later) else None

    later = h.wait_for(retried, 400, what=f"a finished retry of run {rid}")
    retry = later[-1]
    assert retry.status == dg.DagsterRunStatus.SUCCESS, h.describe(retry.run_id)
    assert retry.root_run_id == rid and retry.parent_run_id == rid
    run_id, md = _materialization(h, "3")
    assert run_id == retry.run_id
    assert md["job_id"] == rec.job_id and md["slurm_state"] == "COMPLETED", "the retry must re-attach"
    assert any(f"re-attaching to Slurm job {rec.job_id}" in m for m in h.messages(retry.run_id))
    jobs = _jobs_under(deploy.folder)
    assert [j["JobID"] for j in jobs] == [rec.job_id], f"a second job was submitted: {jobs}"
    assert json.loads((Path(md["out_dir"]) / "fold.json").read_text())["fold"] == "3"


# ------------------------------------------------------------------------------ (c) cancel
def test_terminating_the_run_scancels_its_job(deploy: Any, slurm_settings: Path) -> None:
    h = deploy()
    # pools deliberately NOT applied: the step says that its pool serializes backfills
    cfg = {"ops": {"fold_demo": {"config": {"sleep_s": 240}}}}
    rid = h.launch("fold_demo_job", partition="1", config=cfg)
    rec = _wait_for_record(slurm_settings, timeout=240)
    _wait_state(rec.job_id, {"RUNNING"}, timeout=240)

    assert h.terminate(rid), "the run launcher refused to terminate the run"
    h.wait_status(rid, {"CANCELED"}, timeout=240)
    assert _wait_state(rec.job_id, {"CANCELLED"}, timeout=60) == "CANCELLED"
    deadline = time.time() + 60
    while time.time() < deadline and rec.job_id in subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.split():
        time.sleep(0.5)
    assert rec.job_id not in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                            check=True).stdout.split(), "orphan job left in squeue"
    msgs = h.messages(rid)
    assert any(f"cancelled Slurm job {rec.job_id}" in m for m in msgs), h.describe(rid)
    assert any("allows 1 step(s) at once" in m and "arena-assets pools --apply" in m for m in msgs), h.describe(rid)
    left = JobRecord.load(next(Path(deploy.folder).glob("*/records/*.json")))
    assert left is not None and left.status == "cancelled"
    time.sleep(10)  # a canceled run is not retried
    assert [r.run_id for r in h.runs_of_root(rid)] == [rid]


# ------------------------------------------------------------------------------ (d) node failure
def _node_usable() -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False).stdout.split()
    return any(s.rstrip("*~#") in {"idle", "mixed", "allocated", "completing"} for s in out)


def test_job_lost_to_node_failure_is_resubmitted_once(deploy: Any, slurm_settings: Path) -> None:
    h = deploy(slurm={"requeue": False, "lost_job_retries": 1})
    h.apply_pools()
    cfg = {"ops": {"fold_demo": {"config": {"sleep_s": 30}}}}
    rid = h.launch("fold_demo_job", partition="2", config=cfg)
    rec = _wait_for_record(slurm_settings, timeout=240)
    _wait_state(rec.job_id, {"RUNNING"}, timeout=240)
    node = sacct(rec.job_id)["NodeList"]
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=arena-test-node-fail"],
                       check=True)
        _wait_state(rec.job_id, {"NODE_FAIL"}, timeout=120)
    finally:
        # ReturnToService=2 may already have brought the node back (then resume is refused)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True, check=False)
        DaemonHarness.wait_for(_node_usable, 120, what=f"node {node} back in service")

    run = h.wait_status(rid, {"SUCCESS", "FAILURE"}, timeout=400)
    assert run.status == dg.DagsterRunStatus.SUCCESS, h.describe(rid, 60)
    jobs = _jobs_under(deploy.folder)
    assert [j["State"] for j in jobs] == ["NODE_FAIL", "COMPLETED"], jobs
    assert jobs[0]["JobID"] == rec.job_id
    run_id, md = _materialization(h, "2")
    assert run_id == rid and md["job_id"] == jobs[1]["JobID"]
    types = _event_types(h, rid)
    assert "STEP_UP_FOR_RETRY" in types and "STEP_RESTARTED" in types, types
    assert any(f"Slurm job {rec.job_id} ended NODE_FAIL without a requeue" in m for m in h.messages(rid))
    assert [r.run_id for r in h.runs_of_root(rid)] == [rid], "the step retried, not the run"
