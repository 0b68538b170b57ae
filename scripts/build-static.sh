#!/bin/sh
# scripts/build-static.sh: builds anvil-vmm as a static-pie binary (glibc linked in) at
# $CARGO_TARGET_DIR/static/anvil-vmm (target/static/anvil-vmm by default) and prints its
# absolute path. A static VMM needs no dynamic loader at start-up and maps only the libc
# code it uses: its resident memory is about 1 MiB lower than the dynamically linked build's
# (docs/benchmarks.md). Stable cargo cannot give crt-static to one binary of a workspace whose
# proc-macros must stay dynamic, hence `cargo rustc` on the binary alone.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$repo/$target ;; esac
cargo rustc --release --bin anvil-vmm -- -C target-feature=+crt-static
mkdir -p "$target/static"
cp "$target/release/anvil-vmm" "$target/static/anvil-vmm.tmp"
mv "$target/static/anvil-vmm.tmp" "$target/static/anvil-vmm"
# Leave the regular (dynamic) build in target/release for the tests.
cargo build --release --bin anvil-vmm
echo "$target/static/anvil-vmm"
