#!/usr/bin/env bash
# The README's main command: set up the environment (scripts/setup.sh), then run the whole recipe
# on the bundled known-answer sample on CPU (all 5 folds, local backend) into a persistent
# DAGSTER_HOME that `dagster dev -h 127.0.0.1` then shows with its history.
#   bash scripts/demo.sh            # setup + demo
#   SKIP_SETUP=1 bash scripts/demo.sh   # demo only (environment already set up)
# Extra arguments go to `arena-assets demo` (e.g. --folds 0,1, --settings my.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${SKIP_SETUP:-0}" != "1" ]]; then
  if [[ -x scripts/setup.sh || -f scripts/setup.sh ]]; then
    bash scripts/setup.sh
  elif [[ ! -x .venv/bin/python ]]; then
    echo "scripts/setup.sh is missing and there is no .venv: set up the environment first" >&2
    exit 1
  fi
fi

export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.arena/dagster_home}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/arena-assets demo "$@"
echo
echo "Browse the history:  DAGSTER_HOME=$DAGSTER_HOME .venv/bin/dagster dev -h 127.0.0.1"
