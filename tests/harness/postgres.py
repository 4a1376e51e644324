"""PostgreSQL for the instance tests: the server ``scripts/postgres-up.sh`` starts (``.ci/run``
does), its URL in ``$ARENA_TEST_PG_URL`` (scripts/test.sh exports it).

Each Dagster instance gets a database of its own (``fresh_database``: created from the test
role's URL, dropped afterwards), so tests never see each other's runs. Without a server the
postgres-marked tests skip, except under ``CI=true``, where they fail (like the Slurm tests).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

PG_URL_ENV = "ARENA_TEST_PG_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pg_url_or_skip() -> str:
    """The test server's URL, after a real login; skip (fail under CI) when there is none."""
    import pytest

    url = os.environ.get(PG_URL_ENV, "")
    why = ""
    if not url:
        why = f"${PG_URL_ENV} is not set (run: sudo bash scripts/postgres-up.sh; export {PG_URL_ENV}=<its URL>)"
    else:
        try:
            import psycopg2

            psycopg2.connect(url, connect_timeout=10).close()
        except Exception as e:  # noqa: BLE001 -- any failure to log in means: no usable server
            why = f"cannot connect to {PG_URL_ENV}: {type(e).__name__}: {str(e).strip()[:300]}"
    if why:
        if _in_ci():
            pytest.fail(f"CI: PostgreSQL must be up for the postgres tests: {why}")
        pytest.skip(why)
    return url


def sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` -> ``postgresql+psycopg2://...``: SQLAlchemy 2.1 maps a bare
    ``postgresql://`` to psycopg 3, which dagster-postgres does not install (it brings
    psycopg2-binary). The team's DAGSTER_PG_URL names the driver the same way (docs/team.md)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def libpq_url(url: str) -> str:
    """The inverse, for psycopg2.connect / psql: the driver part removed."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def with_database(url: str, db: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + db))


@contextmanager
def fresh_database(url: str, prefix: str = "arena_t") -> Iterator[str]:
    """A new, empty database on the server of ``url`` (the role needs CREATEDB); yields its URL
    and drops it (terminating leftover connections) at the end."""
    import psycopg2

    db = f"{prefix}_{uuid.uuid4().hex[:12]}"

    def admin(sql: str) -> None:
        conn = psycopg2.connect(url, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    admin(f'CREATE DATABASE "{db}"')
    try:
        yield with_database(url, db)
    finally:
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' "
              "AND pid <> pg_backend_pid()")
        admin(f'DROP DATABASE IF EXISTS "{db}"')
