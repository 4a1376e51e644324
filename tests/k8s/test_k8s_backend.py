"""The k8s backend end to end, short of a cluster: the dry run.

A dry run writes the pickled call for the pod (paths rewritten to the pod's mount), validates
and prints the Job, then runs the pod's exact command (``python -m arena_assets.core.remote``) in a
subprocess on an unmapped copy of the call. These tests drive it with a small real step function
(it follows the step contract: writes through ``step_output``), directly and from a real Dagster
materialization of a partitioned asset.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes")
pytest.importorskip("dagster_k8s")

import cloudpickle  # noqa: E402
import dagster as dg  # noqa: E402

from arena_assets.core import remote  # noqa: E402
from arena_assets.core.results import StepResult, step_output  # noqa: E402
from arena_assets.core.settings import K8sSettings, StepNeeds  # noqa: E402
from arena_assets.resources.k8s import K8sBackend, validate_manifest  # noqa: E402

# The runner subprocess cannot import this test module; ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def scale_step(factor: float, table: Path, *, out_dir: Path, label: str = "x") -> StepResult:
    """A step by the contract: reads an input under the artifact root, writes outputs + result."""
    values = [float(v) for v in Path(table).read_text().split()]
    with step_output(out_dir, "scale") as (tmp, res):
        (tmp / "scaled.txt").write_text(" ".join(str(v * factor) for v in values))
        res.metrics["total"] = sum(values) * factor
        res.paths["scaled"] = "scaled.txt"
        res.info["label"] = label
        res.info["pid"] = os.getpid()
    return res


def failing_step(*, out_dir: Path) -> StepResult:
    with step_output(out_dir, "boom") as (tmp, res):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("tokenizer exploded on row 17")
    return res  # pragma: no cover


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "artifacts"
    (r / "inputs").mkdir(parents=True)
    (r / "inputs" / "table.txt").write_text("1 2 3.5")
    return r


def _k8s(**kw) -> K8sSettings:
    return K8sSettings(artifact_mount="/artifacts", image="reg/arena:7", env_secrets={"HF_TOKEN": "hf:token"}, **kw)


def test_dry_run_prints_the_job_and_runs_the_pod_command_locally(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    backend = K8sBackend(_k8s(dry_run=True), root)
    out_dir = root / "scale" / "2" / "v1"
    res = backend.run(
        None, "teacher", scale_step, [2.0, root / "inputs" / "table.txt"], {"label": "fold2"},
        out_dir, StepNeeds(gpus=2, cpus=4, mem_gb=16),
    )
    # The step really ran, in another process, and its result came back through result.json.
    assert res.metrics["total"] == pytest.approx(13.0)
    assert (out_dir / "scaled.txt").read_text() == "2.0 4.0 7.0"
    assert res.info["label"] == "fold2" and res.info["pid"] != os.getpid()
    assert json.loads((out_dir / "result.json").read_text())["metrics"]["total"] == pytest.approx(13.0)

    facts = res.info["compute"]
    assert facts["backend"] == "k8s" and facts["dry_run"] is True
    assert facts["state"] == "DRY_RUN_EXECUTED_LOCALLY" and facts["exit_code"] == 0
    assert facts["secret_refs"] == {"HF_TOKEN": "hf:token"}

    # The manifest was printed and saved, and it validates.
    printed = capfd.readouterr().out
    assert "kind: Job" in printed and facts["job_name"] in printed
    [manifest] = list(yaml.safe_load_all(Path(facts["manifest"]).read_text()))
    job = validate_manifest(manifest)
    c = job.spec.template.spec.containers[0]
    assert c.image == "reg/arena:7" and c.resources.limits["nvidia.com/gpu"] == "2"

    # The pod's call: private, and every path rewritten to the pod's mount.
    call = Path(facts["call"])
    assert c.args == [f"/artifacts/.k8s/no-run/{call.name}"]
    assert stat.S_IMODE(call.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(call.stat().st_mode) == 0o600
    fn, args, kwargs = remote.load_call(call)
    assert fn.__name__ == "scale_step"
    assert args == (2.0, Path("/artifacts/inputs/table.txt"))
    assert kwargs == {"label": "fold2", "out_dir": Path("/artifacts/scale/2/v1")}
    # The runner left its status next to the local copy of the call.
    status = remote.read_status(call.with_suffix(".local.pkl"))
    assert status is not None and status["ok"] is True and status["function"].endswith("scale_step")


def test_a_failing_step_raises_failure_with_the_remote_traceback(root: Path) -> None:
    backend = K8sBackend(_k8s(), root, dry_run=True)
    out_dir = root / "boom" / "_" / "v1"
    with pytest.raises(dg.Failure) as ei:
        backend.run(None, "student", failing_step, [], {}, out_dir, StepNeeds(gpus=1))
    assert "tokenizer exploded on row 17" in ei.value.description
    assert "Traceback" in ei.value.description and "failing_step" in ei.value.description
    # Never a partial artifact: the staged directory was removed, the version never appeared.
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_dry_run_without_execution_submits_nothing_and_runs_nothing(root: Path) -> None:
    backend = K8sBackend(_k8s(dry_run=True, dry_run_execute=False), root)
    out_dir = root / "scale" / "_" / "v1"
    with pytest.raises(dg.Failure, match="not submitted"):
        backend.run(None, "tta", scale_step, [1.0, root / "inputs" / "table.txt"], {}, out_dir, StepNeeds(gpus=1))
    assert not out_dir.exists()
    manifests = list((root / ".k8s").rglob("*.yaml"))
    assert len(manifests) == 1
    validate_manifest(yaml.safe_load(manifests[0].read_text()))


def test_a_materialization_prints_the_jobs_it_would_submit(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A real partitioned Dagster asset calling the backend: run id and partition reach the Job."""
    backend = K8sBackend(_k8s(dry_run=True), root)
    seen: dict[str, object] = {}

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["0", "1"]))
    def scaled(context):  # no annotation: `from __future__ import annotations` would stringify it
        out_dir = root / "scaled" / context.partition_key / "v1"
        res = backend.run(
            context, "predict", scale_step, [float(context.partition_key) + 1, root / "inputs" / "table.txt"],
            {}, out_dir, StepNeeds(gpus=1),
        )
        seen.update(run_id=context.run.run_id, facts=res.info["compute"], total=res.metrics["total"])
        return dg.MaterializeResult(metadata={"total": res.metrics["total"], "job": res.info["compute"]["job_name"]})

    result = dg.materialize([scaled], partition_key="1")
    assert result.success
    assert seen["total"] == pytest.approx(13.0)
    facts = seen["facts"]
    assert isinstance(facts, dict)
    manifest = yaml.safe_load(Path(facts["manifest"]).read_text())
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert labels["arena-assets/partition"] == "1"
    assert labels["arena-assets/run-id"] == seen["run_id"]
    assert manifest["metadata"]["name"].startswith("arena-predict-1-")
    assert Path(facts["call"]).parent.name == seen["run_id"]
    assert facts["manifest"] and "kind: Job" in capfd.readouterr().out


def test_paths_outside_the_artifact_root_are_reported(root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pod sees only the artifact volume: an input elsewhere is named in a warning."""
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("4")
    backend = K8sBackend(_k8s(dry_run=True), root)
    with caplog.at_level("WARNING", logger="arena_assets.resources.k8s"):
        res = backend.run(None, "tta", scale_step, [1.0, elsewhere], {}, root / "s" / "_" / "v1", StepNeeds())
    assert res.metrics["total"] == pytest.approx(4.0)
    assert str(elsewhere) in caplog.text and "will not see" in caplog.text
