"""How one arena row (prompt, response A, response B) becomes a model input.

Three decisions live here, each documented where it is made:

* **Span identity.** A cross-encoder must know which tokens belong to A and which to B. Real
  checkpoints learn that from plain text headers (``<prompt>: ... <response_a>: ...``). A tiny
  random-init model with RoPE and no segment embeddings does not discover it in a CPU budget
  (measured: /work/shared/recipes/tiny-demo-learnability.md, the plain format learns nothing), so
  for tiny models every word is prefixed with its span tag (``p|``, ``a|``, ``b|``) and the
  word-level tokenizer is trained on that formatted text: "good" in A and "good" in B get
  different ids. The choice is a :class:`TextFormat` saved next to the tokenizer
  (``arena_format.json``) so inference formats exactly as training did.
* **Truncation** (1st place): the prompt is capped at ``prompt_max_tokens``; the remaining budget
  goes to the responses, trimming the LONGER response first and never giving A more than B when
  both must be cut (so the format stays symmetric under an A/B swap, which TTA relies on).
* **Multi-turn**: each span concatenates its turns (separated by ``turn_sep``); null turns are empty.

Nothing here imports torch; the tokenizer is any HF tokenizer (``tokenizer(list_of_str)``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_FILE = "arena_format.json"
LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
"""Class order of every logit/probability vector: A wins, B wins, tie."""

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)

TINY_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[P]", "[A]", "[B]"]


@dataclass(frozen=True)
class TextFormat:
    """A model's input format; saved with its tokenizer so inference matches training."""

    span_tags: bool = False
    """Prefix each (lower-cased) word with its span tag: for word-level tiny tokenizers."""
    headers: tuple[str, str, str] = ("<prompt>: ", "\n\n<response_a>: ", "\n\n<response_b>: ")
    turn_sep: str = "\n"
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["headers"] = list(self.headers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TextFormat:
        return cls(
            span_tags=bool(d.get("span_tags", False)),
            headers=tuple(d.get("headers", cls.headers)),  # type: ignore[arg-type]
            turn_sep=d.get("turn_sep", "\n"),
            version=int(d.get("version", 1)),
        )


TINY_FORMAT = TextFormat(span_tags=True, headers=("[P]", "[A]", "[B]"), turn_sep=" ")
PLAIN_FORMAT = TextFormat()


def format_for_spec(spec: Any) -> TextFormat:
    """The format a model spec asks for: span tags default to on for tiny models only."""
    span = spec.span_tags if spec.span_tags is not None else spec.is_tiny
    if spec.is_tiny and not span:
        # A word-level tokenizer still needs its headers as whole words.
        return TextFormat(span_tags=False, headers=TINY_FORMAT.headers, turn_sep=" ")
    return TINY_FORMAT if span else PLAIN_FORMAT


def save_format(tf: TextFormat, directory: str | Path) -> Path:
    p = Path(directory) / FORMAT_FILE
    p.write_text(json.dumps(tf.to_json(), indent=2) + "\n")
    return p


def load_format(directory: str | Path) -> TextFormat:
    """The format saved next to a tokenizer; a directory without one uses plain headers."""
    p = Path(directory) / FORMAT_FILE
    if not p.exists():
        log.info("no %s in %s: plain text headers", FORMAT_FILE, directory)
        return PLAIN_FORMAT
    return TextFormat.from_json(json.loads(p.read_text()))


# ------------------------------------------------------------------------------------ cells
def turns(cell: Any) -> list[str]:
    """A text cell as a list of turns: list/array cells as-is, JSON-list strings parsed, nulls ''."""
    if cell is None:
        return [""]
    if isinstance(cell, float) and np.isnan(cell):
        return [""]
    if isinstance(cell, str):
        s = cell.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                return [cell]
            return [t if isinstance(t, str) else "" for t in parsed] or [""]
        return [cell]
    return [t if isinstance(t, str) else "" for t in list(cell)] or [""]


def span_text(cell: Any, span: str, tf: TextFormat) -> str:
    """One span's text (``span`` in p/a/b): its turns joined, words tagged when ``tf.span_tags``."""
    text = tf.turn_sep.join(turns(cell))
    if not tf.span_tags:
        return text
    return " ".join(f"{span}|{w}" for w in _WORD.findall(text.lower()))


def corpus_texts(tables: Iterable[Any], tf: TextFormat) -> Iterable[str]:
    """Formatted span texts of every row of the given DataFrames (to train a tiny tokenizer)."""
    for df in tables:
        for col, span in (("prompt", "p"), ("response_a", "a"), ("response_b", "b")):
            for cell in df[col].tolist():
                yield span_text(cell, span, tf)
        # Train the tokenizer on both A/B orientations: TTA will feed every response as A and B.
        for col, span in (("response_b", "a"), ("response_a", "b")):
            for cell in df[col].tolist():
                yield span_text(cell, span, tf)


# ------------------------------------------------------------------------------- truncation
def truncate_lengths(lp: int, la: int, lb: int, budget: int, prompt_max: int) -> tuple[int, int, int]:
    """Token counts kept for prompt, A, B (the 1st place's rule, made symmetric).

    The prompt keeps at most ``prompt_max`` tokens (and at most the budget). The responses share
    what is left: if both fit they are kept; else the longer is trimmed first, down to the
    shorter's length; if both are still too long each keeps ``rest // 2`` (equal, so swapping A
    and B swaps the kept lengths exactly).
    """
    p = min(lp, prompt_max, budget)
    rest = max(budget - p, 0)
    if la + lb <= rest:
        return p, la, lb
    half = rest // 2
    if min(la, lb) <= half:
        return (p, la, rest - la) if la <= lb else (p, rest - lb, lb)
    return p, half, half


def encode_rows(
    df: Any,
    tokenizer: Any,
    tf: TextFormat,
    max_length: int,
    prompt_max_tokens: int,
    swap: bool = False,
) -> list[list[int]]:
    """Token ids for every row of ``df`` (``swap``: A and B exchanged), at most ``max_length``.

    Each span is tokenized separately and trimmed with :func:`truncate_lengths`, then assembled as
    ``[bos] header_p prompt header_a A header_b B [eos]``; the classifier pools the last token.
    """
    col_a, col_b = ("response_b", "response_a") if swap else ("response_a", "response_b")

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    p_ids = ids([span_text(c, "p", tf) for c in df["prompt"].tolist()])
    a_ids = ids([span_text(c, "a", tf) for c in df[col_a].tolist()])
    b_ids = ids([span_text(c, "b", tf) for c in df[col_b].tolist()])
    h_p, h_a, h_b = ids(list(tf.headers))
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    budget = max_length - len(head) - len(tail) - len(h_p) - len(h_a) - len(h_b)
    if budget < 3:
        raise ValueError(f"max_length={max_length} leaves no room for text after the headers")
    out = []
    for p, a, b in zip(p_ids, a_ids, b_ids):
        kp, ka, kb = truncate_lengths(len(p), len(a), len(b), budget, prompt_max_tokens)
        out.append(head + h_p + p[:kp] + h_a + a[:ka] + h_b + b[:kb] + tail)
    return out


# ------------------------------------------------------------------------------ A/B swap
def swap_ab(df: Any) -> Any:
    """The same table with A and B exchanged (responses, model names, winner labels)."""
    out = df.copy()
    for a, b in (("response_a", "response_b"), ("model_a", "model_b"), ("winner_model_a", "winner_model_b")):
        if a in df.columns and b in df.columns:
            out[a], out[b] = df[b].values, df[a].values
    return out


def swap_probs(x: np.ndarray) -> np.ndarray:
    """Exchange the A and B columns of (n, 3) probabilities or logits (tie stays)."""
    x = np.asarray(x)
    return x[..., [1, 0, 2]]


def encoded_chunks(
    df: Any, tokenizer: Any, max_length: int, prompt_max_tokens: int, tta: bool, chunk_rows: int | None = None,
    first_rows: int = 16,
) -> Iterator[tuple[np.ndarray, list[list[int]]]]:
    """The rows' token ids as ``(index, ids)`` chunks: index ``i < n`` is row ``i`` as given, ``n + i``
    row ``i`` A/B-swapped (with ``tta``; both orientations of a row in the same chunk, since they have
    the same length). ``chunk_rows=None``: one chunk. Else the first chunk has ``first_rows`` rows and
    each next one twice as many, up to ``chunk_rows``: why chunks at all: a consumer that runs on the
    GPU asynchronously (the packed pass) launches the first slabs while the host encodes the rest,
    instead of waiting for the whole table's tokenization (7-10 % of the H200 TTA pass's wall time,
    docs/gpu.md)."""
    tf = tokenizer.arena_format
    n = len(df)
    if n == 0:
        yield np.zeros(0, dtype=np.int64), []
        return
    cap = n if chunk_rows is None else max(1, chunk_rows)
    lo, size = 0, min(first_rows, cap) if chunk_rows is not None else n
    while lo < n:
        hi = min(n, lo + size)
        part = df.iloc[lo:hi]
        idx = np.arange(lo, hi, dtype=np.int64)
        ids = encode_rows(part, tokenizer, tf, max_length, prompt_max_tokens)
        if tta:
            ids = ids + encode_rows(part, tokenizer, tf, max_length, prompt_max_tokens, swap=True)
            idx = np.concatenate([idx, idx + n])
        yield idx, ids
        lo, size = hi, min(2 * size, cap)


def tta_mean(z: np.ndarray, n: int, tta: bool) -> np.ndarray:
    """Logits of ``2n`` rows (as given, then swapped) to the TTA mean in the original orientation:
    ``(z[:n] + swap_back(z[n:])) / 2``; ``z`` itself without ``tta``."""
    return z if not tta else 0.5 * (z[:n] + swap_probs(z[n:]))


def tta_in_one_pass(
    df: Any, tokenizer: Any, max_length: int, prompt_max_tokens: int, tta: bool, logits_of: Any
) -> np.ndarray:
    """TTA with both orientations in ONE call of ``logits_of(ids) -> (n, 3)``: rows as given and
    A/B-swapped have the same lengths, so a length-sorted or packed pass batches them together.
    Returns the mean of the original and the swapped-back logits (the rows as given if not ``tta``)."""
    (_, ids), = encoded_chunks(df, tokenizer, max_length, prompt_max_tokens, tta)
    return tta_mean(logits_of(ids), len(df), tta)


def labels_of(df: Any) -> np.ndarray:
    """(n, 3) float labels from the winner columns, each row normalised to sum 1."""
    y = df[list(LABEL_COLUMNS)].to_numpy(dtype=np.float64)
    s = y.sum(axis=1, keepdims=True)
    if np.any(s <= 0):
        raise ValueError("a row has no winner label (all three winner columns are 0)")
    return y / s


def lengths_of(ids: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
