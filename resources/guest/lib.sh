# Shell helpers shared by resources/guest/build-*.sh and resources/l1/build-l1.sh (sourced, not run).
# POSIX sh; the caller has `set -eu`.
# shellcheck shell=sh
# shellcheck disable=SC2034 # the package lists are used by the scripts that source this file

# Debian packages the kernel build needs (Debian 12): the source tarball and xz to unpack it, gcc/make/binutils
# (build-essential), flex and bison (kconfig parsers), bc (kernel/timeconst.h), libelf-dev (objtool, which
# x86_64 always builds). No libssl-dev: with modules off, neither scripts/sign-file nor certs/extract-cert
# is built (checked: no host program of the guest or L1 build links libcrypto).
ANVIL_KERNEL_PACKAGES="linux-source-6.1 xz-utils build-essential flex bison bc libelf-dev"
# Debian packages the busybox image builds need.
ANVIL_ROOTFS_PACKAGES="busybox-static cpio gzip e2fsprogs"
ANVIL_KERNEL_TARBALL=/usr/src/linux-source-6.1.tar.xz

anvil_log() {
  echo "${0##*/}: $*" >&2
}

anvil_die() {
  anvil_log "error: $*"
  exit 1
}

# anvil_ensure_packages PKG...: installs the named Debian packages that are not installed yet.
anvil_ensure_packages() {
  missing=
  for pkg in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case $status in
      *" installed") ;;
      *) missing="$missing $pkg" ;;
    esac
  done
  [ -n "$missing" ] || return 0
  [ "$(id -u)" = 0 ] || anvil_die "missing Debian packages:$missing (run as root, or apt-get install them)"
  anvil_log "installing:$missing"
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >&2; then
    # A fresh machine may have no package lists yet.
    apt-get update >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >&2
  fi
}

# anvil_inputs_hash FILE...: one hash over the named files' contents (the inputs of a build step).
anvil_inputs_hash() {
  cat "$@" | sha256sum | cut -d' ' -f1
}

# anvil_package_version PKG: the installed version of a Debian package, or "none".
anvil_package_version() {
  dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none
}

# anvil_prepare_kernel WORKDIR FRAGMENT...: unpacks Debian's linux-source-6.1 into WORKDIR (once) and
# configures it as `make tinyconfig` plus the config fragments, in order. Prints the source tree's path.
anvil_prepare_kernel() {
  work=$1
  shift
  src=$work/linux-source-6.1
  if [ ! -f "$src/.anvil-unpacked" ]; then
    rm -rf "$src"
    mkdir -p "$work"
    anvil_log "unpacking $ANVIL_KERNEL_TARBALL into $work"
    tar -C "$work" -xf "$ANVIL_KERNEL_TARBALL"
    touch "$src/.anvil-unpacked"
  fi
  (
    cd "$src" || exit 1
    make tinyconfig >/dev/null
    scripts/kconfig/merge_config.sh -m .config "$@" >/dev/null
    make olddefconfig >/dev/null
    # merge_config.sh only warns when an option does not survive; a silently missing option would give a
    # kernel that boots but lacks a device, so check every requested =y here.
    for fragment in "$@"; do
      sed -n 's/^\(CONFIG_[A-Z0-9_]*\)=y$/\1/p' "$fragment" | while read -r opt; do
        grep -qx "$opt=y" .config || anvil_die "$opt=y from $fragment is not in the resulting config"
      done
    done
  ) >&2
  echo "$src"
}

# anvil_artifact_dir NAME VAR FILES BUILD: prints the first directory holding every file in FILES
# (space-separated): the directory named by the environment variable VAR, then ../shared/NAME
# beside the repository, then the build cache $ANVIL_CACHE_DIR/NAME (default
# <repo>/target/anvil-cache/NAME), which the command BUILD (given the cache directory) brings up
# to date first, one caller at a time. Only the path goes to stdout. Needs $repo.
anvil_artifact_dir() {
  _name=$1 _var=$2 _files=$3 _build=$4
  _has_all() {
    for _f in $_files; do
      [ -f "$1/$_f" ] || return 1
    done
  }
  _override=$(printenv "$_var" || true)
  if [ -n "$_override" ]; then
    if _has_all "$_override"; then
      (cd "$_override" && pwd)
      return 0
    fi
    anvil_log "$_var=$_override lacks one of: $_files; looking elsewhere"
  fi
  # shellcheck disable=SC2154 # $repo is set by the script that sources this file
  if _has_all "$repo/../shared/$_name"; then
    (cd "$repo/../shared/$_name" && pwd)
    return 0
  fi
  _cache=${ANVIL_CACHE_DIR:-$repo/target/anvil-cache}/$_name
  mkdir -p "$_cache"
  # Parallel callers: one build at a time; the others wait and then find it up to date.
  exec 9>"$_cache/.lock"
  if ! flock -n 9; then
    anvil_log "waiting for another build in $_cache"
    flock 9
  fi
  "$_build" "$_cache"
  _has_all "$_cache" || anvil_die "$_cache is incomplete after the build"
  echo "$_cache"
}
