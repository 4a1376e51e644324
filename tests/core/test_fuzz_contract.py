"""Fuzz the data contract: whatever the bytes, a reader returns a writable table or raises ONE
short ContractError line naming the file, never anything else (issue 16).

Four generators (hypothesis): raw bytes; CSV files built from header/cell fragments that are
known to be hard (deep brackets, JSON strings, huge numbers, surrogate escapes, quotes, newlines,
NUL); JSON Lines built from arbitrary JSON values under the contract's keys; and byte-level
mutations (insert/replace/delete) of a valid file. Every example goes through ``read_train``,
``read_test`` and ``read_external`` (csv, jsonl, parquet names), a valid result must write to
parquet, and some go through ``arena-assets validate`` in-process (exit 0 or 2, one stderr line).

Budget: about 30 s on 2 shared cores (bounded ``max_examples``, ``deadline=None``). In CI
(``CI`` set) the examples are derandomized so a run is reproducible; locally they vary.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arena_assets.cli import main
from arena_assets.core import contract
from arena_assets.core.contract import ContractError

MAX_MESSAGE_CHARS = getattr(contract, "MAX_MESSAGE_CHARS", 500)

FUZZ = settings(
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

COLUMNS = ["", "id", "prompt", "response_a", "response_b", "model_a", "model_b", "winner_model_a", "winner_model_b",
           "winner_tie", "winner_model_a_prob", "winner_model_b_prob", "winner_tie_prob", "winner", "chosen",
           "rejected", "conversation_a", "conversation_b", "question_id", "source", "id.1", "Unnamed: 0"]
CELLS = ["", " ", "1", "0", "0.5", "-1", "2", "nan", "inf", "-inf", "1e400", "9" * 5000, "0x1", "1_0", "True",
         "model_a", "model_b", "tie", "tie (bothbad)", "TIE ", "[]", "[null]", '["a"]', '["a", null, "b"]', "[1]",
         '[["x"]]', '[{"role": "user", "content": "q"}]',
         '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]',
         '[{"role": "x", "content": 1}]', '[{"role": "assistant", "content": ["list"]}]', "{}", '{"a": 1}', "[" * 3000,
         "[" * 100_000, "{" * 3000, '"hello"', '"a" and "b"', '"unterminated', '["\\ud800"]', '["\\ud83d\\ude00"]',
         '["bad \\x escape"]', '["a"] trailing', "caf\u00e9", "\u6570\u636e", "\x00", "a\nb", "a\r\nb", '"', '""', ",",
         "null", "true", "{" + '"k": ' * 50 + "1" + "}" * 50, "w" * 3000]


def check_message(msg: str, name: str) -> None:
    assert "\n" not in msg and "\r" not in msg, msg[:300]
    assert len(msg) <= MAX_MESSAGE_CHARS, len(msg)
    assert msg.startswith(name), (name, msg[:300])


def read_all_ways(data: bytes, names: tuple[str, ...] = ("train.csv", "test.csv", "ext.csv", "ext.jsonl", "ext.parquet")) -> None:
    """The property, for each reader and file name."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        for name in names:
            p = Path(d) / name
            p.write_bytes(data)
            reader = {"train.csv": contract.read_train, "test.csv": contract.read_test}.get(name, contract.read_external)
            try:
                df = reader(p)
            except ContractError as e:
                check_message(str(e), name)
                continue
            assert len(df) > 0
            contract.write_table(df, Path(d) / "out.parquet")  # a valid table must be writable (no surrogates)


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def csv_text(header: list[str], rows: list[list[str]], quoted: bool) -> str:
    if not quoted:  # raw join: quotes, commas and newlines inside cells make malformed CSV
        return "\n".join(",".join(r) for r in [header, *rows]) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


cell = st.one_of(st.sampled_from(CELLS), st.text(max_size=40))


@settings(FUZZ, max_examples=120)
@given(data=st.binary(max_size=3000))
def test_fuzz_raw_bytes(data: bytes) -> None:
    read_all_ways(data)


LABEL_FORMS = {
    "plain": ["winner_model_a", "winner_model_b", "winner_tie"],
    "prob": ["winner_model_a_prob", "winner_model_b_prob", "winner_tie_prob"],
    "winner": ["winner"],
    "plain+winner": ["winner_model_a", "winner_model_b", "winner_tie", "winner"],
    "plain+prob": ["winner_model_a", "winner_model_b", "winner_tie",
                   "winner_model_a_prob", "winner_model_b_prob", "winner_tie_prob"],
    "none": [],
}


def valid_value(col: str, i: int, k: int) -> str:
    """A valid cell of data row i (class k) for column col."""
    if col in ("id", "question_id", ""):
        return str(i + 1)
    if col.startswith("winner_"):
        return "1" if col.removesuffix("_prob") == ["winner_model_a", "winner_model_b", "winner_tie"][k] else "0"
    if col == "winner":
        return ["model_a", "model_b", "tie"][k]
    if col in ("model_a", "model_b", "source"):
        return "m"
    return json.dumps([f"{col} {i}"])


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    """A mostly valid Kaggle-format file (so the readers get past the header and the labels)
    with a few cells, the header or the encoding spoiled."""
    header = ["id", "prompt", "response_a", "response_b", *LABEL_FORMS[draw(st.sampled_from(sorted(LABEL_FORMS)))]]
    if draw(st.booleans()):
        header.insert(0, "")  # pandas' unnamed index column
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):  # spoil the header now and then
        op = draw(st.sampled_from(["drop", "add", "dup"]))
        j = draw(st.integers(0, len(header) - 1))
        if op == "drop" and len(header) > 1:
            header.pop(j)
        elif op == "add":
            header.insert(j, draw(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=12))))
        else:
            header.append(header[j])
    n = draw(st.integers(1, 4))
    rows = []
    for i in range(n):
        k = draw(st.integers(0, 2))
        row = [valid_value(c, i, k) for c in header]
        for _ in range(draw(st.integers(0, 2))):  # spoil a cell, a text cell more often than not
            texts = [j for j, c in enumerate(header) if c in ("prompt", "response_a", "response_b")]
            j = draw(st.sampled_from(texts)) if texts and draw(st.booleans()) else draw(st.integers(0, len(row) - 1))
            row[j] = draw(cell)
        if draw(st.integers(0, 9)) == 0:
            row = row[: draw(st.integers(0, len(row)))] if draw(st.booleans()) else [*row, draw(cell)]
        rows.append(row)
    text = csv_text(header, rows, quoted=draw(st.integers(0, 4)) > 0)
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["latin-1", "utf-8-sig", "utf-16"]))
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


@settings(FUZZ, max_examples=250)
@given(data=csv_files())
def test_fuzz_csv(data: bytes) -> None:
    read_all_ways(data, ("train.csv", "test.csv", "ext.csv"))


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.sampled_from(CELLS), st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), inner, max_size=3),
    max_leaves=12,
)
MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
TEMPLATES = [
    {"prompt": "p", "chosen": "c", "rejected": "r"},
    {"chosen": MSGS, "rejected": [MSGS[0], {"role": "assistant", "content": None}]},
    {"conversation_a": MSGS, "conversation_b": MSGS, "winner": "tie", "model_a": "x", "model_b": "y"},
    {"prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]', "winner": "model_b"},
    {"prompt": ["p"], "response_a": ["a"], "response_b": ["b"], "winner_model_a": 0.2, "winner_model_b": 0.5,
     "winner_tie": 0.3},
]


@st.composite
def ext_records(draw: st.DrawFn) -> list[dict]:
    """Valid external rows of each style with a few fields replaced, added or dropped."""
    out = []
    for i in range(draw(st.integers(1, 4))):
        r = {"id": f"r{i}", **draw(st.sampled_from(TEMPLATES))}
        for _ in range(draw(st.integers(0, 3))):
            op = draw(st.sampled_from(["set", "set", "drop"]))
            key = draw(st.sampled_from(sorted(set(r) | {c for c in COLUMNS if c})))
            if op == "drop":
                r.pop(key, None)
            else:
                r[key] = draw(json_value)
        out.append(r)
    return out


@settings(FUZZ, max_examples=200)
@given(
    records=st.one_of(
        ext_records(),
        st.lists(st.dictionaries(st.sampled_from([c for c in COLUMNS if c]), json_value, max_size=8), min_size=1, max_size=4),
    ),
    junk=st.lists(st.sampled_from(["", "[", "{", "[1, 2]", '"x"', "\xff", "{" * 2000, "1" * 5000, "NaN"]), max_size=2),
)
def test_fuzz_external(records: list[dict], junk: list[str]) -> None:
    lines = [json.dumps(r, allow_nan=True) for r in records] + junk
    data = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    read_all_ways(data, ("ext.jsonl",))
    read_all_ways(parquet_bytes(records), ("ext.parquet",))  # the same records, typed, as parquet


def parquet_bytes(records: list[dict]) -> bytes:
    """The records as a parquet file; a column arrow cannot type (mixed values) is stored as JSON
    text, so every example yields a readable file with list, struct, binary or numeric columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({k for r in records for k in r})
    arrays = []
    for k in names:
        values = [r.get(k) for r in records]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            arrays.append(pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string()))
    table = pa.Table.from_arrays(arrays, names=names) if names else pa.table({"x": [None] * len(records)})
    buf = io.BytesIO()
    try:
        pq.write_table(table, buf)
    except pa.ArrowException:  # e.g. an empty struct: parquet cannot hold it; all columns as text
        as_text = [pa.array([None if r.get(k) is None else json.dumps(r.get(k)) for r in records], type=pa.string())
                   for k in names]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_arrays(as_text, names=names), buf)
    return buf.getvalue()


GOOD = (
    b"id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"
    b'1,"[""q1""]","[""a""]","[""b""]",1,0,0\n'
    b'2,"[""q2"", null]","[""multi\nline""]","[""b""]",0,1,0\n'
    b'3,"[""\\ud83d\\ude00""]","[""a""]","[""b""]",0,0,1\n'
)


@settings(FUZZ, max_examples=150)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(GOOD)), st.sampled_from(["insert", "replace", "delete"]),
                  st.sampled_from([b'"', b"\n", b",", b"[", b"]", b"\xff", b"\x00", b"\xe9", b"\\", b"\r", b"x", b"9"])),
        min_size=1, max_size=4,
    )
)
def test_fuzz_mutated_valid_file(edits: list[tuple[int, str, bytes]]) -> None:
    data = bytearray(GOOD)
    for pos, op, b in edits:
        pos = min(pos, len(data))
        if op == "insert":
            data[pos:pos] = b
        elif op == "replace":
            data[pos : pos + 1] = b
        else:
            del data[pos : pos + 1]
    read_all_ways(bytes(data), ("train.csv", "test.csv", "ext.csv"))
    with tempfile.TemporaryDirectory(prefix="fuzz-cli-") as d:
        p = Path(d) / "train.csv"
        p.write_bytes(bytes(data))
        rc, err = run_cli(["validate", "--train", str(p), "--out", str(Path(d) / "out")])
        assert rc in (0, 2), err
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: train.csv"), err[:500]
            assert not (Path(d) / "out").exists()  # a failed validation writes nothing
        else:
            assert sorted(x.name for x in (Path(d) / "out").iterdir()) == ["train.parquet"]


def test_valid_file_is_valid() -> None:
    """The mutation seed itself reads (else the mutations test nothing)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "train.csv"
        p.write_bytes(GOOD)
        df = contract.read_train(p)
    assert df["response_a"].tolist()[1] == ["multi\nline"] and len(df) == 3
