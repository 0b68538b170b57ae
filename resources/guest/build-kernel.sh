#!/bin/sh
# build-kernel.sh OUTDIR
# Builds the anvil guest kernel from Debian's linux-source-6.1: `make tinyconfig` plus anvil-guest.config
# beside this script, everything built in. Writes OUTDIR/vmlinux (stripped ELF with the PVH entry note),
# OUTDIR/bzImage and OUTDIR/vmlinux.config. Installs the Debian packages it needs when run as root.
# Idempotent: does nothing when OUTDIR already holds the kernel built from the same inputs (the config
# fragment and these scripts; not the linux-source-6.1 point release); ANVIL_FORCE=1 rebuilds anyway.
# Environment: ANVIL_KERNEL_WORK=DIR keeps the unpacked, built source tree there (incremental rebuilds);
# by default a temporary directory is used and removed. ANVIL_JOBS=N (default: nproc) parallel jobs.
# Takes about 5-15 minutes on 2 cores; all build output goes to stderr.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=resources/guest/lib.sh
. "$here/lib.sh"

[ $# -eq 1 ] || { echo "usage: build-kernel.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
work_tmp=
cleanup() {
  [ -z "$work_tmp" ] || rm -rf "$work_tmp"
  rm -f "$out/vmlinux.tmp" "$out/bzImage.tmp" "$out/vmlinux.config.tmp"
}
trap cleanup EXIT

stamp=$out/.kernel.inputs
inputs=$(anvil_inputs_hash "$here/anvil-guest.config" "$here/build-kernel.sh" "$here/lib.sh")
if [ "${ANVIL_FORCE:-0}" != 1 ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ] && [ -f "$out/vmlinux.config" ] &&
  [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
  anvil_log "$out/vmlinux and bzImage are up to date"
  exit 0
fi
# shellcheck disable=SC2086 # word splitting of the package list is intended
anvil_ensure_packages $ANVIL_KERNEL_PACKAGES


if [ -n "${ANVIL_KERNEL_WORK:-}" ]; then
  work=$ANVIL_KERNEL_WORK
else
  work_tmp=$(mktemp -d "${TMPDIR:-/tmp}/anvil-kernel.XXXXXX")
  work=$work_tmp
fi

src=$(anvil_prepare_kernel "$work" "$here/anvil-guest.config")
started=$(date +%s)
anvil_log "building vmlinux and bzImage in $src"
make -C "$src" -j"${ANVIL_JOBS:-$(nproc)}" vmlinux bzImage >&2
anvil_log "kernel built in $(($(date +%s) - started)) s"

# Readelf must find the PVH entry note (Xen ELF note type 18) or anvil-vmm cannot use the PVH boot path.
readelf -n "$src/vmlinux" | grep -q 'Xen.*0x00000012' || anvil_die "vmlinux has no PVH entry note"

# Write to temporary names first so an interrupted run never leaves a half-written kernel that looks complete.
rm -f "$stamp"
cp "$src/.config" "$out/vmlinux.config.tmp"
strip -o "$out/vmlinux.tmp" "$src/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out/bzImage.tmp"
mv "$out/vmlinux.config.tmp" "$out/vmlinux.config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
mv "$out/bzImage.tmp" "$out/bzImage"
echo "$inputs" >"$stamp"
anvil_log "built $out/vmlinux, $out/bzImage and $out/vmlinux.config"
