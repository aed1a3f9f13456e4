# Shared helpers of the launch scripts: sourced, never run. One copy of option parsing, dry-run and errors.
#
# A script sets its defaults (usually from environment variables), then calls
#   parse_args "VALUE_SPECS" "FLAG_SPECS" "$@"
# where VALUE_SPECS is a space-separated list of `option=VARIABLE` (an option taking a value, `--option=V` or
# `--option V`; `option=VARIABLE+` collects every occurrence into the array VARIABLE) and FLAG_SPECS a list of
# `option=VARIABLE` switches set to 1. Words that are not options land in POSITIONAL, everything after `--` in
# EXTRA_ARGS. `--help`/`-h` calls the script's `usage` and exits 0; `--dry-run` sets DRY_RUN=1 in every script.
# Commands go through `run`: with --dry-run it prints them, shell-quoted, one per line, and executes nothing.
#
# Written for bash >= 3.2 (macOS): no associative arrays, empty arrays expanded as ${a[@]+"${a[@]}"}.

# shellcheck shell=bash

# shellcheck disable=SC2034  # Globals read by the scripts that source this file.
{
  DRY_RUN=${DRY_RUN:-0}
  POSITIONAL=()
  EXTRA_ARGS=()
  # The root of this repository (the folder above launch/).
  REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Prints `error: MESSAGE` on stderr and exits 2 (a usage mistake: missing setting, unknown option, bad value).
die() {
  echo "error: $*" >&2
  exit 2
}

# Prints `warning: MESSAGE` on stderr.
warn() {
  echo "warning: $*" >&2
}

# True for 1/true/yes/on (any case), false for empty/0/false/no/off; anything else is a usage error.
is_true() {
  case $(printf '%s' "$1" | tr '[:upper:]' '[:lower:]') in
    1 | true | yes | on) return 0 ;;
    '' | 0 | false | no | off) return 1 ;;
    *) die "expected a boolean (1/0, true/false), got '$1'" ;;
  esac
}

# Quotes one word for a POSIX shell: bare when it only holds safe characters, else single-quoted.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: a command line a shell reads back into the same words.
quote_cmd() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with DRY_RUN=1 prints it (quoted, one line) on stdout instead. Real runs echo `+ command` on
# stderr first, so a log shows what ran.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# Finds OPTION in SPECS (`option=VARIABLE` words) and prints VARIABLE (with a trailing + for repeatable ones).
_spec_lookup() {
  local name=$1 spec
  for spec in $2; do
    if [[ ${spec%%=*} == "$name" ]]; then
      printf '%s' "${spec#*=}"
      return 0
    fi
  done
  return 1
}

# Parses "$@" against the script's option specs (see the top of this file). Sets the named variables, POSITIONAL
# and EXTRA_ARGS; --help prints `usage` and exits 0; an unknown option or a missing value exits 2.
parse_args() {
  local value_specs=$1 flag_specs="$2 dry-run=DRY_RUN" name value has_value var
  shift 2
  POSITIONAL=()
  # shellcheck disable=SC2034  # Read by the scripts that source this file.
  EXTRA_ARGS=()
  while (($#)); do
    case $1 in
      --)
        shift
        # shellcheck disable=SC2034  # Read by the scripts that source this file.
        EXTRA_ARGS=("$@")
        break
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --?*)
        name=${1#--}
        value=''
        has_value=0
        if [[ $name == *=* ]]; then
          value=${name#*=}
          name=${name%%=*}
          has_value=1
        fi
        if var=$(_spec_lookup "$name" "$flag_specs"); then
          [[ $has_value == 0 ]] || die "option --$name takes no value (see --help)"
          printf -v "$var" '%s' 1
        elif var=$(_spec_lookup "$name" "$value_specs"); then
          if [[ $has_value == 0 ]]; then
            (($# >= 2)) || die "option --$name needs a value (see --help)"
            value=$2
            shift
          fi
          if [[ $var == *+ ]]; then
            eval "${var%+}+=(\"\$value\")"
          else
            printf -v "$var" '%s' "$value"
          fi
        else
          die "unknown option --$name (see --help)"
        fi
        ;;
      -?*) die "unknown option $1 (see --help)" ;;
      *) POSITIONAL+=("$1") ;;
    esac
    shift
  done
  if is_true "$DRY_RUN"; then DRY_RUN=1; else DRY_RUN=0; fi
}

# Exits 2 naming the setting when VARIABLE is empty: require VARIABLE "--option (env VARIABLE)".
require() {
  [[ -n ${!1:-} ]] || die "missing required setting $2"
}

# Exits 2 unless VARIABLE holds a positive integer.
require_positive_int() {
  [[ ${!1:-} =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer, got '${!1:-}'"
}

# Exits 2 when WORKDIR is a URL (gs://..., s3://...): fpd_jax reads and writes POSIX paths only, so a bucket must be
# mounted (gcsfuse) on every host and the mounted path passed. Usage: refuse_url_workdir WORKDIR [HINT]
refuse_url_workdir() {
  [[ $1 != *://* ]] || die "--workdir $1: fpd_jax reads and writes POSIX paths only; mount the bucket (gcsfuse \
--implicit-dirs BUCKET /mnt/gcs, on every host of a multi-host run${2:+; $2}) and pass the mounted path, e.g. \
--workdir=/mnt/gcs/fpd/run1"
}

# Sets the array MAIN_CMD to the pipeline's command line:
#   PYTHON -m fpd_jax.main --config=CONFIG --workdir=WORKDIR [--config.distributed=True] [EXTRA...]
# Usage: main_cmd PYTHON CONFIG WORKDIR DISTRIBUTED(0/1) [EXTRA...]
main_cmd() {
  local python=$1 config=$2 workdir=$3 distributed=$4
  shift 4
  MAIN_CMD=("$python" -m fpd_jax.main "--config=$config" "--workdir=$workdir")
  if [[ $distributed == 1 ]]; then
    MAIN_CMD+=(--config.distributed=True)
  fi
  MAIN_CMD+=("$@")
}

# The `jax==X` pin of a requirements file's text on stdin (empty when there is none).
jax_pin_from_requirements() {
  sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' | head -n 1
}
