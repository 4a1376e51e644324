#!/bin/bash
# The project's whole test run (what CI runs via .ci/run; the README's test command):
#   system packages the tests need -> Python setup -> a real single-node Slurm -> pytest.
# The slurm-marked tests never skip here: CI=true makes a missing cluster a failure.
# Exits with pytest's code; "no tests collected" (5) counts as a failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CI="${CI:-true}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DEBIAN_FRONTEND=noninteractive
T0=$(date +%s)
step() { echo "test.sh: $1 ($(( $(date +%s) - T0 )) s)"; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# 1. system packages: Python 3.11, Chromium for the UI tests (Playwright drives /usr/bin/chromium),
#    the Slurm stack (slurm-up.sh installs munge/slurm/slurmdbd/mariadb itself).
need=()
command -v python3.11 >/dev/null || need+=(python3.11 python3.11-venv)
command -v chromium >/dev/null || need+=(chromium)
command -v git >/dev/null || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
  step "apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
fi

# 2. Python environments
step "setup.sh"
bash scripts/setup.sh

# 3. the Slurm cluster (idempotent: no-op when it is already up)
step "slurm-up.sh"
$SUDO bash scripts/slurm-up.sh

# 4. everything, slurm-marked tests included
step "pytest"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  rc=1
fi
step "pytest exited $rc"
exit "$rc"
