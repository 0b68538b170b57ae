#!/usr/bin/env python3
"""Snapshot benchmarks, anvil-vmm beside Firecracker driven through the same API calls.

    scripts/bench/snapshot_bench.py [--runs 10] [--mem 128] [--firecracker PATH]

For each VMM: boots the test guest (`tg.run=counter tg.period_ms=5`, 1 vCPU, --mem MiB)
through the API, pauses it and takes a Full snapshot (timed), then --runs times: spawns a new
VMM, loads the snapshot with resume_vm (the request's latency is "load") and waits for the
guest's next counter line (spawn to that line is "restore to guest output"). Medians.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import api_bench  # noqa: E402
import bench  # noqa: E402


def source(kind, binary, workdir, mem_mib):
    proc, api, _ = api_bench.start_vmm(kind, binary, workdir)
    try:
        api.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem_mib})
        api.ok("PUT", "/boot-source", {"kernel_image_path": bench.TESTGUEST,
                                       "boot_args": "console=ttyS0 tg.run=counter tg.period_ms=5"})
        api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        bench.wait_for_line(proc, r"TG count=20")
        api.ok("PATCH", "/vm", {"state": "Paused"})
        state = os.path.join(workdir, f"{kind}.snap")
        mem = os.path.join(workdir, f"{kind}.mem")
        t0 = time.perf_counter_ns()
        api.ok("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": state,
                                           "mem_file_path": mem})
        create_ms = (time.perf_counter_ns() - t0) / 1e6
    finally:
        api.close()
        api_bench.stop(proc)
    return state, mem, create_ms


def restore(kind, binary, workdir, state, mem):
    t0 = bench.now_us()
    proc, api, _ = api_bench.start_vmm(kind, binary, workdir)
    try:
        t1 = time.perf_counter_ns()
        api.ok("PUT", "/snapshot/load", {"snapshot_path": state, "resume_vm": True,
                                         "mem_backend": {"backend_type": "File",
                                                         "backend_path": mem}})
        load_ms = (time.perf_counter_ns() - t1) / 1e6
        t2, _ = bench.wait_for_line(proc, r"TG count=")
    finally:
        api.close()
        api_bench.stop(proc)
    return load_ms, (t2 - t0) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mem", type=int, default=128)
    parser.add_argument("--firecracker")
    parser.add_argument("--anvil", help="anvil-vmm binary to measure (default: "
                        "target/release/anvil-vmm)")
    args = parser.parse_args()
    if args.anvil:
        bench.ANVIL = os.path.abspath(args.anvil)
    vmms = [("anvil", bench.ANVIL)]
    if args.firecracker:
        vmms.append(("firecracker", args.firecracker))
    results = {}
    with tempfile.TemporaryDirectory(prefix="anvil-snap-bench-") as workdir:
        snaps = {kind: source(kind, binary, workdir, args.mem) for kind, binary in vmms}
        loads = {kind: [] for kind, _ in vmms}
        firsts = {kind: [] for kind, _ in vmms}
        # The VMMs take turns in every round, so drift on the machine hits both alike.
        for _ in range(args.runs):
            for kind, binary in vmms:
                state, mem, _ = snaps[kind]
                load_ms, first_ms = restore(kind, binary, workdir, state, mem)
                loads[kind].append(load_ms)
                firsts[kind].append(first_ms)
        for kind, _ in vmms:
            state, mem, create_ms = snaps[kind]
            st = os.stat(mem)
            results[kind] = {
                "create_ms": create_ms,
                "load_ms": statistics.median(loads[kind]),
                "first_ms": statistics.median(firsts[kind]),
                "mem_file_mib": st.st_blocks * 512 / (1 << 20),
            }
    for kind, r in results.items():
        print(f"== {kind} ({args.mem} MiB guest)")
        print(f"  snapshot/create        {r['create_ms']:8.2f} ms")
        print(f"  memory file on disk    {r['mem_file_mib']:8.2f} MiB")
        print(f"  snapshot/load request  {r['load_ms']:8.2f} ms (median of {args.runs})")
        print(f"  spawn to guest output  {r['first_ms']:8.2f} ms (spawn, load, first counter line)")
    if "firecracker" in results:
        a, f = results["anvil"], results["firecracker"]
        print("== anvil / firecracker")
        for key in ["create_ms", "load_ms", "first_ms", "mem_file_mib"]:
            print(f"  {key:14} {a[key] / f[key]:.2f}x")


if __name__ == "__main__":
    main()
