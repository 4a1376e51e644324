"""Shared fixtures (kept small): offline Hugging Face, the known-answer sample, the real rows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pipeline_fixture import pipeline  # noqa: F401  (one session-wide materialization for tests/assets and tests/ui)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REAL_SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena-real-sample"


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small known-answer sample (train 400, test 120, external 400 rows; seed 7), made once."""
    from arena_assets.core.sample import make_sample

    d = tmp_path_factory.mktemp("sample")
    make_sample(d, train_rows=400, test_rows=120, external_rows=400, seed=7)
    return d


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """``../shared/data/arena-real-sample`` (real competition rows; never copied into the repo)."""
    if not (REAL_SAMPLE_DIR / "train_sample.csv").exists():
        pytest.skip(f"real sample not present at {REAL_SAMPLE_DIR}")
    return REAL_SAMPLE_DIR


# --- PostgreSQL (issue 18, the team instance): the server scripts/postgres-up.sh starts; its URL
# in $ARENA_TEST_PG_URL. Tests marked `postgres` skip without it, and fail under CI=true.
@pytest.fixture(scope="session")
def pg_url() -> str:
    from tests.harness.postgres import pg_url_or_skip

    return pg_url_or_skip()


@pytest.fixture
def pg_database(pg_url: str):  # type: ignore[no-untyped-def]
    """A fresh, empty database on the test server (dropped after the test); yields its URL."""
    from tests.harness.postgres import fresh_database

    with fresh_database(pg_url) as url:
        yield url


# --- evidence lines for the CI log (issue 18): what the instance tests saw (storage, runs, the
# daemon's tick), printed in pytest's terminal summary even under -q.
_EVIDENCE: list[str] = []


@pytest.fixture
def ci_evidence(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``ci_evidence("...")`` adds a line to the run's "evidence" summary section."""
    return lambda line: _EVIDENCE.append(f"{request.node.nodeid}: {line}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _EVIDENCE:
        terminalreporter.section("evidence (instance tests)")
        for line in _EVIDENCE:
            terminalreporter.write_line(line)
