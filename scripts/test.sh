#!/bin/sh
# scripts/test.sh: the whole test suite (the README's test command; .ci/run calls it).
#   1. builds the workspace (anvil-vmm and the test guest) in release mode, and the static
#      anvil-vmm that ships (scripts/build-static.sh), which the end-to-end tests run;
#   2. runs every cargo test on this host: unit tests, the test-guest lane and the CLI error tests,
#      and the Linux lane when this host's KVM can run Linux;
#   3. when it cannot (PVM, which emulates guest kernel code), runs the Linux lane inside the L1
#      machine (resources/l1), a QEMU guest with hardware-style KVM.
# Tests skip only where /dev/kvm is missing, and say so.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

log() { echo "test.sh: $*" >&2; }

# What the tests use besides cargo, installed when missing (as root on Debian).
need=
command -v cc >/dev/null 2>&1 || need="$need build-essential"                     # links the test guest
command -v setpriv >/dev/null 2>&1 || need="$need util-linux"                    # unprivileged-user tests
command -v ip >/dev/null 2>&1 || need="$need iproute2"                           # taps, network namespaces
command -v python3 >/dev/null 2>&1 || need="$need python3"                       # the Linux lane's HTTP peer
command -v qemu-system-x86_64 >/dev/null 2>&1 || need="$need qemu-system-x86"   # the L1 machine
command -v docker-registry >/dev/null 2>&1 || need="$need docker-registry"       # OCI tests: a local registry
[ -x /bin/busybox ] || need="$need busybox-static"                               # OCI tests: the image's userland
command -v debugfs >/dev/null 2>&1 || need="$need e2fsprogs"                     # OCI root disks (mkfs.ext4 -d)
command -v cpio >/dev/null 2>&1 || need="$need cpio"                             # the agent initramfs
if [ -n "$need" ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing:$need (install them, or run as root)"
    exit 1
  fi
  log "installing:$need"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y --no-install-recommends $need >&2 ||
    { apt-get update >&2 && apt-get install -y --no-install-recommends $need >&2; }
fi

log "building (release)"
cargo build --release --workspace
# The binary that ships is the static one (no dynamic loader, only the libc code it uses:
# docs/benchmarks.md); every end-to-end test below runs it.
ANVIL_TEST_VMM=$("$repo/scripts/build-static.sh" | tail -n 1)
export ANVIL_TEST_VMM
log "end-to-end tests run $ANVIL_TEST_VMM"
# The guest agent of `anvil-vmm run` (static), packed into its initramfs once for both lanes.
agent_dir=${ANVIL_CACHE_DIR:-$repo/target/anvil-cache}/agent
"$repo/resources/agent/build-initramfs.sh" "$agent_dir"
export ANVIL_RUN_AGENT="$agent_dir/agent-initramfs.cpio.gz"

log "host lane: unit, test guest, CLI errors (and Linux where KVM runs it)"
cargo test --release --workspace

if [ ! -e /dev/kvm ]; then
  log "SKIPPED the Linux lane: /dev/kvm is missing on this host"
  exit 0
fi
if [ ! -d /sys/module/kvm_pvm ]; then
  log "the Linux lane ran above on this host's KVM"
  exit 0
fi

log "this host's KVM (kvm_pvm) cannot run Linux: running the Linux lane inside the L1 machine"
guest_dir=$("$repo/scripts/guest-artifacts.sh")
# The Linux-lane test binaries (each test file whose name starts with linux_), run one after
# the other in a single L1 boot.
# A binary that fails is run again, loudly, up to $attempts times in all: guests inside L1 (a
# TCG-emulated CPU with emulated SVM) crash now and then on their own (docs/testing.md, "The
# Linux lane"); a repeatable failure fails every attempt, and the retried binaries are listed at
# the end.
attempts=3
lane="attempt() { n=1; while ! \"\$2\" --test-threads=1; do [ \$n -lt $attempts ] || return 1; n=\$((n+1)); echo \"test.sh: RETRYING \$1: it FAILED inside L1 (output above); attempt \$n of $attempts\" >&2; done; };"
for file in "$repo"/tests/linux_*.rs; do
  test=$(basename "$file" .rs)
  bin=$(cargo test --release --test "$test" --no-run --message-format=json 2>/dev/null |
    grep -o "\"executable\":\"[^\"]*/$test-[^\"]*\"" | sed 's/^"executable":"//; s/"$//' | tail -n 1)
  [ -x "$bin" ] || { log "cannot find the $test test binary"; exit 1; }
  lane="$lane attempt $test \"$bin\" &&"
done
# ANVIL_REQUIRE_LINUX makes the Linux-lane tests fail instead of skipping if L1 cannot run them.
lane_log=$(mktemp /tmp/anvil-lane.XXXXXX)
trap 'rm -f "$lane_log"' EXIT
run_lane() {
  # L1's console is printed once L1 stops; a copy is kept to list the retried binaries.
  lane_rc=0
  ANVIL_GUEST_DIR=$guest_dir ANVIL_REQUIRE_LINUX=1 \
    "$repo/resources/l1/run-in-l1.sh" --cpus 2 --mem 2048 --timeout 1500 -- sh -c "$lane true" \
    >"$lane_log" 2>&1 || lane_rc=$?
  cat "$lane_log"
  retried=$(sed -n 's/^test\.sh: RETRYING \([^:]*\):.*/\1/p' "$lane_log" | sort | uniq -c | awk '{ printf "%s (%d retries) ", $2, $1 }')
  [ -z "$retried" ] || log "Linux-lane binaries that failed inside L1 and were run again: $retried"
  return "$lane_rc"
}
rc=0
run_lane || rc=$?
if [ "$rc" = 125 ]; then
  # Status 125: the L1 machine itself stopped (QEMU failed, or L1's kernel reset) before the lane
  # could report a status; run-in-l1.sh printed what QEMU said. That is the emulator, not a test
  # result: run the whole lane once more, and fail if it does not pass then.
  log "THE L1 MACHINE STOPPED WITHOUT THE LANE'S STATUS (see above): running the Linux lane again"
  rc=0
  run_lane || rc=$?
fi
if [ "$rc" != 0 ]; then
  log "Linux lane FAILED inside L1 (status $rc)"
  exit "$rc"
fi
log "Linux lane passed inside L1"
