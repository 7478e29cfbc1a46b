//! What the integration tests share: a site in a temporary folder, with the real
//! plugins from `plugins/` and the reference Client System on loopback.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use client_system::{Options, Server};
use syncd::config::Config;
use syncd::queue::Queue;
use syncd::reading::NewReading;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The API key the reference Client System accepts in the tests.
pub const API_KEY: &str = "test-key-7d1e";

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

/// A site: its folder, its config, and the Client System it delivers to.
pub struct Site {
    pub dir: TempDir,
    pub config: Config,
    pub client: Server,
}

impl Site {
    /// A site with one Client System "meterit"; `client_extra` is appended to its
    /// `[[client_system]]` table (e.g. "batch_size = 10").
    pub async fn new(client_extra: &str) -> Site {
        let dir = tempfile::tempdir().expect("temporary folder");
        let client = Server::start(
            "127.0.0.1:0".parse().expect("address"),
            Options {
                api_key: API_KEY.into(),
                database: dir.path().join("client-system.db"),
            },
        )
        .await
        .expect("reference Client System starts");
        let text = format!(
            r#"
[site]
id = "site-test"
[database]
url = "sqlite://syncd.db"
[api]
listen = "127.0.0.1:0"
[[client_system]]
name = "meterit"
base_url = "{base}"
api_key = "{API_KEY}"
encoder = "{encoder}"
transport = "{transport}"
{client_extra}
"#,
            base = client.base_url(),
            encoder = plugin("json_batch").display(),
            transport = plugin("meterit_http").display(),
        );
        let path = dir.path().join("sync.toml");
        std::fs::write(&path, &text).expect("config written");
        let config = Config::load(&path).expect("config is valid");
        Site {
            dir,
            config,
            client,
        }
    }

    pub async fn queue(&self) -> Queue {
        let c = &self.config;
        let queue = Queue::open(&c.database.url, c.database.durability, &c.base_dir)
            .await
            .expect("queue opens");
        let names: Vec<String> = c.client_systems.iter().map(|c| c.name.clone()).collect();
        queue
            .register_client_systems(&names)
            .await
            .expect("registered");
        queue
    }

    /// Starts the daemon; stop it with [`Daemon::stop`].
    pub fn start(&self) -> Daemon {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.config.clone();
        let task = tokio::spawn(syncd::daemon::run(config, async move {
            let _ = stopped.await;
        }));
        Daemon { stop, task }
    }
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
