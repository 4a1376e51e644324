"""The one result protocol every step follows, whatever runs it (in-process, Slurm, a pod).

A step is a plain function ``step(settings, <input paths>, out_dir) -> StepResult``. It writes its
outputs plus ``result.json`` into ``out_dir`` through :func:`step_output`, which stages the
directory and renames it into place only on success. The orchestrator (a Dagster asset) reads
``result.json`` back, so the same file carries metrics/paths/timings/notes from any backend.

Crash safety is :func:`~arena_assets.core.artifacts.staged_dir`'s: the step writes into a
``.tmp-`` folder owned by its process (the Slurm job when it runs in one), fsynced and renamed
only when complete; a killed step leaves only that folder, which a later materialization of the
same asset partition sweeps once the owner is provably dead. The renamed version becomes what
readers see only when the asset's commit writes ``provenance.json`` into it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arena_assets.core.artifacts import atomic_write_json, staged_dir

RESULT_FILE = "result.json"


@dataclass
class StepResult:
    """What a step reports. Paths are relative to the output directory unless absolute."""

    step: str
    out_dir: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else worth recording: what model was loaded, fallbacks, counts, histories."""

    def path(self, key: str) -> Path:
        p = Path(self.paths[key])
        return p if p.is_absolute() else Path(self.out_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def read(cls, out_dir: str | os.PathLike[str]) -> "StepResult":
        out_dir = Path(out_dir)
        res = cls.from_dict(json.loads((out_dir / RESULT_FILE).read_text()))
        res.out_dir = str(out_dir)
        return res


def cuda_peak_gib() -> float | None:
    """Peak GPU memory allocated by this process since its start or the last
    :func:`reset_cuda_peak` (GiB; the largest over its GPUs), or None when it never used CUDA.

    Why here and without importing torch: every step writes result.json through
    :func:`step_output`, on any backend, so every step on a GPU records its peak; a CPU-only
    process (or one that never imported torch) records nothing."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return round(peak / 2**30, 3)


def reset_cuda_peak() -> None:
    """Start a new peak (:func:`cuda_peak_gib`): the local in-process backend runs many steps in
    one process, and each step's peak must be its own."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


@contextlib.contextmanager
def step_output(out_dir: str | os.PathLike[str], step: str) -> Iterator[tuple[Path, StepResult]]:
    """Stage ``out_dir``; yield ``(tmp_dir, result)``; on success write result.json and rename.

    Paths the step records must be relative to the directory (they stay valid after the rename).
    """
    final = Path(out_dir)
    t0 = time.time()
    result = StepResult(step=step)
    with staged_dir(final) as tmp:
        yield tmp, result
        result.timings.setdefault("wall_s", round(time.time() - t0, 3))
        peak = cuda_peak_gib()
        if peak is not None:
            result.info.setdefault("gpu_peak_gib", peak)
        result.info.setdefault("host", socket.gethostname())
        result.info.setdefault("python", platform.python_version())
        result.info.setdefault("pid", os.getpid())
        result.out_dir = str(final)
        atomic_write_json(tmp / RESULT_FILE, result.to_dict())
