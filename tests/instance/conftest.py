"""Instance tests: the same checks on the single-user SQLite instance and the team's PostgreSQL
instance (``storage`` fixture, parametrized; the Postgres case is marked ``postgres``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import postgres_storage


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    """(name, harness storage block): SQLite under the harness home, or a fresh Postgres database."""
    if request.param == "sqlite":
        return "sqlite", None
    return "postgres", postgres_storage(request.getfixturevalue("pg_database"))
