"""The seed repository's layout as a view of links to the latest artifact versions.

Users of the original scripts expect ``data/processed_data/folds_5_seed42.json``,
``model_save/distilled_<student>_fold_<k>/``, ``sub/...``. Rather than writing files twice, every
commit of a version re-points a symlink under ``<root>/seed_layout/`` (atomic replace), so the
view always shows the current versions and never a half-written one.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

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


def update_seed_view(root: str | os.PathLike[str], key: str, partition: str | None, version_dir: Path) -> list[Path]:
    """Point the seed-layout links of ``key``/``partition`` at ``version_dir``'s files."""
    base = Path(root) / SEED_LAYOUT
    made: list[Path] = []
    for rel, target in _targets(key, partition, Path(version_dir)):
        link = base / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.parent / f".{link.name}.{secrets.token_hex(4)}"
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)
        made.append(link)
    return made
