"""The pictures of assets/plots.py, without a browser: right numbers in, a real PNG out.

The browser half (that the Dagster UI shows them) is in test_ui.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.assets import plots


def decode_png(md: str) -> np.ndarray:
    """The image embedded in a markdown metadata value, decoded by matplotlib (RGBA array)."""
    import matplotlib.image as mpimg

    m = re.search(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert m, "no PNG data URI in the markdown"
    return mpimg.imread(io.BytesIO(base64.b64decode(m.group(1))), format="png")


def assert_drawn(img: np.ndarray) -> None:
    assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 200
    # Not a blank canvas: many distinct colours (lines, bars, text).
    assert len(np.unique(img.reshape(-1, img.shape[2]).round(2), axis=0)) > 20


HISTORY = [  # the shape of transformers' Trainer.state.log_history
    {"epoch": 0.1, "loss": 1.12, "learning_rate": 1e-3, "step": 2},
    {"epoch": 0.2, "loss": 1.05, "learning_rate": 8e-4, "step": 4},
    {"epoch": 0.2, "eval_loss": 1.09, "eval_runtime": 0.3, "step": 4},
    {"epoch": 0.3, "loss": 0.98, "learning_rate": 5e-4, "step": 6},
    {"epoch": 0.3, "eval_loss": 1.04, "eval_runtime": 0.3, "step": 6},
    {"epoch": 0.3, "step": 6, "train_loss": 1.05, "train_runtime": 4.0, "total_flos": 1.0},
]


def test_loss_series_separates_train_and_validation_and_skips_the_summary() -> None:
    s = plots.loss_series(HISTORY)
    assert s["train"] == [(2.0, 1.12), (4.0, 1.05), (6.0, 0.98)]
    assert s["validation"] == [(4.0, 1.09), (6.0, 1.04)]


def test_loss_curves_metadata_embeds_a_png(tmp_path: Path) -> None:
    p = tmp_path / "history.json"
    p.write_text(json.dumps(HISTORY))
    md = plots.loss_curves_metadata(p, "student_model fold 0")
    text = md["loss_curves"].value
    assert "3 train and 2 validation points" in text
    assert len(text) > plots.INLINE_MD_LIMIT  # so the UI shows it behind [Show Markdown]
    assert_drawn(decode_png(text))


def test_a_chart_that_cannot_be_drawn_reports_instead_of_raising(tmp_path: Path) -> None:
    p = tmp_path / "history.json"
    p.write_text(json.dumps([{"step": 1, "train_runtime": 1.0}]))
    md = plots.loss_curves_metadata(p, "empty")
    assert set(md) == {"loss_curves_error"} and "no loss values" in md["loss_curves_error"]
    md = plots.loss_curves_metadata(tmp_path / "missing.json", "missing")
    assert "FileNotFoundError" in md["loss_curves_error"]


def test_reliability_bins_and_ece_known_answer() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 0, 2])
    bins, ece = plots.reliability_bins(probs, labels, n_bins=10)
    by_hi = {round(b["hi"], 1): b for b in bins}
    assert by_hi[0.9]["count"] == 2 and by_hi[0.9]["accuracy"] == 0.5 and by_hi[0.9]["confidence"] == pytest.approx(0.9)
    assert by_hi[0.5]["count"] == 2 and by_hi[0.5]["accuracy"] == 0.5 and by_hi[0.5]["confidence"] == pytest.approx(0.5)
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |0.5 - 0.5|
    assert ece == pytest.approx(0.2)
    # Soft labels reduce to their argmax.
    _, ece_soft = plots.reliability_bins(probs, np.eye(3)[labels] * 0.8 + 0.2 / 3, n_bins=10)
    assert ece_soft == pytest.approx(ece)


def test_reliability_metadata_before_after_temperature(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    # Over-confident logits: the right class is favoured, but far too sharply.
    z = rng.normal(0, 1, (n, 3))
    z[np.arange(n), y] += 1.0
    z *= 4.0
    ids = [f"r{i}" for i in range(n)]
    pd.DataFrame({"id": ids, "logit_a": z[:, 0], "logit_b": z[:, 1], "logit_tie": z[:, 2],
                  **{c: plots.softmax(z)[:, i] for i, c in enumerate(plots.PROB_COLS)}}).to_parquet(tmp_path / "p.parquet")
    onehot = np.eye(3)[y]
    pd.DataFrame({"id": ids, **{c: onehot[:, i] for i, c in enumerate(plots.LABEL_COLS)}}).to_parquet(tmp_path / "v.parquet")
    md = plots.reliability_metadata(tmp_path / "p.parquet", tmp_path / "v.parquet", temperature=4.0, title="fold 0")
    assert md["ece_after"] < md["ece_before"]  # dividing by T=4 undoes the sharpening
    text = md["reliability_diagram"].value
    assert "400 validation rows" in text and "temperature 4.000" in text
    assert_drawn(decode_png(text))


def test_cv_logloss_metadata_chart_and_inline_bars() -> None:
    ll = {0: 1.0964, 1: 1.0978, 2: 1.0970, 3: 1.0974, 4: 1.0984}
    raw = {k: v + 0.01 for k, v in ll.items()}
    md = plots.cv_logloss_metadata(ll, raw)
    assert_drawn(decode_png(md["cv_logloss_plot"].value))
    bars = md["cv_logloss_bars"].value
    assert len(bars) < plots.INLINE_MD_LIMIT  # rendered inline by the UI, no click
    rows = {int(r.split("|")[1]): r for r in bars.splitlines()[2:]}
    assert set(rows) == set(ll)
    lengths = {k: rows[k].count("█") for k in rows}
    assert lengths[0] == 1 and lengths[4] == 20  # best fold one block, worst the full width
    assert sorted(ll, key=ll.get) == sorted(lengths, key=lengths.get)
    assert "1.0964" in rows[0]
