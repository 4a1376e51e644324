"""Dagster-free step functions the Slurm tests run as jobs (the step contract of docs/steps.md).

They live in their own module (not in a test file) because a Slurm job imports the function by
module name: conftest.py puts this folder on PYTHONPATH, which sbatch passes to the job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from arena_assets.core.results import StepResult, step_output


def fold_step(fold: str, *, out_dir: Path, sleep_s: float = 0.0) -> StepResult:
    """Writes a small per-fold file; optionally works (sleeps) first, printing progress."""
    for i in range(int(sleep_s)):
        print(f"working {i + 1}/{int(sleep_s)}", flush=True)
        time.sleep(1)
    with step_output(out_dir, "demo") as (tmp, res):
        (tmp / "fold.json").write_text(json.dumps({"fold": fold, "pid": os.getpid()}))
        res.paths["fold"] = "fold.json"
        res.metrics["fold"] = float(fold)
        res.info["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    return res


def failing_step(fold: str, *, out_dir: Path) -> StepResult:
    print("about to fail", flush=True)
    raise ValueError(f"remote kaboom in fold {fold}: the tokenizer exploded")


def counting_step(fold: str, total_s: int, *, out_dir: Path, checkpoint_dir: str | None = None) -> StepResult:
    """Counts to ``total_s`` seconds. With ``checkpoint_dir`` it saves progress every second and
    resumes from it (what Trainer's resume_from_checkpoint does for the real steps); every start
    is recorded so the test can see the requeue."""
    done = 0
    starts: list[str] = []
    ckpt = Path(checkpoint_dir) / "progress.json" if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = json.loads(ckpt.read_text())
        done, starts = state["done"], state["starts"]
    starts.append(os.environ.get("SLURM_RESTART_COUNT", "0"))
    print(f"start #{len(starts)} from {done}/{total_s}", flush=True)
    while done < total_s:
        time.sleep(1)
        done += 1
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"done": done, "starts": starts}))
            os.replace(tmp, ckpt)
    with step_output(out_dir, "demo") as (tmp, res):
        (tmp / "fold.json").write_text(json.dumps({"fold": fold}))
        res.paths["fold"] = "fold.json"
        res.metrics["starts"] = float(len(starts))
        res.info["starts"] = starts
    return res


def interpreter_step(*, out_dir: Path) -> StepResult:
    """Records which interpreter ran the step and whether Dagster is importable there."""
    import importlib.util
    import sys

    with step_output(out_dir, "demo") as (tmp, res):
        res.info["executable"] = sys.executable
        res.info["has_dagster"] = importlib.util.find_spec("dagster") is not None
    return res
