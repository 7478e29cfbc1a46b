//! The local HTTP API (`[api] listen`, loopback by default).
//!
//! - `GET /healthz`: 200 while the daemon runs.
//! - `POST /v1/readings`: queue readings, a JSON array or JSON lines, all or none:
//!   200 `{"queued": N}`; 400 naming the record and field; 413 past
//!   [`MAX_INGEST_BYTES`]; 507 when the queue is full (`max_queue_readings`).
//! - `POST /v1/sync[?client=NAME]`: sync now, every Client System or the one named.
//! - `GET /v1/status`: per Client System, what its worker is doing, and the readings
//!   queued for it; and the configuration's reload state.
//! - `GET /metrics`: counters, gauges and histograms in the Prometheus text format.
//! - `POST /v1/reload`: reload `sync.toml` and the plugins now: 200 with what changed,
//!   422 with why when the file or a plugin is refused (what runs stays).
//! - `GET /v1/stats[?hours=N]`: per Client System, what `sync_log` says of the last N
//!   hours (default 24).
//!
//! Errors are JSON: `{"error": "…"}`, with `"record"` for a refused reading. With
//! `[api] token` set, every request but `GET /healthz` must carry
//! `Authorization: Bearer <token>`, or is answered 401.

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
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::queue::{Queue, QueueFull};
use crate::supervisor::{ReloadRequest, SharedConfigStatus};
use crate::sync::SharedStatus;

/// Largest request body `POST /v1/readings` accepts.
pub const MAX_INGEST_BYTES: usize = 32 * 1024 * 1024;

/// A running worker, as the API reaches it.
#[derive(Clone)]
pub struct Handle {
    /// Notified to sync now.
    pub trigger: Arc<Notify>,
    /// What it says of itself.
    pub status: SharedStatus,
}

/// The running workers by Client System name; the supervisor adds and removes them.
pub type Workers = Arc<std::sync::RwLock<BTreeMap<String, Handle>>>;

/// What the handlers share.
#[derive(Clone)]
pub struct State {
    /// The running workers.
    pub workers: Workers,
    /// The configuration's reload state.
    pub config: SharedConfigStatus,
    /// The daemon's clock.
    pub clock: crate::clock::Clock,
    /// The queue.
    pub queue: Queue,
    /// Where reload requests go.
    pub reload: mpsc::UnboundedSender<ReloadRequest>,
    /// Readings queued through `POST /v1/readings` since the start.
    pub ingested: Arc<std::sync::atomic::AtomicU64>,
    /// The bearer token requests must carry (`[api] token`), if any.
    pub token: Option<crate::config::Secret>,
}

impl State {
    fn workers(&self) -> BTreeMap<String, Handle> {
        self.workers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
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
        .route("/v1/reload", post(reload))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_INGEST_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
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
        Ok(count) => {
            state
                .ingested
                .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
            (StatusCode::OK, Json(json!({ "queued": count })))
        }
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
    for (name, handle) in state.workers() {
        let snapshot = handle
            .status
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_of(state.clock.now_ms());
        let mut entry = match serde_json::to_value(&snapshot) {
            Ok(entry) => entry,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        match state.queue.queued_for(&name).await {
            Ok(queued) => entry["queued"] = json!(queued),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        }
        client_systems.push(entry);
    }
    let config = state
        .config
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let processes = match state.queue.processes().await {
        Ok(processes) => processes,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    (
        StatusCode::OK,
        Json(json!({
            "site_id": config.site_id,
            "daemon_version": env!("CARGO_PKG_VERSION"),
            "process": state.queue.process_name(),
            "config": config,
            "client_systems": client_systems,
            "processes": processes,
        })),
    )
}

/// Refuses a request without the bearer token, when one is set (`GET /healthz` is
/// always open, for health checks).
async fn require_token(
    Extract(state): Extract<State>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same_secret(given.as_bytes(), token.expose().as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let (status, body) = error(
                StatusCode::UNAUTHORIZED,
                "this API needs the bearer token set in [api] token",
            );
            (
                status,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                body,
            )
                .into_response()
        }
    }
}

/// Compares secrets in a time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    let workers = state.workers();
    match params.client {
        Some(name) => match workers.get(&name).map(|h| &h.trigger) {
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
            for handle in workers.values() {
                handle.trigger.notify_one();
            }
            let names: Vec<&String> = workers.keys().collect();
            (StatusCode::ACCEPTED, Json(json!({ "triggered": names })))
        }
    }
}

async fn reload(Extract(state): Extract<State>) -> (StatusCode, Json<Value>) {
    let (reply, outcome) = oneshot::channel();
    if state.reload.send(reply).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        );
    }
    match outcome.await {
        Ok(Ok(report)) if report.refused.is_empty() => (StatusCode::OK, Json(json!(report))),
        Ok(Ok(report)) => {
            let mut body = json!(report);
            body["error"] = json!(report.refused.join("; "));
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body))
        }
        Ok(Err(reason)) => error(StatusCode::UNPROCESSABLE_ENTITY, reason),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        ),
    }
}

async fn metrics(Extract(state): Extract<State>) -> axum::response::Response {
    use crate::metrics::Exposition;
    use axum::response::IntoResponse;

    let now = state.clock.now_ms();
    let mut out = Exposition::default();
    out.counter(
        "syncd_readings_ingested_total",
        "Readings queued through the local API since the start.",
        &[],
        state.ingested.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    for (name, handle) in state.workers() {
        let s = handle
            .status
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_of(now);
        let cs = [("client_system", name.as_str())];
        let m = &s.metrics;
        match state.queue.queued_for(&name).await {
            Ok(queued) => out.gauge(
                "syncd_queue_depth",
                "Readings queued for the Client System and not yet acknowledged by it.",
                &cs,
                queued as f64,
            ),
            Err(e) => tracing::warn!("metrics: cannot read the queue: {e:#}"),
        }
        out.counter(
            "syncd_readings_delivered_total",
            "Readings delivered and acknowledged since the start.",
            &cs,
            m.readings_delivered as f64,
        );
        out.counter(
            "syncd_batches_delivered_total",
            "Batches delivered and acknowledged since the start.",
            &cs,
            m.batches_delivered as f64,
        );
        out.counter(
            "syncd_readings_dead_lettered_total",
            "Readings moved to dead letters since the start.",
            &cs,
            m.readings_dead_lettered as f64,
        );
        for outcome in [
            "accepted",
            "retry",
            "unreachable",
            "unauthorized",
            "rejected",
            "plugin_failed",
        ] {
            out.counter(
                "syncd_attempts_total",
                "Delivery attempts by outcome since the start (retry: will be retried).",
                &[("client_system", name.as_str()), ("outcome", outcome)],
                m.attempts.get(outcome).copied().unwrap_or(0) as f64,
            );
        }
        out.histogram(
            "syncd_attempt_seconds",
            "How long a delivery attempt took, encoding and upload.",
            &cs,
            &m.attempt_seconds,
        );
        for (plugin, histogram) in [
            ("encoder", &m.encoder_seconds),
            ("transport", &m.transport_seconds),
        ] {
            let labels = [("client_system", name.as_str()), ("plugin", plugin)];
            out.histogram(
                "syncd_plugin_call_seconds",
                "How long a call into a plugin (encode, upload) took.",
                &labels,
                histogram,
            );
            out.counter(
                "syncd_plugin_traps_total",
                "Plugin calls that trapped.",
                &labels,
                m.plugin_traps.get(plugin).copied().unwrap_or(0) as f64,
            );
            out.counter(
                "syncd_plugin_deadlines_total",
                "Plugin calls cut off at their deadline.",
                &labels,
                m.plugin_deadlines.get(plugin).copied().unwrap_or(0) as f64,
            );
        }
        for (plugin, p) in [("encoder", &s.encoder), ("transport", &s.transport)] {
            out.gauge(
                "syncd_plugin_info",
                "The plugin in service (always 1).",
                &[
                    ("client_system", name.as_str()),
                    ("plugin", plugin),
                    ("name", &p.name),
                    ("version", &p.version),
                    ("sha256", &p.sha256),
                ],
                1.0,
            );
        }
        out.counter(
            "syncd_heartbeats_total",
            "Heartbeats delivered since the start.",
            &cs,
            m.heartbeats as f64,
        );
        out.counter(
            "syncd_heartbeat_failures_total",
            "Heartbeats that failed since the start.",
            &cs,
            m.heartbeat_failures as f64,
        );
        let c = &s.connectivity;
        for state_name in ["unknown", "online", "offline"] {
            out.gauge(
                "syncd_connectivity_state",
                "1 for the Client System's connectivity state, 0 for the others.",
                &[("client_system", name.as_str()), ("state", state_name)],
                f64::from(c.state.label() == state_name),
            );
        }
        out.gauge(
            "syncd_connectivity_consecutive_failures",
            "Failed requests and probes in a row.",
            &cs,
            f64::from(c.consecutive_failures),
        );
        out.counter(
            "syncd_outages_total",
            "Times the Client System went offline since the start.",
            &cs,
            f64::from(c.outages),
        );
        out.counter(
            "syncd_uptime_seconds_total",
            "Time the Client System was online since the start.",
            &cs,
            c.uptime_ms as f64 / 1000.0,
        );
        out.counter(
            "syncd_downtime_seconds_total",
            "Time the Client System was offline since the start.",
            &cs,
            c.downtime_ms as f64 / 1000.0,
        );
    }
    let config = state
        .config
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    out.counter(
        "syncd_config_reloads_total",
        "Reloads of sync.toml and the plugins since the start.",
        &[],
        config.reloads as f64,
    );
    out.counter(
        "syncd_config_reload_failures_total",
        "Reloads refused in whole or in part since the start.",
        &[],
        config.reload_failures as f64,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.finish(),
    )
        .into_response()
}
