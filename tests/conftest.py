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
