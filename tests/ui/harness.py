"""Start and stop ``dagster dev`` (webserver + daemon) and drive it with Playwright + Debian's chromium.

Why a process group: ``dagster dev`` spawns the webserver, the daemon and a code server; started
without a new session, a SIGTERM to the parent is not enough in a non-interactive shell
(python-stack.md). We start it with ``start_new_session=True`` and signal the whole group.
Why no sleeps: every wait is on HTTP readiness, a selector or a text, with generous timeouts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("ARENA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: Selector/text waits; the first page of a fresh webserver compiles GraphQL and loads the location.
UI_TIMEOUT_MS = 120_000


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dagster_bin() -> str:
    """The ``dagster`` CLI of the interpreter running the tests (the project venv)."""
    cand = Path(sys.executable).parent / "dagster"
    return str(cand) if cand.exists() else (shutil.which("dagster") or "dagster")


@dataclass
class DagsterDev:
    """A running ``dagster dev``: its URL, process, log file and DAGSTER_HOME."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    dagster_home: Path
    env: dict[str, str] = field(default_factory=dict)

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        """POST a GraphQL query to the webserver (for waits and for reading state in asserts)."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as e:  # GraphQL validation errors come as HTTP 400
            raise RuntimeError(f"GraphQL HTTP {e.code}: {e.read()[:2000]!r}") from e
        if out.get("errors"):
            raise RuntimeError(f"GraphQL errors: {out['errors']}")
        return out["data"]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


LOCATIONS_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def wait_location_loaded(dev: DagsterDev, timeout: float = 180) -> None:
    """Wait until every code location is LOADED (a load error fails at once, with its message)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ws = dev.graphql(LOCATIONS_QUERY)["workspaceOrError"]
        entries = ws.get("locationEntries") or []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errs = [e for e in entries if (e.get("locationOrLoadError") or {}).get("__typename") == "PythonError"]
            if errs:
                raise RuntimeError(f"code location failed to load: {errs[0]['locationOrLoadError']['message']}")
            return
        time.sleep(1)
    raise TimeoutError(f"code location not loaded within {timeout}s\n{dev.log_tail()}")


def start_dagster_dev(
    dagster_home: Path,
    settings_path: Path,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    timeout: float = 180,
) -> DagsterDev:
    """``dagster dev -h 127.0.0.1 -p <free port> -m arena_assets.definitions`` on this instance.

    ``ARENA_SETTINGS`` points the code location (and every run worker it launches) at the
    settings file the pipeline fixture materialized with, so the UI shows that very history.
    """
    port = free_port()
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(dagster_home),
        "ARENA_SETTINGS": str(settings_path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p),
        **(extra_env or {}),
    })
    cmd = [dagster_bin(), "dev", "-h", "127.0.0.1", "-p", str(port), "-m", "arena_assets.definitions"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "wb")  # noqa: SIM115 - closed with the process in stop_dagster_dev
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out.close()
    dev = DagsterDev(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path,
                     dagster_home=dagster_home, env=env)
    try:
        _wait_http(f"{dev.url}/server_info", proc, timeout)
        wait_location_loaded(dev, timeout)
    except BaseException:
        stop_dagster_dev(dev)
        raise
    log.info("dagster dev at %s (pid %s, log %s)", dev.url, proc.pid, log_path)
    return dev


def stop_dagster_dev(dev: DagsterDev, timeout: float = 30) -> int | None:
    """SIGTERM the process group, wait, then SIGKILL what is left. Returns the exit code."""
    if dev.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dev.proc.pid, signal.SIGTERM)
        try:
            dev.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(dev.proc.pid, signal.SIGKILL)
            dev.proc.wait(10)
    # Children (webserver, daemon, code server) may outlive the parent briefly: end the group.
    deadline = time.time() + timeout
    while time.time() < deadline and _group_alive(dev.proc.pid):
        time.sleep(0.2)
    if _group_alive(dev.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dev.proc.pid, signal.SIGKILL)
    return dev.proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def dagster_dev(dagster_home: Path, settings_path: Path, log_path: Path, **kw: Any) -> Iterator[DagsterDev]:
    dev = start_dagster_dev(dagster_home, settings_path, log_path, **kw)
    try:
        yield dev
    finally:
        stop_dagster_dev(dev)


@contextlib.contextmanager
def chromium(headless: bool = True) -> Iterator[Any]:
    """A Playwright Browser on Debian's chromium (no Playwright browser download)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=headless)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, width: int = 1440, height: int = 960) -> Any:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(UI_TIMEOUT_MS)
    return page


def screenshot(page: Any, path: Path, full_page: bool = False, region: Any = None) -> Path:
    """Save a PNG once fonts are loaded and the network is idle (never a half-drawn page).

    ``region``: a locator whose on-screen box (clipped to the viewport) is all that is saved.
    Written to a temp name and renamed, so a README image is never half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        page.wait_for_load_state("networkidle", timeout=15_000)
    page.evaluate("document.fonts ? document.fonts.ready.then(() => true) : true")
    tmp = path.with_name(f".{path.name}.tmp.png")
    clip = None
    if region is not None:
        b = region.bounding_box()
        vp = page.viewport_size
        x0, y0 = max(0.0, b["x"]), max(0.0, b["y"])
        x1, y1 = min(float(vp["width"]), b["x"] + b["width"]), min(float(vp["height"]), b["y"] + b["height"])
        clip = {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}
    page.screenshot(path=str(tmp), full_page=full_page, clip=clip)
    os.replace(tmp, path)
    return path
