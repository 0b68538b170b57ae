//! Typed requests from the API thread to the VMM and their answers. The API server turns
//! HTTP into a [`VmmAction`], sends it with [`ApiSender::call`] and waits; the VMM thread
//! receives it on its [`ApiReceiver`] (an eventfd wakes its event loop) and answers on the
//! request's own channel. No HTTP type crosses this boundary.

use std::sync::mpsc::{channel, Receiver, Sender};

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::migration::{MigrationReceiveParams, MigrationSendParams, MigrationStatus};
use crate::resources::{
    BootSource, Drive, EntropyDevice, FullVmConfiguration, Logger, MachineConfig,
    MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface,
    ResourceError, SnapshotCreateParams, SnapshotLoadParams, Vsock,
};

/// What a client asks the VMM to do.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /cpu-config`.
    PutCpuConfig(serde_json::Value),
    /// `PUT /drives/{id}`: the path's ID and the body.
    PutDrive(String, Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(String, PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNet(String, NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNet(String, PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /actions InstanceStart`.
    InstanceStart,
    /// `PUT /actions SendCtrlAltDel`.
    SendCtrlAltDel,
    /// `PUT /actions FlushMetrics`.
    FlushMetrics,
    /// `PATCH /vm Paused`.
    Pause,
    /// `PATCH /vm Resumed`.
    Resume,
    /// `GET /metrics/prometheus` (Anvil extension).
    GetPrometheusMetrics,
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `PUT /migration/receive` (Anvil extension).
    MigrationReceive(MigrationReceiveParams),
    /// `PUT /migration/send` (Anvil extension).
    MigrationSend(MigrationSendParams),
    /// `GET /migration` (Anvil extension).
    GetMigration,
}

/// The VM's state as Firecracker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Not booted yet.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// "anvil".
    pub app_name: String,
    /// The `--id` given at start.
    pub id: String,
    /// State.
    pub state: VmState,
    /// anvil's version.
    pub vmm_version: String,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    /// Nothing to return (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /vm/config`.
    VmConfig(Box<FullVmConfiguration>),
    /// Plain text (Prometheus exposition).
    Text(String),
    /// `GET /migration`.
    Migration(MigrationStatus),
}

/// Why an action failed; the text is the `fault_message`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    /// The resource update is invalid.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// The action is only possible before the VM starts.
    #[error("{0} is only possible before the microVM starts")]
    PreBootOnly(&'static str),
    /// The action is only possible once the VM runs.
    #[error("{0} is only possible after the microVM starts")]
    PostBootOnly(&'static str),
    /// The VM is not in a state that allows the action.
    #[error("{0}")]
    State(String),
    /// Starting the VM failed.
    #[error("cannot start the microVM: {0}")]
    Start(String),
    /// An operation on a running device or subsystem failed.
    #[error("{0}")]
    Failed(String),
    /// The VMM is gone (it stopped while the request was in flight).
    #[error("the VMM is not running any more")]
    VmmGone,
}

/// The answer to one request.
pub type ActionResult = Result<VmmData, ActionError>;

/// One request in flight.
#[derive(Debug)]
pub struct ApiRequest {
    /// What to do.
    pub action: VmmAction,
    /// Where the answer goes.
    pub reply: Sender<ActionResult>,
}

/// The API side of the channel.
#[derive(Debug)]
pub struct ApiSender {
    tx: Sender<ApiRequest>,
    evt: EventFd,
}

/// The VMM side of the channel.
#[derive(Debug)]
pub struct ApiReceiver {
    /// Requests.
    pub rx: Receiver<ApiRequest>,
    /// Readable when requests are waiting.
    pub evt: EventFd,
}

/// A connected pair.
pub fn api_channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = channel();
    Ok((
        ApiSender {
            tx,
            evt: evt.try_clone()?,
        },
        ApiReceiver { rx, evt },
    ))
}

impl ApiSender {
    /// Sends `action` and waits for the VMM's answer.
    pub fn call(&self, action: VmmAction) -> ActionResult {
        self.submit(action)?
            .recv()
            .map_err(|_| ActionError::VmmGone)?
    }

    /// Sends `action` without waiting: the answer arrives on the returned channel (for
    /// requests that last, such as `PUT /migration/send`, while others are served).
    pub fn submit(&self, action: VmmAction) -> Result<Receiver<ActionResult>, ActionError> {
        let (reply, answer) = channel();
        self.tx
            .send(ApiRequest { action, reply })
            .map_err(|_| ActionError::VmmGone)?;
        if self.evt.write(1).is_err() {
            return Err(ActionError::VmmGone);
        }
        Ok(answer)
    }
}

impl ApiReceiver {
    /// Takes the waiting requests (clearing the eventfd first, so none is missed).
    pub fn drain(&self) -> Vec<ApiRequest> {
        let _ = self.evt.read();
        self.rx.try_iter().collect()
    }
}
