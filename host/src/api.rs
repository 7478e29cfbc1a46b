//! The local HTTP API (`[api] listen`, loopback by default).
//!
//! - `GET /healthz`: 200 while the daemon runs.
//! - `POST /v1/sync[?client=NAME]`: sync now, every Client System or the one named.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State as Extract};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

/// What the handlers share.
#[derive(Clone)]
pub struct State {
    /// Each worker's "sync now" trigger, by Client System name.
    pub triggers: Arc<BTreeMap<String, Arc<Notify>>>,
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
        .route("/v1/sync", post(sync_now))
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
