#!/bin/bash
# Idempotent Python setup on a fresh Debian machine (or an existing checkout):
#   .venv (python3.11) <- torch==2.13.0 FIRST, then this project with its extras, then the
#   separate GPTQ quantization environment (scripts/setup-quant-env.sh).
#
# Why torch first and pinned: any package that asks for an unpinned torch would otherwise pull a
# multi-GB CUDA build; the CPU build is already on disk (pip cache) on the project's machines.
# Environment: PYTHON (default python3.11), TORCH_SPEC (default torch==2.13.0),
#              ARENA_EXTRAS (default gpu,bnb,k8s,dev), SKIP_QUANT_ENV=1 to skip .venv-quant.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${ARENA_EXTRAS:-gpu,bnb,k8s,dev}"
T0=$(date +%s)
step() { echo "setup: $1 ($(( $(date +%s) - T0 )) s)"; }

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found; install it (e.g. apt-get install python3.11 python3.11-venv)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
LOG=.venv/.arena-setup.log
# Quiet: pip's and the build backend's chatter goes to a log shown only when a step fails.
pipq() {
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$LOG" 2>&1; then
    cat "$LOG" >&2; echo "setup: pip install $* failed" >&2; exit 1
  fi
}
# A stamp of the inputs makes a second run a no-op (seconds) when nothing changed.
STAMP=.venv/.arena-setup-stamp
want="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)-$TORCH_SPEC-$EXTRAS"
# dagster_postgres (the team instance, docs/team.md) and dagster_dg_cli (`dg check defs`) come with
# the base install (pyproject.toml); an older .venv without them is brought up to date
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && .venv/bin/python -c "import arena_assets, torch, dagster, submitit, dagster_postgres, psycopg2, dagster_dg_cli" 2>/dev/null; then
  step ".venv is up to date"
else
  step "pip install $TORCH_SPEC"
  pipq "$TORCH_SPEC"
  step "pip install -e .[$EXTRAS]"
  # the constraint keeps torch where it is while the extras resolve
  echo "$TORCH_SPEC" > .venv/.torch-constraint.txt
  pipq -c .venv/.torch-constraint.txt -e ".[$EXTRAS]"
  echo "$want" > "$STAMP"
fi
if [ "${SKIP_QUANT_ENV:-0}" != 1 ] && [ -f scripts/setup-quant-env.sh ]; then
  step "quantization environment"
  bash scripts/setup-quant-env.sh
fi
step "done: $(.venv/bin/python -c 'import torch, dagster, submitit, dagster_postgres; print(f"torch {torch.__version__}, dagster {dagster.__version__}, dagster-postgres {dagster_postgres.__version__}, submitit {submitit.__version__}")')"
