"""The instance's bookkeeping overhead, SQLite vs PostgreSQL, side by side (issue 18).

A 5-fold backfill through ``dagster-daemon`` (the queued run coordinator, the project's shipped
instance config; tests/harness) of ``fold_model`` from tests/instance/instance_defs.py: the
project's fold partitions and backfill policy (one run per fold) on a body that does nothing, so
everything measured is Dagster's bookkeeping on that storage. Per run, from the event log's own
timestamps:

- ``queue_s``: PIPELINE_ENQUEUED -> PIPELINE_STARTING (the daemon's dequeue; its interval is 1 s
  in the harness, 5 s by default),
- ``launch_s``: PIPELINE_STARTING -> PIPELINE_START (the run worker process starts, loads the
  code location and opens the instance),
- ``to_step_s``: PIPELINE_START -> STEP_START,
- ``enqueue_to_step_s``: the sum: the run's launch to its step's start, the number asked for,
- ``step_to_end_s``: STEP_START -> PIPELINE_SUCCESS (writing the step's events and the run's end).

The storages alternate round by round (sqlite, postgres, sqlite, ...) so that the load of a shared
machine falls on both alike. Writes benchmarks/results/instance.json.

    ARENA_TEST_PG_URL=$(sudo bash scripts/postgres-up.sh | tail -1) .venv/bin/python benchmarks/bench_instance.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import DaemonHarness, fresh_database, postgres_storage

FOLDS = ["0", "1", "2", "3", "4"]
MARKS = ["PIPELINE_ENQUEUED", "PIPELINE_STARTING", "PIPELINE_START", "STEP_START", "PIPELINE_SUCCESS"]


def run_timings(h: DaemonHarness, run_id: str) -> dict[str, float]:
    first: dict[str, float] = {}
    for e in h.events(run_id):
        if e.dagster_event is not None:
            first.setdefault(e.dagster_event.event_type_value, e.timestamp)
    missing = [m for m in MARKS if m not in first]
    if missing:
        raise RuntimeError(f"run {run_id}: no {missing} event\n{h.describe(run_id)}")
    t = [first[m] for m in MARKS]
    return {"queue_s": t[1] - t[0], "launch_s": t[2] - t[1], "to_step_s": t[3] - t[2],
            "enqueue_to_step_s": t[3] - t[0], "step_to_end_s": t[4] - t[3]}


def one_round(root: Path, storage: dict[str, Any] | None) -> dict[str, Any]:
    h = DaemonHarness(root, module="tests.instance.instance_defs", location_name="instance_defs", storage=storage)
    t0 = time.time()
    h.start()
    start_s = time.time() - t0
    try:
        t1 = time.time()
        bf = h.backfill("fold_job", FOLDS)
        runs = h.wait_runs_finished(h.backfill_runs(bf, n=5), timeout=900)
        wall = time.time() - t1
        bad = [r.run_id for r in runs if r.status.value != "SUCCESS"]
        if bad:
            raise RuntimeError(f"runs failed: {[h.describe(b) for b in bad]}")
        per_run = [run_timings(h, r.run_id) for r in runs]
        return {"storage": type(h.instance().run_storage).__name__, "daemon_ready_s": round(start_s, 2),
                "backfill_wall_s": round(wall, 2), "runs": per_run}
    finally:
        h.stop()


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for rd in rounds for r in rd["runs"]]
    out: dict[str, Any] = {"rounds": len(rounds), "runs": len(runs),
                           "backfill_wall_s": [rd["backfill_wall_s"] for rd in rounds],
                           "daemon_ready_s": [rd["daemon_ready_s"] for rd in rounds]}
    for k in runs[0]:
        xs = sorted(r[k] for r in runs)
        out[k] = {"median": round(statistics.median(xs), 3), "min": round(xs[0], 3), "max": round(xs[-1], 3)}
    return out


def machine() -> dict[str, Any]:
    import dagster
    import dagster_postgres
    import psycopg2

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {"machine": f"{platform.node()} {os.cpu_count()} CPUs ({cpu}), {platform.platform()}",
            "python": platform.python_version(), "dagster": dagster.__version__,
            "dagster_postgres": dagster_postgres.__version__, "psycopg2": psycopg2.__version__.split()[0],
            "sqlite": sqlite3.sqlite_version, "postgres_client": pg, "loadavg_at_start": [round(x, 2) for x in load]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="backfills per storage (alternating)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "instance.json"))
    args = ap.parse_args()
    url = os.environ.get("ARENA_TEST_PG_URL")
    if not url:
        print("set ARENA_TEST_PG_URL (sudo bash scripts/postgres-up.sh prints it)", file=sys.stderr)
        return 2
    info = machine()
    pg_version = subprocess.run(["psql", url, "-qAtc", "SHOW server_version"], capture_output=True, text=True,
                                check=False).stdout.strip()
    results: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgres": []}
    with tempfile.TemporaryDirectory(prefix="bench_instance_") as tmp:
        for i in range(args.rounds):
            for name in ["sqlite", "postgres"]:
                root = Path(tmp) / f"{name}{i}"
                if name == "sqlite":
                    rd = one_round(root, None)
                else:
                    with fresh_database(url, prefix="arena_bench") as db:
                        rd = one_round(root, postgres_storage(db))
                results[name].append(rd)
                s = rd["runs"]
                print(f"round {i} {name}: backfill {rd['backfill_wall_s']:.1f} s, enqueue->step median "
                      f"{statistics.median(r['enqueue_to_step_s'] for r in s):.2f} s", file=sys.stderr)
    summary = {k: summarize(v) for k, v in results.items()}
    doc = {
        "what": "5-fold backfill through dagster-daemon (queued run coordinator, dequeue every 1 s, the shipped "
                "instance config deploy/local/dagster.yaml with SQLite, or with the team's PostgreSQL storage), "
                "one run per fold (BackfillPolicy.multi_run(1)) of a fold asset whose body does nothing: "
                "the instance's bookkeeping from run launch to step start, from the event log's timestamps",
        "postgres_server": pg_version, **info,
        "summary": summary,
        "overhead_enqueue_to_step_median_s": {k: v["enqueue_to_step_s"]["median"] for k, v in summary.items()},
        "rounds": results,
        "note": "5 runs start together on 2 cores: launch_s (a run worker process importing Dagster and the code "
                "location) dominates and is the same work on both storages; the storage's share is in queue_s, "
                "to_step_s and step_to_end_s. The machine is shared (loadavg_at_start).",
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["overhead_enqueue_to_step_median_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
