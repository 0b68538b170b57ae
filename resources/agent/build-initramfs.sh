#!/bin/sh
# build-initramfs.sh OUTDIR
# Builds OUTDIR/agent-initramfs.cpio.gz: the guest agent of `anvil-vmm run` (resources/agent, a static
# Rust binary) as /init, and the directories it mounts on. `anvil-vmm run` appends the run's spec
# (/anvil/spec.json) as a second cpio archive. Needs cargo, cpio and gzip (Debian's cpio is installed
# when missing and run as root). Idempotent: rebuilds only when the agent's sources or this script change;
# ANVIL_FORCE=1 rebuilds anyway. The agent is built with cargo's target dir ($CARGO_TARGET_DIR, default
# <repo>/target) for the target x86_64-unknown-linux-gnu with a static C runtime.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=resources/guest/lib.sh
. "$repo/resources/guest/lib.sh"

[ $# -eq 1 ] || { echo "usage: build-initramfs.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
stamp=$out/.agent.inputs
inputs() {
  # shellcheck disable=SC2046 # one word per source file
  anvil_inputs_hash "$here/build-initramfs.sh" "$here/Cargo.toml" $(find "$here/src" -type f | LC_ALL=C sort) "$repo/Cargo.lock"
}
if [ "${ANVIL_FORCE:-0}" != 1 ] && [ -f "$out/agent-initramfs.cpio.gz" ] &&
  [ "$(cat "$stamp" 2>/dev/null)" = "$(inputs)" ]; then
  anvil_log "$out/agent-initramfs.cpio.gz is up to date"
  exit 0
fi
command -v cpio >/dev/null 2>&1 || anvil_ensure_packages cpio

target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet -p anvil-agent --target "$target") >&2
agent=$target_dir/$target/release/anvil-agent
# A static binary has no program interpreter.
if readelf -l "$agent" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  anvil_die "$agent is not static"
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/anvil-agent-root.XXXXXX")
trap 'rm -rf "$root" "$out/agent-initramfs.cpio.gz.tmp"' EXIT
for dir in dev proc sys mnt/lower mnt/rw mnt/root anvil; do
  mkdir -p "$root/$dir"
done
cp "$agent" "$root/init"
chmod 755 "$root/init"
rm -f "$stamp"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 | gzip -9) \
  >"$out/agent-initramfs.cpio.gz.tmp"
mv "$out/agent-initramfs.cpio.gz.tmp" "$out/agent-initramfs.cpio.gz"
inputs >"$stamp"
anvil_log "built $out/agent-initramfs.cpio.gz"
