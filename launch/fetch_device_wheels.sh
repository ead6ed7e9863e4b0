#!/usr/bin/env bash
# Downloads the wheels that the accelerator machine lacks (python 3.12,
# x86_64, no network there) into a git-ignored folder, so that the folder
# travels with the checkout and the accelerator check runs in one call.
#
#   launch/fetch_device_wheels.sh [--dest=DIR] [--python_version=3.12] [--dry-run]
#
# Options:
#   --dest=DIR              where the wheels go (default device_wheels/,
#                           git-ignored; emptied of old wheels first)
#   --python_version=X.Y    the target interpreter (default 3.12)
#   --dry-run               print the pip command instead of running it
#
# The packages are the dependencies of fixclip_jax that the machine's image
# does not hold (grain, ml-collections, array-record, portpicker,
# open-clip-torch, ftfy, wcwidth, tensorboardx), at the versions of
# constraints.txt; everything they need in turn is in the image already.
# Compiled ones come as manylinux x86_64 wheels, pure-Python ones as
# py3-none-any wheels. The total must stay under the device tool's 64 MiB
# carry limit (checkout included); the script prints the sizes.
#
# On the accelerator machine (BENCHMARKS.md "Accelerator check"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --target /tmp/site device_wheels/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail

readonly PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly PACKAGES=(grain ml-collections array-record portpicker open-clip-torch
                   ftfy wcwidth tensorboardx)
readonly PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64
                    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

dest="$ROOT/device_wheels"
python_version=3.12
dry_run=0

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}

die() {
  echo "fetch_device_wheels.sh: error: $*" >&2
  exit 2
}

for arg in "$@"; do
  case "$arg" in
    --dest=*) dest="${arg#--dest=}" ;;
    --python_version=*) python_version="${arg#--python_version=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || die "--python_version=$python_version: use X.Y"

# NAME==VERSION of each package, read from constraints.txt (names compared
# case-insensitively, '-' and '_' alike, as pip does).
requirements=()
for name in "${PACKAGES[@]}"; do
  pattern="^${name//-/[-_]}=="
  line="$(grep -iE "$pattern" "$ROOT/constraints.txt" || true)"
  [[ -n "$line" ]] || die "constraints.txt pins no version of $name"
  requirements+=("$line")
done

cmd=("$PYTHON" -m pip download --quiet --no-deps --only-binary=:all:
     --python-version "$python_version" --implementation cp --dest "$dest")
for platform in "${PLATFORMS[@]}"; do
  cmd+=(--platform "$platform")
done
cmd+=("${requirements[@]}")

if (( dry_run )); then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

mkdir -p "$dest"
rm -f "$dest"/*.whl
"${cmd[@]}"
du -b "$dest"/*.whl | awk '{ printf "%10.2f MiB  %s\n", $1 / 1048576, $2; total += $1 }
  END { printf "%10.2f MiB  total (carry limit 64 MiB, checkout included)\n", total / 1048576 }'
