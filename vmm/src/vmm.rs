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
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConfigError, CpuTemplateSource, VmConfig};
use crate::controller::error_chain;
use crate::device_manager::{ConsoleOut, DeviceError, DeviceManager};
use crate::kvm::KvmError;
use crate::loader::LoaderError;
use crate::memory::MemoryError;
use crate::resources::{check_rate_limiter, PartialDrive, PartialNetworkInterface, VmResources};
use crate::rpc::{ActionError, ActionResult, ApiReceiver, VmState, VmmAction, VmmData};
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
    /// The `InstanceStart` request, answered once the vCPUs run.
    pub start_reply: Option<Sender<ActionResult>>,
}

/// How a VM's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset or powered off (a clean stop for a microVM).
    Reset,
    /// The guest crashed or stopped making progress.
    GuestFailure(String),
}

/// What `Vmm::configure` produces.
struct Parts {
    devices: DeviceManager,
    vcpus: Vec<Vcpu>,
    vcpu_requests: Vec<std::sync::mpsc::Sender<VcpuRequest>>,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_evt: EventFd,
    protocol: BootProtocol,
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vmm {
    // Kept open for the VM's lifetime.
    _kvm: Kvm,
    _vm: VmFd,
    _guest_memory: GuestMemoryMmap,
    devices: DeviceManager,
    vcpus: Vec<Vcpu>,
    vcpu_requests: Vec<std::sync::mpsc::Sender<VcpuRequest>>,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_evt: EventFd,
    protocol: BootProtocol,
}

/// What a [`PreparedVm`] was made for: a different value needs a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareKey {
    kvm_device: PathBuf,
    mem_size_mib: u64,
    vcpu_count: u8,
}

impl PrepareKey {
    fn of(config: &VmConfig) -> Self {
        Self {
            kvm_device: config.kvm_device.clone(),
            mem_size_mib: config.mem_size_mib,
            vcpu_count: config.vcpu_count,
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
        let kernel = crate::loader::load_kernel(mem, &config.kernel, config.boot_protocol)?;
        let initrd = config
            .initrd
            .as_ref()
            .map(|path| crate::loader::load_initrd(mem, path, &kernel))
            .transpose()?;
        Ok(Self {
            files: files.ok_or_else(|| {
                VmmError::Api("the kernel or initrd file changed while it was loaded".into())
            })?,
            kernel,
            initrd,
        })
    }
}

impl PreparedVm {
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

        let guest_memory = crate::memory::create_guest_memory(config.mem_size_mib)?;
        let loaded = std::thread::scope(|scope| {
            // Installing the first KVM memory slot costs milliseconds on some hosts (the kernel
            // waits for an SRCU grace period): load the kernel meanwhile.
            let slots = scope.spawn(|| crate::memory::register_with_kvm(&vm, &guest_memory));
            let loaded = if config.kernel.as_os_str().is_empty() {
                Ok(None)
            } else {
                Preloaded::load(config, &guest_memory).map(Some)
            };
            slots
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            loaded
        })?;
        Ok(Self {
            key: PrepareKey::of(config),
            kvm,
            vm,
            guest_memory,
            loaded,
        })
    }
}

/// A locally administered unicast MAC address for interface `index` of this VMM process.
fn default_mac(index: usize) -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    [
        0x06,
        0x00,
        pid[1],
        pid[2],
        pid[3],
        u8::try_from(index).unwrap_or(0),
    ]
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
            _kvm: prepared.kvm,
            _vm: prepared.vm,
            _guest_memory: prepared.guest_memory,
            devices: parts.devices,
            vcpus: parts.vcpus,
            vcpu_requests: parts.vcpu_requests,
            vcpu_events: parts.vcpu_events,
            vcpu_events_evt: parts.vcpu_events_evt,
            protocol: parts.protocol,
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
        let Preloaded { kernel, initrd, .. } = match preloaded {
            Some(p) => p,
            None => Preloaded::load(config, guest_memory)?,
        };
        let mut devices = DeviceManager::new(vm, start, Box::new(ConsoleOut))?;
        if config.rng {
            devices.add_virtio_device(vm, guest_memory, "virtio-rng", Box::new(Rng::new()))?;
        }
        let mut cmdline = config.cmdline.clone();
        for (index, disk) in config.disks.iter().enumerate() {
            let block =
                Block::open_limited(&disk.path, disk.read_only, &disk.id, index, disk.rate_limit)?;
            devices
                .block_controls
                .push((disk.id.clone(), block.control()));
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
            let mac = net.mac.unwrap_or_else(|| default_mac(index));
            let device = Net::new_limited(tap, mac, index, net.rx_rate, net.tx_rate);
            devices.net_controls.push(device.control());
            devices.add_virtio_device(vm, guest_memory, "virtio-net", Box::new(device))?;
        }
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(vsock.guest_cid, &vsock.uds_path)?;
            devices.add_virtio_device(vm, guest_memory, "virtio-vsock", Box::new(device))?;
        }
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
            let (req_tx, req_rx) = channel();
            let evt = vcpu_events_evt
                .try_clone()
                .map_err(|e| VmmError::EventLoop("clone the vCPU event fd", e))?;
            vcpus.push(Vcpu::new(
                id,
                fd,
                devices.pio_bus.clone(),
                devices.mmio_bus.clone(),
                events_tx.clone(),
                evt,
                req_rx,
                start,
            ));
            vcpu_requests.push(req_tx);
        }

        Ok(Parts {
            devices,
            vcpus,
            vcpu_requests,
            vcpu_events,
            vcpu_events_evt,
            protocol: kernel.protocol,
        })
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
        mut api: Option<ApiContext>,
    ) -> Result<VmOutcome, VmmError> {
        crate::vcpu::register_kick_handler()?;
        let mut handles = Vec::new();
        for (vcpu, requests) in self.vcpus.drain(..).zip(self.vcpu_requests.drain(..)) {
            handles.push(vcpu.start(requests)?);
        }
        if let Some(reply) = api.as_mut().and_then(|a| a.start_reply.take()) {
            let _ = reply.send(Ok(VmmData::Empty));
        }
        let mut event_loop = EventLoop::new(&self.devices, &self.vcpu_evt_clone()?, console_in)?;
        if let Some(api) = &api {
            event_loop.watch(api.receiver.evt.as_raw_fd(), TOKEN_API)?;
        }
        event_loop.api = api;
        event_loop.run(&self.devices, &self.vcpu_events, &handles)
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

/// How long pausing or resuming waits for every vCPU to answer.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

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
        })
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
    ) -> Result<VmOutcome, VmmError> {
        let mut events = vec![EpollEvent::default(); 8];
        let mut next_check = Instant::now() + PROGRESS_CHECK_INTERVAL;
        loop {
            let timeout = next_check.saturating_duration_since(Instant::now());
            let n = match self.epoll.wait(
                i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
                &mut events,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(VmmError::EventLoop("wait for events", e)),
            };
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
                        self.serve_api(devices, vcpu_events, vcpus);
                        if let Some(outcome) = self.outcome.take() {
                            return Ok(outcome);
                        }
                    }
                    TOKEN_SERIAL_ROOM => {
                        let _ = devices.serial_input_room_evt.read();
                        self.feed_serial(devices)?;
                    }
                    _ => {}
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
    ) {
        let Some(requests) = self.api.as_ref().map(|a| a.receiver.drain()) else {
            return;
        };
        for request in requests {
            let answer = self.runtime_action(request.action, devices, vcpu_events, vcpus);
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
    ) -> ActionResult {
        let state = if self.paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        let Some(api) = self.api.as_ref() else {
            return Err(ActionError::VmmGone);
        };
        match action {
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
            VmmAction::FlushMetrics
            | VmmAction::GetPrometheusMetrics
            | VmmAction::PutMetrics(_) => crate::controller::metrics_action(),
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
        let request = if pause {
            VcpuRequest::Pause
        } else {
            VcpuRequest::Resume
        };
        for vcpu in vcpus {
            vcpu.request(request);
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut answered = std::collections::BTreeSet::new();
        while answered.len() < vcpus.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = vcpu_events.recv_timeout(left).map_err(|_| {
                ActionError::Failed(format!(
                    "only {} of {} vCPUs answered within {PAUSE_TIMEOUT:?}",
                    answered.len(),
                    vcpus.len()
                ))
            })?;
            match event {
                VcpuEvent::Paused { id } if pause => {
                    answered.insert(id);
                }
                VcpuEvent::Resumed { id } if !pause => {
                    answered.insert(id);
                }
                other => {
                    if let Some(outcome) = self.on_vcpu_event(other, vcpus.len()) {
                        self.outcome = Some(outcome);
                        return Err(ActionError::State("the guest stopped".into()));
                    }
                }
            }
        }
        self.paused = pause;
        Ok(())
    }

    fn on_vcpu_event(&mut self, event: VcpuEvent, vcpu_count: usize) -> Option<VmOutcome> {
        match event {
            VcpuEvent::Paused { .. } | VcpuEvent::Resumed { .. } => None,
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
