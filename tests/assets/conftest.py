"""Fixtures of the code-location tests: the one session-wide pipeline materialization."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.pipeline_fixture` is shared with tests/ui
    sys.path.insert(0, str(REPO))

from tests.pipeline_fixture import pipeline  # noqa: E402,F401
