"""Fixtures of the UI tests: the session's materialized pipeline served by ``dagster dev``, a browser.

The UI tests reuse the one pipeline materialization of the test session (``tests/pipeline_fixture``,
the same instance, DAGSTER_HOME and artifact root the asset tests assert on) and start
``dagster dev`` (webserver + daemon, 127.0.0.1, a free port) on it once per module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_fixture import PipelineSession  # `pipeline` itself comes from tests/conftest.py
from tests.ui import harness

SCREENSHOT_ENV = "ARENA_SCREENSHOT_DIR"
SESSION_ENV = "ARENA_UI_SESSION"


def load_session(root: Path) -> PipelineSession:
    """A session folder already materialized by ``write_session_files`` + ``materialize_pipeline``."""
    from dagster import DagsterInstance

    from arena_assets.definitions import build_definitions

    settings_path = root / "arena.yaml"
    if not (root / "dagster_home" / "dagster.yaml").exists() or not settings_path.exists():
        raise FileNotFoundError(f"{root} is not a materialized session (arena.yaml, dagster_home/)")
    return PipelineSession(root=root, settings_path=settings_path, dagster_home=root / "dagster_home",
                           artifacts=root / "artifacts",
                           instance=DagsterInstance.from_config(str(root / "dagster_home")),
                           defs=build_definitions(str(settings_path)), run=None)


@pytest.fixture(scope="session")
def ui_session(request: pytest.FixtureRequest) -> PipelineSession:
    """The session's pipeline (shared with tests/assets), or ``$ARENA_UI_SESSION``'s folder.

    The override lets scripts/screenshots.py (and a developer) rerun the UI tests against a
    session materialized once, without paying for the pipeline again.
    """
    reuse = os.environ.get(SESSION_ENV)
    if reuse:
        return load_session(Path(reuse))
    return request.getfixturevalue("pipeline")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without Debian's chromium, UI tests skip with the reason; never in CI (CI=true), where
    scripts/test.sh installs it and a missing browser must fail the run, not hide it."""
    if Path(harness.CHROMIUM).exists() or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason=f"{harness.CHROMIUM} missing: apt-get install -y chromium")
    for item in items:
        if "ui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def screenshot_dir(ui_session: PipelineSession) -> Path:
    """Where the tests save their screenshots: ``$ARENA_SCREENSHOT_DIR`` (the README's docs/img
    via scripts/screenshots.py) or a folder of the test session."""
    d = Path(os.environ.get(SCREENSHOT_ENV) or (ui_session.root / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def dagster_ui(ui_session: PipelineSession) -> Iterator[harness.DagsterDev]:
    """``dagster dev`` on the session's instance; stopped (whole process group) afterwards."""
    dev = harness.start_dagster_dev(ui_session.dagster_home, ui_session.settings_path,
                                    ui_session.root / "dagster_dev.log")
    try:
        yield dev
    finally:
        rc = harness.stop_dagster_dev(dev)
        assert not harness._group_alive(dev.proc.pid), f"dagster dev left processes behind (exit {rc})"


@pytest.fixture(scope="module")
def browser(dagster_ui: harness.DagsterDev) -> Iterator[Any]:
    with harness.chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any, dagster_ui: harness.DagsterDev, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page; on failure a screenshot and the server log tail go to the report."""
    pg = harness.new_page(browser)
    try:
        yield pg
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            out = Path(dagster_ui.log_path).parent / f"failure-{request.node.name}.png"
            try:
                harness.screenshot(pg, out, full_page=True)
                print(f"failure screenshot: {out}\n--- dagster dev log tail ---\n{dagster_ui.log_tail()}")
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                print(f"no failure screenshot: {exc}")
        pg.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
