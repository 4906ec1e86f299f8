#!/usr/bin/env bash
# Start a single-node Slurm "cluster" on this machine, for tests of `srun` launches.
#
# Usage:  sudo scripts/start_slurm.sh          (needs root: apt-get, munged, slurmd)
#         srun -n 4 --overcommit python -m hfrl.cli layout --json
#
# Idempotent: if `srun -n 4 --overcommit hostname` already works it exits 0 at once. Otherwise it
#   1. installs slurm-wlm + munge with apt-get if `srun` is missing,
#   2. creates a munge key if missing and starts munged (as the munge user),
#   3. writes a one-node slurm.conf (this host, $(nproc) CPUs, partition "debug" with
#      OverSubscribe=FORCE:8, no cgroups, MpiDefault=none) where this Slurm build reads it,
#      state/spool/log/pid files under /tmp/hfrl-slurm,
#   4. (re)starts slurmctld and slurmd and waits (bounded) until srun works,
#      printing the Slurm logs if it does not.
# Environment: HFRL_SLURM_DIR (default /tmp/hfrl-slurm), HFRL_SLURM_TIMEOUT (default 60 seconds).
set -euo pipefail

SLURM_DIR="${HFRL_SLURM_DIR:-/tmp/hfrl-slurm}"
WAIT_S="${HFRL_SLURM_TIMEOUT:-60}"
PROBE=(srun -n 4 --overcommit hostname)

log() { echo "[start_slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

probe() { timeout "${1:-10}" "${PROBE[@]}" >/dev/null 2>&1; }
# Is process $1 running? (A zombie passes `kill -0`, and containers often have no reaper.)
alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != "Z" ]
}

# ---- 0. already up? ---------------------------------------------------------------------------
# `scontrol ping` answers at once; srun would spend ~9 s retrying a dead controller.
if command -v srun >/dev/null 2>&1 && scontrol ping 2>/dev/null | grep -q 'is UP' && probe 20; then
    log "slurm already up: '${PROBE[*]}' works"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, munged and slurmd need it)"

# ---- 1. install ---------------------------------------------------------------------------------
if ! command -v srun >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
        || ! command -v munged >/dev/null 2>&1; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$SLURM_DIR"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        >"$SLURM_DIR/apt.log" 2>&1 \
        || { tail -n 30 "$SLURM_DIR/apt.log" >&2; die "apt-get install slurm-wlm munge failed"; }
fi

mkdir -p "$SLURM_DIR"/{state,spool,log,run}

# ---- 2. munge -----------------------------------------------------------------------------------
MUNGE_KEY=/etc/munge/munge.key
if [ ! -s "$MUNGE_KEY" ]; then
    log "creating munge key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" --force
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
fi
chown -R munge:munge /etc/munge
chmod 700 /etc/munge
chmod 400 "$MUNGE_KEY"
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    # A stale socket/pid from a dead munged makes a new one refuse to start.
    if [ -f /run/munge/munged.pid ] && ! alive "$(cat /run/munge/munged.pid)"; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- munged || true
    else
        su -s /bin/sh munge -c munged || true
    fi
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || { tail -n 30 /var/log/munge/munged.log >&2 || true; die "munged did not start"; }
fi

# ---- 3. slurm.conf ------------------------------------------------------------------------------
# Where does this build read slurm.conf? Debian: /etc/slurm/slurm.conf (older: /etc/slurm-llnl).
# The default path is compiled into libslurmfull; SLURM_CONF overrides it.
find_conf() {
    if [ -n "${SLURM_CONF:-}" ]; then echo "$SLURM_CONF"; return; fi
    local lib path
    lib="$(ldd "$(command -v srun)" 2>/dev/null | awk '/libslurm/ {print $3; exit}')"
    if [ -n "$lib" ] && [ -r "$lib" ]; then
        path="$(grep -aoE '/(etc|usr|opt)[A-Za-z0-9_/.-]*/slurm\.conf' "$lib" | head -n 1 || true)"
        if [ -n "$path" ]; then echo "$path"; return; fi
    fi
    if [ -d /etc/slurm-llnl ] && [ ! -d /etc/slurm ]; then echo /etc/slurm-llnl/slurm.conf; return; fi
    echo /etc/slurm/slurm.conf
}
CONF="$(find_conf)"
HOST="$(hostname -s)"
NCPU="$(nproc)"
ADDR="$(getent hosts "$HOST" | awk '{print $1; exit}')"
ADDR="${ADDR:-127.0.0.1}"
mkdir -p "$(dirname "$CONF")"
log "writing $CONF (node $HOST/$ADDR, $NCPU CPUs)"
cat >"$CONF" <<EOF
# Written by hfrl scripts/start_slurm.sh: a one-node test cluster.
ClusterName=hfrl
SlurmctldHost=${HOST}(${ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=${SLURM_DIR}/state
SlurmdSpoolDir=${SLURM_DIR}/spool/slurmd-%n
SlurmctldPidFile=${SLURM_DIR}/run/slurmctld.pid
SlurmdPidFile=${SLURM_DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${SLURM_DIR}/log/slurmctld.log
SlurmdLogFile=${SLURM_DIR}/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
Waittime=0
NodeName=${HOST} NodeAddr=${ADDR} CPUs=${NCPU} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF

# ---- 4. (re)start the daemons -------------------------------------------------------------------
stop_pidfile() {  # stop only the daemon this script started, by the id in its pid file
    local f="$1" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f" 2>/dev/null || true)"
    if alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$f"
}
stop_pidfile "$SLURM_DIR/run/slurmd-$HOST.pid"
stop_pidfile "$SLURM_DIR/run/slurmctld.pid"

log "starting slurmctld and slurmd"
slurmctld -c || die "slurmctld failed to start: $(tail -n 30 "$SLURM_DIR/log/slurmctld.log" 2>/dev/null)"
slurmd || die "slurmd failed to start: $(tail -n 30 "$SLURM_DIR/log/slurmd-$HOST.log" 2>/dev/null)"

# ---- 5. wait until srun works -------------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
while :; do
    if probe 15; then
        log "slurm up after ${SECONDS}s: '${PROBE[*]}' works"
        exit 0
    fi
    # A node left DOWN/DRAIN by an earlier run: put it back.
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
    case "$state" in
        *drain*|*down*|*fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "ERROR: '${PROBE[*]}' still fails after ${WAIT_S}s"
        echo "---- last attempt ----" >&2
        timeout 15 "${PROBE[@]}" >&2 || true
        echo "---- sinfo ----" >&2
        sinfo -N -l >&2 || true
        echo "---- $CONF ----" >&2
        cat "$CONF" >&2
        for f in "$SLURM_DIR"/log/slurmctld.log "$SLURM_DIR"/log/slurmd-*.log; do
            [ -f "$f" ] || continue
            echo "---- tail $f ----" >&2
            tail -n 40 "$f" >&2
        done
        exit 1
    fi
    sleep 1
done
