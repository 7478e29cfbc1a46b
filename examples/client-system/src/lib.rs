//! The reference Client System: the MeterIt API that syncd delivers to in the demo and
//! in the tests, on loopback.
//!
//! The API, under `/api`:
//! - `POST /api/auth` `{"api_key": …}` → `{"token": …, "expires_in": 3600}`, 401 for a
//!   wrong key.
//! - `POST /api/readings/batch` with `Authorization: Bearer <token>` and
//!   `Idempotency-Key: <batch id>`; body `{"batch_id", "site_id", "readings": […]}` (the
//!   `json_batch` encoder's format). A key already stored is answered 200 with
//!   `"duplicate": true` and nothing is stored twice.
//! - `GET /api/config` → `{"version": …, "config": {…}}`, 404 until one is set.
//! - `POST /api/heartbeat`, `GET /api/health`.
//!
//! And for tests and the demo, under `/admin` (no authentication: loopback only):
//! - `GET /admin/stats` → `{"batches", "readings", "duplicates", "heartbeats"}`;
//! - `GET /admin/readings` → every stored reading;
//! - `GET /admin/batches` → every stored batch: id, reading count, content type;
//! - `POST /admin/faults` `[{"status": 503, "retry_after": 2, "delay_ms": 0}, …]`: the
//!   next batch uploads are answered with these, in order; `{"store": true,
//!   "delay_ms": N}` stores the batch, then holds the answer N ms; `{"hang_up": true}`
//!   closes the connection without answering (after `delay_ms`, if given); `{"store":
//!   true, "hang_up": true}` stores, then closes; `{"truncate": true}` stores, then sends
//!   half of the answer and closes;
//! - `PUT /admin/chaos` `{"seed": 7, "rate": 0.3, "max_delay_ms": 2000}`: from then on a
//!   random share `rate` of the uploads not given a fault above meet one drawn at random
//!   (an error status, a throttle with Retry-After, a slow answer, a reset before or after
//!   storing, a truncated answer); `null` turns it off. `GET /admin/chaos` counts what was
//!   drawn;
//! - `PUT /admin/config` `{"version": …, "config": {…}}`.
//!
//! Everything accepted is stored in its own SQLite file.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use sea_orm::sqlx::sqlite::SqliteSynchronous;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    TransactionTrait, Value,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// The API key `POST /api/auth` accepts.
    pub api_key: String,
    /// The SQLite file it stores into (created if missing).
    pub database: PathBuf,
    /// Whether each stored batch is flushed to disk before it is acknowledged
    /// (SQLite's `synchronous=FULL`, the default). Off (`NORMAL`: flushed at
    /// checkpoints), a crash of the machine may lose the last batches acknowledged, and
    /// a batch costs the server its CPU work alone: for benchmarks that measure the
    /// sender rather than the disk under the server.
    pub flush_each_batch: bool,
    /// Whether the readings of each batch are stored (the default), or only the
    /// batch's record: its key, site, content type and the number of readings its body
    /// held. Without them `/admin/readings` is empty and the stats count the readings
    /// of the batches recorded; a batch costs the same whatever was received before: for
    /// benchmarks of a sender's long runs.
    pub store_readings: bool,
}

/// A failure to answer a batch upload with, instead of storing it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// The status to answer with (ignored with `store`).
    #[serde(default)]
    pub status: u16,
    /// Store the batch as usual, and only then wait `delay_ms` before answering
    /// normally: the sender cannot tell it was stored until the answer comes.
    #[serde(default)]
    pub store: bool,
    /// A `Retry-After` header, in seconds.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// How long to wait before answering.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Close the connection instead of answering (after `delay_ms`, if given), as a
    /// server that crashes or a link that breaks mid-request would. With `store`, the
    /// batch is stored first: the sender cannot know it arrived.
    #[serde(default)]
    pub hang_up: bool,
    /// Store the batch, then send only the first half of the answer (its
    /// `Content-Length` promising all of it) and close the connection.
    #[serde(default)]
    pub truncate: bool,
}

/// Faults drawn at random for the uploads that were not given one by
/// [`Server::inject_faults`]: the long fault runs.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Chaos {
    /// Seeds the draws, so that a run can be repeated.
    pub seed: u64,
    /// The share of uploads that meet a fault, from 0 to 1.
    pub rate: f64,
    /// The longest hold of a slow answer, in milliseconds.
    pub max_delay_ms: u64,
}

/// The kinds of fault [`Chaos`] draws from, equally likely.
const CHAOS_KINDS: [&str; 8] = [
    "status_500",
    "status_502",
    "status_503_retry_after",
    "status_429_retry_after",
    "slow_answer",
    "reset_before_storing",
    "reset_after_storing",
    "truncated_answer",
];

struct ChaosState {
    chaos: Chaos,
    rng: fastrand::Rng,
}

impl ChaosState {
    /// Draws the fault for one upload, if any, with the name of its kind.
    fn draw(&mut self) -> Option<(&'static str, Fault)> {
        if self.rng.f64() >= self.chaos.rate {
            return None;
        }
        let kind = CHAOS_KINDS[self.rng.usize(..CHAOS_KINDS.len())];
        let delay = self.rng.u64(0..=self.chaos.max_delay_ms);
        let fault = match kind {
            "status_500" => Fault {
                status: 500,
                ..Fault::default()
            },
            "status_502" => Fault {
                status: 502,
                ..Fault::default()
            },
            "status_503_retry_after" => Fault {
                status: 503,
                retry_after: Some(1),
                ..Fault::default()
            },
            "status_429_retry_after" => Fault {
                status: 429,
                retry_after: Some(1),
                ..Fault::default()
            },
            "slow_answer" => Fault {
                store: true,
                delay_ms: Some(delay),
                ..Fault::default()
            },
            "reset_before_storing" => Fault {
                hang_up: true,
                delay_ms: Some(delay / 4),
                ..Fault::default()
            },
            "reset_after_storing" => Fault {
                store: true,
                hang_up: true,
                ..Fault::default()
            },
            _ => Fault {
                truncate: true,
                ..Fault::default()
            },
        };
        Some((kind, fault))
    }
}

/// Closes the connection a request came on, without an answer.
#[derive(Clone)]
struct HangUp(Arc<tokio::sync::Notify>);

/// How long, once stopping, open connections get to finish the request in hand.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// What `GET /admin/stats` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Stats {
    /// Batches stored.
    pub batches: u64,
    /// Readings stored.
    pub readings: u64,
    /// Uploads dropped as duplicates of a stored batch.
    pub duplicates: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Uploads of a batch that came while another upload of the same batch (the same
    /// idempotency key) was still being answered: a batch sent by two senders at once.
    #[serde(default)]
    pub overlapping: u64,
}

/// A reading as stored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StoredReading {
    /// The batch (idempotency key) it came in.
    pub batch_id: String,
    /// The site that sent it.
    pub site_id: String,
    /// The reading's id at the site.
    pub id: i64,
    /// The meter.
    pub meter_id: String,
    /// The channel.
    pub channel: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The value.
    pub value: f64,
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StoredBatch {
    /// Its idempotency key (the batch id).
    pub batch_id: String,
    /// How many readings it held.
    pub reading_count: i64,
    /// The `Content-Type` it came with.
    pub content_type: String,
}

struct AppState {
    options: Options,
    db: DatabaseConnection,
    tokens: Mutex<HashSet<String>>,
    faults: Mutex<VecDeque<Fault>>,
    remote_config: Mutex<Option<serde_json::Value>>,
    duplicates: Mutex<u64>,
    in_flight: Mutex<HashSet<String>>,
    overlapping: Mutex<u64>,
    heartbeats: Mutex<Vec<serde_json::Value>>,
    chaos: Mutex<Option<ChaosState>>,
    chaos_drawn: Mutex<BTreeMap<&'static str, u64>>,
}

/// A running server.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<AppState>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts a server on `listen` (port 0 picks a free one).
    pub async fn start(listen: SocketAddr, options: Options) -> Result<Self> {
        if let Some(parent) = options
            .database
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)?;
        }
        let url = format!("sqlite://{}?mode=rwc", options.database.display());
        let mut connect = ConnectOptions::new(url.clone());
        // No idle timeout or lifetime, so no pool maintenance task: sqlx 0.9.0's can
        // miscount idle connections and spin without end (sqlx issue 3645).
        connect
            .sqlx_logging(false)
            .idle_timeout(None::<std::time::Duration>)
            .max_lifetime(None::<std::time::Duration>);
        let synchronous = if options.flush_each_batch {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        };
        // On every connection of the pool: a PRAGMA run once would set only one.
        connect.map_sqlx_sqlite_opts(move |o| o.synchronous(synchronous));
        let db = Database::connect(connect)
            .await
            .with_context(|| format!("cannot open {url}"))?;
        for sql in [
            "PRAGMA journal_mode=WAL",
            "CREATE TABLE IF NOT EXISTS batches (idempotency_key TEXT PRIMARY KEY, site_id TEXT NOT NULL, reading_count INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS readings (batch_id TEXT NOT NULL, site_id TEXT NOT NULL, id INTEGER NOT NULL, meter_id TEXT NOT NULL, channel TEXT NOT NULL, timestamp INTEGER NOT NULL, value REAL NOT NULL, unit TEXT NOT NULL, quality TEXT NOT NULL, attributes TEXT NOT NULL)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        // Files made before batches recorded their content type.
        let _ = db
            .execute_unprepared(
                "ALTER TABLE batches ADD COLUMN content_type TEXT NOT NULL DEFAULT ''",
            )
            .await;
        let state = Arc::new(AppState {
            options,
            db,
            tokens: Mutex::default(),
            faults: Mutex::default(),
            remote_config: Mutex::default(),
            duplicates: Mutex::default(),
            in_flight: Mutex::default(),
            overlapping: Mutex::default(),
            heartbeats: Mutex::default(),
            chaos: Mutex::default(),
            chaos_drawn: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/api/auth", post(auth))
            .route("/api/readings/batch", post(upload))
            .route("/api/config", get(config))
            .route("/api/heartbeat", post(heartbeat))
            .route(
                "/api/health",
                get(|| async { Json(json!({ "status": "ok" })) }),
            )
            .route("/admin/stats", get(admin_stats))
            .route("/admin/readings", get(admin_readings))
            .route("/admin/batches", get(admin_batches))
            .route("/admin/faults", post(admin_faults))
            .route("/admin/config", put(admin_config))
            .route("/admin/chaos", put(admin_chaos).get(admin_chaos_drawn))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, stopped));
        Ok(Self {
            addr,
            state,
            stop,
            task,
        })
    }

    /// The base URL to configure syncd with: `http://<addr>/api`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// What has been stored and received.
    pub async fn stats(&self) -> Result<Stats> {
        stats(&self.state).await
    }

    /// Every stored reading, in the order stored.
    pub async fn stored_readings(&self) -> Result<Vec<StoredReading>> {
        stored_readings(&self.state).await
    }

    /// Every batch stored, in the order stored.
    pub async fn stored_batches(&self) -> Result<Vec<StoredBatch>> {
        stored_batches(&self.state).await
    }

    /// Whether its database connections wait for the disk at each commit (SQLite's
    /// `synchronous` at `FULL`), as [`Options::flush_each_batch`] asks.
    pub async fn flushes_each_batch(&self) -> Result<bool> {
        let row = self
            .state
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "PRAGMA synchronous",
            ))
            .await?
            .context("PRAGMA synchronous returned no row")?;
        // 2 is FULL, 1 NORMAL.
        Ok(row.try_get_by_index::<i64>(0)? >= 2)
    }

    /// Every heartbeat received, oldest first, as sent.
    pub fn heartbeats(&self) -> Vec<serde_json::Value> {
        lock(&self.state.heartbeats).clone()
    }

    /// Sets the remote configuration `GET /api/config` serves.
    pub fn set_remote_config(&self, version: &str, config: serde_json::Value) {
        *lock(&self.state.remote_config) = Some(json!({ "version": version, "config": config }));
    }

    /// Queues failures for the next batch uploads.
    pub fn inject_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).extend(faults);
    }

    /// Draws random faults for the uploads from now on (see [`Chaos`]); `None` stops.
    pub fn set_chaos(&self, chaos: Option<Chaos>) {
        set_chaos(&self.state, chaos);
    }

    /// How many faults of each kind [`Chaos`] has drawn.
    pub fn chaos_drawn(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.state.chaos_drawn).clone()
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves HTTP/1.1 connections until `stopped`, then closes them all (each may finish
/// the request in hand within [`STOP_GRACE`]). Each request carries a [`HangUp`] for
/// its connection, which is how the `hang_up` fault closes it without answering.
async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    let (closing, _) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stopped);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = &mut stopped => break,
        };
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let service = TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(HangUp(Arc::clone(&hang_up)))),
        );
        let mut closing = closing.subscribe();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                // Dropping the connection closes the socket, the request unanswered.
                _ = hang_up.notified() => {}
                _ = closing.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, connection).await;
                }
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| lock(&state.tokens).contains(token))
}

#[derive(Deserialize)]
struct AuthRequest {
    api_key: String,
}

async fn auth(State(state): State<Arc<AppState>>, body: Option<Json<AuthRequest>>) -> Response {
    match body {
        Some(Json(req)) if req.api_key == state.options.api_key => {
            let token = uuid::Uuid::new_v4().to_string();
            lock(&state.tokens).insert(token.clone());
            Json(json!({ "token": token, "expires_in": 3600 })).into_response()
        }
        _ => error(StatusCode::UNAUTHORIZED, "invalid api key"),
    }
}

#[derive(Deserialize)]
struct Batch {
    batch_id: String,
    site_id: String,
    readings: Vec<WireReading>,
}

#[derive(Deserialize)]
struct WireReading {
    id: i64,
    meter_id: String,
    #[serde(default)]
    channel: String,
    timestamp: i64,
    value: f64,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    quality: String,
    #[serde(default)]
    attributes: serde_json::Map<String, serde_json::Value>,
}

/// Rows per INSERT (SQLite allows 32766 bound values; a reading binds 10).
const INSERT_CHUNK: usize = 3000;

async fn upload(
    State(state): State<Arc<AppState>>,
    axum::Extension(hang_up): axum::Extension<HangUp>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&state, &headers);
    let fault = lock(&state.faults).pop_front().or_else(|| {
        let (kind, fault) = lock(&state.chaos).as_mut()?.draw()?;
        *lock(&state.chaos_drawn).entry(kind).or_default() += 1;
        Some(fault)
    });
    let Some(fault) = fault else {
        return store_upload(&state, &headers, &body).await;
    };
    let hold = || async {
        if let Some(ms) = fault.delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    };
    if !fault.store && !fault.truncate {
        hold().await;
        if fault.hang_up {
            hang_up.0.notify_one();
            return std::future::pending().await;
        }
        return answer_with(&fault);
    }
    let response = store_upload(&state, &headers, &body).await;
    hold().await;
    if fault.hang_up {
        hang_up.0.notify_one();
        return std::future::pending().await;
    }
    if fault.truncate {
        return truncated(response).await;
    }
    response
}

/// An upload being answered, by its idempotency key: counted as overlapping when the
/// same key is being answered already; forgotten when the answer is done (or the
/// connection dropped).
struct InFlight<'a> {
    state: &'a AppState,
    key: Option<String>,
}

impl<'a> InFlight<'a> {
    fn enter(state: &'a AppState, headers: &HeaderMap) -> Self {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(key) = &key
            && !lock(&state.in_flight).insert(key.clone())
        {
            *lock(&state.overlapping) += 1;
            // Not ours to forget: the first upload still holds it.
            return Self { state, key: None };
        }
        Self { state, key }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            lock(&self.state.in_flight).remove(key);
        }
    }
}

/// `response` with only the first half of its body sent: the connection is then
/// aborted, short of the `Content-Length` announced.
async fn truncated(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let full = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let half = full.slice(..full.len() / 2);
    parts.headers.insert(
        axum::http::header::CONTENT_LENGTH,
        axum::http::HeaderValue::from(full.len().max(1)),
    );
    let chunks: [Result<axum::body::Bytes, std::io::Error>; 2] =
        [Ok(half), Err(std::io::Error::other("truncated on purpose"))];
    Response::from_parts(
        parts,
        axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
    )
}

fn answer_with(fault: &Fault) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = error(status, "injected fault");
    if let Some(value) = fault.retry_after.and_then(|s| s.to_string().parse().ok()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

async fn store_upload(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Response {
    if !authorized(state, headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key header is required",
        );
    };
    let batch: Batch = match serde_json::from_slice(body) {
        Ok(batch) => batch,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid batch: {e}")),
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match store_batch(state, &key, content_type, batch).await {
        Ok(Some(count)) => Json(json!({ "accepted": count, "duplicate": false })).into_response(),
        Ok(None) => {
            *lock(&state.duplicates) += 1;
            Json(json!({ "accepted": 0, "duplicate": true })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// Stores a batch unless its key is known; the number stored, or none for a duplicate.
async fn store_batch(
    state: &AppState,
    key: &str,
    content_type: &str,
    batch: Batch,
) -> Result<Option<usize>> {
    let txn = state.db.begin().await?;
    let inserted = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "INSERT OR IGNORE INTO batches (idempotency_key, site_id, reading_count, content_type) VALUES (?, ?, ?, ?)",
            [
                key.into(),
                batch.site_id.clone().into(),
                (batch.readings.len() as i64).into(),
                content_type.into(),
            ],
        ))
        .await?;
    if inserted.rows_affected() == 0 {
        return Ok(None);
    }
    let _ = &batch.batch_id;
    // Without its readings, the batch's record above is all that is kept.
    let readings: &[WireReading] = if state.options.store_readings {
        &batch.readings
    } else {
        &[]
    };
    for chunk in readings.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO readings (batch_id, site_id, id, meter_id, channel, timestamp, value, unit, quality, attributes) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 10);
        for (i, r) in chunk.iter().enumerate() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?,?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?,?,?,?,?,?)"
            });
            values.extend([
                key.into(),
                batch.site_id.clone().into(),
                r.id.into(),
                r.meter_id.clone().into(),
                r.channel.clone().into(),
                r.timestamp.into(),
                r.value.into(),
                r.unit.clone().into(),
                r.quality.clone().into(),
                serde_json::Value::Object(r.attributes.clone())
                    .to_string()
                    .into(),
            ]);
        }
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            sql,
            values,
        ))
        .await?;
    }
    txn.commit().await?;
    Ok(Some(batch.readings.len()))
}

async fn config(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    }
    match lock(&state.remote_config).clone() {
        Some(config) => Json(config).into_response(),
        None => error(StatusCode::NOT_FOUND, "no configuration for this site"),
    }
}

async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Option<Json<serde_json::Value>>,
) -> Response {
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    }
    lock(&state.heartbeats).push(body.map(|Json(v)| v).unwrap_or_default());
    StatusCode::NO_CONTENT.into_response()
}

async fn stats(state: &AppState) -> Result<Stats> {
    let count = |sql: &'static str| async move {
        let row = state
            .db
            .query_one_raw(Statement::from_string(DbBackend::Sqlite, sql))
            .await?
            .context("count returned no row")?;
        Ok::<u64, anyhow::Error>(row.try_get_by_index::<i64>(0)? as u64)
    };
    Ok(Stats {
        batches: count("SELECT COUNT(*) FROM batches").await?,
        readings: if state.options.store_readings {
            count("SELECT COUNT(*) FROM readings").await?
        } else {
            count("SELECT COALESCE(SUM(reading_count), 0) FROM batches").await?
        },
        duplicates: *lock(&state.duplicates),
        heartbeats: lock(&state.heartbeats).len() as u64,
        overlapping: *lock(&state.overlapping),
    })
}

async fn stored_readings(state: &AppState) -> Result<Vec<StoredReading>> {
    let rows = state
        .db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT batch_id, site_id, id, meter_id, channel, timestamp, value FROM readings ORDER BY rowid",
        ))
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok(StoredReading {
                batch_id: row.try_get_by_index(0)?,
                site_id: row.try_get_by_index(1)?,
                id: row.try_get_by_index(2)?,
                meter_id: row.try_get_by_index(3)?,
                channel: row.try_get_by_index(4)?,
                timestamp: row.try_get_by_index(5)?,
                value: row.try_get_by_index(6)?,
            })
        })
        .collect()
}

async fn admin_stats(State(state): State<Arc<AppState>>) -> Response {
    match stats(&state).await {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn admin_readings(State(state): State<Arc<AppState>>) -> Response {
    match stored_readings(&state).await {
        Ok(readings) => Json(readings).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn admin_faults(
    State(state): State<Arc<AppState>>,
    Json(faults): Json<Vec<Fault>>,
) -> Response {
    let count = faults.len();
    lock(&state.faults).extend(faults);
    Json(json!({ "queued": count })).into_response()
}

fn set_chaos(state: &AppState, chaos: Option<Chaos>) {
    *lock(&state.chaos) = chaos.map(|chaos| ChaosState {
        chaos,
        rng: fastrand::Rng::with_seed(chaos.seed),
    });
}

async fn admin_chaos(
    State(state): State<Arc<AppState>>,
    Json(chaos): Json<Option<Chaos>>,
) -> Response {
    set_chaos(&state, chaos);
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_chaos_drawn(State(state): State<Arc<AppState>>) -> Response {
    Json(lock(&state.chaos_drawn).clone()).into_response()
}

async fn admin_config(
    State(state): State<Arc<AppState>>,
    Json(config): Json<serde_json::Value>,
) -> Response {
    *lock(&state.remote_config) = Some(config);
    StatusCode::NO_CONTENT.into_response()
}

async fn stored_batches(state: &AppState) -> Result<Vec<StoredBatch>> {
    let rows = state
        .db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT idempotency_key, reading_count, content_type FROM batches ORDER BY rowid",
        ))
        .await?;
    rows.iter()
        .map(|row| {
            Ok(StoredBatch {
                batch_id: row.try_get("", "idempotency_key")?,
                reading_count: row.try_get("", "reading_count")?,
                content_type: row.try_get("", "content_type")?,
            })
        })
        .collect()
}

async fn admin_batches(State(state): State<Arc<AppState>>) -> Response {
    match stored_batches(&state).await {
        Ok(batches) => Json(batches).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}
