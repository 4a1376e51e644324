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
(one turn); a cell that starts with ``[`` but is not valid JSON (or nests deeper than the JSON
decoder can follow) is an error (a truncated or mangled cell must not silently become one turn of
garbage); a cell that is one whole JSON string (``"hello"``, quotes included) is an error too: it
is a JSON-encoded turn written without its list, and keeping it as plain text would feed the
model the quotes and escapes.

Errors are :class:`ContractError` with ONE short line naming the file, the row (1-based data row,
not counting the header; plus the line when it differs from row + 1, e.g. after a multi-line cell
or blank lines; plus the id when known) and the column, and what was expected, e.g.
``train.csv row 8 (id 123): winner_model_a+winner_model_b+winner_tie = 1.3, must be 1``.
Whatever the bytes (binary, compressed, another encoding, a directory, a FIFO, 100,000 nested
``[``, 100,000 columns), a reader raises ContractError and nothing else; long values and column
lists are clipped so the line stays short (``tests/core/test_fuzz_contract.py`` fuzzes this).

Errors vs warnings: a problem the recipe cannot resolve without guessing is an error (two label
forms that disagree, a test id that is also a train id, a JSON string where a list of turns is
expected); something a user can mean is a warning, printed by ``validate`` and recorded in its
result (``warnings``) and in ``DataFrame.attrs["warnings"]``: a test file with label columns (a
labelled hold-out split is a legitimate test file; the labels are dropped).

Speed: the real train.csv (57k rows, 184 MB) validates in a few seconds: the CSV is tokenized by
the pandas C engine (which, unlike ``pyarrow.csv``, reports an unterminated quote instead of
accepting it), labels are checked vectorised, and each text cell costs one C-level ``json.loads``.
Columns are decoded one at a time, replacing the raw strings, which keeps the peak memory at about
2.6x the file, interpreter included (``benchmarks/bench_validate.py`` measures it).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
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


MAX_VALUE_CHARS = 60
"""A value quoted in an error message is clipped to this many characters."""
MAX_MESSAGE_CHARS = 500
"""No error line is longer (a safety net: values and column lists are clipped first)."""


def _one_line(msg: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    msg = msg.replace("\r", "\\r").replace("\n", "\\n")
    return msg if len(msg) <= limit else msg[: limit - 1] + "..."


def _show(v: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(v)``, clipped: ``'abc'... (12345 chars)``."""
    if isinstance(v, str) and len(v) > limit:
        return f"{v[:limit]!r}... ({len(v)} chars)"
    try:
        r = repr(v)
    except (RecursionError, ValueError):  # a 100k-deep list; an int over 4300 digits
        return f"a {type(v).__name__} too large to show"
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} chars)"


def _clip(v: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``str(v)`` clipped (for names: files, ids, columns)."""
    t = str(v)
    return t if len(t) <= limit else t[:limit] + "..."


def _show_list(items: Iterable[Any], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(_clip(x, 40) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class ContractError(ValueError):
    """An input file breaks the data contract; the message is one short line naming file, row,
    column and what was expected (newlines escaped, clipped to :data:`MAX_MESSAGE_CHARS`)."""

    def __init__(self, msg: str) -> None:
        super().__init__(_one_line(str(msg)))


class OutputError(ContractError):
    """``validate --out`` could not write its tables (not a directory, no permission, disk full);
    nothing in the output directory was changed."""


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
        turns = _turns_from_list(list(cell))
        return [t if t.isascii() else _fix_surrogates(t) for t in turns]
    if not isinstance(cell, str):
        raise ValueError(f"is a {type(cell).__name__}, expected text or a JSON list of turns")
    if cell[:1] == "[":
        start = 0
    else:
        stripped = cell.lstrip()
        if stripped[:1] != "[":
            if stripped[:1] == '"':
                _reject_json_string(cell, len(cell) - len(stripped))
            return [_fix_surrogates(cell)] if not cell.isascii() else [cell]
        start = len(cell) - len(stripped)
    try:
        # raw_decode skips json.loads' per-call wrapper (measurable over 170k cells)
        value, end = _raw_decode(cell, start)
    except json.JSONDecodeError as e:
        raise ValueError(f"starts with '[' but is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise ValueError("starts with '[' but nests lists too deeply to decode, expected a JSON list of turns") from None
    if end != len(cell) and cell[end:].strip():
        raise ValueError(f"starts with '[' but is not valid JSON (extra data at char {end})")
    turns = _turns_from_list(value)
    # surrogates can only come from \\uD8xx-\\uDFxx escapes: look for them with a fast
    # substring test before paying for a regex over every turn
    if "\\ud" in cell or "\\uD" in cell:
        turns = [_fix_surrogates(t) for t in turns]
    return turns


def _reject_json_string(cell: str, start: int) -> None:
    """A cell that is exactly one JSON string literal: an error (module docstring)."""
    try:
        value, end = _raw_decode(cell, start)
    except (ValueError, RecursionError):
        return  # plain text that merely starts with a quote
    if isinstance(value, str) and not cell[end:].strip():
        fix = cell.strip()
        fix = f"[{fix}]" if len(fix) <= 30 else "[" + fix[:30] + '..."]'
        raise ValueError(f"is a JSON string ({_show(cell.strip(), 40)}), expected a JSON list of turns: write {fix}")


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
PROB_COLS = [c + PROB_SUFFIX for c in LABEL_COLS]
OUTPUT_NAMES = ("train.parquet", "test.parquet", "external.parquet")
"""What ``validate --out`` writes (and owns) in its output directory."""

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip-compressed (decompress it first: gunzip)"),
    (b"PAR1", "a parquet file"),
    (b"PK\x03\x04", "a zip archive or an Excel workbook (unpack or export it as CSV first)"),
    (b"\xfd7zXZ\x00", "xz-compressed (decompress it first: unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed (decompress it first: unzstd)"),
    (b"ARROW1", "an Arrow/Feather file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel (OLE2) file (export it as CSV first)"),
    (b"\xff\xfe", "UTF-16/32 text (save it as UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (save it as UTF-8)"),
)
"""First bytes of the formats people pass by mistake under a .csv/.jsonl name."""
_BZIP2 = re.compile(rb"^BZh[1-9]1AY&SY")


def _display_name(path: Path) -> str:
    return _clip(path.name or str(path), 120)


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {_clip(e, 120)}"


def _check_input_file(path: Path, expected: str) -> bytes:
    """Stat and open ``path``; return its first bytes. Every failure is a ContractError.

    Only regular files are read: a directory, FIFO, socket or device is refused before opening
    (a FIFO would block, ``/dev/zero`` never ends, and the pipeline hashes the file for its data
    version and reads it again later, which a pipe cannot do).
    """
    name = _display_name(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ContractError(f"{name}: file not found ({_clip(path, 200)})") from None
    except (OSError, ValueError) as e:
        raise ContractError(f"{name}: cannot read it ({_os_reason(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ContractError(f"{name}: is a directory, expected {expected}")
    if not stat.S_ISREG(st.st_mode):
        raise ContractError(
            f"{name}: is not a regular file (a FIFO, socket or device), expected {expected}: save it to a file first"
        )
    if st.st_size == 0:
        raise ContractError(f"{name}: file is empty")
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError as e:
        raise ContractError(f"{name}: cannot read it ({_os_reason(e)})") from None


def _sniff(name: str, head: bytes, expected: str) -> None:
    """Refuse compressed/binary/UTF-16 content by its first bytes (a ``.csv`` that is gzip would
    otherwise be reported as 'not valid UTF-8')."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise ContractError(f"{name}: is {what}, expected {expected}")
    if _BZIP2.match(head):
        raise ContractError(f"{name}: is bzip2-compressed (decompress it first: bunzip2), expected {expected}")


class _CsvLines:
    """Where each record of a CSV file starts and ends (1-based lines), for error messages only.

    Computed lazily, on the error path: Python's csv module re-reads the file up to the record
    asked for (it splits records like pandas' C tokenizer does on any file that tokenized; blank
    lines are skipped by both). Never raises: an unknown line is None.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _records(self, stop: Callable[[int, int, int], bool]) -> tuple[int, int, int] | None:
        old = csv.field_size_limit()
        csv.field_size_limit(2**31 - 1)
        try:
            with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as f:
                reader = csv.reader(f)
                prev_end, rec_no = 0, -1
                for rec in reader:
                    start, prev_end = prev_end + 1, reader.line_num
                    if not rec:
                        continue
                    rec_no += 1
                    if stop(rec_no, start, prev_end):
                        return rec_no, start, prev_end
        except Exception:  # noqa: BLE001 - only decorates a message that is raised anyway
            return None
        finally:
            csv.field_size_limit(old)
        return None

    def line_of_row(self, i: int) -> int | None:
        """First line of data row ``i`` (0-based; record 0 is the header)."""
        found = self._records(lambda rec, start, end: rec == i + 1)
        return found[1] if found else None

    def row_of_line(self, line: int) -> int | None:
        """Data row (1-based; 0 = the header) whose record spans ``line``."""
        found = self._records(lambda rec, start, end: start <= line <= end)
        return found[0] if found else None


def _where_fn(
    name: str, ids: list[str] | None, line_of: Callable[[int], int | None] | None = None, header_lines: int = 1
) -> Callable[[int], str]:
    """``i`` (0-based data row) -> ``"train.csv row 8 (line 12, id 123)"``; the line only when it
    is not ``row + header_lines`` (a multi-line cell or blank lines came before)."""

    def where(i: int) -> str:
        parts = []
        line = None
        if line_of is not None:
            try:
                line = line_of(i)
            except Exception:  # noqa: BLE001 - decoration only
                line = None
        if line is not None and line != i + 1 + header_lines:
            parts.append(f"line {line}")
        if ids is not None and i < len(ids) and ids[i] != "":
            parts.append(f"id {_clip(ids[i], 40)}")
        return f"{name} row {i + 1}" + (f" ({', '.join(parts)})" if parts else "")

    return where


def _first_bad_utf8(path: Path) -> tuple[int, int] | None:
    """(byte offset, 1-based line) of the first byte that is not UTF-8, or None."""
    offset = 0  # file offset of data[0]
    newlines = 0
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            data = carry + chunk
            if not data:
                return None
            try:
                data.decode("utf-8")
                good, carry = data, b""
            except UnicodeDecodeError as e:
                if chunk and e.reason == "unexpected end of data":
                    good, carry = data[: e.start], data[e.start :]  # a character split by the chunk
                else:
                    return offset + e.start, newlines + data[: e.start].count(b"\n") + 1
            newlines += good.count(b"\n")
            offset += len(good)
            if not chunk:
                return None


def _utf8_error(path: Path, name: str) -> ContractError:
    try:
        found = _first_bad_utf8(path)
    except OSError:
        found = None
    if found is None:
        return ContractError(f"{name}: not valid UTF-8 (save the file as UTF-8)")
    offset, line = found
    row = _CsvLines(path).row_of_line(line)
    if row is None:
        loc = f"{name} line {line}"
    elif row == 0:
        loc = f"{name} header (line {line})"
    else:
        loc = f"{name} row {row}" + (f" (line {line})" if line != row + 1 else "")
    return ContractError(f"{loc}: not valid UTF-8 at byte {offset} of the file (save the file as UTF-8)")


def _read_csv_strings(path: Path) -> pd.DataFrame:
    """Every cell as a Python ``str`` (``""`` for empty), the unnamed index column dropped."""
    name = _display_name(path)
    head = _check_input_file(path, "a CSV file")
    _sniff(name, head, "CSV text (UTF-8)")
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
        raise ContractError(f"{name}: file is empty (no header line)") from None
    except pd.errors.ParserError as e:
        lines = str(e).strip().splitlines()
        msg = lines[-1] if lines else type(e).__name__
        if "EOF inside string" in msg:
            m = re.search(r"row (\d+)", msg)
            loc = name
            if m:
                i = int(m.group(1)) - 1
                loc = _where_fn(name, None, _CsvLines(path).line_of_row)(i)
            raise ContractError(f"{loc}: truncated file: unterminated quote ({_clip(msg, 120)})") from None
        raise ContractError(f"{name}: malformed CSV: {_clip(msg, 200)}") from None
    except UnicodeDecodeError:
        raise _utf8_error(path, name) from None
    except MemoryError:
        raise
    except OSError as e:
        raise ContractError(f"{name}: cannot read it ({_os_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - the C tokenizer is a black box: whatever it raises is about these bytes
        raise ContractError(f"{name}: malformed CSV ({type(e).__name__}: {_clip(e, 200)})") from None
    first = df.columns[0] if len(df.columns) else None
    if first is not None and (_UNNAMED.match(str(first)) or str(first) == ""):
        df = df.drop(columns=[first])
    cols = set(df.columns)
    dupes = [c for c in df.columns if re.match(r".+\.\d+$", str(c)) and str(c).rsplit(".", 1)[0] in cols]
    if dupes:
        raise ContractError(f"{name}: duplicate column {_clip(str(dupes[0]).rsplit('.', 1)[0], 60)!r}")
    if len(df) == 0:
        raise ContractError(f"{name}: no data rows (header only)")
    return df


def _require(df: pd.DataFrame, cols: Iterable[str], name: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ContractError(f"{name}: missing column {missing[0]!r} (found: {_show_list(df.columns)})")


def _check_ids(ids: list[str], where: Callable[[int], str]) -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v == "" or v.strip() == "":
            raise ContractError(f"{where(i)}: id is empty")
        j = seen.setdefault(v, i)
        if j != i:
            raise ContractError(f"{where(i)}: id {_clip(v, 40)} duplicates row {j + 1}")


def _label_forms(cols: Iterable[Any], name: str) -> list[list[str]]:
    """The complete label forms present, in precedence order: plain, ``_prob``, ``winner``.

    A form with only some of its three columns is an error (a cut or mangled header)."""
    cols = set(map(str, cols))
    forms: list[list[str]] = []
    for src in (LABEL_COLS, PROB_COLS):
        have = [c for c in src if c in cols]
        if len(have) == len(src):
            forms.append(src)
        elif have:
            missing = [c for c in src if c not in cols]
            raise ContractError(f"{name}: has label column {', '.join(have)} but not {', '.join(missing)}")
    if "winner" in cols:
        forms.append(["winner"])
    return forms


def _labels_from_strings(df: pd.DataFrame, name: str, where: Callable[[int], str]) -> np.ndarray:
    """The three label columns as float64 (n, 3), whichever of the accepted forms is present.

    When several forms are present (e.g. one-hot columns and ``winner``, or plain and ``_prob``
    columns) every one is checked and they must agree row by row: two label forms that disagree
    are an ERROR, not "the first one wins", since nothing tells which one the user meant (a file
    of hard labels plus teacher probabilities must name the latter differently).
    """
    forms = _label_forms(df.columns, name)
    if not forms:
        partial = [c for c in df.columns if str(c).endswith(PROB_SUFFIX)]
        have = f" (found only {_show_list(partial)})" if partial else ""
        raise ContractError(
            f"{name}: missing label columns: expected {'/'.join(LABEL_COLS)}, the same with "
            f"{PROB_SUFFIX!r}, or 'winner'{have}"
        )
    ys = []
    for src in forms:
        if src == ["winner"]:
            ys.append((src, _labels_from_winner(df["winner"].tolist(), where)))
        else:
            ys.append((src, _labels_from_frame(df[src], src, where)))
    src0, y0 = ys[0]
    for src, y in ys[1:]:
        bad = _disagreeing_rows(y0, y, winner=src == ["winner"])
        if bad.size:
            i = int(bad[0])
            if src == ["winner"]:
                first = f"{'/'.join(src0)} = {'/'.join(f'{v:g}' for v in y0[i])}"
                second = f"winner = {_show(df['winner'].iloc[i], 30)}"
            else:
                j = int(np.argmax(np.abs(y0[i] - y[i])))
                first, second = f"{src0[j]} = {y0[i, j]:g}", f"{src[j]} = {y[i, j]:g}"
            raise ContractError(
                f"{where(i)}: {first} but {second}: two label forms disagree ({len(bad)} rows); keep only one"
            )
    return y0


def _disagreeing_rows(y0: np.ndarray, y: np.ndarray, winner: bool) -> np.ndarray:
    """Rows where label form ``y`` contradicts ``y0``: numeric forms must be equal (to
    LABEL_SUM_TOL); a ``winner`` must name a class with the highest probability in ``y0``."""
    if winner:
        k = y.argmax(axis=1)
        return np.flatnonzero(y0[np.arange(len(y0)), k] < y0.max(axis=1) - LABEL_SUM_TOL)
    return np.flatnonzero((np.abs(y0 - y) > LABEL_SUM_TOL).any(axis=1))


def _labels_from_frame(raw: pd.DataFrame, src: list[str], where: Callable[[int], str]) -> np.ndarray:
    n = len(raw)
    y = np.empty((n, 3), dtype=np.float64)
    problems: list[tuple[int, str]] = []
    for j, c in enumerate(src):
        s = raw[c]
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            strs = s.astype(object)
            try:
                num = pd.to_numeric(strs, errors="coerce").to_numpy(dtype=np.float64)
            except (ValueError, TypeError, OverflowError):  # e.g. ints beyond float range
                num = np.array([_float_or_nan(v) for v in strs], dtype=np.float64)
            bad = np.flatnonzero(np.isnan(num))
            if bad.size:
                i = int(bad[0])
                v = strs.iloc[i]
                msg = f"{c} is empty" if v == "" else f"{c} = {_show(v, 30)} is not a number"
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


def _float_or_nan(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        return math.nan
    return x


def _winner_label(w: Any) -> tuple[float, float, float]:
    key = w.strip().lower() if isinstance(w, str) else None
    if key not in WINNER_VALUES:
        raise ValueError(f"winner = {_show(w, 40)} is not one of {', '.join(WINNER_VALUES)}")
    return WINNER_VALUES[key]


def _labels_from_winner(values: list[Any], where: Callable[[int], str]) -> np.ndarray:
    y = np.empty((len(values), 3), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            y[i] = _winner_label(v)
        except ValueError as e:
            raise ContractError(f"{where(i)}: {e}") from None
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
    name = _display_name(path)
    df = _read_csv_strings(path)
    _require(df, ["id", *TEXT_COLS], name)
    ids = df["id"].tolist()
    where = _where_fn(name, ids, _CsvLines(path).line_of_row)
    _check_ids(ids, where)
    y = _labels_from_strings(df, name, where)
    models = {c: _optional_str(df[c].tolist()) if c in df.columns else [None] * len(df) for c in MODEL_COLS}
    texts = _decode_texts(df, where)
    del df
    table = pd.DataFrame(
        {"id": ids, **texts, **models, **{c: y[:, j] for j, c in enumerate(LABEL_COLS)}}
    )
    log.info("read %s: %d rows", name, len(table))
    table = table[TRAIN_COLS]
    table.attrs["warnings"] = []
    return table


def read_test(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a Kaggle-format test CSV (``id, prompt, response_a, response_b``).

    Label columns in a test file are a WARNING (``attrs["warnings"]``, logged), not an error: a
    labelled hold-out split is a legitimate test file; the labels are dropped. (A test file that
    is the train file is caught by :func:`validate_files`: its ids are train ids.)
    """
    path = Path(path)
    name = _display_name(path)
    df = _read_csv_strings(path)
    _require(df, TEST_COLS, name)
    warnings: list[str] = []
    label_cols = [c for c in df.columns if c in LABEL_COLS or c in PROB_COLS or c == "winner"]
    if label_cols:
        w = (f"{name}: has label columns ({_show_list(label_cols)}), which a test file does not have; "
             "they are ignored (is this a train file or a labelled hold-out?)")
        log.warning(w)
        warnings.append(w)
    ids = df["id"].tolist()
    where = _where_fn(name, ids, _CsvLines(path).line_of_row)
    _check_ids(ids, where)
    texts = _decode_texts(df, where)
    del df
    table = pd.DataFrame({"id": ids, **texts})
    log.info("read %s: %d rows", name, len(table))
    table = table[TEST_COLS]
    table.attrs["warnings"] = warnings
    return table


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
        if s[:1] in ("[", "{"):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"starts with {s[0]!r} but is not valid JSON ({e.msg} at char {e.pos})") from None
            except (ValueError, RecursionError) as e:  # nesting too deep, an int over 4300 digits
                raise ValueError(f"starts with {s[0]!r} but cannot be decoded ({type(e).__name__})") from None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _split_messages(value: Any) -> tuple[list[str], list[str]] | None:
    """A list of role/content messages -> (user turns, assistant turns); None if not messages."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    users: list[str] = []
    bots: list[str] = []
    for n, m in enumerate(value, 1):
        role = m.get("role", m.get("from", ""))
        role = role.lower() if isinstance(role, str) else role
        content = m.get("content", m.get("value"))
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content if content.isascii() else _fix_surrogates(content)
        else:
            raise ValueError(f"message {n} content is a {type(content).__name__}, expected text")
        if role in ("user", "human", "prompter"):
            users.append(text)
        elif role in ("assistant", "gpt", "bot", "model"):
            bots.append(text)
        elif role == "system":
            continue
        else:
            raise ValueError(f"message {n} has unknown role {_show(role, 30)}")
    return users, bots


def _messages(v: Any) -> tuple[list[str], list[str]]:
    msgs = _split_messages(_load_maybe_json(v))
    if msgs is None:
        raise ValueError("must be a list of {role, content} messages")
    return msgs


def _turns_any(v: Any) -> list[str]:
    """A response given as messages, a JSON/Python list of turns or plain text -> turns."""
    v = _load_maybe_json(v)
    msgs = _split_messages(v)
    if msgs is not None:
        return msgs[1]
    return parse_text_cell(v)


def _text_any(v: Any) -> list[str]:
    return parse_text_cell(_load_maybe_json(v))


def _col(c: str, fn: Callable[[Any], Any], v: Any) -> Any:
    """``fn(v)``, its ValueError prefixed with the column name."""
    try:
        return fn(v)
    except ValueError as e:
        raise ValueError(f"{c} {e}") from None
    except (TypeError, RecursionError, OverflowError) as e:
        raise ValueError(f"{c} cannot be read ({type(e).__name__})") from None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "") or (isinstance(v, float) and math.isnan(v))


def _label_number(c: str, v: Any) -> float:
    if isinstance(v, (bool, list, dict, bytes)):
        raise ValueError(f"{c} = {_show(v, 30)} is not a number")  # noqa: TRY004 - ValueError: a contract error
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{c} = {_show(v, 30)} is not a number") from None
    if not 0.0 <= x <= 1.0:  # NaN fails too
        raise ValueError(f"{c} = {x:g}, must be in [0, 1]")
    return x


def _row_labels(r: dict[str, Any]) -> tuple[float, float, float] | None:
    """An external row's labels from whichever forms it has (plain, ``_prob``, ``winner``), None
    if it has none. Several forms must agree (as in :func:`_labels_from_strings`)."""
    forms: list[tuple[list[str], tuple[float, float, float]]] = []
    for src in (LABEL_COLS, PROB_COLS):
        have = [c for c in src if not _missing(r.get(c))]
        if len(have) == len(src):
            y = tuple(_label_number(c, r[c]) for c in src)
            if abs(sum(y) - 1.0) > LABEL_SUM_TOL:
                raise ValueError(f"{'+'.join(src)} = {sum(y):.10g}, must be 1")
            forms.append((src, y))  # type: ignore[arg-type]
        elif have:
            raise ValueError(f"has {', '.join(have)} but not {', '.join(c for c in src if c not in have)}")
    w = r.get("winner")
    if not _missing(w):
        forms.append((["winner"], _winner_label(w)))
    if not forms:
        return None
    src0, y0 = forms[0]
    for src, y in forms[1:]:
        a, b = np.asarray([y0]), np.asarray([y])
        if _disagreeing_rows(a, b, winner=src == ["winner"]).size:
            if src == ["winner"]:
                first = f"{'/'.join(src0)} = {'/'.join(f'{v:g}' for v in y0)}"
                second = f"winner = {_show(w, 30)}"
            else:
                j = int(np.argmax(np.abs(a[0] - b[0])))
                first, second = f"{src0[j]} = {y0[j]:g}", f"{src[j]} = {y[j]:g}"
            raise ValueError(f"{first} but {second}: two label forms disagree; keep only one")
    return y0


def _normalize_external_row(r: dict[str, Any], row_id: str) -> tuple[str, list[str], list[str], list[str], tuple[float, float, float]]:
    """One external row -> (style, prompt, response_a, response_b, labels). Raises ValueError
    naming the column."""
    if not _missing(r.get("conversation_a")):
        if _missing(r.get("conversation_b")):
            raise ValueError("conversation_b is empty")
        a = _col("conversation_a", _messages, r["conversation_a"])
        b = _col("conversation_b", _messages, r["conversation_b"])
        y = _row_labels(r)
        if y is None:
            _winner_label(r.get("winner"))  # raises: "winner = None is not one of ..."
        return "arena", a[0], a[1], b[1], y  # type: ignore[return-value]
    if not _missing(r.get("chosen")):
        if _missing(r.get("rejected")):
            raise ValueError("rejected is empty")
        chosen = _col("chosen", _load_maybe_json, r["chosen"])
        cm = _col("chosen", _split_messages, chosen)
        c_turns = cm[1] if cm is not None else _col("chosen", parse_text_cell, chosen)
        r_turns = _col("rejected", _turns_any, r["rejected"])
        if not _missing(r.get("prompt")):
            prompt = _col("prompt", _text_any, r["prompt"])
        elif cm is not None and cm[0]:
            prompt = cm[0]
        else:
            raise ValueError("prompt is empty and chosen carries no user message")
        if chosen_goes_to_a(row_id):
            return "ultrafeedback", prompt, c_turns, r_turns, (1.0, 0.0, 0.0)
        return "ultrafeedback", prompt, r_turns, c_turns, (0.0, 1.0, 0.0)
    if not _missing(r.get("response_a")):
        texts = [_col(c, _text_any, r.get(c)) for c in TEXT_COLS]
        y = _row_labels(r)
        if y is None:
            raise ValueError("has response_a/response_b but no labels (winner_model_* or winner)")
        return "kaggle", texts[0], texts[1], texts[2], y
    raise ValueError(
        "is neither a pairwise row (prompt, chosen, rejected), an arena row "
        "(conversation_a, conversation_b, winner) nor a Kaggle row (prompt, response_a, response_b)"
    )


def _jsonl_records(path: Path, name: str) -> tuple[list[dict[str, Any]], list[int]]:
    """JSON Lines -> (records, the line of each). Each line is decoded on its own, so an error
    names the row, the line and the byte."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below; open's error is the file's
    except OSError as e:
        raise ContractError(f"{name}: cannot read it ({_os_reason(e)})") from None
    with f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{name} row {len(records) + 1}" + (f" (line {ln})" if ln != len(records) + 1 else "")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ContractError(f"{where}: not valid UTF-8 at byte {e.start + 1} of the line (save the file as UTF-8)") from None
            if ln == 1:
                line = line.removeprefix("\ufeff")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a JSON array? expected one JSON object per line)" if not records and line.lstrip()[:1] == "[" else ""
                raise ContractError(f"{where}: not valid JSON ({e.msg} at char {e.pos}){hint}") from None
            except (ValueError, RecursionError) as e:  # nesting too deep, an int over 4300 digits
                raise ContractError(f"{where}: not valid JSON ({type(e).__name__}: {_clip(e, 80)})") from None
            if not isinstance(rec, dict):
                raise ContractError(f"{where}: not a JSON object (a {type(rec).__name__}), expected one object per line")
            records.append(rec)
            lines.append(ln)
    if not records:
        raise ContractError(f"{name}: file is empty (no JSON lines)")
    return records, lines


def _external_records(path: Path) -> tuple[list[dict[str, Any]], Callable[[int], int | None] | None]:
    """(records, line_of): ``line_of(i)`` is the first line of record i (None for parquet)."""
    name = _display_name(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        head = _check_input_file(path, "a JSON Lines file")
        _sniff(name, head, "JSON Lines text (UTF-8)")
        records, lines = _jsonl_records(path, name)
        return records, lambda i: lines[i] if i < len(lines) else None  # type: ignore[return-value]
    if suffix == ".parquet":
        _check_input_file(path, "a parquet file")
        import pyarrow.parquet as pq

        try:
            tbl = pq.read_table(path)
            if tbl.num_rows == 0:
                raise ContractError(f"{name}: no data rows")
            return tbl.to_pylist(), None  # type: ignore[return-value]
        except (ContractError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for broken files
            first = (str(e).strip().splitlines() or [""])[0]
            raise ContractError(f"{name}: not a readable parquet file ({type(e).__name__}: {_clip(first, 150)})") from None
    df = _read_csv_strings(path)
    return df.to_dict("records"), _CsvLines(path).line_of_row  # type: ignore[return-value]


def _row_id(r: dict[str, Any]) -> Any:
    return next((r[k] for k in ("id", "question_id", "prompt_id") if not _missing(r.get(k))), None)


def _id_text(rid: Any) -> str:
    if isinstance(rid, (list, dict, tuple, bytes, np.ndarray)):
        raise ValueError(f"id is a {type(rid).__name__}, expected text or a number")  # noqa: TRY004 - as above
    t = repr(rid) if isinstance(rid, float) else str(rid)
    return t if t.isascii() else _fix_surrogates(t)


def _opt_text(v: Any) -> str | None:
    if _missing(v):
        return None
    t = str(v)
    return t if t.isascii() else _fix_surrogates(t)


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
    ``source`` is kept when present, else the row style. A row with several label forms
    (``winner`` and ``winner_model_*``, plain and ``_prob``) must have them agree.
    """
    path = Path(path)
    name = _display_name(path)
    records, line_of = _external_records(path)
    header_lines = 0 if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else 1
    stem = path.stem
    ids: list[str] = []
    cols: dict[str, list[Any]] = {c: [] for c in EXTERNAL_COLS if c != "id"}
    for i, r in enumerate(records):
        rid = _row_id(r)
        try:
            row_id = f"{stem}-{i + 1}" if rid is None else _id_text(rid)
            style, p, a, b, y = _normalize_external_row(r, row_id)
        except (ValueError, TypeError, RecursionError, OverflowError) as e:
            shown = None if rid is None or isinstance(rid, (list, dict, tuple, bytes, np.ndarray)) else str(rid)
            where = _where_fn(name, None, line_of, header_lines)(i)
            if shown:
                where = where[:-1] + f", id {_clip(shown, 40)})" if where.endswith(")") else where + f" (id {_clip(shown, 40)})"
            msg = str(e) if isinstance(e, ValueError) else f"cannot be read ({type(e).__name__})"
            raise ContractError(f"{where}: {msg}") from None
        ids.append(row_id)
        cols["prompt"].append(p)
        cols["response_a"].append(a)
        cols["response_b"].append(b)
        for c in MODEL_COLS:
            cols[c].append(_opt_text(r.get(c)))
        for j, c in enumerate(LABEL_COLS):
            cols[c].append(float(y[j]))
        src = _opt_text(r.get("source"))
        cols["source"].append(style if src is None else src)
    _check_ids(ids, _where_fn(name, ids, line_of, header_lines))
    table = pd.DataFrame({"id": ids, **cols})
    for c in LABEL_COLS:
        table[c] = table[c].astype(np.float64)
    log.info("read %s: %d external rows", name, len(table))
    table = table[EXTERNAL_COLS]
    table.attrs["warnings"] = []
    return table


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


def check_train_test(train: str | os.PathLike[str], test: str | os.PathLike[str], tr: pd.DataFrame, te: pd.DataFrame) -> None:
    """A test file must not be the train file, nor share ids with it: an ERROR.

    Why not a warning: every later step keys rows by id (folds, out-of-fold predictions, teacher
    targets, the submission), and the competition's test ids are never train ids; a shared id is
    a file mix-up (``--test train.csv``, or a split that copied rows), never something to train on.
    """
    tn, sn = _display_name(Path(train)), _display_name(Path(test))
    try:
        same = os.path.samefile(train, test)
    except (OSError, ValueError):
        same = False
    if same:
        raise ContractError(f"{sn}: is the same file as the train file {tn}; a test file has new ids and no labels")
    train_rows = {v: i for i, v in enumerate(tr["id"].tolist())}
    test_ids = te["id"].tolist()
    shared = [i for i, v in enumerate(test_ids) if v in train_rows]
    if shared:
        i = shared[0]
        v = test_ids[i]
        hint = " (is it a copy of the train file?)" if len(shared) == len(test_ids) else ""
        where = _where_fn(sn, test_ids, _CsvLines(Path(test)).line_of_row)(i)
        raise ContractError(
            f"{where}: id {_clip(v, 40)} is also a train id ({tn} row {train_rows[v] + 1}); "
            f"{len(shared)} of {len(test_ids)} test ids are train ids, test ids must be new{hint}"
        )


def _write_reason(e: OSError, where: Path) -> str:
    """A short reason: 'No space left on device, 1.2 MiB free' rather than a long wrapped message."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = ""
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(where).free / 2**20:.1f} MiB free"
        return os.strerror(e.errno) + free
    return _os_reason(e)


def write_outputs(tables: dict[str, pd.DataFrame], out_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Write ``{file name: table}`` into ``out_dir`` all together or not at all.

    Every table is written (and fsynced) into a fresh hidden staging folder inside ``out_dir``
    first; only when all succeeded are the old outputs (any of :data:`OUTPUT_NAMES`, including one
    this run does not write: it would be a left-over of an earlier run, mixed with this one) moved
    aside into the staging folder and the new ones renamed into place, then the staging folder is
    removed. A failure while writing (disk full, no permission) removes the staging folder and
    leaves ``out_dir`` exactly as it was; a failure during the renames (same directory, so only a
    vanished folder could cause it) puts the old files back. Raises :class:`OutputError`.

    Returns ``{"written": [...paths], "removed": [...paths of old outputs this run replaced by
    nothing]}``.
    """
    from arena_assets.core.artifacts import fsync_dir, make_dirs

    out = Path(out_dir)
    shown = _clip(out, 200)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {shown}: exists and is not a directory (give a folder for the parquet tables)")
    try:
        make_dirs(out)
        stage = out / f".validate-staging-{secrets.token_hex(4)}"
        stage.mkdir()
    except OSError as e:
        raise OutputError(f"--out {shown}: cannot create the folder ({_write_reason(e, out.parent)})") from None
    current = ""
    try:
        for fname, df in tables.items():
            current = fname
            write_table(df, stage / fname)  # temp file + fsync + rename inside the staging folder
        fsync_dir(stage)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(
            f"--out {shown}: cannot write {current} ({_write_reason(e, out)}); nothing was changed in {shown}"
        ) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    moved: list[str] = []
    placed: list[str] = []
    try:
        for fname in OUTPUT_NAMES:
            if os.path.lexists(out / fname):
                os.replace(out / fname, stage / f"{fname}.old")
                moved.append(fname)
        for fname in tables:
            os.replace(stage / fname, out / fname)
            placed.append(fname)
    except OSError as e:
        for fname in placed:
            with contextlib.suppress(OSError):
                os.replace(out / fname, stage / fname)
        for fname in moved:
            with contextlib.suppress(OSError):
                os.replace(stage / f"{fname}.old", out / fname)
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(f"--out {shown}: cannot move the new tables into place ({_os_reason(e)}); the old ones were restored") from None
    shutil.rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_dir(out)
    return {
        "written": [str(out / f) for f in tables],
        "removed": [str(out / f) for f in moved if f not in tables],
    }


def validate_files(
    train: str | os.PathLike[str] | None,
    test: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    external: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Validate train (and test, external; any one of them alone too, e.g. a new test file before
    a submission); return their summaries. Raises ContractError on the first problem (OutputError
    when ``out_dir`` cannot be written).

    Checks across files: the test file must not be the train file nor share its ids
    (:func:`check_train_test`). Warnings (e.g. label columns in the test file) are returned in
    ``result["warnings"]``.

    With ``out_dir``, the normalized tables are written there (``train.parquet``, ``test.parquet``,
    ``external.parquet``) only after EVERY file validated, and all together
    (:func:`write_outputs`): a failed validation or a failed write changes nothing there.
    """
    if train is None and test is None and external is None:
        raise ValueError("validate_files: no file given (train, test or external)")
    tables: dict[str, pd.DataFrame] = {}
    result: dict[str, Any] = {}
    warnings: list[str] = []
    tr = None
    if train is not None:
        tr = read_train(train)
        result["train"] = summarize(tr)
        warnings += tr.attrs.get("warnings", [])
        tables["train.parquet"] = tr
    if test is not None:
        te = read_test(test)
        warnings += te.attrs.get("warnings", [])
        if tr is not None and train is not None:  # the cross-file check needs both files
            check_train_test(train, test, tr, te)
            result["train_test_id_overlap"] = 0
        result["test"] = summarize(te)
        tables["test.parquet"] = te
    if external is not None:
        ext = read_external(external)
        warnings += ext.attrs.get("warnings", [])
        result["external"] = summarize(ext)
        tables["external.parquet"] = ext
    result["warnings"] = warnings
    if out_dir is not None:
        done = write_outputs(tables, out_dir)
        result["written"] = done["written"]
        if done["removed"]:
            result["removed"] = done["removed"]
    return result
