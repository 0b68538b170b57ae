#!/usr/bin/env python3
"""`anvil-vmm run IMAGE` benchmark: cold and warm runs, split into phases.

    scripts/bench/oci_bench.py [--runs 10] [--mode full|startup] [--peer]

Builds a one-layer image of Debian's static busybox with its applet symlinks, pushes it to
Debian's docker-registry started on 127.0.0.1, then times `anvil-vmm run --rm IMAGE -- true`:

  cold: an empty data directory each time (pull from the registry, verify, unpack, mkfs.ext4,
        then boot);
  warm: the image already in the cache (no registry contact).

Each run is split by anvil's log lines (ANVIL_LOG=info, CLOCK_MONOTONIC stamps):

  image preparation  spawn to `image prepared` (exec, cache lookup or pull + convert, the run's
                     writable layer and initrd)
  VMM start-up       `image prepared` to vCPU 0's first KVM_RUN
  guest              first KVM_RUN to `VM stopped` (the kernel boots, the agent runs `true`,
                     reports its status and resets)
  teardown           `VM stopped` to process exit (output drained, --rm cleanup)

--mode full runs to completion and needs a KVM that runs Linux (inside the L1 machine on a PVM
host: resources/l1/run-in-l1.sh -- python3 scripts/bench/oci_bench.py). --mode startup (the
default on a PVM host, where a Linux guest never reaches userspace) stops each run at the first
KVM_RUN with SIGTERM, so only the first two phases are measured.

--peer adds the conventional tools doing the cold image preparation in the same loop: skopeo copy
from the registry to an OCI layout, tar -xzf of the layer, mkfs.ext4 -d (Debian's skopeo).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402

REPO_NAME = "anvil/bench-busybox"
TAG = "v1"


def layer_tar():
    """A tar of /bin/busybox and its applets as symlinks (as an image build would write it)."""
    applets = subprocess.run(["/bin/busybox", "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = sorted(({os.path.dirname(a) for a in applets} | {"bin"}) - {""})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        with open("/bin/busybox", "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for a in applets:
            if a == "bin/busybox":
                continue
            info = tarfile.TarInfo(a)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
            tar.addfile(info)
    return buf.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_image():
    """(config bytes, layer bytes, manifest bytes) of the benchmark image."""
    tar = layer_tar()
    layer = gzip.compress(tar, compresslevel=6, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer), "size": len(layer)}],
    }).encode()
    return config, layer, manifest


class Registry:
    """Debian's docker-registry on 127.0.0.1, storing under `workdir`."""

    def __init__(self, workdir):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=False,
                       stderr=subprocess.DEVNULL)  # loopback may be down inside L1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = os.path.join(workdir, "registry.yml")
        with open(config, "w") as f:
            f.write("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {workdir}/registry\nhttp:\n  addr: 127.0.0.1:{self.port}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/v2/", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    sys.exit("docker-registry did not come up")
                time.sleep(0.1)

    def push(self, config, layer, manifest):
        for blob in (config, layer):
            req = urllib.request.Request(f"{self.url}/v2/{REPO_NAME}/blobs/uploads/", method="POST")
            location = urllib.request.urlopen(req).headers["Location"]
            if location.startswith("/"):
                location = self.url + location
            sep = "&" if "?" in location else "?"
            req = urllib.request.Request(f"{location}{sep}digest={sha256(blob)}", data=blob,
                                         method="PUT")
            req.add_header("Content-Type", "application/octet-stream")
            urllib.request.urlopen(req)
        req = urllib.request.Request(f"{self.url}/v2/{REPO_NAME}/manifests/{TAG}", data=manifest,
                                     method="PUT")
        req.add_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        urllib.request.urlopen(req)

    def reference(self):
        return f"127.0.0.1:{self.port}/{REPO_NAME}:{TAG}"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def stamp(line):
    m = re.search(r"monotonic_us=(\d+)", line)
    return int(m.group(1)) if m else None


def wait_for_marks(proc, patterns, timeout_s=600):
    """Reads stderr until every (name, regex) in `patterns` matched a line, in order;
    {name: monotonic us from the line}, or None when the process ended first."""
    fd = proc.stderr.fileno()
    buf = b""
    marks = {}
    deadline = time.monotonic() + timeout_s
    while len(marks) < len(patterns) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buf += chunk
        while b"\n" in buf and len(marks) < len(patterns):
            line, buf = buf.split(b"\n", 1)
            name, pattern = patterns[len(marks)]
            if re.search(pattern, line.decode(errors="replace")):
                marks[name] = stamp(line.decode(errors="replace"))
    return marks if len(marks) == len(patterns) else None


def run_once(cmd, env, mode):
    """One `anvil-vmm run`: {phase: us}."""
    t0 = bench.now_us()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    patterns = [("prepared", r"image prepared"), ("kvm_run", r"vcpu0 entering KVM_RUN")]
    if mode == "full":
        patterns.append(("stopped", r"VM stopped"))
    marks = wait_for_marks(proc, patterns)
    if marks is None:
        proc.kill()
        _, err = bench.finish(proc)
        sys.exit(f"anvil-vmm run failed: {cmd}\n{err}")
    if mode == "startup":
        proc.send_signal(signal.SIGTERM)  # anvil removes the --rm run directory and exits
    _, err = bench.finish(proc, timeout_s=600)
    t_exit = bench.now_us()
    expected = 128 + signal.SIGTERM if mode == "startup" else 0
    if proc.returncode != expected:
        sys.exit(f"anvil-vmm run exited {proc.returncode}, not {expected}: {cmd}\n{err}")
    phases = {"image preparation": marks["prepared"] - t0,
              "VMM start-up": marks["kvm_run"] - marks["prepared"]}
    phases["preparation + start-up"] = phases["image preparation"] + phases["VMM start-up"]
    if mode == "full":
        phases["guest"] = marks["stopped"] - marks["kvm_run"]
        phases["teardown"] = t_exit - marks["stopped"]
        phases["total (spawn to exit)"] = t_exit - t0
    return phases


def peer_prepare(registry, workdir):
    """Cold image preparation with conventional tools; us."""
    scratch = os.path.join(workdir, "peer")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.join(scratch, "root"))
    t0 = bench.now_us()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{registry.reference()}", f"oci:{scratch}/layout:{TAG}"],
                   check=True)
    with open(os.path.join(scratch, "layout", "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"].split(":")[1]
    with open(os.path.join(scratch, "layout", "blobs", "sha256", manifest_digest)) as f:
        manifest = json.load(f)
    for layer in manifest["layers"]:
        blob = os.path.join(scratch, "layout", "blobs", "sha256", layer["digest"].split(":")[1])
        subprocess.run(["tar", "-xzf", blob, "-C", os.path.join(scratch, "root")], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d",
                    os.path.join(scratch, "root"), os.path.join(scratch, "disk.ext4"), "20M"],
                   check=True, stdout=subprocess.DEVNULL)
    return bench.now_us() - t0


def local_workdir():
    """A scratch directory that holds Unix sockets (a tmpfs where TMPDIR is 9p, inside L1)."""
    path = tempfile.mkdtemp(prefix="anvil-oci-bench-")
    probe = os.path.join(path, "probe.sock")
    mounted = False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(probe)
        os.unlink(probe)
    except OSError:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)
        mounted = True
    return path, mounted


def agent_initramfs():
    if os.environ.get("ANVIL_RUN_AGENT"):
        return os.environ["ANVIL_RUN_AGENT"]
    out = os.path.join(bench.TARGET, "anvil-cache", "agent")
    subprocess.run([os.path.join(bench.REPO, "resources", "agent", "build-initramfs.sh"), out],
                   check=True)
    return os.path.join(out, "agent-initramfs.cpio.gz")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mode", choices=["full", "startup"],
                        default="startup" if os.path.isdir("/sys/module/kvm_pvm") else "full")
    parser.add_argument("--peer", action="store_true",
                        help="time skopeo copy + tar + mkfs.ext4 -d for the cold preparation")
    parser.add_argument("--kernel", default=os.path.join(bench.GUEST_DIR, "vmlinux"))
    args = parser.parse_args()
    for path in (bench.ANVIL, args.kernel):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing (cargo build --release; ANVIL_GUEST_DIR)")
    agent = agent_initramfs()
    commit = subprocess.run(["git", "-C", bench.REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"oci_bench: mode {args.mode}, {args.runs} runs, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")

    workdir, mounted = local_workdir()
    registry = Registry(workdir)
    try:
        config, layer, manifest = build_image()
        registry.push(config, layer, manifest)
        print(f"image: one layer, {len(layer)} bytes gzip, {registry.reference()}", flush=True)
        env = dict(os.environ, ANVIL_LOG="info", TMPDIR=workdir)
        # The kernel and agent sit beside the cache, as DATA/guest/ would hold them (inside L1
        # the repository is on 9p, where reading the 16 MB vmlinux alone takes up to a second).
        guest = os.path.join(workdir, "guest")
        os.makedirs(guest)
        kernel = shutil.copy(args.kernel, guest)
        agent_copy = shutil.copy(agent, guest)

        def cmd(data):
            return [bench.ANVIL, "run", "--data-dir", data, "--rm", "--kernel", kernel,
                    "--agent", agent_copy, registry.reference(), "--", "true"]

        warm_data = os.path.join(workdir, "warm")
        subprocess.run([bench.ANVIL, "pull", "--data-dir", warm_data, registry.reference()],
                       check=True, stdout=subprocess.DEVNULL, env=dict(env, ANVIL_LOG="warn"))
        results = {"cold": [], "warm": []}
        peer = []
        for i in range(args.runs):
            cold_data = os.path.join(workdir, f"cold-{i}")
            results["cold"].append(run_once(cmd(cold_data), env, args.mode))
            shutil.rmtree(cold_data, ignore_errors=True)
            results["warm"].append(run_once(cmd(warm_data), env, args.mode))
            if args.peer:
                peer.append(peer_prepare(registry, workdir))
        for kind, runs in results.items():
            rows = [(phase, [r[phase] for r in runs]) for phase in runs[0]]
            bench.report(f"{kind} run: anvil-vmm run --rm IMAGE -- true", rows)
        if peer:
            bench.report("cold image preparation, conventional tools "
                         "(skopeo copy + tar -xzf + mkfs.ext4 -d)", [("conventional", peer)])
            anvil = statistics.median(r["image preparation"] for r in results["cold"])
            print(f"  ratio anvil cold image preparation / conventional = "
                  f"{anvil / statistics.median(peer):.2f}", flush=True)
    finally:
        registry.stop()
        if mounted:
            subprocess.run(["umount", workdir], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
