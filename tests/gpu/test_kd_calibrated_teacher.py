"""``student.kd.calibrate_teacher`` (issue 17, docs/fidelity.md V3): the KD student distils each
teacher fold's OOF divided by the temperature fitted on that fold's labels; off, the raw OOF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from arena_assets.core.contract import read_table
from arena_assets.core.settings import KDSettings
from arena_assets.gpu import train as train_mod
from arena_assets.gpu.calibrate import fit_temperature
from arena_assets.gpu.formatting import labels_of
from arena_assets.gpu.predict import softmax
from tests.gpu.conftest import FMT, STUDENT


def test_calibrated_teacher_logits_recover_each_folds_temperature() -> None:
    """Known answer: a calibrated teacher's logits shrunk by 0.5 on fold 0 and by 0.8 on fold 1
    (underconfident) are scaled back by T close to 0.5 and 0.8, each fold its own."""
    rng = np.random.default_rng(0)
    n = 6000
    z = rng.normal(scale=1.5, size=(n, 3))
    y = np.array([rng.multinomial(1, p) for p in softmax(z)], dtype=np.float64)
    folds = np.repeat([0, 1], n // 2)
    shrink = np.where(folds == 0, 0.5, 0.8)[:, None]
    teacher = (shrink * z)[:, None, :].astype(np.float32)  # (n, 1 family, 3)
    out, temps = train_mod.calibrated_teacher_logits(teacher, folds, y)
    assert out.shape == teacher.shape and set(temps[0]) == {"0", "1"}
    assert temps[0]["0"] == pytest.approx(0.5, rel=0.1) and temps[0]["1"] == pytest.approx(0.8, rel=0.1)
    for f, t in ((0, temps[0]["0"]), (1, temps[0]["1"])):
        m = folds == f
        np.testing.assert_allclose(out[m, 0], teacher[m, 0] / t, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(teacher[:, 0], (shrink * z).astype(np.float32))  # input left alone


def _soft_oof(data: dict[str, Any], path: Path) -> Path:
    """An underconfident teacher OOF over every train id (fold k = the rows of valid k)."""
    rng = np.random.default_rng(1)
    parts = []
    for k in (0, 1):
        v = read_table(data[f"valid{k}"])
        z = 0.6 * labels_of(v) + rng.normal(scale=0.3, size=(len(v), 3))  # soft: right but unsure
        p = softmax(z)
        parts.append(pd.DataFrame({"id": v["id"].astype(str), "p_a": p[:, 0], "p_b": p[:, 1], "p_tie": p[:, 2],
                                   "logit_a": z[:, 0], "logit_b": z[:, 1], "logit_tie": z[:, 2],
                                   "fold": k, "family": "llama"}))
    pd.concat(parts, ignore_index=True).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("calibrate", [False, True])
def test_student_sees_calibrated_teacher_only_when_asked(data: dict[str, Any], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, calibrate: bool) -> None:
    seen: dict[str, Any] = {}

    def fake_fit(step: str, base_dir: Any, cfg: Any, lora: Any, fmt: Any, rows: Any, valid: Any, kd: Any,
                 teacher: Any, out_dir: Any, checkpoint_dir: Any, extra: Any) -> None:
        seen.update(rows=rows, teacher=teacher, extra=extra, kd=kd)

    monkeypatch.setattr(train_mod, "_fit_classifier", fake_fit)
    oof = _soft_oof(data, tmp_path / "oof.parquet")
    cfg = STUDENT.model_copy(update={"kd": KDSettings(alpha=0.8, temperature=1.0, calibrate_teacher=calibrate)})
    train_mod.train_student(tmp_path / "base", cfg, FMT, data["train0"], data["valid0"], oof, out_dir=tmp_path / "s")
    raw, _, folds = train_mod.teacher_logits_for(pd.read_parquet(oof), seen["rows"]["id"].tolist())
    assert set(folds.tolist()) == {1}  # student 0 trains on fold 1's rows only: teacher 1's OOF
    if not calibrate:
        np.testing.assert_array_equal(seen["teacher"], raw)
        assert "teacher_temperatures" not in seen["extra"]
        return
    t, before, after = fit_temperature(raw[:, 0].astype(np.float64), labels_of(seen["rows"]))
    assert t < 0.9 and after < before  # the synthetic teacher is underconfident: T sharpens it
    assert seen["extra"]["teacher_temperatures"] == {"llama": {"1": pytest.approx(t)}}
    np.testing.assert_allclose(seen["teacher"], raw / t, rtol=1e-5, atol=1e-5)
    # what the KD loss sees (softmax of the logits at kd T=1) is sharper than the raw OOF
    ent = lambda q: float(-(q * np.log(q)).sum(-1).mean())
    assert ent(softmax(seen["teacher"][:, 0])) < ent(softmax(raw[:, 0]))
