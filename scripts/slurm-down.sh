#!/bin/bash
# Stop the daemons slurm-up.sh started, by PID file, in reverse order (waits up to 30 s each).
# `--purge` also wipes Slurm's state AND its accounting database together (job ids restart at 1);
# never wipe one without the other (a stale submitit folder could then match a reused job id).
set -uo pipefail
for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  p=$(cat "$f"); kill "$p" 2>/dev/null || continue
  for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
done
if [ "${1:-}" = "--purge" ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
  if [ -d /var/lib/mysql/slurm_acct_db ]; then
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
    mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;" || true
    kill "$(cat /run/mysqld/mysqld.pid)" 2>/dev/null || true
    sleep 2
  fi
fi
echo "slurm down"
