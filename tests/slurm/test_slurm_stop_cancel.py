"""The backend's decisions without a cluster (fast): stop vs cancel when a wait is interrupted,
lost jobs -> RetryRequested, step exceptions -> Failure(allow_retries=False), requeue detection.

The real-cluster versions of these are in test_slurm_daemon.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from arena_assets.core.settings import SlurmSettings, StepNeeds
from arena_assets.resources import slurm as slurm_mod
from arena_assets.resources.slurm import JobRecord, SlurmBackend, _Ctx, _Tail


class _Instance:
    def __init__(self, status: str | None) -> None:
        self.status = status

    def get_run_by_id(self, run_id: str) -> Any:
        if self.status is None:
            raise RuntimeError("storage down")
        return SimpleNamespace(status=SimpleNamespace(value=self.status))


def _context(instance: Any) -> Any:
    run = SimpleNamespace(run_id="run-1", root_run_id="run-1")
    ctx = SimpleNamespace(run=run, run_id="run-1", log=logging.getLogger("t"), asset_key=dg.AssetKey("a"),
                          has_partition_key=True, partition_key="0")
    if instance is not None:
        ctx.instance = instance
    return ctx


def _record(tmp_path: Path) -> tuple[JobRecord, Path]:
    rec = JobRecord(key="a|0|demo", job_id="4242", job_name="arena-demo-abc", out_dir=str(tmp_path / "v1"),
                    folder=str(tmp_path), submitted_at=time.time(), run_id="run-1")
    path = tmp_path / "rec.json"
    rec.save(path)
    return rec, path


@pytest.fixture
def scancels(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: Any) -> Any:
        calls.append(list(cmd))
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(slurm_mod.subprocess, "run", fake_run)
    return calls


@pytest.mark.parametrize(
    ("instance", "cancels"),
    [
        (_Instance("CANCELING"), True),   # UI Terminate / run_launcher.terminate
        (_Instance("CANCELED"), True),
        (_Instance("STARTED"), False),    # SIGTERM/Ctrl-C of the run worker: a stop
        (_Instance(None), False),         # storage unreachable: never kill hours of work on a guess
        (None, True),                     # no Dagster run to re-attach from: no orphans
    ],
)
def test_interrupted_wait_cancels_only_a_canceling_run(
    tmp_path: Path, scancels: list[list[str]], instance: Any, cancels: bool
) -> None:
    backend = SlurmBackend(SlurmSettings(), tmp_path)
    rec, path = _record(tmp_path)
    backend._interrupted(_Ctx(_context(instance)), [(None, rec, path)], KeyboardInterrupt())
    saved = JobRecord.load(path)
    assert saved is not None
    if cancels:
        assert scancels == [["scancel", "4242"]]
        assert saved.status == "cancelled"
    else:
        assert scancels == []
        assert saved.status == "submitted", "a stopped run's job must stay re-attachable"
        assert "left running for re-attach" in saved.history[-1]


def test_stopped_run_cancels_array_tasks_it_cannot_reattach(tmp_path: Path, scancels: list[list[str]]) -> None:
    backend = SlurmBackend(SlurmSettings(), tmp_path)
    rec, path = _record(tmp_path)
    task = JobRecord(**{**rec.__dict__, "job_id": "77_0", "history": []})
    backend._interrupted(_Ctx(_context(_Instance("STARTED"))), [(None, rec, path), (None, task, None)],
                         KeyboardInterrupt())
    assert scancels == [["scancel", "77_0"]]  # the recorded job stays, the array task goes
    saved = JobRecord.load(path)
    assert saved is not None and saved.status == "submitted"


def _finish_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: str, outcome: tuple[str, Any],
                 retries: int = 1) -> tuple[BaseException, JobRecord]:
    backend = SlurmBackend(SlurmSettings(lost_job_retries=retries), tmp_path)
    monkeypatch.setattr(SlurmBackend, "_final_facts", staticmethod(lambda job_id, wait_s=10.0: {"State": state}))
    monkeypatch.setattr(slurm_mod, "_read_outcome", lambda job, wait_s: outcome)
    rec, path = _record(tmp_path)
    job = SimpleNamespace(paths=SimpleNamespace(stdout=tmp_path / "o", stderr=tmp_path / "e"))
    tails = {"stdout": _Tail(tmp_path / "o"), "stderr": _Tail(tmp_path / "e")}
    with pytest.raises(BaseException) as ei:
        backend._finish(_Ctx(_context(_Instance("STARTED"))), "demo", job, rec, path, tmp_path / "v2",
                        StepNeeds(), tails)
    saved = JobRecord.load(path)
    assert saved is not None
    return ei.value, saved


@pytest.mark.parametrize("state", ["NODE_FAIL", "PREEMPTED", "BOOT_FAIL"])
def test_job_lost_by_the_cluster_asks_for_a_retry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: str) -> None:
    err, saved = _finish_with(monkeypatch, tmp_path, state, ("missing", None), retries=2)
    assert isinstance(err, dg.RetryRequested) and err.max_retries == 2
    assert isinstance(err.__cause__, dg.Failure) and state in err.__cause__.description
    assert saved.status == "lost", "the retry must resubmit, not re-attach to the dead job"


def test_step_exception_is_a_failure_without_retries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    err, saved = _finish_with(monkeypatch, tmp_path, "FAILED", ("error", "Traceback ...\nValueError: boom"))
    assert isinstance(err, dg.Failure) and err.allow_retries is False
    assert "ValueError: boom" in err.description and saved.status == "failed"
    # a job killed for another reason (time limit, OOM) may be retried by a retry policy
    err, _ = _finish_with(monkeypatch, tmp_path, "OUT_OF_MEMORY", ("missing", None))
    assert isinstance(err, dg.Failure) and err.allow_retries is True


def test_requeue_setting_and_detection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = {"text": "JobId=7 JobName=x Requeue=0 Restarts=0"}
    monkeypatch.setattr(slurm_mod.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=out["text"]))
    assert SlurmBackend(SlurmSettings(), tmp_path)._requeueable("7") is False
    out["text"] = "JobId=7 JobName=x Requeue=1 Restarts=0"
    assert SlurmBackend(SlurmSettings(), tmp_path)._requeueable("7") is True
    assert SlurmBackend(SlurmSettings(requeue=False), tmp_path)._requeueable("7") is False
    out["text"] = ""  # the controller forgot the job: assume it may come back
    assert SlurmBackend(SlurmSettings(), tmp_path)._requeueable("7") is True

    ex = SlurmBackend(SlurmSettings(requeue=False), tmp_path).executor(tmp_path / "f", "n", StepNeeds(), None)
    assert ex.parameters["additional_parameters"] == {"no_requeue": True}
    ex = SlurmBackend(SlurmSettings(requeue=True), tmp_path).executor(tmp_path / "f", "n", StepNeeds(), None)
    assert ex.parameters["additional_parameters"] == {"requeue": True}
