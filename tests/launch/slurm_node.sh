#!/usr/bin/env bash
# A one-node Slurm on this machine, from Debian packages (docs/cluster.md "A one-node Slurm"):
#
#   tests/launch/slurm_node.sh up     # install slurm-wlm + munge if missing (root + apt), write slurm.conf, start
#   tests/launch/slurm_node.sh down   # stop the daemons that `up` started (none it found running)
#
# `up` exits 0 when `sinfo` shows the node idle, 3 (with one line saying why) where this OS cannot run it: no
# apt-get, not root, or no init scripts. A Slurm already answering `scontrol ping` is used as it is. The
# slurm.conf keeps finished jobs queryable for 2 h without slurmdbd (MinJobAge, jobcomp/filetxt at JOBCOMP).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK=/run/rltrain-slurm-node.started  # written by `up` when it started the daemons: `down` stops only those
JOBCOMP=/var/log/slurm/jobcomp.txt

skip() {
    echo "slurm_node.sh: cannot run a one-node Slurm here: $*" >&2
    exit 3
}

write_conf() {
    local node
    node=$(slurmd -C | head -1)
    mkdir -p /etc/slurm /var/lib/slurm/slurmd /var/lib/slurm/slurmctld /var/log/slurm
    chown -R slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
    cat >"$CONF" <<EOF
# One-node Slurm for rltrain's launcher tests: written by tests/launch/slurm_node.sh
ClusterName=rltrain
SlurmctldHost=$(hostname -s)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmUser=slurm
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
MinJobAge=7200
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    if scontrol ping 2>/dev/null | grep -q "is UP"; then
        echo "slurm_node.sh: using the Slurm already running here"
        return
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        command -v apt-get >/dev/null || skip "slurmctld/munged are not installed and there is no apt-get"
        (($(id -u) == 0)) || skip "slurmctld/munged are not installed and installing them needs root"
        echo "slurm_node.sh: installing slurm-wlm and munge (apt-get)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    (($(id -u) == 0)) || skip "starting slurmctld, slurmd and munged needs root"
    for script in munge slurmctld slurmd; do
        [[ -x /etc/init.d/$script ]] || skip "no /etc/init.d/$script"
    done
    write_conf
    touch "$MARK"
    /etc/init.d/munge start >/dev/null
    /etc/init.d/slurmctld start >/dev/null
    /etc/init.d/slurmd start >/dev/null
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -q idle; then
            echo "slurm_node.sh: one-node Slurm up: $(sinfo -h -o '%N %c CPUs %T')"
            return
        fi
        sleep 0.5
    done
    echo "slurm_node.sh: the node did not become idle within 30 s: $(sinfo -h 2>&1)" >&2
    tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
}

down() {
    [[ -e $MARK ]] || return 0
    /etc/init.d/slurmd stop >/dev/null || true
    /etc/init.d/slurmctld stop >/dev/null || true
    /etc/init.d/munge stop >/dev/null || true
    rm -f "$MARK"
    echo "slurm_node.sh: one-node Slurm stopped"
}

case ${1:-} in
up) up ;;
down) down ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
