//! `anvil-vmm pull`, `run` and `images` end to end. The test builds a busybox-based image
//! itself (two layers: a whiteout, an opaque directory, env and a working directory in its
//! configuration), pushes it to Debian's `docker-registry` on 127.0.0.1 and writes it as an OCI
//! layout and a `docker save` archive.
//!
//! Host lane: the three sources convert to the same cached root disk. Linux lane (inside the L1
//! machine on PVM hosts): `run` boots the image from each source, prints what the entrypoint
//! prints, passes its exit code through, and serves a second run from the cache with the
//! registry stopped.
// Test helpers outside #[test] functions: a failed step should stop the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{
    anvil_vmm, linux_capable, linux_guest_dir, repo_root, run_with_deadline, Run, TempDir,
};
use oci::spec::RunConfig;
use oci::writer::ImageBuilder;

/// Generous: inside L1 every boot is emulated.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const REPO: &str = "anvil/busybox";
const TAG: &str = "v1";

/// The entrypoint script: prints what the test checks and exits with its first argument.
const REPORT_SH: &str = r#"echo "greeting=$GREETING"
echo "pwd=$(pwd)"
if [ -e /etc/removed ]; then echo "whiteout=not-applied"; else echo "whiteout=applied"; fi
echo "opaque=$(ls /data/old | tr '\n' ' ')"
echo "user=$(id -u)"
echo "group=$(id -g)"
echo "hostname=$(hostname)"
echo "lo-flags=$(cat /sys/class/net/lo/flags)"
echo "on-stderr" >&2
exit "${1:-0}"
"#;

fn tar_layer(entries: &[(&str, Option<&[u8]>, u32)], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        match data {
            Some(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_cksum();
                b.append_data(&mut h, name, *data).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(*mode);
                h.set_cksum();
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
        }
    }
    for (name, target) in symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_cksum();
        b.append_link(&mut h, name, target).unwrap();
    }
    b.into_inner().unwrap()
}

/// The test image's layers: busybox with its applets, then a layer that whites out
/// /etc/removed, makes /data/old opaque and adds the entrypoint script.
fn test_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian's busybox-static; scripts/test.sh installs it)");
    let list = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| !l.is_empty() && *l != "bin/busybox")
        .map(str::to_string)
        .collect();
    let links: Vec<(&str, &str)> = applets
        .iter()
        .map(|a| (a.as_str(), "/bin/busybox"))
        .collect();
    let base = tar_layer(
        &[
            ("bin", None, 0o755),
            ("bin/busybox", Some(&busybox), 0o755),
            ("etc", None, 0o755),
            (
                "etc/passwd",
                Some(b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
                0o644,
            ),
            ("etc/group", Some(b"root:x:0:\nnogroup:x:65534:\n"), 0o644),
            ("etc/removed", Some(b"gone in layer 2"), 0o644),
            (
                "data/old/lower-file",
                Some(b"hidden by the opaque marker"),
                0o644,
            ),
            ("data/old/sub/x", Some(b"also hidden"), 0o644),
        ],
        &links,
    );
    let top = tar_layer(
        &[
            ("etc/.wh.removed", Some(b""), 0o644),
            ("data/old/.wh..wh..opq", Some(b""), 0o644),
            ("data/old/upper-file", Some(b"visible"), 0o644),
            ("work", None, 0o755),
            ("report.sh", Some(REPORT_SH.as_bytes()), 0o755),
        ],
        &[],
    );
    vec![base, top]
}

/// The test image's configuration: env, entrypoint, cmd and working directory.
fn test_run_config() -> RunConfig {
    RunConfig {
        env: Some(vec![
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "GREETING=hello-from-the-image".into(),
        ]),
        entrypoint: Some(vec!["/bin/sh".into(), "/report.sh".into()]),
        cmd: Some(vec!["0".into()]),
        working_dir: Some("/work".into()),
        ..Default::default()
    }
}

/// The test image.
fn test_image() -> ImageBuilder {
    test_layers()
        .into_iter()
        .fold(ImageBuilder::new(test_run_config()), |image, layer| {
            image.layer(layer).unwrap()
        })
}

/// A local directory that can hold Unix sockets and flock'd files: the temporary directory,
/// or a tmpfs mounted on it where that is 9p (inside the L1 machine, as root).
struct LocalDir {
    dir: TempDir,
    mounted: bool,
}

impl LocalDir {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let probe = dir.path("probe.sock");
        let mounted = match std::os::unix::net::UnixListener::bind(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                false
            }
            Err(_) => {
                let status = Command::new("mount")
                    .args(["-t", "tmpfs", "tmpfs"])
                    .arg(&dir.0)
                    .status()
                    .expect("run mount");
                assert!(
                    status.success(),
                    "cannot mount a tmpfs for sockets and the cache"
                );
                true
            }
        };
        Self { dir, mounted }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }
}

impl Drop for LocalDir {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir.0).status();
        }
    }
}

/// Debian's docker-registry serving from a scratch directory on 127.0.0.1.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Self {
        // Loopback may be down inside the L1 machine.
        let _ = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "docker-registry (Debian's docker-registry package; scripts/test.sh installs it)",
            );
        let registry = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !registry.answers() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }

    /// True when GET /v2/ answers 200.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
    }

    fn reference(&self) -> String {
        format!("127.0.0.1:{}/{REPO}:{TAG}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The image in all three forms.
struct Sources {
    registry: Registry,
    layout: String,
    archive: String,
}

fn sources(dir: &LocalDir) -> Sources {
    let image = test_image();
    let registry = Registry::start(&dir.path("registry"));
    image
        .push(&format!("http://127.0.0.1:{}", registry.port), REPO, TAG)
        .unwrap();
    image.write_layout(&dir.path("layout"), TAG).unwrap();
    image
        .write_docker_archive(&dir.path("image.tar"), &format!("{REPO}:{TAG}"))
        .unwrap();
    Sources {
        registry,
        layout: format!("oci:{}:{TAG}", dir.path("layout").display()),
        archive: format!("docker-archive:{}", dir.path("image.tar").display()),
    }
}

fn anvil(dir: &LocalDir, args: &[&str]) -> Run {
    anvil_with_stdin(dir, args, None)
}

/// `cmd`, with its stdin read from `stdin` when given (run_with_deadline closes stdin).
fn with_stdin(cmd: Command, stdin: Option<&Path>) -> Command {
    let Some(input) = stdin else {
        return cmd;
    };
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(r#"input=$1; shift; exec "$@" < "$input""#)
        .arg("sh")
        .arg(input)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    shell
}

fn anvil_with_stdin(dir: &LocalDir, args: &[&str], stdin: Option<&Path>) -> Run {
    // --data-dir right after the subcommand: after `--` it would be the workload's.
    let mut cmd = Command::new(anvil_vmm());
    cmd.arg(args[0])
        .arg("--data-dir")
        .arg(dir.path("data"))
        .args(&args[1..])
        .env("TMPDIR", &dir.dir.0)
        .env("ANVIL_LOG", "warn");
    run_with_deadline(with_stdin(cmd, stdin), RUN_TIMEOUT)
}

fn debugfs(disk: &str, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request, disk])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry reference, an OCI layout and a docker archive of the same image convert to the
/// same cached root disk, with the whiteout and opaque directory applied; `images` lists it
/// and `images rm` and `prune` empty the cache.
#[test]
fn pull_converts_registry_layout_and_archive_alike() {
    let dir = LocalDir::new("oci-pull");
    let mut src = sources(&dir);
    let from_registry = anvil(&dir, &["pull", &src.registry.reference()]);
    assert_eq!(from_registry.status.code(), Some(0), "{from_registry:?}");
    let disk = from_registry.stdout.trim().to_string();
    assert!(disk.ends_with(".ext4"), "{from_registry:?}");
    for source in [&src.layout, &src.archive] {
        let run = anvil(&dir, &["pull", source]);
        assert_eq!(run.status.code(), Some(0), "{run:?}");
        assert_eq!(run.stdout.trim(), disk, "{source} gave another disk");
    }
    let etc = debugfs(&disk, "ls -l /etc");
    assert!(etc.contains("passwd") && !etc.contains("removed"), "{etc}");
    let old = debugfs(&disk, "ls -l /data/old");
    assert!(
        old.contains("upper-file") && !old.contains("lower-file") && !old.contains(" sub"),
        "{old}"
    );
    assert!(debugfs(&disk, "stat /bin/sh").contains("Type: symlink"));

    let list = anvil(&dir, &["images"]);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    assert_eq!(list.stdout.lines().count(), 2, "{list:?}");
    assert!(list.stdout.contains(&src.registry.reference()), "{list:?}");

    // pull always asks the registry: with it gone, a clear error.
    src.registry.stop();
    let offline = anvil(&dir, &["pull", &src.registry.reference()]);
    assert_eq!(offline.status.code(), Some(1), "{offline:?}");
    assert!(offline.stderr.contains("registry request"), "{offline:?}");
    // An unknown tag in the layout is "image not found".
    let missing = anvil(
        &dir,
        &[
            "pull",
            &format!("oci:{}:nope", dir.path("layout").display()),
        ],
    );
    assert!(missing.stderr.contains("image not found"), "{missing:?}");

    for source in [
        src.registry.reference(),
        src.layout.clone(),
        src.archive.clone(),
    ] {
        let rm = anvil(&dir, &["images", "rm", &source]);
        assert_eq!(rm.status.code(), Some(0), "{rm:?}");
    }
    assert!(!Path::new(&disk).exists());
    let prune = anvil(&dir, &["images", "prune"]);
    assert!(prune.stdout.starts_with("removed 3 blobs"), "{prune:?}");
}

/// The agent initramfs: $ANVIL_RUN_AGENT, else built by resources/agent/build-initramfs.sh
/// into the build cache.
fn agent_initramfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("ANVIL_RUN_AGENT") {
            return PathBuf::from(path);
        }
        let out = std::env::var_os("ANVIL_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/anvil-cache"))
            .join("agent");
        // A target directory of its own: the build running these tests may hold the lock of
        // the usual one.
        let status = Command::new(repo_root().join("resources/agent/build-initramfs.sh"))
            .arg(&out)
            .env("CARGO_TARGET_DIR", repo_root().join("target/agent-build"))
            .status()
            .expect("run resources/agent/build-initramfs.sh");
        assert!(status.success(), "building the agent initramfs failed");
        out.join("agent-initramfs.cpio.gz")
    })
    .clone()
}

/// The agent binary shipped in the initramfs (its `/init`), copied out with cpio.
fn agent_binary(dir: &LocalDir) -> PathBuf {
    let out = dir.path("anvil-agent");
    let extract = Command::new("sh")
        .arg("-c")
        .arg(r#"gzip -dc "$1" | cpio -i --quiet --to-stdout init > "$2" && chmod 755 "$2""#)
        .arg("sh")
        .arg(agent_initramfs())
        .arg(&out)
        .status()
        .unwrap();
    assert!(
        extract.success(),
        "cannot extract /init from the agent initramfs"
    );
    out
}

/// One `anvil-agent --local` run: PID 1 of a new PID and mount namespace (util-linux unshare)
/// over the unpacked root `lower`, with the spec the way `anvil-vmm run` writes it.
fn run_agent(
    dir: &LocalDir,
    agent: &Path,
    lower: &Path,
    spec: &serde_json::Value,
    stdin: Option<&Path>,
) -> Run {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let spec_path = dir.path(&format!("spec-{n}.json"));
    std::fs::write(&spec_path, serde_json::to_vec(spec).unwrap()).unwrap();
    let scratch = dir.path(&format!("scratch-{n}"));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--mount", "--fork"])
        .arg(agent)
        .arg("--local")
        .args([&spec_path, lower, &scratch]);
    run_with_deadline(with_stdin(cmd, stdin), Duration::from_secs(60))
}

/// A spec as `anvil-vmm run` makes it from `config` (ports unused in local mode).
fn agent_spec(
    config: &RunConfig,
    args: &[&str],
    user: Option<&str>,
    workdir: Option<&str>,
) -> serde_json::Value {
    let mut argv = config.entrypoint.clone().unwrap_or_default();
    if args.is_empty() {
        argv.extend(config.cmd.clone().unwrap_or_default());
    } else {
        argv.extend(args.iter().map(|a| a.to_string()));
    }
    let mut env = config.env.clone().unwrap_or_default();
    env.push("HOME=/root".into());
    serde_json::json!({
        "argv": argv,
        "env": env,
        "workdir": workdir.map(str::to_string).or(config.working_dir.clone()).unwrap(),
        "user": user.map(str::to_string).or(config.user.clone()).unwrap_or_default(),
        "hostname": "agent-test",
        "stdout_port": 0,
        "stderr_port": 0,
        "status_port": 0,
    })
}

/// The guest agent run on this host as PID 1 of new PID and mount namespaces (no VM): over the
/// test image unpacked by the `oci` unpacker, it runs the entrypoint with the image's env,
/// working directory and user (`User` from the image configuration, names resolved in the
/// image's /etc/passwd and /etc/group), brings `lo` up, sets the hostname, keeps the workload's
/// stdout and stderr apart, passes its exit code (0, non-zero, 128 + signal, 127 for a missing
/// program) through, and leaves the unpacked root untouched (writes go to the overlay).
#[test]
fn agent_runs_the_workload_as_pid_1_over_the_unpacked_root() {
    let test = "agent_runs_the_workload_as_pid_1_over_the_unpacked_root";
    let probe = Command::new("unshare")
        .args(["--pid", "--mount", "--fork", "true"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!(
                "SKIPPED {test}: `unshare --pid --mount --fork` is not permitted here (needs root or CAP_SYS_ADMIN): {other:?}"
            );
            return;
        }
    }
    let dir = LocalDir::new("oci-agent");
    let agent = agent_binary(&dir);
    let lower = dir.path("rootfs");
    let mut unpacker = oci::unpack::Unpacker::new(&lower, Default::default()).unwrap();
    for layer in test_layers() {
        unpacker.apply_layer(&layer[..], None).unwrap();
    }
    let config = RunConfig {
        user: Some("nobody".into()),
        ..test_run_config()
    };

    let image_user = run_agent(
        &dir,
        &agent,
        &lower,
        &agent_spec(&config, &[], None, None),
        None,
    );
    let lines: Vec<&str> = image_user.stdout.lines().collect();
    for expected in [
        "greeting=hello-from-the-image",
        "pwd=/work",
        "whiteout=applied",
        "opaque=upper-file ",
        "user=65534",
        "group=65534",
        "hostname=agent-test",
        "lo-flags=0x9",
    ] {
        assert!(
            lines.contains(&expected),
            "missing {expected:?}: {image_user}"
        );
    }
    assert!(
        !image_user.stdout.contains("on-stderr"),
        "stderr leaked into stdout: {image_user}"
    );
    assert_eq!(image_user.stderr.trim(), "on-stderr", "{image_user}");
    assert_eq!(image_user.status.code(), Some(0), "{image_user}");

    // Numeric uid with a named group, a working directory the image lacks, a non-zero exit.
    let flags = run_agent(
        &dir,
        &agent,
        &lower,
        &agent_spec(&config, &["7"], Some("1234:nogroup"), Some("/new/dir")),
        None,
    );
    for expected in ["user=1234", "group=65534", "pwd=/new/dir"] {
        assert!(
            flags.stdout.lines().any(|l| l == expected),
            "missing {expected:?}: {flags}"
        );
    }
    assert_eq!(flags.status.code(), Some(7), "{flags}");
    assert!(
        !lower.join("new").exists(),
        "the run wrote into the unpacked root"
    );

    let shell = RunConfig {
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        ..config.clone()
    };
    let killed = run_agent(
        &dir,
        &agent,
        &lower,
        &agent_spec(&shell, &["kill -KILL $$"], None, None),
        None,
    );
    assert_eq!(killed.status.code(), Some(128 + 9), "{killed}");

    let missing = RunConfig {
        entrypoint: Some(vec!["/no/such/program".into()]),
        ..config.clone()
    };
    let missing = run_agent(
        &dir,
        &agent,
        &lower,
        &agent_spec(&missing, &[], None, None),
        None,
    );
    assert_eq!(missing.status.code(), Some(127), "{missing}");
    assert!(missing.stderr.contains("cannot run"), "{missing}");

    // stdin: the agent's own when the spec has a stdin port (`run -i`), else /dev/null.
    let reader = RunConfig {
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec![
            r#"if read line; then echo "got=$line"; cat; else echo no-input; fi"#.into(),
        ]),
        ..config.clone()
    };
    let input = dir.path("stdin.txt");
    std::fs::write(&input, "first line\nthe rest\n").unwrap();
    let mut with_port = agent_spec(&reader, &[], None, None);
    with_port["stdin_port"] = 1003.into();
    let interactive = run_agent(&dir, &agent, &lower, &with_port, Some(&input));
    assert_eq!(
        interactive.stdout, "got=first line\nthe rest\n",
        "{interactive}"
    );
    let closed = run_agent(
        &dir,
        &agent,
        &lower,
        &agent_spec(&reader, &[], None, None),
        Some(&input),
    );
    assert_eq!(closed.stdout, "no-input\n", "{closed}");

    let unknown = run_agent(
        &dir,
        &agent,
        &lower,
        &agent_spec(&config, &[], Some("nosuchuser"), None),
        None,
    );
    assert_eq!(unknown.status.code(), Some(126), "{unknown}");
    assert!(
        unknown.stderr.contains("no user \"nosuchuser\""),
        "{unknown}"
    );
}

/// `anvil-vmm run [flags] IMAGE [-- workload args]`.
fn run_image(dir: &LocalDir, image: &str, flags: &[&str], workload: &[&str]) -> Run {
    run_image_with_stdin(dir, image, flags, workload, None)
}

fn run_image_with_stdin(
    dir: &LocalDir,
    image: &str,
    flags: &[&str],
    workload: &[&str],
    stdin: Option<&Path>,
) -> Run {
    let kernel = linux_guest_dir().join("vmlinux");
    let agent = agent_initramfs();
    let mut args = vec![
        "run",
        "--rm",
        "--kernel",
        kernel.to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    args.push(image);
    if !workload.is_empty() {
        args.push("--");
        args.extend_from_slice(workload);
    }
    anvil_with_stdin(dir, &args, stdin)
}

fn assert_report(run: &Run, code: i32) {
    let lines: Vec<&str> = run.stdout.lines().collect();
    for expected in [
        "greeting=hello-from-the-image",
        "pwd=/work",
        "whiteout=applied",
        "opaque=upper-file ",
        "user=0",
        "lo-flags=0x9",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?}: {run:?}");
    }
    assert!(
        !run.stdout.contains("on-stderr"),
        "stderr leaked into stdout: {run:?}"
    );
    assert!(run.stderr.contains("on-stderr"), "{run:?}");
    assert_eq!(run.status.code(), Some(code), "{run:?}");
}

/// `run` boots the image as a microVM from a registry, an OCI layout and a docker archive: the
/// entrypoint's stdout and stderr come back separately, its exit code (0 and non-zero)
/// becomes anvil-vmm's, and with the registry stopped the next run comes from the cache.
#[test]
fn run_boots_the_image_from_registry_layout_archive_and_cache() {
    if !linux_capable("run_boots_the_image_from_registry_layout_archive_and_cache") {
        return;
    }
    let dir = LocalDir::new("oci-run");
    let mut src = sources(&dir);
    let reference = src.registry.reference();

    let first = run_image(&dir, &reference, &[], &[]);
    assert_report(&first, 0);
    let failing = run_image(&dir, &reference, &[], &["7"]);
    assert_report(&failing, 7);

    // From the cache: the registry is gone.
    src.registry.stop();
    let cached = run_image(
        &dir,
        &reference,
        &[
            "--env",
            "GREETING=overridden",
            "--workdir",
            "/tmp",
            "--user",
            "65534",
        ],
        &["3"],
    );
    assert!(
        cached.stdout.lines().any(|l| l == "greeting=overridden"),
        "{cached:?}"
    );
    assert!(cached.stdout.lines().any(|l| l == "pwd=/tmp"), "{cached:?}");
    assert!(
        cached.stdout.lines().any(|l| l == "user=65534"),
        "{cached:?}"
    );
    assert_eq!(cached.status.code(), Some(3), "{cached:?}");

    for source in [&src.layout, &src.archive] {
        let run = run_image(&dir, source, &[], &[]);
        assert_report(&run, 0);
    }
    // -i: the workload reads anvil-vmm's stdin to its end.
    let input = dir.path("stdin.txt");
    std::fs::write(&input, "line one\nline two\n").unwrap();
    let interactive = run_image_with_stdin(
        &dir,
        &src.layout,
        &["-i", "--entrypoint", "/bin/sh"],
        &["-c", "while read l; do echo \"stdin=$l\"; done; echo eof"],
        Some(&input),
    );
    assert_eq!(
        interactive.stdout, "stdin=line one\nstdin=line two\neof\n",
        "{interactive:?}"
    );
    assert_eq!(interactive.status.code(), Some(0), "{interactive:?}");
    // A command that does not exist: 127, and the agent says why on stderr.
    let missing = run_image(
        &dir,
        &src.layout,
        &["--entrypoint", "/no/such/program"],
        &[],
    );
    assert_eq!(missing.status.code(), Some(127), "{missing:?}");
    assert!(missing.stderr.contains("cannot run"), "{missing:?}");
}

/// `--net` with `--ip` and `--gateway`: the agent configures eth0 before the workload starts,
/// which then reaches the host end of the tap (in a network namespace of the test's) with ping
/// and sees its address and default route.
#[test]
fn run_configures_eth0_from_ip_and_gateway() {
    if !linux_capable("run_configures_eth0_from_ip_and_gateway") {
        return;
    }
    let dir = LocalDir::new("oci-net");
    test_image().write_layout(&dir.path("layout"), TAG).unwrap();
    let ns = NetNs::new(); // tap at 10.0.0.1/24
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(anvil_vmm())
        .arg("run")
        .arg("--data-dir")
        .arg(dir.path("data"))
        .args(["--rm", "--kernel"])
        .arg(linux_guest_dir().join("vmlinux"))
        .arg("--agent")
        .arg(agent_initramfs())
        .args(["--net", &format!("tap={}", ns.tap)])
        .args(["--ip", "10.0.0.2/24", "--gateway", "10.0.0.1"])
        .args(["--entrypoint", "/bin/sh"])
        .arg(format!("oci:{}:{TAG}", dir.path("layout").display()))
        .args([
            "--",
            "-c",
            "ip addr show eth0; ip route; ping -c 1 -W 20 10.0.0.1",
        ])
        .env("TMPDIR", &dir.dir.0)
        .env("ANVIL_LOG", "warn");
    let run = run_with_deadline(cmd, RUN_TIMEOUT);
    assert!(run.stdout.contains("inet 10.0.0.2/24"), "{run:?}");
    assert!(run.stdout.contains("default via 10.0.0.1"), "{run:?}");
    assert!(run.stdout.contains("1 packets received"), "{run:?}");
    assert_eq!(run.status.code(), Some(0), "{run:?}");

    // --ip needs --net; a bad address is a usage error.
    let no_net = anvil(&dir, &["run", "--ip", "10.0.0.2/24", "oci:/nowhere"]);
    assert_eq!(no_net.status.code(), Some(2), "{no_net:?}");
    let bad = anvil(
        &dir,
        &["run", "--net", "tap=x", "--ip", "10.0.0.2", "oci:/nowhere"],
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(bad.stderr.contains("invalid --ip"), "{bad:?}");
}

/// `anvil-vmm run --rm` of `script` in the test image, with stdout read line by line; returns
/// once the workload printed `started`.
fn start_script(
    dir: &LocalDir,
    script: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let kernel = linux_guest_dir().join("vmlinux");
    let mut child = Command::new(anvil_vmm())
        .arg("run")
        .arg("--data-dir")
        .arg(dir.path("data"))
        .args(["--rm", "--entrypoint", "/bin/sh", "--kernel"])
        .arg(&kernel)
        .arg("--agent")
        .arg(agent_initramfs())
        .arg(format!("oci:{}:{TAG}", dir.path("layout").display()))
        .args(["--", "-c", script])
        .env("TMPDIR", &dir.dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "started" => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("the workload did not start");
            }
        }
    }
    (child, rx)
}

fn sigint(child: &std::process::Child) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
}

fn wait_within(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("anvil-vmm run did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_leftovers(dir: &LocalDir) {
    let runs = std::fs::read_dir(dir.path("data/runs")).unwrap().count();
    assert_eq!(runs, 0, "the run's directory was not removed");
    let leftovers: Vec<_> = std::fs::read_dir(&dir.dir.0)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("anvil-run-"))
        .collect();
    assert!(leftovers.is_empty(), "socket directory left behind");
}

/// Ctrl-C goes to the workload, as with `docker run`: a workload that traps SIGINT runs its
/// handler and its exit code comes back; one killed by it gives 130; one that ignores it is
/// stopped, with the VM, by a second Ctrl-C (130). Each time the run's files (--rm) are gone.
#[test]
fn run_forwards_ctrl_c_to_the_workload() {
    if !linux_capable("run_forwards_ctrl_c_to_the_workload") {
        return;
    }
    let dir = LocalDir::new("oci-sigint");
    test_image().write_layout(&dir.path("layout"), TAG).unwrap();

    let (mut child, lines) = start_script(
        &dir,
        r#"trap 'echo got-int; exit 5' INT; echo started; while :; do sleep 1; done"#,
    );
    sigint(&child);
    let status = wait_within(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(5));
    let rest: Vec<String> = lines.iter().collect();
    assert!(rest.iter().any(|l| l == "got-int"), "{rest:?}");
    assert_no_leftovers(&dir);

    let (mut child, _lines) = start_script(&dir, "echo started; sleep 600");
    sigint(&child);
    assert_eq!(
        wait_within(&mut child, Duration::from_secs(60)).code(),
        Some(130)
    );
    assert_no_leftovers(&dir);

    let (mut child, _lines) =
        start_script(&dir, "trap '' INT; echo started; while :; do sleep 1; done");
    sigint(&child);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "one Ctrl-C stopped a workload that ignores it"
    );
    sigint(&child);
    assert_eq!(
        wait_within(&mut child, Duration::from_secs(30)).code(),
        Some(130)
    );
    assert_no_leftovers(&dir);
}
