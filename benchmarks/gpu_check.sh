#!/usr/bin/env bash
# GPU verification in one command, on a bare GPU machine without network:
#
#   benchmarks/gpu_check.sh --area AREA[,AREA...] [--quick] [--cpu] [--budget SECONDS]
#                           [--timeout STEP=SECONDS]... [--timeout-scale F] [--work DIR] OUTDIR
#   benchmarks/gpu_check.sh --area AREA [--quick] [--cpu] --plan     (print the steps, exit)
#
# AREA: kernels, cascade, training, tune, smoke, or all (= kernels cascade training). Each
# area is a list of steps (the plan, below); every run starts with `install` (wheels from
# ./wheels/, made by benchmarks/gpu_prepare.sh, into a private folder on PYTHONPATH) and
# `preflight` (imports and versions, CUDA, free GPU memory, a tiny Triton kernel); a failed
# preflight stops the run at once, with one summary line saying what is missing.
#
# Every step runs under its own time limit (`timeout`), and the next step runs whatever
# the last one did. Steps write into a work folder outside OUTDIR (--work; default a new
# folder under $TMPDIR or /tmp); after every step, every --pack-every seconds (default 20)
# while one runs, and on SIGTERM/SIGINT/SIGHUP, the work folder is packed atomically into
#
#   OUTDIR/gpu_check.tar.gz          everything: log, preflight.json, nvidia-smi, pip list,
#                                    JUnit XML per test step, each benchmark's JSON and
#                                    markdown, steps.json, summary.md
#   OUTDIR/gpu_check_summary.md      the verdict, one row per step, each finished
#                                    benchmark's short table
#
# and nothing else is written to OUTDIR, so a run killed at any point leaves these two
# files with what had finished (and, from the background packing, what a running step had
# written by then). Exit status: 0 if every step passed, 1 if any failed or timed out,
# 2 on bad arguments, 3 if the preflight failed, 128+N when stopped by signal N.
#
#   --quick           every kernel and the whole cascade once: GPU tests without the slow
#                     ones, benchmarks in their quick mode; the step limits of
#                     `--area all --quick` sum to at most 5 minutes (--plan prints them)
#   --cpu             dry run on a CPU: the CPU proofs instead of the GPU tests (Triton
#                     interpreter, references), the sm_90 compile checks (kernels area),
#                     benchmarks tiny; limits x10 (--timeout-scale)
#   --budget S        the whole run must end within S seconds: a step gets at most what is
#                     left (minus 15 s for the final packing); steps with less are skipped
#   --timeout STEP=S  this step's limit in seconds (repeatable)
#   --pytest-args A   extra pytest arguments for every test step, split on spaces
#                     (e.g. "-k dilate" to rerun a few tests)
#   --min-free-gib N  GPU memory the preflight wants free (default 8)
#   --pack-every S    seconds between packings while a step runs (default 20)
#   PYTHON            the interpreter (default: .venv/bin/python if there, else python3)
#   E2E_ARGS          extra options for benchmarks/e2e.py in the cascade area
#
# On a GPU machine without network, after benchmarks/gpu_prepare.sh on the CPU machine
# (carry its wheels/ and carry/ folders along), with 10 minutes per command:
#   benchmarks/gpu_check.sh --area all --quick --budget 540 "$OUT"
set -uo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2

# -------------------------------------------------------------------------------------------
# The plan: each area's steps, in order -- the one place to extend. A line is
#
#   plan STEP  LIMIT_FULL LIMIT_QUICK  KIND ARGS...
#
# with the time limits in seconds of a GPU run (a CPU dry run multiplies them by 10) and
#   tests FILE|NODE...  pytest: -m gpu on a GPU (-m "gpu and not slow" with --quick); the
#                       CPU proofs (-m "not gpu and not compile") with --cpu; JUnit XML
#   bench AREA          python benchmarks/run.py --area AREA (register it in run.py's AREAS)
#   e2e                 benchmarks/e2e.py: the whole cascade (run_e2e below)
#   compile             the sm_90 compile checks, tests/test_compile_sm90.py; --cpu only
#                       (on a GPU the kernels themselves run)
# A new kernel adds its test file to its area's `tests` line and its benchmark as a `bench`
# line; tests/test_gpu_check.py fails while a test file with GPU tests is in no area, and
# while the limits of `--area all --quick` sum to more than 300 s.
area_plan() {
  case "$1" in
    kernels)
      plan compile_sm90     60   30  compile
      plan tests_kernels   900   50  tests tests/test_ops_conv_bn_relu_kernel.py \
                                           tests/test_ops_conv_bn_relu_reference.py \
                                           tests/test_ops_conv_bn_relu_dispatch.py \
                                           tests/test_ops_conv_bn_relu_table.py \
                                           tests/test_ops_dilate.py \
                                           tests/test_ops_stitch_triton.py tests/test_ops_warp.py
      plan bench_kernels  1800   35  bench kernels
      plan bench_dilate    300   15  bench dilate
      plan bench_stitch    300   15  bench stitch
      plan bench_warp      300   15  bench warp
      ;;
    cascade)
      plan tests_cascade   900   30  tests tests/test_cascade.py tests/test_tiling.py \
                                           tests/test_ops_morphology.py tests/test_ops_ccl.py \
                                           tests/test_ops_stitch.py tests/test_ops_resample.py \
                                           tests/test_ops_backend.py
      plan bench_morphology 300  15  bench morphology
      plan e2e            2400   55  e2e
      ;;
    training)
      plan tests_training  600   20  tests tests/test_train_*.py
      ;;
    tune)  # rewrites fastcascade/ops/conv_bn_relu/table.json: commit it with the results
      plan bench_tune     3600  300  bench tune
      ;;
    smoke)  # a minute's check of the machinery and one kernel, before a long run
      plan tests_smoke     300   40  tests tests/test_ops_warp.py
      plan bench_warp      300   15  bench warp
      ;;
    *) return 1 ;;
  esac
}
ALL_AREAS="kernels cascade training"
KNOWN_AREAS="kernels cascade training tune smoke"
FIRST_STEPS() { plan install 120 20 install; plan preflight 120 30 preflight; }
CPU_SCALE=10
PACK_RESERVE=15

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

# -- step bodies: run in a child (`gpu_check.sh --step KIND ARGS...`) under `timeout` --------
PYTEST_EXTRA=()
read -r -a PYTEST_EXTRA <<< "${GC_PYTEST_ARGS:-}"

mode_args() { [ "${GC_QUICK:-0}" = 1 ] && printf '%s\n' --quick; [ "${GC_CPU:-0}" = 1 ] && printf '%s\n' --cpu; }

pytest_ok() {  # pytest, with "no tests collected" (exit 5) counting as success
  "$PY" -m pytest "$@"; local rc=$?
  [ "$rc" -eq 5 ] && { echo "(no tests selected)"; return 0; }
  return "$rc"
}

run_install() {
  local note="$GC_WORK/install.txt"
  if ! compgen -G "wheels/*.whl" > /dev/null; then
    echo "no wheels/ (benchmarks/gpu_prepare.sh makes it): the image's packages only" | tee "$note"
    return 0
  fi
  local names; names="$(cd wheels && ls ./*.whl | sed 's|^\./||; s|-py.*||; s|-cp.*||' | paste -sd ' ')"
  if [ "$GC_CPU" = 1 ]; then  # the dry run leaves the environment as it is
    local w; for w in wheels/*.whl; do
      "$PY" -m zipfile -t "$w" > /dev/null 2>&1 || { echo "unreadable: $w" | tee "$note"; return 1; }
    done
    echo "dry run: would install $names" | tee "$note"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$GC_SITE" wheels/*.whl || return $?
  echo "installed $names into $GC_SITE" | tee "$note"
}

run_preflight() {
  local args=(--out "$GC_WORK/preflight.json" --min-free-gib "$GC_MIN_FREE_GIB")
  [ "$GC_CPU" = 1 ] && args+=(--cpu)
  "$PY" benchmarks/gpu_preflight.py "${args[@]}"
}

run_tests() {  # run_tests STEP FILE|NODE...
  local name="$1"; shift
  local files=() f
  for f in "$@"; do [ -f "${f%%::*}" ] && files+=("$f"); done
  [ "${#files[@]}" -gt 0 ] || { echo "no test files yet"; return 0; }
  local common=(-p no:cacheprovider "--junitxml=$GC_WORK/tests-$name.xml" "${PYTEST_EXTRA[@]}")
  if [ "$GC_CPU" = 1 ]; then
    local marks="not gpu and not compile"
    [ "$GC_QUICK" = 1 ] && marks+=" and not slow"
    TRITON_INTERPRET=1 pytest_ok -q -m "$marks" "${common[@]}" "${files[@]}"
  else
    local marks="gpu"
    [ "$GC_QUICK" = 1 ] && marks+=" and not slow"
    pytest_ok -q -rs -m "$marks" --durations=10 "${common[@]}" "${files[@]}"
  fi
}

run_compile() {  # run_compile STEP
  FASTCASCADE_TEST_COMPILE=1 TRITON_INTERPRET=0 pytest_ok -q -m compile -p no:cacheprovider \
    "--junitxml=$GC_WORK/tests-$1.xml" "${PYTEST_EXTRA[@]}" tests/test_compile_sm90.py
}

run_bench() {  # run_bench AREA
  local mode; mapfile -t mode < <(mode_args)
  "$PY" benchmarks/run.py --area "$1" --out "$GC_WORK" "${mode[@]}"
}

run_e2e() {
  if [ "$GC_CPU" = 1 ]; then  # a smoke run: the smallest phantom, our provider only
    "$PY" benchmarks/e2e.py --device cpu --quick --cases phantom_small \
      --providers fastcascade --out "$GC_WORK"
  elif [ "$GC_QUICK" = 1 ]; then  # the cascade once per case, no torch.compile cold start
    # shellcheck disable=SC2086  # E2E_ARGS: extra e2e.py options, word-split on purpose
    "$PY" benchmarks/e2e.py --device cuda --quick \
      --providers fastcascade,fastcascade_bf16,every_tile --out "$GC_WORK" ${E2E_ARGS:-}
  else
    # shellcheck disable=SC2086
    "$PY" benchmarks/e2e.py --device cuda --paper-net --out "$GC_WORK" ${E2E_ARGS:-}
  fi
}

if [ "${1:-}" = "--step" ]; then  # the child: one step's body
  shift
  PY="$GC_PY"
  kind="$1"; name="$2"; shift 2
  case "$kind" in
    install) run_install ;;
    preflight) run_preflight ;;
    tests) run_tests "$name" "$@" ;;
    compile) run_compile "$name" ;;
    bench) run_bench "$@" ;;
    e2e) run_e2e ;;
    *) echo "unknown step kind $kind" >&2; exit 2 ;;
  esac
  exit $?
fi

# -- arguments -------------------------------------------------------------------------------
AREA="" QUICK=0 CPU=0 OUT="" WORK_ARG="" BUDGET="" SHOW_PLAN=0 SCALE=""
PYTEST_ARGS="" MIN_FREE_GIB=8 PACK_EVERY=20
declare -A OVERRIDE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --area) AREA="${2:-}"; shift 2 ;;
    --area=*) AREA="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --cpu) CPU=1; shift ;;
    --plan) SHOW_PLAN=1; shift ;;
    --budget) BUDGET="${2:-}"; shift 2 ;;
    --timeout-scale) SCALE="${2:-}"; shift 2 ;;
    --timeout) OVERRIDE["${2%%=*}"]="${2#*=}"; shift 2 ;;
    --work) WORK_ARG="${2:-}"; shift 2 ;;
    --pytest-args) PYTEST_ARGS="${2:-}"; shift 2 ;;
    --min-free-gib) MIN_FREE_GIB="${2:-}"; shift 2 ;;
    --pack-every) PACK_EVERY="${2:-}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
AREAS="${AREA//,/ }"
[ "$AREAS" = all ] && AREAS="$ALL_AREAS"
[ -n "$AREAS" ] || { echo "--area missing (one of: $KNOWN_AREAS, all)" >&2; exit 2; }
for a in $AREAS; do
  [[ " $KNOWN_AREAS " == *" $a "* ]] || { echo "unknown area '$a' (one of: $KNOWN_AREAS, all)" >&2; exit 2; }
done
for v in "$BUDGET" "$SCALE" "$MIN_FREE_GIB" "$PACK_EVERY" "${OVERRIDE[@]}"; do
  [[ -z "$v" || "$v" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "not a number of seconds: '$v'" >&2; exit 2; }
done
[ -n "$SCALE" ] || { [ "$CPU" = 1 ] && SCALE=$CPU_SCALE || SCALE=1; }

# -- the plan --------------------------------------------------------------------------------
STEP_NAMES=() STEP_LIMITS=() STEP_SPECS=()
declare -A SKIP=()
plan() {  # plan NAME FULL QUICK KIND ARGS...
  local name="$1" full="$2" quick="$3" kind="$4"; shift 4
  local i; for i in "${STEP_NAMES[@]}"; do [ "$i" = "$name" ] && return 0; done  # once
  local limit; limit=$([ "$QUICK" = 1 ] && echo "$quick" || echo "$full")
  limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s + 0.5 }')
  [ -n "${OVERRIDE[$name]:-}" ] && limit=$(awk -v l="${OVERRIDE[$name]}" 'BEGIN { printf "%d", l + 0.5 }')
  [ "$limit" -ge 1 ] || limit=1  # timeout 0 would mean no limit
  if [ "$kind" = compile ] && [ "$CPU" = 0 ]; then
    SKIP[$name]="GPU run: the sm_90 compile checks are for CPU CI"; limit=0
  fi
  STEP_NAMES+=("$name"); STEP_LIMITS+=("$limit"); STEP_SPECS+=("$kind${*:+ $*}")
}
FIRST_STEPS
for a in $AREAS; do area_plan "$a"; done
TOTAL=0; for l in "${STEP_LIMITS[@]}"; do TOTAL=$((TOTAL + l)); done

print_plan() {
  local i
  printf '%-18s %8s  %s\n' step "limit s" "runs"
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-18s %8s  %s\n' "${STEP_NAMES[$i]}" "${STEP_LIMITS[$i]}" \
      "${SKIP[${STEP_NAMES[$i]}]:-${STEP_SPECS[$i]}}"
  done
  echo "sum of step limits: $TOTAL s${BUDGET:+ (budget $BUDGET s)}"
}
if [ "$SHOW_PLAN" = 1 ]; then print_plan; exit 0; fi
[ -n "$OUT" ] || { echo "OUTDIR missing" >&2; usage >&2; exit 2; }

# -- folders, environment --------------------------------------------------------------------
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [ -n "$WORK_ARG" ]; then BASE="$WORK_ARG"; mkdir -p "$BASE"; else BASE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; fi
BASE="$(cd "$BASE" && pwd)"
case "$BASE/" in "$OUT"/*) echo "--work must lie outside OUTDIR" >&2; exit 2 ;; esac
WORK="$BASE/gpu_check"
rm -rf "$WORK" && mkdir -p "$WORK" "$BASE/site"
LOG="$WORK/gpu_check.log"
ARCHIVE="$OUT/gpu_check.tar.gz"
SUMMARY="$OUT/gpu_check_summary.md"

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
# A GPU run must not interpret kernels; the dry run must (set before anything imports Triton).
if [ "$CPU" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
export PYTHONPATH="$ROOT:$BASE/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Case A as carried by benchmarks/gpu_prepare.sh, unless the data is named otherwise.
if [ -z "${FASTCASCADE_DATA:-}" ] && [ -d carry/data ]; then export FASTCASCADE_DATA="$ROOT/carry/data"; fi
export GC_PY="$PY" GC_WORK="$WORK" GC_SITE="$BASE/site" GC_QUICK="$QUICK" GC_CPU="$CPU"
export GC_PYTEST_ARGS="$PYTEST_ARGS" GC_MIN_FREE_GIB="$MIN_FREE_GIB"

exec > >(tee -a "$LOG") 2>&1

for i in "${!STEP_NAMES[@]}"; do
  printf '%s\t%s\t%s\n' "${STEP_NAMES[$i]}" "${STEP_LIMITS[$i]}" "${STEP_SPECS[$i]// /$'\t'}"
done > "$WORK/plan.tsv"
: > "$WORK/steps.tsv"
START=$SECONDS
{
  printf 'areas\t%s\nquick\t%s\ncpu\t%s\nbudget\t%s\n' "$AREAS" "$QUICK" "$CPU" "$BUDGET"
  printf 'started\t%s\nstart_epoch\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(date +%s)"
  printf 'host\t%s\npython\t%s\n' "$(hostname 2>/dev/null)" "$PY"
} > "$WORK/meta.tsv"

# -- packing: the summary, then the archive, each replaced atomically --------------------------
LOCK="$BASE/pack.lock"
pack() {
  (
    command -v flock > /dev/null && flock -w 60 9
    "$PY" "$ROOT/benchmarks/gpu_check_report.py" "$WORK" "$SUMMARY" 2>> "$BASE/report.err" \
      || { echo "(summary script failed; steps.tsv follows)"; cat "$WORK/steps.tsv"; } > "$SUMMARY"
    local tmp="$OUT/.gpu_check.tar.gz.$BASHPID"
    tar --warning=no-file-changed -czf "$tmp" -C "$BASE" gpu_check 2>> "$BASE/report.err"
    [ $? -le 1 ] && mv -f "$tmp" "$ARCHIVE" || rm -f "$tmp"
  ) 9> "$LOCK"
}
MAIN_PID=$BASHPID
(
  trap - TERM INT HUP
  while sleep "$PACK_EVERY" && kill -0 "$MAIN_PID" 2> /dev/null; do pack; done
) &
PACKER_PID=$!

STEP_PID="" CURRENT="" FAILED=0 PREFLIGHT_FAILED=0
record() {  # record NAME STATUS RC SECONDS LIMIT [NOTE]
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >> "$WORK/steps.tsv"
}
on_signal() {
  trap '' PIPE TERM INT HUP
  local sig="$1" code="$2"
  if [ -n "$STEP_PID" ]; then
    kill -TERM "$STEP_PID" 2> /dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$STEP_PID" 2> /dev/null || break; sleep 0.5; done
    kill -KILL "$STEP_PID" 2> /dev/null
  fi
  if [ -n "$CURRENT" ]; then
    record "$CURRENT" killed "$code" "$((SECONDS - STEP_T0))" "$STEP_LIMIT" "by SIG$sig"
    rm -f "$WORK/current.tsv"
  fi
  printf 'interrupted\tSIG%s\nend_epoch\t%s\n' "$sig" "$(date +%s)" >> "$WORK/meta.tsv"
  kill "$PACKER_PID" 2> /dev/null
  echo "!!! gpu_check stopped by SIG$sig; what finished is in $ARCHIVE" 2> /dev/null
  pack
  rm -f "$OUT"/.gpu_check.tar.gz.*  # a background packing cut short
  exit "$code"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP

echo "gpu_check: areas [$AREAS] quick=$QUICK cpu=$CPU python=$PY"
echo "work folder $WORK; packed into $ARCHIVE and $SUMMARY"
print_plan

# -- run ---------------------------------------------------------------------------------------
for i in "${!STEP_NAMES[@]}"; do
  name="${STEP_NAMES[$i]}" limit="${STEP_LIMITS[$i]}"
  read -r -a spec <<< "${STEP_SPECS[$i]}"
  if [ -n "${SKIP[$name]:-}" ]; then
    echo; echo "=== $name: skipped (${SKIP[$name]})"; record "$name" skipped 0 0 0 "${SKIP[$name]}"; pack; continue
  fi
  if [ "$PREFLIGHT_FAILED" = 1 ]; then
    record "$name" skipped 0 0 "$limit" "preflight failed"; continue
  fi
  if [ -n "$BUDGET" ]; then
    left=$(awk -v b="$BUDGET" -v e="$((SECONDS - START))" -v r="$PACK_RESERVE" 'BEGIN { printf "%d", b - e - r }')
    if [ "$left" -lt 5 ]; then
      echo; echo "=== $name: skipped (budget spent)"; record "$name" skipped 0 0 "$limit" "budget spent"; pack; continue
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo; echo "=== $name (limit ${limit} s): ${spec[*]}"
  STEP_T0=$SECONDS STEP_LIMIT=$limit CURRENT=$name
  printf '%s\t%s\t%s\n' "$name" "$(date +%s)" "$limit" > "$WORK/current.tsv"
  pack
  timeout -k 10 "$limit" bash "$SELF" --step "${spec[0]}" "$name" "${spec[@]:1}" &
  STEP_PID=$!
  wait "$STEP_PID"; rc=$?
  STEP_PID=""
  seconds=$((SECONDS - STEP_T0))
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout
  else status=failed; fi
  note=""; [ "$status" = timeout ] && note="after $limit s"
  record "$name" "$status" "$rc" "$seconds" "$limit" "$note"
  rm -f "$WORK/current.tsv"; CURRENT=""
  if [ "$status" != ok ]; then
    FAILED=1; echo "!!! $name: $status (exit $rc) after $seconds s"
    [ "$name" = preflight ] && PREFLIGHT_FAILED=1
  fi
  pack
done

# -- the end ---------------------------------------------------------------------------------
kill "$PACKER_PID" 2> /dev/null; wait "$PACKER_PID" 2> /dev/null
printf 'finished\t1\npreflight_failed\t%s\nend_epoch\t%s\n' "$PREFLIGHT_FAILED" "$(date +%s)" >> "$WORK/meta.tsv"
pack
rm -f "$OUT"/.gpu_check.tar.gz.*  # a background packing cut short
echo; echo "=== summary ($SUMMARY)"; cat "$SUMMARY"
if [ "$CPU" = 0 ] && [ -f "$WORK/preflight.json" ]; then
  slug="$("$PY" -c 'import json,re,sys; d=json.load(open(sys.argv[1]))["cuda"]; print(re.sub(r"[^a-z0-9]+","-",d["device"].lower()).strip("-"))' "$WORK/preflight.json" 2> /dev/null)"
  [ -n "$slug" ] && echo "to commit: tar -xzf gpu_check.tar.gz && cp gpu_check/*.json gpu_check/*.md benchmarks/results/${slug}_$(date +%Y-%m-%d)/"
fi
echo "archive: $ARCHIVE"
[ "$PREFLIGHT_FAILED" = 1 ] && exit 3
exit "$FAILED"
