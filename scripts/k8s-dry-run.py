#!/usr/bin/env python
"""Print the Kubernetes Jobs a materialization would submit, one YAML document per GPU step.

    python scripts/k8s-dry-run.py [SETTINGS.yaml] [--step teacher ...] [--partition 0] [--run-id RUN]

No cluster is contacted and nothing is written. Each manifest is built by the same code the
k8s backend submits with (arena_assets.resources.k8s.render_manifests) and validated against the
`kubernetes` client's models before it is printed, so `kubectl apply --dry-run=server -f -` on a
real cluster is the only check left.
"""

from __future__ import annotations

import argparse
import sys

from arena_assets.core.settings import load_settings
from arena_assets.resources.k8s import GPU_STEPS, manifests_yaml, render_manifests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="?", help="settings file (default: $ARENA_SETTINGS or ./arena.yaml)")
    ap.add_argument("--step", action="append", choices=GPU_STEPS, help="only these steps (repeatable)")
    ap.add_argument("--partition", default="0", help="partition key shown in names and labels")
    ap.add_argument("--run-id", default="dry-run", help="run id used for names and the call path")
    a = ap.parse_args(argv)
    settings = load_settings(a.settings)
    manifests = []
    for step in a.step or GPU_STEPS:
        manifests.extend(render_manifests(settings, step, partition=a.partition, run_id=a.run_id))
    sys.stdout.write(manifests_yaml(manifests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
