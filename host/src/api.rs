//! The local HTTP API (`[api] listen`, loopback by default).
//!
//! - `GET /healthz`: 200 while the daemon runs.
//! - `POST /v1/readings`: queue readings, a JSON array or JSON lines, all or none:
//!   200 `{"queued": N}`; 400 naming the record and field; 413 past
//!   [`MAX_INGEST_BYTES`]; 507 when the queue is full (`max_queue_readings`).
//! - `POST /v1/sync[?client=NAME]`: sync now, every Client System or the one named.
//! - `GET /v1/status`: per Client System, what its worker is doing, and the readings
//!   queued for it.
//! - `GET /v1/stats[?hours=N]`: per Client System, what `sync_log` says of the last N
//!   hours (default 24).
//!
//! Errors are JSON: `{"error": "…"}`, with `"record"` for a refused reading.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State as Extract};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use crate::queue::{Queue, QueueFull};
use crate::sync::SharedStatus;

/// Largest request body `POST /v1/readings` accepts.
pub const MAX_INGEST_BYTES: usize = 32 * 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct State {
    /// Each worker's "sync now" trigger, by Client System name.
    pub triggers: Arc<BTreeMap<String, Arc<Notify>>>,
    /// Each worker's status, by Client System name.
    pub statuses: Arc<BTreeMap<String, SharedStatus>>,
    /// The site's id.
    pub site_id: String,
    /// The queue.
    pub queue: Queue,
}

#[derive(Deserialize)]
struct SyncParams {
    client: Option<String>,
}

/// Serves the API until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: State,
    mut stop: watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/v1/readings", post(ingest))
        .route("/v1/sync", post(sync_now))
        .route("/v1/stats", get(stats))
        .route("/v1/status", get(status))
        .layer(DefaultBodyLimit::max(MAX_INGEST_BYTES))
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await;
    if let Err(error) = result {
        tracing::error!("local API failed: {error}");
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "error": message.into() })))
}

async fn ingest(
    Extract(state): Extract<State>,
    body: Result<Bytes, BytesRejection>,
) -> (StatusCode, Json<Value>) {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the request is larger than {MAX_INGEST_BYTES} bytes: send fewer readings per request"
                )
            } else {
                rejection.body_text()
            };
            return error(status, message);
        }
    };
    // Parsing is CPU work proportional to the body: keep it off the async threads.
    let parsed = tokio::task::spawn_blocking(move || crate::reading::parse_body(&body)).await;
    let readings = match parsed {
        Ok(Ok(readings)) => readings,
        Ok(Err(invalid)) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "error": format!("{invalid}; nothing was queued"),
                    "record": invalid.record,
                })),
            );
        }
        Err(join) => return error(StatusCode::INTERNAL_SERVER_ERROR, join.to_string()),
    };
    match state.queue.enqueue(&readings).await {
        Ok(count) => (StatusCode::OK, Json(json!({ "queued": count }))),
        Err(e) => match e.downcast_ref::<QueueFull>() {
            Some(full) => error(StatusCode::INSUFFICIENT_STORAGE, full.to_string()),
            None => {
                tracing::error!("ingest failed: {e:#}");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("nothing was queued: {e:#}"),
                )
            }
        },
    }
}

async fn status(Extract(state): Extract<State>) -> (StatusCode, Json<Value>) {
    let mut client_systems = Vec::new();
    for (name, shared) in state.statuses.iter() {
        let snapshot = shared
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut entry = match serde_json::to_value(&snapshot) {
            Ok(entry) => entry,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        match state.queue.queued_for(name).await {
            Ok(queued) => entry["queued"] = json!(queued),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        }
        client_systems.push(entry);
    }
    (
        StatusCode::OK,
        Json(json!({
            "site_id": state.site_id,
            "daemon_version": env!("CARGO_PKG_VERSION"),
            "client_systems": client_systems,
        })),
    )
}

#[derive(Deserialize)]
struct StatsParams {
    hours: Option<f64>,
}

async fn stats(
    Extract(state): Extract<State>,
    Query(params): Query<StatsParams>,
) -> (StatusCode, Json<Value>) {
    let hours = params.hours.unwrap_or(24.0);
    if !(hours.is_finite() && hours > 0.0) {
        return error(StatusCode::BAD_REQUEST, "hours must be a positive number");
    }
    let since = crate::clock::now_ms() - (hours * 3_600_000.0) as i64;
    match state.queue.stats_since(since).await {
        Ok(stats) => (
            StatusCode::OK,
            Json(json!({ "hours": hours, "client_systems": stats })),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn sync_now(
    Extract(state): Extract<State>,
    Query(params): Query<SyncParams>,
) -> (StatusCode, Json<Value>) {
    match params.client {
        Some(name) => match state.triggers.get(&name) {
            Some(trigger) => {
                trigger.notify_one();
                (StatusCode::ACCEPTED, Json(json!({ "triggered": [name] })))
            }
            None => (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": format!("no client system named \"{name}\"") })),
            ),
        },
        None => {
            for trigger in state.triggers.values() {
                trigger.notify_one();
            }
            let names: Vec<&String> = state.triggers.keys().collect();
            (StatusCode::ACCEPTED, Json(json!({ "triggered": names })))
        }
    }
}
