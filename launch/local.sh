#!/usr/bin/env bash
# Runs the fpd_jax pipeline on this machine: one process, or N joined by jax.distributed over 127.0.0.1. See usage.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- fpd_jax.main flags...]

Runs python -m fpd_jax.main --config=CONFIG --workdir=WORKDIR [extra] from the repository root, in one process.
--fake-devices N splits the CPU into N XLA devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
JAX_PLATFORMS=cpu) to try meshes and sharding without accelerators.
--processes N starts N processes in the background that join as one multi-process run (--config.distributed=True;
FPD_JAX_COORDINATOR=127.0.0.1:PORT, FPD_JAX_NUM_PROCESSES=N, FPD_JAX_PROCESS_ID=i), each with --fake-devices
devices, logs to WORKDIR/logs/process_<i>.log (pid in process_<i>.pid), waits for all of them and exits 1 naming
every process that failed. Only the loopback address is used.

Settings (option, or environment variable; options win):
  --config FILE        CONFIG         config path inside the repository, e.g. configs/demo.py or
                                      configs/demo.py:tiny (required)
  --workdir DIR        WORKDIR        output folder, a local path or a mounted bucket (e.g. /mnt/gcs/fpd/demo; no
                                      gs:// URLs); a relative path is taken from the current folder (required)
  --fake-devices N     FAKE_DEVICES   run on N fake CPU devices (default: off, the real devices); per process
  --processes N        PROCESSES      number of processes (default 1: no jax.distributed)
  --port PORT          PORT           coordinator port on 127.0.0.1 with --processes > 1 (default: a free one)
  --python PYTHON      PYTHON         Python with the requirements installed (default python)
  --dry-run            DRY_RUN=1      print the commands, one per line, and execute nothing
  -h, --help                          this help
Arguments after `--` are appended to the fpd_jax.main command line.

Example:
  launch/local.sh --config=configs/demo.py --workdir=runs/demo
  launch/local.sh --fake-devices=8 --config=configs/demo.py:tiny --workdir=/tmp/tiny8 -- --config.teacher.num_steps=10
  launch/local.sh --processes=2 --fake-devices=4 --config=configs/demo.py:tiny --workdir=/tmp/tiny2x4
EOF
}

CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
FAKE_DEVICES=${FAKE_DEVICES:-}
PROCESSES=${PROCESSES:-1}
PORT=${PORT:-}
PYTHON=${PYTHON:-python}

parse_args "config=CONFIG workdir=WORKDIR fake-devices=FAKE_DEVICES processes=PROCESSES port=PORT python=PYTHON" \
  "" "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (arguments for fpd_jax.main go after --)"
require CONFIG "--config (env CONFIG)"
require WORKDIR "--workdir (env WORKDIR)"
[[ -z $FAKE_DEVICES ]] || require_positive_int FAKE_DEVICES "--fake-devices (env FAKE_DEVICES)"
require_positive_int PROCESSES "--processes (env PROCESSES)"
[[ -z $PORT ]] || require_positive_int PORT "--port (env PORT)"
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

DISTRIBUTED=0
((PROCESSES == 1)) || DISTRIBUTED=1
main_cmd "$PYTHON" "$CONFIG" "$WORKDIR" "$DISTRIBUTED" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
ENV_CMD=()
if [[ -n $FAKE_DEVICES ]]; then
  xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$FAKE_DEVICES"
  ENV_CMD=("XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu)
fi
run cd "$REPO_ROOT"
if ((PROCESSES == 1)); then
  if ((${#ENV_CMD[@]})); then
    run env "${ENV_CMD[@]}" "${MAIN_CMD[@]}"
  else
    run "${MAIN_CMD[@]}"
  fi
  exit 0
fi

# A free TCP port on 127.0.0.1: nothing answers a connection to it.
free_port() {
  local port tries
  for ((tries = 0; tries < 100; tries++)); do
    port=$((20000 + RANDOM % 20000))
    if ! (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      printf '%s' "$port"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1; pass --port"
}
[[ -n $PORT ]] || PORT=$(free_port)
LOG_DIR=$WORKDIR/logs
run mkdir -p "$LOG_DIR"
PIDS=()
for ((i = 0; i < PROCESSES; i++)); do
  cmd=(env ${ENV_CMD[@]+"${ENV_CMD[@]}"} "FPD_JAX_COORDINATOR=127.0.0.1:$PORT" "FPD_JAX_NUM_PROCESSES=$PROCESSES"
    "FPD_JAX_PROCESS_ID=$i" "${MAIN_CMD[@]}")
  log=$LOG_DIR/process_$i.log
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s > %s 2>&1 &\n' "$(quote_cmd "${cmd[@]}")" "$(quote "$log")"
    continue
  fi
  printf '+ %s > %s 2>&1 &\n' "$(quote_cmd "${cmd[@]}")" "$(quote "$log")" >&2
  "${cmd[@]}" >"$log" 2>&1 &
  PIDS+=("$!")
  echo "$!" >"$LOG_DIR/process_$i.pid"
done
[[ $DRY_RUN == 0 ]] || exit 0

# What stopped a process, from its log: its own one-line `error: ...`, JAX's fatal stop when a peer died, or the
# last line.
stop_reason() {
  local line
  line=$(grep -E '^error: ' "$1" | tail -n 1)
  if [[ -z $line ]] && grep -q 'Terminating process because the JAX distributed service detected fatal errors' "$1"; then
    line="JAX's coordination service stopped it: another process died or stopped sending heartbeats \
(--config.heartbeat_timeout_s)"
  fi
  [[ -n $line ]] || line=$(grep -v '^\[Gloo\]' "$1" | grep -v '^[[:space:]]*$' | tail -n 1)
  printf '%s' "${line:0:300}"
}

# Waits for every process; each failure gets one line naming the process, how it ended and its log.
failed=0
for ((i = 0; i < PROCESSES; i++)); do
  status=0
  wait "${PIDS[$i]}" || status=$?
  rm -f "$LOG_DIR/process_$i.pid"
  if ((status != 0)); then
    failed=1
    how="exited with status $status"
    if ((status > 128)); then
      how="was killed by signal $((status - 128)) ($(kill -l "$((status - 128))" 2>/dev/null || echo '?'))"
    fi
    echo "error: process $i of $PROCESSES $how: $(stop_reason "$LOG_DIR/process_$i.log") (log: \
$LOG_DIR/process_$i.log)" >&2
  fi
done
if ((failed)); then
  echo "error: the $PROCESSES-process run stopped; rerun the same command to resume from the last checkpoints." >&2
  exit 1
fi
