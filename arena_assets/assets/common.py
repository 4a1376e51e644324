"""What every asset body does around its step: versions in, a new version out, metadata.

An asset never hands Python objects to the next one (no IO manager pickles a model). The commit
protocol (one for every asset):

1. ``Materialization.begin`` opens a fresh version directory (never reused, core/artifacts.py).
2. ``read`` resolves each upstream through **Dagster's record**, not the disk: the newest
   materialization of that asset partition whose blocking checks passed (its ``version_dir``
   metadata). Dagster records a materialization as latest even when a blocking check failed, and
   an asset body cannot run after its own event is recorded, so the body records the verdict
   itself (``arena/blocking_checks_passed``) and readers skip failed versions.
3. The step writes the version; the body computes its check results; ``commit`` writes
   ``provenance.json`` and, only if every blocking check passed, re-points the disk ``latest``
   and the seed layout (a view for people and old scripts; nothing downstream reads it while a
   Dagster instance is at hand). A failed version stays on disk for inspection, never read.
4. ``result`` builds the MaterializeResult. When the run's settings differ from the file's (a
   launchpad override), the materialization is tagged with the code version of the settings
   actually used, and an explicit data version, so the UI never calls it current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetKey,
    AssetRecordsFilter,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
)

from arena_assets.core import artifacts
from arena_assets.core.results import StepResult
from arena_assets.core.settings import Settings, settings_hash

PROVENANCE_FILE = artifacts.PROVENANCE_FILE
CHECKS_PASSED = "arena/blocking_checks_passed"
"""Materialization metadata: did every blocking check of this version pass (readers skip it if not)."""
CODE_VERSION_TAG = "dagster/code_version"
_RECORDS_SCANNED = 100
log = logging.getLogger(__name__)


def key_str(key: AssetKey | str) -> str:
    """``llama/teacher_model`` for ``AssetKey(["llama", "teacher_model"])``."""
    return key if isinstance(key, str) else "/".join(key.path)


def _asset_key(key: AssetKey | str) -> AssetKey:
    return key if isinstance(key, AssetKey) else AssetKey(key.split("/"))


def step_code_version(settings: Settings, step: str, family: str | None = None) -> str:
    """The asset's code version: the hash of the settings this step uses, and only those."""
    return settings_hash(settings.for_step(step, family))


def latest_or_fail(root: Path, key: AssetKey | str, partition: str | None = None) -> Path:
    """The disk ``latest`` of an upstream asset (outside a Dagster run only); a clear failure
    when it is missing."""
    v = artifacts.latest(root, key_str(key), partition)
    if v is None:
        raise Failure(description=f"upstream {_where(key, partition)} has no materialized version under {root}; "
                      "materialize it first")
    return v


def _where(key: AssetKey | str, partition: str | None) -> str:
    return f"{key_str(key)}[{partition}]" if partition is not None else key_str(key)


def _md_value(v: Any) -> Any:
    """The plain value of a stored metadata entry (``MetadataValue.path`` -> its path)."""
    for attr in ("value", "path", "text"):
        if hasattr(v, attr):
            return getattr(v, attr)
    return v


def resolve_upstream(instance: Any, root: Path, key: AssetKey | str, partition: str | None) -> tuple[Path, str | None]:
    """(version dir, Dagster data version) of the newest materialization of ``key[partition]``
    whose blocking checks passed and whose version directory is complete on disk.

    Why Dagster's record and not the disk ``latest``: the record is what Dagster calls current
    (lineage, staleness, automation), and it also holds the materializations whose blocking checks
    failed, which must never be read.
    """
    flt = AssetRecordsFilter(asset_key=_asset_key(key), asset_partitions=[partition] if partition is not None else None)
    records = instance.fetch_materializations(flt, limit=_RECORDS_SCANNED).records
    if not records:
        # An instance that never saw this asset (a new instance, e.g. SQLite -> Postgres, over an
        # existing artifact root): the disk view, which only ever points at versions whose
        # blocking checks passed, rather than re-training what exists.
        log.warning("upstream %s has no materialization in this Dagster instance: reading the artifact "
                    "root's latest", _where(key, partition))
        return latest_or_fail(root, key, partition), None
    skipped: list[str] = []
    for rec in records:
        mat = rec.asset_materialization
        if mat is None:
            continue
        md = mat.metadata or {}
        vd = md.get("version_dir")
        if vd is None:
            skipped.append("a materialization without version_dir metadata")
            continue
        vdir = Path(str(_md_value(vd)))
        if md.get(CHECKS_PASSED) is not None and not bool(_md_value(md[CHECKS_PASSED])):
            skipped.append(f"{vdir.name} (a blocking check failed)")
            continue
        if not (vdir / PROVENANCE_FILE).is_file():
            skipped.append(f"{vdir.name} (not complete on disk)")
            continue
        return vdir, (mat.tags or {}).get("dagster/data_version")
    why = f"; skipped: {', '.join(skipped[:5])}" if skipped else ""
    raise Failure(description=f"upstream {_where(key, partition)} has no materialization whose blocking checks "
                  f"passed in this Dagster instance (root {root}){why}; materialize it first")


@dataclass
class Materialization:
    """One materialization in progress: its version directory, what it read, its verdict."""

    root: Path
    key: str
    partition: str | None
    code_version: str
    """The code version of the settings this run actually uses (what the version is tagged with)."""
    out_dir: Path
    defined_code_version: str | None = None
    """The asset definition's code version (the settings file's); differs on an override."""
    context: Any = None
    inputs: dict[str, str] = field(default_factory=dict)
    input_data_versions: dict[str, str] = field(default_factory=dict)
    checks_passed: bool = True
    t0: float = field(default_factory=time.time)

    @classmethod
    def begin(
        cls,
        context: Any,
        settings: Settings,
        key: AssetKey | str,
        partition: str | None,
        code_version: str | None = None,
        step: str | None = None,
        family: str | None = None,
    ) -> Materialization:
        """Open a new version of ``key[partition]``.

        ``step`` (+ ``family``): the code version is that step's settings hash under the run's
        settings; ``code_version``: a fixed version (tables, the OOF table, the quality report).
        """
        root = settings.root
        ks = key_str(key)
        used = step_code_version(settings, step, family) if step else code_version
        if used is None:
            raise ValueError(f"{ks}: give a step or a code_version")
        defined = None
        ad = getattr(context, "assets_def", None) if context is not None else None
        if ad is not None:
            defined = ad.code_versions_by_key.get(_asset_key(key))
        return cls(root=root, key=ks, partition=partition, code_version=used, defined_code_version=defined,
                   context=context, out_dir=artifacts.new_version_dir(root, ks, partition))

    @property
    def instance(self) -> Any:
        return getattr(self.context, "instance", None) if self.context is not None else None

    def read(self, key: AssetKey | str, partition: str | None = None) -> Path:
        """Resolve an upstream's current version now (see the module doc) and remember it."""
        if self.instance is not None:
            v, dv = resolve_upstream(self.instance, self.root, key, partition)
        else:  # outside a Dagster run (CLI helpers): the disk view
            v, dv = latest_or_fail(self.root, key, partition), None
        label = _where(key, partition)
        self.inputs[label] = str(v)
        if dv is not None:
            self.input_data_versions[label] = dv
        return v

    def checkpoint_dir(self, step: str) -> Path:
        """Where a training step keeps resumable checkpoints: keyed by step, partition, settings
        hash and the input versions read so far (call after :meth:`read`), so a retry or re-run
        with the same inputs resumes and any change starts afresh (design.md)."""
        from arena_assets.gpu.train import checkpoint_dir_for

        data_version = settings_hash({k: Path(v).name for k, v in sorted(self.inputs.items())})
        ckpt = checkpoint_dir_for(self.root / ".checkpoints", step, self.partition or "_",
                                  self.code_version, data_version)
        artifacts.ensure_inside(self.root, ckpt, "write training checkpoints into")  # no planted symlink
        return ckpt

    def _blocking_checks(self) -> set[str]:
        ad = getattr(self.context, "assets_def", None) if self.context is not None else None
        if ad is None:
            return set()
        me = _asset_key(self.key)
        return {spec.name for spec in ad.check_specs if spec.blocking and spec.asset_key == me}

    def commit(self, extra: Mapping[str, Any] | None = None, checks: Sequence[AssetCheckResult] = ()) -> Path:
        """Record provenance inside the (complete) version directory; switch the disk ``latest``
        only if every blocking check among ``checks`` passed."""
        if not self.out_dir.is_dir():
            raise Failure(description=f"{self.key}: the step did not leave a version at {self.out_dir}")
        blocking = self._blocking_checks()
        failed = [c.check_name for c in checks if c.check_name in blocking and not c.passed]
        self.checks_passed = not failed
        prov = {"asset": self.key, "partition": self.partition, "code_version": self.code_version,
                "inputs": self.inputs, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "blocking_checks_passed": self.checks_passed, "failed_checks": failed,
                **dict(extra or {})}
        artifacts.atomic_write_json(self.out_dir / PROVENANCE_FILE, prov)
        if failed:
            msg = (f"{_where(self.key, self.partition)}: blocking check(s) {', '.join(failed)} failed: version "
                   f"{self.out_dir.name} stays on disk for inspection and is never read downstream")
            lg = getattr(self.context, "log", None) if self.context is not None else None
            (lg or log).warning(msg)
            return self.out_dir
        artifacts.set_latest(self.out_dir)
        from arena_assets.assets.seed_view import update_seed_view

        update_seed_view(self.root, self.key, self.partition, self.out_dir)
        return self.out_dir

    def result(self, metadata: Mapping[str, Any], check_results: Sequence[AssetCheckResult] = ()) -> MaterializeResult:
        """The MaterializeResult of this version; on an override, tagged with the code version of
        the settings actually used and an explicit data version (that code version + the data
        versions of the upstream records read), so Dagster calls it what it is."""
        md = dict(metadata)
        md[CHECKS_PASSED] = self.checks_passed
        kw: dict[str, Any] = {}
        if self.defined_code_version is not None and self.code_version != self.defined_code_version:
            md["code_version_overridden"] = MetadataValue.json(
                {"file": self.defined_code_version, "used": self.code_version})
            blob = json.dumps({"code_version": self.code_version, "inputs": self.input_data_versions}, sort_keys=True)
            kw["tags"] = {CODE_VERSION_TAG: self.code_version}
            kw["data_version"] = DataVersion(hashlib.sha256(blob.encode()).hexdigest()[:24])
        return MaterializeResult(metadata=md, check_results=list(check_results) or None, **kw)

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
            # where the step's model ran and its GPU memory peak: a CPU fallback on a GPU node
            # (issue 15: GPTQ TTA silently on the CPU) shows on the materialization itself
            if result.info.get("devices"):
                md["devices"] = ", ".join(str(d) for d in result.info["devices"])
            if result.info.get("gpu_peak_gib") is not None:
                md["gpu_peak_gib"] = float(result.info["gpu_peak_gib"])
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
