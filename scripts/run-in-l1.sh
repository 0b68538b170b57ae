#!/bin/sh
# run-in-l1.sh [--cpus N] [--mem MIB] [--timeout S] [--interactive] -- COMMAND [ARG...]
# Runs COMMAND inside the L1 machine (a QEMU TCG VM with hardware-style KVM): see resources/l1/README.md.
set -eu
exec "$(dirname "$0")/../resources/l1/run-in-l1.sh" "$@"
