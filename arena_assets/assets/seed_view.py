"""The seed repository's layout as a view of links to the latest artifact versions.

Users of the original scripts expect ``data/processed_data/folds_5_seed42.json``,
``model_save/distilled_<student>_fold_<k>/``, ``sub/...``. Rather than writing files twice, every
commit of a version re-points a symlink under ``<root>/seed_layout/`` (atomic replace, folder
fsynced), so the view always shows the current versions and never a half-written one.

The view is contained: a link whose folder (or whose target) resolves outside the artifact root --
a symlink planted under ``seed_layout/`` -- is refused (core.artifacts.OutsideArtifactRoot, naming
the path) and nothing is written there; the other links are still updated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from pathlib import Path

from arena_assets.core import artifacts

log = logging.getLogger(__name__)

SEED_LAYOUT = "seed_layout"


def _targets(key: str, partition: str | None, version_dir: Path) -> list[tuple[str, Path]]:
    """(link path relative to seed_layout, target) pairs for one committed version."""
    k = partition
    parts = key.split("/")
    name = parts[-1]
    fam = parts[0] if len(parts) > 1 else None
    v = version_dir
    out: list[tuple[str, Path]] = []
    if name == "fold_assignments":
        for f in v.glob("folds_*.json"):
            out.append((f"data/processed_data/{f.name}", f))
    elif name == "fold_data":
        out += [(f"data/fold_data/fold_{k}_train.parquet", v / "train.parquet"),
                (f"data/fold_data/fold_{k}_valid.parquet", v / "valid.parquet")]
    elif name == "teacher_oof":
        out.append(("data/processed_data/teacher_oof.parquet", v / "teacher_oof.parquet"))
    elif name == "post_pretrained_base":
        out.append((f"model_save/post_pretrain_{fam}", v / "model"))
    elif name == "teacher_model":
        out.append((f"model_save/teacher_{fam}_fold_{k}", v / "model"))
    elif name == "student_model":
        out.append((f"model_save/distilled_student_fold_{k}", v / "model"))
    elif name == "baseline_student":
        out.append((f"model_save/baseline_student_fold_{k}", v / "model"))
    elif name == "averaged_lora":
        out.append(("model_save/avg_lora", v / "adapter"))
    elif name == "merged_model":
        out.append(("model_save/final_merged_model", v / "model"))
    elif name == "quantized_model":
        out.append(("model_save/final_quantized_model", v / "model"))
    elif name == "student_fold_submission":
        out.append((f"sub/fold_{k}_submission.csv", v / "submission.csv"))
    elif name == "tta_submission":
        out.append(("sub/tta_submission.csv", v / "submission.csv"))
    elif name == "final_ensemble":
        out.append(("sub/submission.csv", v / "submission.csv"))
    return [(rel, t) for rel, t in out if t.exists()]


def _drop_stale_temp_links(link: Path) -> None:
    """Temporary links of a commit killed between symlink and replace (``.<name>.<hex>``), once
    older than ``artifacts.STRAY_LINK_MIN_AGE_S`` and the sweep's grace period (a live commit
    replaces its own within microseconds)."""
    cutoff = time.time() - max(artifacts.sweep_grace_s(), artifacts.STRAY_LINK_MIN_AGE_S)
    prefix = f".{link.name}."
    with contextlib.suppress(OSError):
        for e in os.scandir(link.parent):
            if e.name.startswith(prefix) and e.is_symlink() and e.stat(follow_symlinks=False).st_mtime <= cutoff:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def update_seed_view(root: str | os.PathLike[str], key: str, partition: str | None, version_dir: Path) -> list[Path]:
    """Point the seed-layout links of ``key``/``partition`` at ``version_dir``'s files; raises
    :class:`~arena_assets.core.artifacts.OutsideArtifactRoot` (after updating the contained ones)
    for links that would be written outside the artifact root."""
    base = Path(root) / SEED_LAYOUT
    made: list[Path] = []
    refused: list[artifacts.OutsideArtifactRoot] = []
    for rel, target in _targets(key, partition, Path(version_dir)):
        link = base / rel
        try:
            artifacts.ensure_inside(root, link.parent, "write the seed-layout link into")
            real_target = artifacts.ensure_inside(root, target, f"point the seed-layout link {link} at")
            artifacts.make_dirs(link.parent)
            real_parent = artifacts.ensure_inside(root, link.parent, "write the seed-layout link into")
        except artifacts.OutsideArtifactRoot as e:
            refused.append(e)
            continue
        _drop_stale_temp_links(link)
        tmp = link.parent / f".{link.name}.{secrets.token_hex(4)}"
        os.symlink(os.path.relpath(real_target, real_parent), tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        artifacts.fsync_dir(link.parent)
        made.append(link)
    if refused:  # every refusal logged, the first raised
        for e in refused:
            log.error("seed layout: %s", e)
        raise refused[0]
    return made
