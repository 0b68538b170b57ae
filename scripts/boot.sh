#!/bin/sh
# scripts/boot.sh: set up this machine and boot the default guest (the README's first command).
#   - installs the Debian packages the build needs (as root) and builds anvil-vmm and the test guest;
#   - finds or builds the Linux guest (scripts/guest-artifacts.sh: kernel + busybox initramfs);
#   - on a host whose KVM runs Linux: boots it with 2 vCPUs and 256 MiB to a shell on this terminal
#     (leave the shell with `reboot`, which ends anvil-vmm with status 0);
#   - on a host whose KVM is PVM (kvm_pvm emulates guest kernel code, so Linux cannot boot there): says so,
#     boots the test guest natively to show the same boot path, then boots Linux inside the L1 machine.
# Without a terminal on stdin the Linux guest runs a short command instead of a shell, then reboots.
# Extra arguments are passed to `anvil-vmm boot` (e.g. --cpus 4 --memory 1G).
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { echo "boot.sh: $*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again"
  exit 1
fi
if [ "$(id -u)" = 0 ] && ! command -v cc >/dev/null 2>&1; then
  log "installing build-essential"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential >&2; }
fi
log "building anvil-vmm and the test guest"
cargo build --release --workspace >&2
# The binary that ships: static, glibc linked in (scripts/build-static.sh, docs/benchmarks.md).
vmm=$("$repo/scripts/build-static.sh" | tail -n 1)

if [ ! -e /dev/kvm ]; then
  log "/dev/kvm is missing: this machine cannot run KVM guests"
  exit 1
fi

guest_dir=$("$repo/scripts/guest-artifacts.sh")
if [ -t 0 ]; then
  cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet"
else
  # shellcheck disable=SC2016 # $(nproc) is for the guest's shell
  cmdline='console=ttyS0 reboot=k panic=-1 pci=off quiet anvil_cmd="uname -a; echo vcpus: $(nproc); head -1 /proc/meminfo"'
fi
set -- --kernel "$guest_dir/vmlinux" --initrd "$guest_dir/initramfs.cpio.gz" --cpus 2 --memory 256M \
  --cmdline "$cmdline" "$@"

if [ ! -d /sys/module/kvm_pvm ]; then
  log "booting Linux ($guest_dir) under anvil-vmm"
  exec "$vmm" boot "$@"
fi

log "this host's KVM is PVM (kvm_pvm): it emulates guest kernel code, so Linux cannot boot on it here."
log "1/2: the anvil test guest on this host's KVM, through the same boot path"
"$vmm" boot --kernel "$repo/target/release/anvil-testguest" --cmdline "tg.run=hello" --cpus 2
log "2/2: Linux under anvil-vmm inside the L1 machine (a QEMU guest with hardware-style KVM)"
if [ -t 0 ]; then
  exec "$repo/resources/l1/run-in-l1.sh" --interactive -- "$vmm" boot "$@"
fi
exec "$repo/resources/l1/run-in-l1.sh" -- "$vmm" boot "$@"
