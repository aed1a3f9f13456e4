#!/usr/bin/env bash
# Runs fpd_jax on a Cloud TPU VM slice (single host or pod) with gcloud. See usage below and launch/README.md.
#
# gcloud flags checked against `gcloud compute tpus tpu-vm {create,ssh,scp,describe,delete} --help` (Cloud SDK
# 528.0.0). Default runtime versions from https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX" table).
# `mount` installs Cloud Storage FUSE as https://cloud.google.com/storage/docs/cloud-storage-fuse/install says for
# Debian/Ubuntu (the gcsfuse-CODENAME apt repository of packages.cloud.google.com, key in a signed-by keyring).
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND [options] [-- fpd_jax.main flags...]

Runs fpd_jax on a Cloud TPU VM slice with gcloud. Every command that touches the workers uses --worker=all
(starting the program on one worker of a pod deadlocks it); `run` starts it in the background with nohup and a
log file on every worker, so the ssh session can end while training goes on. fpd_jax writes POSIX paths only:
the workdir must be one folder every worker shares, e.g. a bucket that `mount` mounts with gcsfuse on every worker.

Subcommands:
  create    gcloud compute tpus tpu-vm create NAME --zone --accelerator-type --version [--spot]
  install   ship the code to every worker (a tarball of a git ref of this checkout, a tarball you give, or a
            git clone on the workers), create a venv, pip install -r requirements.txt, then the matching jax[tpu]
  mount     on every worker: apt-install gcsfuse if missing, then gcsfuse --implicit-dirs BUCKET MOUNT_DIR
  run       start python -m fpd_jax.main --config=CONFIG --workdir=WORKDIR --config.distributed=True [extra]
            on all workers, in the background (nohup, log file, pid file)
  logs      follow the log of one worker (worker 0 by default)
  status    describe the TPU and say on every worker whether the run is alive
  stop      send SIGTERM to the run on every worker (the stage saves a checkpoint and stops; `run` resumes)
  delete    delete the TPU VM

Settings (option, or environment variable; options win):
  --name NAME            TPU_NAME       TPU VM name (all subcommands; required)
  --zone ZONE            ZONE           e.g. us-central2-b (all subcommands; required)
  --project PROJECT      PROJECT        Google Cloud project (default: gcloud's configured project)
  --accelerator TYPE     ACCELERATOR    e.g. v4-32, v5litepod-16, v5p-64, v6e-16 (create; required)
  --version VERSION      TPU_VERSION    TPU software version (create; default from the accelerator: v6e ->
                                        v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5, v5litepod/v5e ->
                                        v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base)
  --spot                 SPOT=1         create a Spot TPU (preemptible; `run` again resumes from checkpoints)
  --ref REF              GIT_REF        git ref to ship (install; default HEAD). Without --git-url, `git archive`
                                        of this checkout: committed files only
  --tarball FILE         TARBALL        ship this .tar.gz instead (install; repository files at its top level)
  --git-url URL          GIT_URL        clone URL on the workers and check out --ref there (install)
  --remote-dir DIR       REMOTE_DIR     code folder on the workers, relative to the home (default fpd_jax)
  --python PYTHON        REMOTE_PYTHON  Python >= 3.11 for the workers' venv (install; default python3.11,
                                        apt-installed with its -venv package when missing)
  --config FILE          CONFIG         config path inside the repository, e.g. configs/imagenet.py (run)
  --workdir DIR          WORKDIR        absolute folder shared by every worker (run): under --mount-dir, e.g.
                                        /mnt/gcs/fpd/run1, or on NFS/Filestore; no gs:// URLs. When it is under
                                        --mount-dir, `run` first checks that the bucket is mounted there
  --gcs-bucket BUCKET    GCS_BUCKET     Cloud Storage bucket to mount, my-bucket or gs://my-bucket (mount)
  --mount-dir DIR        MOUNT_DIR      absolute mount point on every worker (mount, run; default /mnt/gcs)
  --env KEY=VALUE        (repeatable)   environment variable of the run, e.g. --env LIBTPU_INIT_ARGS=...
  --log FILE             LOG_FILE       log file inside --remote-dir on every worker (default fpd_jax.log)
  --log-worker N         LOG_WORKER     worker whose log `logs` follows (default 0)
  --yes                  YES=1          delete without asking
  --dry-run              DRY_RUN=1      print the commands, one per line, and execute nothing
  -h, --help                            this help
Arguments after `--` are appended to the fpd_jax.main command line (run).

Example:
  export TPU_NAME=fpd-v5p ZONE=us-east5-a
  launch/tpu_pod.sh create --accelerator=v5p-64 --spot
  launch/tpu_pod.sh install --ref=main
  launch/tpu_pod.sh mount --gcs-bucket=my-bucket     # gcsfuse on /mnt/gcs of every worker
  launch/tpu_pod.sh run --config=configs/imagenet.py --workdir=/mnt/gcs/fpd/run1 -- --config.seed=1
  launch/tpu_pod.sh logs
  launch/tpu_pod.sh run --dry-run --config=configs/imagenet.py --workdir=/mnt/gcs/fpd/run1
EOF
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-}
TPU_VERSION=${TPU_VERSION:-}
SPOT=${SPOT:-0}
GIT_REF=${GIT_REF:-HEAD}
TARBALL=${TARBALL:-}
GIT_URL=${GIT_URL:-}
REMOTE_DIR=${REMOTE_DIR:-fpd_jax}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3.11}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
GCS_BUCKET=${GCS_BUCKET:-}
MOUNT_DIR=${MOUNT_DIR:-/mnt/gcs}
LOG_FILE=${LOG_FILE:-fpd_jax.log}
LOG_WORKER=${LOG_WORKER:-0}
YES=${YES:-0}
RUN_ENV=()

parse_args "name=TPU_NAME zone=ZONE project=PROJECT accelerator=ACCELERATOR version=TPU_VERSION ref=GIT_REF \
tarball=TARBALL git-url=GIT_URL remote-dir=REMOTE_DIR python=REMOTE_PYTHON config=CONFIG workdir=WORKDIR \
env=RUN_ENV+ gcs-bucket=GCS_BUCKET mount-dir=MOUNT_DIR log=LOG_FILE log-worker=LOG_WORKER" "spot=SPOT yes=YES" "$@"

((${#POSITIONAL[@]} >= 1)) ||
  die "missing subcommand: create, install, mount, run, logs, status, stop or delete (see --help)"
((${#POSITIONAL[@]} == 1)) || die "unexpected argument '${POSITIONAL[1]}' (arguments for fpd_jax.main go after --)"
SUBCOMMAND=${POSITIONAL[0]}
case $SUBCOMMAND in
  create | install | mount | run | logs | status | stop | delete) ;;
  *) die "unknown subcommand '$SUBCOMMAND': use create, install, mount, run, logs, status, stop or delete" ;;
esac
if ((${#EXTRA_ARGS[@]})) && [[ $SUBCOMMAND != run ]]; then
  die "arguments after -- are only for 'run'"
fi

require TPU_NAME "--name (env TPU_NAME)"
require ZONE "--zone (env ZONE)"
[[ -n $REMOTE_DIR ]] || die "--remote-dir must not be empty"
MOUNT_DIR=${MOUNT_DIR%/}
[[ $MOUNT_DIR == /?* ]] || die "--mount-dir (env MOUNT_DIR) must be an absolute folder like /mnt/gcs, got '$MOUNT_DIR'"
MDIR=$(quote "$MOUNT_DIR")

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  LOCATION+=("--project=$PROJECT")
fi
RDIR=$(quote "$REMOTE_DIR")
# The run's pid file on every worker (inside --remote-dir) and a shell test that is true when it is alive.
PID_FILE=fpd_jax.pid
ALIVE="[ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null"

# Runs COMMAND (one string, read by the login shell of each worker) on every worker of the slice.
ssh_all() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all "--command=$1"
}

# The TPU software version for an accelerator type (the "PyTorch and JAX" table of the TPU runtimes page).
default_version() {
  case $1 in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v2* | v3* | v4*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

do_create() {
  require ACCELERATOR "--accelerator (env ACCELERATOR)"
  if [[ -z $TPU_VERSION ]]; then
    TPU_VERSION=$(default_version "$ACCELERATOR") ||
      die "no default TPU software version for accelerator '$ACCELERATOR'; pass --version (env TPU_VERSION)"
  fi
  local cmd=("${GCLOUD_TPU[@]}" create "$TPU_NAME" "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR"
    "--version=$TPU_VERSION")
  if is_true "$SPOT"; then
    cmd+=(--spot)
  fi
  run "${cmd[@]}"
}

# shellcheck disable=SC2016  # The $ of the remote commands expand on the workers, not here.
do_install() {
  local py setup fetch
  py=$(quote "$REMOTE_PYTHON")
  # Venv (the Python is apt-installed when missing), requirements, then jax[tpu] at the jax pin of requirements.txt.
  setup="cd $RDIR"
  setup+="; if [ ! -x .venv/bin/python ]; then $py -m venv .venv || { sudo apt-get update -qq"
  setup+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv"
  setup+=" && $py -m venv --clear .venv; }; fi"
  setup+='; .venv/bin/python -m pip install -q -U pip'
  setup+='; .venv/bin/python -m pip install -q -r requirements.txt'
  setup+='; JAX_VERSION=$(sed -n "s/^jax==\([^ #]*\).*/\1/p" requirements.txt)'
  setup+='; [ -n "$JAX_VERSION" ] || { echo "error: no jax==VERSION pin in requirements.txt" >&2; exit 1; }'
  setup+='; .venv/bin/python -m pip install -q "jax[tpu]==$JAX_VERSION"'
  setup+='; echo "$(hostname): installed jax[tpu]==$JAX_VERSION in $(pwd)/.venv"'

  if [[ -n $GIT_URL ]]; then
    [[ -z $TARBALL ]] || die "--git-url and --tarball are exclusive: pick one source"
    local url ref
    url=$(quote "$GIT_URL")
    ref=$(quote "$GIT_REF")
    fetch="if [ -d $RDIR/.git ]; then git -C $RDIR remote set-url origin $url; else git clone -q $url $RDIR; fi"
    fetch+="; git -C $RDIR fetch -q origin $ref; git -C $RDIR checkout -q --detach FETCH_HEAD"
    ssh_all "set -e; $fetch; $setup"
    return
  fi

  local tarball=$TARBALL remote_tar=fpd_jax-src.tar.gz
  if [[ -n $tarball ]]; then
    [[ -f $tarball ]] || die "--tarball $tarball: no such file"
  else
    git -C "$REPO_ROOT" rev-parse -q --verify "$GIT_REF^{commit}" >/dev/null ||
      die "--ref $GIT_REF: not a commit of $REPO_ROOT (or pass --git-url / --tarball)"
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      warn "uncommitted changes in $REPO_ROOT are not shipped: the tarball holds $GIT_REF as committed"
    fi
    tarball="${TMPDIR:-/tmp}/fpd_jax-$(printf '%s' "$GIT_REF" | tr -c 'A-Za-z0-9._-' '_').tar.gz"
    run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$GIT_REF"
  fi
  run "${GCLOUD_TPU[@]}" scp "$tarball" "$TPU_NAME:$remote_tar" "${LOCATION[@]}" --worker=all
  fetch="mkdir -p $RDIR; tar -xzf $remote_tar -C $RDIR; rm -f $remote_tar"
  ssh_all "set -e; $fetch; $setup"
}

# shellcheck disable=SC2016  # The $ of the remote commands expand on the workers, not here.
do_mount() {
  require GCS_BUCKET "--gcs-bucket (env GCS_BUCKET)"
  local bucket=${GCS_BUCKET#gs://} remote
  bucket=${bucket%/}
  [[ $bucket =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] ||
    die "--gcs-bucket $GCS_BUCKET is not a bucket name: 3 to 222 lowercase letters, digits, '-', '_', '.', no folder"
  # Cloud Storage FUSE's Debian/Ubuntu install steps, run only where gcsfuse is missing.
  remote='set -e; if ! command -v gcsfuse >/dev/null 2>&1; then'
  remote+=' echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt'
  remote+=' gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null'
  remote+='; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg'
  remote+=' | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null'
  remote+='; sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; fi'
  remote+="; if mountpoint -q $MDIR; then echo \"\$(hostname): $MDIR is already mounted\""
  remote+="; else sudo mkdir -p $MDIR; sudo chown \"\$(id -u):\$(id -g)\" $MDIR"
  remote+="; gcsfuse --implicit-dirs $(quote "$bucket") $MDIR"
  remote+="; echo \"\$(hostname): mounted gs://$bucket on $MDIR\"; fi"
  ssh_all "$remote"
}

do_run() {
  require CONFIG "--config (env CONFIG)"
  require WORKDIR "--workdir (env WORKDIR)"
  refuse_url_workdir "$WORKDIR" "launch/tpu_pod.sh mount --gcs-bucket=BUCKET does it on every worker"
  if [[ $WORKDIR != /* ]]; then
    warn "--workdir $WORKDIR is not an absolute path: every worker needs the same shared folder"
  fi
  local envs=() kv
  for kv in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
    envs+=("$kv")
  done
  main_cmd .venv/bin/python "$CONFIG" "$WORKDIR" 1 ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
  if ((${#envs[@]})); then
    MAIN_CMD=(env "${envs[@]}" "${MAIN_CMD[@]}")
  fi
  local log remote
  log=$(quote "$LOG_FILE")
  remote="cd $RDIR || exit 1"
  remote+="; if $ALIVE; then echo \"error: \$(hostname): a run is alive (pid \$(cat $PID_FILE)); stop it first\" >&2"
  remote+="; exit 1; fi"
  if [[ $WORKDIR == "$MOUNT_DIR"/* ]]; then  # Unmounted, each worker would write its own local folder.
    remote+="; mountpoint -q $MDIR || { echo \"error: \$(hostname): $MDIR is not mounted: run launch/tpu_pod.sh"
    remote+=" mount --gcs-bucket=BUCKET first\" >&2; exit 1; }"
  fi
  remote+="; setsid nohup $(quote_cmd "${MAIN_CMD[@]}") > $log 2>&1 < /dev/null & echo \$! > $PID_FILE"
  remote+="; echo \"\$(hostname): started pid \$(cat $PID_FILE), log \$(pwd)/$log\""
  ssh_all "$remote"
}

do_logs() {
  [[ $LOG_WORKER =~ ^[0-9]+$ ]] || die "--log-worker must be a worker index (0, 1, ...), got '$LOG_WORKER'"
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$LOG_WORKER" \
    "--command=tail -n 100 -F $RDIR/$(quote "$LOG_FILE")"
}

do_status() {
  run "${GCLOUD_TPU[@]}" describe "$TPU_NAME" "${LOCATION[@]}"
  ssh_all "if cd $RDIR 2>/dev/null && $ALIVE; then echo \"\$(hostname): running (pid \$(cat $PID_FILE))\"; \
else echo \"\$(hostname): not running\"; fi"
}

do_stop() {
  ssh_all "if cd $RDIR 2>/dev/null && $ALIVE; then kill -TERM \"\$(cat $PID_FILE)\" && echo \"\$(hostname): sent \
SIGTERM to pid \$(cat $PID_FILE)\"; else echo \"\$(hostname): not running\"; fi"
}

do_delete() {
  local cmd=("${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${LOCATION[@]}")
  if is_true "$YES"; then
    cmd+=(--quiet)
  fi
  run "${cmd[@]}"
}

"do_$SUBCOMMAND"
