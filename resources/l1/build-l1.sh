#!/bin/sh
# build-l1.sh OUTDIR
# Builds the L1 machine's artifacts from Debian packages: OUTDIR/vmlinux-kvmhost (Debian's linux-source-6.1,
# `make tinyconfig` + ../guest/anvil-guest.config + kvmhost.config: the guest kernel's options plus KVM with
# AMD SVM, 9p, seccomp, userfaultfd, io_uring, tun, bridge, namespaces), OUTDIR/vmlinux-kvmhost.config, and
# OUTDIR/l1-initramfs.cpio.gz (busybox-static + l1-init as /init). Installs the Debian packages it needs
# when run as root. Idempotent: each part is rebuilt only when its inputs (config fragments, l1-init, these
# scripts, the busybox-static version) changed; ANVIL_FORCE=1 rebuilds.
# Environment: ANVIL_KERNEL_WORK=DIR keeps the built source tree there; ANVIL_JOBS=N parallel jobs.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
guest=$(cd "$here/../guest" && pwd)
# shellcheck source=resources/guest/lib.sh
. "$guest/lib.sh"

[ $# -eq 1 ] || { echo "usage: build-l1.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
work_tmp='' root=''
cleanup() {
  [ -z "$work_tmp" ] || rm -rf "$work_tmp"
  [ -z "$root" ] || rm -rf "$root"
  rm -f "$out/vmlinux-kvmhost.tmp" "$out/vmlinux-kvmhost.config.tmp" "$out/l1-initramfs.cpio.gz.tmp"
}
trap cleanup EXIT

kernel_stamp=$out/.vmlinux-kvmhost.inputs
kernel_inputs=$(anvil_inputs_hash "$guest/anvil-guest.config" "$here/kvmhost.config" "$here/build-l1.sh" "$guest/lib.sh")
if [ "${ANVIL_FORCE:-0}" != 1 ] && [ -f "$out/vmlinux-kvmhost" ] &&
  [ "$(cat "$kernel_stamp" 2>/dev/null)" = "$kernel_inputs" ]; then
  anvil_log "$out/vmlinux-kvmhost is up to date"
else
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  anvil_ensure_packages $ANVIL_KERNEL_PACKAGES
  if [ -n "${ANVIL_KERNEL_WORK:-}" ]; then
    work=$ANVIL_KERNEL_WORK
  else
    work_tmp=$(mktemp -d "${TMPDIR:-/tmp}/anvil-l1-kernel.XXXXXX")
    work=$work_tmp
  fi
  src=$(anvil_prepare_kernel "$work" "$guest/anvil-guest.config" "$here/kvmhost.config")
  started=$(date +%s)
  anvil_log "building vmlinux in $src"
  make -C "$src" -j"${ANVIL_JOBS:-$(nproc)}" vmlinux >&2
  anvil_log "kernel built in $(($(date +%s) - started)) s"
  rm -f "$kernel_stamp"
  cp "$src/.config" "$out/vmlinux-kvmhost.config.tmp"
  strip -o "$out/vmlinux-kvmhost.tmp" "$src/vmlinux"
  mv "$out/vmlinux-kvmhost.config.tmp" "$out/vmlinux-kvmhost.config"
  mv "$out/vmlinux-kvmhost.tmp" "$out/vmlinux-kvmhost"
  echo "$kernel_inputs" >"$kernel_stamp"
  anvil_log "built $out/vmlinux-kvmhost"
fi

initramfs_stamp=$out/.l1-initramfs.inputs
initramfs_inputs() {
  echo "$(anvil_inputs_hash "$here/l1-init" "$here/build-l1.sh" "$guest/lib.sh") $(anvil_package_version busybox-static)"
}
if [ "${ANVIL_FORCE:-0}" != 1 ] && [ -f "$out/l1-initramfs.cpio.gz" ] &&
  [ "$(cat "$initramfs_stamp" 2>/dev/null)" = "$(initramfs_inputs)" ]; then
  anvil_log "$out/l1-initramfs.cpio.gz is up to date"
  exit 0
fi
# shellcheck disable=SC2086 # word splitting of the package list is intended
anvil_ensure_packages $ANVIL_ROOTFS_PACKAGES
root=$(mktemp -d "${TMPDIR:-/tmp}/anvil-l1-root.XXXXXX")
for dir in bin sbin usr/bin usr/sbin proc sys dev host; do
  mkdir -p "$root/$dir"
done
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
cp "$here/l1-init" "$root/init"
chmod 755 "$root/init"
rm -f "$initramfs_stamp"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 | gzip -9) \
  >"$out/l1-initramfs.cpio.gz.tmp"
mv "$out/l1-initramfs.cpio.gz.tmp" "$out/l1-initramfs.cpio.gz"
initramfs_inputs >"$initramfs_stamp"
anvil_log "built $out/l1-initramfs.cpio.gz"
