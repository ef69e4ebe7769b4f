#!/usr/bin/env bash
# Stops the daemons tests/slurm/start-local-slurm.sh started (and only those: each is identified by its pid
# file under $STATE/pids and checked to still run the expected binary). Jobs still queued or running on the
# test cluster are cancelled first so that no slurmstepd or job process outlives it.
#   --purge   also delete the state dir (configs, spool, accounting database, logs)
set -uo pipefail

STATE=${NEUROMOE_SLURM_STATE:-/tmp/neuromoe-slurm}
[ -d "$STATE/pids" ] || { echo "local-slurm: nothing to stop ($STATE/pids does not exist)"; exit 0; }
exec 9>"$STATE.lock"
flock -w 900 9 || { echo "local-slurm: another start/stop of $STATE is still running" >&2; exit 1; }
export SLURM_CONF=$STATE/etc/slurm.conf

alive() {
  local name=$1 pid
  pid=$(cat "$STATE/pids/$name.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(cat "$STATE/pids/$name.exe" 2>/dev/null)" ]
}

if alive slurmctld; then
  jobs=$(timeout 20 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "local-slurm: cancelling jobs $jobs"
    # shellcheck disable=SC2086
    timeout 20 scancel $jobs 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

stopped=()
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  if ! alive "$name"; then rm -f "$STATE/pids/$name".{pid,exe}; continue; fi
  pid=$(cat "$STATE/pids/$name.pid")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
  if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
  rm -f "$STATE/pids/$name".{pid,exe}
  stopped+=("$name")
done
link=$(cat "$STATE/pids/etc-link" 2>/dev/null)
if [ -n "$link" ] && [ -L "$link" ] && [ "$(readlink "$link")" = "$STATE/etc/slurm.conf" ]; then
  rm -f "$link"
fi
rm -f "$STATE/pids/etc-link"
if [ ${#stopped[@]} -gt 0 ]; then echo "local-slurm: stopped ${stopped[*]}"; else echo "local-slurm: nothing was running"; fi

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$STATE" "$STATE.lock"
  echo "local-slurm: removed $STATE"
fi
