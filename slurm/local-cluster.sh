#!/usr/bin/env bash
# Start a real single-node Slurm (Debian's slurm-wlm + munge) on this machine, as root.
# For tests, CI and trying the Slurm path without a cluster. Idempotent.
# munge + slurmctld + slurmd; no accounting (status falls back to squeue + submitit's
# result files); cgroup autodetect with IgnoreSystemd; four placeholder GPU devices
# under /dev/shm so `--gres=gpu:N` schedules (nothing runs on them).
#   slurm/local-cluster.sh          start (installs packages if missing)
#   slurm/local-cluster.sh stop     stop the daemons
set -euo pipefail
if [ "${1:-}" = "stop" ]; then
  pkill -x slurmd || true; pkill -x slurmctld || true; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "run as root (it writes /etc/slurm and starts daemons)" >&2; exit 1; }
H=$(hostname -s)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 2048 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MaxArraySize=${HPC_INFER_MAX_ARRAY_SIZE:-100001}
KillWait=5
GresTypes=gpu
NodeName=$H CPUs=$CPUS RealMemory=$MEM Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
for i in 0 1 2 3; do touch /dev/shm/fakegpu$i; done
printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/shm/fakegpu[0-3]\n' "$H" > /etc/slurm/gres.conf
printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > /etc/slurm/cgroup.conf
test -f /etc/munge/munge.key || mungekey -c
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
if pgrep -x slurmctld >/dev/null; then scontrol reconfigure >/dev/null 2>&1 || true; else slurmctld; fi
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then echo "slurm up on $H"; exit 0; fi
  scontrol update nodename="$H" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm did not come up; see /var/log/slurm/" >&2
exit 1
