//! What the integration tests share: a site in a temporary folder, on SQLite or on a
//! real PostgreSQL server, with the real plugins from `plugins/` and reference Client
//! Systems on loopback.
#![allow(dead_code)]

pub mod stream;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use client_system::{Options, Server};
use sea_orm::ConnectionTrait;
use syncd::clock::Clock;
use syncd::config::Config;
use syncd::daemon::Runtime;
use syncd::queue::Queue;
use syncd::reading::NewReading;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The API key the reference Client Systems accept in the tests.
pub const API_KEY: &str = "test-key-7d1e";

/// The PostgreSQL server the tests use: `SYNCD_TEST_POSTGRES_URL`, by default the
/// local one with trust authentication. Each test gets a database of its own on it.
pub fn postgres_admin_url() -> String {
    std::env::var("SYNCD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Where a site keeps its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs the `syncd` binary as an operator does (without RUST_LOG), to completion.
pub fn syncd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("syncd runs")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A component built by `cargo xtask plugins`.
pub fn plugin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("plugins").join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test` (or `cargo xtask plugins` first)",
        path.display()
    );
    path
}

/// A reference Client System that can be stopped and started again on its address,
/// keeping what it stored.
pub struct Endpoint {
    pub name: String,
    pub addr: SocketAddr,
    pub database: PathBuf,
    server: Option<Server>,
}

impl Endpoint {
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("this Client System is stopped")
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    pub async fn start(&mut self) {
        assert!(self.server.is_none(), "already running");
        self.server = Some(
            Server::start(
                self.addr,
                Options {
                    api_key: API_KEY.into(),
                    database: self.database.clone(),
                    flush_each_batch: true,
                    store_readings: true,
                },
            )
            .await
            .expect("reference Client System starts"),
        );
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }
}

/// A site: its folder, its config, and the Client Systems it delivers to.
pub struct Site {
    pub dir: TempDir,
    pub config: Config,
    pub endpoints: Vec<Endpoint>,
    pub backend: Backend,
}

/// A free port on loopback (bound, then released), never one handed out before in
/// this process: the tests of a binary run at once, and a port released by one can be
/// the next the system gives another, whose daemon would then fail to listen while its
/// requests went to the first one's.
pub fn free_addr() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("an address");
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

impl Site {
    /// A SQLite site with one Client System "meterit"; `client_extra` is appended to its
    /// `[[client_system]]` table (e.g. "batch_size = 10").
    pub async fn new(client_extra: &str) -> Site {
        Self::build(Backend::Sqlite, "sqlite", "", &[("meterit", client_extra)]).await
    }

    /// A site on `backend` (`test` names its PostgreSQL database), with `[database]`
    /// extras and one Client System per `(name, extra)`.
    pub async fn build(
        backend: Backend,
        test: &str,
        database_extra: &str,
        clients: &[(&str, &str)],
    ) -> Site {
        let dir = tempfile::tempdir().expect("temporary folder");
        let url = match backend {
            Backend::Sqlite => "sqlite://syncd.db".to_owned(),
            Backend::Postgres => fresh_postgres_database(test).await,
        };
        let mut text = format!(
            "[site]\nid = \"site-test\"\n[database]\nurl = \"{url}\"\n{database_extra}\n[api]\nlisten = \"{}\"\n",
            free_addr()
        );
        let mut endpoints = Vec::new();
        for (name, extra) in clients {
            let mut endpoint = Endpoint {
                name: (*name).to_owned(),
                addr: free_addr(),
                database: dir.path().join(format!("client-system-{name}.db")),
                server: None,
            };
            endpoint.start().await;
            text.push_str(&client_table(name, &endpoint.base_url(), extra));
            endpoints.push(endpoint);
        }
        let path = dir.path().join("sync.toml");
        std::fs::write(&path, &text).expect("config written");
        let config = Config::load(&path).expect("config is valid");
        Site {
            dir,
            config,
            endpoints,
            backend,
        }
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sync.toml")
    }

    /// Copies the built plugin `name` into the site's folder as `file`, and points
    /// every Client System that used it there (the config file is rewritten). Returns
    /// the copy's path.
    pub fn use_plugin_copy(&mut self, name: &str, file: &str) -> PathBuf {
        let copy = self.dir.path().join(file);
        std::fs::copy(plugin(name), &copy).expect("plugin copied");
        let text = std::fs::read_to_string(self.config_path()).expect("config read");
        let text = text.replace(
            &plugin(name).display().to_string(),
            &copy.display().to_string(),
        );
        std::fs::write(self.config_path(), text).expect("config written");
        self.config = Config::load(&self.config_path()).expect("config is valid");
        copy
    }

    /// Starts one more reference Client System; returns the `[[client_system]]` table
    /// (with `extra` appended) that delivers to it.
    pub async fn add_endpoint(&mut self, name: &str, extra: &str) -> String {
        let mut endpoint = Endpoint {
            name: name.to_owned(),
            addr: free_addr(),
            database: self.dir.path().join(format!("client-system-{name}.db")),
            server: None,
        };
        endpoint.start().await;
        let table = client_table(name, &endpoint.base_url(), extra);
        self.endpoints.push(endpoint);
        table
    }

    /// The reference Client System named `name`.
    pub fn endpoint(&self, name: &str) -> &Server {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .expect("a Client System of that name")
            .server()
    }

    /// The first Client System.
    pub fn client(&self) -> &Server {
        self.endpoints[0].server()
    }

    pub async fn queue(&self) -> Queue {
        Queue::open_for(&self.config).await.expect("queue opens")
    }

    /// The local API's base URL.
    pub fn api(&self) -> String {
        format!("http://{}", self.config.api.listen)
    }

    /// Waits until the daemon's local API answers.
    pub async fn wait_for_api(&self) {
        let http = syncd::daemon::http_client().expect("an HTTP client");
        let url = format!("{}/healthz", self.api());
        eventually(Duration::from_secs(30), "the daemon's API", || async {
            http.get(&url).send().await.is_ok()
        })
        .await;
    }

    /// Starts the daemon; stop it with [`Daemon::stop`].
    pub fn start(&self) -> Daemon {
        self.start_in(Runtime::default())
    }

    /// Starts the daemon on `clock`.
    pub fn start_with_clock(&self, clock: Clock) -> Daemon {
        self.start_in(Runtime {
            clock,
            ..Runtime::default()
        })
    }

    /// Starts the daemon in `runtime`.
    pub fn start_in(&self, runtime: Runtime) -> Daemon {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.config.clone();
        let task = tokio::spawn(syncd::daemon::run_with(config, runtime, async move {
            let _ = stopped.await;
        }));
        Daemon { stop, task }
    }

    /// Posts `n` readings, numbered from `first`, to the daemon's ingest API.
    pub async fn post_readings(&self, first: usize, n: usize) {
        let body: Vec<_> = (first..first + n)
            .map(|i| {
                serde_json::json!({
                    "meter_id": format!("meter-{}", i % 7),
                    "timestamp": 1_790_000_000_000_i64 + i as i64,
                    "value": i as f64,
                })
            })
            .collect();
        let response = syncd::daemon::http_client()
            .expect("an HTTP client")
            .post(format!("{}/v1/readings", self.api()))
            .json(&body)
            .send()
            .await
            .expect("the daemon answers");
        assert!(
            response.status().is_success(),
            "ingest: {}",
            response.status()
        );
    }

    /// Asks the daemon to sync now (`POST /v1/sync`).
    pub async fn sync_now(&self) {
        let response = syncd::daemon::http_client()
            .expect("an HTTP client")
            .post(format!("{}/v1/sync", self.api()))
            .send()
            .await
            .expect("the daemon answers");
        assert!(response.status().is_success());
    }

    /// The daemon's `GET /v1/status` answer for the first Client System.
    pub async fn status(&self) -> serde_json::Value {
        let name = self.endpoints[0].name.clone();
        self.status_of(&name).await
    }

    /// The daemon's `GET /v1/status` answer for one Client System (null while the
    /// daemon does not answer).
    pub async fn status_of(&self, client_system: &str) -> serde_json::Value {
        let http = syncd::daemon::http_client().expect("an HTTP client");
        let Ok(response) = http.get(format!("{}/v1/status", self.api())).send().await else {
            return serde_json::Value::Null;
        };
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        body["client_systems"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|cs| cs["client_system"] == client_system)
            .cloned()
            .unwrap_or_default()
    }
}

/// A `[[client_system]]` table delivering to `base_url` with the built plugins.
pub fn client_table(name: &str, base_url: &str, extra: &str) -> String {
    format!(
        "[[client_system]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\napi_key = \"{API_KEY}\"\nencoder = \"{encoder}\"\ntransport = \"{transport}\"\n{extra}\n",
        encoder = plugin("json_batch").display(),
        transport = plugin("meterit_http").display(),
    )
}

/// Drops and creates `syncd_test_<test>` on the test server; returns its URL.
async fn fresh_postgres_database(test: &str) -> String {
    let admin = postgres_admin_url();
    let db = sea_orm::Database::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} does not answer ({e}); .ci/run installs and starts one, or set SYNCD_TEST_POSTGRES_URL"));
    let name = format!("syncd_test_{test}");
    db.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("old test database dropped");
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("test database created");
    let mut url = reqwest::Url::parse(&admin).expect("a URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

pub struct Daemon {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("daemon task joins")
            .expect("daemon ran without error");
    }
}

/// How many times a Client System stored each reading id.
pub fn times_stored(stored: &[client_system::StoredReading]) -> BTreeMap<i64, usize> {
    let mut seen = BTreeMap::new();
    for r in stored {
        *seen.entry(r.id).or_insert(0) += 1;
    }
    seen
}

/// Asserts that `server` stored `expected` distinct readings, none of them twice.
pub async fn assert_each_once(server: &Server, expected: usize) {
    let seen = times_stored(&server.stored_readings().await.expect("stored readings"));
    assert_eq!(seen.len(), expected, "distinct readings stored");
    assert!(seen.values().all(|&n| n == 1), "a reading was stored twice");
}

/// A `sync_log` row for an attempt at `batch`.
pub fn attempt(batch: &syncd::queue::Batch, outcome: &'static str) -> syncd::queue::Attempt {
    syncd::queue::Attempt {
        client_system: batch.client_system.clone(),
        batch_id: batch.id.clone(),
        attempt: batch.attempts + 1,
        started_at_ms: syncd::clock::now_ms(),
        duration_ms: 1,
        reading_count: batch.reading_count,
        outcome,
        error: None,
    }
}

/// `n` distinct readings.
pub fn readings(n: usize) -> Vec<NewReading> {
    (0..n)
        .map(|i| NewReading {
            meter_id: format!("meter-{}", i % 13),
            channel: "import-kwh".into(),
            timestamp_ms: 1_790_000_000_000 + i as i64 * 1000,
            value: i as f64 * 0.25,
            unit: "kWh".into(),
            quality: "good".into(),
            attributes: vec![("seq".into(), i.to_string())],
        })
        .collect()
}

/// Polls `check` every 50 ms until it is true; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs an async test scenario once per backend, as two tests.
#[macro_export]
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(
                    super::common::Backend::Sqlite,
                    concat!(stringify!($scenario), "_sqlite"),
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(super::common::Backend::Postgres, stringify!($scenario)).await;
            }
        }
    };
}
