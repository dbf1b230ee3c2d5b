#!/usr/bin/env bash
# (Copied from the project's shared notes; tests and CI use this copy.)
# Idempotent single-node SLURM on localhost (Debian 12, root, no systemd).
# Installs (if missing), configures and starts munged, [mariadbd + slurmdbd],
# slurmctld and slurmd, then waits until the node is idle.
# Env: SLURM_BASE (default /tmp/da-slurm), SLURM_ACCOUNTING=1|0 (slurmdbd+mariadb
# so that sacct works), SLURM_FAKE_GPUS (default 2; 0 disables GRES).
# Clients need: export SLURM_CONF=$SLURM_BASE/etc/slurm.conf
set -euo pipefail
BASE=${SLURM_BASE:-/tmp/da-slurm}
ACCT=${SLURM_ACCOUNTING:-1}
NGPU=${SLURM_FAKE_GPUS:-2}
PORT=${SLURM_PORT_BASE:-6817}
DBPORT=${SLURM_MARIADB_PORT:-3307}
export SLURM_CONF=$BASE/etc/slurm.conf
MSOCK=$BASE/munge/munge.socket.2
t0=$(date +%s)
log() { echo "[start-slurm $(( $(date +%s) - t0 ))s] $*"; }

# running NAME PIDFILE -> 0 if the pid in PIDFILE is alive and is NAME
running() { local p; p=$(cat "$2" 2>/dev/null) || return 1
  [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$1" ]; }
wait_for() { local what=$1 secs=$2; shift 2; local i
  for ((i = 0; i < secs * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timeout waiting for $what" >&2; return 1; }

# 1. packages
pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# 2. directories, munge key, fake GPU device nodes
mkdir -p "$BASE"/{etc,state,spool,log,run,fakedev,mysql}
install -d -m 0755 "$BASE/munge"          # munged needs o+x on the socket dir
[ -s "$BASE/munge/munge.key" ] || mungekey --create --keyfile="$BASE/munge/munge.key"
chmod 0600 "$BASE/munge/munge.key"
for ((i = 0; i < NGPU; i++)); do   # slurmd demands char/block devices in gres.conf File=
  [ -c "$BASE/fakedev/nvidia$i" ] || { rm -f "$BASE/fakedev/nvidia$i"; mknod "$BASE/fakedev/nvidia$i" c 1 3; }
done

# 3. config (rewritten every time; identical content on re-run)
# nproc honours OMP_NUM_THREADS / OMP_THREAD_LIMIT: a shell exporting OMP_NUM_THREADS=1 made a 1-CPU node whose
# jobs asking for more stayed PENDING (Reason=PartitionConfig) forever.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
GRES_NODE=""; GRES_TYPES=""
if [ "$NGPU" -gt 0 ]; then GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$NGPU"; fi
if [ "$ACCT" = 1 ]; then
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$MSOCK"
else
  ACCT_CONF="AccountingStorageType=accounting_storage/none"
fi
cat > "$SLURM_CONF" <<EOF
ClusterName=localci
SlurmctldHost=localhost
AuthType=auth/munge
AuthInfo=socket=$MSOCK,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT_CONF
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval=1: a requeued job is eligible again after cred_expire+1 s, but without a
# frequent main-scheduler pass it waits ~30 s more (measured); 1 s keeps requeues fast.
SchedulerParameters=bf_interval=1,sched_min_interval=0,sched_interval=1
MpiDefault=none
ReturnToService=2
KillWait=5
$GRES_TYPES
NodeName=localhost CPUs=$CPUS RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
echo "AutoDetect=off" > "$BASE/etc/gres.conf"
if [ "$NGPU" -gt 0 ]; then
  echo "NodeName=localhost Name=gpu File=$BASE/fakedev/nvidia[0-$((NGPU - 1))]" >> "$BASE/etc/gres.conf"
fi

# 4. munged
if ! running munged "$BASE/run/munged.pid"; then
  log "starting munged"
  munged --socket="$MSOCK" --key-file="$BASE/munge/munge.key" --pid-file="$BASE/run/munged.pid" \
         --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed"
fi
wait_for munge 10 sh -c "munge -S '$MSOCK' -n | unmunge -S '$MSOCK'"

# 5. accounting: mariadbd on 127.0.0.1:$DBPORT + slurmdbd on PORT+2
if [ "$ACCT" = 1 ]; then
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
EOF
  chmod 0600 "$BASE/etc/slurmdbd.conf"    # slurmdbd refuses a world-readable file
  SQL="mariadb --no-defaults -S $BASE/run/mysqld.sock -uroot"
  if ! running mariadbd "$BASE/run/mysqld.pid"; then
    if [ ! -d "$BASE/mysql/mysql" ]; then
      log "initialising mariadb datadir"
      mariadb-install-db --no-defaults --user=root --datadir="$BASE/mysql" \
        --auth-root-authentication-method=normal --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1
    fi
    log "starting mariadbd"
    setsid mariadbd --no-defaults --user=root --datadir="$BASE/mysql" --socket="$BASE/run/mysqld.sock" \
      --pid-file="$BASE/run/mysqld.pid" --bind-address=127.0.0.1 --port=$DBPORT \
      --log-error="$BASE/log/mariadb.err" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
  fi
  wait_for mariadb 60 $SQL -e 'select 1'
  $SQL -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  if ! running slurmdbd "$BASE/run/slurmdbd.pid"; then log "starting slurmdbd"; slurmdbd; fi
  wait_for slurmdbd 60 sacctmgr -n list cluster
fi

# 6. slurmctld + slurmd (both daemonize and write their pid files)
if ! running slurmctld "$BASE/run/slurmctld.pid"; then log "starting slurmctld"; slurmctld; fi
wait_for slurmctld 60 scontrol ping
if ! running slurmd "$BASE/run/slurmd.pid"; then log "starting slurmd"; slurmd -N localhost; fi

# 7. wait for the node; clear a DRAIN/DOWN left in saved state by an earlier bad config
for ((i = 0; i < 120; i++)); do
  st=$(sinfo -h -N -n localhost -o %t 2>/dev/null || true)
  case "$st" in
    idle|mix|alloc) log "node localhost is $st"; echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
    drain*|down*|inval*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
echo "node never became idle: $(sinfo -N -o '%N %t %E' 2>&1)" >&2
tail -n 20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2
exit 1
