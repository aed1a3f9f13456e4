#!/usr/bin/env bash
# Measures fpd_jax on one accelerator next to the plain reference steps, in one run. See usage below.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/accelerator_check.sh [options] [-- fpd_jax.tools.benchmark flags...]

On a machine with an accelerator, from the repository root, one after the other:
  1. python -m fpd_jax.tools.benchmark --suite=accelerator (FPD step ms, images/s and peak memory at each batch
     size, teacher 8/16-step and one-step student sampling images/s) -> OUT/ours.json;
  2. the plain reference steps: ANCHORS/fpd_step_anchor.py --batch=N for each batch size and ANCHORS/gpu_anchor.py,
     their JSON -> OUT/anchor_fpd_step_N.json, OUT/anchor_gpu.json;
  3. python -m fpd_jax.tools.benchmark --suite=compare: the table ours / plain -> OUT/comparison.json.
A step that fails is reported and the others still run; the exit status is 1 if any failed.

Settings (option, or environment variable; options win):
  --anchors DIR        ANCHORS        folder holding fpd_step_anchor.py and gpu_anchor.py (they are not part of
                                      the repository; e.g. ../shared/anchors) (required)
  --out DIR            OUT            folder for the JSON files and logs (created; required)
  --config FILE        CONFIG         config of our suite (default configs/imagenet.py, its gpu variant)
  --batch-sizes LIST   BATCH_SIZES    FPD step batch sizes, comma-separated, for ours and the anchor (default 32,64)
  --python PYTHON      PYTHON         Python with jax and the requirements installed (default python)
  --dry-run            DRY_RUN=1      print the commands, one per line, and execute nothing
  -h, --help                          this help
Arguments after `--` are appended to the benchmark's command line (e.g. --steps=20).

Example:
  launch/accelerator_check.sh --anchors=../shared/anchors --out=/tmp/accel
EOF
}

ANCHORS=${ANCHORS:-}
OUT=${OUT:-}
CONFIG=${CONFIG:-configs/imagenet.py}
BATCH_SIZES=${BATCH_SIZES:-32,64}
PYTHON=${PYTHON:-python}

parse_args "anchors=ANCHORS out=OUT config=CONFIG batch-sizes=BATCH_SIZES python=PYTHON" "" "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (arguments for the benchmark go after --)"
require ANCHORS "--anchors (env ANCHORS)"
require OUT "--out (env OUT)"
[[ $BATCH_SIZES =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--batch-sizes must be comma-separated positive integers, \
got '$BATCH_SIZES'"
# Relative paths are taken from the current folder; the commands run from the repository root.
[[ $ANCHORS == /* ]] || ANCHORS=$PWD/$ANCHORS
[[ $OUT == /* ]] || OUT=$PWD/$OUT
if [[ $PYTHON == */* && $PYTHON != /* ]]; then
  PYTHON=$PWD/$PYTHON
fi
for anchor in fpd_step_anchor.py gpu_anchor.py; do
  [[ -f $ANCHORS/$anchor ]] || die "--anchors $ANCHORS: no $anchor there"
done
CONFIG_FILE=${CONFIG%%:*}
[[ $CONFIG_FILE == /* ]] || CONFIG_FILE=$REPO_ROOT/$CONFIG_FILE
[[ -f $CONFIG_FILE ]] || die "--config $CONFIG: no such file $CONFIG_FILE"

# Runs a command with its stdout also written to FILE (a dry run prints `command > FILE`).
run_to() {
  local file=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s > %s\n' "$(quote_cmd "$@")" "$(quote "$file")"
  else
    printf '+ %s > %s\n' "$(quote_cmd "$@")" "$(quote "$file")" >&2
    "$@" | tee "$file"
  fi
}

FAILED=()
ANCHOR_FILES=()
run mkdir -p "$OUT"
run cd "$REPO_ROOT"
run_to "$OUT/ours.log" "$PYTHON" -m fpd_jax.tools.benchmark --suite=accelerator "--config=$CONFIG" \
  "--batch_sizes=$BATCH_SIZES" "--out=$OUT/ours.json" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} || FAILED+=(ours)
IFS=, read -r -a sizes <<<"$BATCH_SIZES"
for b in "${sizes[@]}"; do
  if run_to "$OUT/anchor_fpd_step_$b.json" "$PYTHON" "$ANCHORS/fpd_step_anchor.py" "--batch=$b"; then
    ANCHOR_FILES+=("$OUT/anchor_fpd_step_$b.json")
  else
    FAILED+=("fpd_step_anchor --batch=$b")
  fi
done
if run_to "$OUT/anchor_gpu.json" "$PYTHON" "$ANCHORS/gpu_anchor.py"; then
  ANCHOR_FILES+=("$OUT/anchor_gpu.json")
else
  FAILED+=(gpu_anchor)
fi
if [[ ${FAILED[*]-} != *ours* && ${#ANCHOR_FILES[@]} -gt 0 ]]; then
  anchors_list=$(IFS=,; printf '%s' "${ANCHOR_FILES[*]}")
  run "$PYTHON" -m fpd_jax.tools.benchmark --suite=compare "--ours=$OUT/ours.json" "--anchors=$anchors_list" \
    "--out=$OUT/comparison.json" || FAILED+=(compare)
fi
if ((${#FAILED[@]})); then
  warn "failed: ${FAILED[*]} (see the output above)"
  exit 1
fi
