//! Metrics: the registry of every counter of a VM, written as Firecracker's JSON lines (to a
//! file or named pipe, on `FlushMetrics` and every [`PERIODIC_FLUSH`]) and as Prometheus text
//! (`GET /metrics/prometheus`, an Anvil extension).
//!
//! Counters live where they are bumped (devices own theirs, vCPUs theirs, the API server uses
//! the process-wide [`api()`]), as plain atomics: counting never locks. The JSON lines carry,
//! as Firecracker's do, the change of each counter since the previous line (values that are
//! set rather than counted, like the boot time, are reported as they are); Prometheus gets the
//! running totals, which only grow.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devices::metrics::{
    BlockMetrics, Counter, EntropyMetrics, Gauge, I8042Metrics, NetMetrics, SerialMetrics,
    VsockMetrics,
};
use serde_json::{Map, Value};

/// How often the metrics line is written without being asked (Firecracker's period).
pub const PERIODIC_FLUSH: Duration = Duration::from_secs(60);

/// Errors of the metrics output.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics file or pipe cannot be opened.
    #[error("cannot open the metrics file {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// Writing a line failed.
    #[error("cannot write metrics to {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
}

/// One vCPU's exits by kind.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: Counter,
    /// Port writes.
    pub exit_io_out: Counter,
    /// MMIO reads.
    pub exit_mmio_read: Counter,
    /// MMIO writes.
    pub exit_mmio_write: Counter,
    /// HLT exits (with the in-kernel LAPIC, a halt for good).
    pub exit_hlt: Counter,
    /// Exits that stopped the vCPU with an error (entry failure, internal error, KVM_RUN
    /// failure, triple fault).
    pub failures: Counter,
}

impl VcpuMetrics {
    fn counters(&self) -> Vec<(&'static str, &Counter)> {
        vec![
            ("exit_io_in", &self.exit_io_in),
            ("exit_io_out", &self.exit_io_out),
            ("exit_mmio_read", &self.exit_mmio_read),
            ("exit_mmio_write", &self.exit_mmio_write),
            ("exit_hlt", &self.exit_hlt),
            ("failures", &self.failures),
        ]
    }
}

/// The API endpoint families counted, by Firecracker's metric name (and the path they serve).
const API_FAMILIES: [(&str, &str); 16] = [
    ("instance_info", "/"),
    ("vmm_version", "/version"),
    ("machine_cfg", "/machine-config"),
    ("vm_config", "/vm/config"),
    ("boot_source", "/boot-source"),
    ("cpu_cfg", "/cpu-config"),
    ("drive", "/drives"),
    ("network", "/network-interfaces"),
    ("vsock", "/vsock"),
    ("entropy", "/entropy"),
    ("logger", "/logger"),
    ("metrics", "/metrics"),
    ("prometheus", "/metrics/prometheus"),
    ("actions", "/actions"),
    ("vm", "/vm"),
    ("other", ""),
];
const API_METHODS: [&str; 4] = ["GET", "PUT", "PATCH", "OTHER"];
const API_SLOTS: usize = API_FAMILIES.len() * API_METHODS.len();

/// API request counters, process-wide; see [`api()`].
#[derive(Debug)]
pub struct ApiMetrics {
    requests: [Counter; API_SLOTS],
    fails: [Counter; API_SLOTS],
    /// Microseconds from process start until the API served (Firecracker's
    /// `process_startup_time_us`).
    pub process_startup_time_us: Gauge,
}

/// The family index of a request path.
fn api_family(path: &str) -> usize {
    let path = path.split('?').next().unwrap_or(path);
    let path = path.trim_end_matches('/');
    let last = API_FAMILIES.len() - 1;
    if path.is_empty() {
        return 0;
    }
    // Longest prefix match on whole segments (`/drives/{id}` is `/drives`).
    API_FAMILIES[1..last]
        .iter()
        .enumerate()
        .filter(|(_, (_, prefix))| {
            path == *prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|(_, (_, prefix))| prefix.len())
        .map_or(last, |(i, _)| i + 1)
}

fn api_method(method: &str) -> usize {
    API_METHODS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(method))
        .unwrap_or(API_METHODS.len() - 1)
}

impl ApiMetrics {
    const fn new() -> Self {
        Self {
            requests: [const { Counter::new() }; API_SLOTS],
            fails: [const { Counter::new() }; API_SLOTS],
            process_startup_time_us: Gauge::new(),
        }
    }

    /// Counts one request with its HTTP `method`, request `path` and response `status`
    /// (4xx and 5xx are failures).
    pub fn record(&self, method: &str, path: &str, status: u16) {
        let slot = api_method(method) * API_FAMILIES.len() + api_family(path);
        self.requests[slot].inc();
        if status >= 400 {
            self.fails[slot].inc();
        }
    }
}

static API: ApiMetrics = ApiMetrics::new();
/// SIGSYS seen (the process dies right after; Firecracker's `seccomp.num_faults`).
pub(crate) static SECCOMP_FAULTS: AtomicU64 = AtomicU64::new(0);

/// The process-wide API counters: the API server calls `api().record(method, path, status)`
/// once per response.
pub fn api() -> &'static ApiMetrics {
    &API
}

/// Timings of VM operations, in microseconds (Firecracker's `latencies_us`).
#[derive(Debug, Default)]
pub struct LatencyMetrics {
    /// The last pause took this long.
    pub pause_vm: Gauge,
    /// The last resume took this long.
    pub resume_vm: Gauge,
}

/// Every metric of one VM.
#[derive(Debug, Default)]
pub struct Registry {
    blocks: Vec<(String, Arc<BlockMetrics>)>,
    nets: Vec<(String, Arc<NetMetrics>)>,
    vsock: Option<Arc<VsockMetrics>>,
    entropy: Option<Arc<EntropyMetrics>>,
    serial: Option<Arc<SerialMetrics>>,
    i8042: Option<Arc<I8042Metrics>>,
    vcpus: Vec<Arc<VcpuMetrics>>,
    /// Microseconds from process start to the guest's boot signal (port 0x3f0), 0 before.
    boot_time_us: Option<Arc<AtomicU64>>,
    /// Pause and resume timings.
    pub latencies: LatencyMetrics,
}

impl Registry {
    /// Registers a block device by its drive ID.
    pub fn add_block(&mut self, id: &str, m: Arc<BlockMetrics>) {
        self.blocks.push((id.to_string(), m));
    }

    /// Registers a network device by its interface ID.
    pub fn add_net(&mut self, id: &str, m: Arc<NetMetrics>) {
        self.nets.push((id.to_string(), m));
    }

    /// Registers the vsock device.
    pub fn set_vsock(&mut self, m: Arc<VsockMetrics>) {
        self.vsock = Some(m);
    }

    /// Registers the entropy device.
    pub fn set_entropy(&mut self, m: Arc<EntropyMetrics>) {
        self.entropy = Some(m);
    }

    /// Registers the legacy devices and the boot timer's measurement.
    pub fn set_legacy(
        &mut self,
        serial: Arc<SerialMetrics>,
        i8042: Arc<I8042Metrics>,
        boot_time_us: Arc<AtomicU64>,
    ) {
        self.serial = Some(serial);
        self.i8042 = Some(i8042);
        self.boot_time_us = Some(boot_time_us);
    }

    /// A new vCPU's counters.
    pub fn add_vcpu(&mut self) -> Arc<VcpuMetrics> {
        let m = Arc::new(VcpuMetrics::default());
        self.vcpus.push(m.clone());
        m
    }

    fn boot_time_us(&self) -> u64 {
        self.boot_time_us
            .as_ref()
            .map_or(0, |t| t.load(Ordering::Relaxed))
    }

    /// One Firecracker-style JSON metrics line (without the newline): `utc_timestamp_ms`
    /// first, then the groups; counters report their change since the previous line.
    pub fn json_line(&self) -> String {
        json_line(Some(self))
    }

    /// The Prometheus text exposition of the running totals.
    pub fn prometheus(&self) -> String {
        prometheus(Some(self))
    }
}

/// Deltas of `counters` as a JSON object, and added into `sum` (for aggregate groups).
fn delta_group(counters: &[(&'static str, &Counter)], sum: &mut Map<String, Value>) -> Value {
    let mut group = Map::new();
    for (name, c) in counters {
        let d = c.take_delta();
        group.insert((*name).to_string(), Value::from(d));
        let total = sum.get(*name).and_then(Value::as_u64).unwrap_or(0);
        sum.insert((*name).to_string(), Value::from(total.saturating_add(d)));
    }
    Value::Object(group)
}

fn api_json(line: &mut Map<String, Value>) {
    for (method_index, group) in [
        (0, "get_api_requests"),
        (1, "put_api_requests"),
        (2, "patch_api_requests"),
    ] {
        let mut m = Map::new();
        for (family_index, (family, _)) in API_FAMILIES.iter().enumerate() {
            let slot = method_index * API_FAMILIES.len() + family_index;
            m.insert(
                format!("{family}_count"),
                Value::from(API.requests[slot].take_delta()),
            );
            m.insert(
                format!("{family}_fails"),
                Value::from(API.fails[slot].take_delta()),
            );
        }
        line.insert(group.to_string(), Value::Object(m));
    }
    let mut server = Map::new();
    server.insert(
        "process_startup_time_us".into(),
        Value::from(API.process_startup_time_us.get()),
    );
    line.insert("api_server".into(), Value::Object(server));
}

/// The JSON line for `registry` (only the process-wide groups before a VM exists).
pub fn json_line(registry: Option<&Registry>) -> String {
    let mut line = Map::new();
    api_json(&mut line);
    let mut seccomp = Map::new();
    seccomp.insert(
        "num_faults".into(),
        Value::from(SECCOMP_FAULTS.load(Ordering::Relaxed)),
    );
    line.insert("seccomp".into(), Value::Object(seccomp));
    if let Some(r) = registry {
        let mut block = Map::new();
        for (id, m) in &r.blocks {
            let g = delta_group(&m.counters(), &mut block);
            line.insert(format!("block_{id}"), g);
        }
        line.insert("block".into(), Value::Object(block));
        let mut net = Map::new();
        for (id, m) in &r.nets {
            let g = delta_group(&m.counters(), &mut net);
            line.insert(format!("net_{id}"), g);
        }
        line.insert("net".into(), Value::Object(net));
        let mut vcpu = Map::new();
        for m in &r.vcpus {
            delta_group(&m.counters(), &mut vcpu);
        }
        line.insert("vcpu".into(), Value::Object(vcpu));
        let mut unused = Map::new();
        if let Some(m) = &r.vsock {
            line.insert("vsock".into(), delta_group(&m.counters(), &mut unused));
        }
        if let Some(m) = &r.entropy {
            line.insert("entropy".into(), delta_group(&m.counters(), &mut unused));
        }
        if let Some(m) = &r.serial {
            line.insert("uart".into(), delta_group(&m.counters(), &mut unused));
        }
        if let Some(m) = &r.i8042 {
            line.insert("i8042".into(), delta_group(&m.counters(), &mut unused));
        }
        let mut latencies = Map::new();
        latencies.insert("guest_boot_time".into(), Value::from(r.boot_time_us()));
        latencies.insert("pause_vm".into(), Value::from(r.latencies.pause_vm.get()));
        latencies.insert("resume_vm".into(), Value::from(r.latencies.resume_vm.get()));
        line.insert("latencies_us".into(), Value::Object(latencies));
    }
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Firecracker puts the timestamp first; the groups follow in name order.
    let groups = Value::Object(line).to_string();
    let rest = groups.strip_prefix('{').unwrap_or(&groups);
    if rest == "}" {
        format!("{{\"utc_timestamp_ms\":{ts}}}")
    } else {
        format!("{{\"utc_timestamp_ms\":{ts},{rest}")
    }
}

/// Prometheus text exposition builder: one `# TYPE` line per metric name.
struct Exposition {
    text: String,
    typed: std::collections::BTreeSet<String>,
}

impl Exposition {
    fn sample(&mut self, name: &str, kind: &str, labels: &[(&str, &str)], value: u64) {
        let full = if kind == "counter" {
            format!("anvil_{name}_total")
        } else {
            format!("anvil_{name}")
        };
        if self.typed.insert(full.clone()) {
            self.text.push_str(&format!("# TYPE {full} {kind}\n"));
        }
        self.text.push_str(&full);
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            self.text.push_str(&format!("{{{}}}", inner.join(",")));
        }
        self.text.push_str(&format!(" {value}\n"));
    }

    fn counters(&mut self, group: &str, labels: &[(&str, &str)], counters: &[(&str, &Counter)]) {
        for (name, c) in counters {
            self.sample(&format!("{group}_{name}"), "counter", labels, c.get());
        }
    }
}

/// Escapes a label value (Prometheus text format: backslash, quote, newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text for `registry` (only the process-wide metrics before a VM exists).
pub fn prometheus(registry: Option<&Registry>) -> String {
    let mut e = Exposition {
        text: String::new(),
        typed: Default::default(),
    };
    for (m, method) in API_METHODS.iter().enumerate() {
        for (f, (family, _)) in API_FAMILIES.iter().enumerate() {
            let slot = m * API_FAMILIES.len() + f;
            let labels = [("method", *method), ("family", *family)];
            let (count, fails) = (API.requests[slot].get(), API.fails[slot].get());
            if count > 0 {
                e.sample("api_requests", "counter", &labels, count);
                e.sample("api_request_fails", "counter", &labels, fails);
            }
        }
    }
    e.sample(
        "api_process_startup_time_us",
        "gauge",
        &[],
        API.process_startup_time_us.get(),
    );
    e.sample(
        "seccomp_faults",
        "counter",
        &[],
        SECCOMP_FAULTS.load(Ordering::Relaxed),
    );
    if let Some(r) = registry {
        for (id, m) in &r.blocks {
            e.counters("block", &[("drive", id)], &m.counters());
        }
        for (id, m) in &r.nets {
            e.counters("net", &[("iface", id)], &m.counters());
        }
        for (i, m) in r.vcpus.iter().enumerate() {
            let id = i.to_string();
            e.counters("vcpu", &[("vcpu", &id)], &m.counters());
        }
        if let Some(m) = &r.vsock {
            e.counters("vsock", &[], &m.counters());
        }
        if let Some(m) = &r.entropy {
            e.counters("entropy", &[], &m.counters());
        }
        if let Some(m) = &r.serial {
            e.counters("uart", &[], &m.counters());
        }
        if let Some(m) = &r.i8042 {
            e.counters("i8042", &[], &m.counters());
        }
        e.sample("guest_boot_time_us", "gauge", &[], r.boot_time_us());
        e.sample("pause_vm_us", "gauge", &[], r.latencies.pause_vm.get());
        e.sample("resume_vm_us", "gauge", &[], r.latencies.resume_vm.get());
    }
    e.text
}

/// The metrics destination: a file or named pipe opened once, one line per flush
/// (Firecracker's semantics: the path must exist; a pipe is opened without blocking, and a
/// line a full pipe cannot take is counted as missed, not waited for).
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    /// Lines a full pipe could not take.
    missed: u64,
}

impl MetricsWriter {
    /// Opens `path` for writing (appending to a regular file).
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| MetricsError::Open(path.to_path_buf(), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            missed: 0,
        })
    }

    /// Writes one line for `registry`.
    pub fn flush(&mut self, registry: Option<&Registry>) -> Result<(), MetricsError> {
        let mut line = json_line(registry);
        line.push('\n');
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.missed += 1;
                tracing::debug!(missed = self.missed, "metrics pipe full, line dropped");
                Ok(())
            }
            Err(e) => Err(MetricsError::Write(self.path.clone(), e)),
        }
    }

    /// Lines dropped because the pipe was full.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

#[cfg(test)]
mod tests;
