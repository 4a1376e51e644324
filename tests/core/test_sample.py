"""The known-answer sample: determinism, the documented truth, symmetry, learnable signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arena_assets.core.contract import LABEL_COLS, TEXT_COLS, read_external, read_test, read_train
from arena_assets.core.metrics import entropy, expected_log_loss, log_loss, prior_log_loss
from arena_assets.core.sample import BAD_MARKERS, GOOD_MARKERS, make_sample, quality, true_probs, vocabulary


def _truth(d: Path) -> dict:
    return json.loads((d / "truth.json").read_text())


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 3), (b, 3), (c, 4)):
        make_sample(d, train_rows=60, test_rows=20, external_rows=40, seed=seed)
    for name in ("train.csv", "test.csv", "external.csv", "truth.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() != (c / name).read_bytes(), name


def test_truth_is_the_documented_function_of_the_text(sample_dir: Path) -> None:
    truth = _truth(sample_dir)
    tr = read_train(sample_dir / "train.csv")
    te = read_test(sample_dir / "test.csv")
    for df, key in ((tr, "train"), (te, "test")):
        assert set(df["id"]) == set(truth[key])
        for rid, a, b in zip(df["id"], df["response_a"], df["response_b"]):
            assert true_probs(a, b) == pytest.approx(truth[key][rid], abs=1e-12)
    ext = read_external(sample_dir / "external.csv")
    # external truth is given in read_external's orientation (chosen placed by the id's hash)
    for rid, a, b in zip(ext["id"], ext["response_a"], ext["response_b"]):
        assert true_probs(a, b) == pytest.approx(truth["external"][rid], abs=1e-12)


def test_truth_is_symmetric_and_ignores_length() -> None:
    a = ["foo excellent bar precise"]
    b = ["baz wrong qux"]
    pa, pb, pt = true_probs(a, b)
    assert true_probs(b, a) == pytest.approx([pb, pa, pt])
    assert pa > pb  # quality(a)=2 beats quality(b)=-1
    assert true_probs(a, b) == pytest.approx(true_probs([a[0] + " filler" * 40], b))  # no length term
    assert true_probs(["same"], ["same"])[0] == pytest.approx(true_probs(["same"], ["same"])[1])
    assert quality([None, "excellent rude rude"]) == -1


def test_bayes_gap_is_learnable_signal(sample_dir: Path) -> None:
    truth = _truth(sample_dir)
    tr = read_train(sample_dir / "train.csv")
    test_truth = np.array(list(truth["test"].values()))
    bayes = entropy(test_truth)
    prior = prior_log_loss(tr[LABEL_COLS].to_numpy(), test_truth)
    assert truth["bayes_logloss_test"] == pytest.approx(bayes)
    assert truth["prior_logloss_test"] == pytest.approx(prior)
    assert prior - bayes >= 0.15
    assert expected_log_loss(test_truth, test_truth) == pytest.approx(bayes)


def test_labels_are_drawn_from_the_truth(tmp_path: Path) -> None:
    make_sample(tmp_path, train_rows=3000, test_rows=10, external_rows=0, seed=11)
    truth = _truth(tmp_path)
    tr = read_train(tmp_path / "train.csv")
    y = tr[LABEL_COLS].to_numpy()
    p = np.array([truth["train"][i] for i in tr["id"]])
    assert np.abs(y.mean(axis=0) - p.mean(axis=0)).max() < 0.03  # ~3.5 sigma at 3000 rows
    # the truth scores the drawn labels far better than the constant prior does
    assert prior_log_loss(y, y) - log_loss(y, p) > 0.15
    # calibration: among rows the truth calls for A (pa > 0.6), A wins about as often as predicted
    sel = p[:, 0] > 0.6
    assert abs(y[sel, 0].mean() - p[sel, 0].mean()) < 0.05


def test_realism(sample_dir: Path) -> None:
    raw_train = (sample_dir / "train.csv").read_text()
    raw_test = (sample_dir / "test.csv").read_text()
    assert "\\ud83d\\ude00" in raw_train + raw_test  # the emoji as an escaped surrogate pair
    assert "[null]" in raw_train + raw_test or "null," in raw_train
    tr = read_train(sample_dir / "train.csv")
    te = read_test(sample_dir / "test.csv")
    ext = read_external(sample_dir / "external.csv")
    ids = [*tr["id"], *te["id"], *ext["id"]]
    assert len(set(ids)) == len(ids)
    assert min(int(i) for i in ids) > 2**31
    assert (tr["prompt"].map(len) > 1).any()
    assert any("\U0001F600" in t for turns in tr["response_a"] for t in turns)
    words = [len(" ".join(r).split()) for r in tr["response_a"] if any(r)]
    assert min(words) >= 10 and max(words) <= 60
    vocab = set(vocabulary()) | set(GOOD_MARKERS) | set(BAD_MARKERS)
    assert {w for turns in tr["response_b"] for t in turns for w in t.split()} <= vocab
    assert len(vocabulary()) >= 300
    # external shares no row (id or text) with train or test
    key = lambda df: {json.dumps([df.loc[i, c] for c in TEXT_COLS]) for i in df.index}  # noqa: E731
    assert not key(ext) & (key(tr) | key(te))
