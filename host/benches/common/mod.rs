//! What the benchmarks share: where things are, the readings they send, the reference
//! Client System, their arguments and their JSON output. Each benchmark uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use client_system::{Options, Server};
use syncd::reading::NewReading;

/// The API key every benchmark's Client System accepts.
pub const API_KEY: &str = "bench";

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A plugin built by `cargo xtask plugins`.
pub fn plugin(crate_name: &str) -> PathBuf {
    target_dir()
        .join("plugins")
        .join(format!("{crate_name}.wasm"))
}

/// Waits until the daemon running as `daemon` answers on its API at `api`. A daemon
/// that stops first (its plugin not built, say) is an error, with its own, rather than
/// a wait without end.
pub async fn wait_for_api(
    api: std::net::SocketAddr,
    daemon: &mut tokio::task::JoinHandle<Result<()>>,
) -> Result<()> {
    let http = syncd::daemon::http_client()?;
    let health = format!("http://{api}/healthz");
    while http.get(&health).send().await.is_err() {
        if daemon.is_finished() {
            daemon.await?.context("syncd stopped at start-up")?;
            anyhow::bail!("syncd stopped at start-up before its API answered");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Reading number `i`: 20,000 meters in turn, one reading a second each.
pub fn reading(i: usize) -> NewReading {
    NewReading {
        meter_id: format!("elec-{:05}", i % 20_000),
        channel: "import-kwh".into(),
        timestamp_ms: 1_795_305_600_000 + (i as i64) * 1000,
        value: 1000.0 + i as f64 * 0.125,
        unit: "kWh".into(),
        quality: "good".into(),
        attributes: Vec::new(),
    }
}

/// An ingest request body: readings `start..start + n` as a JSON array (~110 bytes each).
pub fn request_body(start: usize, n: usize) -> Vec<u8> {
    let readings: Vec<serde_json::Value> = (start..start + n)
        .map(|i| {
            let r = reading(i);
            serde_json::json!({
                "meter_id": r.meter_id, "channel": r.channel, "timestamp": r.timestamp_ms,
                "value": r.value, "unit": r.unit, "quality": r.quality,
            })
        })
        .collect();
    serde_json::to_vec(&readings).expect("readings serialise")
}

/// Posts `bodies` to `url`, two clients at a time.
pub async fn post_all(url: &str, bodies: &[Vec<u8>]) -> Result<()> {
    let http = syncd::daemon::http_client()?;
    let mut lanes = Vec::new();
    for lane in 0..2 {
        let http = http.clone();
        let url = url.to_owned();
        let mine: Vec<Vec<u8>> = bodies.iter().skip(lane).step_by(2).cloned().collect();
        lanes.push(tokio::spawn(async move {
            for body in mine {
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "ingest answered {}",
                    response.status()
                );
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for lane in lanes {
        lane.await??;
    }
    Ok(())
}

/// A reference Client System on loopback, storing into `client-system-<name>.db` in `dir`.
pub async fn client_system(dir: &Path, name: &str) -> Result<Server> {
    start_client_system(dir, name, true).await
}

/// The same, storing each batch's record but not its readings (see
/// [`Options::store_readings`]): a sink whose cost per batch does not grow with what it
/// has received.
pub async fn batch_counting_client_system(dir: &Path, name: &str) -> Result<Server> {
    start_client_system(dir, name, false).await
}

async fn start_client_system(dir: &Path, name: &str, store_readings: bool) -> Result<Server> {
    Server::start(
        "127.0.0.1:0".parse()?,
        Options {
            api_key: API_KEY.into(),
            database: dir.join(format!("client-system-{name}.db")),
            // What is measured is syncd: a sink that waits for the disk at every batch
            // adds the disk's time (and its noise) to every figure.
            flush_each_batch: false,
            store_readings,
        },
    )
    .await
}

/// Writes the config file `path` for a site whose queue is at `database_url` and whose API
/// listens on a free loopback port, with one Client System, "meterit", at `base_url`
/// using `encoder` and the `meterit_http` transport; `extra` goes at the end (more keys
/// of the Client System's table, then other tables). Returns the loaded config.
pub fn write_site(
    path: &Path,
    database_url: &str,
    base_url: &str,
    encoder: &Path,
    extra: &str,
) -> Result<syncd::config::Config> {
    let api = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let text = format!(
        "[site]\nid = \"bench\"\n[database]\nurl = \"{database_url}\"\n[api]\nlisten = \"{api}\"\n\
         [[client_system]]\nname = \"meterit\"\nbase_url = \"{base_url}\"\napi_key = \"{API_KEY}\"\n\
         encoder = \"{}\"\ntransport = \"{}\"\n{extra}\n",
        encoder.display(),
        plugin("meterit_http").display(),
    );
    std::fs::write(path, text)?;
    Ok(syncd::config::Config::load(path)?)
}

/// The value after `--name` on the command line (cargo passes every benchmark all the
/// arguments, so each takes its own and ignores the others).
pub fn argument(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// A numeric argument, or `default` when it is not given.
pub fn number(name: &str, default: usize) -> Result<usize> {
    match argument(name) {
        Some(value) => value
            .parse()
            .with_context(|| format!("{name} takes a number, not {value:?}")),
        None => Ok(default),
    }
}

/// Writes a benchmark's figures to `target/bench/<name>.json`, where `cargo xtask bench`
/// gathers them.
pub fn write_json(name: &str, value: &serde_json::Value) -> Result<()> {
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// A new, empty database `name` on the PostgreSQL server at `SYNCD_TEST_POSTGRES_URL`
/// (default the local one); its URL, or why there is none.
pub async fn fresh_postgres(name: &str) -> Result<String> {
    use sea_orm::ConnectionTrait;
    let admin = std::env::var("SYNCD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let db = sea_orm::Database::connect(&admin)
        .await
        .with_context(|| format!("no PostgreSQL answers at {admin}"))?;
    db.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    let mut url = reqwest::Url::parse(&admin)?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}
