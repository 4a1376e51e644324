"""The bundled known-answer sample: Kaggle-format data whose true probabilities are known.

Why: the demo must run with nothing but the repository, and quality work needs a yardstick. Every
row's winner is DRAWN from true probabilities that are a documented function of the text, so a
model's log-loss can be compared with the Bayes-optimal one (``bayes_logloss_test``) and with the
best constant prediction (``prior_logloss_test``): ``gap_closed = (prior - model) / (prior - bayes)``.

The truth (see :func:`true_probs`), designed for a TINY random-init model on CPU (measured in
``shared/recipes/tiny-demo-learnability.md``: a length term is nearly unlearnable, so there is none):

    q(response) = #GOOD marker words - #BAD marker words      (over all of the response's turns)
    d = BETA * (q(response_a) - q(response_b))
    [P(a wins), P(b wins), P(tie)] = softmax([d / 2, -d / 2, TIE_LOGIT])

It depends on the responses only through the markers, and is symmetric under swapping A and B
(swap A/B -> P(a) and P(b) swap, P(tie) stays), so test-time A/B swapping is a fair assumption.
With BETA = 1.2 and TIE_LOGIT = 0.3 the classes are about 35/35/30 % (like the real data) and the
prior - Bayes gap is about 0.24 nats.

Realism: words come from a fixed vocabulary of 320 filler pseudo-words (a few non-ASCII, one
emoji outside the BMP, which ``json.dumps`` writes as the escaped surrogate pair
``\\ud83d\\ude00`` like the real data), responses of 10-60 words, about 15 % multi-turn rows,
a few ``null`` turns, ids above 2^31, a pandas-style train.csv with model names.

A second, opt-in task (``make_sample(..., task="interactions")``, issue 17) keeps the truth exact
but adds what real preferences have and a tiny label-only model lacks the data to learn: marker
words that count only in the prompt's topic, and style markers whose sign flips with the prompt's
kind (see :func:`true_probs_interactions`). The default task (``"markers"``) is unchanged, byte for
byte: the demo and its tests use it.

``external.csv`` (steps 1 and 3) mixes UltraFeedback-style rows (``prompt``, ``chosen``,
``rejected`` as role/content messages; the label drawn from the truth conditioned on "no tie") and
Arena-conversation rows (``conversation_a``/``conversation_b``, ``winner``), with ids and texts
disjoint from train and test. ``truth.json["external"]`` gives each row's truth in the orientation
:func:`arena_assets.core.contract.read_external` returns it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arena_assets.core.artifacts import atomic_path, atomic_write_json
from arena_assets.core.contract import LABEL_COLS, chosen_goes_to_a

log = logging.getLogger(__name__)

GOOD_MARKERS = ["excellent", "precise", "helpful", "thorough"]
BAD_MARKERS = ["wrong", "vague", "rude", "sloppy"]
BETA = 1.2
TIE_LOGIT = 0.3
N_FILLER = 320
UNICODE_WORDS = ["café", "naïve", "über", "数据", "жизнь", "😀"]
MODEL_NAMES = ["alpha-7b", "bravo-13b", "charlie-70b", "delta-chat", "echo-instruct", "foxtrot-2"]
_MARKER_COUNT_P = [0.4, 0.3, 0.2, 0.1]
"""P(0, 1, 2, 3 markers) of each kind per response."""
_ID_LOW = 2**31 + 1
_ID_HIGH = 2**41


def vocabulary() -> list[str]:
    """The fixed filler vocabulary (independent of the sample seed, so all samples share it)."""
    rng = np.random.default_rng(12345)
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    codas = ["", "n", "r", "s", "l", "m"]
    markers = set(GOOD_MARKERS + BAD_MARKERS)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < N_FILLER - len(UNICODE_WORDS):
        w = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(int(rng.integers(1, 4)))
        )
        if w not in seen and w not in markers:
            seen.add(w)
            words.append(w)
    return words + UNICODE_WORDS


def quality(turns: list[str | None]) -> int:
    """#good markers - #bad markers over a response's turns (``None`` turns count as empty)."""
    q = 0
    for t in turns:
        for w in (t or "").split():
            if w in _GOOD:
                q += 1
            elif w in _BAD:
                q -= 1
    return q


_GOOD = frozenset(GOOD_MARKERS)
_BAD = frozenset(BAD_MARKERS)


def true_probs(response_a: list[str | None], response_b: list[str | None]) -> list[float]:
    """The documented truth: ``softmax([d/2, -d/2, TIE_LOGIT])``, ``d = BETA * (q(A) - q(B))``."""
    d = BETA * (quality(response_a) - quality(response_b))
    logits = np.array([d / 2.0, -d / 2.0, TIE_LOGIT])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [float(x) for x in p]


# ---- the "interactions" task (issue 17) -------------------------------------------------------
TASKS = ("markers", "interactions")
TOPICS: dict[str, tuple[str, str]] = {
    "code": ("compiles", "crashes"),
    "math": ("proven", "miscalculated"),
    "travel": ("scenic", "overbooked"),
    "cooking": ("delicious", "burnt"),
}
"""Topic word in the prompt -> (good, bad) marker that counts ONLY when the prompt has that topic."""
KIND_WORDS = ("briefly", "explain")
"""Prompt kind: ``briefly`` makes ``concise`` good and ``elaborate`` bad, ``explain`` the reverse,
neither word (a third of prompts) makes both neutral."""
STYLE_MARKERS = ("concise", "elaborate")
BETA_GLOBAL_X = 0.8
"""Weight of the 8 global markers in the interactions task (1.2 in the markers task)."""
BETA_TOPIC = 1.4
"""Weight of an on-topic marker; an off-topic one weighs 0 (a distractor)."""
BETA_STYLE = 1.0
_TOPIC_MARKER_COUNT_P = [0.3, 0.4, 0.3]
"""P(0, 1, 2 topic markers) per response; each on the prompt's topic with probability 1/2."""
_STYLE_COUNT_P = [0.55, 0.45]
"""P(0, 1) of each style marker per response."""
_KIND_P = [1 / 3, 1 / 3, 1 / 3]
"""P(briefly, explain, none)."""
INTERACTION_WORDS = frozenset([*TOPICS, *(w for pair in TOPICS.values() for w in pair), *KIND_WORDS, *STYLE_MARKERS])


def prompt_context(prompt: list[str | None]) -> tuple[str | None, int]:
    """(topic, kind sign) of a prompt: the first topic word over its turns (None: no topic) and
    +1 for ``briefly``, -1 for ``explain``, 0 for neither (the first kind word counts)."""
    topic, sign = None, 0
    seen_kind = False
    for t in prompt:
        for w in (t or "").split():
            if topic is None and w in TOPICS:
                topic = w
            if not seen_kind and w in KIND_WORDS:
                sign, seen_kind = (1 if w == KIND_WORDS[0] else -1), True
    return topic, sign


def interaction_score(prompt: list[str | None], response: list[str | None]) -> float:
    """A response's score given its prompt: ``BETA_GLOBAL_X * (#good - #bad)`` over the 8 global
    markers, ``+ BETA_TOPIC * (#good - #bad)`` over the prompt topic's own two markers only, ``+
    BETA_STYLE * kind * (#concise - #elaborate)``."""
    topic, sign = prompt_context(prompt)
    good_t, bad_t = TOPICS[topic] if topic is not None else (None, None)
    qt = qs = 0  # the global markers are quality()'s; these words are disjoint from them
    for t in response:
        for w in (t or "").split():
            if w == good_t:
                qt += 1
            elif w == bad_t:
                qt -= 1
            elif w == STYLE_MARKERS[0]:
                qs += 1
            elif w == STYLE_MARKERS[1]:
                qs -= 1
    return BETA_GLOBAL_X * quality(response) + BETA_TOPIC * qt + BETA_STYLE * sign * qs


def true_probs_interactions(prompt: list[str | None], response_a: list[str | None],
                            response_b: list[str | None]) -> list[float]:
    """The interactions task's truth: ``softmax([d/2, -d/2, TIE_LOGIT])`` with
    ``d = interaction_score(prompt, A) - interaction_score(prompt, B)``. Symmetric under swapping A
    and B (no position term: any position bias would belong to the labels' noise only)."""
    d = interaction_score(prompt, response_a) - interaction_score(prompt, response_b)
    logits = np.array([d / 2.0, -d / 2.0, TIE_LOGIT])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [float(x) for x in p]


def task_probs(task: str, prompt: list[str | None], response_a: list[str | None],
               response_b: list[str | None]) -> list[float]:
    """The truth of ``task`` for one row (``markers`` ignores the prompt)."""
    if task == "markers":
        return true_probs(response_a, response_b)
    if task == "interactions":
        return true_probs_interactions(prompt, response_a, response_b)
    raise ValueError(f"unknown task {task!r}; one of {TASKS}")


class _Gen:
    """Draws rows from one seeded generator (determinism: same seed -> same bytes)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.vocab = vocabulary()

    def words(self, n: int) -> list[str]:
        return [self.vocab[i] for i in self.rng.integers(0, len(self.vocab), n)]

    def prompt_turn(self) -> str:
        return " ".join(self.words(int(self.rng.integers(4, 21))))

    def response(self, n_turns: int) -> list[str]:
        """10-60 words over ``n_turns`` turns, with the markers at random positions."""
        n_good = int(self.rng.choice(4, p=_MARKER_COUNT_P))
        n_bad = int(self.rng.choice(4, p=_MARKER_COUNT_P))
        n_words = int(self.rng.integers(10, 61))
        words = self.words(max(n_words - n_good - n_bad, 1))
        for m in [*self.rng.choice(GOOD_MARKERS, n_good), *self.rng.choice(BAD_MARKERS, n_bad)]:
            words.insert(int(self.rng.integers(0, len(words) + 1)), str(m))
        cuts = sorted(self.rng.choice(np.arange(1, len(words)), n_turns - 1, replace=False)) if n_turns > 1 else []
        bounds = [0, *cuts, len(words)]
        return [" ".join(words[bounds[k] : bounds[k + 1]]) for k in range(n_turns)]

    def row(self) -> tuple[list[str | None], list[str | None], list[str | None]]:
        """(prompt, response_a, response_b) turns; ~15 % multi-turn, ~2 % with null turns."""
        n_turns = 1 if self.rng.random() >= 0.15 else int(self.rng.integers(2, 4))
        prompt: list[str | None] = [self.prompt_turn() for _ in range(n_turns)]
        a: list[str | None] = list(self.response(n_turns))
        b: list[str | None] = list(self.response(n_turns))
        u = self.rng.random()
        if u < 0.01:  # like the real `[null]` vs `[null]` rows
            a, b = [None] * n_turns, [None] * n_turns
        elif u < 0.02:
            side = a if self.rng.random() < 0.5 else b
            side[int(self.rng.integers(0, n_turns))] = None
        return prompt, a, b

    def outcome(self, p: list[float], no_tie: bool = False) -> int:
        if no_tie:
            return 0 if self.rng.random() < p[0] / (p[0] + p[1]) else 1
        return int(self.rng.choice(3, p=p))

    def model_pair(self) -> tuple[str, str]:
        i, j = self.rng.choice(len(MODEL_NAMES), 2, replace=False)
        return MODEL_NAMES[i], MODEL_NAMES[j]


class _InteractionGen(_Gen):
    """Rows of the interactions task: a topic word (always) and a kind word (two prompts in three)
    at random positions of the prompt's first turn; responses carry global, topic (any topic: the
    off-topic ones are distractors) and style markers."""

    def row(self) -> tuple[list[str | None], list[str | None], list[str | None]]:
        n_turns = 1 if self.rng.random() >= 0.15 else int(self.rng.integers(2, 4))
        prompt: list[str | None] = [self.prompt_turn() for _ in range(n_turns)]
        topic = str(self.rng.choice(list(TOPICS)))
        kind = int(self.rng.choice(3, p=_KIND_P))
        first = str(prompt[0]).split()
        extra = [topic] + ([KIND_WORDS[kind]] if kind < 2 else [])
        for w in extra:
            first.insert(int(self.rng.integers(0, len(first) + 1)), w)
        prompt[0] = " ".join(first)
        a: list[str | None] = list(self.response_x(n_turns, topic))
        b: list[str | None] = list(self.response_x(n_turns, topic))
        u = self.rng.random()
        if u < 0.01:
            a, b = [None] * n_turns, [None] * n_turns
        elif u < 0.02:
            side = a if self.rng.random() < 0.5 else b
            side[int(self.rng.integers(0, n_turns))] = None
        return prompt, a, b

    def response_x(self, n_turns: int, topic: str) -> list[str]:
        n_good = int(self.rng.choice(4, p=_MARKER_COUNT_P))
        n_bad = int(self.rng.choice(4, p=_MARKER_COUNT_P))
        markers = [*self.rng.choice(GOOD_MARKERS, n_good), *self.rng.choice(BAD_MARKERS, n_bad)]
        others = [t for t in TOPICS if t != topic]
        for _ in range(int(self.rng.choice(3, p=_TOPIC_MARKER_COUNT_P))):
            t = topic if self.rng.random() < 0.5 else str(self.rng.choice(others))
            markers.append(TOPICS[t][int(self.rng.integers(0, 2))])
        for w in STYLE_MARKERS:
            if self.rng.random() < _STYLE_COUNT_P[1]:
                markers.append(w)
        n_words = int(self.rng.integers(10, 61))
        words = self.words(max(n_words - len(markers), 1))
        for m in markers:
            words.insert(int(self.rng.integers(0, len(words) + 1)), str(m))
        cuts = sorted(self.rng.choice(np.arange(1, len(words)), n_turns - 1, replace=False)) if n_turns > 1 else []
        bounds = [0, *cuts, len(words)]
        return [" ".join(words[bounds[k] : bounds[k + 1]]) for k in range(n_turns)]


def _unique_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct ids in [2^31 + 1, 2^41), as decimal strings (never floats)."""
    out: dict[int, None] = {}
    while len(out) < n:
        for x in rng.integers(_ID_LOW, _ID_HIGH, n - len(out) + 16):
            out.setdefault(int(x), None)
    return [str(x) for x in list(out)[:n]]


def _messages(prompt: list[str | None], resp: list[str | None]) -> list[dict[str, str | None]]:
    out: list[dict[str, str | None]] = []
    for u, r in zip(prompt, resp):
        out.append({"role": "user", "content": u})
        out.append({"role": "assistant", "content": r})
    return out


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def make_sample(
    out_dir: str | os.PathLike[str],
    train_rows: int = 2000,
    test_rows: int = 500,
    external_rows: int = 4000,
    seed: int = 7,
    task: str = "markers",
) -> dict[str, Any]:
    """Write ``train.csv``, ``test.csv``, ``external.csv`` and ``truth.json`` into ``out_dir``.

    Returns a summary: the file paths, row counts, ``bayes_logloss_test`` and
    ``prior_logloss_test`` (both EXPECTED log-losses on the test rows, against their true
    probabilities: Bayes = mean entropy of the truth; prior = cross-entropy of the truth with the
    train label frequencies, i.e. what a constant model fitted on train scores).

    ``task``: ``"markers"`` (the default; the demo's sample, byte for byte as before) or
    ``"interactions"`` (issue 17: topic- and kind-dependent markers, :func:`true_probs_interactions`;
    its external rows are all Arena-conversation rows whose labels, ties included, are drawn from
    the same truth, so teachers trained on them learn the train rows' tie rate).
    """
    from arena_assets.core.metrics import entropy, expected_log_loss

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = _Gen(seed) if task == "markers" else _InteractionGen(seed)
    pairwise_external = task == "markers"
    n_all = train_rows + test_rows + external_rows
    ids = _unique_ids(g.rng, n_all)
    train_ids, test_ids, ext_ids = ids[:train_rows], ids[train_rows : train_rows + test_rows], ids[train_rows + test_rows :]

    truth: dict[str, Any] = {"train": {}, "test": {}, "external": {}}
    rows: list[dict[str, Any]] = []
    for rid in train_ids:
        p, a, b = g.row()
        probs = task_probs(task, p, a, b)
        k = g.outcome(probs)
        ma, mb = g.model_pair()
        truth["train"][rid] = probs
        rows.append(
            {"id": rid, "model_a": ma, "model_b": mb, "prompt": json.dumps(p), "response_a": json.dumps(a),
             "response_b": json.dumps(b), **{c: int(j == k) for j, c in enumerate(LABEL_COLS)}}
        )
    train_df = pd.DataFrame(rows)
    rows = []
    for rid in test_ids:
        p, a, b = g.row()
        truth["test"][rid] = task_probs(task, p, a, b)
        rows.append({"id": rid, "prompt": json.dumps(p), "response_a": json.dumps(a), "response_b": json.dumps(b)})
    test_df = pd.DataFrame(rows)

    rows = []
    for i, rid in enumerate(ext_ids):
        p, a, b = g.row()
        probs = task_probs(task, p, a, b)
        ma, mb = g.model_pair()
        base = {"id": rid, "prompt": "", "chosen": "", "rejected": "", "conversation_a": "",
                "conversation_b": "", "winner": "", "model_a": ma, "model_b": mb}
        if pairwise_external and i % 2 == 0:  # UltraFeedback-style pairwise row
            k = g.outcome(probs, no_tie=True)
            chosen, rejected = (a, b) if k == 0 else (b, a)
            base["chosen"] = json.dumps(_messages(p, chosen))
            base["rejected"] = json.dumps(_messages(p, rejected))
            if len(p) == 1 and g.rng.random() < 0.8:
                base["prompt"] = p[0]  # plain text, as UltraFeedback stores it
            # the normalized orientation (read_external): chosen in A or B by the id's hash
            na, nb = (chosen, rejected) if chosen_goes_to_a(rid) else (rejected, chosen)
            truth["external"][rid] = task_probs(task, p, na, nb)
        else:  # Arena-conversation row
            k = g.outcome(probs)
            base["conversation_a"] = json.dumps(_messages(p, a))
            base["conversation_b"] = json.dumps(_messages(p, b))
            if task == "markers":
                both_bad = quality(a) < 0 and quality(b) < 0
            else:
                both_bad = interaction_score(p, a) < 0 and interaction_score(p, b) < 0
            base["winner"] = ["model_a", "model_b", "tie (bothbad)" if both_bad else "tie"][k]
            truth["external"][rid] = probs
        rows.append(base)
    ext_df = pd.DataFrame(rows)

    test_truth = np.array(list(truth["test"].values()))
    prior = train_df[LABEL_COLS].to_numpy(dtype=np.float64).mean(axis=0) if train_rows else np.full(3, 1 / 3)
    bayes = entropy(test_truth) if test_rows else float("nan")
    prior_ll = expected_log_loss(test_truth, np.tile(prior, (len(test_truth), 1))) if test_rows else float("nan")
    truth.update(
        {
            "bayes_logloss_test": bayes,
            "prior_logloss_test": prior_ll,
            "train_prior": [float(x) for x in prior],
            "seed": seed,
            **({} if task == "markers" else {"task": task}),
            "rows": {"train": train_rows, "test": test_rows, "external": external_rows},
            "description": _INTERACTIONS_DESCRIPTION if task == "interactions" else (
                "P = softmax([d/2, -d/2, %g]), d = %g * (q(response_a) - q(response_b)), "
                "q = #%s - #%s words over all turns of a response. Log-losses are expected values "
                "on the test rows against these probabilities: bayes = mean entropy; prior = "
                "cross-entropy with the train label frequencies. External pairwise rows: label drawn "
                "conditioned on no tie; truth given in read_external's orientation."
                % (TIE_LOGIT, BETA, "/".join(GOOD_MARKERS), "/".join(BAD_MARKERS))
            ),
        }
    )
    _write_csv(train_df, out / "train.csv")
    _write_csv(test_df, out / "test.csv")
    _write_csv(ext_df, out / "external.csv")
    atomic_write_json(out / "truth.json", truth)
    log.info("sample in %s: bayes %.4f, prior %.4f", out, bayes, prior_ll)
    return {
        "train": str(out / "train.csv"),
        "test": str(out / "test.csv"),
        "external": str(out / "external.csv"),
        "truth": str(out / "truth.json"),
        "rows": truth["rows"],
        "task": task,
        "bayes_logloss_test": bayes,
        "prior_logloss_test": prior_ll,
    }


_TOPIC_TEXT = ", ".join(f"{t}: {g}/{b}" for t, (g, b) in TOPICS.items())
_INTERACTIONS_DESCRIPTION = (
    f"task interactions: P = softmax([d/2, -d/2, {TIE_LOGIT:g}]), d = s(prompt, response_a) - s(prompt, response_b), "
    f"s = {BETA_GLOBAL_X:g} * (#{'/'.join(GOOD_MARKERS)} - #{'/'.join(BAD_MARKERS)}) + {BETA_TOPIC:g} * (#good - #bad "
    f"topic marker of the PROMPT's topic only; topics {_TOPIC_TEXT}) + {BETA_STYLE:g} * kind * "
    f"(#{STYLE_MARKERS[0]} - #{STYLE_MARKERS[1]}), kind = +1 with '{KIND_WORDS[0]}' in the prompt, -1 with "
    f"'{KIND_WORDS[1]}', 0 otherwise. Log-losses are expected values on the test rows against these "
    "probabilities. External rows: Arena-conversation rows, labels (ties included) drawn from the same truth."
)
