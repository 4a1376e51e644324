"""Pictures where Dagster users look: PNG charts inside markdown metadata.

What Dagster 1.13.27's UI renders (checked in headless Chromium, tests/ui): a ``MetadataValue.md``
value goes through react-markdown with a sanitizer that allows ``data:`` image sources, so
``![alt](data:image/png;base64,...)`` shows as a picture. Markdown shorter than 1000 characters is
rendered inline in the metadata table; longer markdown (every PNG) sits behind a
``[Show Markdown]`` link that opens it in a dialog. So each chart comes as one markdown entry
with a PNG, and the per-fold CV log-loss also as a short inline bar table that needs no click.
Float metadata (``cv_logloss``, ``ece_after``...) is additionally drawn by the UI itself in the
asset's Metadata → Plots tab, one point per materialization.

matplotlib (Agg backend) and pandas are imported inside the functions: loading the code location
must not pay for them. A chart that cannot be drawn never fails the materialization it decorates
(its step already succeeded): the entry then says why, and a warning is logged.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import MetadataValue

from arena_assets.core.metrics import softmax

log = logging.getLogger(__name__)

#: Dagster renders markdown metadata inline below this many characters (MetadataEntry.tsx).
INLINE_MD_LIMIT = 1000
LABEL_COLS = ("winner_model_a", "winner_model_b", "winner_tie")
PROB_COLS = ("p_a", "p_b", "p_tie")
LOGIT_COLS = ("logit_a", "logit_b", "logit_tie")
_DPI = 80


# ----------------------------------------------------------------------------------- rendering
def _figure(width: float = 5.0, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on servers and Slurm nodes
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=_DPI)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str, title: str | None = None, caption: str | None = None) -> str:
    """Markdown embedding a PNG as a data URI (what the Dagster UI renders as an image)."""
    parts = [f"### {title}"] if title else []
    parts.append(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})")
    if caption:
        parts.append(caption)
    return "\n\n".join(parts)


def _safe(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a chart builder; on any error return a readable entry instead of raising."""
    try:
        return fn()
    except Exception as exc:
        log.warning("plot %s failed: %s", name, exc, exc_info=True)
        return {f"{name}_error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------------- loss curves
def loss_series(history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) points of a transformers ``Trainer.state.log_history``.

    Training logs carry ``loss``; evaluations ``eval_loss``; the final summary entry
    (``train_loss``, ``train_runtime``) is the run's mean and is not a point of the curve.
    """
    train, valid = [], []
    for e in history:
        step = e.get("step")
        if step is None:
            continue
        if isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"]):
            train.append((float(step), float(e["loss"])))
        if isinstance(e.get("eval_loss"), (int, float)) and math.isfinite(e["eval_loss"]):
            valid.append((float(step), float(e["eval_loss"])))
    return {"train": train, "validation": valid}


def loss_curves_png(history: Sequence[Mapping[str, Any]], title: str = "loss") -> bytes:
    """Train and validation loss against the optimizer step."""
    s = loss_series(history)
    if not s["train"] and not s["validation"]:
        raise ValueError("the log history has no loss values")
    fig, ax = _figure()
    if s["train"]:
        x, y = zip(*s["train"])
        ax.plot(x, y, marker="o", ms=3, label="train loss")
    if s["validation"]:
        x, y = zip(*s["validation"])
        ax.plot(x, y, marker="s", ms=6, ls="--", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def loss_curves_metadata(history_path: str | Path, title: str = "loss") -> dict[str, Any]:
    """``loss_curves`` (markdown with the PNG) from a step's ``history.json``."""

    def build() -> dict[str, Any]:
        history = json.loads(Path(history_path).read_text())
        s = loss_series(history)
        png = loss_curves_png(history, title)
        caption = f"{len(s['train'])} train and {len(s['validation'])} validation points (Trainer log history)."
        return {"loss_curves": MetadataValue.md(png_markdown(png, "loss curves", f"Loss curves: {title}", caption))}

    return _safe("loss_curves", build)


# ----------------------------------------------------------------------------------- calibration
def reliability_bins(probs: Any, labels: Any, n_bins: int = 10) -> tuple[list[dict[str, float]], float]:
    """Top-label reliability: per confidence bin, mean confidence, accuracy, count; and the ECE.

    ``probs``: (n, 3) predicted probabilities; ``labels``: (n,) class index or (n, 3) (soft) labels,
    reduced to their argmax. ECE = sum over bins of |accuracy - confidence| weighted by bin size.
    """
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece, n = [], 0.0, max(len(conf), 1)
    for b in range(n_bins):
        m = idx == b
        c = int(m.sum())
        if c == 0:
            continue
        mc, acc = float(conf[m].mean()), float(hit[m].mean())
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "confidence": mc, "accuracy": acc, "count": c})
        ece += c / n * abs(acc - mc)
    return bins, float(ece)


def reliability_png(curves: Mapping[str, Sequence[Mapping[str, float]]], title: str) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, one line per probability set."""
    fig, ax = _figure(4.6, 4.0)
    ax.plot([0, 1], [0, 1], color="gray", ls=":", label="perfectly calibrated")
    for name, bins in curves.items():
        if bins:
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def reliability_metadata(
    valid_predictions: str | Path,
    valid_table: str | Path,
    temperature: float,
    n_bins: int = 10,
    title: str = "reliability",
) -> dict[str, Any]:
    """``reliability_diagram`` (PNG markdown), ``ece_before`` and ``ece_after`` for one fold.

    Before = softmax of the validation logits; after = softmax(logits / temperature), the
    calibrated probabilities the fold's submission uses.
    """

    def build() -> dict[str, Any]:
        import numpy as np
        import pandas as pd

        pred = pd.read_parquet(valid_predictions)
        truth = pd.read_parquet(valid_table, columns=["id", *LABEL_COLS])
        df = pred.merge(truth, on="id", how="inner")
        if df.empty:
            raise ValueError("no validation prediction matches a validation label")
        y = df[list(LABEL_COLS)].to_numpy(np.float64)
        if all(c in df.columns for c in LOGIT_COLS):
            z = df[list(LOGIT_COLS)].to_numpy(np.float64)
            before, after = softmax(z), softmax(z, temperature)
        else:  # probabilities only: show them as they are
            before = df[list(PROB_COLS)].to_numpy(np.float64)
            after = None
        bins_b, ece_b = reliability_bins(before, y, n_bins)
        curves = {f"before (ECE {ece_b:.3f})": bins_b}
        md: dict[str, Any] = {"ece_before": ece_b}
        if after is not None:
            bins_a, ece_a = reliability_bins(after, y, n_bins)
            curves[f"after T={temperature:.2f} (ECE {ece_a:.3f})"] = bins_a
            md["ece_after"] = ece_a
        png = reliability_png(curves, title)
        caption = (f"{len(df)} validation rows, {n_bins} confidence bins; "
                   f"temperature {temperature:.3f}.")
        md["reliability_diagram"] = MetadataValue.md(png_markdown(png, "reliability diagram", title, caption))
        return md

    return _safe("reliability_diagram", build)


# ----------------------------------------------------------------------------------- CV log-loss
def cv_logloss_png(
    fold_logloss: Mapping[Any, float],
    fold_logloss_raw: Mapping[Any, float] | None = None,
    reference: float | None = None,
    reference_label: str = "class prior",
) -> bytes:
    """Bars of each fold's CV log-loss (calibrated; raw beside it when given)."""
    import numpy as np

    folds = sorted(fold_logloss, key=lambda k: int(k) if str(k).isdigit() else str(k))
    x = np.arange(len(folds))
    fig, ax = _figure()
    w = 0.38 if fold_logloss_raw else 0.6
    if fold_logloss_raw:
        ax.bar(x - w / 2, [fold_logloss_raw.get(k, np.nan) for k in folds], w, label="raw", color="#b0b7c3")
        ax.bar(x + w / 2, [fold_logloss[k] for k in folds], w, label="calibrated", color="#4f43dd")
    else:
        ax.bar(x, [fold_logloss[k] for k in folds], w, label="calibrated", color="#4f43dd")
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="#d1403b", ls="--", label=reference_label)
    vals = [v for v in fold_logloss.values() if math.isfinite(v)]
    if vals:
        mean = float(np.mean(vals))
        ax.axhline(mean, color="#2a7a3b", ls=":", label=f"mean {mean:.4f}")
    ax.set_xticks(x, [f"fold {k}" for k in folds])
    ax.set_ylabel("log-loss")
    ax.set_title("Per-fold CV log-loss")
    lo = min(vals + list((fold_logloss_raw or {}).values()) + ([reference] if reference else [])) if vals else 0
    ax.set_ylim(max(0.0, lo * 0.95), None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def cv_logloss_bars(fold_logloss: Mapping[Any, float], width: int = 20) -> str:
    """A short markdown table with text bars (renders inline in the UI, no click needed).

    Folds differ in the third decimal, so bars span the range between the best and the worst
    fold (the best gets one block) rather than starting at zero, where all would look equal.
    """
    folds = sorted(fold_logloss, key=lambda k: int(k) if str(k).isdigit() else str(k))
    vals = [fold_logloss[k] for k in folds if math.isfinite(fold_logloss[k])]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
    rows = ["| fold | cv log-loss | best ... worst |", "|---|---|---|"]
    for k in folds:
        v = fold_logloss[k]
        if not math.isfinite(v):
            rows.append(f"| {k} | {v} | |")
            continue
        n = 1 + (round((width - 1) * (v - lo) / (hi - lo)) if hi > lo else 0)
        rows.append(f"| {k} | {v:.4f} | {'█' * n} |")
    return "\n".join(rows)


def cv_logloss_metadata(
    fold_logloss: Mapping[Any, float],
    fold_logloss_raw: Mapping[Any, float] | None = None,
    reference: float | None = None,
) -> dict[str, Any]:
    """``cv_logloss_plot`` (PNG markdown) and ``cv_logloss_bars`` (inline text bars)."""

    def build() -> dict[str, Any]:
        ll = {str(k): float(v) for k, v in fold_logloss.items()}
        raw = {str(k): float(v) for k, v in fold_logloss_raw.items()} if fold_logloss_raw else None
        png = cv_logloss_png(ll, raw, reference)
        out: dict[str, Any] = {"cv_logloss_plot": MetadataValue.md(
            png_markdown(png, "per-fold CV log-loss", "Per-fold CV log-loss",
                         "Calibrated log-loss of each fold's out-of-fold predictions" +
                         (" beside the raw (uncalibrated) one." if raw else ".")))}
        bars = cv_logloss_bars(ll)
        if len(bars) < INLINE_MD_LIMIT:
            out["cv_logloss_bars"] = MetadataValue.md(bars)
        return out

    return _safe("cv_logloss_plot", build)
