"""Small step functions (the step contract, no model) for the compute backend tests.

They live in an importable module because a child process unpickles them by reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from arena_assets.core.results import StepResult, step_output


def write_square(x: float, *, out_dir: Path) -> StepResult:
    with step_output(out_dir, "square") as (tmp, res):
        (tmp / "value.txt").write_text(str(x * x))
        res.metrics["square"] = float(x * x)
        res.paths["value"] = "value.txt"
        res.info["executable"] = sys.executable
        res.info["pid"] = os.getpid()
    return StepResult.read(out_dir)


def crash_halfway(*, out_dir: Path) -> StepResult:
    with step_output(out_dir, "crash") as (tmp, _res):
        (tmp / "partial.bin").write_bytes(b"half a model")
        raise RuntimeError("simulated crash in the middle of a step")
