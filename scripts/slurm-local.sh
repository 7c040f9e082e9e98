#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests of raybench.slurm (tests/test_slurm.py) and for trying it:
#   sudo bash scripts/slurm-local.sh start    # prints `export SLURM_CONF=...`; idempotent
#   sudo bash scripts/slurm-local.sh stop     # stops the daemons it started, by their pid files
#   bash scripts/slurm-local.sh status        # exit status 0 while they run
# Needs root and Debian's slurm-wlm and munge packages (`apt-get install slurm-wlm munge`). Everything lives in
# $RAYBENCH_SLURM_DIR (/tmp/raybench-slurm): its own slurm.conf (reached through SLURM_CONF, so an
# /etc/slurm of a real cluster is left alone), its own munge key and socket, ports 16817/16818, no cgroups, no
# accounting database. One partition, `debug`, holding this machine's CPUs and most of its memory.
set -euo pipefail
S=${RAYBENCH_SLURM_DIR:-/tmp/raybench-slurm}
CTLD_PORT=${RAYBENCH_SLURMCTLD_PORT:-16817}
D_PORT=${RAYBENCH_SLURMD_PORT:-16818}
export SLURM_CONF=$S/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
    for f in "$S/d.pid" "$S/ctld.pid" "$S/munge/munged.pid"; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$f"
    done
}

start() {
    [ "$(id -u)" = 0 ] || { echo "error: slurm-local.sh needs root (slurmd starts jobs as their users)" >&2; exit 1; }
    for cmd in slurmctld slurmd munged mungekey sinfo; do
        command -v "$cmd" >/dev/null || { echo "error: $cmd not found; apt-get install slurm-wlm munge" >&2; exit 1; }
    done
    mkdir -p "$S/spool" "$S/state" "$S/log" "$S/munge"
    chown munge:munge "$S/munge" && chmod 755 "$S/munge"  # clients reach the socket inside
    [ -f "$S/munge/munge.key" ] || { mungekey -c -k "$S/munge/munge.key" && chown munge:munge "$S/munge/munge.key"; }
    chmod 400 "$S/munge/munge.key"
    if ! alive "$S/munge/munged.pid"; then
        su -s /bin/sh munge -c "/usr/sbin/munged --socket=$S/munge/munge.socket --key-file=$S/munge/munge.key \
            --pid-file=$S/munge/munged.pid --log-file=$S/munge/munged.log --seed-file=$S/munge/munged.seed"
    fi
    host=$(hostname -s)
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') * 8 / 10 ))  # above what the machine has, slurmd drains it
    conf=$(cat <<EOF
ClusterName=raybench-local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldLogFile=$S/log/ctld.log
SlurmdLogFile=$S/log/d.log
SlurmctldPidFile=$S/ctld.pid
SlurmdPidFile=$S/d.pid
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [ ! -f "$SLURM_CONF" ] || [ "$(cat "$SLURM_CONF")" != "$conf" ]; then  # a new machine size: restart
        for f in "$S/d.pid" "$S/ctld.pid"; do alive "$f" && kill "$(cat "$f")" && sleep 1; rm -f "$f"; done
        printf '%s\n' "$conf" > "$SLURM_CONF"
    fi
    alive "$S/ctld.pid" || slurmctld -f "$SLURM_CONF"
    alive "$S/d.pid" || slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "error: the local SLURM did not come up; see $S/log/ctld.log and $S/log/d.log" >&2
    sinfo >&2 || true
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) alive "$S/ctld.pid" && alive "$S/d.pid" ;;  # exit status 0 when both daemons run
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
