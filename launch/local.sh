#!/usr/bin/env bash
# Runs the fpd_jax pipeline on this machine, one process (no jax.distributed). See usage below.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- fpd_jax.main flags...]

Runs python -m fpd_jax.main --config=CONFIG --workdir=WORKDIR [extra] from the repository root, in one process.
--fake-devices N splits the CPU into N XLA devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
JAX_PLATFORMS=cpu) to try meshes and sharding without accelerators.

Settings (option, or environment variable; options win):
  --config FILE        CONFIG         config path inside the repository, e.g. configs/demo.py or
                                      configs/demo.py:tiny (required)
  --workdir DIR        WORKDIR        output folder, a local path or a mounted bucket (e.g. /mnt/gcs/fpd/demo; no
                                      gs:// URLs); a relative path is taken from the current folder (required)
  --fake-devices N     FAKE_DEVICES   run on N fake CPU devices (default: off, the real devices)
  --python PYTHON      PYTHON         Python with the requirements installed (default python)
  --dry-run            DRY_RUN=1      print the commands, one per line, and execute nothing
  -h, --help                          this help
Arguments after `--` are appended to the fpd_jax.main command line.

Example:
  launch/local.sh --config=configs/demo.py --workdir=runs/demo
  launch/local.sh --fake-devices=8 --config=configs/demo.py:tiny --workdir=/tmp/tiny8 -- --config.teacher.num_steps=10
EOF
}

CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
FAKE_DEVICES=${FAKE_DEVICES:-}
PYTHON=${PYTHON:-python}

parse_args "config=CONFIG workdir=WORKDIR fake-devices=FAKE_DEVICES python=PYTHON" "" "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (arguments for fpd_jax.main go after --)"
require CONFIG "--config (env CONFIG)"
require WORKDIR "--workdir (env WORKDIR)"
[[ -z $FAKE_DEVICES ]] || require_positive_int FAKE_DEVICES "--fake-devices (env FAKE_DEVICES)"
CONFIG_FILE=${CONFIG%%:*}
[[ $CONFIG_FILE == /* ]] || CONFIG_FILE=$REPO_ROOT/$CONFIG_FILE
[[ -f $CONFIG_FILE ]] || die "--config $CONFIG: no such file $CONFIG_FILE"
refuse_url_workdir "$WORKDIR"
if [[ $WORKDIR != /* ]]; then
  WORKDIR=$PWD/$WORKDIR  # The pipeline runs from the repository root: keep a relative --workdir relative to here.
fi
if [[ $PYTHON == */* && $PYTHON != /* ]]; then
  PYTHON=$PWD/$PYTHON  # Same for a relative --python path.
fi

main_cmd "$PYTHON" "$CONFIG" "$WORKDIR" 0 ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
if [[ -n $FAKE_DEVICES ]]; then
  xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$FAKE_DEVICES"
  MAIN_CMD=(env "XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu "${MAIN_CMD[@]}")
fi
run cd "$REPO_ROOT"
run "${MAIN_CMD[@]}"
