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
# shellcheck source=resources/guest/lib.sh
. "$repo/resources/guest/lib.sh"

build_l1() {
  "$repo/resources/l1/build-l1.sh" "$1" >&2
}

anvil_artifact_dir l1 ANVIL_L1_DIR "vmlinux-kvmhost l1-initramfs.cpio.gz" build_l1
