#!/bin/bash
# Stop what start.sh started under $D: cancel jobs (their steps would outlive slurmd), then the
# daemons whose pid files are in $D/run (munged only if this cluster started it).
D=${D:?set D}; export SLURM_CONF=$D/slurm.conf
jobs=$(timeout 5 squeue -h -o %i 2>/dev/null)
[ -n "$jobs" ] && timeout 10 scancel --full $jobs 2>/dev/null
for _ in $(seq 40); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
pids=$(cat "$D"/run/slurm*.pid 2>/dev/null)
[ -n "$pids" ] && kill -TERM $pids 2>/dev/null
for p in $pids; do for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done; kill -KILL "$p" 2>/dev/null; done
m=$(cat "$D/run/munged.pid" 2>/dev/null)
[ -n "$m" ] && kill -TERM "$m" 2>/dev/null
exit 0
