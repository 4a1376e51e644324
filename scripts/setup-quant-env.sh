#!/usr/bin/env bash
# Create (or bring up to date) .venv-quant, the environment the quantize step runs in.
#
# Why its own environment: GPTQModel 7.6.0 requires protobuf>=7.34, Dagster 1.13 requires
# protobuf<7. arena_assets.gpu and arena_assets.core never import Dagster, so the compute
# resource can run `arena_assets.gpu.quantize.quantize` with this interpreter
# (QuantSettings.python, $ARENA_QUANT_PYTHON, or .venv-quant/bin/python by default).
#
# Idempotent: a stamp (hash of this script and requirements/*.txt) skips the work when nothing
# changed and the env still imports. Quiet: pip runs with -q; errors still show.
#
#   bash scripts/setup-quant-env.sh            # creates <repo>/.venv-quant
#   ARENA_QUANT_VENV=/opt/venv-quant bash scripts/setup-quant-env.sh
#   PYTHON=/usr/bin/python3.11 bash scripts/setup-quant-env.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ARENA_QUANT_VENV:-$ROOT/.venv-quant}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${ARENA_QUANT_TORCH:-torch==2.13.0}"
REQ="$ROOT/requirements/quant.txt"
STAMP="$VENV/.arena-quant-stamp"

want="$(cat "$0" "$ROOT"/requirements/core.txt "$ROOT"/requirements/gpu.txt "$REQ" | sha256sum | cut -c1-16)"
check='import gptqmodel, optimum, transformers, peft, bitsandbytes, arena_assets.gpu'

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "setup-quant-env: $VENV is up to date"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup-quant-env: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# -q, and drop the "Location ... is ignored" noise some pip configs print for every package.
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "^WARNING: Location 'file://" >&2)
}

# torch FIRST and pinned: any package asking for an unpinned torch would otherwise pull a
# multi-GB CUDA build.
echo "setup-quant-env: $TORCH_SPEC"
pip_install "$TORCH_SPEC"
echo "setup-quant-env: requirements/quant.txt"
pip_install -r "$REQ" "$TORCH_SPEC"
# GPTQModel without its declared deps (they would re-pin numpy and add datasets/maturin/ninja);
# its small runtime deps are listed in quant.txt.
nodeps=$(sed -n 's/^#nodeps[[:space:]]\+//p' "$REQ")
if [[ -n "$nodeps" ]]; then
  echo "setup-quant-env: --no-deps $nodeps"
  # shellcheck disable=SC2086
  pip_install --no-deps $nodeps
fi
echo "setup-quant-env: this project (--no-deps, editable)"
pip_install --no-deps -e "$ROOT"

if ! err=$(GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/python" -c "$check" 2>&1); then
  echo "$err" >&2
  echo "setup-quant-env: $VENV does not import ($check)" >&2
  exit 1
fi
echo "$want" > "$STAMP"
echo "setup-quant-env: ready: $VENV/bin/python"
