#!/usr/bin/env bash
# Start a real Slurm (Debian's slurm-wlm + munge) on this one machine, as root.
# For tests, CI and trying the Slurm path without a cluster. Idempotent.
# munge + slurmctld + two slurmd (nodes node1 and node2 on this host, each with all
# CPUs and half the memory) so multi-node scripts (--nodes=2) schedule and run; no
# accounting (status falls back to squeue + submitit's result files); cgroup
# autodetect with IgnoreSystemd; four placeholder GPU devices per node under /dev/shm
# so `--gres=gpu:N` schedules (nothing runs on them).
#   slurm/local-cluster.sh          start (installs packages if missing)
#   slurm/local-cluster.sh stop     stop the daemons this script started (by the PIDs it recorded)
# The PIDs of the daemons it starts are appended to $HPC_INFER_SLURM_PIDS (default
# /run/hpc_infer-local-slurm.pids); `stop` signals exactly those, never by name, so a
# Slurm or munge that something else started is left alone.
set -euo pipefail
PIDS=${HPC_INFER_SLURM_PIDS:-/run/hpc_infer-local-slurm.pids}
if [ "${1:-}" = "stop" ]; then
  [ -f "$PIDS" ] || { echo "nothing to stop: $PIDS lists no daemon started by this script"; exit 0; }
  while read -r pid name; do
    # the PID must still be the daemon we started (not a reused number)
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then kill "$pid" 2>/dev/null || true; fi
  done < "$PIDS"
  for _ in $(seq 50); do
    alive=0
    while read -r pid name; do [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] && alive=1; done < "$PIDS"
    [ $alive = 0 ] && break; sleep 0.2
  done
  rm -f "$PIDS"; echo "stopped the daemons listed in $PIDS"; exit 0
fi
started() {  # started NAME PIDFILE: record the PID a daemon wrote once it has written it
  for _ in $(seq 100); do [ -s "$2" ] && break; sleep 0.1; done
  [ -s "$2" ] && echo "$(cat "$2") $1" >> "$PIDS"
}
NODES="node1 node2"
[ "$(id -u)" = 0 ] || { echo "run as root (it writes /etc/slurm and starts daemons)" >&2; exit 1; }
H=$(hostname -s)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/node1 /var/spool/slurmd/node2 /var/log/slurm /run/munge
CPUS=$(nproc)
MEM=$(( ($(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 2048) / 2 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire before it may start again (default 120 s; preemption and
# time-limit tests requeue, each waiting this long; Slurm refuses less than 5 s)
AuthInfo=cred_expire=10
# a job that waits (a requeue's begin time, resources) is started by the next scheduling
# pass: every 60 s (main) or 30 s (backfill) by default; a one-machine test cluster can
# afford one every 2 s
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ReturnToService=2
MaxArraySize=${HPC_INFER_MAX_ARRAY_SIZE:-100001}
KillWait=5
GresTypes=gpu
NodeName=node1 NodeHostname=$H NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeHostname=$H NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM Gres=gpu:l40s:4 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
# a second partition, node2 alone with its typed GPUs and a time limit: something for
# hpc-infer cluster detect to tell apart (nothing else submits there)
PartitionName=l40s Nodes=node2 MaxTime=04:00:00 State=UP OverSubscribe=FORCE:4
CONF
for i in 0 1 2 3; do touch /dev/shm/fakegpu$i; done
printf 'AutoDetect=off\nNodeName=node1 Name=gpu File=/dev/shm/fakegpu[0-3]\nNodeName=node2 Name=gpu Type=l40s File=/dev/shm/fakegpu[0-3]\n' > /etc/slurm/gres.conf
printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > /etc/slurm/cgroup.conf
test -f /etc/munge/munge.key || mungekey -c
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
# pgrep only looks (is one already running?); stopping goes by the recorded PIDs above
if ! pgrep -x munged >/dev/null; then
  rm -f /run/munge/munged.pid; su -s /bin/sh munge -c /usr/sbin/munged; started munged /run/munge/munged.pid
fi
if pgrep -x slurmctld >/dev/null; then scontrol reconfigure >/dev/null 2>&1 || true
else rm -f /run/slurmctld.pid; slurmctld; started slurmctld /run/slurmctld.pid; fi
for n in $NODES; do
  pgrep -f "slurmd -N $n\$" >/dev/null || { rm -f "/run/slurmd-$n.pid"; slurmd -N "$n"; started slurmd "/run/slurmd-$n.pid"; }
done
for _ in $(seq 30); do
  if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | grep -Ec ' (idle|mix|alloc)$')" = 2 ]; then echo "slurm up: node1 node2 on $H"; exit 0; fi
  scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm did not come up; see /var/log/slurm/" >&2
exit 1
