"""``arena-assets`` command line: ``validate``, ``make-sample``, ``home`` (and more subcommands
registered in :data:`SUBCOMMANDS`).

Why a registry: other parts add subcommands (``demo``) by adding one entry, ``name ->
(add_arguments, run)``, without touching the parser logic. ``run(args) -> int`` returns the exit
code. Every data-contract failure exits 2 with its one-line message on stderr; nothing heavy
(torch, dagster) is imported until a subcommand needs it. A bad settings file or output path
also exits 2 with one line; ``validate`` never shows a traceback (an internal bug exits 1 with
one line; ``ARENA_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

EXIT_CONTRACT = 2


def _one_line(msg: str, limit: int = 500) -> str:
    """An error message as one short line (newlines escaped, clipped)."""
    msg = msg.replace("\r", "\\r").replace("\n", "\\n")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _fmt_summary(label: str, s: dict[str, Any]) -> list[str]:
    lines = [f"{label}: {s['rows']} rows"]
    if "label_mean" in s:
        bal = ", ".join(f"{k.removeprefix('winner_')} {v:.3f}" for k, v in s["label_mean"].items())
        lines.append(f"  label balance: {bal}" + (f" ({s['soft_label_rows']} soft rows)" if s.get("soft_label_rows") else ""))
    if "turns" in s:
        t = s["turns"]
        lines.append(f"  turns per row: mean {t['mean']}, max {t['max']}, multi-turn rows {t['multi_turn_rows']}")
    lc = s["longest_cell"]
    lines.append(f"  longest cell: {lc['chars']} chars ({lc['column']}, id {lc['id']}); empty turns: {s['empty_turns']}")
    if "sources" in s:
        lines.append("  sources: " + ", ".join(f"{k} {v}" for k, v in s["sources"].items()))
    return lines


# ------------------------------------------------------------------------------- validate
def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", default=None, help="train.csv (Kaggle format)")
    p.add_argument("--test", default=None, help="test.csv (Kaggle format); alone, only it is checked")
    p.add_argument("--external", default=None, help="external preference data (csv, jsonl, parquet)")
    p.add_argument("--out", default=None, help="also write the normalized parquet tables here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _validate_run(args: argparse.Namespace) -> int:
    import logging
    import os

    from arena_assets.core.contract import ContractError, validate_files

    if args.train is None and args.test is None and args.external is None:
        raise ValueError("validate: give at least one of --train, --test, --external")
    # the readers log their warnings (for Dagster's run logs); here they are printed once, below
    contract_log = logging.getLogger("arena_assets.core.contract")
    level = contract_log.level
    contract_log.setLevel(logging.ERROR)
    try:
        # every file is read (and so validated) before anything is written, and all outputs are
        # written together (contract.write_outputs)
        result = validate_files(args.train, args.test, out_dir=args.out, external=args.external)
    except (ContractError, ValueError, OSError):
        raise
    except Exception as e:  # a bug, not the input's fault: one line, exit 1, no traceback
        if os.environ.get("ARENA_DEBUG"):
            raise
        print(f"error: internal error while validating ({type(e).__name__}: {_one_line(str(e), 200)}); "
              "please report it (ARENA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        contract_log.setLevel(level)
    for w in result.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    lines = _fmt_summary(f"train {args.train}", result["train"]) if "train" in result else []
    if "test" in result:
        lines += _fmt_summary(f"test {args.test}", result["test"])
        if "train_test_id_overlap" in result:
            lines.append(f"  ids shared by train and test: {result['train_test_id_overlap']}")
    if "external" in result:
        lines += _fmt_summary(f"external {args.external}", result["external"])
    for w in result.get("written", []):
        lines.append(f"wrote {w}")
    for w in result.get("removed", []):
        lines.append(f"removed {w} (an earlier run's output; this run has no such file)")
    lines.append("OK: valid")
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------- make-sample
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2000, help="train rows")
    p.add_argument("--test-rows", type=int, default=None, help="test rows (default rows/4)")
    p.add_argument("--external-rows", type=int, default=None, help="external rows (default 2*rows)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", required=True, help="output folder")


def _sample_run(args: argparse.Namespace) -> int:
    import os

    from arena_assets.core.sample import make_sample

    if args.rows < 0:
        raise ValueError("--rows must be >= 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a directory")
    test_rows = args.test_rows if args.test_rows is not None else max(args.rows // 4, 1)
    ext_rows = args.external_rows if args.external_rows is not None else 2 * args.rows
    r = make_sample(args.out, train_rows=args.rows, test_rows=test_rows, external_rows=ext_rows, seed=args.seed)
    print(
        f"wrote {r['train']}, {r['test']}, {r['external']}, {r['truth']}\n"
        f"rows: {r['rows']}\n"
        f"test log-loss: Bayes {r['bayes_logloss_test']:.4f}, prior {r['prior_logloss_test']:.4f}"
    )
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    from arena_assets import demo

    demo.add_arguments(p)


def _demo_run(args: argparse.Namespace) -> int:
    from arena_assets import demo

    return demo.main(args)


# ------------------------------------------------------------------------------- pools
def _pools_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default=None, help="settings file (default: $ARENA_SETTINGS, else ./arena.yaml)")
    p.add_argument("--apply", action="store_true",
                   help="write the limit into the Dagster instance of $DAGSTER_HOME (else only print it)")
    p.add_argument("--json", action="store_true", help="print as JSON")


def _pools_run(args: argparse.Namespace) -> int:
    from arena_assets.assets import pools
    from arena_assets.core.settings import load_settings

    s = load_settings(args.settings)
    if not args.apply:
        print(json.dumps(pools.pool_limits(s)) if args.json else pools.format_limits(s))
        return 0
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        changes = pools.apply_pool_limits(instance, s)
    if args.json:
        print(json.dumps(changes))
    else:
        for pool, c in changes.items():
            print(f"pool {pool}: limit {c['after']} (was {c['before'] if c['before'] is not None else 'unset'})")
    return 0


# ------------------------------------------------------------------------------- home
# Dagster reads an instance's config only from $DAGSTER_HOME/dagster.yaml; these are the ones the
# repository ships (docs/team.md).
INSTANCE_CONFIGS = {"local": "deploy/local/dagster.yaml", "team": "deploy/team/dagster.yaml"}
DEFAULT_HOME = ".arena/dagster_home"


def shipped_instance_config(kind: str = "local") -> Any:
    """The path of the shipped instance config ``kind`` (local = SQLite, team = PostgreSQL)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / INSTANCE_CONFIGS[kind]


def prepare_home(home: Any, kind: str = "local", force: bool = False) -> dict[str, str]:
    """Put the shipped instance config ``kind`` into ``home`` (created if missing). An existing
    dagster.yaml that differs is kept unless ``force`` (then it is saved as dagster.yaml.bak).
    Returns ``{"home", "config", "source", "status"}``, status one of created | current |
    differs | replaced."""
    import shutil
    from pathlib import Path

    src = shipped_instance_config(kind)
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        status = "created"
    elif target.read_bytes() == src.read_bytes():
        status = "current"
    elif force:
        shutil.copy(target, home / "dagster.yaml.bak")
        status = "replaced"
    else:
        status = "differs"
    if status in {"created", "replaced"}:
        tmp = home / ".dagster.yaml.tmp"
        shutil.copy(src, tmp)
        tmp.replace(target)
    return {"home": str(home), "config": str(target), "source": str(src), "status": status}


def _home_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dagster-home", default=None,
                   help=f"the instance folder (default: $DAGSTER_HOME, else {DEFAULT_HOME})")
    p.add_argument("--team", action="store_true",
                   help="the team instance (PostgreSQL from $DAGSTER_PG_URL) instead of SQLite")
    p.add_argument("--force", action="store_true", help="replace a dagster.yaml that differs (kept as .bak)")


def _home_run(args: argparse.Namespace) -> int:
    import os

    home = args.dagster_home or os.environ.get("DAGSTER_HOME") or DEFAULT_HOME
    r = prepare_home(home, "team" if args.team else "local", args.force)
    if r["status"] == "differs":
        print(f"warning: {r['config']} differs from the shipped {r['source']}; kept (--force replaces it, "
              "keeping a .bak)", file=sys.stderr)
    else:
        print(f"{r['config']}: {r['status']} (from {r['source']})", file=sys.stderr)
    if args.team and not os.environ.get("DAGSTER_PG_URL"):
        print("warning: DAGSTER_PG_URL is not set; the team instance reads its PostgreSQL URL from it",
              file=sys.stderr)
    print(f"DAGSTER_HOME={r['home']}")
    return 0


SUBCOMMANDS: dict[str, tuple[str, AddArgs, Run]] = {
    "validate": ("check train/test (and external) files against the data contract", _validate_args, _validate_run),
    "make-sample": ("write the known-answer sample (train/test/external.csv, truth.json)", _sample_args, _sample_run),
    "demo": ("run the whole recipe on the bundled sample into a persistent DAGSTER_HOME", _demo_args, _demo_run),
    "pools": ("print (or --apply to $DAGSTER_HOME) the concurrency pool limit of the current settings",
              _pools_args, _pools_run),
    "home": ("prepare a DAGSTER_HOME with the instance config the repository ships (SQLite, or --team)",
             _home_args, _home_run),
}
"""name -> (help, add_arguments, run). Add a subcommand by adding an entry."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arena-assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``arena-assets`` console script; returns the exit code."""
    import logging

    from arena_assets.core.contract import ContractError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except ContractError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONTRACT
    except (ValueError, OSError) as e:  # a bad argument, settings file or output path: one line too
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_CONTRACT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
