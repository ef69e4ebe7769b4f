#!/usr/bin/env bash
# Starts a real single-node SLURM cluster on this (Debian) machine, as root, for tests/test_slurm.py and for
# trying `snakemake --profile profiles/slurm` without a cluster.
#
#   tests/slurm/start-local-slurm.sh          install the packages if needed, start, wait until the node is idle
#   source "${NEUROMOE_SLURM_STATE:-/tmp/neuromoe-slurm}/env"   then sinfo, sbatch, sacct, snakemake talk to it
#   tests/slurm/stop-local-slurm.sh [--purge] stops exactly the daemons this script started
#
# What runs: munged, mariadbd (its own data dir, 127.0.0.1 only), slurmdbd (so that `sacct` answers: the
# executor plugin polls sacct, and without accounting storage it waits silently), slurmctld and slurmd.
# No systemd: each daemon runs in the foreground under setsid, its stdout/stderr go to a log file, and its pid
# goes to $STATE/pids/<name>.pid. Everything (configs, keys, spool, database, logs) lives under $STATE, nothing
# under /etc is written except the link /etc/slurm/slurm.conf -> $STATE/etc/slurm.conf (made only where no
# slurm.conf exists, removed by the stop script), which lets `srun` inside jobs find the cluster.
#
# The node is this host with the CPUs, sockets and memory `slurmd -C` reports; partitions `cpu` (default) and
# `gpu` (the names profiles/slurm uses) both hold it; GPUs are declared only when /dev/nvidia[0-9]* exist.
#
# Idempotent: daemons already running from an earlier call are left alone, missing ones are started. If a
# start fails, the daemons started by this call are stopped again, so a failure leaves nothing behind.
# Exit status: 0 ready; 2 cannot run here (not root, no apt/dpkg, a foreign SLURM on our ports); 1 failed.
#
# Environment: NEUROMOE_SLURM_STATE (default /tmp/neuromoe-slurm), NEUROMOE_SLURM_PORT (slurmctld's port,
# default 6817; slurmd, slurmdbd use the next two), NEUROMOE_SLURM_DB_PORT (default 3399),
# NEUROMOE_SLURM_TIMEOUT (seconds to wait for the idle node, default 120).
set -euo pipefail

STATE=${NEUROMOE_SLURM_STATE:-/tmp/neuromoe-slurm}
CTLD_PORT=${NEUROMOE_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=${NEUROMOE_SLURM_DB_PORT:-3399}
TIMEOUT=${NEUROMOE_SLURM_TIMEOUT:-120}
CLUSTER=neuromoe
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

say() { echo "local-slurm: $*"; }
cannot() { echo "local-slurm: cannot run here: $*" >&2; exit 2; }
die() { echo "local-slurm: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || cannot "needs root (starts system daemons)"
command -v dpkg >/dev/null && command -v apt-get >/dev/null || cannot "needs Debian's dpkg/apt-get"

# One start or stop at a time per state dir (two test sessions at once would race on apt and the daemons).
mkdir -p "$(dirname "$STATE")"
exec 9>"$STATE.lock"
flock -w 900 9 || die "another start/stop of $STATE is still running (lock $STATE.lock)"

# --- packages ---------------------------------------------------------------------------------------------
# dpkg -s also succeeds for removed packages whose config files remain: ask for "install ok installed".
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the packages' own services from starting: we start what we need, under $STATE.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; own_policy=1; fi
  ok=1
  timeout 600 apt-get update -qq >/dev/null 2>&1 || true
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 || ok=0
  [ "$own_policy" = 1 ] && rm -f "$policy"
  [ "$ok" = 1 ] || cannot "apt-get install ${missing[*]} failed (see ${TMPDIR:-/tmp}/local-slurm-apt.log)"
fi
for b in munged mungekey munge unmunge mariadbd mariadb-install-db mariadb-admin mariadb slurmdbd slurmctld slurmd sinfo sacct sacctmgr; do
  command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin:/sbin
  command -v "$b" >/dev/null || cannot "$b not found after installing ${PKGS[*]}"
done

# --- state dir --------------------------------------------------------------------------------------------
mkdir -p "$STATE"/{etc,pids,log,munge,spool/ctld,spool/d,db}
chmod 755 "$STATE" "$STATE"/etc "$STATE"/pids "$STATE"/log "$STATE"/spool
chmod 700 "$STATE"/munge "$STATE"/db   # munge key, database password
export SLURM_CONF=$STATE/etc/slurm.conf
printf 'export SLURM_CONF=%q\n' "$SLURM_CONF" >"$STATE/env"

LINKED_NOW=0
STARTED_NOW=()   # daemons started by this call: stopped again if a later step fails
on_exit() {
  rc=$?
  if [ $rc -ne 0 ] && [ ${#STARTED_NOW[@]} -gt 0 ]; then
    echo "local-slurm: stopping what this call started: ${STARTED_NOW[*]}" >&2
    for ((i = ${#STARTED_NOW[@]} - 1; i >= 0; i--)); do stop_one "${STARTED_NOW[i]}"; done
  fi
  if [ $rc -ne 0 ] && [ "$LINKED_NOW" = 1 ]; then rm -f "$ETC_CONF" "$STATE/pids/etc-link"; fi
}
trap on_exit EXIT

# A daemon counts as ours and alive when its pid file names a live process still running the binary recorded
# when it was started (pid files of a reboot or a recycled pid do not match).
alive() {
  local name=$1 pid
  pid=$(cat "$STATE/pids/$name.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(cat "$STATE/pids/$name.exe" 2>/dev/null)" ]
}
stop_one() {
  local name=$1 pid
  alive "$name" || { rm -f "$STATE/pids/$name".{pid,exe}; return 0; }
  pid=$(cat "$STATE/pids/$name.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
  [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$STATE/pids/$name".{pid,exe}
}
# start NAME CMD...: run CMD in the foreground of a new session, detached from our stdio.
start() {
  local name=$1; shift
  if alive "$name"; then say "$name already running (pid $(cat "$STATE/pids/$name.pid"))"; return 0; fi
  readlink -f "$(command -v "$1")" >"$STATE/pids/$name.exe"
  setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 9>&- &   # 9>&-: daemons must not hold our lock
  echo $! >"$STATE/pids/$name.pid"
  STARTED_NOW+=("$name")
  sleep 0.5
  alive "$name" || die "$name exited at once; see $STATE/log/$name.out: $(tail -5 "$STATE/log/$name.out" | tr '\n' ' ')"
  say "started $name (pid $(cat "$STATE/pids/$name.pid"))"
}
wait_for() {  # wait_for SECONDS WHAT CMD...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  while [ $SECONDS -lt $end ]; do
    if declare -F "$1" >/dev/null; then "$@" && return 0; else timeout 10 "$@" >/dev/null 2>&1 && return 0; fi
    sleep 0.5
  done
  die "timed out after ${secs}s waiting for $what"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A SLURM or database we did not start must not be taken over (or fought with) on our ports.
for spec in "slurmctld:$CTLD_PORT" "slurmd:$SLURMD_PORT" "slurmdbd:$DBD_PORT" "mariadbd:$DB_PORT"; do
  name=${spec%%:*}; port=${spec##*:}
  if ! alive "$name" && port_open "$port"; then
    cannot "port $port (for $name) is taken by a process this script did not start; set NEUROMOE_SLURM_PORT / NEUROMOE_SLURM_DB_PORT"
  fi
done

HOST=$(hostname -s)
NODE_LINE=$(slurmd -C | head -1)   # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. ... RealMemory=..
[[ $NODE_LINE == NodeName=* ]] || die "slurmd -C gave no node line: $NODE_LINE"

# --- configs ----------------------------------------------------------------------------------------------
GRES_NODE="" GRES_TYPES=""
gpus=(/dev/nvidia[0-9]*)
if [ -e "${gpus[0]}" ]; then
  GRES_TYPES="GresTypes=gpu"
  GRES_NODE="Gres=gpu:${#gpus[@]}"
  echo "Name=gpu File=/dev/nvidia[0-$((${#gpus[@]} - 1))]" >"$STATE/etc/gres.conf"
fi

cat >"$STATE/etc/slurm.conf.new" <<EOF
# Generated by tests/slurm/start-local-slurm.sh: a single-node test cluster. Do not use in production.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/spool/slurmctld.pid
SlurmdPidFile=$STATE/spool/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers and VMs often lack a writable cgroup tree): plain process tracking.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
# Keep sbatch --comment (the executor plugin writes rule and wildcards there) in sacct.
AccountingStoreFlags=job_comment
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
MinJobAge=300
KillWait=5
$GRES_TYPES
$NODE_LINE NodeAddr=127.0.0.1 $GRES_NODE State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
CONF_CHANGED=0
cmp -s "$STATE/etc/slurm.conf.new" "$STATE/etc/slurm.conf" || CONF_CHANGED=1
mv "$STATE/etc/slurm.conf.new" "$STATE/etc/slurm.conf"
chmod 644 "$STATE/etc/slurm.conf"

# Inside a job, the slurm-jobstep executor clears SLURM_* variables (SLURM_CONF included) before its own
# `srun`, so srun must find the config at the default path: /etc/slurm/slurm.conf becomes a link to ours.
# An /etc/slurm/slurm.conf that is not our link means a real SLURM is configured here: we do not touch it.
ETC_CONF=/etc/slurm/slurm.conf
if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$STATE/etc/slurm.conf" ]; then
  :
elif [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
  cannot "$ETC_CONF exists (a SLURM is configured on this machine); use that cluster instead"
else
  mkdir -p /etc/slurm
  ln -s "$STATE/etc/slurm.conf" "$ETC_CONF"
  echo "$ETC_CONF" >"$STATE/pids/etc-link"   # removed again by the stop script
  LINKED_NOW=1
fi

DB_PASS_FILE=$STATE/db/slurm.pass
[ -s "$DB_PASS_FILE" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
DB_PASS=$(cat "$DB_PASS_FILE")
(umask 077; cat >"$STATE/etc/slurmdbd.conf" <<EOF
# Generated by tests/slurm/start-local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/spool/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)

# --- munged -----------------------------------------------------------------------------------------------
# SLURM 22.05's clients ignore AuthInfo=socket= on their connection to slurmdbd, so munged must listen on the
# default socket. A munged already answering there (a real cluster node) is used as it is, and left alone.
MUNGE_SOCK=/run/munge/munge.socket.2
munge_ok() { timeout 10 sh -c 'munge -n </dev/null | unmunge' >/dev/null 2>&1; }
if ! alive munged && munge_ok; then
  say "using the munged already running on $MUNGE_SOCK (not started here, will not be stopped)"
else
  [ -s "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null
  chmod 600 "$STATE/munge/munge.key"
  mkdir -p /run/munge && chmod 755 /run/munge
  start munged munged --foreground --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
  wait_for 20 "munged" munge_ok
fi

# --- mariadbd ---------------------------------------------------------------------------------------------
DB_SOCK=$STATE/db/mariadbd.sock
if [ ! -d "$STATE/db/data/mysql" ]; then
  say "initialising the accounting database in $STATE/db/data"
  rm -rf "$STATE/db/data"
  mariadb-install-db --no-defaults --user=root --datadir="$STATE/db/data" --skip-test-db \
    --auth-root-authentication-method=socket >"$STATE/log/mariadb-install-db.out" 2>&1 \
    || die "mariadb-install-db failed; see $STATE/log/mariadb-install-db.out"
fi
start mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/db/data" --socket="$DB_SOCK" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/db/mariadbd.pid" \
  --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=64M --skip-name-resolve
wait_for 60 "mariadbd" mariadb-admin --no-defaults --socket="$DB_SOCK" ping
mariadb --no-defaults --socket="$DB_SOCK" -u root <<EOF || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF

# --- slurmdbd, slurmctld, slurmd --------------------------------------------------------------------------
start slurmdbd slurmdbd -D
wait_for 60 "slurmdbd" sacctmgr -n -i list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true   # slurmctld registers too; this makes it certain
if alive slurmctld && [ "$CONF_CHANGED" = 1 ]; then
  say "slurm.conf changed: restarting slurmctld and slurmd"
  stop_one slurmd; stop_one slurmctld
fi
start slurmctld slurmctld -D -i
wait_for 60 "slurmctld" scontrol ping
start slurmd slurmd -D
node_idle() { sinfo -h -N -n "$HOST" -o %t | grep -Eq '^(idle|mix|alloc)'; }
for _ in $(seq $((TIMEOUT * 2))); do node_idle && break; sleep 0.5; done
if ! node_idle; then
  # A node left DOWN/DRAINED by an earlier run (e.g. killed mid-job) is brought back once.
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  for _ in $(seq 20); do node_idle && break; sleep 0.5; done
fi
node_idle || die "node $HOST is not idle after ${TIMEOUT}s: $(sinfo -h -N -o '%N %t %E') (logs in $STATE/log)"
wait_for 30 "sacct" sacct -n -X --starttime now-1hour
trap - EXIT
say "ready: cluster $CLUSTER, node $HOST ($(sinfo -h -N -n "$HOST" -o '%c CPUs, %m MB' | head -1)), partitions cpu (default), gpu"
if [ ${#STARTED_NOW[@]} -gt 0 ]; then say "started this time: ${STARTED_NOW[*]}"; else say "already running"; fi
say "use it with: source $STATE/env   (sets SLURM_CONF=$SLURM_CONF)"
