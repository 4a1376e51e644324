#!/bin/bash
# Check the arena-assets Dagster services (docs/team.md).
#
#   bash deploy/systemd/check.sh            # verify the unit files; then, where they are
#                                           # installed and running, check the live services
#   bash deploy/systemd/check.sh --verify   # only `systemd-analyze verify` (CI, no systemd PID 1)
#
# 1. `systemd-analyze verify` on both units (strict: any warning fails). They name /opt/arena-assets; a checkout elsewhere is
#    verified with that path replaced by ARENA_ROOT (default: this checkout), so the ExecStart
#    binaries that verify looks for are the ones of this .venv.
# 2. Live (skipped with --verify, or when systemd is not PID 1): both units active, the
#    webserver answers /server_info on 127.0.0.1 and listens on no other address, and the daemon
#    is alive by its heartbeats (`dagster-daemon liveness-check`, with the services' environment).
# Environment: ARENA_ROOT, ARENA_ENV_FILE (default /etc/arena/arena-dagster.env), PORT (3000).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${ARENA_ROOT:-$(cd "$HERE/../.." && pwd)}"
ENV_FILE="${ARENA_ENV_FILE:-/etc/arena/arena-dagster.env}"
PORT="${PORT:-3000}"
UNITS=(arena-dagster-webserver.service arena-dagster-daemon.service)
fail=0
say() { echo "check: $*"; }

command -v systemd-analyze >/dev/null || { say "systemd-analyze not found (apt-get install systemd)"; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for u in "${UNITS[@]}"; do
  sed "s#/opt/arena-assets#$ROOT#g" "$HERE/$u" > "$tmp/$u"
done
# strict: systemd-analyze exits 0 on a value it cannot parse ("Failed to parse ..., ignoring"),
# an unknown key or section; any message at all counts as a failure here
rc=0
out=$(cd "$tmp" && systemd-analyze verify "${UNITS[@]/#/./}" 2>&1) || rc=$?
if [ "$rc" = 0 ] && [ -z "$out" ]; then
  say "systemd-analyze verify: OK (${UNITS[*]}; /opt/arena-assets -> $ROOT)"
else
  say "systemd-analyze verify FAILED (exit $rc):"; echo "$out" | sed 's/^/  /'; fail=1
fi

if [ "${1:-}" = --verify ]; then exit "$fail"; fi
if [ "$(ps -o comm= -p 1 2>/dev/null)" != systemd ]; then
  say "systemd is not PID 1 here: live checks skipped"
  exit "$fail"
fi
for u in "${UNITS[@]}"; do
  if systemctl is-active --quiet "$u"; then say "$u: active"; else say "$u: NOT active ($(systemctl is-active "$u" || true))"; fail=1; fi
done
if info=$(curl -fsS --max-time 10 "http://127.0.0.1:$PORT/server_info"); then
  say "webserver: $info"
else
  say "webserver: no answer on http://127.0.0.1:$PORT/server_info"; fail=1
fi
if command -v ss >/dev/null; then
  bad=$(ss -Hltn "sport = :$PORT" | awk '{print $4}' | grep -v -E '^(127\.0\.0\.1|\[::1\]):' || true)
  if [ -n "$bad" ]; then say "webserver ALSO listens on: $bad (must be 127.0.0.1 only)"; fail=1; fi
fi
if [ -r "$ENV_FILE" ]; then
  if (set -a; . "$ENV_FILE"; set +a; "$ROOT/.venv/bin/dagster-daemon" liveness-check >/dev/null 2>&1); then
    say "daemon: heartbeats current (dagster-daemon liveness-check)"
  else
    say "daemon: liveness check FAILED (journalctl -u arena-dagster-daemon)"; fail=1
  fi
else
  say "daemon: $ENV_FILE not readable: liveness check skipped"
fi
exit "$fail"
