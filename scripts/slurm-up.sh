#!/bin/bash
# Start a real single-node Slurm cluster on this machine (Debian 12 packages, no systemd).
#
#   munged -> mariadbd (socket only) -> slurmdbd -> slurmctld -> slurmd
#
# Why each piece (measured, see docs/slurm.md):
# - slurmdbd + MariaDB: submitit learns a job's state only from `sacct`; without accounting a
#   cancelled/killed job never counts as done and `job.result()` hangs forever.
# - DefMemPerCPU: without it every job takes the node's whole memory and jobs run one at a time.
# - EnforcePartLimits=ALL: an impossible request is refused at submit instead of pending forever.
# - batch_sched_delay=0,sched_min_interval: schedules short jobs/arrays about 3x faster;
#   sched_interval/bf_interval=5: a requeued job starts seconds (not a minute) after it is eligible.
# - AuthInfo=cred_expire=10: a requeued job (Checkpointable step at its time limit) waits this
#   long before it may start again; the default 120 s makes every requeue cost 2 minutes.
# - JobAcctGatherType=jobacct_gather/linux: sacct's MaxRSS per job (read from /proc, no cgroups).
# - proctrack/linuxproc + task/none: no cgroups needed (containers, CI machines).
#
# Idempotent: exits 0 at once when slurmctld is already running. Run as root.
# Environment: SLURM_PARTITION (default "debug"), SLURM_CLUSTER (default "local").
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PARTITION=${SLURM_PARTITION:-debug}
CLUSTER=${SLURM_CLUSTER:-local}

if [ "$(id -u)" != 0 ]; then echo "slurm-up.sh must run as root" >&2; exit 1; fi
if kill -0 "$(cat /run/slurmctld.pid 2>/dev/null)" 2>/dev/null \
   && kill -0 "$(cat /run/slurmd.pid 2>/dev/null)" 2>/dev/null; then
  echo "slurm already up: $(sinfo -h -o '%P %T %N %c CPUs %m MB' 2>/dev/null || true)"
  exit 0
fi

t0=$(date +%s)
need=()
for b in munged mariadbd slurmdbd slurmctld slurmd sbatch; do command -v "$b" >/dev/null || need+=("$b"); done
[ -x /usr/sbin/munged ] || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing the Slurm stack (missing: ${need[*]})"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 \
    munge slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null
fi

H=$(hostname -s)
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$H
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,bf_interval=5,sched_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
NodeName=$H CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
chmod 600 /etc/slurm/slurmdbd.conf

wait_for() {  # wait_for "<shell test>" : up to 60 s
  for _ in $(seq 1 120); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "slurm-up: timed out waiting for: $1" >&2; exit 1
}
alive() { kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

# 1. munge (the package's postinst normally creates the key)
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
wait_for "munge -n | unmunge"
# 2. MariaDB, unix socket only, plus the accounting DB user
chown mysql:root /run/mysqld
if ! mariadb-admin ping >/dev/null 2>&1; then
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking </dev/null >/var/log/slurm/mariadb.log 2>&1 &
fi
wait_for "mariadb-admin ping"
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
# 3. slurmdbd, slurmctld (registers the cluster in slurmdbd by itself), slurmd
alive /run/slurmdbd.pid || slurmdbd
wait_for "sacctmgr -n list cluster"
alive /run/slurmctld.pid || slurmctld
alive /run/slurmd.pid || slurmd
wait_for "sinfo -h -o %T | grep -qxE 'idle|mixed|allocated'"
wait_for "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
echo "slurm up in $(( $(date +%s) - t0 )) s: $(sinfo -h -o '%P %T %N %c CPUs %m MB')"
