#!/usr/bin/env bash
# A real single-node SLURM cluster (with slurmdbd accounting) on this machine, for tests.
#
#   scripts/slurm-dev-cluster.sh install   apt-get install the Debian packages (skipped when present)
#   scripts/slurm-dev-cluster.sh start     install if needed, then start munged, MariaDB, slurmdbd,
#                                          slurmctld, slurmd; wait until the node is idle and sacct works
#   scripts/slurm-dev-cluster.sh status    exit 0 and print a summary when up, exit 3 when not
#   scripts/slurm-dev-cluster.sh stop      cancel this cluster's jobs, stop what `start` started
#   scripts/slurm-dev-cluster.sh env       print SLURM_CONF=<dir>/slurm.conf
#
# Use it from a shell with:  export "$(scripts/slurm-dev-cluster.sh env)"
#
# Needs root and Debian/Ubuntu (slurm 22.05 from Debian 12 is what it was written against).
# Everything lives under ONE folder, ${KDFLOW_SLURM_DIR:-/tmp/kdflow-slurm}:
#   slurm.conf, slurmdbd.conf (600), my.cnf      configs; nothing is written to /etc
#   munge/     its own munge key, socket, pid, log, seed (owner munge, dir 755, key 400); AuthInfo=socket=... points
#              slurm at it, so a system munged (if any) is neither used nor disturbed
#   mysql/     MariaDB datadir, socket, pid file and error log (owner mysql); listens on 127.0.0.1 only,
#              on a non-default port
#   state/ spool/ run/ log/                      slurmctld state, slurmd spool, pid files, daemon logs
# Ports (non-default, so a system slurm/MariaDB cannot clash): slurmctld $KDFLOW_SLURM_PORT_BASE
# (default 16817), slurmd +1, slurmdbd +2; MariaDB $KDFLOW_SLURM_DB_PORT (default 16033).
# Daemons are stopped by the PIDs in the pid files of this folder (checked against /proc to be ours);
# nothing is ever killed by name.
set -euo pipefail

DIR=$(realpath -m "${KDFLOW_SLURM_DIR:-/tmp/kdflow-slurm}")
PORT_BASE=${KDFLOW_SLURM_PORT_BASE:-16817}
DB_PORT=${KDFLOW_SLURM_DB_PORT:-16033}
START_TIMEOUT=${KDFLOW_SLURM_START_TIMEOUT:-120}
CLUSTER=${KDFLOW_SLURM_CLUSTER_NAME:-kdflow}
CRED_EXPIRE=${KDFLOW_SLURM_CRED_EXPIRE:-15}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

CONF=$DIR/slurm.conf
DBD_CONF=$DIR/slurmdbd.conf
MY_CNF=$DIR/my.cnf
MUNGE_DIR=$DIR/munge
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGE_SOCK=$MUNGE_DIR/munge.socket
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_LOG=$MUNGE_DIR/munged.log
MYSQL_DIR=$DIR/mysql
MYSQL_DATA=$MYSQL_DIR/data
MYSQL_SOCK=$MYSQL_DIR/mysqld.sock
MYSQL_PID=$MYSQL_DIR/mariadbd.pid
MYSQL_LOG=$MYSQL_DIR/mariadb.log
DB_PASS_FILE=$DIR/db-password
RUN=$DIR/run
LOG=$DIR/log
CTLD_PID=$RUN/slurmctld.pid
SLURMD_PID=$RUN/slurmd.pid
DBD_PID=$RUN/slurmdbd.pid
NODE=$(hostname -s)

export SLURM_CONF=$CONF

say() { echo "[slurm-dev-cluster] $*"; }
die() { echo "[slurm-dev-cluster] ERROR: $*" >&2; exit 1; }

need_root() { [[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"; }

# ---------------------------------------------------------------------------------------------------
# processes: a pid file names a process of ours only if it is alive (not a zombie: PID 1 here may not
# reap), has the expected name, and mentions this state folder in its command line or environment.
# ---------------------------------------------------------------------------------------------------
alive() {
  local pid=$1 st
  [[ -r /proc/$pid/stat ]] || return 1
  st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

ours() {  # ours PIDFILE COMM -> prints the pid
  local f=$1 comm=$2 pid
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' 2>/dev/null <"$f") || return 1
  [[ -n $pid ]] && alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
  local cmdline environ
  cmdline=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline") || true
  environ=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || true
  grep -qF -- "$DIR" <<<"$cmdline" || grep -qxF -- "SLURM_CONF=$CONF" <<<"$environ" || return 1
  echo "$pid"
}

stop_pid() {  # stop_pid NAME PIDFILE COMM TIMEOUT
  local name=$1 f=$2 comm=$3 timeout=$4 pid i
  if ! pid=$(ours "$f" "$comm"); then
    say "$name: not running"
    rm -f "$f"
    return 0
  fi
  say "stopping $name (pid $pid)..."
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    say "$name (pid $pid) still alive after ${timeout}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$f"
}

port_free() {  # port_free PORT WHAT: die early with a clear message when something listens there
  if command -v ss >/dev/null && [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; then
    die "port $1 ($2) is already in use by another process; pick others with KDFLOW_SLURM_PORT_BASE / KDFLOW_SLURM_DB_PORT"
  fi
}

WATCH_PID=  # wait_for gives up at once when this process (one we just started) has died
wait_for() {  # wait_for DESCRIPTION TIMEOUT LOGFILE CMD... : poll CMD until it succeeds
  local desc=$1 timeout=$2 logfile=$3; shift 3
  local deadline=$((SECONDS + timeout)) dead=
  until "$@" 3>&1 >/dev/null 2>&1; do  # fd 3: progress lines from inside CMD
    if [[ -n $WATCH_PID ]] && ! alive "$WATCH_PID"; then dead=1; fi
    if [[ -n $dead ]] || ((SECONDS >= deadline)); then
      if [[ -n $dead ]]; then
        echo "[slurm-dev-cluster] ERROR: the process (pid $WATCH_PID) exited while waiting for $desc" >&2
      else
        echo "[slurm-dev-cluster] ERROR: timed out after ${timeout}s waiting for $desc" >&2
      fi
      if [[ $desc == node* ]]; then
        echo "---- sinfo -N -o '%N %T %E' ----" >&2
        sinfo -N -o '%N %T %E' >&2 2>&1 || true
      fi
      if [[ -n $logfile && -f $logfile ]]; then
        echo "---- last 40 lines of $logfile ----" >&2
        tail -n 40 "$logfile" >&2
        echo "----" >&2
      fi
      exit 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------------
missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

cmd_install() {
  need_root
  local missing
  missing=$(missing_packages | tr '\n' ' ')
  if [[ -z ${missing// /} ]]; then
    say "packages already installed: ${PACKAGES[*]}"
    return 0
  fi
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: $missing"
  say "installing packages: $missing(apt-get update + install)..."
  local t0=$SECONDS aptlog
  aptlog=$(mktemp /tmp/slurm-dev-cluster-apt.XXXXXX)
  if ! { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=180 update -q &&
         DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=180 install -y -q --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}"; } \
         >"$aptlog" 2>&1; then
    tail -n 40 "$aptlog" >&2
    die "apt-get failed (full log: $aptlog)"
  fi
  rm -f "$aptlog"
  say "packages installed in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------
write_configs() {
  local cpus mem_total real_mem def_mem pass
  cpus=$(nproc)
  mem_total=$(free -m | awk '/^Mem:/{print $2}')
  real_mem=$((mem_total * 95 / 100))               # a bit under what slurmd will detect
  def_mem=$((real_mem / cpus))                       # else a job without --mem takes the whole node

  install -d -m 755 "$DIR" "$DIR/state" "$DIR/spool" "$DIR/spool/slurmd" "$RUN" "$LOG"

  cat >"$CONF.tmp" <<EOF
# Generated by scripts/slurm-dev-cluster.sh; rewritten on every start from a stopped state.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (job credential lifetime; default 120 s) is also how long a requeued job waits before
# it may start again: short, so that requeue tests do not wait two minutes
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,bf_resolution=1
ReturnToService=2
MaxArraySize=10001
MaxJobCount=50000
MinJobAge=60
KillWait=5
JobRequeue=1
PreemptType=preempt/none
PreemptMode=OFF
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT_BASE + 2))
# slurm takes the munge socket for talking to slurmdbd from here, not from AuthInfo
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  : >"$DIR/plugstack.conf"

  if [[ ! -s $DB_PASS_FILE ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
  fi
  pass=$(cat "$DB_PASS_FILE")
  (umask 077; cat >"$DBD_CONF.tmp" <<EOF
# Generated by scripts/slurm-dev-cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
  )
  chown root:root "$DBD_CONF.tmp"; chmod 600 "$DBD_CONF.tmp"
  mv "$DBD_CONF.tmp" "$DBD_CONF"

  cat >"$MY_CNF" <<EOF
# Generated by scripts/slurm-dev-cluster.sh: a private MariaDB for slurmdbd (loopback only).
[mysqld]
user=mysql
datadir=$MYSQL_DATA
socket=$MYSQL_SOCK
pid-file=$MYSQL_PID
log-error=$MYSQL_LOG
port=$DB_PORT
bind-address=127.0.0.1
skip-name-resolve
innodb_buffer_pool_size=256M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
max_allowed_packet=16M
[client]
socket=$MYSQL_SOCK
port=$DB_PORT
EOF
  chmod 644 "$MY_CNF"
}

# ---------------------------------------------------------------------------------------------------
# daemons
# ---------------------------------------------------------------------------------------------------
munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }

start_munged() {
  if ours "$MUNGE_PID" munged >/dev/null && munge_ok; then say "munged: already running"; return; fi
  say "starting munged..."
  install -d -o munge -g munge -m 755 "$MUNGE_DIR"
  if [[ ! -s $MUNGE_KEY ]]; then
    say "creating a munge key in $MUNGE_KEY"
    mungekey --create --keyfile="$MUNGE_KEY"
  fi
  chown munge:munge "$MUNGE_KEY"; chmod 400 "$MUNGE_KEY"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$MUNGE_PID"
  touch "$MUNGE_LOG"; chown munge:munge "$MUNGE_LOG"; chmod 640 "$MUNGE_LOG"  # munged insists
  runuser -u munge -- /usr/sbin/munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCK" \
    --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" --seed-file="$MUNGE_DIR/munged.seed" \
    </dev/null >/dev/null 2>>"$MUNGE_LOG" || { tail -n 20 "$MUNGE_LOG" >&2 2>/dev/null; die "munged failed to start"; }
  wait_for "munged (munge -n | unmunge)" 20 "$MUNGE_LOG" munge_ok
}

db_ok() { mariadb --defaults-file="$MY_CNF" -uroot -e 'SELECT 1'; }

start_mariadb() {
  if ours "$MYSQL_PID" mariadbd >/dev/null && db_ok >/dev/null 2>&1; then
    say "mariadb: already running"
  else
    install -d -o mysql -g mysql -m 750 "$MYSQL_DIR"
    if [[ ! -d $MYSQL_DATA/mysql ]]; then
      say "initialising MariaDB datadir $MYSQL_DATA..."
      rm -rf "$MYSQL_DATA"
      mariadb-install-db --defaults-file="$MY_CNF" --user=mysql --datadir="$MYSQL_DATA" \
        --skip-test-db --auth-root-authentication-method=socket >"$LOG/mariadb-install-db.log" 2>&1 \
        || { tail -n 30 "$LOG/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    fi
    say "starting MariaDB (127.0.0.1:$DB_PORT, socket $MYSQL_SOCK)..."
    rm -f "$MYSQL_PID"
    port_free "$DB_PORT" MariaDB
    setsid /usr/sbin/mariadbd --defaults-file="$MY_CNF" </dev/null >>"$MYSQL_LOG" 2>&1 &
    WATCH_PID=$!
    wait_for "MariaDB to accept connections" 60 "$MYSQL_LOG" db_ok
    WATCH_PID=
  fi
  local pass; pass=$(cat "$DB_PASS_FILE")
  mariadb --defaults-file="$MY_CNF" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
  if ours "$DBD_PID" slurmdbd >/dev/null && dbd_ok >/dev/null 2>&1; then
    say "slurmdbd: already running"
  else
    say "starting slurmdbd..."
    port_free $((PORT_BASE + 2)) slurmdbd
    rm -f "$DBD_PID"
    slurmdbd </dev/null >/dev/null 2>>"$LOG/slurmdbd.log" || { tail -n 30 "$LOG/slurmdbd.log" >&2 2>/dev/null; die "slurmdbd failed to start"; }
    wait_for "slurmdbd to answer sacctmgr" 60 "$LOG/slurmdbd.log" dbd_ok
  fi
  if ! dbd_ok 2>/dev/null | grep -qxF "$CLUSTER"; then
    say "registering cluster '$CLUSTER' in the accounting database..."
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

ctld_ok() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
  if ours "$CTLD_PID" slurmctld >/dev/null && ctld_ok >/dev/null 2>&1; then
    say "slurmctld: already running"; return
  fi
  say "starting slurmctld..."
  port_free "$PORT_BASE" slurmctld
  rm -f "$CTLD_PID"
  slurmctld -f "$CONF" </dev/null >/dev/null 2>>"$LOG/slurmctld.log" || { tail -n 30 "$LOG/slurmctld.log" >&2 2>/dev/null; die "slurmctld failed to start"; }
  wait_for "slurmctld to answer scontrol ping" 60 "$LOG/slurmctld.log" ctld_ok
}

start_slurmd() {
  if ours "$SLURMD_PID" slurmd >/dev/null; then say "slurmd: already running"; return; fi
  say "starting slurmd..."
  port_free $((PORT_BASE + 1)) slurmd
  rm -f "$SLURMD_PID"
  slurmd -f "$CONF" </dev/null >/dev/null 2>>"$LOG/slurmd.log" || { tail -n 30 "$LOG/slurmd.log" >&2 2>/dev/null; die "slurmd failed to start"; }
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }
node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
node_ready_or_resume() {  # a drained node (e.g. after an unclean stop) is resumed once per start
  node_ready && return 0
  if [[ -z ${RESUMED:-} && $(node_state) =~ drain|down ]]; then
    RESUMED=1
    say "node $NODE is $(node_state): scontrol update State=RESUME" >&3
    scontrol update NodeName="$NODE" State=RESUME >&3 2>&1 || true
  fi
  return 1
}
sacct_ok() {
  local out
  out=$(sacct -n -X -S now-1hours -o JobID 2>&1) || return 1
  ! grep -qi 'accounting storage is disabled' <<<"$out"
}

all_pids_ours() {
  ours "$MUNGE_PID" munged >/dev/null && ours "$MYSQL_PID" mariadbd >/dev/null &&
    ours "$DBD_PID" slurmdbd >/dev/null && ours "$CTLD_PID" slurmctld >/dev/null &&
    ours "$SLURMD_PID" slurmd >/dev/null
}
cluster_up() { [[ -f $CONF ]] && all_pids_ours && node_ready && sacct_ok; }

any_slurm_running() {
  ours "$DBD_PID" slurmdbd >/dev/null || ours "$CTLD_PID" slurmctld >/dev/null ||
    ours "$SLURMD_PID" slurmd >/dev/null || ours "$MYSQL_PID" mariadbd >/dev/null ||
    ours "$MUNGE_PID" munged >/dev/null
}

cmd_start() {
  need_root
  local t0=$SECONDS
  if cluster_up; then
    say "already up (node $NODE: $(node_state)); state folder $DIR"
    echo "SLURM_CONF=$CONF"
    return 0
  fi
  if [[ -n $(missing_packages) ]]; then cmd_install; fi
  if [[ -f $CONF ]] && any_slurm_running; then
    say "some daemons are running: keeping the existing configs in $DIR"
  else
    say "writing configs to $DIR..."
    write_configs
  fi
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  say "waiting for node $NODE to be idle..."
  wait_for "node $NODE to become idle" "$START_TIMEOUT" "$LOG/slurmd.log" node_ready_or_resume
  say "waiting for sacct (accounting)..."
  wait_for "sacct to answer with accounting enabled" 60 "$LOG/slurmdbd.log" sacct_ok
  say "up in $((SECONDS - t0))s: node $NODE $(node_state), partition debug, accounting via slurmdbd"
  echo "SLURM_CONF=$CONF"
}

cmd_stop() {
  need_root
  if ours "$CTLD_PID" slurmctld >/dev/null && [[ -f $CONF ]]; then
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
      say "cancelling jobs still on the dev cluster: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local i
      for ((i = 0; i < 30; i++)); do
        [[ -z $(squeue -h -t RUNNING,COMPLETING -o '%A' 2>/dev/null) ]] && break
        sleep 0.5
      done
    fi
  fi
  stop_pid slurmd "$SLURMD_PID" slurmd 15
  # slurmstepd processes outlive slurmd by design; end the ones our slurmd started (same SLURM_CONF)
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ $(cat "/proc/$p/comm" 2>/dev/null) == slurmstepd ]] || continue
    if grep -qxF -- "SLURM_CONF=$CONF" <<<"$(tr '\0' '\n' 2>/dev/null <"/proc/$p/environ")"; then
      say "ending leftover slurmstepd (pid $p)"
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  stop_pid slurmctld "$CTLD_PID" slurmctld 15
  stop_pid slurmdbd "$DBD_PID" slurmdbd 15
  stop_pid mariadb "$MYSQL_PID" mariadbd 60
  stop_pid munged "$MUNGE_PID" munged 10
  say "stopped (state kept in $DIR; delete it for a fresh cluster)"
}

cmd_status() {
  local up=0 name f comm pid
  echo "state folder: $DIR"
  for spec in "munged:$MUNGE_PID:munged" "mariadb:$MYSQL_PID:mariadbd" "slurmdbd:$DBD_PID:slurmdbd" \
              "slurmctld:$CTLD_PID:slurmctld" "slurmd:$SLURMD_PID:slurmd"; do
    IFS=: read -r name f comm <<<"$spec"
    if pid=$(ours "$f" "$comm"); then
      printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '  %-10s NOT running\n' "$name"; up=1
    fi
  done
  if [[ $up -eq 0 ]]; then
    local st; st=$(node_state || true)
    printf '  %-10s %s\n' "node" "$NODE: ${st:-unknown}"
    node_ready || up=1
    if sacct_ok; then printf '  %-10s enabled\n' "accounting"; else printf '  %-10s NOT answering\n' "accounting"; up=1; fi
  fi
  echo "SLURM_CONF=$CONF"
  if [[ $up -eq 0 ]]; then echo "status: up"; return 0; fi
  echo "status: down"; return 3
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
