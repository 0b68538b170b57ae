#!/bin/sh
# build-initramfs.sh OUTDIR
# Builds OUTDIR/initramfs.cpio.gz (Debian's busybox-static with `init` beside this script as /init) and
# OUTDIR/rootfs.ext4 (the same tree as a 64 MiB ext4 image, labelled anvil-root, `init` as /sbin/init).
# Installs the Debian packages it needs when run as root. Idempotent: does nothing when OUTDIR already
# holds images built from the same inputs (init, these scripts, busybox version); ANVIL_FORCE=1 rebuilds.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=resources/guest/lib.sh
. "$here/lib.sh"

[ $# -eq 1 ] || { echo "usage: build-initramfs.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)

stamp=$out/.initramfs.inputs
inputs() {
  echo "$(anvil_inputs_hash "$here/init" "$here/build-initramfs.sh" "$here/lib.sh") $(anvil_package_version busybox-static)"
}
if [ "${ANVIL_FORCE:-0}" != 1 ] && [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/rootfs.ext4" ] &&
  [ "$(cat "$stamp" 2>/dev/null)" = "$(inputs)" ]; then
  anvil_log "$out/initramfs.cpio.gz and rootfs.ext4 are up to date"
  exit 0
fi
# shellcheck disable=SC2086 # word splitting of the package list is intended
anvil_ensure_packages $ANVIL_ROOTFS_PACKAGES


root=$(mktemp -d "${TMPDIR:-/tmp}/anvil-rootfs.XXXXXX")
trap 'rm -rf "$root" "$out/initramfs.cpio.gz.tmp" "$out/rootfs.ext4.tmp"' EXIT
for dir in bin sbin usr/bin usr/sbin proc sys dev tmp run etc root mnt; do
  mkdir -p "$root/$dir"
done
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
cp "$here/init" "$root/init"
chmod 755 "$root/init"
# The rootfs boots /sbin/init: point it at our init instead of busybox's.
cp "$here/init" "$root/sbin/init.anvil"
chmod 755 "$root/sbin/init.anvil"
rm -f "$root/sbin/init"
ln -s /sbin/init.anvil "$root/sbin/init"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

rm -f "$stamp"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 | gzip -9) \
  >"$out/initramfs.cpio.gz.tmp"
# -E root_owner: files owned by root whoever runs this; -d: populate from the tree (e2fsprogs >= 1.43).
mkfs.ext4 -q -F -L anvil-root -E root_owner=0:0 -d "$root" "$out/rootfs.ext4.tmp" 64M >&2
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
mv "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
inputs >"$stamp"
anvil_log "built $out/initramfs.cpio.gz and $out/rootfs.ext4"
