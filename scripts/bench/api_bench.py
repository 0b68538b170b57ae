#!/usr/bin/env python3
"""Benchmarks of the per-VM API, anvil-vmm beside Firecracker driven by the same client.

    scripts/bench/api_bench.py [--runs 10] [--requests 10000] [--firecracker PATH]

Prints, for each VMM:
  - latency: median and p99 of `GET /` and of `PUT /machine-config` over --requests requests
    on one keep-alive connection to the socket (the client is this script: a raw HTTP/1.1
    writer/reader on a Unix socket, the same for both VMMs);
  - spawn: process spawn until `GET /` answers (medians over --runs);
  - start: the `PUT /actions InstanceStart` request's latency with 1 vCPU, 128 MiB and the
    shared Linux guest's vmlinux + initramfs (the guest then boots; it is killed 3 s later);
  - rss: the VMM's resident memory beyond the resident part of guest memory, 3 s after start
    (guest memory: the contiguous mappings that make up its address range);
  - api boot: process start, all PUTs and InstanceStart until the test guest's boot signal
    (`tg.run=hello`, the `TG boot=ok` line), beside `anvil-vmm boot` of the same guest.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  (shared helpers: paths, spawn, wait_for_line, guest_rss_kib)


class Api:
    """One keep-alive HTTP/1.1 connection to an API socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def request(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        header, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = header.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        payload, self.buf = self.buf[:length], self.buf[length:]
        return status, payload

    def ok(self, method, path, body=None):
        status, payload = self.request(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {payload!r}")
        return payload

    def close(self):
        self.sock.close()


def vmm_cmd(kind, binary, sock):
    if kind == "anvil":
        return [binary, "--api-sock", sock, "--log-level", "error"]
    return [binary, "--api-sock", sock, "--level", "Error"]


def start_vmm(kind, binary, workdir):
    """Spawns a VMM; returns (process, connected Api, spawn-to-answer us)."""
    sock = os.path.join(workdir, f"{kind}-{time.monotonic_ns()}.sock")
    t0 = bench.now_us()
    proc = subprocess.Popen(vmm_cmd(kind, binary, sock), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            api = Api(sock)
            api.ok("GET", "/")
            return proc, api, bench.now_us() - t0
        except (FileNotFoundError, ConnectionRefusedError, RuntimeError, OSError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{kind}: the API never answered")
            time.sleep(0.0001)


def stop(proc):
    proc.kill()
    proc.wait()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def latency(kind, binary, workdir, n):
    proc, api, _ = start_vmm(kind, binary, workdir)
    out = {}
    try:
        for name, method, path, body in [
            ("GET /", "GET", "/", None),
            ("PUT /machine-config", "PUT", "/machine-config",
             {"vcpu_count": 1, "mem_size_mib": 128}),
        ]:
            samples = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                api.ok(method, path, body)
                samples.append((time.perf_counter_ns() - t0) / 1000)
            out[name] = (statistics.median(samples), percentile(samples, 99))
    finally:
        api.close()
        stop(proc)
    return out


def rss_beyond_guest_kib(pid, guest_kib, guest_files=()):
    """Total RSS minus the RSS of guest memory (see bench.guest_rss_kib)."""
    total, guest = bench.guest_rss_kib(pid, guest_kib, guest_files)
    return total - guest


def linux_start(kind, binary, workdir):
    """InstanceStart latency (us) and RSS beyond guest memory 3 s later (KiB)."""
    kernel = os.path.join(bench.GUEST_DIR, "vmlinux")
    initrd = os.path.join(bench.GUEST_DIR, "initramfs.cpio.gz")
    proc, api, _ = start_vmm(kind, binary, workdir)
    try:
        api.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        api.ok("PUT", "/boot-source", {
            "kernel_image_path": kernel, "initrd_path": initrd,
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet"})
        t0 = time.perf_counter_ns()
        api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        start_us = (time.perf_counter_ns() - t0) / 1000
        time.sleep(3)
        rss_kib = rss_beyond_guest_kib(proc.pid, 128 * 1024, (kernel, initrd))
    finally:
        api.close()
        stop(proc)
    return start_us, rss_kib


def api_boot(kind, binary, workdir):
    """Process start through the PUTs and InstanceStart to the test guest's boot signal (us)."""
    t0 = bench.now_us()
    proc, api, _ = start_vmm(kind, binary, workdir)
    try:
        api.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        api.ok("PUT", "/boot-source", {"kernel_image_path": bench.TESTGUEST,
                                       "boot_args": "console=ttyS0 tg.run=hello"})
        api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        t1, _ = bench.wait_for_line(proc, r"TG boot=ok")
    finally:
        api.close()
        stop(proc)
    return t1 - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--firecracker")
    parser.add_argument("--anvil", help="anvil-vmm binary to measure (default: "
                        "target/release/anvil-vmm; scripts/build-static.sh builds a static one)")
    args = parser.parse_args()
    if args.anvil:
        bench.ANVIL = os.path.abspath(args.anvil)
    vmms = [("anvil", bench.ANVIL)]
    if args.firecracker:
        vmms.append(("firecracker", args.firecracker))
    results = {kind: {} for kind, _ in vmms}
    samples = {kind: {"spawn": [], "start": [], "rss": [], "boot": []} for kind, _ in vmms}
    with tempfile.TemporaryDirectory(prefix="anvil-api-bench-") as workdir:
        for kind, binary in vmms:
            results[kind]["latency"] = latency(kind, binary, workdir, args.requests)
        # The VMMs take turns in every round, so drift on the machine hits both alike.
        for _ in range(args.runs):
            for kind, binary in vmms:
                proc, api, us = start_vmm(kind, binary, workdir)
                api.close()
                stop(proc)
                samples[kind]["spawn"].append(us)
        for _ in range(max(3, args.runs // 2)):
            for kind, binary in vmms:
                s, m = linux_start(kind, binary, workdir)
                samples[kind]["start"].append(s)
                samples[kind]["rss"].append(m)
        for _ in range(args.runs):
            for kind, binary in vmms:
                samples[kind]["boot"].append(api_boot(kind, binary, workdir))
        for kind, _ in vmms:
            r, x = results[kind], samples[kind]
            r["spawn_ms"] = statistics.median(x["spawn"]) / 1000
            r["start_ms"] = statistics.median(x["start"]) / 1000
            r["rss_mib"] = statistics.median(x["rss"]) / 1024
            r["api_boot_ms"] = statistics.median(x["boot"]) / 1000
        r = results["anvil"]
        r["cli_boot_ms"] = statistics.median([
            bench.time_to_line(bench.anvil_cmd(bench.TESTGUEST, "console=ttyS0 tg.run=hello"),
                               r"TG boot=ok") for _ in range(args.runs)]) / 1000

    for kind, r in results.items():
        print(f"== {kind}")
        for name, (med, p99) in r["latency"].items():
            print(f"  {name:22} median {med:7.1f} us   p99 {p99:7.1f} us   ({args.requests} requests)")
        print(f"  spawn to GET /         {r['spawn_ms']:7.2f} ms (median of {args.runs})")
        print(f"  InstanceStart request  {r['start_ms']:7.2f} ms (Linux vmlinux + initramfs)")
        print(f"  RSS beyond guest       {r['rss_mib']:7.2f} MiB (3 s after start)")
        print(f"  boot through the API   {r['api_boot_ms']:7.2f} ms (spawn, PUTs, start -> TG boot=ok)")
        if "cli_boot_ms" in r:
            print(f"  anvil-vmm boot         {r['cli_boot_ms']:7.2f} ms (same guest, flags)")
    if "firecracker" in results:
        a, f = results["anvil"], results["firecracker"]
        print("== anvil / firecracker")
        for key in ["spawn_ms", "start_ms", "rss_mib", "api_boot_ms"]:
            print(f"  {key:12} {a[key] / f[key]:.2f}x")
        for name in a["latency"]:
            print(f"  {name:22} p99 {a['latency'][name][1] / f['latency'][name][1]:.2f}x")


if __name__ == "__main__":
    main()
