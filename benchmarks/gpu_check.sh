#!/usr/bin/env bash
# GPU verification in one command, on a bare GPU machine without network:
#
#   benchmarks/gpu_check.sh --area {kernels,cascade,training,tune,all} [--quick] [--cpu] OUTDIR
#
# Installs fastcascade (editable, no build isolation, no dependency resolution; wheels in
# ./wheels/ are installed first for what the machine lacks, nibabel at least; case A is read
# from ./carry/data/ when FASTCASCADE_DATA is unset: benchmarks/gpu_prepare.sh fills both
# folders on the CPU machine, to be carried along), records the environment, runs the
# area's GPU tests, then its benchmarks (benchmarks/run.py; for cascade, the body-mask
# steps and benchmarks/e2e.py), writing JSON (as it goes), markdown tables, JUnit XML and
# a log into OUTDIR, and prints a short table last. Every step runs even if an earlier one
# failed; the exit status is non-zero if any failed.
#
#   --quick  every op once in under 5 minutes: bf16 only, batch 1-2, one torch.compile,
#            GPU tests without the slow ones
#   --cpu    dry run on a CPU: install checked with pip --dry-run, the CPU proofs run
#            instead of the GPU tests (Triton interpreter, sm_90 compile), benchmarks tiny
#   all      = kernels cascade training; tune is a separate step (it rewrites
#            fastcascade/ops/conv_bn_relu/table.json; commit that file with OUTDIR's JSON)
#   E2E_ARGS extra options for benchmarks/e2e.py in the cascade area (environment), e.g.
#            E2E_ARGS="--cases case_a" for a shorter run
#
# To add an area: list its test files in area_tests below and register its benchmark in
# benchmarks/run.py (AREAS); an area without either is reported as "not yet".
set -uo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

AREA="" QUICK=0 CPU=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --area) AREA="${2:-}"; shift 2 ;;
    --area=*) AREA="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --cpu) CPU=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
case "$AREA" in
  kernels|cascade|training|tune) AREAS="$AREA" ;;
  all) AREAS="kernels cascade training" ;;
  *) echo "--area must be kernels, cascade, training, tune or all (got '$AREA')" >&2; exit 2 ;;
esac
[ -n "$OUT" ] || { echo "OUTDIR missing" >&2; usage >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
# A GPU run must not interpret kernels; the dry run must (set before anything imports Triton).
if [ "$CPU" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Case A as carried by benchmarks/gpu_prepare.sh, unless the data is named otherwise.
if [ -z "${FASTCASCADE_DATA:-}" ] && [ -d carry/data ]; then export FASTCASCADE_DATA="$ROOT/carry/data"; fi
MODE_ARGS=()
[ "$QUICK" = 1 ] && MODE_ARGS+=(--quick)
[ "$CPU" = 1 ] && MODE_ARGS+=(--cpu)

STEPS=()
FAILED=0
step() {  # step NAME COMMAND...: run, time, record; never stops the script
  local name="$1"; shift
  echo; echo "=== $name: $*"
  local t0=$SECONDS rc
  "$@"; rc=$?
  [ "$rc" -eq 0 ] || { FAILED=1; echo "!!! $name failed (exit $rc)"; }
  STEPS+=("$(printf '%-28s %-6s %4ss' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "rc=$rc")" $((SECONDS - t0)))")
}

# -- install ------------------------------------------------------------------------------
install() {
  local dry=()
  [ "$CPU" = 1 ] && dry=(--dry-run)  # the dry run leaves the environment as it is
  if compgen -G "wheels/*.whl" > /dev/null; then
    "$PY" -m pip install "${dry[@]}" --no-index --no-deps wheels/*.whl || return $?
  fi
  # Builds whatever setup.py declares (CUDA sources are compiled on this machine).
  "$PY" -m pip install "${dry[@]}" --no-build-isolation --no-deps -e .
}

environment() {
  "$PY" - "$OUT/env.json" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from run import environment
env = environment()
open(sys.argv[1], "w").write(json.dumps(env, indent=1, default=str))
print(json.dumps({k: env[k] for k in ("device", "torch", "triton", "cuda_runtime", "cudnn", "git_commit")}))
EOF
  if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; fi
  return 0
}

# -- tests ----------------------------------------------------------------------------------
area_tests() {  # the test files of an area (missing ones are skipped)
  case "$1" in
    kernels) echo tests/test_ops_conv_bn_relu.py tests/test_ops_dilate.py tests/test_ops_stitch_triton.py ;;
    cascade) echo tests/test_cascade.py tests/test_tiling.py tests/test_ops_*.py ;;
    training) echo tests/test_train_*.py ;;
    *) ;;
  esac
}

pytest_ok() {  # pytest, with "no tests collected" (exit 5) counting as success
  "$PY" -m pytest "$@"; local rc=$?
  [ "$rc" -eq 5 ] && { echo "(no tests selected)"; return 0; }
  return "$rc"
}

run_tests() {
  local area="$1" files=()
  local own_kernels; own_kernels="$(area_tests kernels)"
  for f in $(area_tests "$area"); do
    [ "$area" != kernels ] && [[ " $own_kernels " == *" $f "* ]] && continue  # once, in kernels
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -gt 0 ] || { echo "area $area: no test files yet"; return 0; }
  local junit="--junitxml=$OUT/tests-$area.xml"
  if [ "$CPU" = 1 ]; then
    # What a CPU can prove: kernels in the interpreter, references, dispatch.
    pytest_ok -q -m "not gpu and not compile" "$junit" "${files[@]}"
  else
    local marks="gpu"
    [ "$QUICK" = 1 ] && marks="gpu and not slow"
    pytest_ok -q -rs -m "$marks" --durations=10 "$junit" "${files[@]}"
  fi
}

compile_tests() {  # sm_90 ahead-of-time compile + resource report (no GPU needed)
  FASTCASCADE_TEST_COMPILE=1 TRITON_INTERPRET=0 pytest_ok -q -m compile -p no:cacheprovider \
    "--junitxml=$OUT/tests-compile.xml" tests/test_compile_sm90.py
}

external_bench() {  # areas whose benchmark is a script of its own (not in run.py's AREAS)
  case "$1" in
    cascade)  # the body mask's steps (SciPy / CuPy / PyTorch), then the whole cascade
      [ -f benchmarks/e2e.py ] || return 3
      local rc=0
      "$PY" benchmarks/run.py --area morphology --out "$OUT" "${MODE_ARGS[@]}" || rc=$?
      if [ "$CPU" = 1 ]; then  # a smoke run: the smallest phantom, our provider only
        "$PY" benchmarks/e2e.py --device cpu --quick --cases phantom_small \
          --providers fastcascade --out "$OUT" || rc=$?
      else
        # shellcheck disable=SC2086  # E2E_ARGS: extra e2e.py options, word-split on purpose
        "$PY" benchmarks/e2e.py --device cuda --paper-net --out "$OUT" "${MODE_ARGS[@]}" \
          ${E2E_ARGS:-} || rc=$?
      fi
      return "$rc" ;;
    *) return 3 ;;
  esac
}

bench() {
  local area="$1" rc
  if "$PY" benchmarks/run.py --list-areas | tr ' ' '\n' | grep -qx "$area"; then
    "$PY" benchmarks/run.py --area "$area" --out "$OUT" "${MODE_ARGS[@]}"
    return
  fi
  external_bench "$area"; rc=$?
  [ "$rc" -eq 3 ] && { echo "area $area: no benchmark yet (benchmarks/run.py AREAS)"; return 0; }
  return "$rc"
}

# -- run --------------------------------------------------------------------------------------
echo "gpu_check: areas [$AREAS] quick=$QUICK cpu=$CPU out=$OUT python=$PY"
step install install
step environment environment
if [ "$CPU" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "!!! no CUDA device visible: use --cpu for a dry run"; FAILED=1
fi
for area in $AREAS; do
  [ "$area" = kernels ] && step "compile sm_90" compile_tests
  [ "$area" = tune ] || step "tests $area" run_tests "$area"
  step "bench $area" bench "$area"
  [ "$area" = kernels ] && step "bench dilate" bench dilate
  [ "$area" = kernels ] && step "bench stitch" bench stitch
done

echo; echo "=== summary ($OUT)"
"$PY" benchmarks/run.py --summary "$OUT"
if [ "$CPU" = 0 ]; then
  slug="$("$PY" -c 'import json,re,sys; d=json.load(open(sys.argv[1])); print(re.sub(r"[^A-Za-z0-9]+","-",d["device"]).strip("-")+"_"+d["date"][:10])' "$OUT/env.json" 2>/dev/null)"
  echo; echo "to commit: mkdir -p benchmarks/results/$slug && cp $OUT/*.json $OUT/*.md benchmarks/results/$slug/"
  echo "           (after --area tune, also fastcascade/ops/conv_bn_relu/table.json from $OUT)"
fi
echo; printf '%s\n' "${STEPS[@]}"
[ "$FAILED" = 0 ] && echo "gpu_check: all steps passed" || echo "gpu_check: some steps FAILED (see above and $OUT/gpu_check.log)"
exit "$FAILED"
