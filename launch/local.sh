#!/usr/bin/env bash
# Runs fixclip_jax.main on this machine: one process that sees every local
# device (the default; single-host multi-GPU), or N local processes wired
# together through jax.distributed (to test multi-process code on one box).
#
#   launch/local.sh [options] CONFIG WORKDIR [MAIN_FLAGS...]
#
# MAIN_FLAGS go to fixclip_jax.main unchanged (--config.key=value, --mode=eval).
# Options:
#   --num_processes=N   N > 1: N processes, coordinator on localhost (default 1)
#   --cpu               force the CPU backend (JAX_PLATFORMS=cpu)
#   --cpu_devices=K     with --cpu: K host devices per process
#   --port=P            coordinator port for N > 1 (default 12355)
#   --dry-run           print each command instead of running it
#
# With N > 1 each process gets the variables fixclip_jax.main reads:
# JAX_COORDINATOR_ADDRESS=localhost:P, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i,
# and without --cpu JAX_LOCAL_DEVICE_IDS=i (process i drives GPU i).
# Examples:
#   launch/local.sh configs/fixclip_b16.py /tmp/run --config.data.global_batch=256
#   launch/local.sh --num_processes=2 --cpu configs/demo.py /tmp/mp \
#       --config.num_train_steps=4
set -euo pipefail

readonly PYTHON="${PYTHON:-python3}"

dry_run=0
num_processes=1
cpu=0
cpu_devices=0
port=12355
PIDS=()
readonly STOP_GRACE_S="${LOCAL_STOP_GRACE_S:-20}"


usage() {
  awk 'NR > 1 && /^#SBATCH/ { exit } NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}

die() {
  echo "local.sh: $*" >&2
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

is_positive_int() {
  [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# argv of process $1 (of $num_processes): env VAR=... python -m fixclip_jax.main ...
process_cmd() {
  local index="$1"
  shift
  local -a vars=()
  if ((cpu)); then
    vars+=("JAX_PLATFORMS=cpu")
    if ((cpu_devices > 0)); then
      vars+=("XLA_FLAGS=--xla_force_host_platform_device_count=${cpu_devices}")
    fi
  fi
  if ((num_processes > 1)); then
    vars+=("JAX_COORDINATOR_ADDRESS=localhost:${port}"
           "JAX_NUM_PROCESSES=${num_processes}"
           "JAX_PROCESS_ID=${index}")
    if ((!cpu)); then
      vars+=("JAX_LOCAL_DEVICE_IDS=${index}")
    fi
  fi
  CMD=(env "${vars[@]}" "${PYTHON}" -m fixclip_jax.main "$@")
}

# Stops every process still running: SIGTERM first (fixclip_jax.main saves a
# checkpoint and exits between steps), SIGKILL after a grace period for those
# blocked in a collective that waits for a peer which is gone.
stop_processes() {
  local pid waited
  signal_groups TERM
  for ((waited = 0; waited < STOP_GRACE_S; waited++)); do
    for pid in "${PIDS[@]}"; do
      if kill -0 "${pid}" 2>/dev/null; then
        sleep 1
        continue 2
      fi
    done
    break
  done
  signal_groups KILL
  wait || true
}

# Each process runs in its own process group (set -m below), so a signal
# reaches whatever it started too (data loader workers, shells).
signal_groups() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "-$1" -- "-${pid}" 2>/dev/null || true
  done
}

# Starts every process and polls them (portable: no `wait -n PID...`); the
# first failure stops the others, which would otherwise wait for it until
# their distributed timeout.
run_processes() {
  local i pid
  set -m  # job control: one process group per background job
  for ((i = 0; i < num_processes; i++)); do
    process_cmd "${i}" "$@"
    # Output of process i is prefixed with [i] so interleaved logs stay readable.
    "${CMD[@]}" > >(sed -u "s/^/[${i}] /") 2>&1 &
    PIDS+=("$!")
  done
  set +m
  trap 'stop_processes; exit 130' INT TERM
  local -a alive=("${PIDS[@]}") still
  while ((${#alive[@]} > 0)); do
    still=()
    for pid in "${alive[@]}"; do
      if kill -0 "${pid}" 2>/dev/null; then
        still+=("${pid}")
      elif ! wait "${pid}"; then
        echo "local.sh: process ${pid} failed; stopping the others" >&2
        stop_processes
        return 1
      fi
    done
    alive=("${still[@]}")
    if ((${#alive[@]} > 0)); then
      sleep 1
    fi
  done
  wait || true  # the output prefixers
}

main() {
  local -a positional=()
  while (($#)) && ((${#positional[@]} < 2)); do
    case "$1" in
      --dry-run) dry_run=1 ;;
      --num_processes=*) num_processes="${1#*=}" ;;
      --cpu) cpu=1 ;;
      --cpu_devices=*) cpu_devices="${1#*=}" ;;
      --port=*) port="${1#*=}" ;;
      -h|--help) usage 0 ;;
      --*) die "unknown option $1 (options go before CONFIG WORKDIR; see --help)" ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  ((${#positional[@]} == 2)) || die "need CONFIG and WORKDIR (see --help)"
  is_positive_int "${num_processes}" || die "--num_processes=${num_processes}: not a positive integer"
  is_positive_int "${port}" || die "--port=${port}: not a positive integer"
  [[ "${cpu_devices}" =~ ^[0-9]+$ ]] || die "--cpu_devices=${cpu_devices}: not an integer"
  if ((cpu_devices > 0 && !cpu)); then
    die "--cpu_devices needs --cpu"
  fi
  local config="${positional[0]}" workdir="${positional[1]}"
  [[ -f "${config%%:*}" ]] || ((dry_run)) || die "config file ${config} not found"
  local -a main_args=("--config=${config}" "--workdir=${workdir}" "$@")

  if ((dry_run)); then
    local i
    for ((i = 0; i < num_processes; i++)); do
      process_cmd "${i}" "${main_args[@]}"
      print_cmd "${CMD[@]}"
    done
    return 0
  fi
  if ((num_processes == 1)); then
    process_cmd 0 "${main_args[@]}"
    exec "${CMD[@]}"
  fi
  run_processes "${main_args[@]}"
}

main "$@"
