#!/usr/bin/env bash
# The GPU check (issue 25) as one command for a lent GPU machine, whose image has PyTorch but not this
# project's other needs: it installs the wheels bench/gpu_wheels.sh put in .whl/ (carried with the tree),
# then runs bench/gpu_check.py (<= 8 minutes on one H100-class GPU) and copies its record to $OUT if set.
#   here:   bash bench/gpu_wheels.sh && make gpu-check-cohort      (wheels for Python 3.12, a small cohort cache)
#   there:  bash bench/gpu_check.sh                                (carry .whl and .gpucheck)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
cohort=()
[ -d .gpucheck/cohort ] && cohort=(--cohort .gpucheck/cohort)
out=bench/results/gpu.json
$PY bench/gpu_check.py "${cohort[@]}" --out "$out" "$@"
rc=$?
[ -n "${OUT:-}" ] && cp "$out" "$OUT/" 2>/dev/null
exit $rc
