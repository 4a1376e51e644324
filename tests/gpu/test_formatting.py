"""Formatting: truncation rule, span identity, A/B swap, saved format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from arena_assets.core.settings import ModelSpec
from arena_assets.gpu.formatting import (
    PLAIN_FORMAT,
    TINY_FORMAT,
    encode_rows,
    format_for_spec,
    load_format,
    save_format,
    span_text,
    swap_ab,
    swap_probs,
    truncate_lengths,
    turns,
)
from arena_assets.gpu.models import train_word_tokenizer


@pytest.mark.parametrize(
    "lens,budget,pmax,want",
    [
        ((10, 20, 30), 100, 64, (10, 20, 30)),  # everything fits
        ((100, 10, 30), 100, 64, (64, 10, 26)),  # prompt capped; the longer (B) trimmed first
        ((100, 20, 30), 100, 64, (64, 18, 18)),  # B trimmed to A's length, then both equally
        ((5, 80, 10), 50, 64, (5, 35, 10)),  # only the longer response is cut
        ((5, 80, 90), 50, 64, (5, 22, 22)),  # both cut equally (never more for A than B)
    ],
)
def test_truncate_lengths(lens: tuple[int, int, int], budget: int, pmax: int, want: tuple[int, int, int]) -> None:
    got = truncate_lengths(*lens, budget=budget, prompt_max=pmax)
    assert got == want
    assert sum(got) <= budget
    lp, la, lb = lens
    assert truncate_lengths(lp, lb, la, budget, pmax) == (got[0], got[2], got[1])  # swap-symmetric


def test_turns_parsing() -> None:
    assert turns('["a", null, "b"]') == ["a", "", "b"]
    assert turns(["x", None]) == ["x", ""]
    assert turns(None) == [""]
    assert turns("plain text") == ["plain text"]


def test_span_tags_give_a_and_b_different_ids() -> None:
    df = pd.DataFrame({"prompt": [["q"]], "response_a": [["good answer"]], "response_b": [["good answer"]]})
    tf = TINY_FORMAT
    tok = train_word_tokenizer([span_text("good answer q", s, tf) for s in "pab"], vocab_size=100)
    (ids,) = encode_rows(df, tok, tf, max_length=64, prompt_max_tokens=8)
    vocab = tok.get_vocab()
    assert vocab["a|good"] in ids and vocab["b|good"] in ids and vocab["a|good"] != vocab["b|good"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert format_for_spec(ModelSpec()).span_tags is True
    assert format_for_spec(ModelSpec(path="/some/ckpt")) == PLAIN_FORMAT


def test_max_length_is_respected_and_swap_exchanges_spans() -> None:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    rows = {c: [[" ".join(rng.choice(words, n))] for n in rng.integers(5, 200, 20)] for c in ("prompt", "response_a", "response_b")}
    df = pd.DataFrame(rows)
    tf = TINY_FORMAT
    tok = train_word_tokenizer((span_text(" ".join(words), s, tf) for s in "pab"), vocab_size=500)
    ids = encode_rows(df, tok, tf, max_length=100, prompt_max_tokens=20)
    assert max(len(x) for x in ids) <= 100
    swapped = encode_rows(swap_ab(df), tok, tf, max_length=100, prompt_max_tokens=20)
    direct = encode_rows(df, tok, tf, max_length=100, prompt_max_tokens=20, swap=True)
    assert swapped == direct
    assert swapped != ids


def test_swap_ab_swaps_labels_and_probs() -> None:
    df = pd.DataFrame({"response_a": ["x"], "response_b": ["y"], "winner_model_a": [1.0], "winner_model_b": [0.0], "winner_tie": [0.0]})
    s = swap_ab(df)
    assert (s["response_a"][0], s["response_b"][0], s["winner_model_b"][0]) == ("y", "x", 1.0)
    np.testing.assert_array_equal(swap_probs(np.array([[0.1, 0.6, 0.3]])), [[0.6, 0.1, 0.3]])


def test_format_round_trip(tmp_path) -> None:
    save_format(TINY_FORMAT, tmp_path)
    assert load_format(tmp_path) == TINY_FORMAT
    assert load_format(tmp_path / "nothing") == PLAIN_FORMAT
