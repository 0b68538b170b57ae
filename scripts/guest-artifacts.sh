#!/bin/sh
# guest-artifacts.sh
# Prints the directory holding the Linux guest artifacts (vmlinux, bzImage, initramfs.cpio.gz, rootfs.ext4),
# the first complete one of:
#   1. $ANVIL_GUEST_DIR
#   2. ../shared/guest relative to the repository root
#   3. the project build cache, $ANVIL_CACHE_DIR/guest (default <repo>/target/anvil-cache/guest), which is
#      brought up to date with resources/guest/build-*.sh (a kernel build takes 5-15 minutes the first time).
# Only the path goes to stdout; messages and build output go to stderr. Exit status 1 if the build fails.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
files="vmlinux bzImage initramfs.cpio.gz rootfs.ext4"

has_all() {
  for f in $files; do
    [ -f "$1/$f" ] || return 1
  done
}

if [ -n "${ANVIL_GUEST_DIR:-}" ]; then
  if has_all "$ANVIL_GUEST_DIR"; then
    (cd "$ANVIL_GUEST_DIR" && pwd)
    exit 0
  fi
  echo "guest-artifacts.sh: ANVIL_GUEST_DIR=$ANVIL_GUEST_DIR lacks one of: $files; looking elsewhere" >&2
fi
if has_all "$repo/../shared/guest"; then
  (cd "$repo/../shared/guest" && pwd)
  exit 0
fi

cache=${ANVIL_CACHE_DIR:-$repo/target/anvil-cache}/guest
mkdir -p "$cache"
# Tests run in parallel: one build at a time; the others wait and then find it up to date.
exec 9>"$cache/.lock"
if ! flock -n 9; then
  echo "guest-artifacts.sh: waiting for another build in $cache" >&2
  flock 9
fi
"$repo/resources/guest/build-kernel.sh" "$cache" >&2
"$repo/resources/guest/build-initramfs.sh" "$cache" >&2
has_all "$cache" || { echo "guest-artifacts.sh: $cache is incomplete after the build" >&2; exit 1; }
echo "$cache"
