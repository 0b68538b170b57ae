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
# shellcheck source=resources/guest/lib.sh
. "$repo/resources/guest/lib.sh"

build_guest() {
  "$repo/resources/guest/build-kernel.sh" "$1" >&2
  "$repo/resources/guest/build-initramfs.sh" "$1" >&2
}

anvil_artifact_dir guest ANVIL_GUEST_DIR "vmlinux bzImage initramfs.cpio.gz rootfs.ext4" build_guest
