#!/usr/bin/env python3
"""Records which functions of anvil-vmm run, for the linker's symbol ordering file.

    scripts/gen-symbol-order.py [--anvil target/static/anvil-vmm] [--rebuild scripts/build-static.sh]
                                [--out resources/link/anvil-vmm.order]

First it runs the binary under valgrind's callgrind (function level) through what a VMM process
does: the Firecracker-style API driving the test guest (machine-config, boot-source, a drive,
entropy, InstanceStart, pause, snapshot create, resume, metrics, Ctrl-Alt-Del), the
API boot of the shared Linux guest when `ANVIL_GUEST_DIR` (or ../shared/guest) has one, and
`anvil-vmm boot` of the test guest with virtio-blk and virtio-rng. Every function of the binary
that ran in any of them is written to the ordering file, which build.rs hands to the linker so
that hot code sits together (see build.rs). Code that valgrind cannot run (the seccomp filters:
valgrind has no seccomp(2)) and the C start-up code valgrind names `(below main)` are added by
name. Then, with --rebuild, it relinks and runs the real binary (seccomp on) under
`perf record -e page-faults -d` through the API scenarios: every instruction fetch that faults
outside the ordered functions names a function the recording missed; it is added and the loop
repeats (at most 8 times) until none is left. Snapshot loads are not recorded: under valgrind
the host's CPUID is valgrind's, which lacks features the guest was given, so the load is refused.

Re-run it after large changes and commit the file; stale entries only cost locality (`--check`
lists them: mostly names with a `.llvm.N` suffix, which ThinLTO derives from the code around). The
binary's symbol names do not depend on the ordering file (it is a link argument from build.rs),
so the file recorded from one build applies to the next.
"""

import argparse
import bisect
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "bench"))
import bench  # noqa: E402
from api_bench import Api  # noqa: E402

# Functions that run in every VMM but not under valgrind, matched on demangled names.
BY_NAME = [r"\bseccompiler::", r"\bvmm::seccomp::", r"^_start$", r"^__libc_start_main",
           r"^__libc_start_call_main$"]
# nm types of code: text, weak, and GNU indirect functions (the static libc's IFUNC resolvers).
CODE = "tTwWi"


def callgrind(out, cmd):
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--compress-strings=no", "--demangle=no"] + cmd


def wait_for_socket(path, proc):
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the VMM never created its API socket")
        time.sleep(0.05)
    while True:
        try:
            api = Api(path)
            api.ok("GET", "/")
            return api
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def page_faults(out, cmd):
    return ["perf", "record", "-q", "-c", "1", "-e", "page-faults", "-d", "-o", out, "--"] + cmd


def run_api(wrap, anvil, work, steps, extra=()):
    """Runs the VMM's API scenario `steps` with the VMM command wrapped by `wrap`."""
    sock = os.path.join(work, "api.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    metrics = os.path.join(work, "metrics.json")
    open(metrics, "w").close()
    proc = subprocess.Popen(wrap([anvil, "--api-sock", sock, "--metrics-path", metrics,
                                  "--log-level", "error", *extra]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        api = wait_for_socket(sock, proc)
        # Clients that open a connection per request (curl, the Go SDK).
        for _ in range(3):
            one = Api(sock)
            one.ok("GET", "/")
            one.close()
        steps(api)
        api.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def testguest_api(work, disk):
    def steps(api):
        api.ok("GET", "/version")
        api.request("PATCH", "/machine-config", {"vcpu_count": 0})
        api.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        api.ok("PUT", "/boot-source", {"kernel_image_path": bench.TESTGUEST,
                                       "boot_args": "console=ttyS0 tg.run=counter tg.period_ms=20"})
        api.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": disk,
                                         "is_root_device": False, "is_read_only": False})
        api.ok("PUT", "/entropy", {})
        api.ok("GET", "/vm/config")
        api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        time.sleep(3)
        api.ok("PATCH", "/vm", {"state": "Paused"})
        api.ok("GET", "/")
        api.ok("PUT", "/snapshot/create", {"snapshot_path": os.path.join(work, "vm.snap"),
                                           "mem_file_path": os.path.join(work, "vm.mem")})
        api.ok("PATCH", "/vm", {"state": "Resumed"})
        api.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        api.ok("GET", "/metrics/prometheus")
        time.sleep(1)
        api.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        time.sleep(1)
    return steps


def linux_api(guest_dir):
    def steps(api):
        api.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        api.ok("PUT", "/boot-source", {
            "kernel_image_path": os.path.join(guest_dir, "vmlinux"),
            "initrd_path": os.path.join(guest_dir, "initramfs.cpio.gz"),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet"})
        api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        time.sleep(5)
    return steps


def functions_run(out, binary):
    """Functions of `binary` that ran, from a callgrind profile."""
    names, obj = [], None
    with open(out, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                obj = line[3:].strip()
            elif line.startswith("fn=") and obj and os.path.realpath(obj) == binary:
                names.append(re.sub(r"'\d+$", "", line[3:].strip()))
    return names


def code_symbols(binary):
    """(address, name) of the binary's functions, sorted by address."""
    out = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True,
                         check=True).stdout
    return sorted((int(f[0], 16), f[2]) for f in (line.split() for line in out.splitlines())
                  if len(f) == 3 and f[1] in CODE)


def faulting_functions(data, binary):
    """Functions whose first instruction fetch on a page faulted, from a perf page-fault record."""
    name = os.path.basename(binary)
    symbols = code_symbols(binary)
    addrs = [a for a, _ in symbols]
    base = None
    mmaps = subprocess.run(["perf", "script", "-i", data, "--show-mmap-events", "-F", "comm"],
                           capture_output=True, text=True, check=True).stdout
    for line in mmaps.splitlines():
        m = re.search(r"\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (\S+)", line)
        if "PERF_RECORD_MMAP" in line and name in line and m and int(m.group(3), 0) == 0:
            base = int(m.group(1), 16)
            break
    if base is None:
        return []
    found = []
    samples = subprocess.run(["perf", "script", "-i", data, "-F", "addr,ip,dso"],
                             capture_output=True, text=True, check=True).stdout
    for line in samples.splitlines():
        m = re.match(r"\s*([0-9a-f]+)\s+\((.*?)\)\s+([0-9a-f]+)", line)
        if not m or name not in m.group(2) or m.group(1) != m.group(3):
            continue
        i = bisect.bisect_right(addrs, int(m.group(1), 16) - base) - 1
        if i >= 0:
            found.append(symbols[i][1])
    return found


def scenarios(anvil, work, wrap_for, disk, valgrind):
    """Runs every scenario; wrap_for(name) gives the wrapper of the VMM command for that run."""
    seccomp = ["--no-seccomp"] if valgrind else []
    run_api(wrap_for("api"), anvil, work, testguest_api(work, disk), seccomp)
    if os.path.exists(os.path.join(bench.GUEST_DIR, "vmlinux")):
        run_api(wrap_for("linux"), anvil, work, linux_api(bench.GUEST_DIR), seccomp)
    else:
        print(f"no Linux guest in {bench.GUEST_DIR}: its boot path is not recorded")
    subprocess.run(wrap_for("boot")([
        anvil, "boot", *seccomp, "--kernel", bench.TESTGUEST,
        "--cmdline", "console=ttyS0 tg.run=blk tg.seed=4", "--disk", f"path={disk}", "--rng"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=300, check=True)


def write_order(path, names, binary):
    known = {n for _, n in code_symbols(binary)}
    order, seen = [], set()
    for name in names:
        if name in known and name not in seen:
            seen.add(name)
            order.append(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(order) + "\n")
    return order


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anvil", default=bench.ANVIL)
    parser.add_argument("--rebuild", help="command that relinks --anvil with the new file "
                        "(e.g. scripts/build-static.sh); enables the page-fault refinement")
    parser.add_argument("--out", default=os.path.join(bench.REPO, "resources", "link",
                                                      "anvil-vmm.order"))
    parser.add_argument("--check", action="store_true", help="only report how many functions "
                        "of the file --anvil lacks (renamed since the file was recorded)")
    args = parser.parse_args()
    anvil = os.path.realpath(args.anvil)
    if args.check:
        listed = open(args.out).read().split()
        known = {n for _, n in code_symbols(anvil)}
        stale = [n for n in listed if n not in known]
        print(f"{len(stale)} of {len(listed)} functions in {args.out} are not in {anvil}")
        for name in stale:
            print(f"  {name}")
        sys.exit(1 if stale else 0)
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed (apt-get install valgrind)")
    if args.rebuild and not shutil.which("perf"):
        sys.exit("perf is needed for --rebuild (apt-get install linux-perf)")
    for path in (anvil, bench.TESTGUEST):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: cargo build --release first")

    with tempfile.TemporaryDirectory() as work:
        disk = os.path.join(work, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        outs = []

        def callgrind_for(name):
            outs.append(os.path.join(work, f"{name}.cg"))
            return lambda cmd: callgrind(outs[-1], cmd)

        scenarios(anvil, work, callgrind_for, disk, valgrind=True)
        ran = [n for o in outs for n in functions_run(o, anvil)]
        names = [n for _, n in code_symbols(anvil)]
        demangled = subprocess.run(["c++filt"], input="\n".join(names),
                                   capture_output=True, text=True, check=True).stdout
        pattern = re.compile("|".join(BY_NAME))
        by_name = [n for n, d in zip(names, demangled.splitlines()) if pattern.search(d)]
        order = write_order(args.out, ran + by_name, anvil)
        print(f"callgrind: {len(order)} functions ({len(by_name)} by name) -> {args.out}")

        for round_ in range(1, 9 if args.rebuild else 1):
            subprocess.run(args.rebuild, shell=True, check=True, stdout=subprocess.DEVNULL)
            datas = []

            def perf_for(name):
                datas.append(os.path.join(work, f"{name}-{round_}.perf"))
                return lambda cmd: page_faults(datas[-1], cmd)

            scenarios(anvil, work, perf_for, disk, valgrind=False)
            hot = set(order)
            missed = [n for d in datas for n in faulting_functions(d, anvil) if n not in hot]
            print(f"round {round_}: {len(set(missed))} functions faulted outside the ordered ones")
            if not missed:
                break
            order = write_order(args.out, order + missed, anvil)
        if args.rebuild:
            subprocess.run(args.rebuild, shell=True, check=True, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
