"""Tables -> token datasets for the Trainer, with dynamic padding.

Items are plain dicts (``input_ids`` list, ``labels`` 3 floats, optional ``teacher_logits``
(F, 3)), so the Trainer's ``group_by_length`` sampler can read lengths and the collator pads each
batch only to its longest row (length-sorted batches waste little on padding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arena_assets.gpu.formatting import TextFormat, encode_rows, labels_of

log = logging.getLogger(__name__)


def read_table(path: str | os.PathLike[str] | Any) -> Any:
    """A contract table (parquet) as a DataFrame; ``core.contract.read_table`` when present.

    A DataFrame passes through (tests, in-process callers)."""
    import pandas as pd

    if isinstance(path, pd.DataFrame):
        return path
    try:
        from arena_assets.core.contract import read_table as contract_read
    except ImportError:  # the data contract module may not exist in a minimal install
        contract_read = None
    if contract_read is not None:
        return contract_read(path)
    p = Path(path)
    return pd.read_csv(p) if p.suffix == ".csv" else pd.read_parquet(p)


class PairDataset:
    """A torch-style map dataset of encoded rows."""

    def __init__(
        self,
        input_ids: Sequence[Sequence[int]],
        labels: np.ndarray | None = None,
        teacher_logits: np.ndarray | None = None,
    ) -> None:
        self.input_ids = [list(x) for x in input_ids]
        self.labels = labels
        self.teacher_logits = teacher_logits

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[i]
        return item

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def encode_table(
    df: Any,
    tokenizer: Any,
    tf: TextFormat,
    max_length: int,
    prompt_max_tokens: int,
    with_labels: bool = True,
    teacher_logits: np.ndarray | None = None,
    swap: bool = False,
) -> PairDataset:
    ids = encode_rows(df, tokenizer, tf, max_length, prompt_max_tokens, swap=swap)
    labels = None
    if with_labels:
        labels = labels_of(df)
        if swap:
            labels = labels[:, [1, 0, 2]]
    return PairDataset(ids, labels, teacher_logits)


class PadCollator:
    """Pads ``input_ids`` to the batch's longest row (right side), builds the attention mask."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(it["input_ids"]) for it in items)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            x = it["input_ids"]
            ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            batch["labels"] = torch.as_tensor(np.stack([it["labels"] for it in items]), dtype=torch.float32)
        if "teacher_logits" in items[0]:
            batch["teacher_logits"] = torch.as_tensor(
                np.stack([it["teacher_logits"] for it in items]), dtype=torch.float32
            )
        return batch


def teacher_logits_for(
    oof: Any, ids: Sequence[str], families: list[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Teacher logits (n, F, 3) = log of the OOF probabilities for ``ids``, one slot per family.

    Raises if any id lacks a teacher probability for a family: a student row without its teacher
    is a bug upstream (the OOF must cover every train id once per family).
    Also returns the OOF ``fold`` of each id (n,), for the leak check in the caller.
    """
    import pandas as pd

    fams = sorted(oof["family"].unique()) if families is None else list(families)
    missing_f = [f for f in fams if f not in set(oof["family"])]
    if missing_f:
        raise ValueError(f"teacher OOF has no rows for families {missing_f}")
    key = pd.Index([str(i) for i in ids])
    out = np.zeros((len(ids), len(fams), 3), dtype=np.float32)
    folds = np.full(len(ids), -1, dtype=np.int64)
    for j, f in enumerate(fams):
        sub = oof[oof["family"] == f].copy()
        sub["id"] = sub["id"].astype(str)
        if sub["id"].duplicated().any():
            raise ValueError(f"teacher OOF family {f!r} has duplicate ids")
        sub = sub.set_index("id")
        missing = key.difference(sub.index)
        if len(missing):
            raise ValueError(f"teacher OOF family {f!r} lacks {len(missing)} train ids, e.g. {list(missing[:3])}")
        probs = sub.loc[key, ["p_a", "p_b", "p_tie"]].to_numpy(dtype=np.float64)
        out[:, j] = np.log(np.clip(probs, 1e-7, 1.0))
        if "fold" in sub.columns:
            folds = sub.loc[key, "fold"].to_numpy(dtype=np.int64)
    return out, fams, folds
