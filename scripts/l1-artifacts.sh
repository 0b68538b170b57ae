#!/bin/sh
# l1-artifacts.sh
# Prints the directory holding the L1 machine's kernel and initramfs (vmlinux-kvmhost, l1-initramfs.cpio.gz),
# the first complete one of:
#   1. $ANVIL_L1_DIR
#   2. ../shared/l1 relative to the repository root
#   3. the project build cache, $ANVIL_CACHE_DIR/l1 (default <repo>/target/anvil-cache/l1), which is brought
#      up to date with resources/l1/build-l1.sh (a kernel build takes 5-15 minutes the first time).
# Only the path goes to stdout; messages and build output go to stderr. Exit status 1 if the build fails.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
files="vmlinux-kvmhost l1-initramfs.cpio.gz"

has_all() {
  for f in $files; do
    [ -f "$1/$f" ] || return 1
  done
}

if [ -n "${ANVIL_L1_DIR:-}" ]; then
  if has_all "$ANVIL_L1_DIR"; then
    (cd "$ANVIL_L1_DIR" && pwd)
    exit 0
  fi
  echo "l1-artifacts.sh: ANVIL_L1_DIR=$ANVIL_L1_DIR lacks one of: $files; looking elsewhere" >&2
fi
if has_all "$repo/../shared/l1"; then
  (cd "$repo/../shared/l1" && pwd)
  exit 0
fi

cache=${ANVIL_CACHE_DIR:-$repo/target/anvil-cache}/l1
mkdir -p "$cache"
# Parallel callers: one build at a time; the others wait and then find it up to date.
exec 9>"$cache/.lock"
if ! flock -n 9; then
  echo "l1-artifacts.sh: waiting for another build in $cache" >&2
  flock 9
fi
"$repo/resources/l1/build-l1.sh" "$cache" >&2
has_all "$cache" || { echo "l1-artifacts.sh: $cache is incomplete after the build" >&2; exit 1; }
echo "$cache"
