#!/usr/bin/env bash
# Runs fpd_jax on a multi-node GPU cluster with SLURM: builds an sbatch script and submits it. See usage below.
#
# JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) reads SLURM_JOB_ID, SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, which srun sets for every task; the coordinator is the first node.
# It also restricts each process to GPU number SLURM_LOCALID unless JAX_LOCAL_DEVICE_IDS is set (cluster.py), so the
# one-task-per-node layout exports JAX_LOCAL_DEVICE_IDS=0,...,G-1 to give the process every GPU of its node.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] [-- fpd_jax.main flags...]

Writes an sbatch script that starts python -m fpd_jax.main ... --config.distributed=True with srun on every node
and submits it with sbatch (the script goes to sbatch's stdin, or to --script-file first). With --dry-run it prints
the submission as shell (`sbatch <<'FPD_JAX_SBATCH'`, the script, the end marker) and submits nothing.

Settings (option, or environment variable; options win):
  --nodes N             NODES          number of nodes (required)
  --gpus-per-node G     GPUS_PER_NODE  GPUs per node (default 8)
  --tasks LAYOUT        TASKS          per-node: one process per node owning its G GPUs (default);
                                       per-gpu: G processes per node, one GPU each (every task must see all the
                                       node's GPUs: JAX picks GPU number SLURM_LOCALID)
  --partition NAME      PARTITION      SLURM partition
  --account NAME        ACCOUNT        SLURM account
  --time LIMIT          TIME_LIMIT     wall-time limit, e.g. 2-00:00:00
  --cpus-per-task N     CPUS_PER_TASK  CPUs per task (data loading)
  --job-name NAME       JOB_NAME       job name (default fpd_jax)
  --output PATTERN      OUTPUT         log file pattern, relative to --repo-dir (default %x-%j.out)
  --sbatch-arg ARG      (repeatable)   extra #SBATCH line, e.g. --sbatch-arg=--qos=high --sbatch-arg=--exclusive
  --repo-dir DIR        REPO_DIR       repository on the shared filesystem, the job's working folder (default:
                                       this checkout)
  --python PYTHON       PYTHON         Python with the requirements and jax[cuda12] installed (default python)
  --setup COMMANDS      SETUP          shell line run before srun, e.g. 'module load cuda; source .venv/bin/activate'
  --env KEY=VALUE       (repeatable)   environment variable exported to every task
  --config FILE         CONFIG         config path inside the repository, e.g. configs/imagenet.py (required)
  --workdir DIR         WORKDIR        output folder on a filesystem every node sees: NFS, Lustre, a gcsfuse
                                       mount of a bucket (no gs:// URLs) (required)
  --script-file FILE    SCRIPT_FILE    also write the sbatch script there and submit that file
  --dry-run             DRY_RUN=1      print the commands and execute nothing
  -h, --help                           this help
Arguments after `--` are appended to the fpd_jax.main command line.

Example:
  launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=2-00:00:00 \
    --setup='source .venv/bin/activate' --config=configs/imagenet.py --workdir=/shared/fpd/run1 \
    -- --config.distill.num_steps=20000
  launch/slurm.sh --dry-run --nodes=2 --config=configs/demo.py --workdir=/shared/fpd/demo
EOF
}

NODES=${NODES:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS=${TASKS:-per-node}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
TIME_LIMIT=${TIME_LIMIT:-}
CPUS_PER_TASK=${CPUS_PER_TASK:-}
JOB_NAME=${JOB_NAME:-fpd_jax}
OUTPUT=${OUTPUT:-%x-%j.out}
REPO_DIR=${REPO_DIR:-$REPO_ROOT}
PYTHON=${PYTHON:-python}
SETUP=${SETUP:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
SCRIPT_FILE=${SCRIPT_FILE:-}
SBATCH_ARGS=()
TASK_ENV=()

parse_args "nodes=NODES gpus-per-node=GPUS_PER_NODE tasks=TASKS partition=PARTITION account=ACCOUNT time=TIME_LIMIT \
cpus-per-task=CPUS_PER_TASK job-name=JOB_NAME output=OUTPUT sbatch-arg=SBATCH_ARGS+ repo-dir=REPO_DIR python=PYTHON \
setup=SETUP env=TASK_ENV+ config=CONFIG workdir=WORKDIR script-file=SCRIPT_FILE" "" "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (arguments for fpd_jax.main go after --)"
require NODES "--nodes (env NODES)"
require_positive_int NODES "--nodes (env NODES)"
require_positive_int GPUS_PER_NODE "--gpus-per-node (env GPUS_PER_NODE)"
[[ -z $CPUS_PER_TASK ]] || require_positive_int CPUS_PER_TASK "--cpus-per-task (env CPUS_PER_TASK)"
require CONFIG "--config (env CONFIG)"
require WORKDIR "--workdir (env WORKDIR)"
case $TASKS in
  per-node) TASKS_PER_NODE=1 ;;
  per-gpu) TASKS_PER_NODE=$GPUS_PER_NODE ;;
  *) die "--tasks must be per-node or per-gpu, got '$TASKS'" ;;
esac
[[ -d $REPO_DIR ]] || die "--repo-dir $REPO_DIR: no such folder"
REPO_DIR=$(cd "$REPO_DIR" && pwd)
CONFIG_FILE=${CONFIG%%:*}
[[ $CONFIG_FILE == /* ]] || CONFIG_FILE=$REPO_DIR/$CONFIG_FILE
[[ -f $CONFIG_FILE ]] || die "--config $CONFIG: no such file $CONFIG_FILE"
refuse_url_workdir "$WORKDIR"
if [[ $WORKDIR != /* ]]; then
  WORKDIR=$PWD/$WORKDIR  # The job runs in --repo-dir: keep a relative --workdir relative to here.
  warn "--workdir is relative: using $WORKDIR, which every node must see (a shared filesystem)"
fi
for value in "$NODES" "$PARTITION" "$ACCOUNT" "$TIME_LIMIT" "$JOB_NAME" "$OUTPUT" "$PYTHON" "$SETUP" "$CONFIG" \
  "$WORKDIR" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"} ${TASK_ENV[@]+"${TASK_ENV[@]}"}; do
  [[ $value != *$'\n'* ]] || die "settings may not contain line breaks: '$value'"
done

# The sbatch script, line by line.
lines=('#!/bin/bash' "#SBATCH --job-name=$JOB_NAME" "#SBATCH --nodes=$NODES" "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  "#SBATCH --gpus-per-node=$GPUS_PER_NODE" "#SBATCH --chdir=$REPO_DIR" "#SBATCH --output=$OUTPUT")
[[ -z $PARTITION ]] || lines+=("#SBATCH --partition=$PARTITION")
[[ -z $ACCOUNT ]] || lines+=("#SBATCH --account=$ACCOUNT")
[[ -z $TIME_LIMIT ]] || lines+=("#SBATCH --time=$TIME_LIMIT")
[[ -z $CPUS_PER_TASK ]] || lines+=("#SBATCH --cpus-per-task=$CPUS_PER_TASK")
for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
  [[ $arg == -* ]] || die "--sbatch-arg expects an sbatch option such as --qos=high, got '$arg'"
  lines+=("#SBATCH $arg")
done
lines+=('set -eo pipefail')
[[ -z $SETUP ]] || lines+=("$SETUP")
for kv in ${TASK_ENV[@]+"${TASK_ENV[@]}"}; do
  [[ $kv =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || die "--env expects KEY=VALUE, got '$kv'"
  lines+=("export ${BASH_REMATCH[1]}=$(quote "${BASH_REMATCH[2]}")")
done
if [[ $TASKS == per-node ]]; then
  lines+=("export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))  # One process per node owns all its GPUs.")
fi
main_cmd "$PYTHON" "$CONFIG" "$WORKDIR" 1 ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
lines+=("srun --kill-on-bad-exit=1 $(quote_cmd "${MAIN_CMD[@]}")")
SCRIPT=$(printf '%s\n' "${lines[@]}")

MARKER=FPD_JAX_SBATCH
if [[ $DRY_RUN == 1 ]]; then
  if [[ -n $SCRIPT_FILE ]]; then
    printf "cat > %s <<'%s'\n%s\n%s\n" "$(quote "$SCRIPT_FILE")" "$MARKER" "$SCRIPT" "$MARKER"
    quote_cmd sbatch "$SCRIPT_FILE"
    echo
  else
    printf "sbatch <<'%s'\n%s\n%s\n" "$MARKER" "$SCRIPT" "$MARKER"
  fi
elif [[ -n $SCRIPT_FILE ]]; then
  printf '%s\n' "$SCRIPT" >"$SCRIPT_FILE"
  echo "wrote $SCRIPT_FILE" >&2
  run sbatch "$SCRIPT_FILE"
else
  printf '+ sbatch <<%s\n%s\n%s\n' "$MARKER" "$SCRIPT" "$MARKER" >&2
  printf '%s\n' "$SCRIPT" | sbatch
fi
