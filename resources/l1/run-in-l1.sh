#!/bin/sh
# run-in-l1.sh [--cpus N] [--mem MIB] [--timeout S] [--interactive] -- COMMAND [ARG...]
# Runs COMMAND inside the L1 machine: a QEMU TCG virtual machine whose CPU (-cpu max) has AMD SVM, so its
# /dev/kvm is hardware-style KVM (emulated), unlike this host's PVM /dev/kvm that emulates guest ring 0.
# L1 sees this host's whole file system (9p, read-write, as root) with its own /dev, /proc and /sys, and
# starts COMMAND in the current directory. Exit status: COMMAND's; 124 on timeout; 125 if L1 failed.
# By default COMMAND's input is empty and L1's console (COMMAND's output) is printed when L1 has stopped.
# --interactive connects L1's console to this terminal instead (raw mode, live, input included; no
# timeout unless --timeout is given): for a shell in a guest that runs inside L1.
# Needs qemu-system-x86 (Debian; installed when missing and run as root) and the L1 kernel and initramfs,
# found by scripts/l1-artifacts.sh: $ANVIL_L1_DIR, else ../shared/l1 beside the repository, else the build
# cache ($ANVIL_CACHE_DIR/l1, default <repo>/target/anvil-cache/l1), built there with build-l1.sh if need be.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
usage="usage: run-in-l1.sh [--cpus N] [--mem MIB] [--timeout S] [--interactive] -- COMMAND [ARG...]"
cpus=2 mem=2048 timeout='' interactive=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpus | --mem | --timeout) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; } ;;
  esac
  case $1 in
    --cpus) cpus=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --interactive) interactive=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
if [ -z "$timeout" ]; then
  # A duration of 0 disables timeout(1): an interactive session lasts as long as its user wants.
  if [ "$interactive" = 1 ]; then timeout=0; else timeout=600; fi
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
  # shellcheck source=resources/guest/lib.sh
  (. "$repo/resources/guest/lib.sh" && anvil_ensure_packages qemu-system-x86) || exit 125
fi
l1dir=$("$repo/scripts/l1-artifacts.sh") || { echo "run-in-l1.sh: no L1 kernel and initramfs" >&2; exit 125; }
script=$(mktemp /tmp/l1-cmd.XXXXXX)
log=$(mktemp /tmp/l1-log.XXXXXX)
qerr=$(mktemp /tmp/l1-qemu.XXXXXX)
trap 'rm -f "$script" "$log" "$qerr"' EXIT
{
  for v in $(env | sed -n 's/^\(ANVIL_[A-Z0-9_]*\|RUST_[A-Z0-9_]*\|CARGO_[A-Z0-9_]*\|HOME\|PATH\)=.*/\1/p'); do
    printf "export %s='%s'\n" "$v" "$(printenv "$v" | sed "s/'/'\\\\''/g")"
  done
  printf 'exec'
  for a in "$@"; do printf " '%s'" "$(printf '%s' "$a" | sed "s/'/'\\\\''/g")"; done
  printf '\n'
} > "$script"
# Under TCG the guest's TSC is the host's TSC, but L1's kernel calibrates it against the emulated PIT, and on
# a loaded host that calibration fails about half the time ("tsc: Unable to calibrate against PIT"), after
# which L1 hangs in early boot with no clock. Tell it the host's TSC frequency instead.
tsc_mhz=$( (dmesg 2>/dev/null || true) | sed -n 's/.*tsc: \(Detected\|Refined TSC clocksource calibration:\) \([0-9.]*\) MHz.*/\2/p' | tail -1)
[ -n "$tsc_mhz" ] || tsc_mhz=$(sed -n 's/^cpu MHz[[:space:]]*: \([0-9.]*\)$/\1/p' /proc/cpuinfo | head -1)
tsc_param=
[ -z "$tsc_mhz" ] || tsc_param="tsc_early_khz=$(echo "$tsc_mhz" | awk '{ printf "%d", $1 * 1000 }')"
# multidevs=remap: the exported / spans several host file systems whose inode numbers collide over 9p
# without it; with cache=loose, L1 then merged /proc and /sys into one directory (/proc showed sysfs).
set -- -M microvm,x-option-roms=off,rtc=on -accel tcg,thread=multi -cpu max \
  -m "$mem" -smp "$cpus" -nodefaults -no-user-config -nographic -no-reboot \
  -kernel "$l1dir/vmlinux-kvmhost" -initrd "$l1dir/l1-initramfs.cpio.gz" \
  -fsdev local,id=hostfs,path=/,security_model=none,multidevs=remap -device virtio-9p-device,fsdev=hostfs,mount_tag=hostroot \
  -append "console=ttyS0 reboot=k panic=-1 quiet random.trust_cpu=1 $tsc_param ${ANVIL_L1_APPEND:-} l1script=$script l1cwd=$(pwd)"
qemu=${ANVIL_L1_QEMU:-qemu-system-x86_64}
rc=0
if [ "$interactive" = 1 ]; then
  # The console on this terminal (QEMU sets raw mode and restores it; signal=off: Ctrl-C goes to L1), and a
  # copy in the log for the L1-EXIT line. --foreground: QEMU may read the terminal.
  timeout --foreground "$timeout" "$qemu" "$@" \
    -chardev "stdio,id=console,signal=off,logfile=$log" -serial chardev:console || rc=$?
else
  timeout "$timeout" "$qemu" "$@" -serial "file:$log" </dev/null >"$qerr" 2>&1 || rc=$?
  grep -v -a '^L1-EXIT=' "$log" | tr -d '\r'
fi
[ "$rc" = 124 ] && exit 124
code=$(sed -n 's/^L1-EXIT=\([0-9]*\).*/\1/p' "$log" | tail -1)
if [ -z "$code" ]; then
  # L1 stopped without reporting COMMAND's status: it crashed, reset or QEMU failed. Say what is known.
  echo "run-in-l1.sh: L1 stopped without an exit status (QEMU exit status $rc)" >&2
  [ ! -s "$qerr" ] || { echo "run-in-l1.sh: QEMU said:" >&2; tail -n 40 "$qerr" >&2; }
  exit 125
fi
exit "$code"
