#!/bin/bash
# The project's whole test run (what CI runs via .ci/run; the README's test command):
#   system packages the tests need -> Python setup -> a real single-node Slurm -> a real
#   PostgreSQL server (the team instance's storage) -> `dg check defs` -> pytest.
# The slurm- and postgres-marked tests never skip here: CI=true makes a missing cluster or
# database server a failure.
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
# `systemd-analyze verify` checks deploy/systemd's units (it needs no systemd as PID 1)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v curl >/dev/null || need+=(curl)
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

# 4. PostgreSQL from Debian's packages (idempotent): the postgres-marked tests (the team instance:
#    fold backfills, the automation sensor, the daemon's real cron tick, Slurm re-attach) use it
step "postgres-up.sh"
ARENA_TEST_PG_URL="$($SUDO bash scripts/postgres-up.sh | tail -1)"
export ARENA_TEST_PG_URL
echo "test.sh: PostgreSQL at ${ARENA_TEST_PG_URL%%:*}://${ARENA_TEST_PG_URL#*@} (ARENA_TEST_PG_URL)"

# 5. the dg project loads (the layout Dagster 1.13 recommends; [tool.dg] in pyproject.toml)
#    (these two checks do not stop the run: a failure fails it at the end, after pytest)
checks_rc=0
step "dg check defs"
VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH" .venv/bin/dg check defs || { echo "test.sh: dg check defs FAILED" >&2; checks_rc=1; }

# 6. the systemd units of deploy/systemd (systemd-analyze verify; no live services here)
step "deploy/systemd/check.sh --verify"
bash deploy/systemd/check.sh --verify || { echo "test.sh: deploy/systemd/check.sh FAILED" >&2; checks_rc=1; }

# 7. everything, slurm- and postgres-marked tests included
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
if [ "$rc" = 0 ] && [ "$checks_rc" != 0 ]; then
  echo "test.sh: pytest passed but dg check defs / the systemd check failed (above): failing" >&2
  rc=1
fi
exit "$rc"
