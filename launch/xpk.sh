#!/usr/bin/env bash
# Runs fpd_jax on GKE through xpk (TPU slices, multislice, GPU or CPU node pools). See usage below.
#
# xpk flags relied on, read from the xpk sources (github.com/AI-Hypercomputer/xpk at 367c838, 2026-06-25,
# release v1.13.1: src/xpk/parser/workload.py, src/xpk/parser/common.py, recipes/Workload_{create,list,delete}.md):
#   xpk workload create --cluster --workload --command (required), exactly one of --tpu-type / --device-type,
#     --num-slices (default 1), --docker-image (used as is) or --base-docker-image (default python:3.10) plus
#     --script-dir (default: the current folder, honouring its .dockerignore; xpk appends it to the base image with
#     workdir /app), --env KEY=VALUE (repeatable), --project, --zone, --priority, --max-restarts;
#   xpk workload list --cluster;  xpk workload delete --cluster --workload [--force].
# Names (cluster, workload) must match [a-z]([-a-z0-9]*[a-z0-9])? with at most 40 characters (parser/validators.py).
# xpk writes --command into a YAML block and, for GPUs, a double-quoted YAML value (core/docker_container.py,
# core/docker_resources.py), so the command built here uses single quotes only.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/xpk.sh SUBCOMMAND [options] [-- fpd_jax.main flags...]

Runs fpd_jax on a GKE cluster made with xpk (`pip install xpk`). `create` submits one workload: every VM of every
slice runs python -m fpd_jax.main ... --config.distributed=True (JAX finds its peers from the GKE environment).

Subcommands:
  create    xpk workload create ... --command "python -m fpd_jax.main ..."
  list      xpk workload list --cluster=CLUSTER
  delete    xpk workload delete --cluster=CLUSTER --workload=WORKLOAD

Settings (option, or environment variable; options win):
  --cluster NAME           CLUSTER            xpk cluster (required)
  --workload NAME          WORKLOAD           workload name, [a-z][-a-z0-9]* up to 40 characters (create, delete)
  --project PROJECT        PROJECT            Google Cloud project (default: gcloud's configured project)
  --zone ZONE              ZONE               zone of the cluster (default: gcloud's configured zone)
  --tpu-type TYPE          TPU_TYPE           e.g. v5p-128, v6e-256 (create; this or --device-type)
  --device-type TYPE       DEVICE_TYPE        e.g. h100-80gb-8, v5litepod-16, n2-standard-32-4
  --num-slices N           NUM_SLICES         number of slices (default 1)
  --docker-image IMAGE     DOCKER_IMAGE       a ready image: repository at its working directory, requirements
                                              and jax[tpu|cuda12] installed; nothing is installed at start
  --base-docker-image IMG  BASE_DOCKER_IMAGE  otherwise: base image the code is added to (default python:3.11);
                                              the command then pip-installs requirements.txt and jax[EXTRA]
  --script-dir DIR         SCRIPT_DIR         folder xpk adds to the base image (default: `git archive` of --ref
                                              of this checkout, staged in $TMPDIR/fpd_jax-xpk-WORKLOAD)
  --ref REF                GIT_REF            git ref staged when --script-dir is not given (default HEAD)
  --jax-extra EXTRA        JAX_EXTRA          jax extra installed at start with a base image (default from the
                                              type: tpu for TPUs, cuda12,k8s for GPUs, k8s for CPUs; none: skip)
  --python PYTHON          PYTHON             Python inside the container (default python)
  --config FILE            CONFIG             config path inside the repository, e.g. configs/imagenet.py (create)
  --workdir DIR            WORKDIR            output folder every VM sees: the mount point of an xpk storage,
                                              e.g. /mnt/gcs/fpd/run1 (no gs:// URLs) (create)
  --env KEY=VALUE          (repeatable)       environment variable of the workload (xpk --env)
  --xpk-arg ARG            (repeatable)       extra xpk workload create flag, verbatim, e.g. --xpk-arg=--priority=high
  --force                  FORCE=1            delete without asking
  --dry-run                DRY_RUN=1          print the commands, one per line, and execute nothing
  -h, --help                                  this help
Arguments after `--` are appended to the fpd_jax.main command line (create).

The workdir must be one shared POSIX folder: attach a bucket (gcsfuse CSI driver) or a Filestore to the cluster with
`xpk storage attach NAME --type=gcsfuse --bucket=BUCKET --mount-point=/mnt/gcs --readonly=false --auto-mount=true
...` (with --auto-mount=false, add --xpk-arg=--storage=NAME) and pass --workdir=/mnt/gcs/...

GPU and CPU workloads find their peers through the Kubernetes API (jax[k8s]): the workload's service account
needs permission to read pods and jobs.

Example:
  launch/xpk.sh create --cluster=fpd-v5p --workload=fpd-run1 --tpu-type=v5p-128 --num-slices=2 \
    --config=configs/imagenet.py --workdir=/mnt/gcs/fpd/run1 -- --config.distill.num_steps=20000
  launch/xpk.sh list --cluster=fpd-v5p
  launch/xpk.sh delete --cluster=fpd-v5p --workload=fpd-run1 --dry-run
EOF
}

CLUSTER=${CLUSTER:-}
WORKLOAD=${WORKLOAD:-}
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_TYPE=${TPU_TYPE:-}
DEVICE_TYPE=${DEVICE_TYPE:-}
NUM_SLICES=${NUM_SLICES:-1}
DOCKER_IMAGE=${DOCKER_IMAGE:-}
BASE_DOCKER_IMAGE=${BASE_DOCKER_IMAGE:-}
SCRIPT_DIR=${SCRIPT_DIR:-}
GIT_REF=${GIT_REF:-HEAD}
JAX_EXTRA=${JAX_EXTRA:-}
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
FORCE=${FORCE:-0}
WORKLOAD_ENV=()
XPK_ARGS=()

parse_args "cluster=CLUSTER workload=WORKLOAD project=PROJECT zone=ZONE tpu-type=TPU_TYPE device-type=DEVICE_TYPE \
num-slices=NUM_SLICES docker-image=DOCKER_IMAGE base-docker-image=BASE_DOCKER_IMAGE script-dir=SCRIPT_DIR \
ref=GIT_REF jax-extra=JAX_EXTRA python=PYTHON config=CONFIG workdir=WORKDIR env=WORKLOAD_ENV+ xpk-arg=XPK_ARGS+" \
  "force=FORCE" "$@"

((${#POSITIONAL[@]} >= 1)) || die "missing subcommand: create, list or delete (see --help)"
((${#POSITIONAL[@]} == 1)) || die "unexpected argument '${POSITIONAL[1]}' (arguments for fpd_jax.main go after --)"
SUBCOMMAND=${POSITIONAL[0]}
case $SUBCOMMAND in
  create | list | delete) ;;
  *) die "unknown subcommand '$SUBCOMMAND': use create, list or delete" ;;
esac
if ((${#EXTRA_ARGS[@]})) && [[ $SUBCOMMAND != create ]]; then
  die "arguments after -- are only for 'create'"
fi

# Exits 2 unless VARIABLE holds a valid xpk name.
require_name() {
  require "$1" "$2"
  local value=${!1}
  [[ $value =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#value} -le 40 ]] ||
    die "$2 '$value' is not a valid xpk name: lowercase letters, digits and '-', starting with a letter, at most 40"
}

require_name CLUSTER "--cluster (env CLUSTER)"
LOCATION=()
if [[ -n $PROJECT ]]; then
  LOCATION+=("--project=$PROJECT")
fi
if [[ -n $ZONE ]]; then
  LOCATION+=("--zone=$ZONE")
fi

# The jax extra for an accelerator type: TPUs -> tpu, xpk's CPU types (n2-standard-32-4, ...) -> k8s, else GPUs.
default_jax_extra() {
  if [[ -n $TPU_TYPE ]]; then
    echo tpu
    return
  fi
  case $DEVICE_TYPE in
    v[0-9]* | tpu*) echo tpu ;;
    n[0-9]*-* | c[0-9]*-* | m[0-9]*-* | e2-*) echo k8s ;;
    *) echo cuda12,k8s ;;
  esac
}

do_create() {
  require_name WORKLOAD "--workload (env WORKLOAD)"
  require CONFIG "--config (env CONFIG)"
  require WORKDIR "--workdir (env WORKDIR)"
  require_positive_int NUM_SLICES "--num-slices (env NUM_SLICES)"
  if [[ -n $TPU_TYPE && -n $DEVICE_TYPE ]]; then
    die "--tpu-type and --device-type are exclusive: pass one"
  fi
  [[ -n $TPU_TYPE || -n $DEVICE_TYPE ]] ||
    die "missing required setting --tpu-type (env TPU_TYPE) or --device-type (env DEVICE_TYPE)"
  refuse_url_workdir "$WORKDIR" "here an xpk storage, see --help"
  if [[ $WORKDIR != /* ]]; then
    warn "--workdir $WORKDIR is not an absolute path: every VM needs the same shared folder (an xpk storage mount)"
  fi

  local cmd=(xpk workload create "--cluster=$CLUSTER" "--workload=$WORKLOAD")
  if [[ -n $TPU_TYPE ]]; then
    cmd+=("--tpu-type=$TPU_TYPE")
  else
    cmd+=("--device-type=$DEVICE_TYPE")
  fi
  cmd+=("--num-slices=$NUM_SLICES")

  local command='' stage=''
  main_cmd "$PYTHON" "$CONFIG" "$WORKDIR" 1 ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
  if [[ -n $DOCKER_IMAGE ]]; then
    [[ -z $BASE_DOCKER_IMAGE && -z $SCRIPT_DIR ]] ||
      die "--docker-image is used as is: drop --base-docker-image / --script-dir (or drop --docker-image)"
    cmd+=("--docker-image=$DOCKER_IMAGE")
  else
    local requirements
    if [[ -n $SCRIPT_DIR ]]; then
      [[ -f $SCRIPT_DIR/requirements.txt ]] || die "--script-dir $SCRIPT_DIR: no requirements.txt there"
      SCRIPT_DIR=$(cd "$SCRIPT_DIR" && pwd)
      requirements=$(cat "$SCRIPT_DIR/requirements.txt")
    else
      git -C "$REPO_ROOT" rev-parse -q --verify "$GIT_REF^{commit}" >/dev/null ||
        die "--ref $GIT_REF: not a commit of $REPO_ROOT (or pass --script-dir / --docker-image)"
      if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        warn "uncommitted changes in $REPO_ROOT are not shipped: the image holds $GIT_REF as committed"
      fi
      requirements=$(git -C "$REPO_ROOT" show "$GIT_REF:requirements.txt")
      stage="${TMPDIR:-/tmp}/fpd_jax-xpk-$WORKLOAD"
    fi
    local pip=("$PYTHON" -m pip install -q --root-user-action=ignore) jax_version extra
    extra=${JAX_EXTRA:-$(default_jax_extra)}
    command="$(quote_cmd "${pip[@]}" -r requirements.txt)"
    if [[ $extra != none ]]; then
      jax_version=$(printf '%s\n' "$requirements" | jax_pin_from_requirements)
      [[ -n $jax_version ]] || die "requirements.txt has no jax==VERSION pin to match jax[$extra] to"
      command+=" && $(quote_cmd "${pip[@]}" "jax[$extra]==$jax_version")"
    fi
    command+=" && "
    cmd+=("--base-docker-image=${BASE_DOCKER_IMAGE:-python:3.11}" "--script-dir=${SCRIPT_DIR:-$stage}")
  fi
  command+=$(quote_cmd "${MAIN_CMD[@]}")
  [[ $command != *[\"\\]* ]] ||
    die "the workload command may not hold double quotes or backslashes (xpk writes it into YAML): $command"
  cmd+=("--command=$command")

  local kv
  for kv in ${WORKLOAD_ENV[@]+"${WORKLOAD_ENV[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
    cmd+=("--env=$kv")
  done
  cmd+=(${LOCATION[@]+"${LOCATION[@]}"} ${XPK_ARGS[@]+"${XPK_ARGS[@]}"})

  if [[ -n $stage ]]; then  # A clean copy of the ref for xpk to add to the base image.
    run rm -rf "$stage"
    run mkdir -p "$stage"
    run git -C "$REPO_ROOT" archive --format=tar "--output=$stage.tar" "$GIT_REF"
    run tar -xf "$stage.tar" -C "$stage"
    run rm -f "$stage.tar"
  fi
  run "${cmd[@]}"
}

do_list() {
  run xpk workload list "--cluster=$CLUSTER" ${LOCATION[@]+"${LOCATION[@]}"}
}

do_delete() {
  require_name WORKLOAD "--workload (env WORKLOAD)"
  local cmd=(xpk workload delete "--cluster=$CLUSTER" "--workload=$WORKLOAD" ${LOCATION[@]+"${LOCATION[@]}"})
  if is_true "$FORCE"; then
    cmd+=(--force)
  fi
  run "${cmd[@]}"
}

"do_$SUBCOMMAND"
