"""Fixtures for the real-Slurm tests (marked ``slurm``).

The cluster is the one ``scripts/slurm-up.sh`` starts. Without it the tests skip, except under
``CI=true``, where a missing cluster is a failure (they must never silently skip in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def cluster_up() -> tuple[bool, str]:
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        return False, "sbatch/sacct not installed (run scripts/slurm-up.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (subprocess.SubprocessError, OSError) as e:
        return False, f"sinfo failed: {e}"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*") in {"idle", "mixed", "allocated"} for s in states):
        return False, f"no usable Slurm node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    acct = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=20)
    if acct.returncode != 0:
        return False, f"sacct does not work (slurmdbd down?): {acct.stderr.strip()}"
    return True, ""


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    ok, why = cluster_up()
    if not ok:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI: the Slurm cluster must be up for the slurm tests: {why}")
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _job_import_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs (and Dagster CLI subprocesses) import slurm_jobfns / slurm_defs by module name."""
    parts = [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in parts if p))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


@pytest.fixture
def slurm_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slurm_cluster: None) -> Path:
    """A settings file: artifacts + a fresh submitit folder under tmp_path, backend slurm, small needs."""
    small = {"cpus": 1, "mem_gb": 1, "time_min": 5}
    cfg = {
        "artifact_root": str(tmp_path / "artifacts"),
        "compute": {
            "backend": "slurm",
            "slurm": {"poll_s": 0.5, "signal_delay_s": 30, "folder": str(tmp_path / "submitit")},
            "needs": {
                "demo": small,
                "demo_limit": {**small, "time_min": 1},
                "demo_big": {**small, "cpus": 64},
                "demo_reattach": small,
            },
        },
    }
    path = tmp_path / "arena.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("ARENA_SETTINGS", str(path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    # Runs launched from the CLI (a backfill) start at once, without the daemon's queue.
    (tmp_path / "dagster_home" / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    return path
