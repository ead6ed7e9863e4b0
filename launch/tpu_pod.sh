#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create it, put the code and its
# requirements on every worker, run fixclip_jax.main on all workers at once.
#
#   launch/tpu_pod.sh [options] create|setup|delete
#   launch/tpu_pod.sh [options] run|all CONFIG WORKDIR [MAIN_FLAGS...]
#
#   create   gcloud compute tpus tpu-vm create
#   setup    copy this checkout (or clone --repo) to every worker, pip install
#            requirements.txt, jax[tpu] and the package
#   run      python3 -m fixclip_jax.main on every worker (--worker=all)
#   all      create, setup, run
#   delete   gcloud compute tpus tpu-vm delete
# WORKDIR must be a gs:// path: every worker writes checkpoints and reads
# them back from the same place. MAIN_FLAGS go to fixclip_jax.main unchanged
# (--config.key=value, --mode=eval).
# Options (TPU_NAME, ZONE, ACCELERATOR_TYPE, PROJECT in the environment work too):
#   --tpu=NAME  --zone=ZONE  --accelerator=TYPE (default v4-32)
#   --version=RUNTIME   TPU software version (default: by accelerator)
#   --project=ID        gcloud project (default: gcloud's)
#   --spot              create a Spot (preemptible) TPU
#   --repo=URL [--branch=B]  setup clones URL instead of copying this checkout
#   --detach            run in the background on the workers (log in
#                       fixclip_jax/run.log) so a dropped ssh does not stop it
#   --dry-run           print each command instead of running it
# Example:
#   launch/tpu_pod.sh --tpu=fix --zone=us-central2-b --accelerator=v4-32 all \
#       configs/fixclip_b16.py gs://my-bucket/runs/b16 --config.data.global_batch=1024
set -euo pipefail

# Where the code lives on each worker, relative to the ssh home directory.
readonly REMOTE_DIR="fixclip_jax"
readonly ARCHIVE="fixclip_jax_code.tar.gz"

dry_run=0
tpu="${TPU_NAME:-}"
zone="${ZONE:-}"
accelerator="${ACCELERATOR_TYPE:-v4-32}"
version=""
project="${PROJECT:-}"
spot=0
repo=""
branch=""
detach=0

usage() {
  awk 'NR > 1 && /^#SBATCH/ { exit } NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# Prints a command as it would be typed: plain words bare, the rest in
# single quotes (POSIX, so the remote shell and Python's shlex read it back).
print_cmd() {
  local out="" word q="'"
  for word in "$@"; do
    if [[ "${word}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="${word} "
    else
      out+="'${word//${q}/${q}\\${q}${q}}' "
    fi
  done
  echo "${out% }"
}

# Runs a command, or with --dry-run prints it.
run() {
  if ((dry_run)); then
    print_cmd "$@"
  else
    echo "+ $(print_cmd "$@")" >&2
    "$@"
  fi
}

# A command line for the workers' shell, every word quoted.
remote_line() {
  print_cmd "$@"
}

# Runtime image that matches the TPU generation.
default_version() {
  case "$1" in
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

gcloud_common() {
  COMMON=("--zone=${zone}")
  if [[ -n "${project}" ]]; then
    COMMON+=("--project=${project}")
  fi
}

# ssh to every worker of the slice with one shell command line.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${tpu}" "${COMMON[@]}" --worker=all \
    "--command=$1"
}

cmd_create() {
  local -a extra=()
  if ((spot)); then
    extra+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "${tpu}" "${COMMON[@]}" \
    "--accelerator-type=${accelerator}" "--version=${version}" "${extra[@]}"
}

# The files of this checkout that git does not ignore (uncommitted edits
# included), as one archive.
pack_checkout() {
  local root="$1" out="$2"
  if ((dry_run)); then
    echo "$(print_cmd git -C "${root}" ls-files -z --cached --others --exclude-standard) | $(print_cmd tar -C "${root}" -czf "${out}" --null -T -)"
    return
  fi
  git -C "${root}" ls-files -z --cached --others --exclude-standard |
    tar -C "${root}" -czf "${out}" --null -T -
}

cmd_setup() {
  local fetch
  if [[ -n "${repo}" ]]; then
    local -a clone=(git clone --depth=1)
    if [[ -n "${branch}" ]]; then
      clone+=("--branch=${branch}")
    fi
    fetch="rm -rf ${REMOTE_DIR} && $(remote_line "${clone[@]}" "${repo}" "${REMOTE_DIR}")"
  else
    local root tmp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    tmp="${TMPDIR:-/tmp}/${ARCHIVE}"
    pack_checkout "${root}" "${tmp}"
    run gcloud compute tpus tpu-vm scp "${tmp}" "${tpu}:${ARCHIVE}" \
      "${COMMON[@]}" --worker=all
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf ${ARCHIVE} -C ${REMOTE_DIR}"
  fi
  ssh_all "set -e; ${fetch} && cd ${REMOTE_DIR} && python3 -m pip install -q -U pip && python3 -m pip install -q -r requirements.txt 'jax[tpu]' && python3 -m pip install -q --no-deps -e ."
}

cmd_run() {
  local config="$1" workdir="$2"
  shift 2
  # Every worker calls jax.distributed.initialize(), which finds the slice
  # through the TPU metadata server (the ssh session has no TPU_* variables
  # for main.py's "auto" detection to see); later flags can still override.
  local main_cmd
  main_cmd="$(remote_line python3 -m fixclip_jax.main "--config=${config}" \
    "--workdir=${workdir}" --config.distributed=on "$@")"
  if ((detach)); then
    main_cmd="nohup ${main_cmd} > run.log 2>&1 < /dev/null &"
  fi
  ssh_all "cd ${REMOTE_DIR} && ${main_cmd}"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "${tpu}" "${COMMON[@]}" --quiet
}

main() {
  local -a positional=()
  while (($#)) && ((${#positional[@]} < 1)); do
    case "$1" in
      --dry-run) dry_run=1 ;;
      --tpu=*) tpu="${1#*=}" ;;
      --zone=*) zone="${1#*=}" ;;
      --accelerator=*) accelerator="${1#*=}" ;;
      --version=*) version="${1#*=}" ;;
      --project=*) project="${1#*=}" ;;
      --spot) spot=1 ;;
      --repo=*) repo="${1#*=}" ;;
      --branch=*) branch="${1#*=}" ;;
      --detach) detach=1 ;;
      -h|--help) usage 0 ;;
      --*) die "unknown option $1 (options go before the subcommand; see --help)" ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  ((${#positional[@]} == 1)) || die "need a subcommand: create|setup|run|all|delete (see --help)"
  local sub="${positional[0]}"
  [[ -n "${tpu}" ]] || die "--tpu=NAME (or TPU_NAME) is required"
  [[ -n "${zone}" ]] || die "--zone=ZONE (or ZONE) is required"
  [[ -n "${version}" ]] || version="$(default_version "${accelerator}")"
  if [[ -n "${branch}" && -z "${repo}" ]]; then
    die "--branch needs --repo"
  fi
  if ((!dry_run)); then
    command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI"
  fi
  gcloud_common

  case "${sub}" in
    create|setup|delete)
      (($# == 0)) || die "${sub} takes no further arguments, got: $*"
      "cmd_${sub}"
      ;;
    run|all)
      (($# >= 2)) || die "${sub} needs CONFIG WORKDIR [MAIN_FLAGS...]"
      [[ "$2" == gs://* ]] || die "WORKDIR=$2: must be a gs:// path that every worker shares"
      if [[ "${sub}" == all ]]; then
        cmd_create
        cmd_setup
      fi
      cmd_run "$@"
      ;;
    *) die "unknown subcommand ${sub}: use create|setup|run|all|delete" ;;
  esac
}

main "$@"
