//! Building a VM from a [`VmConfig`] and running its event loop.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use arch::boot::BootProtocol;
use arch::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use arch::template::CpuTemplate;
use devices::virtio::block::{Block, BlockError};
use devices::virtio::net::{Net, Tap, TapError};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockError};
use devices::GuestMemoryMmap;
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{ConfigError, CpuTemplateSource, VmConfig};
use crate::controller::error_chain;
use crate::device_manager::{ConsoleOut, DeviceError, DeviceManager};
use crate::file_pages::{Detacher, FileMappings, FilePagesError};
use crate::kvm::KvmError;
use crate::loader::LoaderError;
use crate::memory::MemoryError;
use crate::metrics::{MetricsError, MetricsWriter, Registry, PERIODIC_FLUSH};
use crate::resources::{
    check_rate_limiter, PartialDrive, PartialNetworkInterface, SnapshotCreateParams, SnapshotType,
    VmResources,
};
use crate::rpc::{ActionError, ActionResult, ApiReceiver, VmState, VmmAction, VmmData};
use crate::seccomp::{self, SeccompError, SeccompLevel, ThreadKind};
use crate::snapshot::state::LegacyState;
use crate::snapshot::{MicrovmState, VcpuState, VmState as KvmVmState};
use crate::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuRequest, VcpuStop};

/// How often the event loop checks that the guest can still make progress.
const PROGRESS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive checks with every vCPU idle forever before the guest is declared stuck.
const STUCK_CHECKS: u32 = 2;
/// Most host input kept for the guest while its serial FIFO is full.
const MAX_PENDING_INPUT: usize = 4096;

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM cannot be used.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// More vCPUs than KVM supports.
    #[error("vCPU count {count} is larger than KVM's maximum of {max} on this host")]
    TooManyVcpus {
        /// Requested count.
        count: u8,
        /// KVM's limit.
        max: usize,
    },
    /// More memory than the host has.
    #[error("memory size {mib} MiB is larger than the host's {host_mib} MiB")]
    TooMuchMemory {
        /// Requested size.
        mib: u64,
        /// The host's memory.
        host_mib: u64,
    },
    /// The CPU template cannot be read or is invalid.
    #[error("cannot use CPU template {}", .path.display())]
    CpuTemplate {
        /// The template file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A KVM VM-level call failed.
    #[error("KVM cannot {0}")]
    VmSetup(&'static str, #[source] kvm_ioctls::Error),
    /// A vCPU cannot be created or configured.
    #[error("cannot set up vCPU {id}: {what}")]
    VcpuSetup {
        /// vCPU index.
        id: u8,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel, initrd or command line failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Writing the boot information failed.
    #[error("cannot write the boot information to guest memory")]
    Boot(#[source] arch::boot::BootError),
    /// Device setup failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A disk cannot be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A tap cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The vsock device cannot be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A vCPU thread failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The metrics output cannot be opened.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Seccomp filters cannot be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Guest memory cannot be made independent of the kernel and initrd files.
    #[error(transparent)]
    FilePages(#[from] FilePagesError),
    /// The event loop failed.
    #[error("event loop failure: {0}")]
    EventLoop(&'static str, #[source] std::io::Error),
    /// The API-driven start failed.
    #[error("{0}")]
    Api(String),
}

/// What the event loop needs to serve API requests once the VM runs.
#[derive(Debug)]
pub struct ApiContext {
    /// Requests from the API thread.
    pub receiver: ApiReceiver,
    /// The resources the VM was built from (`GET /vm/config`).
    pub resources: VmResources,
    /// The instance ID (`GET /`).
    pub instance_id: String,
    /// The `InstanceStart` (or snapshot load) request, answered once the vCPUs run.
    pub start_reply: Option<Sender<ActionResult>>,
    /// Start with the vCPUs paused (a snapshot loaded without `resume_vm`).
    pub start_paused: bool,
    /// Live migration progress (`GET /migration`).
    pub migration: crate::migration::SharedStatus,
}

/// The VM-wide KVM objects the event loop needs for snapshots.
struct Machine<'a> {
    /// Guest memory is filled by a userfaultfd handler: a page not yet present is not zero.
    lazy_memory: bool,
    vm: &'a std::sync::Arc<VmFd>,
    mem: &'a GuestMemoryMmap,
}

/// How a VM's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset or powered off (a clean stop for a microVM).
    Reset,
    /// The guest crashed or stopped making progress.
    GuestFailure(String),
    /// The guest moved to another VMM (live migration).
    Migrated,
}

/// What `Vmm::configure` produces.
struct Parts {
    devices: DeviceManager,
    vcpus: Vec<Vcpu>,
    vcpu_requests: Vec<std::sync::mpsc::Sender<VcpuRequest>>,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_evt: EventFd,
    protocol: BootProtocol,
    metrics: Registry,
    file_pages: FileMappings,
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vmm {
    // Kept open for the VM's lifetime: a userfaultfd backend's fd and handler connection
    // (closing the fd would turn missing pages into zero pages).
    _uffd: Option<(userfaultfd::Uffd, std::os::unix::net::UnixStream)>,
    _kvm: Kvm,
    _vm: std::sync::Arc<VmFd>,
    _guest_memory: GuestMemoryMmap,
    devices: DeviceManager,
    vcpus: Vec<Vcpu>,
    vcpu_requests: Vec<std::sync::mpsc::Sender<VcpuRequest>>,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_evt: EventFd,
    protocol: BootProtocol,
    seccomp_level: SeccompLevel,
    metrics: Registry,
    metrics_writer: Option<MetricsWriter>,
    /// Guest memory still mapped from the kernel and initrd files, swapped for anonymous
    /// memory once the vCPUs run (see [`crate::file_pages`]).
    file_pages: FileMappings,
}

/// The name of network interface `index` in metrics: its ID from the API, else `eth<index>`.
fn net_metrics_id(net: &crate::config::NetConfig, index: usize) -> String {
    net.id.clone().unwrap_or_else(|| format!("eth{index}"))
}

/// Where a snapshot's guest memory comes from.
#[derive(Debug, Clone)]
pub enum MemorySource {
    /// A private mapping of the memory file.
    File(PathBuf),
    /// A page-fault handler listening on this Unix socket (Firecracker's Uffd backend).
    Uffd(PathBuf),
}

/// What a [`PreparedVm`] was made for: a different value needs a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareKey {
    kvm_device: PathBuf,
    mem_size_mib: u64,
    vcpu_count: u8,
    track_dirty_pages: bool,
}

impl PrepareKey {
    fn of(config: &VmConfig) -> Self {
        Self {
            kvm_device: config.kvm_device.clone(),
            mem_size_mib: config.mem_size_mib,
            vcpu_count: config.vcpu_count,
            track_dirty_pages: config.track_dirty_pages,
        }
    }
}

/// The identity of the kernel and initrd files and how they are loaded: a preloaded kernel
/// is used only if none of it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FilesKey {
    kernel: FileId,
    initrd: Option<FileId>,
    protocol: crate::config::BootProtocolChoice,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

impl FilesKey {
    fn of(config: &VmConfig) -> Option<Self> {
        Some(Self {
            kernel: FileId::of(&config.kernel)?,
            initrd: match &config.initrd {
                Some(path) => Some(FileId::of(path)?),
                None => None,
            },
            protocol: config.boot_protocol,
        })
    }
}

/// A kernel and initrd already in guest memory.
#[derive(Debug)]
struct Preloaded {
    files: FilesKey,
    kernel: crate::loader::LoadedKernel,
    initrd: Option<arch::boot::InitrdConfig>,
    /// What of them is still a private mapping of the files.
    mapped: FileMappings,
}

/// The parts of a VM that depend only on the machine configuration and the kernel files,
/// made ahead of `InstanceStart` on a helper thread (the API's pre-boot phase): the KVM VM
/// with its irqchip and PIT, guest memory registered with KVM and, when the boot source is
/// known, the kernel and initrd loaded. [`Vmm::build_from`] uses it when nothing it depends
/// on changed since.
#[derive(Debug)]
pub struct PreparedVm {
    key: PrepareKey,
    kvm: Kvm,
    vm: VmFd,
    guest_memory: GuestMemoryMmap,
    loaded: Option<Preloaded>,
}

impl Preloaded {
    /// Loads the kernel and initrd of `config` into `mem`.
    fn load(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<Self, VmmError> {
        // Taken before reading, so a file replaced meanwhile does not match later.
        let files = FilesKey::of(config);
        let mut mapped = FileMappings::default();
        let kernel =
            crate::loader::load_kernel(mem, &config.kernel, config.boot_protocol, &mut mapped)?;
        let initrd = config
            .initrd
            .as_ref()
            .map(|path| crate::loader::load_initrd(mem, path, &kernel, &mut mapped))
            .transpose()?;
        tracing::debug!(
            bytes = mapped.bytes(),
            "kernel and initrd pages mapped from the files"
        );
        Ok(Self {
            files: files.ok_or_else(|| {
                VmmError::Api("the kernel or initrd file changed while it was loaded".into())
            })?,
            kernel,
            initrd,
            mapped,
        })
    }
}

impl PreparedVm {
    /// This VM (prepared without a kernel) with the kernel and initrd of `config` loaded.
    pub fn with_kernel(mut self, config: &VmConfig) -> Result<Self, VmmError> {
        if self.loaded.is_none() && !config.kernel.as_os_str().is_empty() {
            self.loaded = Some(Preloaded::load(config, &self.guest_memory)?);
        }
        Ok(self)
    }

    /// Checks `config`'s machine against the host and KVM, creates the VM and its memory and,
    /// if `config` names a kernel, loads it (while KVM installs the memory slot).
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let kvm = crate::kvm::open(&config.kvm_device)?;
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.vcpu_count) > max_vcpus {
            return Err(VmmError::TooManyVcpus {
                count: config.vcpu_count,
                max: max_vcpus,
            });
        }
        if let Some(host_mib) = crate::kvm::host_memory_mib() {
            if config.mem_size_mib > host_mib {
                return Err(VmmError::TooMuchMemory {
                    mib: config.mem_size_mib,
                    host_mib,
                });
            }
        }
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::VmSetup("create a VM", e))?;
        vm.set_tss_address(usize::try_from(KVM_TSS_START).expect("the TSS address is below 4 GiB"))
            .map_err(|e| VmmError::VmSetup("set the TSS address", e))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmmError::VmSetup("set the identity map address", e))?;
        // Memory slots go in before the irqchip: once a VM has an irqchip, its first slot
        // update waits for a grace period (4-11 ms on this PVM host, measured); slots
        // installed before it cost microseconds, and the wait moves to closing the VM fd at
        // exit. Firecracker orders them the same way.
        let guest_memory = crate::memory::create_guest_memory(config.mem_size_mib)?;
        crate::memory::register_with_kvm(&vm, &guest_memory, config.track_dirty_pages)?;
        vm.create_irq_chip()
            .map_err(|e| VmmError::VmSetup("create the in-kernel irqchip", e))?;
        // KVM's IOAPIC starts with ID 0; give it the ID the MP table and MADT announce.
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut ioapic)
            .map_err(|e| VmmError::VmSetup("read the IOAPIC state", e))?;
        ioapic.chip.ioapic.id = u32::from(arch::mptable::ioapic_id(config.vcpu_count));
        vm.set_irqchip(&ioapic)
            .map_err(|e| VmmError::VmSetup("set the IOAPIC ID", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmmError::VmSetup("create the in-kernel PIT", e))?;
        let loaded = if config.kernel.as_os_str().is_empty() {
            None
        } else {
            Some(Preloaded::load(config, &guest_memory)?)
        };
        Ok(Self {
            key: PrepareKey::of(config),
            kvm,
            vm,
            guest_memory,
            loaded,
        })
    }
}

/// A locally administered unicast MAC address for interface `index` on `tap`: derived from
/// the tap's name, so the same VM (or its snapshot, restored on the same tap) keeps it.
pub(crate) fn default_mac(tap: &str, index: usize) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let h = h.to_be_bytes();
    [
        0x06,
        h[0],
        h[1],
        h[2],
        h[3],
        u8::try_from(index).unwrap_or(0),
    ]
}

/// A vCPU on `fd` wired to the VM's buses, its event channel and metrics, and the sender of
/// its requests (the same for a booted and a restored VM).
#[allow(clippy::too_many_arguments)]
fn new_vcpu(
    id: u8,
    fd: kvm_ioctls::VcpuFd,
    devices: &DeviceManager,
    events_tx: &Sender<VcpuEvent>,
    events_evt: &EventFd,
    start: Instant,
    msr_list: &std::sync::Arc<Vec<u32>>,
    metrics: &mut Registry,
) -> Result<(Vcpu, Sender<VcpuRequest>), VmmError> {
    let (req_tx, req_rx) = channel();
    let evt = events_evt
        .try_clone()
        .map_err(|e| VmmError::EventLoop("clone the vCPU event fd", e))?;
    let mut vcpu = Vcpu::new(
        id,
        fd,
        devices.pio_bus.clone(),
        devices.mmio_bus.clone(),
        events_tx.clone(),
        evt,
        req_rx,
        start,
    );
    vcpu.set_metrics(metrics.add_vcpu());
    vcpu.set_msr_list(msr_list.clone());
    Ok((vcpu, req_tx))
}

fn vcpu_error<E: std::error::Error + Send + Sync + 'static>(
    id: u8,
    what: &'static str,
) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::VcpuSetup {
        id,
        what,
        source: Box::new(e),
    }
}

/// A KVM VM with its irqchip, PIT and guest memory, waiting for a saved state
/// ([`Vmm::restore_into`]).
#[derive(Debug)]
pub struct RestoreTarget {
    kvm: Kvm,
    vm: VmFd,
    memory: GuestMemoryMmap,
    uffd: Option<(userfaultfd::Uffd, std::os::unix::net::UnixStream)>,
}

impl RestoreTarget {
    /// Creates the KVM VM and registers `memory` (with `uffd`, the page-fault handler
    /// that fills it) as its memory slots.
    pub fn new(
        kvm_device: &std::path::Path,
        memory: GuestMemoryMmap,
        uffd: Option<(userfaultfd::Uffd, std::os::unix::net::UnixStream)>,
        track_dirty_pages: bool,
    ) -> Result<Self, VmmError> {
        let kvm = crate::kvm::open(kvm_device)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::VmSetup("create a VM", e))?;
        vm.set_tss_address(usize::try_from(KVM_TSS_START).expect("the TSS address is below 4 GiB"))
            .map_err(|e| VmmError::VmSetup("set the TSS address", e))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmmError::VmSetup("set the identity map address", e))?;
        // Slots before the irqchip, as in `PreparedVm::new` (no grace-period wait).
        crate::memory::register_with_kvm(&vm, &memory, track_dirty_pages)?;
        vm.create_irq_chip()
            .map_err(|e| VmmError::VmSetup("create the in-kernel irqchip", e))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| VmmError::VmSetup("create the in-kernel PIT", e))?;
        Ok(Self {
            kvm,
            vm,
            memory,
            uffd,
        })
    }

    /// The guest memory (a migration fills it before the state arrives).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

impl Vmm {
    /// Builds the VM described by `config`: checks it against the host, creates the KVM VM,
    /// guest memory, devices and vCPUs, and loads the kernel. `start` is when the VMM process
    /// started (for the boot timer).
    pub fn build(config: &VmConfig, start: Instant) -> Result<Self, VmmError> {
        Self::build_from(config, start, None)
    }

    /// Like [`Vmm::build`], using `prepared` when it was made for this configuration (see
    /// [`PreparedVm`]); otherwise it is dropped and the VM made afresh.
    pub fn build_from(
        config: &VmConfig,
        start: Instant,
        prepared: Option<PreparedVm>,
    ) -> Result<Self, VmmError> {
        config.validate()?;
        crate::loader::check_files(&config.kernel, config.initrd.as_deref())?;
        let template = config
            .cpu_template
            .as_ref()
            .map(|source| {
                let path = match source {
                    CpuTemplateSource::File(path) => path.clone(),
                    CpuTemplateSource::Inline(_) => PathBuf::from("cpu-config"),
                };
                let fail =
                    |source: Box<dyn std::error::Error + Send + Sync>| VmmError::CpuTemplate {
                        path: path.clone(),
                        source,
                    };
                let text = match source {
                    CpuTemplateSource::File(path) => {
                        std::fs::read_to_string(path).map_err(|e| fail(Box::new(e)))?
                    }
                    CpuTemplateSource::Inline(text) => text.clone(),
                };
                CpuTemplate::from_json(&text).map_err(|e| fail(Box::new(e)))
            })
            .transpose()?;
        let key = PrepareKey::of(config);
        let mut prepared = match prepared {
            Some(p) if p.key == key => {
                tracing::debug!(preloaded = p.loaded.is_some(), "using the prepared VM");
                p
            }
            _ => PreparedVm::new(config)?,
        };
        let metrics_writer = config
            .metrics_path
            .as_deref()
            .map(MetricsWriter::open)
            .transpose()?;
        let files = FilesKey::of(config);
        let preloaded = prepared
            .loaded
            .take()
            .filter(|l| files.as_ref().is_some_and(|f| *f == l.files));
        let parts = Self::configure(
            config,
            &prepared.kvm,
            &prepared.vm,
            &prepared.guest_memory,
            template.as_ref(),
            start,
            preloaded,
        )?;
        Ok(Self {
            _uffd: None,
            _kvm: prepared.kvm,
            _vm: std::sync::Arc::new(prepared.vm),
            _guest_memory: prepared.guest_memory,
            devices: parts.devices,
            vcpus: parts.vcpus,
            vcpu_requests: parts.vcpu_requests,
            vcpu_events: parts.vcpu_events,
            vcpu_events_evt: parts.vcpu_events_evt,
            protocol: parts.protocol,
            seccomp_level: config.seccomp_level,
            metrics: parts.metrics,
            metrics_writer,
            file_pages: parts.file_pages,
        })
    }

    /// Loads the kernel, initrd and command line, writes the boot tables, creates the devices
    /// and creates and configures the vCPUs.
    fn configure(
        config: &VmConfig,
        kvm: &Kvm,
        vm: &VmFd,
        guest_memory: &GuestMemoryMmap,
        template: Option<&CpuTemplate>,
        start: Instant,
        preloaded: Option<Preloaded>,
    ) -> Result<Parts, VmmError> {
        let Preloaded {
            kernel,
            initrd,
            mapped,
            ..
        } = match preloaded {
            Some(p) => p,
            None => Preloaded::load(config, guest_memory)?,
        };
        let mut devices = DeviceManager::new(vm, start, Box::new(ConsoleOut))?;
        let mut metrics = Registry::default();
        metrics.set_legacy(
            devices
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics(),
            devices
                .i8042
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics(),
            devices.boot_time_us.clone(),
        );
        let mut cmdline = config.cmdline.clone();
        cmdline.push_str(&Self::add_devices(
            config,
            vm,
            guest_memory,
            &mut devices,
            &mut metrics,
        )?);
        // The devices are announced to the kernel as Linux's virtio_mmio driver expects.
        for param in devices.virtio_cmdline() {
            cmdline.push(' ');
            cmdline.push_str(&param);
        }
        let (cmdline_addr, cmdline_size) = crate::loader::load_cmdline(guest_memory, &cmdline)?;
        arch::boot::configure_system(
            guest_memory,
            cmdline_addr,
            cmdline_size,
            initrd.as_ref(),
            config.vcpu_count,
            kernel.protocol,
            kernel.setup_header,
            &devices.virtio_devices,
        )
        .map_err(VmmError::Boot)?;
        tracing::debug!(
            entry = kernel.entry.0,
            protocol = ?kernel.protocol,
            "kernel loaded"
        );

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::VmSetup("report the supported CPUID", e))?;
        let template_msrs = match template {
            Some(t) => t.msr_entries(|_| None).map_err(|e| VmmError::CpuTemplate {
                path: PathBuf::from("cpu template"),
                source: Box::new(e),
            })?,
            None => Vec::new(),
        };
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let (events_tx, vcpu_events) = channel();
        let vcpu_events_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::EventLoop("create the vCPU event fd", e))?;
        let mut vcpus = Vec::new();
        let mut vcpu_requests = Vec::new();
        // What snapshots save per vCPU; an empty list only disables snapshots.
        let msr_list =
            std::sync::Arc::new(crate::snapshot::state::msr_list(kvm).unwrap_or_default());
        for id in 0..config.vcpu_count {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(vcpu_error(id, "create"))?;
            let mut cpuid = supported_cpuid.clone();
            arch::cpuid::filter_cpuid(&mut cpuid, id, config.vcpu_count)
                .map_err(vcpu_error(id, "filter CPUID"))?;
            arch::cpuid::set_tsc_deadline(&mut cpuid, tsc_deadline);
            if let Some(t) = template {
                t.apply_cpuid(&mut cpuid)
                    .map_err(vcpu_error(id, "apply the CPU template"))?;
            }
            fd.set_cpuid2(&cpuid).map_err(vcpu_error(id, "set CPUID"))?;
            arch::msr::setup_msrs(&fd, &template_msrs).map_err(vcpu_error(id, "set MSRs"))?;
            arch::interrupts::set_lint(&fd).map_err(vcpu_error(id, "set LAPIC LINT0/LINT1"))?;
            arch::regs::setup_fpu(&fd).map_err(vcpu_error(id, "set the FPU"))?;
            if id == 0 {
                arch::regs::setup_regs(&fd, kernel.entry, kernel.protocol)
                    .map_err(vcpu_error(id, "set registers"))?;
                arch::regs::setup_sregs(guest_memory, &fd, kernel.protocol)
                    .map_err(vcpu_error(id, "set special registers"))?;
            }
            let (vcpu, req_tx) = new_vcpu(
                id,
                fd,
                &devices,
                &events_tx,
                &vcpu_events_evt,
                start,
                &msr_list,
                &mut metrics,
            )?;
            vcpus.push(vcpu);
            vcpu_requests.push(req_tx);
        }

        Ok(Parts {
            devices,
            vcpus,
            vcpu_requests,
            vcpu_events,
            vcpu_events_evt,
            protocol: kernel.protocol,
            metrics,
            file_pages: mapped,
        })
    }

    /// Builds a VM from a snapshot: a new KVM VM whose memory is a private mapping of
    /// `mem_file`, with the saved vCPU, VM and device state. Refused when this host lacks a
    /// CPU feature the guest was given.
    pub fn restore(
        state: &MicrovmState,
        config: &VmConfig,
        memory: &MemorySource,
        kvm_device: &std::path::Path,
        track_dirty_pages: bool,
        start: Instant,
    ) -> Result<Self, VmmError> {
        let snapshot_error =
            |why: String| VmmError::Api(format!("cannot load the snapshot: {why}"));
        let (guest_memory, uffd) = match memory {
            MemorySource::File(path) => (
                crate::snapshot::map_memory(path, &state.memory)
                    .map_err(|e| snapshot_error(error_chain(&e)))?,
                None,
            ),
            MemorySource::Uffd(socket) => {
                let m = crate::snapshot::uffd::connect(socket, &state.memory)
                    .map_err(|e| snapshot_error(error_chain(&e)))?;
                (m.memory, Some((m.uffd, m.stream)))
            }
        };
        let target = RestoreTarget::new(kvm_device, guest_memory, uffd, track_dirty_pages)?;
        Self::restore_into(target, state, config, start)
    }

    /// Gives the VM `target` (a KVM VM with its memory already filled: from a snapshot file,
    /// or received by a live migration) the saved vCPU, VM and device state.
    pub fn restore_into(
        target: RestoreTarget,
        state: &MicrovmState,
        config: &VmConfig,
        start: Instant,
    ) -> Result<Self, VmmError> {
        // Restored devices start their workers below, before the VM runs: they filter
        // themselves.
        seccomp::prepare_workers(config.seccomp_level)?;
        let RestoreTarget {
            kvm,
            vm,
            memory: guest_memory,
            uffd,
        } = target;
        let snapshot_error =
            |why: String| VmmError::Api(format!("cannot load the snapshot: {why}"));
        if usize::from(state.vcpu_count) > kvm.get_max_vcpus() {
            return Err(VmmError::TooManyVcpus {
                count: state.vcpu_count,
                max: kvm.get_max_vcpus(),
            });
        }
        for vcpu in &state.vcpus {
            crate::snapshot::state::check_cpu_features(&kvm, vcpu).map_err(snapshot_error)?;
        }
        let layout: Vec<(u64, u64)> = guest_memory
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect();
        let saved: Vec<(u64, u64)> = state.memory.iter().map(|r| (r.guest_addr, r.len)).collect();
        if layout != saved {
            return Err(snapshot_error(
                "the guest memory does not match the saved memory layout".into(),
            ));
        }
        let mut devices =
            DeviceManager::with_state(&vm, start, Box::new(ConsoleOut), Some(&state.legacy))?;
        let mut metrics = Registry::default();
        metrics.set_legacy(
            devices
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics(),
            devices
                .i8042
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics(),
            devices.boot_time_us.clone(),
        );
        // Disks and taps are reopened by path, in the order they had.
        Self::add_devices(config, &vm, &guest_memory, &mut devices, &mut metrics)?;
        if devices.transports.len() != state.virtio.len() {
            return Err(snapshot_error(format!(
                "{} virtio devices saved, the configuration has {}",
                state.virtio.len(),
                devices.transports.len()
            )));
        }
        let msr_list = std::sync::Arc::new(
            crate::snapshot::state::msr_list(&kvm).map_err(|e| snapshot_error(error_chain(&e)))?,
        );
        let (events_tx, vcpu_events) = channel();
        let vcpu_events_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::EventLoop("create the vCPU event fd", e))?;
        let mut vcpus = Vec::new();
        let mut vcpu_requests = Vec::new();
        for (id, saved) in (0..state.vcpu_count).zip(&state.vcpus) {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(vcpu_error(id, "create"))?;
            let (vcpu, req_tx) = new_vcpu(
                id,
                fd,
                &devices,
                &events_tx,
                &vcpu_events_evt,
                start,
                &msr_list,
                &mut metrics,
            )?;
            vcpu.restore(saved)
                .map_err(|why| snapshot_error(format!("vCPU {id}: {why}")))?;
            vcpus.push(vcpu);
            vcpu_requests.push(req_tx);
        }
        state
            .vm
            .restore(&vm)
            .map_err(|e| snapshot_error(error_chain(&e)))?;
        // Interrupts raised while the devices were rebuilt were lost when the interrupt
        // controllers took their saved state: raise the pending ones again.
        devices
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .raise_pending_interrupt();
        devices
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .raise_pending_interrupt();
        for (index, (transport, saved)) in devices.transports.iter().zip(&state.virtio).enumerate()
        {
            transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(saved)
                .map_err(|why| snapshot_error(format!("virtio device {index}: {why}")))?;
        }
        tracing::info!(
            vcpus = state.vcpu_count,
            mib = state.mem_size_mib,
            "snapshot loaded"
        );
        Ok(Self {
            _uffd: uffd,
            _kvm: kvm,
            _vm: std::sync::Arc::new(vm),
            _guest_memory: guest_memory,
            devices,
            vcpus,
            vcpu_requests,
            vcpu_events,
            vcpu_events_evt,
            protocol: BootProtocol::Linux64,
            seccomp_level: config.seccomp_level,
            metrics,
            metrics_writer: None,
            file_pages: FileMappings::default(),
        })
    }

    /// Sets how strictly seccomp filters this VM's threads (for a VM restored from a
    /// snapshot, which the configuration did not build).
    pub fn set_seccomp_level(&mut self, level: SeccompLevel) {
        self.seccomp_level = level;
    }

    /// Creates the virtio devices of `config` in their fixed order (rng, disks, nets, vsock),
    /// which is also their order on the MMIO bus; returns what they add to the kernel
    /// command line (`root=`).
    fn add_devices(
        config: &VmConfig,
        vm: &VmFd,
        guest_memory: &GuestMemoryMmap,
        devices: &mut DeviceManager,
        metrics: &mut Registry,
    ) -> Result<String, VmmError> {
        let mut cmdline = String::new();
        if config.rng {
            let rng = Rng::new();
            metrics.set_entropy(rng.metrics());
            devices.add_virtio_device(vm, guest_memory, "virtio-rng", Box::new(rng))?;
        }
        for (index, disk) in config.disks.iter().enumerate() {
            let block =
                Block::open_limited(&disk.path, disk.read_only, &disk.id, index, disk.rate_limit)?;
            devices
                .block_controls
                .push((disk.id.clone(), block.control()));
            metrics.add_block(&disk.id, block.metrics());
            devices.add_virtio_device(vm, guest_memory, "virtio-blk", Box::new(block))?;
            if disk.root {
                // Disks are probed in command-line order: the first is vda.
                let letter = char::from(b'a' + u8::try_from(index).unwrap_or(0));
                let mode = if disk.read_only { "ro" } else { "rw" };
                cmdline.push_str(&format!(" root=/dev/vd{letter} {mode}"));
            }
        }
        for (index, net) in config.nets.iter().enumerate() {
            let tap = Tap::open(&net.tap)?;
            let mac = net.mac.unwrap_or_else(|| default_mac(&net.tap, index));
            let device = Net::new_limited(tap, mac, index, net.rx_rate, net.tx_rate);
            devices.net_controls.push(device.control());
            metrics.add_net(&net_metrics_id(net, index), device.metrics());
            devices.add_virtio_device(vm, guest_memory, "virtio-net", Box::new(device))?;
        }
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(vsock.guest_cid, &vsock.uds_path)?;
            metrics.set_vsock(device.metrics());
            devices.add_virtio_device(vm, guest_memory, "virtio-vsock", Box::new(device))?;
        }
        Ok(cmdline)
    }

    /// The boot protocol the kernel is entered with.
    pub fn boot_protocol(&self) -> BootProtocol {
        self.protocol
    }

    /// Starts the vCPUs and runs the event loop until the guest resets or fails. Guest
    /// console input is read from `console_in` when given; API requests are served when
    /// `api` is given.
    pub fn run(
        mut self,
        console_in: Option<RawFd>,
        api: Option<ApiContext>,
    ) -> Result<VmOutcome, VmmError> {
        crate::vcpu::register_kick_handler()?;
        let level = self.seccomp_level;
        let vcpu_filters = seccomp::filters(ThreadKind::Vcpu, level)?;
        let vmm_filters = seccomp::filters(ThreadKind::Vmm, level)?;
        seccomp::prepare_workers(level)?;
        // Every vCPU thread installs its filter and waits; this thread installs its own; only
        // then does any vCPU enter the guest.
        let (ready_tx, ready_rx) = channel();
        let start_paused = api.as_ref().is_some_and(|a| a.start_paused);
        let mut handles = Vec::new();
        let mut go = Vec::new();
        for (vcpu, requests) in self.vcpus.drain(..).zip(self.vcpu_requests.drain(..)) {
            if start_paused {
                // Queued before the thread starts: it pauses before its first KVM_RUN.
                let _ = requests.send(VcpuRequest::Pause);
            }
            let (go_tx, go_rx) = channel();
            handles.push(vcpu.start(requests, vcpu_filters.clone(), ready_tx.clone(), go_rx)?);
            go.push(go_tx);
        }
        drop(ready_tx);
        for _ in &handles {
            match ready_rx.recv() {
                Ok(installed) => installed?,
                Err(_) => {
                    return Err(VmmError::EventLoop(
                        "start the vCPUs",
                        std::io::Error::other("a vCPU thread ended before it was ready"),
                    ))
                }
            }
        }
        let mut event_loop = EventLoop::new(&self.devices, &self.vcpu_evt_clone()?, console_in)?;
        if let Some(api) = &api {
            event_loop.watch(api.receiver.evt.as_raw_fd(), TOKEN_API)?;
        }
        event_loop.api = api;
        event_loop.set_metrics(
            std::mem::take(&mut self.metrics),
            self.metrics_writer.take(),
        )?;
        seccomp::install_filters(ThreadKind::Vmm, &vmm_filters)?;
        if level != SeccompLevel::None {
            tracing::info!(?level, "seccomp filters installed on every thread");
        }
        for go in go {
            // A vCPU that is gone already reported why; the loop below hears it.
            let _ = go.send(());
        }
        if let Some(reply) = event_loop.api.as_mut().and_then(|a| a.start_reply.take()) {
            let _ = reply.send(Ok(VmmData::Empty));
        }
        if !self.file_pages.is_empty() {
            event_loop.start_detach(
                std::mem::take(&mut self.file_pages),
                self._guest_memory.clone(),
            )?;
        }
        event_loop.paused = start_paused;
        let machine = Machine {
            lazy_memory: self._uffd.is_some(),
            vm: &self._vm,
            mem: &self._guest_memory,
        };
        let outcome = event_loop.run(&self.devices, &self.vcpu_events, &handles, &machine);
        // A last line, as Firecracker writes at exit.
        event_loop.flush_metrics();
        outcome
    }

    /// Writes metrics lines to `writer` (replacing any from the configuration): on
    /// `FlushMetrics`, every [`crate::metrics::PERIODIC_FLUSH`] and when the VM stops.
    pub fn set_metrics_writer(&mut self, writer: Option<MetricsWriter>) {
        if writer.is_some() {
            self.metrics_writer = writer;
        }
    }

    fn vcpu_evt_clone(&self) -> Result<EventFd, VmmError> {
        self.vcpu_events_evt
            .try_clone()
            .map_err(|e| VmmError::EventLoop("clone the vCPU event fd", e))
    }
}

const TOKEN_RESET: u64 = 1;
const TOKEN_VCPU: u64 = 2;
const TOKEN_STDIN: u64 = 3;
const TOKEN_SERIAL_ROOM: u64 = 4;
const TOKEN_API: u64 = 5;
const TOKEN_METRICS: u64 = 6;
const TOKEN_MIGRATION: u64 = 7;
const TOKEN_DETACH: u64 = 8;

/// How long a VMM whose guest migrated away keeps answering `GET /migration`.
const MIGRATED_LINGER: Duration = Duration::from_secs(2);

/// A live migration this VMM is sending.
struct OutgoingMigration {
    /// The `PUT /migration/send` request, answered when the migration ends.
    reply: Sender<ActionResult>,
    /// From the migration thread.
    events: Receiver<crate::migration::send::SourceEvent>,
    evt: EventFd,
    /// Once the guest is stopped for the last round: whether it was paused before, and
    /// the devices' saved transport state (to restart them if the migration fails).
    stopped: Option<(bool, Vec<devices::virtio::mmio::MmioTransportState>)>,
}

/// How long pausing or resuming waits for every vCPU to answer.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often silent vCPUs are kicked again while the loop waits for their answers.
const KICK_RETRY: Duration = Duration::from_millis(50);

/// The main thread's epoll loop.
struct EventLoop {
    epoll: Epoll,
    vcpu_evt: EventFd,
    stdin: Option<RawFd>,
    stdin_armed: bool,
    pending_input: Vec<u8>,
    /// Consecutive progress checks in which every vCPU was idle forever.
    stuck_checks: u32,
    /// Answers to the current progress check, by vCPU.
    progress: BTreeMap<u8, bool>,
    /// API requests, when the VM is driven by the API.
    api: Option<ApiContext>,
    /// The vCPUs are paused.
    paused: bool,
    /// How the VM ended, noticed while serving a request.
    outcome: Option<VmOutcome>,
    /// Every counter of the VM.
    metrics: Registry,
    /// Where metrics lines go, with the timer of the periodic flush.
    metrics_out: Option<(MetricsWriter, TimerFd)>,
    /// The live migration in progress.
    migration: Option<OutgoingMigration>,
    /// When the guest moved to another VMM.
    migrated_at: Option<Instant>,
    /// A migration read (and so cleared) KVM's dirty log: the next snapshot must be Full.
    dirty_log_consumed: bool,
    /// Replacements for the guest memory mapped from the kernel and initrd files, being
    /// prepared on a helper thread (see [`crate::file_pages`]).
    detach: Option<(Receiver<Result<Detacher, FilePagesError>>, EventFd)>,
    /// Some guest memory is still a private mapping of the kernel or initrd file.
    file_backed: bool,
}

impl EventLoop {
    fn new(
        devices: &DeviceManager,
        vcpu_evt: &EventFd,
        stdin: Option<RawFd>,
    ) -> Result<Self, VmmError> {
        let epoll = Epoll::new().map_err(|e| VmmError::EventLoop("create epoll", e))?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(devices.reset_evt.as_raw_fd(), TOKEN_RESET)
            .map_err(|e| VmmError::EventLoop("watch the reset event", e))?;
        add(vcpu_evt.as_raw_fd(), TOKEN_VCPU)
            .map_err(|e| VmmError::EventLoop("watch vCPU events", e))?;
        add(devices.serial_input_room_evt.as_raw_fd(), TOKEN_SERIAL_ROOM)
            .map_err(|e| VmmError::EventLoop("watch serial input room", e))?;
        // Regular files and /dev/null cannot be polled (EPERM): then there is no input.
        let stdin = stdin.filter(|&fd| add(fd, TOKEN_STDIN).is_ok());
        Ok(Self {
            epoll,
            vcpu_evt: vcpu_evt
                .try_clone()
                .map_err(|e| VmmError::EventLoop("clone the vCPU event fd", e))?,
            stdin_armed: stdin.is_some(),
            stdin,
            pending_input: Vec::new(),
            stuck_checks: 0,
            progress: BTreeMap::new(),
            api: None,
            paused: false,
            outcome: None,
            metrics: Registry::default(),
            metrics_out: None,
            migration: None,
            migrated_at: None,
            dirty_log_consumed: false,
            detach: None,
            file_backed: false,
        })
    }

    /// Starts preparing the replacements of the guest memory ranges mapped from files; the
    /// loop swaps them in when they are ready ([`EventLoop::on_detach_ready`]).
    fn start_detach(
        &mut self,
        mappings: FileMappings,
        mem: GuestMemoryMmap,
    ) -> Result<(), VmmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::EventLoop("create the file pages event fd", e))?;
        let thread_evt = evt
            .try_clone()
            .map_err(|e| VmmError::EventLoop("clone the file pages event fd", e))?;
        let own_memory = crate::file_pages::open_own_memory()
            .map_err(|e| VmmError::EventLoop("open /proc/self/mem", e))?;
        self.watch(evt.as_raw_fd(), TOKEN_DETACH)?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("anvil-kpages".into())
            .spawn(move || {
                let _ = tx.send(Detacher::prepare(mappings, &mem, own_memory));
                let _ = thread_evt.write(1);
            })
            .map_err(|e| VmmError::EventLoop("start the file pages thread", e))?;
        self.detach = Some((rx, evt));
        self.file_backed = true;
        Ok(())
    }

    /// The replacements are ready: pauses the vCPUs and the devices, swaps them in and
    /// resumes. A range that can no longer be read (its file was truncated) fails the VM.
    fn on_detach_ready(
        &mut self,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) -> Result<(), VmmError> {
        let Some((rx, evt)) = self.detach.take() else {
            return Ok(());
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            evt.as_raw_fd(),
            EpollEvent::default(),
        );
        let detacher = rx.recv().map_err(|_| {
            VmmError::EventLoop(
                "prepare the file pages",
                std::io::Error::other("the file pages thread ended without an answer"),
            )
        })??;
        if self.migration.is_some() || self.migrated_at.is_some() {
            // The migration stops and resumes the guest on its own schedule; it reads every
            // page of these ranges (`untouched_is_zero` is off while they are file-backed).
            tracing::warn!(
                "a live migration started before guest memory was copied from the kernel \
                 files: it keeps mapping them"
            );
            return Ok(());
        }
        let started = Instant::now();
        let was_paused = self.paused;
        if let Err(e) = self.set_paused(true, vcpu_events, vcpus) {
            if self.outcome.is_some() {
                // The guest stopped meanwhile: the loop ends with that outcome, or with the
                // reset it asked for first (the test guest triple-faults on purpose when its
                // reset is not acted on within ~30 ms, and pausing can take 50 ms here).
                if devices.reset_evt.read().is_ok() {
                    tracing::info!("guest reset through the i8042; stopping");
                    self.outcome = Some(VmOutcome::Reset);
                }
                return Ok(());
            }
            return Err(VmmError::Api(format!(
                "cannot pause the guest to copy the kernel file pages: {e}"
            )));
        }
        let paused_after = started.elapsed();
        let virtio = devices.quiesce_virtio();
        let swapped = detacher.swap(machine.mem);
        devices.resume_virtio(&virtio);
        let swapped_after = started.elapsed();
        let (bytes, copied_again) = swapped?;
        if !was_paused {
            self.set_paused(false, vcpu_events, vcpus).map_err(|e| {
                VmmError::Api(format!(
                    "cannot resume the guest after copying the kernel file pages: {e}"
                ))
            })?;
        }
        self.file_backed = false;
        tracing::debug!(
            ?paused_after,
            ?swapped_after,
            "the kernel file pages' swap: vCPUs paused, then copies swapped in"
        );
        tracing::info!(
            bytes,
            copied_again,
            pause_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "guest memory no longer maps the kernel and initrd files"
        );
        Ok(())
    }

    /// Takes the VM's metrics and, with a writer, arms the periodic flush.
    fn set_metrics(
        &mut self,
        metrics: Registry,
        writer: Option<MetricsWriter>,
    ) -> Result<(), VmmError> {
        self.metrics = metrics;
        if let Some(writer) = writer {
            let io = |e: vmm_sys_util::errno::Error| std::io::Error::from_raw_os_error(e.errno());
            let mut timer = TimerFd::new()
                .map_err(|e| VmmError::EventLoop("create the metrics timer", io(e)))?;
            timer
                .reset(PERIODIC_FLUSH, Some(PERIODIC_FLUSH))
                .map_err(|e| VmmError::EventLoop("arm the metrics timer", io(e)))?;
            self.watch(timer.as_raw_fd(), TOKEN_METRICS)?;
            self.metrics_out = Some((writer, timer));
        }
        Ok(())
    }

    /// Writes a metrics line if a writer is set; a failure is logged, not fatal.
    fn flush_metrics(&mut self) -> bool {
        let Some((writer, _)) = &mut self.metrics_out else {
            return false;
        };
        if let Err(e) = writer.flush(Some(&self.metrics)) {
            tracing::warn!("{}", crate::controller::error_chain(&e));
        }
        true
    }

    fn watch(&self, fd: RawFd, token: u64) -> Result<(), VmmError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| VmmError::EventLoop("watch the API channel", e))
    }

    fn run(
        &mut self,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) -> Result<VmOutcome, VmmError> {
        let mut events = vec![EpollEvent::default(); 8];
        let mut next_check = Instant::now() + PROGRESS_CHECK_INTERVAL;
        loop {
            if let Some(at) = self.migrated_at {
                if at.elapsed() >= MIGRATED_LINGER {
                    return Ok(VmOutcome::Migrated);
                }
                next_check = next_check.min(at + MIGRATED_LINGER);
            }
            let timeout = next_check.saturating_duration_since(Instant::now());
            let n = match self.epoll.wait(
                i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
                &mut events,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(VmmError::EventLoop("wait for events", e)),
            };
            // A guest reset wins over whatever else the same wait brought (a vCPU that
            // triple-faulted after asking for the reset: the test guest's fallback).
            events[..n].sort_by_key(|e| e.data() != TOKEN_RESET);
            let mut detach_ready = false;
            for event in &events[..n] {
                match event.data() {
                    TOKEN_RESET => {
                        // Drain the counter; the guest asked for a reset, which ends a microVM.
                        let _ = devices.reset_evt.read();
                        tracing::info!("guest reset through the i8042; stopping");
                        return Ok(VmOutcome::Reset);
                    }
                    TOKEN_VCPU => {
                        // Drain the counter; the channel holds the events themselves.
                        let _ = self.vcpu_evt.read();
                        while let Ok(event) = vcpu_events.try_recv() {
                            if let Some(outcome) = self.on_vcpu_event(event, vcpus.len()) {
                                return Ok(outcome);
                            }
                        }
                    }
                    TOKEN_STDIN => self.read_stdin(devices)?,
                    TOKEN_API => {
                        self.serve_api(devices, vcpu_events, vcpus, machine);
                        if let Some(outcome) = self.outcome.take() {
                            return Ok(outcome);
                        }
                    }
                    TOKEN_SERIAL_ROOM => {
                        let _ = devices.serial_input_room_evt.read();
                        self.feed_serial(devices)?;
                    }
                    TOKEN_MIGRATION => {
                        self.on_migration_events(devices, vcpu_events, vcpus, machine);
                        if let Some(outcome) = self.outcome.take() {
                            return Ok(outcome);
                        }
                    }
                    // After the batch: the swap pauses the guest, which should not delay
                    // what else is pending (a reset above ends the loop first).
                    TOKEN_DETACH => detach_ready = true,
                    TOKEN_METRICS => {
                        if let Some((_, timer)) = &mut self.metrics_out {
                            // Drain the expiration count; one line however many passed.
                            let _ = timer.wait();
                        }
                        self.flush_metrics();
                    }
                    _ => {}
                }
            }
            if detach_ready {
                self.on_detach_ready(devices, vcpu_events, vcpus, machine)?;
                if let Some(outcome) = self.outcome.take() {
                    return Ok(outcome);
                }
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + PROGRESS_CHECK_INTERVAL;
                if self.paused {
                    continue;
                }
                self.progress.clear();
                for vcpu in vcpus {
                    vcpu.request(VcpuRequest::CheckProgress);
                }
            }
        }
    }

    /// Answers the waiting API requests.
    fn serve_api(
        &mut self,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) {
        let Some(requests) = self.api.as_ref().map(|a| a.receiver.drain()) else {
            return;
        };
        for request in requests {
            if let VmmAction::MigrationSend(params) = request.action {
                self.start_migration(params, request.reply, machine);
                continue;
            }
            let answer = self.runtime_action(request.action, devices, vcpu_events, vcpus, machine);
            let _ = request.reply.send(answer);
        }
    }

    /// An API action on the running VM.
    fn runtime_action(
        &mut self,
        action: VmmAction,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) -> ActionResult {
        let state = if self.paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        let Some(api) = self.api.as_ref() else {
            return Err(ActionError::VmmGone);
        };
        let read_only = matches!(
            action,
            VmmAction::GetInstanceInfo
                | VmmAction::GetMachineConfig
                | VmmAction::GetVmConfig
                | VmmAction::GetMigration
                | VmmAction::GetPrometheusMetrics
                | VmmAction::FlushMetrics
        );
        if self.migrated_at.is_some() && !read_only {
            return Err(ActionError::State(
                "the microVM has migrated to another VMM".into(),
            ));
        }
        if self.migration.is_some()
            && matches!(
                action,
                VmmAction::CreateSnapshot(_) | VmmAction::PatchDrive(..) | VmmAction::Resume
            )
        {
            return Err(ActionError::State("a live migration is in progress".into()));
        }
        match action {
            VmmAction::GetMigration => Ok(VmmData::Migration(crate::migration::snapshot(
                &api.migration,
            ))),
            VmmAction::MigrationReceive(_) => {
                Err(ActionError::PreBootOnly("PUT /migration/receive"))
            }
            VmmAction::MigrationSend(_) => {
                Err(ActionError::State("a live migration is in progress".into()))
            }
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(
                crate::controller::instance_info(&api.instance_id, state),
            )),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(api.resources.machine.clone()))
            }
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(api.resources.full_config()))),
            VmmAction::Pause => {
                self.set_paused(true, vcpu_events, vcpus)?;
                tracing::info!("vCPUs paused");
                Ok(VmmData::Empty)
            }
            VmmAction::Resume => {
                self.set_paused(false, vcpu_events, vcpus)?;
                tracing::info!("vCPUs resumed");
                Ok(VmmData::Empty)
            }
            VmmAction::SendCtrlAltDel => {
                devices
                    .i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .trigger_ctrl_alt_del();
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => {
                if self.flush_metrics() {
                    Ok(VmmData::Empty)
                } else {
                    Err(ActionError::State(
                        "FlushMetrics: no metrics path is configured".into(),
                    ))
                }
            }
            VmmAction::GetPrometheusMetrics => Ok(VmmData::Text(self.metrics.prometheus())),
            VmmAction::PutMetrics(_) => Err(ActionError::PreBootOnly("PUT /metrics")),
            VmmAction::PatchDrive(id, patch) => {
                self.patch_drive(devices, &id, patch)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNet(id, patch) => {
                self.patch_net(devices, &id, patch)?;
                Ok(VmmData::Empty)
            }
            VmmAction::InstanceStart => Err(ActionError::State(
                "InstanceStart: the microVM is already running".into(),
            )),
            VmmAction::CreateSnapshot(params) => {
                self.create_snapshot(&params, devices, vcpu_events, vcpus, machine)?;
                Ok(VmmData::Empty)
            }
            VmmAction::LoadSnapshot(_) => Err(ActionError::PreBootOnly("PUT /snapshot/load")),
            VmmAction::PutMachineConfig(_) | VmmAction::PatchMachineConfig(_) => Err(
                ActionError::PreBootOnly("changing the machine configuration"),
            ),
            VmmAction::PutBootSource(_) => Err(ActionError::PreBootOnly("PUT /boot-source")),
            VmmAction::PutCpuConfig(_) => Err(ActionError::PreBootOnly("PUT /cpu-config")),
            VmmAction::PutDrive(..) => Err(ActionError::PreBootOnly("PUT /drives")),
            VmmAction::PutNet(..) => Err(ActionError::PreBootOnly("PUT /network-interfaces")),
            VmmAction::PutVsock(_) => Err(ActionError::PreBootOnly("PUT /vsock")),
            VmmAction::PutEntropy(_) => Err(ActionError::PreBootOnly("PUT /entropy")),
            VmmAction::PutLogger(_) => Err(ActionError::PreBootOnly("PUT /logger")),
        }
    }

    /// `PUT /snapshot/create`: the state and memory files of the paused VM.
    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) -> Result<(), ActionError> {
        if !self.paused {
            return Err(ActionError::State(
                "the microVM must be paused to take a snapshot (PATCH /vm Paused)".into(),
            ));
        }
        let tracking = self
            .api
            .as_ref()
            .is_some_and(|a| a.resources.machine.track_dirty_pages);
        if params.snapshot_type == SnapshotType::Diff && self.dirty_log_consumed {
            return Err(ActionError::State(
                "snapshot_type: a live migration read the dirty-page log; take a Full \
                 snapshot before the next Diff"
                    .into(),
            ));
        }
        if params.snapshot_type == SnapshotType::Diff && !tracking {
            return Err(ActionError::State(
                "snapshot_type: Diff snapshots need track_dirty_pages in the machine \
                 configuration (or enable_diff_snapshots when loading)"
                    .into(),
            ));
        }
        // The devices stop touching guest memory; they start again below.
        let virtio = devices.quiesce_virtio();
        let result =
            self.write_snapshot(params, devices, vcpu_events, vcpus, machine, virtio.clone());
        devices.resume_virtio(&virtio);
        result
    }

    /// The vCPUs', VM's and devices' state and guest memory, to the snapshot files.
    fn write_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
        virtio: Vec<devices::virtio::mmio::MmioTransportState>,
    ) -> Result<(), ActionError> {
        let tracking = self
            .api
            .as_ref()
            .is_some_and(|a| a.resources.machine.track_dirty_pages);
        let failed = |e: &dyn std::error::Error| ActionError::Failed(error_chain(e));
        let state = self.save_state(devices, vcpu_events, vcpus, machine, virtio)?;
        if params.snapshot_type == SnapshotType::Diff {
            let bytes =
                crate::snapshot::write_dirty_memory(&params.mem_file_path, machine.mem, machine.vm)
                    .map_err(|e| failed(&e))?;
            tracing::info!(bytes, "diff snapshot: dirty pages written");
        } else {
            crate::snapshot::write_memory(&params.mem_file_path, machine.mem)
                .map_err(|e| failed(&e))?;
            if tracking {
                crate::snapshot::clear_dirty_log(machine.mem, machine.vm)
                    .map_err(|e| failed(&e))?;
            }
            self.dirty_log_consumed = false;
        }
        crate::snapshot::write_state(&params.snapshot_path, &state).map_err(|e| failed(&e))?;
        tracing::info!(
            state = %params.snapshot_path.display(),
            memory = %params.mem_file_path.display(),
            "snapshot written"
        );
        Ok(())
    }

    /// The state of the paused VM: every vCPU, the VM's KVM objects, the legacy devices and
    /// `virtio` (the transports' state, saved by the caller as it quiesced them).
    fn save_state(
        &mut self,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
        virtio: Vec<devices::virtio::mmio::MmioTransportState>,
    ) -> Result<MicrovmState, ActionError> {
        let api = self.api.as_ref().ok_or(ActionError::VmmGone)?;
        let resources = api.resources.clone();
        let failed = |e: &dyn std::error::Error| ActionError::Failed(error_chain(e));
        for vcpu in vcpus {
            vcpu.request(VcpuRequest::SaveState);
        }
        let mut states: Vec<Option<VcpuState>> = (0..vcpus.len()).map(|_| None).collect();
        let mut failure = None;
        self.wait_vcpus(vcpu_events, vcpus, |event| match event {
            VcpuEvent::Saved { id, state } => {
                match *state {
                    Ok(state) => {
                        if let Some(slot) = states.get_mut(usize::from(id)) {
                            *slot = Some(state);
                        }
                    }
                    Err(why) => failure = Some(format!("cannot save vCPU {id}: {why}")),
                }
                Ok(Some(id))
            }
            other => Err(other),
        })?;
        if let Some(why) = failure {
            return Err(ActionError::Failed(why));
        }
        let legacy = LegacyState {
            serial: devices
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
            i8042: devices
                .i8042
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
            cmos: devices
                .cmos
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
        };
        let state = MicrovmState {
            vmm_version: crate::controller::VMM_VERSION.to_string(),
            cpu_model: crate::snapshot::state::host_cpu_model(),
            vcpu_count: u8::try_from(vcpus.len()).unwrap_or(u8::MAX),
            mem_size_mib: resources.machine.mem_size_mib,
            memory: crate::snapshot::memory_layout(resources.machine.mem_size_mib)
                .map_err(|e| failed(&e))?,
            vm: KvmVmState::save(machine.vm).map_err(|e| failed(&e))?,
            vcpus: states.into_iter().flatten().collect(),
            legacy,
            virtio,
            config_json: serde_json::to_string(&resources.full_config())
                .map_err(|e| ActionError::Failed(e.to_string()))?,
        };
        Ok(state)
    }

    /// `PUT /migration/send`: starts the migration thread; the request is answered when
    /// the migration ends ([`Self::on_migration_events`]).
    fn start_migration(
        &mut self,
        params: crate::migration::MigrationSendParams,
        reply: Sender<ActionResult>,
        machine: &Machine<'_>,
    ) {
        let refuse = |reply: Sender<ActionResult>, e: ActionError| {
            let _ = reply.send(Err(e));
        };
        if self.migrated_at.is_some() {
            return refuse(
                reply,
                ActionError::State("the microVM has migrated to another VMM".into()),
            );
        }
        if self.migration.is_some() {
            return refuse(
                reply,
                ActionError::State("a live migration is in progress".into()),
            );
        }
        let Some(api) = self.api.as_ref() else {
            return refuse(reply, ActionError::VmmGone);
        };
        let url = match params.validate() {
            Ok(url) => url,
            Err(e) => return refuse(reply, ActionError::Failed(e.to_string())),
        };
        let config_json = match serde_json::to_string(&api.resources.full_config()) {
            Ok(j) => j,
            Err(e) => return refuse(reply, ActionError::Failed(e.to_string())),
        };
        let made = EventFd::new(libc::EFD_NONBLOCK).and_then(|evt| Ok((evt.try_clone()?, evt)));
        let (thread_evt, evt) = match made {
            Ok(pair) => pair,
            Err(e) => return refuse(reply, ActionError::Failed(format!("eventfd: {e}"))),
        };
        if let Err(e) = self.watch(evt.as_raw_fd(), TOKEN_MIGRATION) {
            return refuse(reply, ActionError::Failed(error_chain(&e)));
        }
        let (tx, events) = channel();
        crate::migration::update(&api.migration, |s| {
            *s = crate::migration::MigrationStatus {
                state: crate::migration::MigrationState::Sending,
                role: Some("source"),
                url: Some(params.destination_url.clone()),
                ..Default::default()
            };
        });
        let job = crate::migration::send::SendJob {
            url,
            params,
            vm: machine.vm.clone(),
            memory: machine.mem.clone(),
            config_json,
            logging: api.resources.machine.track_dirty_pages,
            // Pages still mapped from the kernel files are not zero when absent.
            untouched_is_zero: !machine.lazy_memory && !self.file_backed,
            status: api.migration.clone(),
            link: crate::migration::send::SourceLink {
                tx,
                evt: thread_evt,
            },
        };
        // A diff snapshot after this needs a full one first: the migration reads the log.
        self.dirty_log_consumed = true;
        let spawned = std::thread::Builder::new()
            .name("anvil-migrate".into())
            .spawn(move || crate::migration::send::run(job));
        if let Err(e) = spawned {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                evt.as_raw_fd(),
                EpollEvent::default(),
            );
            return refuse(
                reply,
                ActionError::Failed(format!("cannot start the migration thread: {e}")),
            );
        }
        tracing::info!("live migration started");
        self.migration = Some(OutgoingMigration {
            reply,
            events,
            evt,
            stopped: None,
        });
    }

    /// Serves the migration thread: stops the guest for the last round, and resumes it or
    /// lets it go when the migration ends.
    fn on_migration_events(
        &mut self,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) {
        use crate::migration::send::SourceEvent;
        let Some(run) = self.migration.as_ref() else {
            return;
        };
        let _ = run.evt.read();
        let events: Vec<SourceEvent> = run.events.try_iter().collect();
        for event in events {
            match event {
                SourceEvent::Stop { reply } => {
                    let answer = self.stop_for_migration(devices, vcpu_events, vcpus, machine);
                    let _ = reply.send(answer);
                }
                SourceEvent::Finished(result) => {
                    let Some(run) = self.migration.take() else {
                        return;
                    };
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        run.evt.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    match result {
                        Ok(()) => {
                            self.migrated_at = Some(Instant::now());
                            let _ = run.reply.send(Ok(VmmData::Empty));
                        }
                        Err(why) => {
                            if let Some((was_paused, virtio)) = &run.stopped {
                                devices.resume_virtio(virtio);
                                if !was_paused {
                                    if let Err(e) = self.set_paused(false, vcpu_events, vcpus) {
                                        tracing::error!("cannot resume the guest: {e}");
                                    }
                                }
                            }
                            tracing::info!("the guest keeps running here");
                            let _ = run
                                .reply
                                .send(Err(ActionError::Failed(format!("migration failed: {why}"))));
                        }
                    }
                }
            }
        }
    }

    /// Pauses the vCPUs, quiesces the devices and saves the state for the destination.
    fn stop_for_migration(
        &mut self,
        devices: &DeviceManager,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        machine: &Machine<'_>,
    ) -> Result<Vec<u8>, String> {
        let was_paused = self.paused;
        self.set_paused(true, vcpu_events, vcpus)
            .map_err(|e| format!("cannot pause the guest: {e}"))?;
        let virtio = devices.quiesce_virtio();
        if let Some(run) = self.migration.as_mut() {
            run.stopped = Some((was_paused, virtio.clone()));
        }
        let state = self
            .save_state(devices, vcpu_events, vcpus, machine, virtio)
            .map_err(|e| format!("cannot save the guest's state: {e}"))?;
        crate::snapshot::encode_state(&state).map_err(|e| error_chain(&e))
    }

    /// `PATCH /drives/{id}`: swaps the backing file and/or the rate limiter.
    fn patch_drive(
        &mut self,
        devices: &DeviceManager,
        id: &str,
        patch: PartialDrive,
    ) -> Result<(), ActionError> {
        let api = self.api.as_mut().ok_or(ActionError::VmmGone)?;
        let control = devices
            .block_controls
            .iter()
            .find(|(d, _)| d == id)
            .map(|(_, c)| c)
            .ok_or_else(|| ActionError::State(format!("drive_id: no drive {id:?}")))?;
        let limiter = patch.rate_limiter;
        if let Some(rl) = &limiter {
            check_rate_limiter("rate_limiter", Some(rl))?;
        }
        if let Some(path) = &patch.path_on_host {
            control
                .swap_file(path)
                .map_err(|e| ActionError::Failed(format!("path_on_host: {}", error_chain(&e))))?;
        }
        if let Some(rl) = limiter {
            control.set_rate_limit(rl.to_config());
        }
        if let Some(drive) = api.resources.drives.iter_mut().find(|d| d.drive_id == id) {
            if let Some(path) = patch.path_on_host {
                drive.path_on_host = Some(path);
            }
            if limiter.is_some() {
                drive.rate_limiter = limiter;
            }
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}`: replaces the rate limiters.
    fn patch_net(
        &mut self,
        devices: &DeviceManager,
        id: &str,
        patch: PartialNetworkInterface,
    ) -> Result<(), ActionError> {
        let api = self.api.as_mut().ok_or(ActionError::VmmGone)?;
        let index = api
            .resources
            .nets
            .iter()
            .position(|n| n.iface_id == id)
            .ok_or_else(|| ActionError::State(format!("iface_id: no network interface {id:?}")))?;
        let control = devices
            .net_controls
            .get(index)
            .ok_or_else(|| ActionError::State(format!("iface_id: no network interface {id:?}")))?;
        check_rate_limiter("rx_rate_limiter", patch.rx_rate_limiter.as_ref())?;
        check_rate_limiter("tx_rate_limiter", patch.tx_rate_limiter.as_ref())?;
        let net = &mut api.resources.nets[index];
        if let Some(rl) = patch.rx_rate_limiter {
            control.set_rx_rate_limit(rl.to_config());
            net.rx_rate_limiter = Some(rl);
        }
        if let Some(rl) = patch.tx_rate_limiter {
            control.set_tx_rate_limit(rl.to_config());
            net.tx_rate_limiter = Some(rl);
        }
        Ok(())
    }

    /// Waits until every vCPU has answered: `answer` takes each event and returns the vCPU
    /// it answers for (`Ok(None)`: ignore it), or gives it back for the usual handling.
    /// vCPUs still silent are kicked again every [`KICK_RETRY`], in case a kick landed
    /// between two `KVM_RUN`s.
    fn wait_vcpus(
        &mut self,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
        mut answer: impl FnMut(VcpuEvent) -> Result<Option<u8>, VcpuEvent>,
    ) -> Result<(), ActionError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut answered = std::collections::BTreeSet::new();
        while answered.len() < vcpus.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(ActionError::Failed(format!(
                    "only {} of {} vCPUs answered within {PAUSE_TIMEOUT:?}",
                    answered.len(),
                    vcpus.len()
                )));
            }
            let event = match vcpu_events.recv_timeout(KICK_RETRY.min(deadline - now)) {
                Ok(event) => event,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    for vcpu in vcpus.iter().filter(|v| !answered.contains(&v.id)) {
                        vcpu.kick();
                    }
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ActionError::VmmGone)
                }
            };
            match answer(event) {
                Ok(Some(id)) => {
                    answered.insert(id);
                }
                Ok(None) => {}
                Err(other) => {
                    if let Some(outcome) = self.on_vcpu_event(other, vcpus.len()) {
                        self.outcome = Some(outcome);
                        return Err(ActionError::State("the guest stopped".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Pauses or resumes every vCPU and waits until each has answered.
    fn set_paused(
        &mut self,
        pause: bool,
        vcpu_events: &Receiver<VcpuEvent>,
        vcpus: &[VcpuHandle],
    ) -> Result<(), ActionError> {
        if self.paused == pause {
            return Ok(());
        }
        let started = Instant::now();
        let request = if pause {
            VcpuRequest::Pause
        } else {
            VcpuRequest::Resume
        };
        for vcpu in vcpus {
            vcpu.request(request);
        }
        let result = self.wait_vcpus(vcpu_events, vcpus, |event| match event {
            VcpuEvent::Paused { id } if pause => Ok(Some(id)),
            VcpuEvent::Resumed { id } if !pause => Ok(Some(id)),
            other => Err(other),
        });
        if let Err(e) = result {
            if pause {
                // Leave no vCPU paused behind a failed pause: they all run again.
                for vcpu in vcpus {
                    vcpu.request(VcpuRequest::Resume);
                }
            }
            return Err(e);
        }
        self.paused = pause;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if pause {
            self.metrics.latencies.pause_vm.set(us);
        } else {
            self.metrics.latencies.resume_vm.set(us);
        }
        Ok(())
    }

    fn on_vcpu_event(&mut self, event: VcpuEvent, vcpu_count: usize) -> Option<VmOutcome> {
        match event {
            VcpuEvent::Paused { .. } | VcpuEvent::Resumed { .. } | VcpuEvent::Saved { .. } => None,
            VcpuEvent::Stopped { id, reason } => Some(match reason {
                VcpuStop::GuestReset => VmOutcome::Reset,
                VcpuStop::TripleFault => {
                    VmOutcome::GuestFailure(format!("guest crashed: vCPU {id} triple-faulted"))
                }
                VcpuStop::Failed(why) => {
                    VmOutcome::GuestFailure(format!("vCPU {id} stopped: {why}"))
                }
            }),
            VcpuEvent::Progress { id, idle_forever } => {
                self.progress.insert(id, idle_forever);
                if self.progress.len() < vcpu_count {
                    return None;
                }
                if self.progress.values().all(|&idle| idle) {
                    self.stuck_checks += 1;
                } else {
                    self.stuck_checks = 0;
                }
                self.progress.clear();
                (self.stuck_checks >= STUCK_CHECKS).then(|| {
                    VmOutcome::GuestFailure(
                        "guest stopped making progress: every vCPU is halted with interrupts disabled"
                            .to_string(),
                    )
                })
            }
        }
    }

    fn set_stdin_armed(&mut self, armed: bool) -> Result<(), VmmError> {
        let Some(fd) = self.stdin else { return Ok(()) };
        if armed == self.stdin_armed {
            return Ok(());
        }
        let op = if armed {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, TOKEN_STDIN))
            .map_err(|e| VmmError::EventLoop("watch stdin", e))?;
        self.stdin_armed = armed;
        Ok(())
    }

    fn read_stdin(&mut self, devices: &DeviceManager) -> Result<(), VmmError> {
        let Some(fd) = self.stdin else { return Ok(()) };
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is a valid, writable buffer of the given length; `fd` is the stdin
        // descriptor the caller handed us, which stays open for the process lifetime.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => {
                self.pending_input.extend_from_slice(&buf[..n as usize]);
                self.pending_input.truncate(MAX_PENDING_INPUT);
                self.feed_serial(devices)
            }
            0 => {
                // End of input: stop watching it for good.
                self.set_stdin_armed(false)?;
                self.stdin = None;
                Ok(())
            }
            _ => {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted
                    || err.kind() == std::io::ErrorKind::WouldBlock
                {
                    Ok(())
                } else {
                    tracing::warn!("stdin failed ({err}); guest console input disabled");
                    self.set_stdin_armed(false)?;
                    self.stdin = None;
                    Ok(())
                }
            }
        }
    }

    /// Moves pending host input into the serial FIFO as room allows; stops reading stdin
    /// while input is pending so a guest that does not read cannot make us buffer forever.
    fn feed_serial(&mut self, devices: &DeviceManager) -> Result<(), VmmError> {
        if !self.pending_input.is_empty() {
            let mut serial = devices.serial.lock().unwrap_or_else(|p| p.into_inner());
            let room = serial.input_room().min(self.pending_input.len());
            if room > 0 {
                match serial.enqueue_input(&self.pending_input[..room]) {
                    Ok(n) => {
                        self.pending_input.drain(..n);
                    }
                    Err(e) => tracing::warn!("cannot queue console input: {e}"),
                }
            }
        }
        self.set_stdin_armed(self.pending_input.is_empty())
    }
}
