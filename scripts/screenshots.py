#!/usr/bin/env python
"""Regenerate the README's screenshots (docs/img/*.png) with the UI tests themselves.

    .venv/bin/python scripts/screenshots.py                 # materialize a tiny session, then shoot
    .venv/bin/python scripts/screenshots.py --session DIR   # reuse a session made by this script

Why through the tests: the pictures in the README are then exactly what the UI tests saw and
asserted (lineage with every edge, 5 fold partitions, a fold's metadata, the pictures, the
automation switches, a backfill, a failed run) — never hand-made, never stale in silence.
Needs Debian's chromium (``apt-get install -y chromium``); no browser download.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_session(root: Path) -> Path:
    """The test session's tiny pipeline (tests/pipeline_fixture.py), materialized into ``root``."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from dagster import DagsterInstance

    from arena_assets.assets.pipeline import materialize_pipeline
    from arena_assets.definitions import build_definitions
    from tests.pipeline_fixture import write_session_files

    settings = write_session_files(root)
    defs = build_definitions(str(settings))
    instance = DagsterInstance.from_config(str(root / "dagster_home"))
    t0 = time.time()
    materialize_pipeline(defs, instance, echo=lambda s: print(s, flush=True))
    print(f"pipeline materialized in {time.time() - t0:.0f}s into {root}", flush=True)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--session", type=Path, help="a session folder made earlier (skips the pipeline)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="where the PNGs go")
    ap.add_argument("-k", default="", help="only the UI tests matching this pytest -k expression")
    args = ap.parse_args(argv)

    session = args.session
    if session is None:
        session = make_session(Path(tempfile.mkdtemp(prefix="arena-screens-")))
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ARENA_UI_SESSION=str(session.resolve()), ARENA_SCREENSHOT_DIR=str(args.out.resolve()),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "ui" / "test_ui.py"), "-m", "ui", "-q",
           "-p", "no:cacheprovider"]
    if args.k:
        cmd += ["-k", args.k]
    rc = subprocess.call(cmd, cwd=str(REPO), env=env)
    shots = sorted(p.name for p in args.out.glob("*.png"))
    print(f"screenshots in {args.out}: {', '.join(shots)}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
