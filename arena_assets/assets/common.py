"""What every asset body does around its step: versions in, a new version out, metadata.

An asset never hands Python objects to the next one (no IO manager pickles a model): it reads
its inputs from the ``latest`` version directories of its upstream assets, lets a step write a
fresh version directory, records provenance (settings hash, the upstream versions it read) in the
directory and in the metadata, and only then switches ``latest`` (core/artifacts.py). A step that
raises leaves the previous version current.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import AssetKey, Failure, MetadataValue

from arena_assets.core import artifacts
from arena_assets.core.results import StepResult
from arena_assets.core.settings import Settings, settings_hash

PROVENANCE_FILE = "provenance.json"


def key_str(key: AssetKey | str) -> str:
    """``llama/teacher_model`` for ``AssetKey(["llama", "teacher_model"])``."""
    return key if isinstance(key, str) else "/".join(key.path)


def step_code_version(settings: Settings, step: str, family: str | None = None) -> str:
    """The asset's code version: the hash of the settings this step uses, and only those."""
    return settings_hash(settings.for_step(step, family))


def latest_or_fail(root: Path, key: AssetKey | str, partition: str | None = None) -> Path:
    """The current version directory of an upstream asset; a clear failure when it is missing."""
    v = artifacts.latest(root, key_str(key), partition)
    if v is None:
        where = f"{key_str(key)}[{partition}]" if partition is not None else key_str(key)
        raise Failure(description=f"upstream {where} has no materialized version under {root}; "
                      "materialize it first")
    return v


@dataclass
class Materialization:
    """One materialization in progress: its version directory and what it read."""

    root: Path
    key: str
    partition: str | None
    code_version: str
    out_dir: Path
    inputs: dict[str, str] = field(default_factory=dict)
    t0: float = field(default_factory=time.time)

    @classmethod
    def begin(cls, settings: Settings, key: AssetKey | str, partition: str | None, code_version: str) -> "Materialization":
        root = settings.root
        ks = key_str(key)
        return cls(root=root, key=ks, partition=partition, code_version=code_version,
                   out_dir=artifacts.new_version_dir(root, ks, partition))

    def read(self, key: AssetKey | str, partition: str | None = None) -> Path:
        """Resolve an upstream's latest version now and remember it (provenance)."""
        v = latest_or_fail(self.root, key, partition)
        label = key_str(key) + (f"[{partition}]" if partition is not None else "")
        self.inputs[label] = str(v)
        return v

    def checkpoint_dir(self, step: str) -> Path:
        """Where a training step keeps resumable checkpoints: keyed by step, partition, settings
        hash and the input versions read so far (call after :meth:`read`), so a retry or re-run
        with the same inputs resumes and any change starts afresh (design.md)."""
        from arena_assets.core.settings import settings_hash
        from arena_assets.gpu.train import checkpoint_dir_for

        data_version = settings_hash({k: Path(v).name for k, v in sorted(self.inputs.items())})
        return checkpoint_dir_for(self.root / ".checkpoints", step, self.partition or "_",
                                  self.code_version, data_version)

    def commit(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Record provenance inside the (complete) version directory, then switch ``latest``."""
        if not self.out_dir.is_dir():
            raise Failure(description=f"{self.key}: the step did not leave a version at {self.out_dir}")
        prov = {"asset": self.key, "partition": self.partition, "code_version": self.code_version,
                "inputs": self.inputs, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **dict(extra or {})}
        artifacts.atomic_write_json(self.out_dir / PROVENANCE_FILE, prov)
        artifacts.set_latest(self.out_dir)
        from arena_assets.assets.seed_view import update_seed_view

        update_seed_view(self.root, self.key, self.partition, self.out_dir)
        return self.out_dir

    def metadata(self, result: StepResult | None = None, **extra: Any) -> dict[str, Any]:
        """Metadata every materialization carries, plus the step's metrics and compute facts."""
        md: dict[str, Any] = {
            "version_dir": MetadataValue.path(str(self.out_dir)),
            "version": self.out_dir.name,
            "settings_hash": self.code_version,
            "wall_s": round(time.time() - self.t0, 3),
            "inputs": MetadataValue.json({k: Path(v).name for k, v in self.inputs.items()}),
        }
        if result is not None:
            for k, v in result.metrics.items():
                if isinstance(v, (int, float)):
                    md[k] = float(v)
            for k in result.paths:
                md[f"path_{k}"] = MetadataValue.path(str(result.path(k)))
            comp = result.info.get("compute", {})
            md["backend"] = str(comp.get("backend", "local")) + (f"/{comp['mode']}" if comp.get("mode") else "")
            if comp.get("job_id") is not None:
                md["slurm_job_id" if comp.get("backend") == "slurm" else "job_id"] = str(comp["job_id"])
            if comp.get("job_name") and comp.get("backend") == "k8s":
                md["k8s_job"] = str(comp["job_name"])
            facts = {k: v for k, v in comp.items()
                     if k in ("state", "node", "elapsed", "max_rss_mb", "pod", "exit_code", "namespace", "job_name")}
            if facts:
                md["compute_facts"] = MetadataValue.json(_jsonable(facts))
            if result.notes:
                md["notes"] = MetadataValue.md("\n".join(f"- {n}" for n in result.notes))
            md["step_wall_s"] = float(result.timings.get("wall_s", 0.0))
            # --- plots (assets/plots.py): every training step's train/validation loss curves
            if "history" in result.paths:
                from arena_assets.assets.plots import loss_curves_metadata

                where = f" fold {self.partition}" if self.partition is not None else ""
                md.update(loss_curves_metadata(result.path("history"), f"{self.key}{where}"))
            # --- end plots
        md.update(extra)
        return md


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def dir_size_mb(path: Path) -> float:
    """Size of a model/adapter directory in MiB (metadata: model and adapter sizes)."""
    p = Path(path)
    if p.is_file():
        return round(p.stat().st_size / 2**20, 3)
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 3)


def md_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A small markdown table for metadata."""
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(out)


def fold_of(context: Any) -> int:
    """The fold of a per-fold asset's run (its partition key)."""
    return int(context.partition_key)


def fold_tables(m: Materialization, fold: int) -> tuple[Path, Path]:
    """(train, valid) parquet paths of one fold's ``fold_data`` version (recorded as read)."""
    from arena_assets.assets.keys import FOLD_DATA

    v = m.read(FOLD_DATA, str(fold))
    return v / "train.parquet", v / "valid.parquet"


def read_json(path: Path) -> dict[str, Any]:
    """A step's small JSON output (calibration.json, quantization.json); {} when absent."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def other_python(py: str | None) -> str | None:
    """The GPTQ interpreter when it differs from this one (then the step runs in a child process)."""
    import os
    import sys

    if not py:
        return None
    try:
        if os.path.abspath(py) == os.path.abspath(sys.executable):
            return None
    except OSError:
        pass
    return py
