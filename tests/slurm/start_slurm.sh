#!/usr/bin/env bash
# Start (or stop) a real single-node Slurm cluster on this host for tests/test_slurm.py.
#
#   tests/slurm/start_slurm.sh STATE_DIR          start munged, slurmctld and slurmd; wait for the node
#   tests/slurm/start_slurm.sh --stop STATE_DIR   stop the daemons started from STATE_DIR
#
# Everything lives under STATE_DIR: slurm.conf, gres.conf, spool and state folders, daemon logs,
# the job-completion log that `sacct --completion` reads, and (when no munged is running) a private
# munge key for a munged on the default socket /run/munge/munge.socket.2. Nothing under /etc is
# written. slurmd runs "configless" (it fetches slurm.conf from slurmctld and links it at
# /run/slurm/conf/slurm.conf), because job steps started inside a batch job
# (the slurm-jobstep executor's `srun`) run with SLURM_* variables scrubbed and must still find it;
# client commands in the test use SLURM_CONF=STATE_DIR/slurm.conf.
#
# Cluster: one node named after this host with 2 CPUs, 64 GB declared (memory is not a consumable
# resource here, so rules' mem_mb requests always fit) and one GPU declared in gres.conf on
# /dev/null, so `--gpus=1` / `--gres=gpu:1` requests are schedulable on GPU-less machines (jobs see
# CUDA_VISIBLE_DEVICES=0 but no CUDA device); partitions "cpu" (default) and "gpu", as named in
# workflow/profiles/slurm/partitions.yaml. No slurmdbd: accounting_storage/none plus jobcomp/filetxt
# (read with `sacct --completion`); MinJobAge=600 keeps finished jobs in `squeue --states=all` and
# `scontrol show job` for status polling.
#
# Must run as root (slurmd needs it). Needs: slurmctld, slurmd, munged, mungekey, scontrol (Debian
# packages slurm-wlm, munge; .ci/slurm_setup.sh installs them).
set -euo pipefail

usage() { echo "usage: $0 [--stop] STATE_DIR" >&2; exit 2; }

stop_daemon() {  # stop_daemon PIDFILE NAME: SIGTERM the process in PIDFILE, wait, then SIGKILL
    local pidfile=$1 name=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (pid $pid) ignored SIGTERM; killing" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

cancel_jobs() {  # cancel_jobs STATE: scancel every unfinished job of this cluster and wait for them to end
    local state=$1 jobs
    [[ -f $state/run/slurmctld.pid ]] && kill -0 "$(cat "$state/run/slurmctld.pid")" 2>/dev/null || return 0
    jobs=$(SLURM_CONF=$state/slurm.conf squeue --noheader --format=%i 2>/dev/null || true)
    [[ -n $jobs ]] || return 0
    echo "cancelling unfinished jobs: $(echo $jobs)" >&2
    # shellcheck disable=SC2086
    SLURM_CONF=$state/slurm.conf scancel $jobs || true
    for _ in $(seq 100); do
        [[ -z $(SLURM_CONF=$state/slurm.conf squeue --noheader --format=%i 2>/dev/null) ]] && return 0
        sleep 0.2
    done
    echo "jobs still listed after scancel: $(SLURM_CONF=$state/slurm.conf squeue --noheader 2>&1)" >&2
}

stop_all() {
    local state=$1
    # Jobs first: their processes (under slurmstepd) would outlive slurmd.
    cancel_jobs "$state"
    stop_daemon "$state/run/slurmd.pid" slurmd
    stop_daemon "$state/run/slurmctld.pid" slurmctld
    stop_daemon "$state/munge/munged.pid" munged
    # slurmd's configless link; only ours is removed
    if [[ -L /run/slurm/conf && $(readlink /run/slurm/conf) == "$state/"* ]]; then rm -f /run/slurm/conf; fi
}

[[ $# -ge 1 ]] || usage
if [[ $1 == --stop ]]; then
    [[ $# -eq 2 ]] || usage
    stop_all "$(realpath -m "$2")"
    exit 0
fi
[[ $# -eq 1 ]] || usage
STATE=$(realpath -m "$1")

if [[ $(id -u) -ne 0 ]]; then
    echo "start_slurm.sh must run as root (slurmd and the configless /run/slurm link need it)" >&2
    exit 1
fi
for tool in slurmctld slurmd scontrol munged mungekey munge unmunge; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run .ci/slurm_setup.sh" >&2; exit 1; }
done

NODE=$(hostname -s)
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}

# A restart from the same STATE_DIR first stops what the previous start left running.
stop_all "$STATE"
rm -rf "$STATE/ctld" "$STATE/slurmd" "$STATE/log"  # a fresh cluster: no jobs or node states carried over
mkdir -p "$STATE"/{munge,run,ctld,slurmd,log}
chmod 700 "$STATE/munge"

# munged on the default socket: configless slurmd authenticates its config request before it has
# read any slurm.conf, so it can only use the compiled-in socket path. An already running munged
# (a system one) is reused; otherwise one is started with a private key and stopped by --stop.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -f $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    mkdir -p /run/munge
    munged --force \
        --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || { echo "munge does not work; see $STATE/log/munged.log" >&2; exit 1; }

cat >"$STATE/slurm.conf" <<EOF
# Written by tests/slurm/start_slurm.sh: single-node test cluster, no accounting database.
ClusterName=saetest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmctldParameters=enable_configless
SlurmdParameters=config_overrides
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
MailProg=/bin/true
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=65536 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
cat >"$STATE/gres.conf" <<EOF
# One declared GPU with no device file: lets --gpus=1 / --gres=gpu:1 jobs schedule on GPU-less hosts.
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF

export SLURM_CONF=$STATE/slurm.conf
slurmctld -f "$STATE/slurm.conf"
# Wait for slurmctld to answer before slurmd asks it for the configuration.
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null 2>&1 || { echo "slurmctld did not come up; log:" >&2; tail -n 20 "$STATE/log/slurmctld.log" >&2; exit 1; }
slurmd -N "$NODE" --conf-server "127.0.0.1:$CTLD_PORT"

for _ in $(seq 150); do
    node_state=$(scontrol show node "$NODE" -o 2>/dev/null | sed -n 's/.* State=\([^ ]*\).*/\1/p')
    [[ $node_state == IDLE ]] && break
    sleep 0.2
done
if [[ $node_state != IDLE ]]; then
    echo "node $NODE is '$node_state', not IDLE; logs:" >&2
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2
    exit 1
fi
echo "slurm up: node $NODE idle; export SLURM_CONF=$STATE/slurm.conf"
