"""A daemon-backed Dagster deployment for tests, as users run one.

What it builds under a temporary root:

- ``dagster_home/dagster.yaml``: the project's shipped instance config ``deploy/local/dagster.yaml``
  (concurrency pools and run limits, run monitoring, run retries) plus storage (SQLite under the
  home by default; pass a ``storage`` block, e.g. ``postgres_storage(url)``, for the team setup's
  PostgreSQL) and the queued run coordinator (dequeuing every second instead of five, to keep
  tests short);
- ``workspace.yaml``: one code location, a Python module (or file) the test names;
- ``dagster-daemon run`` as a subprocess in its own process group (it starts the code server,
  which starts the run workers: stopping the group stops them all).

Runs are launched with the public CLI (``dagster job backfill``, ``dagster job launch``) against
the workspace, so they go through the queue, the pools and the run launcher exactly as in a
deployment; the harness reads run statuses and events through the instance's public API and
terminates runs the way the UI's "Terminate" does (``instance.run_coordinator.cancel_run``: the
run is marked CANCELING, then its worker is signalled through the code server).

Typical use (see tests/slurm/test_slurm_daemon.py)::

    h = DaemonHarness(tmp_path, module="slurm_defs", env={"ARENA_SETTINGS": ...})
    h.start()                                   # writes the files, starts the daemon
    h.arena("pools", "--apply")                 # pool limits of the settings into the instance
    bf = h.backfill("fold_sleep_job", ["0", "1", "2", "3", "4"])
    runs = h.wait_runs_finished(h.backfill_runs(bf, n=5))
    h.stop()
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = copy.deepcopy(v)
    return out


def postgres_storage(url: str) -> dict[str, Any]:
    """The storage block of the team instance (deploy/team/dagster.yaml) with a literal URL
    (a libpq ``postgresql://`` URL is given the psycopg2 driver: see ``sqlalchemy_url``)."""
    from tests.harness.postgres import sqlalchemy_url

    return {"postgres": {"postgres_url": sqlalchemy_url(url)}}


def project_instance_config(
    home: Path, storage: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
    dequeue_interval_s: int = 1,
) -> dict[str, Any]:
    """The instance config a harness writes: the repository's dagster.yaml, a storage block
    (default SQLite under ``home``), the queued run coordinator, then ``overrides`` (deep-merged;
    a None value removes a key)."""
    cfg = yaml.safe_load((REPO / "deploy" / "local" / "dagster.yaml").read_text()) or {}
    cfg["storage"] = storage or {"sqlite": {"base_dir": str(home / "storage")}}
    cfg["run_coordinator"] = {
        "module": "dagster",
        "class": "QueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": dequeue_interval_s},
    }
    return _deep_merge(cfg, overrides or {})


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    root_run_id: str
    parent_run_id: str | None
    status: str
    partition: str | None
    tags: dict[str, str]

    @classmethod
    def of(cls, run: Any) -> RunInfo:
        return cls(run.run_id, run.root_run_id or run.run_id, run.parent_run_id, run.status.value,
                   run.tags.get("dagster/partition"), dict(run.tags))


class DaemonHarness:
    """A DAGSTER_HOME + workspace + ``dagster-daemon run`` under ``root`` (see module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        module: str | None = None,
        python_file: str | None = None,
        working_directory: str | None = None,
        location_name: str = "harness",
        storage: dict[str, Any] | None = None,
        instance_overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if (module is None) == (python_file is None):
            raise ValueError("give exactly one of module / python_file")
        self.root = Path(root)
        self.home = self.root / "dagster_home"
        self.workspace = self.root / "workspace.yaml"
        self.log_path = self.root / "daemon.log"
        self.module, self.python_file = module, python_file
        self.working_directory = working_directory or str(REPO)
        self.location_name = location_name
        self.storage = storage
        self.instance_overrides = instance_overrides or {}
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._instance: Any = None

    # ------------------------------------------------------------------ files, env
    def write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cfg = project_instance_config(self.home, self.storage, self.instance_overrides)
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        target: dict[str, Any] = {"location_name": self.location_name, "working_directory": self.working_directory}
        if self.module:
            entry = {"python_module": {"module_name": self.module, **target}}
        else:
            entry = {"python_file": {"relative_path": self.python_file, **target}}
        self.workspace.write_text(yaml.safe_dump({"load_from": [entry]}, sort_keys=False))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["DAGSTER_HOME"] = str(self.home)
        return env

    @property
    def instance_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.home / "dagster.yaml").read_text())

    # ------------------------------------------------------------------ daemon
    def start(self, timeout: float = 240) -> DaemonHarness:
        """Write the files, start ``dagster-daemon run`` and wait until every daemon the
        instance requires has sent a heartbeat."""
        self.write_files()
        # Create the storage (schema + alembic stamp) here, once, before any other process opens
        # it: SQLite storages initialized concurrently by the daemon and a CLI can end up with
        # two alembic heads ("Version table 'alembic_version' has more than one head").
        required = set(self.instance().get_required_daemon_types())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=str(self.root), start_new_session=True,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dagster-daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            return required <= set(self.instance().get_daemon_heartbeats())

        self.wait_for(ready, timeout, what=f"daemon heartbeats {sorted(required)}")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop the daemon and everything it started (code server, run workers): SIGTERM to its
        process group, SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        # run workers that left the group (none expected) would stay; kill what still has it
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ instance
    def instance(self) -> Any:
        """The harness's DagsterInstance (opened once, read through its public API)."""
        import dagster as dg

        if self._instance is None:
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return self._instance

    # ------------------------------------------------------------------ CLIs
    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``dagster ARGS`` with this home (add ``-w`` yourself or use the helpers below)."""
        return self._exec([str(BIN / "dagster"), *args], timeout, check)

    def arena(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``arena-assets ARGS`` with this home (e.g. ``pools --apply``)."""
        return self._exec([str(BIN / "arena-assets"), *args], timeout, check)

    def _exec(self, cmd: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), cwd=str(self.root), timeout=timeout,
                             check=False)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def apply_pools(self) -> dict[str, Any]:
        """``arena-assets pools --apply``: the settings' pool limit into this instance."""
        return json.loads(self.arena("pools", "--apply", "--json").stdout.strip().splitlines()[-1])

    def set_pool_limit(self, pool: str, limit: int) -> None:
        """``dagster instance concurrency set POOL LIMIT``."""
        self.cli("instance", "concurrency", "set", pool, str(limit))

    def backfill(self, job: str, partitions: Sequence[str], tags: dict[str, str] | None = None) -> str:
        """A job backfill through ``dagster job backfill`` (runs go to the daemon's queue);
        returns the backfill id (runs carry it as tag ``dagster/backfill``)."""
        args = ["job", "backfill", "-w", str(self.workspace), "-j", job, "--partitions", ",".join(partitions),
                "--noprompt"]
        if tags:
            args += ["--tags", json.dumps(tags)]
        out = self.cli(*args)
        m = re.search(r"Launched backfill job `([^`]+)`", out.stdout + out.stderr)
        assert m, out.stdout + out.stderr
        return m.group(1)

    def launch(self, job: str, *, partition: str | None = None, config: dict[str, Any] | None = None,
               tags: dict[str, str] | None = None) -> str:
        """One run through ``dagster job launch`` (queued, then launched by the daemon)."""
        run_id = str(uuid.uuid4())
        tags = dict(tags or {})
        if partition is not None:
            tags["dagster/partition"] = partition
        args = ["job", "launch", "-w", str(self.workspace), "-j", job, "--run-id", run_id]
        if tags:
            args += ["--tags", json.dumps(tags)]
        if config:
            args += ["--config-json", json.dumps(config)]
        self.cli(*args)
        return run_id

    # ------------------------------------------------------------------ runs and events
    def run(self, run_id: str) -> Any:
        return self.instance().get_run_by_id(run_id)

    def runs(self, tags: dict[str, str] | None = None) -> list[Any]:
        import dagster as dg

        return list(self.instance().get_runs(dg.RunsFilter(tags=tags or {})))

    def backfill_runs(self, backfill_id: str, n: int | None = None, timeout: float = 120) -> list[Any]:
        """The runs of a backfill (waiting until there are ``n`` of them)."""
        def check() -> list[Any] | None:
            rs = self.runs({"dagster/backfill": backfill_id})
            return rs if rs and (n is None or len(rs) >= n) else None

        return self.wait_for(check, timeout, what=f"{n} runs of backfill {backfill_id}")

    def runs_of_root(self, root_run_id: str) -> list[Any]:
        """The root run and its re-executions (retries), oldest first."""
        import dagster as dg

        recs = list(self.instance().get_run_records(dg.RunsFilter(tags={"dagster/root_run_id": root_run_id})))
        root = self.instance().get_run_record_by_id(root_run_id)
        recs = sorted([r for r in [root, *recs] if r is not None], key=lambda r: r.create_timestamp)
        return [r.dagster_run for r in recs]

    def wait_status(self, run_id: str, statuses: Iterable[str], timeout: float = 300) -> Any:
        want = set(statuses)

        def check() -> Any:
            run = self.run(run_id)
            return run if run is not None and run.status.value in want else None

        try:
            return self.wait_for(check, timeout, what=f"run {run_id} in {sorted(want)}")
        except AssertionError as e:
            run = self.run(run_id)
            raise AssertionError(f"{e}; it is {run.status.value if run else 'missing'}\n{self.describe(run_id)}") from None

    def wait_runs_finished(self, runs: Sequence[Any], timeout: float = 600) -> list[Any]:
        ids = [r.run_id if hasattr(r, "run_id") else str(r) for r in runs]

        def check() -> list[Any] | None:
            now = [self.run(i) for i in ids]
            return now if all(r is not None and r.is_finished for r in now) else None

        try:
            return self.wait_for(check, timeout, what=f"{len(ids)} runs to finish")
        except AssertionError as e:
            raise AssertionError(f"{e}\n" + "\n".join(self.describe(i) for i in ids)) from None

    def events(self, run_id: str) -> list[Any]:
        """Every event log entry of a run (``instance.all_logs``)."""
        return list(self.instance().all_logs(run_id))

    def messages(self, run_id: str) -> list[str]:
        out = []
        for e in self.events(run_id):
            msg = e.user_message or ""
            if e.dagster_event is not None and e.dagster_event.message:
                msg = msg or e.dagster_event.message
            out.append(msg)
        return out

    def describe(self, run_id: str, n: int = 25) -> str:
        run = self.run(run_id)
        if run is None:
            return f"run {run_id}: missing"
        msgs = [m for m in self.messages(run_id) if m][-n:]
        return f"run {run_id} ({run.status.value}, partition {run.tags.get('dagster/partition')}):\n  " + "\n  ".join(msgs)

    def run_worker_pid(self, run_id: str, timeout: float = 180) -> int:
        """The run worker's pid, from the engine event "Started process for run (pid: N)."."""

        def check() -> int | None:
            for m in self.messages(run_id):
                hit = re.search(r"Started process for run \(pid: (\d+)\)", m)
                if hit:
                    return int(hit.group(1))
            return None

        return self.wait_for(check, timeout, what=f"run worker of {run_id}")

    def terminate(self, run_id: str) -> bool:
        """What the UI's "Terminate" does (GraphQL terminateRun -> the run coordinator's
        cancel_run): a queued run is canceled at once; a started one is marked CANCELING and
        its worker is told to stop through the code server."""
        return bool(self.instance().run_coordinator.cancel_run(run_id))

    # ------------------------------------------------------------------ waiting
    @staticmethod
    def wait_for(fn: Callable[[], T | None], timeout: float, interval: float = 0.5, what: str = "condition") -> T:
        deadline = time.time() + timeout
        while True:
            value = fn()
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)
