//! The routes: Firecracker's paths and bodies, mapped to [`VmmAction`]s.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use vmm::rpc::{ActionError, ActionResult, ApiSender, VmmAction, VmmData};

use crate::MAX_BODY_BYTES;

type Api = Arc<ApiSender>;

/// The OpenAPI document of this API, served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// A 400 with Firecracker's error body.
fn fault(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "fault_message": message.into() });
    (status, axum::Json(body)).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    fault(StatusCode::BAD_REQUEST, message)
}

/// Sends `action` to the VMM (blocking this single-threaded runtime, as Firecracker's API
/// thread does: requests are served one at a time) and turns the answer into a response.
fn call(api: &ApiSender, action: VmmAction) -> Response {
    let what = format!("{action:?}");
    respond(&what, api.call(action))
}

/// The response for the VMM's answer to `what`.
fn respond(what: &str, answer: ActionResult) -> Response {
    match answer {
        Ok(VmmData::Empty) => StatusCode::NO_CONTENT.into_response(),
        Ok(VmmData::InstanceInfo(info)) => axum::Json(info).into_response(),
        Ok(VmmData::MachineConfig(m)) => axum::Json(m).into_response(),
        Ok(VmmData::VmConfig(c)) => axum::Json(c).into_response(),
        Ok(VmmData::Migration(m)) => axum::Json(m).into_response(),
        Ok(VmmData::Text(t)) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], t).into_response()
        }
        Err(ActionError::VmmGone) => fault(
            StatusCode::INTERNAL_SERVER_ERROR,
            ActionError::VmmGone.to_string(),
        ),
        Err(e) => {
            tracing::debug!("API request {what:.60} refused: {e}");
            bad_request(e.to_string())
        }
    }
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`]; errors name the field at fault.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            bad_request(format!(
                "request body is larger than the limit of {MAX_BODY_BYTES} bytes"
            ))
        })?;
    if bytes.is_empty() {
        return Err(bad_request("the request needs a JSON body"));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            bad_request(format!("invalid JSON body: {inner}"))
        } else {
            bad_request(format!("invalid JSON body: {path}: {inner}"))
        }
    })
}

macro_rules! body_or_return {
    ($body:expr) => {
        match json_body($body).await {
            Ok(v) => v,
            Err(response) => return response,
        }
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateChange,
}

#[derive(Deserialize)]
enum VmStateChange {
    Paused,
    Resumed,
}

async fn instance_info(State(api): State<Api>) -> Response {
    call(&api, VmmAction::GetInstanceInfo)
}

async fn version() -> Response {
    axum::Json(serde_json::json!({ "firecracker_version": vmm::controller::VMM_VERSION }))
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn get_machine_config(State(api): State<Api>) -> Response {
    call(&api, VmmAction::GetMachineConfig)
}

async fn put_machine_config(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutMachineConfig(body_or_return!(body)))
}

async fn patch_machine_config(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PatchMachineConfig(body_or_return!(body)))
}

async fn put_boot_source(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutBootSource(body_or_return!(body)))
}

async fn put_cpu_config(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutCpuConfig(body_or_return!(body)))
}

async fn put_drive(State(api): State<Api>, Path(id): Path<String>, body: Body) -> Response {
    call(&api, VmmAction::PutDrive(id, body_or_return!(body)))
}

async fn patch_drive(State(api): State<Api>, Path(id): Path<String>, body: Body) -> Response {
    let partial: vmm::resources::PartialDrive = body_or_return!(body);
    if partial.drive_id != id {
        return bad_request(format!(
            "the drive_id in the request body ({:?}) does not match the one in the path ({id:?})",
            partial.drive_id
        ));
    }
    call(&api, VmmAction::PatchDrive(id, partial))
}

async fn put_net(State(api): State<Api>, Path(id): Path<String>, body: Body) -> Response {
    call(&api, VmmAction::PutNet(id, body_or_return!(body)))
}

async fn patch_net(State(api): State<Api>, Path(id): Path<String>, body: Body) -> Response {
    let partial: vmm::resources::PartialNetworkInterface = body_or_return!(body);
    if partial.iface_id != id {
        return bad_request(format!(
            "the iface_id in the request body ({:?}) does not match the one in the path ({id:?})",
            partial.iface_id
        ));
    }
    call(&api, VmmAction::PatchNet(id, partial))
}

async fn put_vsock(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutVsock(body_or_return!(body)))
}

async fn put_entropy(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutEntropy(body_or_return!(body)))
}

async fn put_logger(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutLogger(body_or_return!(body)))
}

async fn put_metrics(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::PutMetrics(body_or_return!(body)))
}

async fn put_actions(State(api): State<Api>, body: Body) -> Response {
    let action: ActionBody = body_or_return!(body);
    let action = match action.action_type {
        ActionType::InstanceStart => VmmAction::InstanceStart,
        ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
        ActionType::FlushMetrics => VmmAction::FlushMetrics,
    };
    call(&api, action)
}

async fn patch_vm(State(api): State<Api>, body: Body) -> Response {
    let change: VmStateBody = body_or_return!(body);
    call(
        &api,
        match change.state {
            VmStateChange::Paused => VmmAction::Pause,
            VmStateChange::Resumed => VmmAction::Resume,
        },
    )
}

async fn create_snapshot(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::CreateSnapshot(body_or_return!(body)))
}

async fn load_snapshot(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::LoadSnapshot(body_or_return!(body)))
}

async fn migration_receive(State(api): State<Api>, body: Body) -> Response {
    call(&api, VmmAction::MigrationReceive(body_or_return!(body)))
}

/// `PUT /migration/send` lasts as long as the migration: its answer is awaited without
/// blocking the API thread, so `GET /migration` is served meanwhile.
async fn migration_send(State(api): State<Api>, body: Body) -> Response {
    let action = VmmAction::MigrationSend(body_or_return!(body));
    let answer = match api.submit(action) {
        Ok(answer) => answer,
        Err(e) => return respond("MigrationSend", Err(e)),
    };
    loop {
        match answer.try_recv() {
            Ok(result) => return respond("MigrationSend", result),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                return respond("MigrationSend", Err(ActionError::VmmGone))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    }
}

async fn get_migration(State(api): State<Api>) -> Response {
    call(&api, VmmAction::GetMigration)
}

async fn get_vm_config(State(api): State<Api>) -> Response {
    call(&api, VmmAction::GetVmConfig)
}

async fn prometheus(State(api): State<Api>) -> Response {
    call(&api, VmmAction::GetPrometheusMetrics)
}

async fn invalid_path(method: Method, uri: Uri) -> Response {
    bad_request(format!(
        "Invalid request method and/or path: {method} {}.",
        uri.path()
    ))
}

/// The API's routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(instance_info))
        .route("/version", get(version))
        .route("/openapi.json", get(openapi))
        .route(
            "/machine-config",
            get(get_machine_config)
                .put(put_machine_config)
                .patch(patch_machine_config),
        )
        .route("/boot-source", put(put_boot_source))
        .route("/cpu-config", put(put_cpu_config))
        .route("/drives/{drive_id}", put(put_drive).patch(patch_drive))
        .route(
            "/network-interfaces/{iface_id}",
            put(put_net).patch(patch_net),
        )
        .route("/vsock", put(put_vsock))
        .route("/entropy", put(put_entropy))
        .route("/logger", put(put_logger))
        .route("/metrics", put(put_metrics))
        .route("/metrics/prometheus", get(prometheus))
        .route("/actions", put(put_actions))
        .route("/vm", axum::routing::patch(patch_vm))
        .route("/vm/config", get(get_vm_config))
        .route("/snapshot/create", put(create_snapshot))
        .route("/snapshot/load", put(load_snapshot))
        .route("/migration", get(get_migration))
        .route("/migration/receive", put(migration_receive))
        .route("/migration/send", put(migration_send))
        .fallback(invalid_path)
        .method_not_allowed_fallback(invalid_path)
        .layer(axum::middleware::from_fn(count_request))
        .with_state(api)
}

/// Counts every request, by method, path family and status, in the VMM's API metrics.
async fn count_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    vmm::metrics::api().record(&method, &path, response.status().as_u16());
    response
}
