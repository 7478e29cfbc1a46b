//! Hot-reload benchmark (`cargo xtask bench`): how long from a new encoder file written
//! to the new version in service, compiled cold and from the compiled-plugin cache; and
//! delivered readings/s while the encoder is replaced every second, against the same
//! work without reloads, in one run. The two encoder files are the same `json_batch`
//! code under two hashes, so only the reloads differ. Prints a table and writes
//! `target/bench/reload.json`.
//!
//! Arguments: `--reload-readings N` (default 1000000) per throughput run; `--trials N`
//! (default 3) latency measurements of each kind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client_system::Server;
use syncd::config::Config;
use syncd::plugin::cache::sha256_hex;
use syncd::queue::Queue;
use syncd::reading::NewReading;
use syncd::supervisor::RELOAD_DEBOUNCE;

mod common;
use common::{batch_counting_client_system, number, plugin, write_site};

/// Writes `bytes` beside `path`, then renames it into place, as a deploy would.
fn deploy(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

struct Site {
    dir: tempfile::TempDir,
    client: Server,
    config: Config,
    encoder: PathBuf,
    http: reqwest::Client,
}

impl Site {
    async fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // A Client System that records batches without their readings: what a batch
        // costs it stays the same from the run without reloads to the run with them.
        let client = batch_counting_client_system(dir.path(), "reload").await?;
        let encoder = dir.path().join("encoder.wasm");
        std::fs::copy(plugin("json_batch"), &encoder).context("run `cargo xtask plugins` first")?;
        let config = write_site(
            &dir.path().join("sync.toml"),
            "sqlite://syncd.db",
            &client.base_url(),
            &encoder,
            "interval = \"50ms\"\nbatch_size = 1000",
        )?;
        Ok(Self {
            dir,
            client,
            config,
            encoder,
            http: syncd::daemon::http_client()?,
        })
    }

    async fn encoder_sha256(&self) -> Result<String> {
        let body: serde_json::Value = self
            .http
            .get(format!("http://{}/v1/status", self.config.api.listen))
            .send()
            .await?
            .json()
            .await?;
        Ok(body["client_systems"][0]["encoder"]["sha256"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Writes `bytes` as the encoder and waits until the daemon serves them; returns
    /// how long that took.
    async fn replace_encoder(&self, bytes: &[u8]) -> Result<Duration> {
        let wanted = sha256_hex(bytes);
        let started = Instant::now();
        deploy(&self.encoder, bytes)?;
        while self.encoder_sha256().await? != wanted {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("the new encoder was not in service after 2 minutes");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(started.elapsed())
    }

    fn clear_cache(&self) -> Result<()> {
        let cache = self.dir.path().join("data/plugin-cache");
        if cache.is_dir() {
            std::fs::remove_dir_all(&cache)?;
        }
        Ok(())
    }

    /// Queues `n` readings, asks for a sync and waits until the Client System holds
    /// them all; returns readings/s.
    async fn drain(&self, queue: &Queue, n: usize) -> Result<f64> {
        let before = self.client.stats().await?.readings;
        let chunk: Vec<NewReading> = (0..10_000)
            .map(|i| NewReading {
                meter_id: format!("meter-{}", i % 97),
                channel: "import-kwh".into(),
                timestamp_ms: 1_790_000_000_000 + i as i64,
                value: i as f64,
                unit: "kWh".into(),
                quality: "good".into(),
                attributes: Vec::new(),
            })
            .collect();
        for _ in 0..n.div_ceil(chunk.len()) {
            queue.enqueue(&chunk).await?;
        }
        let total = before + (n.div_ceil(chunk.len()) * chunk.len()) as u64;
        let started = Instant::now();
        self.http
            .post(format!("http://{}/v1/sync", self.config.api.listen))
            .send()
            .await?;
        while self.client.stats().await?.readings < total {
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the backlog was not delivered in 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((total - before) as f64 / started.elapsed().as_secs_f64())
    }
}

/// The same component with a custom section appended: the same code under another
/// SHA-256, as a re-deploy of an unchanged plugin rebuilt with another stamp would be.
fn variant(component: &[u8], stamp: &str) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"syncd-bench-stamp";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(stamp.as_bytes());
    let mut out = component.to_vec();
    out.push(0); // a custom section
    leb128(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let readings = number("--reload-readings", 1_000_000)?;
    let trials = number("--trials", 3)?.max(1);
    // Two builds of the same encoder: what is measured is the reload, not a
    // difference between encoders.
    let v1 = std::fs::read(plugin("json_batch"))?;
    let v2 = variant(&v1, "b");

    let site = Site::new().await?;
    let queue = Queue::open_for(&site.config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(syncd::daemon::run(site.config.clone(), async move {
        let _ = stopped.await;
    }));
    while site.encoder_sha256().await.map_or(true, |h| h.is_empty()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Latency: alternate versions; a cold trial empties the cache first.
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..trials {
        // The daemon serves v1 at the start of each trial.
        site.clear_cache()?;
        cold.push(site.replace_encoder(&v2).await?);
        cold.push(site.replace_encoder(&v1).await?);
        cached.push(site.replace_encoder(&v2).await?);
        cached.push(site.replace_encoder(&v1).await?);
    }

    // Throughput: the same work without and with a reload every second.
    let steady = site.drain(&queue, readings).await?;
    let reloading = Arc::new(AtomicBool::new(true));
    let swaps = Arc::new(AtomicU32::new(0));
    let reloader = tokio::spawn({
        let (reloading, swaps) = (reloading.clone(), swaps.clone());
        let encoder = site.encoder.clone();
        let (v1, v2) = (v1.clone(), v2.clone());
        async move {
            while reloading.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = swaps.fetch_add(1, Ordering::Relaxed);
                let bytes = if n % 2 == 0 { &v2 } else { &v1 };
                if deploy(&encoder, bytes).is_err() {
                    break;
                }
            }
        }
    });
    let with_reloads = site.drain(&queue, readings).await?;
    reloading.store(false, Ordering::Relaxed);
    reloader.await?;
    let _ = stop.send(());
    daemon.await??;

    let cold = median(cold);
    let cached = median(cached);
    let swaps = swaps.load(Ordering::Relaxed);
    println!();
    println!(
        "hot reload ({trials} trials each, medians; includes the {RELOAD_DEBOUNCE:?} debounce)"
    );
    println!(
        "  {:<44} {:>10}",
        "encoder written -> in service, cold compile",
        format!("{} ms", cold.as_millis())
    );
    println!(
        "  {:<44} {:>10}",
        "encoder written -> in service, cache hit",
        format!("{} ms", cached.as_millis())
    );
    println!(
        "  {:<44} {:>10.2}",
        "cold / cache hit",
        cold.as_secs_f64() / cached.as_secs_f64()
    );
    println!("delivery, {readings} readings, SQLite, one run each");
    println!("  {:<44} {:>10.0}", "readings/s without reloads", steady);
    println!(
        "  {:<44} {:>10.0}",
        format!("readings/s with a reload every second ({swaps})"),
        with_reloads
    );
    println!(
        "  {:<44} {:>10.2}",
        "with reloads / without",
        with_reloads / steady
    );

    let json = serde_json::json!({
        "debounce_ms": RELOAD_DEBOUNCE.as_millis() as u64,
        "trials": trials,
        "reload_cold_ms": cold.as_secs_f64() * 1000.0,
        "reload_cache_hit_ms": cached.as_secs_f64() * 1000.0,
        "readings": readings,
        "readings_per_s_steady": steady,
        "readings_per_s_with_reloads": with_reloads,
        "reloads_during_run": swaps,
    });
    common::write_json("reload", &json)?;
    Ok(())
}
