"""The data contract: every input file of the recipe is read (and checked) here, nowhere else.

Why one module: the CLI (``arena-assets validate``), the Dagster source assets and the sample
generator's tests must agree byte for byte on what a valid row is, so the rules live in one place
and every reader returns the same normalized table (schema in ``docs/steps.md``):

- ``id``: string, unique, non-empty, kept exactly as written (Kaggle ids exceed 2^31; a float
  round trip would corrupt them, so ids are never parsed as numbers).
- ``prompt``, ``response_a``, ``response_b``: ``list[str]`` of turns.
- ``model_a``, ``model_b``: string or None (train/external only, optional in the input).
- ``winner_model_a``, ``winner_model_b``, ``winner_tie``: float64 in [0, 1], rows sum to 1.
- external tables add ``source`` (``ultrafeedback``, ``arena``, ``kaggle`` or the file's own).

Text cells (the Kaggle format): a JSON list of turns. ``null`` turns become ``""``; escaped
surrogate pairs decode to one character; a lone surrogate (seen in real rows) is replaced by
U+FFFD so tokenizers never crash on it later; a cell that does not start with ``[`` is plain text
(one turn); a cell that starts with ``[`` but is not valid JSON is an error (a truncated or
mangled cell must not silently become one turn of garbage).

Errors are :class:`ContractError` with ONE line naming the file, the row (1-based data row, not
counting the header, plus the id when known) and the column, e.g.
``train.csv row 8 (id 123): winner_model_a+winner_model_b+winner_tie = 1.3, must be 1``.

Speed: the real train.csv (57k rows, 184 MB) validates in a few seconds: the CSV is tokenized by
the pandas C engine (which, unlike ``pyarrow.csv``, reports an unterminated quote instead of
accepting it), labels are checked vectorised, and each text cell costs one C-level ``json.loads``.
Columns are decoded one at a time, replacing the raw strings, which keeps the peak memory at about
2.6x the file, interpreter included (``benchmarks/bench_validate.py`` measures it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arena_assets.core.artifacts import atomic_path

log = logging.getLogger(__name__)

LABEL_COLS = ["winner_model_a", "winner_model_b", "winner_tie"]
TEXT_COLS = ["prompt", "response_a", "response_b"]
MODEL_COLS = ["model_a", "model_b"]
PROB_SUFFIX = "_prob"
WINNER_VALUES = {
    "model_a": (1.0, 0.0, 0.0),
    "model_b": (0.0, 1.0, 0.0),
    "tie": (0.0, 0.0, 1.0),
    "tie (bothbad)": (0.0, 0.0, 1.0),
}
"""The ``winner`` column's values (Chatbot Arena's) and their one-hot labels."""
LABEL_SUM_TOL = 1e-6
TRAIN_COLS = ["id", *TEXT_COLS, *MODEL_COLS, *LABEL_COLS]
TEST_COLS = ["id", *TEXT_COLS]
EXTERNAL_COLS = [*TRAIN_COLS, "source"]

_raw_decode = json.JSONDecoder(strict=False).raw_decode
"""strict=False: a raw newline or tab inside a turn (hand-written files) is accepted as text."""
_UNNAMED = re.compile(r"^Unnamed: \d+$")
_SURROGATE = re.compile("[\ud800-\udfff]")


class ContractError(ValueError):
    """An input file breaks the data contract; the message is one line naming file, row, column."""


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------
def _fix_surrogates(s: str) -> str:
    """Replace lone surrogates (from escapes like ``\\ud83d`` without a partner) with U+FFFD.

    Valid pairs were already combined by ``json.loads``; anything left cannot be UTF-8 encoded and
    would crash a tokenizer or the parquet writer.
    """
    return _SURROGATE.sub("\ufffd", s)


def parse_text_cell(cell: Any) -> list[str]:
    """One Kaggle text cell -> list of turns (rules in the module docstring).

    Raises ``ValueError`` with a short reason; callers add file/row/column.
    """
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        raise ValueError("is empty")
    if isinstance(cell, (list, tuple, np.ndarray)):
        return _turns_from_list(list(cell))
    if not isinstance(cell, str):
        raise ValueError(f"is a {type(cell).__name__}, expected text or a JSON list of turns")
    if cell[:1] == "[":
        start = 0
    else:
        stripped = cell.lstrip()
        if stripped[:1] != "[":
            return [_fix_surrogates(cell)] if not cell.isascii() else [cell]
        start = len(cell) - len(stripped)
    try:
        # raw_decode skips json.loads' per-call wrapper (measurable over 170k cells)
        value, end = _raw_decode(cell, start)
    except json.JSONDecodeError as e:
        raise ValueError(f"starts with '[' but is not valid JSON ({e.msg} at char {e.pos})") from None
    if end != len(cell) and cell[end:].strip():
        raise ValueError(f"starts with '[' but is not valid JSON (extra data at char {end})")
    turns = _turns_from_list(value)
    # surrogates can only come from \\uD8xx-\\uDFxx escapes: look for them with a fast
    # substring test before paying for a regex over every turn
    if "\\ud" in cell or "\\uD" in cell:
        turns = [_fix_surrogates(t) for t in turns]
    return turns


def _turns_from_list(value: list[Any]) -> list[str]:
    out: list[str] = []
    for t in value:
        if t is None:
            out.append("")
        elif isinstance(t, str):
            out.append(t)
        else:
            raise ValueError(f"turn {len(out) + 1} is a {type(t).__name__}, expected a string or null")
    return out


def _parse_text_column(values: list[Any], where: Callable[[int], str], col: str) -> list[list[str]]:
    """Decode one text column; the first bad cell raises a one-line ContractError."""
    parse = parse_text_cell
    out: list[list[str]] = [None] * len(values)  # type: ignore[list-item]
    i = 0
    try:
        for i, cell in enumerate(values):
            if cell == "":
                raise ValueError("is empty (a row with too few fields?)")
            out[i] = parse(cell)
    except ValueError as e:
        raise ContractError(f"{where(i)}: {col} {e}") from None
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _read_csv_strings(path: Path) -> pd.DataFrame:
    """Every cell as a Python ``str`` (``""`` for empty), the unnamed index column dropped."""
    name = path.name
    if not path.exists():
        raise ContractError(f"{name}: file not found ({path})")
    if path.stat().st_size == 0:
        raise ContractError(f"{name}: file is empty")
    try:
        df = pd.read_csv(
            path,
            dtype=object,
            keep_default_na=False,
            na_filter=False,
            engine="c",
            encoding="utf-8-sig",
            low_memory=False,
        )
    except pd.errors.EmptyDataError:
        raise ContractError(f"{name}: file is empty") from None
    except pd.errors.ParserError as e:
        msg = str(e).strip().splitlines()[-1]
        if "EOF inside string" in msg:
            m = re.search(r"row (\d+)", msg)
            row = f" row {m.group(1)}" if m else ""
            raise ContractError(f"{name}{row}: truncated file: unterminated quote ({msg})") from None
        raise ContractError(f"{name}: malformed CSV: {msg}") from None
    except UnicodeDecodeError as e:
        raise ContractError(f"{name}: not valid UTF-8 at byte {e.start}") from None
    first = df.columns[0] if len(df.columns) else None
    if first is not None and (_UNNAMED.match(str(first)) or str(first) == ""):
        df = df.drop(columns=[first])
    dupes = [c for c in df.columns if re.match(r".+\.\d+$", str(c)) and str(c).rsplit(".", 1)[0] in df.columns]
    if dupes:
        raise ContractError(f"{name}: duplicate column {str(dupes[0]).rsplit('.', 1)[0]!r}")
    if len(df) == 0:
        raise ContractError(f"{name}: no data rows (header only)")
    return df


def _where_fn(name: str, ids: list[str] | None) -> Callable[[int], str]:
    def where(i: int) -> str:
        if ids is not None and i < len(ids) and ids[i] != "":
            return f"{name} row {i + 1} (id {ids[i]})"
        return f"{name} row {i + 1}"

    return where


def _require(df: pd.DataFrame, cols: Iterable[str], name: str) -> None:
    for c in cols:
        if c not in df.columns:
            found = ", ".join(map(str, df.columns))
            raise ContractError(f"{name}: missing column {c!r} (found: {found})")


def _check_ids(ids: list[str], where: Callable[[int], str]) -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v == "" or v.strip() == "":
            raise ContractError(f"{where(i)}: id is empty")
        j = seen.setdefault(v, i)
        if j != i:
            raise ContractError(f"{where(i)}: id {v} duplicates row {j + 1}")


def _labels_from_strings(df: pd.DataFrame, name: str, where: Callable[[int], str]) -> np.ndarray:
    """The three label columns as float64 (n, 3), whichever of the accepted forms is present."""
    cols = list(df.columns)
    if all(c in cols for c in LABEL_COLS):
        src = LABEL_COLS
    elif all(c + PROB_SUFFIX in cols for c in LABEL_COLS):
        src = [c + PROB_SUFFIX for c in LABEL_COLS]
    elif "winner" in cols:
        return _labels_from_winner(df["winner"].tolist(), where)
    else:
        partial = [c for c in cols if c in LABEL_COLS or c.endswith(PROB_SUFFIX)]
        have = f" (found only {', '.join(partial)})" if partial else ""
        raise ContractError(
            f"{name}: missing label columns: expected {'/'.join(LABEL_COLS)}, the same with "
            f"{PROB_SUFFIX!r}, or 'winner'{have}"
        )
    return _labels_from_frame(df[src], src, where)


def _labels_from_frame(raw: pd.DataFrame, src: list[str], where: Callable[[int], str]) -> np.ndarray:
    n = len(raw)
    y = np.empty((n, 3), dtype=np.float64)
    problems: list[tuple[int, str]] = []
    for j, c in enumerate(src):
        s = raw[c]
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            strs = s.astype(object)
            num = pd.to_numeric(strs, errors="coerce").to_numpy(dtype=np.float64)
            bad = np.flatnonzero(np.isnan(num))
            if bad.size:
                i = int(bad[0])
                v = strs.iloc[i]
                msg = f"{c} is empty" if v == "" else f"{c} = {v!r} is not a number"
                problems.append((i, msg))
        else:
            num = s.to_numpy(dtype=np.float64, na_value=np.nan)
            bad = np.flatnonzero(np.isnan(num))
            if bad.size:
                problems.append((int(bad[0]), f"{c} is empty"))
        y[:, j] = num
        with np.errstate(invalid="ignore"):
            out = np.flatnonzero(~np.isnan(num) & ((num < 0) | (num > 1)))
        if out.size:
            i = int(out[0])
            problems.append((i, f"{c} = {num[i]:g}, must be in [0, 1]"))
    with np.errstate(invalid="ignore"):
        sums = y.sum(axis=1)
        off = np.flatnonzero(np.isfinite(sums) & (np.abs(sums - 1.0) > LABEL_SUM_TOL))
    if off.size:
        i = int(off[0])
        problems.append((i, f"{'+'.join(src)} = {sums[i]:.10g}, must be 1"))
    if problems:
        i, msg = min(problems, key=lambda p: p[0])
        raise ContractError(f"{where(i)}: {msg}")
    return y


def _labels_from_winner(values: list[Any], where: Callable[[int], str]) -> np.ndarray:
    y = np.empty((len(values), 3), dtype=np.float64)
    for i, v in enumerate(values):
        key = v.strip().lower() if isinstance(v, str) else v
        if key not in WINNER_VALUES:
            allowed = ", ".join(WINNER_VALUES)
            raise ContractError(f"{where(i)}: winner = {v!r} is not one of {allowed}")
        y[i] = WINNER_VALUES[key]
    return y


def _optional_str(values: list[Any]) -> list[str | None]:
    return [None if (v is None or v == "" or (isinstance(v, float) and math.isnan(v))) else str(v) for v in values]


def _decode_texts(df: pd.DataFrame, where: Callable[[int], str]) -> dict[str, list[list[str]]]:
    """Decode the text columns one at a time, dropping each raw column as it goes (peak memory)."""
    out: dict[str, list[list[str]]] = {}
    for c in TEXT_COLS:
        raw = df[c].tolist()
        del df[c]
        out[c] = _parse_text_column(raw, where, c)
        del raw
    return out


def read_train(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a Kaggle-format train CSV into the normalized train table."""
    path = Path(path)
    name = path.name
    df = _read_csv_strings(path)
    _require(df, ["id", *TEXT_COLS], name)
    ids = df["id"].tolist()
    where = _where_fn(name, ids)
    _check_ids(ids, where)
    y = _labels_from_strings(df, name, where)
    models = {c: _optional_str(df[c].tolist()) if c in df.columns else [None] * len(df) for c in MODEL_COLS}
    texts = _decode_texts(df, where)
    del df
    table = pd.DataFrame(
        {"id": ids, **texts, **models, **{c: y[:, j] for j, c in enumerate(LABEL_COLS)}}
    )
    log.info("read %s: %d rows", name, len(table))
    return table[TRAIN_COLS]


def read_test(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a Kaggle-format test CSV (``id, prompt, response_a, response_b``)."""
    path = Path(path)
    name = path.name
    df = _read_csv_strings(path)
    _require(df, TEST_COLS, name)
    ids = df["id"].tolist()
    where = _where_fn(name, ids)
    _check_ids(ids, where)
    texts = _decode_texts(df, where)
    del df
    table = pd.DataFrame({"id": ids, **texts})
    log.info("read %s: %d rows", name, len(table))
    return table[TEST_COLS]


# --------------------------------------------------------------------------------------------
# External preference data (steps 1 and 3)
# --------------------------------------------------------------------------------------------
def chosen_goes_to_a(row_id: str) -> bool:
    """Where a pairwise (chosen/rejected) row puts its chosen response, deterministically.

    Always A would teach a position bias; so the chosen response is ``response_a`` when the first
    byte of ``sha256(id)`` is even, ``response_b`` otherwise (about half each, stable across runs
    and machines, unlike Python's salted ``hash``).
    """
    return hashlib.sha256(row_id.encode("utf-8")).digest()[0] % 2 == 0


def _load_maybe_json(v: Any) -> Any:
    """A CSV cell holding a JSON list (``conversation_a``, ``chosen``) -> Python value."""
    if isinstance(v, str):
        s = v.lstrip()
        if s[:1] in "[{":
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"starts with {s[0]!r} but is not valid JSON ({e.msg} at char {e.pos})") from None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _split_messages(value: Any) -> tuple[list[str], list[str]] | None:
    """A list of role/content messages -> (user turns, assistant turns); None if not messages."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    users: list[str] = []
    bots: list[str] = []
    for m in value:
        role = str(m.get("role", m.get("from", ""))).lower()
        content = m.get("content", m.get("value"))
        text = "" if content is None else str(content)
        text = _fix_surrogates(text)
        if role in ("user", "human", "prompter"):
            users.append(text)
        elif role in ("assistant", "gpt", "bot", "model"):
            bots.append(text)
        elif role == "system":
            continue
        else:
            raise ValueError(f"has a message with unknown role {role!r}")
    return users, bots


def _turns_any(v: Any) -> list[str]:
    """A response given as messages, a JSON/Python list of turns or plain text -> turns."""
    v = _load_maybe_json(v)
    msgs = _split_messages(v)
    if msgs is not None:
        return msgs[1]
    return parse_text_cell(v)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "") or (isinstance(v, float) and math.isnan(v))


def _normalize_external_row(r: dict[str, Any], row_id: str) -> tuple[str, list[str], list[str], list[str], tuple[float, float, float]]:
    """One external row -> (style, prompt, response_a, response_b, labels). Raises ValueError."""
    if not _missing(r.get("conversation_a")):
        if _missing(r.get("conversation_b")):
            raise ValueError("conversation_b is empty")
        a = _split_messages(_load_maybe_json(r["conversation_a"]))
        b = _split_messages(_load_maybe_json(r["conversation_b"]))
        if a is None or b is None:
            raise ValueError("conversation_a/conversation_b must be lists of {role, content} messages")
        w = r.get("winner")
        key = w.strip().lower() if isinstance(w, str) else w
        if key not in WINNER_VALUES:
            raise ValueError(f"winner = {w!r} is not one of {', '.join(WINNER_VALUES)}")
        return "arena", a[0], a[1], b[1], WINNER_VALUES[key]
    if not _missing(r.get("chosen")):
        if _missing(r.get("rejected")):
            raise ValueError("rejected is empty")
        chosen = _load_maybe_json(r["chosen"])
        rejected = _load_maybe_json(r["rejected"])
        cm = _split_messages(chosen)
        c_turns = cm[1] if cm is not None else parse_text_cell(chosen)
        r_turns = _turns_any(rejected)
        if not _missing(r.get("prompt")):
            prompt = parse_text_cell(_load_maybe_json(r["prompt"]))
        elif cm is not None and cm[0]:
            prompt = cm[0]
        else:
            raise ValueError("prompt is empty and chosen carries no user message")
        if chosen_goes_to_a(row_id):
            return "ultrafeedback", prompt, c_turns, r_turns, (1.0, 0.0, 0.0)
        return "ultrafeedback", prompt, r_turns, c_turns, (0.0, 1.0, 0.0)
    if not _missing(r.get("response_a")):
        texts = [parse_text_cell(_load_maybe_json(r.get(c))) for c in TEXT_COLS]
        if all(not _missing(r.get(c)) for c in LABEL_COLS):
            y = tuple(float(r[c]) for c in LABEL_COLS)
        elif all(not _missing(r.get(c + PROB_SUFFIX)) for c in LABEL_COLS):
            y = tuple(float(r[c + PROB_SUFFIX]) for c in LABEL_COLS)
        else:
            w = r.get("winner")
            key = w.strip().lower() if isinstance(w, str) else w
            if key not in WINNER_VALUES:
                raise ValueError("has response_a/response_b but no labels (winner_model_* or winner)")
            y = WINNER_VALUES[key]
        return "kaggle", texts[0], texts[1], texts[2], y  # type: ignore[return-value]
    raise ValueError(
        "is neither a pairwise row (prompt, chosen, rejected), an arena row "
        "(conversation_a, conversation_b, winner) nor a Kaggle row (prompt, response_a, response_b)"
    )


def _external_records(path: Path) -> list[dict[str, Any]]:
    name = path.name
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        if not path.exists():
            raise ContractError(f"{name}: file not found ({path})")
        records: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ContractError(f"{name} row {len(records) + 1} (line {ln}): not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ContractError(f"{name} row {len(records) + 1} (line {ln}): not a JSON object")
                records.append(rec)
        if not records:
            raise ContractError(f"{name}: file is empty")
        return records
    if suffix == ".parquet":
        if not path.exists():
            raise ContractError(f"{name}: file not found ({path})")
        import pyarrow.parquet as pq

        try:
            tbl = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for broken files
            raise ContractError(f"{name}: not a readable parquet file ({type(e).__name__}: {e})".splitlines()[0]) from None
        if tbl.num_rows == 0:
            raise ContractError(f"{name}: no data rows")
        return tbl.to_pylist()
    df = _read_csv_strings(path)
    return df.to_dict("records")


def read_external(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read external preference data (csv, jsonl or parquet) into the external table.

    Accepted row styles, mixed freely in one file (per row, the first that applies):

    - Arena conversations: ``conversation_a``/``conversation_b`` (lists of ``{role, content}``;
      in a CSV, as JSON text) and ``winner``. prompt = the user turns of ``conversation_a``.
    - Pairwise / UltraFeedback: ``prompt`` (optional when ``chosen`` holds the user message),
      ``chosen``, ``rejected`` (plain text, a list of turns, or a list of messages). The chosen
      response goes to A or B by :func:`chosen_goes_to_a`; labels one-hot on it (no ties).
    - Kaggle: ``prompt``, ``response_a``, ``response_b`` plus labels in any accepted form.

    ``id`` (or ``question_id``/``prompt_id``) is kept when present, else ``<file stem>-<row>``;
    ``source`` is kept when present, else the row style.
    """
    path = Path(path)
    name = path.name
    records = _external_records(path)
    stem = path.stem
    ids: list[str] = []
    cols: dict[str, list[Any]] = {c: [] for c in EXTERNAL_COLS if c != "id"}
    for i, r in enumerate(records):
        rid = next((r[k] for k in ("id", "question_id", "prompt_id") if not _missing(r.get(k))), None)
        row_id = f"{stem}-{i + 1}" if rid is None else (str(rid) if not isinstance(rid, float) else repr(rid))
        where = f"{name} row {i + 1}" + (f" (id {row_id})" if rid is not None else "")
        try:
            style, p, a, b, y = _normalize_external_row(r, row_id)
        except (ValueError, TypeError) as e:
            raise ContractError(f"{where}: {e}") from None
        if abs(sum(y) - 1.0) > LABEL_SUM_TOL or any(not (0.0 <= v <= 1.0) for v in y):
            raise ContractError(f"{where}: labels {list(y)} must be in [0, 1] and sum to 1")
        ids.append(row_id)
        cols["prompt"].append(p)
        cols["response_a"].append(a)
        cols["response_b"].append(b)
        for c in MODEL_COLS:
            cols[c].append(None if _missing(r.get(c)) else str(r[c]))
        for j, c in enumerate(LABEL_COLS):
            cols[c].append(float(y[j]))
        src = r.get("source")
        cols["source"].append(style if _missing(src) else str(src))
    _check_ids(ids, _where_fn(name, ids))
    table = pd.DataFrame({"id": ids, **cols})
    for c in LABEL_COLS:
        table[c] = table[c].astype(np.float64)
    log.info("read %s: %d external rows", name, len(table))
    return table[EXTERNAL_COLS]


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------
def _arrow_table(df: pd.DataFrame) -> Any:
    import pyarrow as pa

    arrays = []
    names = []
    for c in df.columns:
        values = df[c]
        if c in TEXT_COLS:
            arr = pa.array(values.tolist(), type=pa.list_(pa.string()))
        elif c in ("id", "source", *MODEL_COLS) or c in ("family",):
            arr = pa.array(values.astype(object).where(values.notna(), None).tolist(), type=pa.string())
        elif c in LABEL_COLS:
            arr = pa.array(values.to_numpy(dtype=np.float64), type=pa.float64())
        else:
            arr = pa.array(values.tolist())
        arrays.append(arr)
        names.append(str(c))
    return pa.Table.from_arrays(arrays, names=names)


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a normalized table as parquet atomically (temp file + rename): never a partial file."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = _arrow_table(df)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`write_table`; turn columns come back as Python lists."""
    import pyarrow.parquet as pq

    tbl = pq.read_table(path)
    data: dict[str, Any] = {}
    for c in tbl.column_names:
        col = tbl.column(c)
        if c in TEXT_COLS or c == "id" or c in MODEL_COLS or c == "source":
            data[c] = col.to_pylist()
        else:
            data[c] = col.to_numpy()
    return pd.DataFrame(data)


# --------------------------------------------------------------------------------------------
# Summary / validation
# --------------------------------------------------------------------------------------------
def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """A short description of a normalized table: rows, label balance, turns, longest cell."""
    out: dict[str, Any] = {"rows": int(len(df))}
    if all(c in df.columns for c in LABEL_COLS) and len(df):
        y = df[LABEL_COLS].to_numpy(dtype=np.float64)
        out["label_mean"] = {c: round(float(v), 4) for c, v in zip(LABEL_COLS, y.mean(axis=0))}
        counts = np.bincount(y.argmax(axis=1), minlength=3)
        out["label_argmax_counts"] = {c: int(v) for c, v in zip(LABEL_COLS, counts)}
        out["soft_label_rows"] = int(np.sum(y.max(axis=1) < 1.0))
    if "prompt" in df.columns and len(df):
        n_turns = np.fromiter((len(t) for t in df["prompt"]), dtype=np.int64, count=len(df))
        out["turns"] = {
            "mean": round(float(n_turns.mean()), 3),
            "max": int(n_turns.max()),
            "multi_turn_rows": int((n_turns > 1).sum()),
        }
    longest = {"chars": -1, "column": None, "id": None}
    empty_turns = 0
    ids = df["id"].tolist() if "id" in df.columns else [None] * len(df)
    for c in TEXT_COLS:
        if c not in df.columns:
            continue
        for rid, turns in zip(ids, df[c]):
            n = 0
            for t in turns:
                n += len(t)
                if not t:
                    empty_turns += 1
            if n > longest["chars"]:
                longest = {"chars": n, "column": c, "id": rid}
    out["longest_cell"] = longest
    out["empty_turns"] = empty_turns
    if "source" in df.columns:
        out["sources"] = {str(k): int(v) for k, v in df["source"].value_counts().sort_index().items()}
    return out


def validate_files(
    train: str | os.PathLike[str],
    test: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Validate train (and test); return their summaries. Raises ContractError on the first problem.

    With ``out_dir``, the normalized tables are written there (``train.parquet``,
    ``test.parquet``) only after BOTH files validated: a failed validation writes nothing.
    """
    tr = read_train(train)
    result: dict[str, Any] = {"train": summarize(tr)}
    te = None
    if test is not None:
        te = read_test(test)
        result["test"] = summarize(te)
        overlap = len(set(tr["id"]) & set(te["id"]))
        result["train_test_id_overlap"] = overlap
    if out_dir is not None:
        out = Path(out_dir)
        result["written"] = [str(write_table(tr, out / "train.parquet"))]
        if te is not None:
            result["written"].append(str(write_table(te, out / "test.parquet")))
    return result
