"""Issue 17's harder known-answer task (``make_sample(task="interactions")``) and the seed
comparison's scoring (``core.quality.heldout_students`` / ``seed_summary``).

The task must keep an exact truth (Bayes exact), need the prompt (an interaction a prompt-blind
model cannot learn), keep prior - Bayes >= 0.15 nats, and leave the demo's default sample byte for
byte as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from arena_assets.core import quality
from arena_assets.core.contract import LABEL_COLS, read_external, read_test, read_train
from arena_assets.core.metrics import entropy, expected_log_loss
from arena_assets.core.sample import (
    BAD_MARKERS,
    GOOD_MARKERS,
    INTERACTION_WORDS,
    STYLE_MARKERS,
    TOPICS,
    interaction_score,
    make_sample,
    true_probs_interactions,
    vocabulary,
)

DEFAULT_MD5 = {
    # make_sample(d, train_rows=300, test_rows=100, external_rows=200, seed=7), recorded before the
    # interactions task was added: the demo's default generator must not change by a byte.
    "external.csv": "4f9a2a619014b4a82a29fbdedea58558",
    "test.csv": "eeff4bd600a0df925b5197f5c28c1bf2",
    "train.csv": "589a5e10bff00da0290a549f8c4a19d6",
    "truth.json": "c578628c43fcb62d6598453b6bd20e1a",
}


def test_default_markers_sample_is_byte_identical(tmp_path: Path) -> None:
    make_sample(tmp_path, train_rows=300, test_rows=100, external_rows=200, seed=7)
    got = {n: hashlib.md5((tmp_path / n).read_bytes()).hexdigest() for n in DEFAULT_MD5}
    assert got == DEFAULT_MD5
    assert "task" not in json.loads((tmp_path / "truth.json").read_text())


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_sample(tmp_path, train_rows=5, test_rows=5, external_rows=0, task="nope")


def test_interaction_words_are_not_filler() -> None:
    assert not set(vocabulary()) & INTERACTION_WORDS
    assert not set(GOOD_MARKERS + BAD_MARKERS) & INTERACTION_WORDS


def test_topic_markers_count_only_in_their_topic() -> None:
    good_code, bad_code = TOPICS["code"]
    good_math, _ = TOPICS["math"]
    a, b = [f"foo {good_code} bar"], ["baz qux"]
    code_prompt, math_prompt = ["please code this"], ["some math here"]
    pa_code = true_probs_interactions(code_prompt, a, b)
    pa_math = true_probs_interactions(math_prompt, a, b)
    assert pa_code[0] > pa_code[1] + 0.3  # on topic: A's marker counts
    assert pa_math[0] == pytest.approx(pa_math[1])  # off topic: a distractor, no effect
    # the same response pair, only the prompt differs: the truth changes
    assert pa_code != pytest.approx(pa_math)
    assert interaction_score(math_prompt, [good_math]) > 0 > interaction_score(math_prompt, [TOPICS["math"][1]])
    assert interaction_score(code_prompt, [bad_code]) < 0
    assert interaction_score(["no topic"], [good_code, good_math]) == 0


def test_style_markers_flip_with_the_prompt_kind() -> None:
    concise, elaborate = STYLE_MARKERS
    brief = interaction_score(["code briefly"], [concise])
    expl = interaction_score(["code explain"], [concise])
    assert brief > 0 and expl == pytest.approx(-brief)
    assert interaction_score(["code"], [concise, elaborate, concise]) == 0  # no kind word: neutral
    assert interaction_score(["code briefly"], [elaborate]) < 0


def test_interactions_truth_is_symmetric_and_global_markers_still_count() -> None:
    p = ["travel explain"]
    a, b = ["x excellent scenic concise"], ["y wrong elaborate"]
    pa, pb, pt = true_probs_interactions(p, a, b)
    assert true_probs_interactions(p, b, a) == pytest.approx([pb, pa, pt])
    assert true_probs_interactions(p, ["excellent"], ["z"])[0] > true_probs_interactions(p, ["z"], ["z"])[0]


@pytest.fixture(scope="module")
def hard_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hard")
    make_sample(d, train_rows=1500, test_rows=1500, external_rows=300, seed=11, task="interactions")
    return d


def test_interactions_sample_truth_is_the_documented_function(hard_sample: Path) -> None:
    truth = json.loads((hard_sample / "truth.json").read_text())
    assert truth["task"] == "interactions"
    tr, te = read_train(hard_sample / "train.csv"), read_test(hard_sample / "test.csv")
    for df, key in ((tr, "train"), (te, "test")):
        for rid, p, a, b in zip(df["id"], df["prompt"], df["response_a"], df["response_b"]):
            assert true_probs_interactions(p, a, b) == pytest.approx(truth[key][rid], abs=1e-12)
    ext = read_external(hard_sample / "external.csv")
    for rid, p, a, b in zip(ext["id"], ext["prompt"], ext["response_a"], ext["response_b"]):
        assert true_probs_interactions(p, a, b) == pytest.approx(truth["external"][rid], abs=1e-12)
    # external rows come from the same truth, ties included (no UltraFeedback-style no-tie rows)
    y = ext[LABEL_COLS].to_numpy(dtype=float)
    assert y[:, 2].mean() > 0.15
    # every prompt has a topic
    assert all(any(w in TOPICS for t in p for w in (t or "").split()) for p in te["prompt"])


def test_interactions_gap_is_large_and_needs_the_prompt(hard_sample: Path) -> None:
    """prior - Bayes >= 0.15 nats on the test rows, and the best prompt-blind model (any weight
    per marker word, fitted on the test rows' truth itself) closes at most 0.75 of that gap: the
    interaction holds a real part of the signal."""
    from scipy.optimize import minimize

    truth = json.loads((hard_sample / "truth.json").read_text())
    te = read_test(hard_sample / "test.csv")
    t = np.array([truth["test"][i] for i in te["id"]])
    bayes, prior = entropy(t), truth["prior_logloss_test"]
    assert truth["bayes_logloss_test"] == pytest.approx(bayes)
    assert prior - bayes >= 0.15
    words = sorted(set(GOOD_MARKERS + BAD_MARKERS) | {w for pair in TOPICS.values() for w in pair} | set(STYLE_MARKERS))

    def counts(turns: list) -> np.ndarray:
        c = np.zeros(len(words))
        for x in turns:
            for w in (x or "").split():
                if w in words:
                    c[words.index(w)] += 1
        return c

    x = np.array([counts(a) - counts(b) for a, b in zip(te["response_a"], te["response_b"])])

    def loss(w: np.ndarray) -> float:
        d = x @ w[:-1]
        z = np.stack([d / 2, -d / 2, np.full(len(d), w[-1])], axis=1)
        return expected_log_loss(t, quality.softmax(z))

    blind = minimize(loss, np.zeros(len(words) + 1), method="L-BFGS-B").fun
    assert (prior - blind) / (prior - bayes) < 0.75
    assert blind > bayes + 0.03


# ------------------------------------------------------------------------------ seed scoring
def test_seed_summary_mean_sd_and_targets() -> None:
    def run(kd_raw: float, ce_raw: float, kd_cal: float, ce_cal: float) -> dict:
        return {"kd": {"raw": kd_raw, "calibrated": kd_cal}, "ce_only": {"raw": ce_raw, "calibrated": ce_cal}}

    per = [run(0.90, 0.92, 0.89, 0.91), run(0.91, 0.92, 0.90, 0.905), run(0.905, 0.925, 0.895, 0.91)]
    sm = quality.seed_summary(per, teacher_heldout=0.895)
    d = np.array([-0.02, -0.01, -0.02])
    assert sm["raw"]["kd_minus_ce"] == pytest.approx(d.tolist())
    assert sm["raw"]["kd_minus_ce_sd"] == pytest.approx(d.std(ddof=1))
    assert sm["raw"]["kd_minus_ce_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert sm["raw"]["kd_wins_every_seed"] and sm["calibrated"]["kd_wins_every_seed"]
    tg = {t["name"]: t for t in sm["targets"]}
    assert all(t["met"] for t in tg.values()), tg
    # one seed where CE-only wins calibrated: that target fails, by how much is said
    per.append(run(0.90, 0.92, 0.92, 0.91))
    sm = quality.seed_summary(per, teacher_heldout=0.895)
    worst = next(t for t in sm["targets"] if t["name"].startswith("KD - CE-only, worst seed") and "calibrated" in t["name"])
    assert worst["met"] is False and worst["missed_by"] == pytest.approx(0.01)
    assert not sm["calibrated"]["kd_wins_every_seed"]
    # a teacher worse than the CE-only student fails its target
    sm = quality.seed_summary(per, teacher_heldout=0.95)
    assert next(t for t in sm["targets"] if t["name"].startswith("teachers")).get("met") is False


def test_heldout_students_scores_valid_predictions_against_truth(tmp_path: Path) -> None:
    from tests.core.test_quality import World

    w = World(tmp_path / "root", ce_noise=1.0, kd_noise=0.3)
    s = w.settings()
    out = quality.heldout_students(s, w.truth)
    rep = quality.build_report(s, w.truth, w.extra)
    # raw = the report's pooled held-out numbers (the same valid_predictions, same truth)
    assert out["kd"]["raw"] == pytest.approx(rep["kd"]["held_out"]["pooled"])
    assert out["ce_only"]["raw"] == pytest.approx(rep["ce_only"]["held_out"]["pooled"])
    # the KD student's logits are halved (underconfident): its fitted temperature sharpens it
    # and calibration helps; the less noisy KD student beats the CE-only one either way
    assert all(t < 1 for t in out["kd"]["temperature"].values())
    assert out["kd"]["calibrated"] < out["kd"]["raw"]
    assert out["kd"]["calibrated"] < out["ce_only"]["calibrated"]
    summ = quality.summary_fields(rep)
    assert summ["kd_heldout"] == pytest.approx(out["kd"]["raw"])
    assert summ["teacher_heldout"] == pytest.approx(rep["teacher"]["llama"]["pooled"])
