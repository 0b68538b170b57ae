#!/usr/bin/env python3
"""Live-migration benchmark: total time and downtime over loopback TCP.

    scripts/bench/migration_bench.py [--runs 5] [--sizes 512,2048] [--workloads idle,dirty]
                                     [--qemu qemu-system-x86_64]

For each guest size and workload, boots the test guest (2 vCPUs) through the API, then moves
it --runs times in a chain (each destination is the next source) to a fresh anvil-vmm
listening on 127.0.0.1. Workloads: `idle` is the counter printing every 100 ms (memory
mostly untouched, as a freshly booted guest's); `dirty` is memtest with three quarters of
memory filled with a pattern and 256 pages rewritten every 100 ms (10 MiB/s) during the
move. Figures come from the source's GET /migration (downtime: guest stopped until the
destination's acknowledgement) and the PUT /migration/send request's latency (total).
After every move the guest must print again at its destination, and memtest must not have
reported a bad page. With --qemu, QEMU's microvm machine runs the same guest and moves it the
same way (`-incoming tcp:...`, QMP `migrate`, downtime-limit 30 ms like anvil's default,
no bandwidth limit); its figures are QEMU's own `query-migrate` downtime and total-time.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import api_bench  # noqa: E402
import bench  # noqa: E402


class Vmm:
    """An anvil-vmm with its console drained into a list of lines."""

    def __init__(self, workdir, name):
        self.sock = os.path.join(workdir, f"{name}.sock")
        self.proc = subprocess.Popen([bench.ANVIL, "--api-sock", self.sock, "--level", "Error"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.lines = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.api = api_bench.Api(self.sock)
                self.api.ok("GET", "/")
                return
            except (FileNotFoundError, ConnectionRefusedError, RuntimeError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())

    def wait_for(self, text, timeout_s=300):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"no {text!r} from the guest; last lines: {self.lines[-5:]}")

    def stop(self):
        self.api.close()
        self.proc.kill()
        self.proc.wait()


class Qemu:
    """A QEMU microvm running (or waiting to receive) the test guest, driven over QMP."""

    def __init__(self, qemu, workdir, name, mem, args, incoming=None):
        self.out = os.path.join(workdir, f"{name}.out")
        qmp = os.path.join(workdir, f"{name}.qmp")
        cmd = [qemu, "-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on", "-m", str(mem),
               "-smp", "2", "-nodefaults", "-no-user-config", "-display", "none",
               "-serial", f"file:{self.out}", "-no-reboot", "-kernel", bench.TESTGUEST,
               "-append", f"console=ttyS0 {args}", "-accel", "kvm",
               "-cpu", "host,-arch-capabilities", "-qmp", f"unix:{qmp},server,nowait"]
        if incoming:
            cmd += ["-incoming", incoming]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(qmp)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.qmp = sock.makefile("rw")
        self.qmp.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, arguments=None):
        message = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.qmp.write(json.dumps(message) + "\n")
        self.qmp.flush()
        while True:
            reply = json.loads(self.qmp.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def text(self):
        try:
            with open(self.out, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, text, timeout_s=300):
        deadline = time.monotonic() + timeout_s
        while text not in self.text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"no {text!r} from the guest under QEMU")
            time.sleep(0.02)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def measure_qemu(qemu, workdir, mem, workload, runs, port):
    args, ready = cmdline(workload, mem)
    source = Qemu(qemu, workdir, f"q-src-{mem}-{workload}", mem, args)
    source.wait_for(ready)
    results = []
    for i in range(runs):
        url = f"tcp:127.0.0.1:{port + i}"
        dest = Qemu(qemu, workdir, f"q-dst-{mem}-{workload}-{i}", mem, args, incoming=url)
        source.cmd("migrate-set-parameters", {"downtime-limit": 30,
                                              "max-bandwidth": 100 << 30})
        t0 = time.perf_counter_ns()
        source.cmd("migrate", {"uri": url})
        while True:
            status = source.cmd("query-migrate")
            if status.get("status") in ("completed", "failed"):
                break
            time.sleep(0.001)
        wall_ms = (time.perf_counter_ns() - t0) / 1e6
        if status["status"] != "completed":
            raise RuntimeError(f"QEMU migration failed: {status}")
        source.stop()
        ram = status.get("ram", {})
        results.append({"total_ms": float(status["total-time"]),
                        "downtime_ms": float(status["downtime"]),
                        "rounds": ram.get("dirty-sync-count", 0),
                        "mib": ram.get("transferred", 0) / (1 << 20),
                        "final_pages": 0, "wall_ms": wall_ms})
        print(f"  qemu {mem} MiB {workload} run {i + 1}: total {status['total-time']} ms, "
              f"downtime {status['downtime']} ms, {ram.get('transferred', 0) / (1 << 20):.1f} "
              f"MiB sent", flush=True)
        seen = len(dest.text())
        source = dest
        deadline = time.monotonic() + 30
        while len(source.text()) <= seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest printed nothing under QEMU after move {i + 1}")
            time.sleep(0.02)
    if "verify=bad" in source.text():
        raise RuntimeError("memtest found a bad page after the QEMU moves")
    source.stop()
    return results


def cmdline(workload, mem):
    if workload == "idle":
        return "tg.run=counter tg.period_ms=100", "TG count=3"
    fill = mem * 3 // 4
    return (f"tg.run=memtest tg.rounds=0 tg.dirty_pages=256 tg.dirty_rate=2560 "
            f"tg.mem_limit_mib={fill}", "TG round=2 ")


def measure(workdir, mem, workload, runs, port):
    source = Vmm(workdir, f"src-{mem}-{workload}")
    args, ready = cmdline(workload, mem)
    source.api.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": mem})
    source.api.ok("PUT", "/boot-source", {"kernel_image_path": bench.TESTGUEST,
                                          "boot_args": f"console=ttyS0 {args}"})
    source.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    source.wait_for(ready)
    results = []
    for i in range(runs):
        dest = Vmm(workdir, f"dst-{mem}-{workload}-{i}")
        url = f"tcp:127.0.0.1:{port + i}"
        dest.api.ok("PUT", "/migration/receive", {"receiver_url": url})
        t0 = time.perf_counter_ns()
        source.api.ok("PUT", "/migration/send", {"destination_url": url})
        total_ms = (time.perf_counter_ns() - t0) / 1e6
        status = json.loads(source.api.ok("GET", "/migration"))
        source.stop()
        results.append({"total_ms": total_ms, "downtime_ms": status["downtime_ms"],
                        "rounds": status["rounds"], "mib": status["bytes"] / (1 << 20),
                        "final_pages": status["final_pages"]})
        print(f"  {mem} MiB {workload} run {i + 1}: total {total_ms:.1f} ms, downtime "
              f"{status['downtime_ms']:.2f} ms, {status['rounds']} rounds, "
              f"{status['bytes'] / (1 << 20):.1f} MiB sent, {status['final_pages']} pages "
              f"while stopped", flush=True)
        source = dest
        seen = len(source.lines)
        # The guest goes on at the destination.
        deadline = time.monotonic() + 30
        while len(source.lines) <= seen + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest printed nothing after move {i + 1}")
            time.sleep(0.02)
    if any("verify=bad" in line for line in source.lines):
        raise RuntimeError("memtest found a bad page after the moves")
    source.stop()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="512,2048")
    parser.add_argument("--workloads", default="idle,dirty")
    parser.add_argument("--qemu", help="also measure QEMU (e.g. qemu-system-x86_64)")
    args = parser.parse_args()
    rows = []
    # Below the ephemeral range (32768-60999), where outgoing connections take their ports.
    port = 23100
    with tempfile.TemporaryDirectory(prefix="anvil-mig-bench-") as workdir:
        for mem in [int(s) for s in args.sizes.split(",")]:
            for workload in args.workloads.split(","):
                r = measure(workdir, mem, workload, args.runs, port)
                port += args.runs
                med = {k: statistics.median(x[k] for x in r) for k in r[0]}
                qmed = None
                if args.qemu:
                    q = measure_qemu(args.qemu, workdir, mem, workload, args.runs, port)
                    port += args.runs
                    qmed = {k: statistics.median(x[k] for x in q) for k in q[0]}
                rows.append((mem, workload, med, qmed))
    print()
    print("| guest | workload | total | downtime | rounds | sent | pages sent while stopped |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mem, workload, m, _ in rows:
        print(f"| {mem} MiB | {workload} | {m['total_ms']:.1f} ms | {m['downtime_ms']:.2f} ms "
              f"| {m['rounds']:.0f} | {m['mib']:.1f} MiB | {m['final_pages']:.0f} |")
    if args.qemu:
        print()
        print("| guest | workload | anvil total | QEMU total | ratio | anvil downtime "
              "| QEMU downtime | anvil sent | QEMU sent |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for mem, workload, m, q in rows:
            print(f"| {mem} MiB | {workload} | {m['total_ms']:.1f} ms | {q['total_ms']:.0f} ms "
                  f"| {m['total_ms'] / max(q['total_ms'], 1):.2f}x | {m['downtime_ms']:.2f} ms "
                  f"| {q['downtime_ms']:.0f} ms | {m['mib']:.1f} MiB | {q['mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
