#!/usr/bin/env python3
"""End-to-end benchmarks of anvil-vmm, beside peers measured in the same run.

    scripts/bench/bench.py startup [--runs 20]
        process spawn to vCPU 0's first KVM_RUN (anvil's log line carries CLOCK_MONOTONIC).
    scripts/bench/bench.py boot [--runs 20] [--qemu qemu-system-x86_64] [--firecracker PATH]
        spawn to the test guest's boot-complete signal (`tg.run=hello`, 1 vCPU, 128 MiB): the first
        `TG boot=ok` line on the console, which the guest prints right after writing 123 to port
        0x3f0; the same guest under QEMU's microvm machine (PVH entry) and Firecracker when given.
    scripts/bench/bench.py memory [--runs 5] [--qemu ...] [--firecracker PATH]
        resident memory of the VMM process minus the resident part of guest memory, sampled after
        the test guest has booted and is running its `counter` workload.
    scripts/bench/bench.py blk [--runs 5] [--qemu qemu-system-x86_64]
        virtio-blk through KVM with the test guest's polling driver (`tg.blk_bench=1`: one request
        in flight, no pattern work in the timed loops) on a raw file, sequential 1 MiB and 4 KiB
        requests, beside fio doing the same on the host
        against the same file (psync, one job, buffered like anvil's backend), and the same guest
        under QEMU's microvm with a virtio-blk-device on the same file when given.
    scripts/bench/bench.py net [--runs 5] [--qemu qemu-system-x86_64]
        virtio-net transmit through KVM: the test guest (`tg.net_bench=1`) sends 256 MiB of
        1514-byte and 32 MiB of 64-byte broadcast frames to a tap the script creates, beside a host
        program writing the same frames to the same tap (`cargo build --release -p devices
        --example tap_blast`), and the same guest under QEMU's microvm (virtio-net-device on
        the tap, no vhost) when given. Needs root.
    scripts/bench/bench.py linux [--runs 10] [--firecracker PATH]
        spawn to the Linux guest's `anvil-guest: init ready` line, 1 and 2 vCPUs, anvil beside
        Firecracker. Run it where KVM runs Linux; on a PVM host wrap it in the L1 machine:
        resources/l1/run-in-l1.sh -- python3 scripts/bench/bench.py linux ...

Peers are built or installed by hand outside the repository. Figures go to docs/benchmarks.md.
"""

import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
ANVIL = os.path.join(TARGET, "release", "anvil-vmm")
TESTGUEST = os.path.join(TARGET, "release", "anvil-testguest")
GUEST_DIR = os.environ.get("ANVIL_GUEST_DIR", os.path.join(REPO, "..", "shared", "guest"))
TIMEOUT_S = 120


def now_us():
    return time.monotonic_ns() // 1000


def spawn(cmd, **kw):
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def wait_for_line(proc, pattern, timeout_s=TIMEOUT_S, stream="stdout"):
    """Reads `stream` until a line matches `pattern`; returns (monotonic us, line)."""
    fd = getattr(proc, stream).fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            if regex.search(text):
                return now_us(), text
    raise RuntimeError(f"no line matching {pattern!r} from {proc.args[0]}")


def finish(proc, timeout_s=TIMEOUT_S):
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out.decode(errors="replace"), err.decode(errors="replace")


def median_ms(values_us):
    return statistics.median(values_us) / 1000.0


def report(title, rows, baseline=None):
    """rows: list of (name, [us...]); prints medians and ratios against `baseline`."""
    print(f"\n{title}")
    base = None
    if baseline:
        base = next((median_ms(v) for n, v in rows if n == baseline and v), None)
    for name, values in rows:
        if not values:
            print(f"  {name:<28} (not measured)")
            continue
        med = median_ms(values)
        extra = ""
        if base and not name.startswith("anvil"):
            extra = f"  ratio anvil/{name} = {base / med:.2f}"
        print(f"  {name:<28} median {med:8.2f} ms  min {min(values) / 1000:8.2f}  "
              f"max {max(values) / 1000:8.2f}  n={len(values)}{extra}")


def anvil_cmd(kernel, cmdline, cpus=1, mem="128M", initrd=None):
    cmd = [ANVIL, "boot", "--kernel", kernel, "--cmdline", cmdline, "--cpus", str(cpus),
           "--memory", mem]
    if initrd:
        cmd += ["--initrd", initrd]
    return cmd


def qemu_cmd(qemu, kernel, cmdline, cpus=1, mem_mib=128, initrd=None, kvm=True):
    cmd = [qemu, "-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on", "-m", str(mem_mib),
           "-smp", str(cpus), "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
           "-no-reboot", "-kernel", kernel, "-append", cmdline]
    cmd += ["-accel", "kvm", "-cpu", "host,-arch-capabilities"] if kvm else ["-accel", "tcg"]
    if initrd:
        cmd += ["-initrd", initrd]
    return cmd


def firecracker_cmd(fc, workdir, kernel, cmdline, cpus=1, mem_mib=128, initrd=None):
    config = {
        "boot-source": {"kernel_image_path": kernel, "boot_args": cmdline},
        "drives": [],
        "machine-config": {"vcpu_count": cpus, "mem_size_mib": mem_mib},
    }
    if initrd:
        config["boot-source"]["initrd_path"] = initrd
    path = os.path.join(workdir, f"fc-{cpus}-{mem_mib}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return [fc, "--no-api", "--config-file", path, "--no-seccomp", "--level", "Info",
            "--boot-timer"]


FAILURES = {}


def time_to_line(cmd, pattern):
    """Spawn to the first line matching `pattern`; None (and a note) when the run fails."""
    t0 = now_us()
    proc = spawn(cmd)
    try:
        t, _ = wait_for_line(proc, pattern)
    except RuntimeError:
        _, err = finish(proc)
        name = os.path.basename(cmd[0])
        FAILURES[name] = FAILURES.get(name, 0) + 1
        print(f"  ({name} run failed: {err.strip().splitlines()[-1:] if err.strip() else 'no output'})")
        return None
    finish(proc)
    return t - t0


def add(rows, name, value):
    if value is not None:
        rows[name].append(value)


def bench_startup(args):
    values = []
    for _ in range(args.runs):
        t0 = now_us()
        proc = spawn(anvil_cmd(TESTGUEST, "tg.run=hello"))
        _, line = wait_for_line(proc, r"entering KVM_RUN", stream="stderr")
        values.append(int(re.search(r"monotonic_us=(\d+)", line).group(1)) - t0)
        finish(proc)
    report("VMM start-up: spawn to vCPU 0's first KVM_RUN (test guest, 1 vCPU, 128 MiB)",
           [("anvil-vmm", values)])


def bench_boot(args):
    rows = {"anvil-vmm": [], "anvil-vmm (own boot timer)": [], "qemu microvm": [],
            "firecracker": []}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.runs):
            # Interleaved, so drift on the machine affects every VMM alike.
            t0 = now_us()
            proc = spawn(anvil_cmd(TESTGUEST, "tg.run=hello"))
            t, _ = wait_for_line(proc, r"^TG boot=ok")
            _, err = finish(proc)
            rows["anvil-vmm"].append(t - t0)
            m = re.search(r"Guest-boot-time = (\d+) us", err)
            if m:
                rows["anvil-vmm (own boot timer)"].append(int(m.group(1)))
            if args.qemu:
                add(rows, "qemu microvm", time_to_line(
                    qemu_cmd(args.qemu, TESTGUEST, "tg.run=hello"), r"^TG boot=ok"))
            if args.firecracker:
                add(rows, "firecracker", time_to_line(
                    firecracker_cmd(args.firecracker, work, TESTGUEST, "tg.run=hello"),
                    r"^TG boot=ok"))
    report("Boot to guest: spawn to the test guest's boot-complete signal (hello, 1 vCPU, "
           "128 MiB)", list(rows.items()), baseline="anvil-vmm")


def guest_rss_kib(pid, guest_kib, guest_files=()):
    """Total RSS and the RSS of guest memory. Guest memory is the largest anonymous mapping of
    at least half its size (the kernel merges it with an adjacent anonymous mapping of the same
    protection, so an exact size match can miss it; the merged neighbour, a few pages, is then
    counted as guest), extended through the mappings right next to it that are anonymous or
    map one of `guest_files`, as long as the whole stays within guest memory's size plus 1 MiB:
    anvil maps the kernel's and initrd's pages from their files at load and then moves
    anonymous copies over them, which leaves guest memory split into contiguous mappings."""
    maps = []  # [lo, hi, anonymous, path, rss_kib]
    total = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line) and len(fields) >= 5:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                path = fields[5] if len(fields) > 5 else None
                maps.append([lo, hi, path is None, path, 0])
            elif fields and fields[0] == "Rss:":
                total += int(fields[1])
                maps[-1][4] += int(fields[1])
    candidates = [i for i, m in enumerate(maps) if m[2] and (m[1] - m[0]) // 1024 >= guest_kib // 2]
    if not candidates:
        return total, 0
    first = last = max(candidates, key=lambda i: maps[i][1] - maps[i][0])
    limit_kib = guest_kib + 1024

    def joins(m, lo, hi):
        return (m[2] or m[3] in guest_files) and (hi - lo) // 1024 <= limit_kib

    while first > 0 and maps[first - 1][1] == maps[first][0] and \
            joins(maps[first - 1], maps[first - 1][0], maps[last][1]):
        first -= 1
    while last + 1 < len(maps) and maps[last + 1][0] == maps[last][1] and \
            joins(maps[last + 1], maps[first][0], maps[last + 1][1]):
        last += 1
    if (maps[last][1] - maps[first][0]) // 1024 < guest_kib:
        return total, 0
    return total, sum(m[4] for m in maps[first:last + 1])


def bench_memory(args):
    mem_mib = 128
    rows = {"anvil-vmm": [], "qemu microvm": [], "firecracker": []}
    with tempfile.TemporaryDirectory() as work:
        cmds = {"anvil-vmm": anvil_cmd(TESTGUEST, "tg.run=counter tg.period_ms=50")}
        if args.qemu:
            cmds["qemu microvm"] = qemu_cmd(args.qemu, TESTGUEST, "tg.run=counter tg.period_ms=50")
        if args.firecracker:
            cmds["firecracker"] = firecracker_cmd(args.firecracker, work, TESTGUEST,
                                                  "tg.run=counter tg.period_ms=50")
        for _ in range(args.runs):
            for name, cmd in cmds.items():
                proc = spawn(cmd)
                wait_for_line(proc, r"^TG count=3")
                total, guest = guest_rss_kib(proc.pid, mem_mib * 1024)
                proc.kill()
                finish(proc)
                rows[name].append((total - guest) * 1000)  # report() takes us: KiB*1000 -> "ms" = KiB
    print("\nVMM memory overhead: process RSS minus the resident part of guest memory "
          "(test guest counter, 1 vCPU, 128 MiB); figures in KiB")
    for name, values in rows.items():
        if values:
            vals = [v / 1000 for v in values]
            print(f"  {name:<28} median {statistics.median(vals):8.0f} KiB  "
                  f"({statistics.median(vals) / 1024:.2f} MiB)  n={len(vals)}")


def fio(path, rw, bs, size_mib):
    out = subprocess.run(
        ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
         f"--size={size_mib}M", "--ioengine=psync", "--numjobs=1", "--invalidate=0",
         "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["read" if rw == "read" else "write"]
    return side["bw_bytes"], side["iops"]


def qemu_virtio_cmdline():
    """virtio_mmio.device= words for every transport of QEMU's microvm machine (24 windows of
    512 bytes from 0xfeb00000): QEMU adds them itself only for Linux kernels, and the test
    guest skips the empty ones (device ID 0)."""
    return " ".join(f"virtio_mmio.device=512@{0xfeb00000 + i * 512:#x}:12" for i in range(24))


def qemu_virtio_cmd(qemu, cmdline, devices, mem_mib=512):
    """QEMU microvm running the test guest with modern virtio-mmio `devices` (-device args)."""
    cmd = qemu_cmd(qemu, TESTGUEST, f"{cmdline} {qemu_virtio_cmdline()}", mem_mib=mem_mib)
    return cmd + ["-global", "virtio-mmio.force-legacy=false"] + devices


def tg_values(out):
    return dict(l[3:].split("=", 1) for l in out.splitlines() if l.startswith("TG ") and "=" in l)


def run_tg(cmd, what):
    """Runs a test-guest benchmark to completion; its `TG key=value` lines, or None."""
    out, err = finish(spawn(cmd))
    tg = tg_values(out)
    if tg.get("result") != "pass":
        name = os.path.basename(cmd[0])
        FAILURES[name] = FAILURES.get(name, 0) + 1
        print(f"  ({name} {what} run failed: {tg.get('result')} "
              f"{(err.strip().splitlines() or ['no output'])[-1]})")
        return None
    return tg


def bench_blk(args):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        disk = os.path.join(work, "disk.img")
        results = {}
        for label, req_kib, mib in (("1 MiB requests", 1024, 256), ("4 KiB requests", 4, 64)):
            # Written out once, so that no run pays for allocating the file's blocks.
            with open(disk, "wb") as f:
                for _ in range(mib):
                    f.write(b"\0" * (1 << 20))
            rows = {f"{who} {op}": [] for who in ("anvil", "qemu", "fio") for op in ("write", "read")}
            cmdline = f"tg.run=blk tg.blk_bench=1 tg.blk_req_kib={req_kib} tg.blk_mib={mib}"
            for _ in range(args.runs):
                vmms = [("anvil", [ANVIL, "boot", "--kernel", TESTGUEST, "--memory", "512M",
                                   "--cmdline", cmdline, "--disk", f"path={disk}"])]
                if args.qemu:
                    # The same page-cache-backed raw file, I/O on QEMU's thread pool.
                    vmms.append(("qemu", qemu_virtio_cmd(args.qemu, cmdline, [
                        "-drive", f"id=d0,file={disk},format=raw,if=none,cache=writeback,aio=threads",
                        "-device", "virtio-blk-device,drive=d0"])))
                for who, cmd in vmms:
                    tg = run_tg(cmd, "blk")
                    if tg is None:
                        continue
                    moved = int(tg["blk_bench_bytes"])
                    rows[f"{who} write"].append(moved / (int(tg["blk_bench_write_us"]) / 1e6))
                    rows[f"{who} read"].append(moved / (int(tg["blk_bench_read_us"]) / 1e6))
                bs = f"{req_kib}k"
                rows["fio write"].append(fio(disk, "write", bs, mib)[0])
                rows["fio read"].append(fio(disk, "read", bs, mib)[0])
            results[label] = (req_kib, {k: statistics.median(v) for k, v in rows.items() if v},
                              {k: len(v) for k, v in rows.items()})
        print("\nvirtio-blk through KVM (test guest, one request in flight) against fio on the host, "
              "same file, medians")
        for label, (req_kib, med, n) in results.items():
            for op in ("write", "read"):
                h = med[f"fio {op}"]
                for who in ("anvil", "qemu"):
                    a = med.get(f"{who} {op}")
                    if a is None:
                        continue
                    print(f"  {label:<15} {op:<5}  {who:<5} {a / 2**20:8.1f} MiB/s "
                          f"({a / (req_kib * 1024):9.0f} IOPS)   host fio {h / 2**20:8.1f} MiB/s "
                          f"({h / (req_kib * 1024):9.0f} IOPS)   {who}/host = {a / h:.2f}"
                          f"  n={n[f'{who} {op}']}")
                if f"qemu {op}" in med:
                    print(f"  {'':<15} {op:<5}  anvil/qemu = {med[f'anvil {op}'] / med[f'qemu {op}']:.2f}")


class BenchTap:
    """A tap made for the benchmark (IPv6 off, link up); deleted on exit."""

    def __init__(self):
        self.name = f"anvbn{os.getpid() % 100000}"

    def __enter__(self):
        subprocess.run(["ip", "tuntap", "add", "dev", self.name, "mode", "tap"], check=True)
        with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
            f.write("1")
        subprocess.run(["ip", "link", "set", self.name, "up"], check=True)
        return self.name

    def __exit__(self, *exc):
        subprocess.run(["ip", "link", "del", self.name], check=False)


def bench_net(args):
    blast = os.path.join(TARGET, "release", "examples", "tap_blast")
    if not os.path.exists(blast):
        sys.exit(f"{blast} is missing: run cargo build --release -p devices --example tap_blast")
    with BenchTap() as tap:
        results = {}
        for frame, mib in ((1514, 256), (64, 32)):
            rows = {"anvil": [], "qemu": [], "host": []}
            cmdline = f"tg.run=net tg.net_bench=1 tg.net_bench_mib={mib} tg.net_frame={frame}"
            for _ in range(args.runs):
                vmms = [("anvil", [ANVIL, "boot", "--kernel", TESTGUEST, "--memory", "128M",
                                   "--cmdline", cmdline, "--net", f"tap={tap}"])]
                if args.qemu:
                    vmms.append(("qemu", qemu_virtio_cmd(args.qemu, cmdline, [
                        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                        "-device", "virtio-net-device,netdev=n0"], mem_mib=128)))
                for who, cmd in vmms:
                    tg = run_tg(cmd, "net")
                    if tg is not None:
                        rows[who].append(int(tg["net_bench_bytes"]) / (int(tg["net_bench_us"]) / 1e6))
                out = subprocess.run([blast, tap, str(frame), str(mib)], capture_output=True,
                                     text=True, check=True).stdout
                h = tg_values("\n".join("TG " + l for l in out.splitlines()))
                rows["host"].append(int(h["host_bench_bytes"]) / (int(h["host_bench_us"]) / 1e6))
            results[frame] = {k: (statistics.median(v), len(v)) for k, v in rows.items() if v}
        print(f"\nvirtio-net transmit through KVM (test guest, 256 MiB of 1514-byte or 32 MiB of 64-byte broadcast frames to a "
              "tap, dropped by the host stack) against a host program writing the same frames to "
              "the same tap, medians")
        for frame, med in results.items():
            h = med["host"][0]
            for who in ("anvil", "qemu"):
                if who not in med:
                    continue
                a, n = med[who]
                print(f"  {frame:>5}-byte frames  {who:<5} {a / 2**20:8.1f} MiB/s "
                      f"({a / frame / 1e3:7.0f} kframes/s)   host {h / 2**20:8.1f} MiB/s "
                      f"({h / frame / 1e3:7.0f} kframes/s)   {who}/host = {a / h:.2f}  n={n}")
            if "qemu" in med:
                print(f"  {frame:>5}-byte frames  anvil/qemu = {med['anvil'][0] / med['qemu'][0]:.2f}")


def bench_linux(args):
    vmlinux = os.path.join(GUEST_DIR, "vmlinux")
    initrd = os.path.join(GUEST_DIR, "initramfs.cpio.gz")
    # Firecracker appends pci=off (it has no PCI bus); anvil has none either: both get it.
    cmdline = 'console=ttyS0 reboot=k panic=-1 quiet pci=off anvil_cmd="true"'
    with tempfile.TemporaryDirectory() as work:
        for cpus in (1, 2):
            rows = {"anvil-vmm": [], "firecracker": []}
            for _ in range(args.runs):
                add(rows, "anvil-vmm", time_to_line(
                    anvil_cmd(vmlinux, cmdline, cpus=cpus, mem="256M", initrd=initrd),
                    r"anvil-guest: init ready"))
                if args.firecracker:
                    add(rows, "firecracker", time_to_line(
                        firecracker_cmd(args.firecracker, work, vmlinux, cmdline, cpus=cpus,
                                        mem_mib=256, initrd=initrd),
                        r"anvil-guest: init ready"))
            report(f"Linux boot: spawn to `anvil-guest: init ready` ({cpus} vCPU, 256 MiB, "
                   f"vmlinux + initramfs)", list(rows.items()), baseline="anvil-vmm")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["startup", "boot", "memory", "linux", "blk", "net"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--qemu", help="qemu-system-x86_64 binary for the peer run")
    parser.add_argument("--firecracker", help="firecracker binary for the peer run")
    parser.add_argument("--anvil", help="anvil-vmm binary to measure (default: "
                        "target/release/anvil-vmm; scripts/build-static.sh builds a static one)")
    args = parser.parse_args()
    global ANVIL
    if args.anvil:
        ANVIL = os.path.abspath(args.anvil)
    for path in (ANVIL, TESTGUEST):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run cargo build --release first")
    print(f"# anvil-vmm binary: {ANVIL}")
    print(f"# {args.what}: commit {subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}, "
          f"{os.uname().nodename}, {os.cpu_count()} CPUs, kvm_pvm={'yes' if os.path.isdir('/sys/module/kvm_pvm') else 'no'}")
    {"startup": bench_startup, "boot": bench_boot, "memory": bench_memory,
     "linux": bench_linux, "blk": bench_blk, "net": bench_net}[args.what](args)
    if FAILURES:
        print(f"failed runs (left out of the figures): {FAILURES}")


if __name__ == "__main__":
    main()
