#!/usr/bin/env bash
# Wheels for the GPU machine's Python 3.12 (its image has torch, numpy, pandas, scipy, safetensors, yaml, tqdm,
# pytest): what neuromoe.learn imports beyond those, at requirements.txt's versions, into .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  nibabel==5.4.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
ls -la .whl
