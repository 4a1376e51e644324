"""``arena-assets validate --test FILE`` alone (issue 18): a new test file is checked without its
train file (before, ``--train`` was required and argparse exited 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arena_assets.core.contract import ContractError, validate_files

BIN = Path(sys.executable).parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "arena-assets"), "validate", *args], capture_output=True, text=True, timeout=120, check=False)


def test_test_file_alone(sample_dir: Path, tmp_path: Path) -> None:
    r = _cli("--test", str(sample_dir / "test.csv"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"test {sample_dir / 'test.csv'}: 120 rows"
    assert "OK: valid" in r.stdout and "train" not in r.stdout
    r = _cli("--test", str(sample_dir / "test.csv"), "--json", "--out", str(tmp_path / "out"))
    res = json.loads(r.stdout)
    assert set(res) >= {"test", "warnings", "written"} and "train" not in res and res["test"]["rows"] == 120
    assert [Path(p).name for p in res["written"]] == ["test.parquet"]


def test_test_file_alone_still_fails_on_a_bad_row(sample_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "test.csv"
    lines = (sample_dir / "test.csv").read_text().splitlines(keepends=True)
    bad.write_text(lines[0] + lines[1] + lines[1])  # the same id twice
    r = _cli("--test", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "id" in r.stderr, r.stderr
    with pytest.raises(ContractError):
        validate_files(None, bad)


def test_nothing_to_validate_is_one_line_exit_2() -> None:
    r = _cli()
    assert r.returncode == 2 and r.stderr.strip() == "error: validate: give at least one of --train, --test, --external"
