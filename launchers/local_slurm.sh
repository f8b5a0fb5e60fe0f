#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine (Debian slurm-wlm): munge, slurmctld, slurmd for "nodes" n1, n2.
# Used by the tests and CI to run launchers/distill_70b.slurm for real; also handy to try the launcher locally.
#
#   launchers/local_slurm.sh start DIR      # writes DIR/slurm.conf, starts the daemons, waits for idle nodes
#   export SLURM_CONF=DIR/slurm.conf; sbatch --wait ...
#   launchers/local_slurm.sh stop DIR
#
# Needs root and: apt-get install -y --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge
set -euo pipefail
cmd=${1:?start|stop}
DIR=$(mkdir -p "${2:?DIR}" && cd "$2" && pwd)
export SLURM_CONF=$DIR/slurm.conf
CPUS=${LOCAL_SLURM_CPUS:-$(nproc)}

stop() {
  for f in "$DIR"/slurmd-n1.pid "$DIR"/slurmd-n2.pid "$DIR"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
}

case $cmd in
  start)
    for bin in munged slurmctld slurmd sbatch; do
      command -v $bin >/dev/null || { echo "missing $bin: apt-get install -y --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge" >&2; exit 2; }
    done
    stop
    mkdir -p "$DIR/state" "$DIR/spool" /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" || runuser -u munge -- munged
    chown -R slurm:slurm "$DIR/state" 2>/dev/null || true
    host=$(hostname)
    cat > "$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerParameters=sched_interval=5
MailProg=/bin/true
ReturnToService=2
KillWait=30
NodeName=n1 NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001 CPUs=${CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=10000
NodeName=n2 NodeHostname=${host} NodeAddr=127.0.0.1 Port=17002 CPUs=${CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=10000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N n1
    slurmd -f "$SLURM_CONF" -N n2
    for _ in $(seq 60); do
      idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)
      [ "$idle" -ge 2 ] && { echo "local slurm up: $SLURM_CONF"; exit 0; }
      sleep 0.5
    done
    echo "nodes did not become idle; see $DIR/*.log" >&2
    exit 1
    ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
