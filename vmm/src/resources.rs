//! The VM's resources as Firecracker's API and configuration file describe them: the JSON
//! bodies of `PUT /boot-source`, `/machine-config`, `/drives/{id}`, `/network-interfaces/{id}`,
//! `/vsock`, `/entropy`, `/logger`, `/metrics` and `/cpu-config`, and the store they build up
//! before `InstanceStart` turns them into a [`VmConfig`].
//!
//! Field names, defaults and limits follow Firecracker's OpenAPI document; unknown fields are
//! refused, and every update is validated in full before anything changes.

use std::path::{Path, PathBuf};

use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use serde::{Deserialize, Serialize};

use crate::config::{
    parse_mac, validate_vcpu_count, BootProtocolChoice, ConfigError, CpuTemplateSource, DiskConfig,
    NetConfig, VmConfig, VsockConfig, MAX_DISK_ID_LEN, MAX_MEM_SIZE_MIB,
};

/// A token bucket as Firecracker's API writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// A one-time extra budget spent before refilling starts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub one_time_burst: u64,
    /// Milliseconds for the bucket to refill from empty.
    pub refill_time: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A rate limiter: a bandwidth (bytes) and an operations bucket, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Requests or frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// The device-level configuration (a bucket of size or refill time 0 is no limit).
    pub fn to_config(self) -> RateLimiterConfig {
        let bucket = |b: Option<TokenBucket>| {
            b.map(|b| TokenBucketConfig {
                size: b.size,
                one_time_burst: b.one_time_burst,
                refill_time_ms: b.refill_time,
            })
            .filter(|b| b.size != 0 && b.refill_time_ms != 0)
            .unwrap_or_default()
        };
        RateLimiterConfig {
            bandwidth: bucket(self.bandwidth),
            ops: bucket(self.ops),
        }
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: PathBuf,
    /// The kernel command line; anvil's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// Huge page backing of guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (madvise).
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `GET|PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u64,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (two threads per core in the guest's topology).
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A static CPU template name; anvil takes custom templates through `PUT /cpu-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u64>,
    /// Guest RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT.
    pub smt: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Static CPU template.
    pub cpu_template: Option<String>,
    /// Huge pages.
    pub huge_pages: Option<HugePages>,
}

/// Block device cache strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are not announced to the guest.
    #[default]
    Unsafe,
    /// The guest may flush (VIRTIO_BLK_F_FLUSH; anvil always offers it).
    Writeback,
}

/// Block I/O engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O on the device's own thread.
    #[default]
    Sync,
    /// io_uring in Firecracker; anvil serves it with its device thread too.
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's ID (also its serial for the guest).
    pub drive_id: String,
    /// The raw image.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// Root device: `root=/dev/vda` is added to the command line and the drive comes first.
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: Option<bool>,
    /// Partition UUID of the root partition (used as `root=PARTUUID=...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Cache type.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user socket (not supported by anvil).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's ID.
    pub drive_id: String,
    /// A new backing file.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// A new rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's ID.
    pub iface_id: String,
    /// The host tap.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU announced to the guest (not supported by anvil's device: refused when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's ID.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The host Unix socket.
    pub uds_path: PathBuf,
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter (anvil's rng device is not rate limited: refused when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Log levels as Firecracker names them (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings.
    Warning,
    /// Information.
    Info,
    /// Debugging.
    Debug,
    /// Tracing.
    Trace,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warning" | "warn" => Self::Warning,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown log level {text:?}: expected Error, Warning, Info, Debug, Trace or Off"
                )))
            }
        })
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// A file or named pipe for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level.
    #[serde(default)]
    pub show_level: bool,
    /// Print the source file and line.
    #[serde(default)]
    pub show_log_origin: bool,
    /// Only log messages of this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// A file or named pipe for the metrics lines.
    pub metrics_path: PathBuf,
    /// Emit the instance id on each line.
    #[serde(default)]
    pub emit_id: bool,
    /// Operator key-value pairs emitted on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// Firecracker's configuration file and `GET /vm/config`: every resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// Boot source.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Custom CPU template.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<serde_json::Value>,
    /// Drives.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Machine configuration.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// Entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// Logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Balloon (not supported: refused when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    /// MMDS (not supported: refused when present).
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<serde_json::Value>,
    /// virtio-pmem devices (not supported: only an empty list is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<Vec<serde_json::Value>>,
    /// Memory hotplug (not supported: refused when present).
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<serde_json::Value>,
}

/// A resource update that is wrong; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    /// A value is out of range or malformed.
    #[error("{field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A file does not exist or cannot be used.
    #[error("{field}: cannot use {}: {why}", .path.display())]
    Path {
        /// The field.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The ID in the body differs from the one in the path.
    #[error(
        "the {field} in the request body ({body:?}) does not match the one in the path ({path:?})"
    )]
    IdMismatch {
        /// The field.
        field: &'static str,
        /// From the body.
        body: String,
        /// From the path.
        path: String,
    },
    /// A feature anvil does not have.
    #[error("{0} is not supported by anvil")]
    Unsupported(&'static str),
    /// The boot source is missing at InstanceStart.
    #[error("cannot start the microVM without a boot source: PUT /boot-source first")]
    NoBootSource,
    /// The assembled configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn invalid(field: &'static str, why: impl Into<String>) -> ResourceError {
    ResourceError::Invalid {
        field,
        why: why.into(),
    }
}

/// Checks that `path` is an existing regular file that can be opened.
fn check_file(field: &'static str, path: &Path, write: bool) -> Result<(), ResourceError> {
    let fail = |why: String| ResourceError::Path {
        field,
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.is_dir() {
        return Err(fail("it is a directory".into()));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

fn check_id(field: &'static str, id: &str) -> Result<(), ResourceError> {
    if id.is_empty()
        || id.len() > MAX_DISK_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            field,
            format!("{id:?} must be 1 to {MAX_DISK_ID_LEN} letters, digits, '_' or '-'"),
        ));
    }
    Ok(())
}

/// Checks a rate limiter's values.
pub fn check_rate_limiter(
    field: &'static str,
    rl: Option<&RateLimiter>,
) -> Result<(), ResourceError> {
    let Some(rl) = rl else { return Ok(()) };
    for bucket in [rl.bandwidth, rl.ops].into_iter().flatten() {
        // A refill time beyond a day is almost certainly a unit mistake (seconds for ms).
        if bucket.refill_time > 86_400_000 {
            return Err(invalid(
                field,
                format!("refill_time {} ms is longer than a day", bucket.refill_time),
            ));
        }
    }
    Ok(())
}

/// Checks that the tap `name` exists.
pub(crate) fn check_tap(name: &str) -> Result<(), ResourceError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
        return Err(invalid(
            "host_dev_name",
            format!("{name:?} is not a valid interface name"),
        ));
    }
    let sys = Path::new("/sys/class/net").join(name);
    if !sys.join("tun_flags").exists() {
        return Err(invalid(
            "host_dev_name",
            format!("there is no tap device named {name:?} on the host"),
        ));
    }
    Ok(())
}

fn validate_machine(m: &MachineConfig) -> Result<(), ResourceError> {
    validate_vcpu_count(m.vcpu_count).map_err(|e| invalid("vcpu_count", e.to_string()))?;
    if m.smt && m.vcpu_count > 1 && !m.vcpu_count.is_multiple_of(2) {
        return Err(invalid(
            "vcpu_count",
            "with smt enabled the vCPU count must be 1 or even",
        ));
    }
    if m.mem_size_mib == 0 {
        return Err(invalid("mem_size_mib", "must be at least 1"));
    }
    if m.mem_size_mib > MAX_MEM_SIZE_MIB {
        return Err(invalid(
            "mem_size_mib",
            format!(
                "{} is larger than the maximum of {MAX_MEM_SIZE_MIB}",
                m.mem_size_mib
            ),
        ));
    }
    arch::memory::guest_memory_regions(m.mem_size_mib << 20)
        .map_err(|e| invalid("mem_size_mib", e.to_string()))?;
    if let Some(t) = m.cpu_template.as_deref() {
        if t != "None" {
            return Err(invalid(
                "cpu_template",
                format!("static template {t:?} is not supported: use PUT /cpu-config with a custom template"),
            ));
        }
    }
    if m.huge_pages != HugePages::None {
        return Err(ResourceError::Unsupported("huge_pages other than None"));
    }
    Ok(())
}

/// Snapshot type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the state goes.
    pub snapshot_path: PathBuf,
    /// Where guest memory goes.
    pub mem_file_path: PathBuf,
}

/// How guest memory is provided on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// A private mapping of the memory file.
    File,
    /// A userfaultfd page-fault handler process.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file, or the handler's socket.
    pub backend_path: PathBuf,
}

/// A tap replacing an interface's on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// The new tap.
    pub host_dev_name: String,
}

/// A vsock socket path replacing the saved one on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new path.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file (deprecated in favour of `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Track dirty pages for diff snapshots (deprecated name).
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Track dirty pages for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Run the VM once loaded (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Taps replacing the saved ones.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// A vsock path replacing the saved one.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's realtime clock by the time the VM was stopped.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages for the restored memory.
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

/// Everything configured so far, before the VM starts.
#[derive(Debug, Clone, Default)]
pub struct VmResources {
    /// Boot source.
    pub boot_source: Option<BootSource>,
    /// Machine configuration.
    pub machine: MachineConfig,
    /// Custom CPU template (Firecracker's custom template JSON).
    pub cpu_config: Option<serde_json::Value>,
    /// Drives, in the order they were added.
    pub drives: Vec<Drive>,
    /// Network interfaces.
    pub nets: Vec<NetworkInterface>,
    /// vsock.
    pub vsock: Option<Vsock>,
    /// Entropy device.
    pub entropy: Option<EntropyDevice>,
    /// Logger.
    pub logger: Option<Logger>,
    /// Metrics.
    pub metrics: Option<Metrics>,
    /// The KVM device node.
    pub kvm_device: Option<PathBuf>,
    /// Seccomp filtering of the VM's threads (a command-line choice, not an API resource).
    pub seccomp_level: crate::seccomp::SeccompLevel,
}

impl VmResources {
    /// Resources from Firecracker's configuration file format; every part is validated as
    /// the matching API call would be.
    pub fn from_full_config(full: FullVmConfiguration) -> Result<Self, ResourceError> {
        if full.balloon.is_some() {
            return Err(ResourceError::Unsupported("the balloon device"));
        }
        if full.mmds_config.is_some() {
            return Err(ResourceError::Unsupported("MMDS"));
        }
        if full.pmem.is_some_and(|p| !p.is_empty()) {
            return Err(ResourceError::Unsupported("virtio-pmem"));
        }
        if full.memory_hotplug.is_some() {
            return Err(ResourceError::Unsupported("memory hotplug"));
        }
        let mut res = Self::default();
        if let Some(b) = full.boot_source {
            res.set_boot_source(b)?;
        }
        if let Some(m) = full.machine_config {
            res.set_machine_config(m)?;
        }
        if let Some(c) = full.cpu_config {
            res.set_cpu_config(c)?;
        }
        for d in full.drives {
            let id = d.drive_id.clone();
            res.put_drive(&id, d)?;
        }
        for n in full.network_interfaces {
            let id = n.iface_id.clone();
            res.put_net(&id, n)?;
        }
        if let Some(v) = full.vsock {
            res.set_vsock(v)?;
        }
        if let Some(e) = full.entropy {
            res.set_entropy(e)?;
        }
        res.logger = full.logger;
        res.metrics = full.metrics;
        Ok(res)
    }

    /// The resources of a VM restored from a snapshot, as saved: nothing is re-checked (the
    /// kernel that booted it need not exist here).
    pub fn from_saved(full: FullVmConfiguration) -> Self {
        Self {
            boot_source: full.boot_source,
            machine: full.machine_config.unwrap_or_default(),
            cpu_config: full.cpu_config,
            drives: full.drives,
            nets: full.network_interfaces,
            vsock: full.vsock,
            entropy: full.entropy,
            logger: full.logger,
            metrics: full.metrics,
            kvm_device: None,
            seccomp_level: crate::seccomp::SeccompLevel::default(),
        }
    }

    /// `GET /vm/config`.
    pub fn full_config(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot_source.clone(),
            cpu_config: self.cpu_config.clone(),
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            balloon: None,
            mmds_config: None,
            pmem: None,
            memory_hotplug: None,
        }
    }

    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), ResourceError> {
        check_file("kernel_image_path", &b.kernel_image_path, false)?;
        if let Some(initrd) = &b.initrd_path {
            check_file("initrd_path", initrd, false)?;
        }
        if let Some(args) = &b.boot_args {
            let max = arch::layout::CMDLINE_MAX_SIZE - 1;
            if args.len() > max {
                return Err(invalid(
                    "boot_args",
                    format!("{} bytes, longer than the maximum of {max}", args.len()),
                ));
            }
            if let Some(pos) = args.bytes().position(|c| !(0x20..0x7f).contains(&c)) {
                return Err(invalid(
                    "boot_args",
                    format!("non-printable or non-ASCII character at byte {pos}"),
                ));
            }
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT /machine-config`.
    pub fn set_machine_config(&mut self, m: MachineConfig) -> Result<(), ResourceError> {
        validate_machine(&m)?;
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn update_machine_config(&mut self, u: MachineConfigUpdate) -> Result<(), ResourceError> {
        let mut m = self.machine.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.cpu_template {
            m.cpu_template = Some(v);
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        self.set_machine_config(m)
    }

    /// `PUT /cpu-config`: a Firecracker custom CPU template.
    pub fn set_cpu_config(&mut self, c: serde_json::Value) -> Result<(), ResourceError> {
        arch::template::CpuTemplate::from_json(&c.to_string())
            .map_err(|e| invalid("cpu-config", e.to_string()))?;
        self.cpu_config = Some(c);
        Ok(())
    }

    /// `PUT /drives/{id}`: adds or replaces a drive.
    pub fn put_drive(&mut self, path_id: &str, d: Drive) -> Result<(), ResourceError> {
        if d.drive_id != path_id {
            return Err(ResourceError::IdMismatch {
                field: "drive_id",
                body: d.drive_id,
                path: path_id.to_string(),
            });
        }
        check_id("drive_id", &d.drive_id)?;
        if d.socket.is_some() {
            return Err(ResourceError::Unsupported("vhost-user-block (socket)"));
        }
        let path = d
            .path_on_host
            .as_deref()
            .ok_or_else(|| invalid("path_on_host", "is required"))?;
        check_file("path_on_host", path, !d.is_read_only.unwrap_or(false))?;
        check_rate_limiter("rate_limiter", d.rate_limiter.as_ref())?;
        if let Some(p) = &d.partuuid {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                return Err(invalid(
                    "partuuid",
                    format!("{p:?} is not a partition UUID"),
                ));
            }
        }
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(invalid(
                "is_root_device",
                "a root block device already exists",
            ));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => {
                self.check_device_room()?;
                self.drives.push(d);
            }
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds or replaces an interface.
    pub fn put_net(&mut self, path_id: &str, n: NetworkInterface) -> Result<(), ResourceError> {
        if n.iface_id != path_id {
            return Err(ResourceError::IdMismatch {
                field: "iface_id",
                body: n.iface_id,
                path: path_id.to_string(),
            });
        }
        check_id("iface_id", &n.iface_id)?;
        if n.mtu.is_some() {
            return Err(ResourceError::Unsupported("mtu"));
        }
        if let Some(mac) = &n.guest_mac {
            let parsed = parse_mac(mac)
                .ok_or_else(|| invalid("guest_mac", format!("{mac:?} is not a MAC address")))?;
            if parsed[0] & 1 != 0 {
                return Err(invalid(
                    "guest_mac",
                    format!("{mac} is a multicast address"),
                ));
            }
            if self.nets.iter().any(|o| {
                o.iface_id != n.iface_id
                    && o.guest_mac.as_deref().and_then(parse_mac) == Some(parsed)
            }) {
                return Err(invalid("guest_mac", format!("{mac} is already in use")));
            }
        }
        check_tap(&n.host_dev_name)?;
        if self
            .nets
            .iter()
            .any(|o| o.iface_id != n.iface_id && o.host_dev_name == n.host_dev_name)
        {
            return Err(invalid(
                "host_dev_name",
                format!("tap {:?} is already in use", n.host_dev_name),
            ));
        }
        check_rate_limiter("rx_rate_limiter", n.rx_rate_limiter.as_ref())?;
        check_rate_limiter("tx_rate_limiter", n.tx_rate_limiter.as_ref())?;
        match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(slot) => *slot = n,
            None => {
                self.check_device_room()?;
                self.nets.push(n);
            }
        }
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), ResourceError> {
        if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
            return Err(invalid(
                "guest_cid",
                format!("{} is reserved: it must be 3 to 4294967295", v.guest_cid),
            ));
        }
        let parent = v
            .uds_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(ResourceError::Path {
                field: "uds_path",
                path: v.uds_path.clone(),
                why: "its directory does not exist".into(),
            });
        }
        if self.vsock.is_none() {
            self.check_device_room()?;
        }
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: EntropyDevice) -> Result<(), ResourceError> {
        if e.rate_limiter.is_some_and(|r| r != RateLimiter::default()) {
            return Err(ResourceError::Unsupported(
                "a rate limiter on the entropy device",
            ));
        }
        if self.entropy.is_none() {
            self.check_device_room()?;
        }
        self.entropy = Some(e);
        Ok(())
    }

    fn check_device_room(&self) -> Result<(), ResourceError> {
        let max = (arch::layout::IRQ_MAX - arch::layout::IRQ_BASE + 1) as usize;
        let used = self.drives.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy.is_some());
        if used >= max {
            return Err(ResourceError::Config(ConfigError::TooManyDevices(max)));
        }
        Ok(())
    }

    /// The VM configuration `InstanceStart` builds: the root drive first (it is vda).
    pub fn vm_config(&self) -> Result<VmConfig, ResourceError> {
        let boot = self
            .boot_source
            .as_ref()
            .ok_or(ResourceError::NoBootSource)?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        let mut disks = Vec::new();
        for d in drives {
            let read_only = d.is_read_only.unwrap_or(false);
            let mut root = d.is_root_device;
            if root {
                if let Some(uuid) = &d.partuuid {
                    // The partition, not the whole disk, is the root.
                    let mode = if read_only { "ro" } else { "rw" };
                    cmdline.push_str(&format!(" root=PARTUUID={uuid} {mode}"));
                    root = false;
                }
            }
            disks.push(DiskConfig {
                path: d.path_on_host.clone().unwrap_or_default(),
                read_only,
                root,
                id: d.drive_id.clone(),
                rate_limit: d.rate_limiter.unwrap_or_default().to_config(),
            });
        }
        let nets = self
            .nets
            .iter()
            .map(|n| NetConfig {
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.as_deref().and_then(parse_mac),
                rx_rate: n.rx_rate_limiter.unwrap_or_default().to_config(),
                tx_rate: n.tx_rate_limiter.unwrap_or_default().to_config(),
                id: Some(n.iface_id.clone()),
            })
            .collect();
        let config = VmConfig {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            cmdline,
            vcpu_count: validate_vcpu_count(self.machine.vcpu_count)?,
            mem_size_mib: self.machine.mem_size_mib,
            cpu_template: self
                .cpu_config
                .as_ref()
                .map(|c| CpuTemplateSource::Inline(c.to_string())),
            boot_protocol: BootProtocolChoice::Auto,
            kvm_device: self
                .kvm_device
                .clone()
                .unwrap_or_else(|| PathBuf::from("/dev/kvm")),
            rng: self.entropy.is_some(),
            disks,
            nets,
            vsock: self.vsock.as_ref().map(|v| VsockConfig {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
            }),
            seccomp_level: self.seccomp_level,
            // The controller opens the metrics output itself (PUT /metrics comes before boot).
            metrics_path: None,
            track_dirty_pages: self.machine.track_dirty_pages,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn kernel() -> tempfile_path::TempFile {
        tempfile_path::TempFile::new("kernel")
    }

    /// A small self-deleting temp file, enough for path checks.
    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new(tag: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "anvil-res-{tag}-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::write(&path, b"x").unwrap();
                Self(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn machine_config_is_validated_as_a_whole() {
        let mut r = VmResources::default();
        let bad: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 0, "mem_size_mib": 256}"#).unwrap();
        let e = r.set_machine_config(bad).unwrap_err();
        assert!(e.to_string().starts_with("vcpu_count"), "{e}");
        assert_eq!(r.machine, MachineConfig::default());
        let e = r
            .update_machine_config(MachineConfigUpdate {
                mem_size_mib: Some(0),
                vcpu_count: Some(2),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("mem_size_mib"), "{e}");
        assert_eq!(r.machine.vcpu_count, 1);
        r.update_machine_config(MachineConfigUpdate {
            vcpu_count: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.machine.vcpu_count, 2);
        assert_eq!(r.machine.mem_size_mib, 128);
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": "one", "mem_size_mib": 128}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": -1, "mem_size_mib": 1}"#)
                .is_err()
        );
    }

    #[test]
    fn drives_check_ids_files_and_the_single_root() {
        let k = kernel();
        let mut r = VmResources::default();
        let drive = |id: &str, root: bool, path: &Path| Drive {
            drive_id: id.into(),
            path_on_host: Some(path.to_path_buf()),
            is_root_device: root,
            is_read_only: Some(false),
            partuuid: None,
            cache_type: CacheType::Unsafe,
            rate_limiter: None,
            io_engine: IoEngine::Sync,
            socket: None,
        };
        assert!(matches!(
            r.put_drive("a", drive("b", false, &k.0)),
            Err(ResourceError::IdMismatch { .. })
        ));
        assert!(matches!(
            r.put_drive("x", drive("x", false, Path::new("/nonexistent/disk"))),
            Err(ResourceError::Path { .. })
        ));
        r.put_drive("rootfs", drive("rootfs", true, &k.0)).unwrap();
        let e = r
            .put_drive("other", drive("other", true, &k.0))
            .unwrap_err();
        assert!(e.to_string().contains("root block device already exists"));
        r.put_drive("data", drive("data", false, &k.0)).unwrap();
        // Replacing keeps the order and count.
        r.put_drive("rootfs", drive("rootfs", true, &k.0)).unwrap();
        assert_eq!(r.drives.len(), 2);
        r.set_boot_source(BootSource {
            kernel_image_path: k.0.clone(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: None,
        })
        .unwrap();
        let c = r.vm_config().unwrap();
        assert_eq!(c.disks[0].id, "rootfs");
        assert!(c.disks[0].root);
    }

    #[test]
    fn instance_start_needs_a_boot_source() {
        assert_eq!(
            VmResources::default().vm_config().unwrap_err(),
            ResourceError::NoBootSource
        );
    }

    #[test]
    fn vsock_cid_and_boot_args_are_checked() {
        let mut r = VmResources::default();
        let e = r
            .set_vsock(Vsock {
                guest_cid: 2,
                uds_path: "/tmp/v.sock".into(),
                vsock_id: None,
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("guest_cid"));
        let k = kernel();
        let e = r
            .set_boot_source(BootSource {
                kernel_image_path: k.0.clone(),
                boot_args: Some("a\u{1}b".into()),
                initrd_path: None,
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("boot_args"));
        assert!(r.boot_source.is_none());
    }

    #[test]
    fn full_configuration_round_trips() {
        let k = kernel();
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256}},
                "drives": [], "network-interfaces": [],
                "entropy": {{}},
                "logger": {{"level": "warning"}}}}"#,
            k.0.display()
        );
        let full: FullVmConfiguration = serde_json::from_str(&text).unwrap();
        let r = VmResources::from_full_config(full).unwrap();
        assert_eq!(r.machine.vcpu_count, 2);
        assert!(r.entropy.is_some());
        let back = serde_json::to_value(r.full_config()).unwrap();
        assert_eq!(back["machine-config"]["mem_size_mib"], 256);
        assert_eq!(back["logger"]["level"], "Warning");
        let c = r.vm_config().unwrap();
        assert!(c.rng);
        assert_eq!(c.mem_size_mib, 256);
    }

    #[test]
    fn rate_limiter_zero_buckets_mean_no_limit() {
        let rl: RateLimiter = serde_json::from_str(
            r#"{"bandwidth": {"size": 0, "refill_time": 100}, "ops": {"size": 10, "refill_time": 100, "one_time_burst": 5}}"#,
        )
        .unwrap();
        let c = rl.to_config();
        assert_eq!(c.bandwidth, TokenBucketConfig::default());
        assert_eq!(c.ops.size, 10);
        assert_eq!(c.ops.one_time_burst, 5);
    }
}
