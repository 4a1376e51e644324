"""Issue 16 (first half): every wrong file gets one clear error line, exit 2, never a traceback.

One test (or a few) per probe finding: tracebacks (deep nesting, a directory, an unreadable file,
a bad ``--out``, a full disk, a settings file with a python tag), errors that named no
file/row/column (Latin-1 JSONL, a non-numeric external label, gzip/parquet named .csv, a
100k-column header) and inputs accepted silently (conflicting label forms, a JSON string cell,
label columns in a test file, a test file equal to the train file). The fuzz test
(``test_fuzz_contract.py``) covers "whatever the bytes".
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import stat
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from arena_assets.cli import main
from arena_assets.core import contract
from arena_assets.core.contract import (
    ContractError,
    read_external,
    read_test,
    read_train,
    validate_files,
)

HEADER = "id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"
TEST_HEADER = "id,prompt,response_a,response_b\n"
MAX_LINE = 600  # every error line stays short


def cell(turns: list[str | None]) -> str:
    return '"' + json.dumps(turns).replace('"', '""') + '"'


def line(i: int | str, a: float = 1, b: float = 0, t: float = 0, prompt: str | None = None) -> str:
    return f"{i},{prompt if prompt is not None else cell(['q' + str(i)])},{cell(['ra'])},{cell(['rb'])},{a},{b},{t}\n"


def rows(n: int, start: int = 1) -> str:
    return "".join(line(start + k, *[(1, 0, 0), (0, 1, 0), (0, 0, 1)][k % 3]) for k in range(n))


def tst_rows(n: int, start: int = 1001) -> str:
    return "".join(f"{start + k},{cell(['p'])},{cell(['a'])},{cell(['b'])}\n" for k in range(n))


def put(tmp_path: Path, name: str, data: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(data, str):
        p.write_text(data, encoding="utf-8")
    else:
        p.write_bytes(data)
    return p


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(err: str) -> str:
    """stderr holds exactly one short 'error: ...' line (and no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert len(lines[0]) <= MAX_LINE, len(lines[0])
    return lines[0]


# ------------------------------------------------------------------------ tracebacks -> errors
def test_deeply_nested_cell_is_an_error_naming_row_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = '"' + "[" * 100_000 + '"'
    p = put(tmp_path, "train.csv", HEADER + rows(2) + line(3, prompt=deep))
    rc, _, err = cli(["validate", "--train", str(p)], capsys)
    msg = one_error(err)
    assert rc == 2
    assert "train.csv row 3 (id 3): prompt starts with '[' but nests lists too deeply" in msg


def test_deeply_nested_external_json_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = json.dumps({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"})
    p = put(tmp_path, "ext.jsonl", ok + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(ContractError, match=r"ext.jsonl row 2: not valid JSON \(RecursionError"):
        read_external(p)
    p2 = put(tmp_path, "ext2.jsonl", ok + "\n" + json.dumps({"id": "b", "prompt": "p", "chosen": "[" * 100_000, "rejected": "r"}) + "\n")
    with pytest.raises(ContractError, match=r"ext2.jsonl row 2 \(id b\): chosen starts with '\[' but cannot be decoded"):
        read_external(p2)
    train = put(tmp_path, "train.csv", HEADER + rows(3))
    rc, _, err = cli(["validate", "--train", str(train), "--external", str(p)], capsys)
    assert rc == 2 and "ext.jsonl row 2" in one_error(err)


@pytest.mark.parametrize("flag", ["--train", "--test", "--external"])
def test_directory_as_input(tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    train = put(tmp_path, "train.csv", HEADER + rows(3))
    d = tmp_path / "adir.csv"
    d.mkdir()
    argv = ["validate", "--train", str(train), flag, str(d)] if flag != "--train" else ["validate", "--train", str(d)]
    rc, _, err = cli(argv, capsys)
    assert rc == 2
    assert "adir.csv: is a directory, expected a" in one_error(err)


def test_fifo_is_refused_without_blocking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)  # opening it for reading would block forever
    rc, _, err = cli(["validate", "--train", str(fifo)], capsys)
    assert rc == 2
    assert "train.csv: is not a regular file (a FIFO, socket or device)" in one_error(err)


def test_unreadable_file_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Tests run as root (permissions do not apply): make ``open`` refuse like a 0o000 file."""
    import builtins

    p = put(tmp_path, "train.csv", HEADER + rows(3))
    real_open = builtins.open

    def refusing_open(file, *a, **k):  # type: ignore[no-untyped-def]
        if str(file) == str(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", refusing_open)
    rc, _, err = cli(["validate", "--train", str(p)], capsys)
    assert rc == 2
    assert "train.csv: cannot read it (Permission denied)" in one_error(err)


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to drop to another user")
def test_unreadable_file_as_another_user() -> None:
    """The real thing: a 0o000 file read by an unprivileged user. A forked child (modules already
    imported: the interpreter may sit in a folder the other user cannot reach) drops root and
    runs the CLI."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory(prefix="arena-unreadable-") as d:
        folder = Path(d)
        folder.chmod(0o755)  # the file itself is what must be unreadable, not its folder
        p = put(folder, "train.csv", HEADER + rows(3))
        p.chmod(0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = main(["validate", "--train", str(p)])
                os.write(w, json.dumps({"rc": rc, "err": err.getvalue()}).encode())
            except BaseException as e:  # noqa: BLE001
                os.write(w, json.dumps({"rc": -1, "err": repr(e)}).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            got = json.loads(f.read() or '{"rc": -1, "err": "no answer"}')
        os.waitpid(pid, 0)
    assert got["rc"] == 2, got
    assert "train.csv: cannot read it (Permission denied)" in one_error(got["err"])


def test_out_is_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = put(tmp_path, "train.csv", HEADER + rows(3))
    out = put(tmp_path, "out", "not a folder")
    rc, _, err = cli(["validate", "--train", str(train), "--out", str(out)], capsys)
    assert rc == 2
    assert "exists and is not a directory" in one_error(err)
    assert out.read_text() == "not a folder"
    rc, _, err = cli(["validate", "--train", str(train), "--out", str(out / "sub")], capsys)
    assert rc == 2 and "--out" in one_error(err)
    rc, _, err = cli(["make-sample", "--rows", "5", "--out", str(out)], capsys)
    assert rc == 2 and "exists and is not a directory" in one_error(err)


def _out_state(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_full_disk_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC on the second table (after part of it hit the disk): a clear error, and the output
    folder holds exactly the earlier run's files, byte for byte, and no temp file."""
    train = put(tmp_path, "train.csv", HEADER + rows(6))
    test = put(tmp_path, "test.csv", TEST_HEADER + tst_rows(3))
    ext = put(tmp_path, "ext.jsonl", json.dumps({"id": "u", "prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    out = tmp_path / "out"
    assert cli(["validate", "--train", str(train), "--test", str(test), "--out", str(out)], capsys)[0] == 0
    (out / "notes.txt").write_text("the user's own file")
    before = _out_state(out)

    real = contract.write_table
    calls = []

    def full_disk(df: pd.DataFrame, path: Path) -> Path:
        calls.append(Path(path).name)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(df, path)

    monkeypatch.setattr(contract, "write_table", full_disk)
    train2 = put(tmp_path, "train2.csv", HEADER + rows(9))
    rc, _, err = cli(["validate", "--train", str(train2), "--test", str(test), "--external", str(ext), "--out", str(out)], capsys)
    assert rc == 2
    msg = one_error(err)
    assert "cannot write test.parquet (No space left on device, " in msg and "MiB free); nothing was changed" in msg
    assert _out_state(out) == before  # same names, same bytes: no staging folder, no partial file


def test_real_full_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same on a real 2 MiB tmpfs: the small earlier run stays, byte for byte."""
    import base64
    import shutil

    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (needs root or CAP_SYS_ADMIN): {(r.stderr or r.stdout).strip()}")
    try:
        out = disk / "out"
        small = put(tmp_path, "train.csv", HEADER + rows(3))
        assert cli(["validate", "--train", str(small), "--out", str(out)], capsys)[0] == 0
        before = _out_state(out)
        noise = [base64.b64encode(os.urandom(30_000)).decode() for _ in range(100)]  # ~4 MB, incompressible
        big = put(tmp_path, "big.csv", HEADER + "".join(line(i + 1, prompt=cell([noise[i]])) for i in range(100)))
        rc, _, err = cli(["validate", "--train", str(big), "--out", str(out)], capsys)
        assert rc == 2
        assert "cannot write train.parquet (No space left on device" in one_error(err)
        assert _out_state(out) == before
        assert shutil.disk_usage(disk).free > 1.5 * 2**20  # the partial file was removed
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_out_never_mixes_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run without --test after one with it must not leave the old test.parquet next to the new
    train.parquet: it is removed (and said so); other files in the folder are left alone."""
    train = put(tmp_path, "train.csv", HEADER + rows(6))
    test = put(tmp_path, "test.csv", TEST_HEADER + tst_rows(3))
    out = tmp_path / "out"
    assert cli(["validate", "--train", str(train), "--test", str(test), "--out", str(out)], capsys)[0] == 0
    (out / "notes.txt").write_text("keep me")
    train2 = put(tmp_path, "train2.csv", HEADER + rows(9))
    rc, text, _ = cli(["validate", "--train", str(train2), "--out", str(out)], capsys)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.parquet"]
    assert "removed " + str(out / "test.parquet") in text
    assert len(contract.read_table(out / "train.parquet")) == 9


def test_failed_rename_restores_old_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = put(tmp_path, "train.csv", HEADER + rows(6))
    test = put(tmp_path, "test.csv", TEST_HEADER + tst_rows(3))
    out = tmp_path / "out"
    validate_files(train, test, out_dir=out)
    before = _out_state(out)
    real_replace = os.replace
    n = {"calls": 0}

    def flaky_replace(a, b):  # type: ignore[no-untyped-def]
        n["calls"] += 1
        if n["calls"] == 4:  # after moving both old files aside and the first new one in
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", flaky_replace)
    monkeypatch.setattr(contract.os, "replace", flaky_replace)
    with pytest.raises(contract.OutputError, match="the old ones were restored"):
        validate_files(train, test, out_dir=out)
    monkeypatch.undo()
    assert _out_state(out) == before


def test_settings_with_python_tag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from arena_assets.core.settings import load_settings

    marker = tmp_path / "ran"
    bad = put(tmp_path, "arena.yaml", f"seed: 1\nfolds: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError) as ei:
        load_settings(bad)
    msg = str(ei.value)
    assert type(ei.value) is ValueError and "\n" not in msg and len(msg) < MAX_LINE
    assert f"settings file {bad} line 2" in msg and "python/object/apply:os.system" in msg
    assert "never run" in msg and not marker.exists()
    for text in ("a: [1, 2\n", "a: b: c\n", "\tx: 1\n"):
        with pytest.raises(ValueError, match=r"settings file .* not valid YAML") as ei:
            load_settings(put(tmp_path, "s.yaml", text))
        assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match=r"not valid TOML"):
        load_settings(put(tmp_path, "s.toml", "a = [\n"))
    with pytest.raises(ValueError, match=r"not valid UTF-8"):
        load_settings(put(tmp_path, "latin.yaml", b"seed: 1\n# caf\xe9\n"))
    d = tmp_path / "dir.yaml"
    d.mkdir()
    with pytest.raises(ValueError, match=r"cannot read it"):
        load_settings(d)


# ------------------------------------------------------------------------ errors that named nothing
def test_latin1_jsonl_names_row_line_and_byte(tmp_path: Path) -> None:
    good = json.dumps({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}).encode()
    bad = '{"id": "b", "prompt": "caf\u00e9", "chosen": "c", "rejected": "r"}'.encode("latin-1")
    p = put(tmp_path, "ext.jsonl", good + b"\n\n" + bad + b"\n")
    with pytest.raises(ContractError) as ei:
        read_external(p)
    assert str(ei.value) == "ext.jsonl row 2 (line 3): not valid UTF-8 at byte 27 of the line (save the file as UTF-8)"


@pytest.mark.parametrize("value, shown", [("abc", "'abc'"), ([1], "[1]"), (10**400, "is not a number")])
def test_external_non_numeric_label_names_column(tmp_path: Path, value: object, shown: str) -> None:
    row = {"id": "k1", "prompt": "p", "response_a": "a", "response_b": "b",
           "winner_model_a": value, "winner_model_b": 0, "winner_tie": 0}
    p = put(tmp_path, "ext.jsonl", json.dumps(row) + "\n")
    with pytest.raises(ContractError) as ei:
        read_external(p)
    msg = str(ei.value)
    assert msg.startswith("ext.jsonl row 1 (id k1): winner_model_a = ") and shown in msg and "is not a number" in msg
    assert len(msg) < MAX_LINE


def test_external_csv_non_numeric_label(tmp_path: Path) -> None:
    p = put(tmp_path, "ext.csv", HEADER + rows(1) + line(2, "x", 0, 0))  # type: ignore[arg-type]
    with pytest.raises(ContractError, match=r"^ext.csv row 2 \(id 2\): winner_model_a = 'x' is not a number$"):
        read_external(p)


@pytest.mark.parametrize(
    "content, what",
    [
        (gzip.compress((HEADER + rows(3)).encode()), "is gzip-compressed (decompress it first: gunzip)"),
        (b"PAR1\x15\x04\x15\x10" + b"\x00" * 40, "is a parquet file"),
        (b"PK\x03\x04" + b"\x00" * 40, "is a zip archive"),
        ("\ufeff".encode("utf-16-le") + HEADER.encode("utf-16-le"), "is UTF-16/32 text (save it as UTF-8)"),
    ],
)
def test_compressed_or_binary_named_csv(tmp_path: Path, content: bytes, what: str) -> None:
    p = put(tmp_path, "train.csv", content)
    with pytest.raises(ContractError) as ei:
        read_train(p)
    assert str(ei.value).startswith("train.csv: " + what) and "not valid UTF-8" not in str(ei.value)


def test_not_utf8_names_row_and_line(tmp_path: Path) -> None:
    multi = '"[""line one\nline two""]"'  # a raw newline inside the quoted cell
    data = (HEADER + rows(2) + line(3, prompt=multi)).encode() + b'4,"[""caf\xe9""]","[""a""]","[""b""]",1,0,0\n'
    with pytest.raises(ContractError) as ei:
        read_train(put(tmp_path, "train.csv", data))
    assert str(ei.value).startswith("train.csv row 4 (line 6): not valid UTF-8 at byte ")


def test_hundred_thousand_columns_short_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = ",".join(f"column_{i}" for i in range(100_000))
    p = put(tmp_path, "train.csv", header + "\n" + ",".join("1" for _ in range(100_000)) + "\n")
    rc, _, err = cli(["validate", "--train", str(p)], capsys)
    msg = one_error(err)
    assert rc == 2 and len(msg) < 400
    assert "train.csv: missing column 'id' (found: column_0, column_1" in msg and "(100000 in all)" in msg


def test_long_values_are_clipped(tmp_path: Path) -> None:
    huge = "w" * 50_000
    p = put(tmp_path, "train.csv", "id,prompt,response_a,response_b,winner\n" + f"{huge},a,b,c,{huge}\n")
    with pytest.raises(ContractError) as ei:
        read_train(p)
    msg = str(ei.value)
    assert len(msg) < 300 and "winner = 'wwww" in msg and "(50000 chars)" in msg


def test_row_after_multiline_cell_names_its_line(tmp_path: Path) -> None:
    multi = '"[""a\nb\nc""]"'  # two raw newlines inside the quoted cell
    p = put(tmp_path, "train.csv", HEADER + line(1, prompt=multi) + "\n" + line(2) + line(3, 1, 1, 0))
    with pytest.raises(ContractError) as ei:
        read_train(p)
    assert str(ei.value).startswith("train.csv row 3 (line 7, id 3): winner_model_a+winner_model_b+winner_tie = 2")


# ------------------------------------------------------------------------ accepted silently -> errors / warnings
def test_one_hot_and_conflicting_winner_is_an_error(tmp_path: Path) -> None:
    header = HEADER.strip() + ",winner\n"
    good = "".join(line(i).strip() + ",model_a\n" for i in (1, 2))
    p = put(tmp_path, "train.csv", header + good + line(3).strip() + ",model_b\n")
    with pytest.raises(ContractError) as ei:
        read_train(p)
    assert str(ei.value) == (
        "train.csv row 3 (id 3): winner_model_a/winner_model_b/winner_tie = 1/0/0 but winner = 'model_b': "
        "two label forms disagree (1 rows); keep only one"
    )
    assert len(read_train(put(tmp_path, "ok.csv", header + good))) == 2  # agreeing forms are fine


def test_plain_and_prob_columns_disagreeing_is_an_error(tmp_path: Path) -> None:
    header = HEADER.strip() + ",winner_model_a_prob,winner_model_b_prob,winner_tie_prob\n"
    p = put(tmp_path, "train.csv", header + line(1).strip() + ",1,0,0\n" + line(2).strip() + ",0.7,0.2,0.1\n")
    with pytest.raises(ContractError) as ei:
        read_train(p)
    assert str(ei.value).startswith(
        "train.csv row 2 (id 2): winner_model_a = 1 but winner_model_a_prob = 0.7: two label forms disagree"
    )


def test_soft_labels_with_argmax_winner_are_fine(tmp_path: Path) -> None:
    header = "id,prompt,response_a,response_b,winner_model_a_prob,winner_model_b_prob,winner_tie_prob,winner\n"
    body = f"1,{cell(['p'])},{cell(['a'])},{cell(['b'])},0.2,0.5,0.3,model_b\n"
    assert read_train(put(tmp_path, "train.csv", header + body))["winner_model_b"].tolist() == [0.5]
    bad = f"1,{cell(['p'])},{cell(['a'])},{cell(['b'])},0.2,0.5,0.3,tie\n"
    with pytest.raises(ContractError, match="two label forms disagree"):
        read_train(put(tmp_path, "bad.csv", header + bad))


def test_partial_label_form_is_an_error(tmp_path: Path) -> None:
    p = put(tmp_path, "train.csv", HEADER.strip() + ",winner_tie_prob\n" + line(1).strip() + ",0\n")
    with pytest.raises(ContractError, match="train.csv: has label column winner_tie_prob but not winner_model_a_prob"):
        read_train(p)


def test_external_conflicting_label_forms(tmp_path: Path) -> None:
    row = {"id": "k", "prompt": "p", "response_a": "a", "response_b": "b", "winner": "model_a",
           "winner_model_a": 0, "winner_model_b": 1, "winner_tie": 0}
    p = put(tmp_path, "ext.jsonl", json.dumps(row) + "\n")
    with pytest.raises(ContractError, match=r"ext.jsonl row 1 \(id k\): .* but winner = 'model_a': two label forms disagree"):
        read_external(p)


@pytest.mark.parametrize("text", ['"hello"', ' "hello" ', '"say \\"hi\\""'])
def test_json_string_cell_is_an_error(tmp_path: Path, text: str) -> None:
    quoted = '"' + text.replace('"', '""') + '"'
    p = put(tmp_path, "train.csv", HEADER + rows(1) + line(2, prompt=quoted))
    with pytest.raises(ContractError) as ei:
        read_train(p)
    msg = str(ei.value)
    assert msg.startswith("train.csv row 2 (id 2): prompt is a JSON string (") and "expected a JSON list of turns" in msg


def test_plain_text_starting_with_a_quote_is_still_text(tmp_path: Path) -> None:
    quoted = '"' + '"Hi" she said, "bye"'.replace('"', '""') + '"'
    df = read_train(put(tmp_path, "train.csv", HEADER + line(1, prompt=quoted)))
    assert df.loc[0, "prompt"] == ['"Hi" she said, "bye"']


def test_test_file_with_labels_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A labelled hold-out is a legitimate test file: the labels are dropped, with a warning
    printed and recorded (not an error)."""
    train = put(tmp_path, "train.csv", HEADER + rows(3))
    test = put(tmp_path, "test.csv", HEADER + rows(2, start=101))
    res = validate_files(train, test)
    assert res["warnings"] and res["warnings"][0].startswith(
        "test.csv: has label columns (winner_model_a, winner_model_b, winner_tie)")
    assert read_test(test).attrs["warnings"] == res["warnings"]
    rc, out, err = cli(["validate", "--train", str(train), "--test", str(test), "--json"], capsys)
    assert rc == 0 and err.startswith("warning: test.csv: has label columns")
    assert json.loads(out)["warnings"] == res["warnings"]


def test_test_file_equal_to_train_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = put(tmp_path, "train.csv", HEADER + rows(4))
    rc, _, err = cli(["validate", "--train", str(train), "--test", str(train)], capsys)
    assert rc == 2 and "is the same file as the train file" in one_error(err)
    copy = put(tmp_path, "test.csv", train.read_text())
    rc, _, err = cli(["validate", "--train", str(train), "--test", str(copy)], capsys)
    msg = one_error(err)
    assert rc == 2
    assert msg.startswith("error: test.csv row 1 (id 1): id 1 is also a train id (train.csv row 1); 4 of 4")
    assert "is it a copy of the train file?" in msg


def test_test_sharing_some_train_ids_is_an_error(tmp_path: Path) -> None:
    train = put(tmp_path, "train.csv", HEADER + rows(4))
    test = put(tmp_path, "test.csv", TEST_HEADER + tst_rows(2) + tst_rows(1, start=3))
    with pytest.raises(ContractError, match=r"^test.csv row 3 \(id 3\): id 3 is also a train id \(train.csv row 3\); 1 of 3"):
        validate_files(train, test, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_external_surrogates_in_ids_and_models_are_replaced(tmp_path: Path) -> None:
    """A lone surrogate in an id/model/source (JSON escapes) must not crash the parquet writer."""
    row = {"id": "x\ud800", "model_a": "m\udfff", "source": "s\ud800", "prompt": ["p\ud800"], "chosen": "c", "rejected": "r"}
    p = put(tmp_path, "ext.jsonl", json.dumps(row) + "\n")
    df = read_external(p)
    assert df.loc[0, "id"] == "x\ufffd" and df.loc[0, "model_a"] == "m\ufffd" and df.loc[0, "prompt"] == ["p\ufffd"]
    contract.write_table(df, tmp_path / "e.parquet")


def test_blank_string_cell_in_external_csv(tmp_path: Path) -> None:
    """A whitespace-only cell used to reach s[0] of an empty string (IndexError); it is plain
    text, as in train.csv."""
    p = put(tmp_path, "ext.csv", "id,prompt,chosen,rejected\n1,p,   ,r\n")
    df = read_external(p)
    assert sorted([df.loc[0, "response_a"], df.loc[0, "response_b"]]) == [["   "], ["r"]]


def test_error_lines_never_contain_newlines(tmp_path: Path) -> None:
    p = put(tmp_path, "train.csv", 'id,prompt,response_a,response_b,winner\n"a\nb",x,y,z,"tie\nnot"\n')
    with pytest.raises(ContractError) as ei:
        read_train(p)
    assert "\n" not in str(ei.value) and "\\n" in str(ei.value)


def test_cli_internal_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    train = put(tmp_path, "train.csv", HEADER + rows(3))

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyError("a bug")

    monkeypatch.setattr(contract, "summarize", boom)
    rc, _, err = cli(["validate", "--train", str(train)], capsys)
    assert rc == 1 and "internal error while validating (KeyError" in one_error(err)


def test_mode_bits_unchanged(tmp_path: Path) -> None:
    """validate never changes its inputs (a sanity check for the tests above that chmod)."""
    p = put(tmp_path, "train.csv", HEADER + rows(2))
    mode = p.stat().st_mode
    read_train(p)
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(mode)
