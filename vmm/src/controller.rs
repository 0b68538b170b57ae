//! The VMM side of the API before the guest starts: requests build up [`VmResources`] until
//! `InstanceStart` (or a configuration file) builds the VM, which then serves the requests
//! that make sense for a running VM from its event loop.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::config::VmConfig;
use crate::metrics::MetricsWriter;
use crate::vmm::{MemorySource, PreparedVm};

use crate::migration::receive::{receive, Incoming, ReceiveSettings};
use crate::migration::{
    MigrationError, MigrationReceiveParams, MigrationState, MigrationStatus, MigrationUrl,
    SharedStatus,
};
use crate::resources::{
    FullVmConfiguration, HugePages, MemBackendType, ResourceError, SnapshotLoadParams, VmResources,
};
use crate::rpc::{
    ActionError, ActionResult, ApiReceiver, ApiRequest, InstanceInfo, VmState, VmmAction, VmmData,
};
use crate::vmm::{ApiContext, VmOutcome, Vmm, VmmError};
use vmm_sys_util::eventfd::EventFd;

/// anvil's version, as `GET /` and `GET /version` report it.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `GET /` for the given state.
pub fn instance_info(id: &str, state: VmState) -> InstanceInfo {
    InstanceInfo {
        app_name: "anvil".to_string(),
        id: id.to_string(),
        state,
        vmm_version: VMM_VERSION.to_string(),
    }
}

/// Builds the VM described by `resources`, from `prepared` where it fits.
fn build(
    resources: &VmResources,
    start: Instant,
    prepared: Option<PreparedVm>,
) -> Result<Vmm, ActionError> {
    let config = resources.vm_config()?;
    if crate::kvm::host_emulates_guest_kernel() {
        tracing::warn!(
            "this host's KVM (kvm_pvm) emulates guest kernel code: a Linux guest will boot very slowly here"
        );
    }
    Vmm::build_from(&config, start, prepared).map_err(|e| ActionError::Start(error_chain(&e)))
}

/// What a VM is prepared for ahead of InstanceStart: the machine and the boot files.
#[derive(Debug, Clone, PartialEq)]
struct PrepareSpec {
    kvm_device: PathBuf,
    mem_size_mib: u64,
    vcpu_count: u8,
    track_dirty_pages: bool,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
}

/// Prepares the VM on a helper thread while the client is still configuring it, so that
/// InstanceStart finds the KVM VM, its memory and the loaded kernel ready (see
/// [`PreparedVm`]). A change to the machine or the boot source starts a new preparation;
/// the old one is dropped when its thread ends.
#[derive(Debug, Default)]
struct Preparer {
    current: Option<(PrepareSpec, JoinHandle<Result<PreparedVm, VmmError>>)>,
}

impl Preparer {
    fn update(&mut self, resources: &VmResources) {
        let Ok(vcpu_count) = crate::config::validate_vcpu_count(resources.machine.vcpu_count)
        else {
            return;
        };
        let spec = PrepareSpec {
            kvm_device: resources
                .kvm_device
                .clone()
                .unwrap_or_else(|| PathBuf::from("/dev/kvm")),
            mem_size_mib: resources.machine.mem_size_mib,
            vcpu_count,
            track_dirty_pages: resources.machine.track_dirty_pages,
            kernel: resources
                .boot_source
                .as_ref()
                .map(|b| b.kernel_image_path.clone())
                .unwrap_or_default(),
            initrd: resources
                .boot_source
                .as_ref()
                .and_then(|b| b.initrd_path.clone()),
        };
        if self.current.as_ref().is_some_and(|(s, _)| *s == spec) {
            return;
        }
        let config = VmConfig {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            vcpu_count,
            mem_size_mib: spec.mem_size_mib,
            kvm_device: spec.kvm_device.clone(),
            track_dirty_pages: spec.track_dirty_pages,
            ..VmConfig::default()
        };
        // The same machine, prepared without a kernel, and now a kernel: load it into that
        // VM instead of making another (its memory holds nothing yet).
        let previous = self.current.take().and_then(|(old, handle)| {
            let same_machine = old.kvm_device == spec.kvm_device
                && old.mem_size_mib == spec.mem_size_mib
                && old.vcpu_count == spec.vcpu_count
                && old.track_dirty_pages == spec.track_dirty_pages;
            if same_machine && old.kernel.as_os_str().is_empty() {
                Some(handle)
            } else {
                discard(handle);
                None
            }
        });
        let work = move || match previous.map(JoinHandle::join) {
            Some(Ok(Ok(prepared))) => prepared.with_kernel(&config),
            _ => PreparedVm::new(&config),
        };
        match std::thread::Builder::new()
            .name("anvil-prepare".into())
            .spawn(work)
        {
            Ok(handle) => self.current = Some((spec, handle)),
            Err(e) => {
                tracing::debug!("cannot start preparing the VM: {e}");
                self.current = None;
            }
        }
    }

    /// Drops the preparation, if any, off the calling thread (see [`discard`]).
    fn discard(&mut self) {
        if let Some((_, handle)) = self.current.take() {
            discard(handle);
        }
    }

    /// The prepared VM, waiting for the preparation to finish; `None` if it failed (the
    /// build then fails with the real error or succeeds from scratch).
    fn take(&mut self) -> Option<PreparedVm> {
        let (_, handle) = self.current.take()?;
        match handle.join() {
            Ok(Ok(prepared)) => Some(prepared),
            Ok(Err(e)) => {
                tracing::debug!("preparing the VM failed: {}", error_chain(&e));
                None
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Drops a preparation on a short-lived thread: closing a VM fd can wait for a grace period
/// (15 ms on this PVM host), which the request that made the preparation stale (or a
/// snapshot load) should not pay.
fn discard(handle: JoinHandle<Result<PreparedVm, VmmError>>) {
    let spawned = std::thread::Builder::new()
        .name("anvil-discard".into())
        .spawn(move || drop(handle.join()));
    if let Err(e) = spawned {
        tracing::debug!("cannot discard the prepared VM on a thread: {e}");
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// `PUT /snapshot/load`: the VM of a snapshot, and the resources it was configured with.
fn load_snapshot(
    params: &SnapshotLoadParams,
    resources: &VmResources,
    start: Instant,
) -> Result<(Vmm, VmResources), ActionError> {
    let fail = |e: &dyn std::error::Error| ActionError::Failed(error_chain(e));
    let mem_file = match (&params.mem_backend, &params.mem_file_path) {
        (Some(_), Some(_)) => {
            return Err(ActionError::Failed(
                "give mem_backend or mem_file_path, not both".into(),
            ))
        }
        (Some(b), None) if b.backend_type == MemBackendType::Uffd => {
            MemorySource::Uffd(b.backend_path.clone())
        }
        (Some(b), None) => MemorySource::File(b.backend_path.clone()),
        (None, Some(path)) => MemorySource::File(path.clone()),
        (None, None) => {
            return Err(ActionError::Failed(
                "mem_backend: the memory file is missing".into(),
            ))
        }
    };
    if !params.network_overrides.is_empty() || params.vsock_override.is_some() {
        return Err(ActionError::Failed(
            "network_overrides/vsock_override: snapshots with devices are not supported yet".into(),
        ));
    }
    if params.huge_pages.is_some_and(|h| h != HugePages::None) {
        return Err(ActionError::Resource(ResourceError::Unsupported(
            "huge_pages other than None",
        )));
    }
    let state = crate::snapshot::read_state(&params.snapshot_path).map_err(|e| fail(&e))?;
    let full: FullVmConfiguration = serde_json::from_str(&state.config_json)
        .map_err(|e| ActionError::Failed(format!("invalid configuration in the snapshot: {e}")))?;
    let kvm_device = resources
        .kvm_device
        .clone()
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"));
    let track = params.enable_diff_snapshots || params.track_dirty_pages;
    let mut saved = VmResources::from_saved(full);
    saved.seccomp_level = resources.seccomp_level;
    let config = saved.vm_config()?;
    let mut vmm = Vmm::restore(&state, &config, &mem_file, &kvm_device, track, start)
        .map_err(|e| fail(&e))?;
    vmm.set_seccomp_level(resources.seccomp_level);
    saved.kvm_device = resources.kvm_device.clone();
    saved.machine.track_dirty_pages = track;
    Ok((vmm, saved))
}

/// Applies an action that is valid before the VM starts.
fn handle_pre_boot(
    resources: &mut VmResources,
    metrics: &mut Option<MetricsWriter>,
    id: &str,
    action: VmmAction,
) -> ActionResult {
    match action {
        VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(instance_info(
            id,
            VmState::NotStarted,
        ))),
        VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(resources.machine.clone())),
        VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(resources.full_config()))),
        VmmAction::PutMachineConfig(m) => empty(resources.set_machine_config(m)),
        VmmAction::PatchMachineConfig(u) => empty(resources.update_machine_config(u)),
        VmmAction::PutBootSource(b) => empty(resources.set_boot_source(b)),
        VmmAction::PutCpuConfig(c) => empty(resources.set_cpu_config(c)),
        VmmAction::PutDrive(path_id, d) => empty(resources.put_drive(&path_id, d)),
        VmmAction::PutNet(path_id, n) => empty(resources.put_net(&path_id, n)),
        VmmAction::PutVsock(v) => empty(resources.set_vsock(v)),
        VmmAction::PutEntropy(e) => empty(resources.set_entropy(e)),
        VmmAction::PutLogger(l) => {
            crate::logger::configure(&l).map_err(|e| ActionError::Failed(error_chain(&e)))?;
            resources.logger = Some(l);
            Ok(VmmData::Empty)
        }
        VmmAction::PutMetrics(m) => {
            if metrics.is_some() {
                return Err(ActionError::State(
                    "the metrics system is already initialized".into(),
                ));
            }
            let writer = MetricsWriter::open(&m.metrics_path)
                .map_err(|e| ActionError::Failed(error_chain(&e)))?;
            *metrics = Some(writer);
            resources.metrics = Some(m);
            Ok(VmmData::Empty)
        }
        VmmAction::FlushMetrics => match metrics {
            Some(writer) => writer
                .flush(None)
                .map(|()| VmmData::Empty)
                .map_err(|e| ActionError::Failed(error_chain(&e))),
            None => Err(ActionError::State(
                "FlushMetrics: no metrics path is configured".into(),
            )),
        },
        VmmAction::GetPrometheusMetrics => Ok(VmmData::Text(crate::metrics::prometheus(None))),
        VmmAction::PatchDrive(..) => Err(ActionError::PostBootOnly("PATCH /drives")),
        VmmAction::PatchNet(..) => Err(ActionError::PostBootOnly("PATCH /network-interfaces")),
        VmmAction::SendCtrlAltDel => Err(ActionError::PostBootOnly("SendCtrlAltDel")),
        VmmAction::Pause | VmmAction::Resume => Err(ActionError::PostBootOnly("PATCH /vm")),
        VmmAction::CreateSnapshot(_) => Err(ActionError::PostBootOnly("PUT /snapshot/create")),
        VmmAction::MigrationSend(_) => Err(ActionError::PostBootOnly("PUT /migration/send")),
        VmmAction::InstanceStart
        | VmmAction::LoadSnapshot(_)
        | VmmAction::MigrationReceive(_)
        | VmmAction::GetMigration => {
            unreachable!("InstanceStart, LoadSnapshot and migration are handled by the caller")
        }
    }
}

fn empty(r: Result<(), crate::resources::ResourceError>) -> ActionResult {
    r.map(|()| VmmData::Empty).map_err(ActionError::from)
}

/// An incoming live migration: the thread receiving it reports here.
struct IncomingMigration {
    done: std::sync::mpsc::Receiver<Result<Box<Incoming>, String>>,
    evt: EventFd,
}

/// What the pre-boot loop waits for.
enum PreBootEvent {
    /// An API request.
    Api(Box<ApiRequest>),
    /// The incoming migration ended.
    Incoming(Result<Box<Incoming>, String>),
    /// The API server is gone.
    Closed,
}

/// Waits for the next API request or the end of the incoming migration.
fn next_event(api: &ApiReceiver, incoming: Option<&IncomingMigration>) -> PreBootEvent {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc::TryRecvError;
    let Some(incoming) = incoming else {
        return api
            .rx
            .recv()
            .map_or(PreBootEvent::Closed, |r| PreBootEvent::Api(Box::new(r)));
    };
    loop {
        match incoming.done.try_recv() {
            Ok(result) => return PreBootEvent::Incoming(result),
            Err(TryRecvError::Disconnected) => {
                return PreBootEvent::Incoming(Err("the receiving thread ended".into()))
            }
            Err(TryRecvError::Empty) => {}
        }
        match api.rx.try_recv() {
            Ok(request) => return PreBootEvent::Api(Box::new(request)),
            Err(TryRecvError::Disconnected) => return PreBootEvent::Closed,
            Err(TryRecvError::Empty) => {}
        }
        let mut fds = [
            libc::pollfd {
                fd: api.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: incoming.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let _ = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        // Clear both counters; the channels are read again above, so nothing is missed.
        let _ = api.evt.read();
        let _ = incoming.evt.read();
    }
}

/// `PUT /migration/receive`: listens at once (so a bad address is reported) and receives
/// on a thread.
fn start_receiving(
    params: &MigrationReceiveParams,
    resources: &VmResources,
    status: &SharedStatus,
    start: Instant,
) -> Result<IncomingMigration, ActionError> {
    let url = MigrationUrl::parse("receiver_url", &params.receiver_url)
        .map_err(|e| ActionError::Failed(e.to_string()))?;
    for o in &params.network_overrides {
        crate::resources::check_tap(&o.host_dev_name)?;
    }
    let listener = url
        .listen()
        .map_err(|e| ActionError::Failed(error_chain(&e)))?;
    let evt = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| ActionError::Failed(format!("eventfd: {e}")))?;
    let thread_evt = evt
        .try_clone()
        .map_err(|e| ActionError::Failed(format!("eventfd: {e}")))?;
    let (tx, done) = std::sync::mpsc::channel();
    let settings = ReceiveSettings {
        kvm_device: resources.kvm_device.clone(),
        seccomp_level: resources.seccomp_level,
        network_overrides: params.network_overrides.clone(),
        vsock_override: params.vsock_override.as_ref().map(|v| v.uds_path.clone()),
    };
    crate::migration::update(status, |s| {
        *s = MigrationStatus {
            state: MigrationState::Receiving,
            role: Some("destination"),
            url: Some(params.receiver_url.clone()),
            ..Default::default()
        };
    });
    let status = status.clone();
    std::thread::Builder::new()
        .name("anvil-receive".into())
        .spawn(move || {
            let accepted = listener.accept().map_err(|e| MigrationError::Connect {
                what: "accept on",
                url: format!("{url:?}"),
                source: e,
            });
            let began = Instant::now();
            drop(listener);
            let result = accepted.and_then(|stream| receive(stream, &settings, &status, start));
            let total_ms = began.elapsed().as_secs_f64() * 1000.0;
            let error = result.as_ref().err().map(|e| error_chain(e));
            match &error {
                None => tracing::info!("migration received: the guest runs here"),
                Some(why) => tracing::warn!("migration refused: {why}"),
            }
            // The outcome reaches the controller before `GET /migration` reports it: a client
            // that sees "failed" and asks to receive again must find the receiver free.
            let _ = tx.send(result.map(Box::new).map_err(|e| error_chain(&e)));
            let _ = thread_evt.write(1);
            crate::migration::update(&status, |s| {
                s.total_ms = Some(total_ms);
                match error {
                    None => s.state = MigrationState::Completed,
                    Some(why) => {
                        s.state = MigrationState::Failed;
                        s.error = Some(why);
                    }
                }
            });
        })
        .map_err(|e| ActionError::Failed(format!("cannot start the receiving thread: {e}")))?;
    Ok(IncomingMigration { done, evt })
}

/// Serves API requests on the calling thread until `InstanceStart` succeeds, then runs the
/// VM (still serving requests) until it stops. With `boot_now` the VM is built from the
/// resources at once (a configuration file).
pub fn run(
    mut resources: VmResources,
    api: Option<ApiReceiver>,
    instance_id: &str,
    boot_now: bool,
    console_in: Option<std::os::fd::RawFd>,
    start: Instant,
) -> Result<VmOutcome, VmmError> {
    crate::metrics::api()
        .process_startup_time_us
        .set(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    let mut metrics = resources
        .metrics
        .as_ref()
        .map(|m| MetricsWriter::open(&m.metrics_path))
        .transpose()?;
    let mut start_paused = false;
    let migration = crate::migration::SharedStatus::default();
    let (mut vmm, start_reply): (Vmm, Option<Sender<ActionResult>>) = if boot_now {
        let vmm = build(&resources, start, None).map_err(|e| VmmError::Api(e.to_string()))?;
        (vmm, None)
    } else {
        let Some(api) = api.as_ref() else {
            return Err(VmmError::Api(
                "nothing to boot: no configuration file and no API socket".into(),
            ));
        };
        // Preparation starts with the first request that configures a boot, not at process
        // start: it would compete with start-up and with a snapshot load, which needs none.
        let mut preparer = Preparer::default();
        let mut incoming: Option<IncomingMigration> = None;
        loop {
            let request = match next_event(api, incoming.as_ref()) {
                PreBootEvent::Closed => {
                    return Err(VmmError::Api("the API server stopped".into()));
                }
                PreBootEvent::Incoming(Ok(received)) => {
                    let received = *received;
                    resources = received.resources;
                    break (received.vmm, None);
                }
                PreBootEvent::Incoming(Err(why)) => {
                    tracing::warn!("incoming migration failed: {why}");
                    incoming = None;
                    continue;
                }
                PreBootEvent::Api(request) => *request,
            };
            match &request.action {
                VmmAction::GetMigration => {
                    let status = crate::migration::snapshot(&migration);
                    let _ = request.reply.send(Ok(VmmData::Migration(status)));
                    continue;
                }
                VmmAction::MigrationReceive(params) => {
                    let answer = if incoming.is_some() {
                        Err(ActionError::State(
                            "a live migration is being received already".into(),
                        ))
                    } else {
                        start_receiving(params, &resources, &migration, start).map(|m| {
                            incoming = Some(m);
                            // The VM comes from the source: a prepared one is not needed.
                            preparer.discard();
                            VmmData::Empty
                        })
                    };
                    let _ = request.reply.send(answer);
                    continue;
                }
                VmmAction::InstanceStart | VmmAction::LoadSnapshot(_) if incoming.is_some() => {
                    let _ = request.reply.send(Err(ActionError::State(
                        "a live migration is being received".into(),
                    )));
                    continue;
                }
                _ => {}
            }
            if let VmmAction::LoadSnapshot(params) = &request.action {
                preparer.discard();
                match load_snapshot(params, &resources, start) {
                    Ok((vmm, saved)) => {
                        resources = saved;
                        start_paused = !params.resume_vm;
                        break (vmm, Some(request.reply));
                    }
                    Err(e) => {
                        tracing::warn!("snapshot load failed: {e}");
                        let _ = request.reply.send(Err(e));
                    }
                }
                continue;
            }
            if request.action == VmmAction::InstanceStart {
                match build(&resources, start, preparer.take()) {
                    Ok(vmm) => break (vmm, Some(request.reply)),
                    Err(e) => {
                        tracing::warn!("InstanceStart failed: {e}");
                        let _ = request.reply.send(Err(e));
                        preparer.update(&resources);
                    }
                }
            } else {
                let boot_config = matches!(
                    request.action,
                    VmmAction::PutMachineConfig(_)
                        | VmmAction::PatchMachineConfig(_)
                        | VmmAction::PutBootSource(_)
                );
                let answer =
                    handle_pre_boot(&mut resources, &mut metrics, instance_id, request.action);
                if answer.is_ok() && boot_config {
                    preparer.update(&resources);
                }
                // A client that hung up needs no answer.
                let _ = request.reply.send(answer);
            }
        }
    };
    vmm.set_metrics_writer(metrics);
    let context = api.map(|receiver| ApiContext {
        receiver,
        resources,
        instance_id: instance_id.to_string(),
        start_reply,
        start_paused,
        migration,
    });
    vmm.run(console_in, context)
}
