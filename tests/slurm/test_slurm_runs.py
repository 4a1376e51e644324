"""Slurm + Dagster runs as users launch them: CLI runs, termination, retries, backfills, limits.

The code location is slurm_defs.py (asset ``fold_demo`` over 5 fold partitions, the project's
ComputeResource with ``backend: slurm``); runs are stored in a temporary DAGSTER_HOME.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from test_slurm_backend import (
    _failure_text,
    _materialize,
    _metadata,
    _records,
    _wait_for_record,
    _wait_state,
)

from arena_assets.core import artifacts
from arena_assets.core.settings import load_settings
from arena_assets.resources.slurm import sacct

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

DAGSTER = str(Path(os.sys.executable).with_name("dagster"))


def _launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a dagster CLI command in its own process group (a run worker we can kill)."""
    return subprocess.Popen([DAGSTER, *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def test_ctrl_c_of_a_cli_run_leaves_its_job(slurm_settings: Path, tmp_path: Path) -> None:
    """Ctrl-C/SIGINT of a run worker is a stop, not a cancel (the run is not CANCELING): the job
    keeps running for a re-execution to re-attach, and the log says so (and how to stop it). A
    Dagster cancel (UI "Terminate") scancels: test_slurm_daemon.py."""
    cfg = json.dumps({"ops": {"fold_demo": {"config": {"sleep_s": 240}}}})
    proc = _launch(["asset", "materialize", "-m", "slurm_defs", "--select", "fold_demo", "--partition", "1",
                    "--config-json", cfg], tmp_path / "run.log")
    rec = None
    try:
        rec = _wait_for_record(slurm_settings)
        _wait_state(rec.job_id, {"RUNNING"})
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert sacct(rec.job_id)["State"] == "RUNNING", "a stopped (not canceled) run must leave its job running"
        log = (tmp_path / "run.log").read_text()
        assert f"Slurm job(s) {rec.job_id} keep running" in log and f"scancel {rec.job_id}" in log
        assert "cancelled Slurm job" not in log
        left = _records(slurm_settings)[0]
        assert left.status == "submitted", "the record must stay re-attachable"
        instance = dg.DagsterInstance.get()
        assert instance.get_runs(limit=1)[0].status == dg.DagsterRunStatus.FAILURE
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if rec is not None:
            subprocess.run(["scancel", rec.job_id], check=False)


def test_killed_worker_retry_reattaches(slurm_settings: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(json.dumps({"ops": {"fold_demo": {"config": {"sleep_s": 15, "step": "demo_reattach"}}}}))
    t_start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 2))
    proc = _launch(["job", "execute", "-m", "slurm_defs", "-j", "fold_demo_job", "--tags",
                    json.dumps({"dagster/partition": "4"}), "-c", str(tmp_path / "cfg.yaml")], tmp_path / "run.log")
    rec = _wait_for_record(slurm_settings)
    _wait_state(rec.job_id, {"RUNNING"})
    os.killpg(proc.pid, signal.SIGKILL)  # the run worker dies without any chance to clean up
    proc.wait(timeout=30)
    assert sacct(rec.job_id)["State"] == "RUNNING", "the job must outlive its run worker"

    out = subprocess.run(
        [os.sys.executable, str(Path(__file__).with_name("slurm_reexecute.py")), rec.run_id, str(tmp_path / "cfg.yaml")],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    retry = json.loads(out.stdout.strip().splitlines()[-1])
    assert retry["success"], out.stderr[-3000:]
    assert retry["root_run_id"] == rec.run_id and retry["run_id"] != rec.run_id
    instance = dg.DagsterInstance.get()
    recs = instance.fetch_materializations(dg.AssetKey("fold_demo"), limit=1).records
    assert recs and recs[0].run_id == retry["run_id"]
    md = {n: v.value for n, v in recs[0].asset_materialization.metadata.items()}
    assert md["job_id"] == rec.job_id, "the retry must re-attach to the running job"
    assert md["slurm_state"] == "COMPLETED"
    # exactly one job of this step was ever submitted
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-S", t_start, "-o", "JobID,JobName"],
                         capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if "|arena-demo_reattach-" in line]
    assert len(ours) == 1, ours
    s = load_settings(slurm_settings)
    assert artifacts.latest(s.root, "fold_demo", "4") == Path(md["out_dir"])
    assert json.loads((Path(md["out_dir"]) / "fold.json").read_text())["fold"] == "4"
    logs = [e.user_message for e in instance.all_logs(retry["run_id"])]
    assert any(f"re-attaching to Slurm job {rec.job_id}" in m for m in logs)


def test_backfill_of_five_folds(slurm_settings: Path, tmp_path: Path) -> None:
    proc = _launch(["job", "backfill", "-m", "slurm_defs", "-j", "fold_demo_job", "--partitions", "0,1,2,3,4",
                    "--noprompt"], tmp_path / "backfill.log")
    proc.wait(timeout=120)
    assert proc.returncode == 0, (tmp_path / "backfill.log").read_text()[-3000:]
    instance = dg.DagsterInstance.get()
    deadline = time.time() + 240
    while time.time() < deadline:
        runs = instance.get_runs()
        if len(runs) == 5 and all(r.is_finished for r in runs):
            break
        time.sleep(1)
    runs = instance.get_runs()
    assert len(runs) == 5 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
        (r.tags.get("dagster/partition"), r.status) for r in runs
    ]
    job_ids = {}
    for k in "01234":
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("fold_demo"), asset_partitions=[k]), limit=1
        ).records
        assert recs, f"partition {k} not materialized"
        md = {n: v.value for n, v in recs[0].asset_materialization.metadata.items()}
        assert md["slurm_state"] == "COMPLETED" and md["remote_job_id"] == md["job_id"]
        assert json.loads((Path(md["out_dir"]) / "fold.json").read_text())["fold"] == k
        assert sacct(md["job_id"])["State"] == "COMPLETED"
        job_ids[k] = md["job_id"]
    assert len(set(job_ids.values())) == 5, job_ids


def test_time_limits(slurm_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1-minute limit (Slurm's minimum), USR2 5 s before it (Slurm may send it up to 60 s early).

    A resumable (checkpoint_dir) step is requeued and completes from its checkpoint; a plain
    step past its limit fails with a clear time-out error. Both run at once to save time.
    """
    import yaml

    cfg = yaml.safe_load(slurm_settings.read_text())
    cfg["compute"]["slurm"]["signal_delay_s"] = 5
    slurm_settings.write_text(yaml.safe_dump(cfg))
    box: dict[str, Any] = {}
    # 58 s of work cannot fit before the signal (sent 25-55 s in), so at least one requeue happens
    th = threading.Thread(target=lambda: box.update(ckpt=_materialize(
        "0", {"mode": "count", "step": "demo_limit", "total_s": 58, "resumable": True}, raise_on_error=False)))
    th.start()
    plain = _materialize("1", {"mode": "count", "step": "demo_limit", "total_s": 200}, raise_on_error=False)
    assert not plain.success
    text = _failure_text(plain)
    assert "reached its time limit of 1 min and is not resumable" in text
    th.join(timeout=330)
    assert not th.is_alive()
    res = box["ckpt"]
    assert res.success, _failure_text(res)
    md = _metadata(res)
    assert md["slurm_state"] == "COMPLETED"
    assert len(md["starts"]) >= 2, f"the step was not requeued/resumed: starts={md['starts']}"
    hist = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", md["job_id"], "-o", "State"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert "REQUEUED" in hist and hist[-1] == "COMPLETED", hist
