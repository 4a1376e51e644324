"""Steps 1 and 3 without external pairs (issue 16): the seed calls them optional.

The ``external_pairs`` asset writes an EMPTY table when ``data.external`` is missing; post-
pretraining on it used to crash in the tokenizer (``IndexError: list index out of range``). Now the
base passes through (a tiny family's: an untrained random-init model, said so), the teacher trains
on its fold alone, and each says why in result.json and the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from arena_assets.core.settings import (
    ModelSpec,
    PostPretrainSettings,
    TeacherSettings,
    TrainSettings,
)
from tests.gpu.conftest import FMT, LORA, TINY

SOURCE = "data.external=/nowhere/external.csv missing"
QUICK = TrainSettings(learning_rate=1e-3, per_device_batch_size=8, max_length=64, max_steps=1, warmup_steps=0,
                      logging_steps=1, save_steps=1000)


@pytest.fixture(scope="module")
def plain_base(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A passed-through tiny base (no training: the teacher tests need a base, not a good one)."""
    from arena_assets.gpu.pretrain import post_pretrain

    out = tmp_path_factory.mktemp("plain_base") / "v1"
    return post_pretrain(ModelSpec(tiny=TINY), PostPretrainSettings(enabled=False), FMT, None, [data["train"]],
                         out_dir=out)


def _empty_external(folder: Path) -> Path:
    """The table the external_pairs asset writes when the file is absent."""
    from arena_assets.core import contract

    df = pd.DataFrame({c: pd.Series(dtype=object) for c in contract.EXTERNAL_COLS})
    return contract.write_table(df, folder / "external_empty.parquet")


@pytest.mark.parametrize("kind", ["empty table", "none"])
def test_post_pretrain_without_external_pairs_passes_the_base_through(
    kind: str, data: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from arena_assets.gpu.models import load_classifier
    from arena_assets.gpu.pretrain import post_pretrain

    external = _empty_external(tmp_path) if kind == "empty table" else None
    corpus = [data["train"], data["test"]] + ([external] if external is not None else [])
    with caplog.at_level(logging.WARNING, logger="arena_assets.gpu.pretrain"):
        r = post_pretrain(ModelSpec(tiny=TINY), PostPretrainSettings(train=QUICK), FMT, external, corpus,
                          out_dir=tmp_path / "pp", external_source=SOURCE)
    assert r is not None
    assert r.info["post_pretrained"] is False and r.info["random_init"] is True
    assert r.info["external_rows"] == 0 and r.info["reason"] == f"no external pairs ({SOURCE})"
    assert r.notes == [("base NOT post-pretrained, passed through (an untrained random-init tiny model): "
                        f"no external pairs ({SOURCE})")]
    assert "history" not in r.paths and "valid_logloss" not in r.metrics
    assert any(SOURCE in m and "post-pretraining skipped" in m for m in caplog.messages), caplog.messages
    model, tok = load_classifier(r.path("model"))  # a loadable base all the same
    assert model.config.num_labels == 3 and len(tok) > 10


def test_disabled_post_pretrain_says_why_and_does_not_warn(data: dict[str, Any], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from arena_assets.gpu.pretrain import post_pretrain

    with caplog.at_level(logging.WARNING, logger="arena_assets.gpu.pretrain"):
        r = post_pretrain(ModelSpec(tiny=TINY), PostPretrainSettings(enabled=False), FMT, data["external"],
                          [data["train"]], out_dir=tmp_path / "pp")
    assert r is not None and r.info["post_pretrained"] is False and r.info["random_init"] is True
    assert r.info["reason"] == "post_pretrain.enabled is false"
    assert not [m for m in caplog.messages if "post-pretraining skipped" in m]


def test_external_table_in_the_corpus_is_not_counted_as_shared_ids(data: dict[str, Any], tmp_path: Path) -> None:
    """The asset passes the external table in the corpus too (for its text): its own ids are not an
    overlap with the corpus (they used to be, all of them, with a warning on every run)."""
    from arena_assets.gpu.pretrain import post_pretrain

    cfg = PostPretrainSettings(train=QUICK, max_rows=40)
    r = post_pretrain(ModelSpec(tiny=TINY), cfg, FMT, data["external"], [data["train"], data["test"], data["external"]],
                      out_dir=tmp_path / "pp")
    assert r is not None and r.info["post_pretrained"] is True and r.info["random_init"] is False
    assert r.info["external_ids_in_corpus"] == 0 and r.info["external_rows"] > 0 and "reason" not in r.info


def test_teacher_without_external_pairs_trains_on_its_fold_alone(
    data: dict[str, Any], plain_base: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from arena_assets.gpu.train import train_teacher

    cfg = TeacherSettings(train=QUICK, lora=LORA, use_external=True)
    with caplog.at_level(logging.WARNING, logger="arena_assets.gpu.train"):
        r = train_teacher(plain_base.path("model"), cfg, FMT, data["train0"], data["valid0"], _empty_external(tmp_path),
                          out_dir=tmp_path / "teacher", external_source=SOURCE)
    assert r is not None
    n_train = len(pd.read_parquet(data["train0"]))
    assert r.info["external_rows"] == 0 and r.info["train_rows"] == n_train
    assert r.info["external_reason"] == f"no external pairs ({SOURCE})"
    assert r.notes == [("teacher trained without external rows (teacher.use_external is true): "
                        f"no external pairs ({SOURCE})")]
    assert any("without external rows" in m and SOURCE in m for m in caplog.messages), caplog.messages
    assert (r.path("model") / "adapter_config.json").exists()


def test_teacher_with_use_external_off_records_why_without_a_warning(
    data: dict[str, Any], plain_base: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from arena_assets.gpu.train import train_teacher

    cfg = TeacherSettings(train=QUICK, lora=LORA, use_external=False)
    with caplog.at_level(logging.WARNING, logger="arena_assets.gpu.train"):
        r = train_teacher(plain_base.path("model"), cfg, FMT, data["train0"], data["valid0"], None, out_dir=tmp_path / "t")
    assert r is not None and r.info["external_rows"] == 0
    assert r.info["external_reason"] == "teacher.use_external is false" and r.notes == []
    assert not [m for m in caplog.messages if "without external rows" in m]
