"""The team setup (issue 18; docs/team.md): the shipped instance configs, ``arena-assets home``,
``dagster dev`` on the shipped config without the "will not be used" warning, the systemd units
(``systemd-analyze verify``), and the ``dg`` project (``dg check defs``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.ui.harness import DagsterDev, free_port, stop_dagster_dev  # plain helpers (no browser)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCAL = REPO / "deploy" / "local" / "dagster.yaml"
TEAM = REPO / "deploy" / "team" / "dagster.yaml"
SYSTEMD = REPO / "deploy" / "systemd"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ instance configs
def test_team_config_is_the_local_one_on_postgres() -> None:
    local, team = yaml.safe_load(LOCAL.read_text()), yaml.safe_load(TEAM.read_text())
    assert "storage" not in local  # SQLite under $DAGSTER_HOME
    assert team.pop("storage") == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    assert team == local  # the same queue, pools, run limits, monitoring and retries
    assert local["run_coordinator"] == {"module": "dagster", "class": "QueuedRunCoordinator"}
    # no instance config in the repository root: `dagster dev` there would say it "will not be used"
    assert not (REPO / "dagster.yaml").exists() and not (REPO / "dagster.yml").exists()


def test_arena_assets_home_installs_and_keeps_the_shipped_config(tmp_path: Path) -> None:
    home = tmp_path / "home"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "arena-assets"), "home", "--dagster-home", str(home), *args],
                              capture_output=True, text=True, env=_env(), timeout=60, check=False)

    r = run()
    assert r.returncode == 0 and f"DAGSTER_HOME={home}" in r.stdout and "created" in r.stderr, r.stderr
    assert (home / "dagster.yaml").read_bytes() == LOCAL.read_bytes()
    assert "current" in run().stderr
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # someone's edit: kept
    r = run("--team")
    assert r.returncode == 0 and "differs" in r.stderr
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
    r = run("--team", "--force")
    assert "replaced" in r.stderr and (home / "dagster.yaml").read_bytes() == TEAM.read_bytes()
    assert (home / "dagster.yaml.bak").read_text() == "telemetry:\n  enabled: false\n"


@pytest.mark.postgres
def test_team_config_opens_a_postgres_instance(tmp_path: Path, pg_database: str) -> None:
    from tests.harness.postgres import sqlalchemy_url

    home = tmp_path / "home"
    r = subprocess.run([str(BIN / "arena-assets"), "home", "--team", "--dagster-home", str(home)],
                       capture_output=True, text=True, env=_env(), timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    os.environ["DAGSTER_PG_URL"] = sqlalchemy_url(pg_database)
    try:
        with dg.DagsterInstance.from_config(str(home)) as inst:
            assert type(inst.run_storage).__name__ == "PostgresRunStorage"
            assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert type(inst.schedule_storage).__name__ == "PostgresScheduleStorage"
            assert type(inst.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert inst.get_concurrency_config().run_queue_config.max_concurrent_runs == 10
    finally:
        del os.environ["DAGSTER_PG_URL"]
    # and the CLI sees the same (what an operator runs on the login node)
    out = subprocess.run([str(BIN / "dagster"), "instance", "info"], capture_output=True, text=True, timeout=120,
                         env=_env(DAGSTER_HOME=str(home), DAGSTER_PG_URL=sqlalchemy_url(pg_database)), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run_storage: PostgresRunStorage" in out.stdout and "event_log_storage: PostgresEventLogStorage" in out.stdout


# ------------------------------------------------------------------------------ the README's dagster dev
def _readme_dev_line() -> str:
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()
             if ln.strip().startswith("DAGSTER_HOME=") and "dagster dev" in ln]
    assert lines, "the README's `DAGSTER_HOME=... dagster dev` line"
    return lines[0]


def test_readme_dagster_dev_loads_the_shipped_config_without_warning(tmp_path: Path) -> None:
    """The README's browse command, run from the repository root on a home that `arena-assets home`
    (or the demo) prepared: the webserver's instance is the shipped config, and Dagster does not
    warn that a dagster.yaml "will not be used"."""
    line = _readme_dev_line()
    m = re.match(r"DAGSTER_HOME=(\S+) (\S+) dev (.*)$", line)
    assert m, line
    assert m.group(1) == "$PWD/.arena/dagster_home" and m.group(2) == ".venv/bin/dagster", line
    home = tmp_path / "dagster_home"  # the README's home, moved out of the checkout for the test
    subprocess.run([str(BIN / "arena-assets"), "home", "--dagster-home", str(home)], check=True, env=_env(),
                   capture_output=True, timeout=60)
    port = free_port()
    args = [str(BIN / "dagster"), "dev", *m.group(3).split(), "-p", str(port)]
    log_path = tmp_path / "dev.log"
    env = _env(DAGSTER_HOME=str(home), ARENA_SETTINGS=str(REPO / "arena.yaml"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    dev = DagsterDev(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, dagster_home=home, env=env)
    try:
        deadline = time.time() + 240
        info, inst = None, {}
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"{dev.url}/graphql", method="POST",
                                             data=json.dumps({"query": "{ instance { info runQueuingSupported } }"}).encode(),
                                             headers={"Content-Type": "application/json"})
                inst = json.loads(urllib.request.urlopen(req, timeout=10).read())["data"]["instance"]
                info = inst["info"]
                break
            except Exception:  # noqa: BLE001 -- not up yet
                time.sleep(1)
        assert info, f"dagster dev did not answer:\n{log_path.read_text(errors='replace')[-3000:]}"
    finally:
        stop_dagster_dev(dev)
    log_text = log_path.read_text(errors="replace")
    assert "will not be used" not in log_text, log_text[-3000:]
    # the instance the UI serves is the shipped config (its run retries, queue limit, monitoring)
    shipped = yaml.safe_load(LOCAL.read_text())
    assert f"max_concurrent_runs: {shipped['concurrency']['runs']['max_concurrent_runs']}" in info, info
    assert inst["runQueuingSupported"] is True  # the shipped QueuedRunCoordinator
    assert "retry_on_asset_or_op_failure: false" in info and "default_limit: 1" in info, info
    assert str(home) in info


# ------------------------------------------------------------------------------ systemd units
def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("CI: systemd-analyze must be installed (scripts/test.sh installs Debian's systemd)")
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return exe


@pytest.mark.systemd
def test_units_verify_and_a_broken_unit_does_not(tmp_path: Path) -> None:
    _systemd_analyze()
    ok = subprocess.run(["bash", str(SYSTEMD / "check.sh"), "--verify"], capture_output=True, text=True,
                        timeout=120, env=_env(ARENA_ROOT=str(REPO)), check=False)
    assert ok.returncode == 0 and "verify: OK" in ok.stdout, ok.stdout + ok.stderr
    # the check is strict: a value systemd cannot parse (exit 0 from systemd-analyze) fails it
    broken = tmp_path / "systemd"
    shutil.copytree(SYSTEMD, broken)
    unit = broken / "arena-dagster-daemon.service"
    unit.write_text(unit.read_text().replace("Type=simple", "Type=simpel"))
    bad = subprocess.run(["bash", str(broken / "check.sh"), "--verify"], capture_output=True, text=True,
                         timeout=120, env=_env(ARENA_ROOT=str(REPO)), check=False)
    assert bad.returncode == 1 and "simpel" in bad.stdout, bad.stdout + bad.stderr


def test_units_keep_the_ui_local_and_secrets_out() -> None:
    web = (SYSTEMD / "arena-dagster-webserver.service").read_text()
    daemon = (SYSTEMD / "arena-dagster-daemon.service").read_text()
    assert re.search(r"^ExecStart=\S+/dagster-webserver .*--host 127\.0\.0\.1 ", web, re.MULTILINE)
    assert re.search(r"^ExecStart=\S+/dagster-daemon run ", daemon, re.MULTILINE)
    for text in (web, daemon):
        assert "EnvironmentFile=/etc/arena/arena-dagster.env" in text
        assert "DAGSTER_PG_URL" not in text.replace("# DAGSTER_HOME, ARENA_SETTINGS, DAGSTER_PG_URL", "")
    env = dict(ln.split("=", 1) for ln in (SYSTEMD / "arena-dagster.env.example").read_text().splitlines()
               if ln and not ln.startswith("#"))
    assert {"DAGSTER_HOME", "ARENA_SETTINGS", "DAGSTER_PG_URL"} <= set(env)
    assert "CHANGE_ME" in env["DAGSTER_PG_URL"] and env["DAGSTER_PG_URL"].startswith("postgresql+psycopg2://")


# ------------------------------------------------------------------------------ the dg project
def test_dg_check_defs_and_the_defs_folder() -> None:
    env = _env(VIRTUAL_ENV=str(BIN.parent), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([str(BIN / "dg"), "check", "defs"], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert r.returncode == 0 and "All definitions loaded successfully" in r.stdout + r.stderr, \
        (r.stdout + r.stderr)[-3000:]
    r = subprocess.run([str(BIN / "dg"), "list", "defs", "--json"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    listed = json.loads(r.stdout)
    # what dg lists (loaded from arena_assets/defs/) is the code location workspace.yaml loads
    import arena_assets.definitions as d

    g = d.defs.resolve_asset_graph()
    ours = {k.to_user_string() for k in g.materializable_asset_keys}
    assert ours and ours <= {a["asset_key"] for a in listed["assets"]}, listed["assets"][:3]
    assert {s["name"] for s in listed["sensors"]} == {"arena_automation"}
