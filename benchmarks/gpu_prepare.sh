#!/usr/bin/env bash
# Before a GPU run, on the CPU machine: fill the two git-ignored folders a bare GPU machine
# without network needs, then name both in the run's carry list.
#
#   benchmarks/gpu_prepare.sh [DATA_DIR]      (DATA_DIR: default $FASTCASCADE_DATA or ../shared/data)
#
#   wheels/      wheels for what the GPU image lacks (nibabel), for its Python 3.12;
#                benchmarks/gpu_check.sh installs them first
#   carry/data/  case A's CT and reference labels (2.3 MB), the layout of the data folder;
#                gpu_check.sh points FASTCASCADE_DATA there when it is set to nothing else
#
# Then, on the GPU machine (both folders carried along; what comes back from it is OUTDIR's
# two files, gpu_check.tar.gz and gpu_check_summary.md):
#
#   benchmarks/gpu_check.sh --area all --quick --budget 540 "$OUT"
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DATA="${1:-${FASTCASCADE_DATA:-$ROOT/../shared/data}}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"

mkdir -p wheels
rm -f wheels/nibabel-*.whl  # one version of each: two would stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform any --dest wheels nibabel
echo "wheels/: $(ls wheels | tr '\n' ' ')"

CASE_A="$DATA/ct/case_a"
if [ -f "$CASE_A/example_ct.nii.gz" ]; then
  mkdir -p carry/data/ct/case_a
  cp "$CASE_A/example_ct.nii.gz" "$CASE_A/example_seg_fast_force_split.nii.gz" carry/data/ct/case_a/
  echo "carry/data/: case A ($(du -sh carry/data | cut -f1))"
else
  echo "no case A under $DATA: the GPU run will use phantoms only"
fi
echo "carry: [\"wheels\", \"carry\"] ($(du -shc wheels carry 2> /dev/null | tail -1 | cut -f1))"
echo "then: benchmarks/gpu_check.sh --area all --quick --budget 540 \"\$OUT\""
benchmarks/gpu_check.sh --area all --quick --plan
