#!/bin/bash
# A throwaway Slurm on loopback for tests: one slurmctld and N slurmd ("nodes" n1..nN), all on
# this machine, state under $D. Adapted from /work/shared/tools/local-slurm/start.sh so several
# clusters can coexist (ports are parameters) and munged is only stopped by whoever started it.
# Usage (root): D=/tmp/x N=2 CTLD_PORT=6817 NODE_PORT0=17001 bash start.sh   -> prints SLURM_CONF
set -euo pipefail
D=${D:?set D to a fresh folder}; N=${N:-2}; CPUS=${CPUS:-$(nproc)}
CTLD_PORT=${CTLD_PORT:-6817}; NODE_PORT0=${NODE_PORT0:-17001}
for exe in slurmctld slurmd sinfo munged; do
  command -v $exe >/dev/null || { echo "local_slurm: $exe not found (install Debian's slurmctld slurmd slurm-client munge)" >&2; exit 3; }
done
mkdir -p "$D"/{state/ctld,log,run} /run/munge && chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
fi
if [ ! -S /run/munge/munge.socket.2 ] || ! munge -n >/dev/null 2>&1; then
  rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
  timeout 20 runuser -u munge -- munged              # daemonizes, pid -> /run/munge/munged.pid
  cp /run/munge/munged.pid "$D/run/munged.pid"     # ours: stop.sh ends it
fi
cat > "$D/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/d-%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
NodeName=n[1-$N] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$NODE_PORT0-$((NODE_PORT0 + N - 1))] CPUs=$CPUS RealMemory=1000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$D/slurm.conf
timeout 20 slurmctld -i -f "$SLURM_CONF"                 # daemonizes
for i in $(seq 1 "$N"); do mkdir -p "$D/state/d-n$i"; timeout 20 slurmd -f "$SLURM_CONF" -N "n$i"; done
for _ in $(seq 120); do [ "$(timeout 5 sinfo -h -o '%D %T' 2>/dev/null)" = "$N idle" ] && break; sleep 0.5; done
[ "$(timeout 5 sinfo -h -o '%D %T' 2>/dev/null)" = "$N idle" ] || { echo "local_slurm: nodes not idle:" >&2; timeout 5 sinfo -N >&2; exit 4; }
echo "export SLURM_CONF=$SLURM_CONF"
