//! End-to-end benchmark (`cargo xtask bench`): the same work done by syncd and by a
//! minimal native floor in the same run, and the WASM encoder against the same code
//! compiled natively. Prints a table and writes `target/bench/e2e.json`.
//!
//! The work: N readings (`--readings N`, default 100000) posted to the ingest API in
//! requests of 1000 by two clients, queued, sent in batches of 1000 to the reference
//! Client System, acknowledged and pruned. Timed from the first request to the moment
//! the Client System has stored every reading and the queue is empty.
//!
//! The floor is a yardstick, not a product: one axum route that inserts with plain
//! SQLite statements, one loop that selects 1000 rows, writes them with serde_json,
//! posts them with one HTTP client and deletes them. No plugins, no ORM, no batch
//! records, no sync log, no retries.
//!
//! The encoder's figures are times, and, when valgrind is installed, instructions per
//! batch counted by callgrind (`--encoder-loop`): the same from run to run, where the
//! times move by a tenth or more on a shared machine.
//!
//! syncd also does the same work on PostgreSQL, in a database of its own
//! (`syncd_bench_e2e`, dropped and created) on the server at `SYNCD_TEST_POSTGRES_URL`
//! (by default the local one); when none answers, that line says so and is skipped.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use client_system::Server;
use sea_orm::sqlx::{self, Row, SqlitePool};
use syncd::plugin::bindings::types;
use syncd::plugin::{EncoderPlugin, PluginContext, PluginEngine};

/// The same source file the `json_batch` plugin compiles, compiled here natively (it
/// takes `Readings` and `Strings` from its parent: the host's bindings of the same
/// WIT 0.2.0 records).
#[path = "../../plugins/json_batch/src/document.rs"]
mod document;
use syncd::plugin::bindings::v2::types::{Readings, Strings};

const PER_REQUEST: usize = 1000;
/// Runs of syncd and of the floor, end to end, taken in turns.
const E2E_ROUNDS: usize = 4;
const BATCH: usize = 1000;

mod common;
use common::{client_system, plugin, post_all, request_body, wait_for_api, write_site};

/// Request bodies holding readings `0..n`, `PER_REQUEST` each.
fn bodies(n: usize) -> Vec<Vec<u8>> {
    (0..n.div_ceil(PER_REQUEST))
        .map(|r| request_body(r * PER_REQUEST, PER_REQUEST.min(n - r * PER_REQUEST)))
        .collect()
}

async fn wait_until_stored(server: &Server, n: usize) -> Result<()> {
    while (server.stats().await?.readings as usize) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// syncd doing the work, its queue at `database_url`: seconds.
async fn syncd_run(
    dir: &std::path::Path,
    database_url: &str,
    bodies: &[Vec<u8>],
    n: usize,
) -> Result<Duration> {
    let server = client_system(dir, "syncd").await?;
    let config = write_site(
        &dir.join("sync.toml"),
        database_url,
        &server.base_url(),
        &plugin("json_batch"),
        &format!("interval = \"50ms\"\nbatch_size = {BATCH}"),
    )?;
    let api = config.api.listen;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut daemon = tokio::spawn(syncd::daemon::run(config.clone(), async move {
        let _ = stopped.await;
    }));
    wait_for_api(api, &mut daemon).await?;
    // Warm: the plugins instantiated and the transport authenticated.
    post_all(&format!("http://{api}/v1/readings"), &self::bodies(1)[..1]).await?;
    wait_until_stored(&server, 1).await?;
    let stored_before = server.stats().await?.readings as usize;

    let started = Instant::now();
    post_all(&format!("http://{api}/v1/readings"), bodies).await?;
    wait_until_stored(&server, stored_before + n).await?;
    let queue = syncd::queue::Queue::open_for(&config).await?;
    while queue.reading_count().await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    daemon.await??;
    server.stop().await;
    Ok(elapsed)
}

/// The floor's ingest route: the JSON array, checked as syncd checks it, inserted in
/// one transaction.
async fn floor_ingest(
    axum::extract::State(pool): axum::extract::State<SqlitePool>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    #[derive(serde::Deserialize)]
    struct Wire {
        meter_id: String,
        #[serde(default)]
        channel: String,
        timestamp: i64,
        value: f64,
        #[serde(default)]
        unit: String,
        #[serde(default)]
        quality: String,
    }
    let Ok(readings) = serde_json::from_slice::<Vec<Wire>>(&body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    if readings
        .iter()
        .any(|r| !r.value.is_finite() || r.meter_id.is_empty())
    {
        return axum::http::StatusCode::BAD_REQUEST;
    }
    // Many rows per statement, as a careful hand-written service would.
    const ROWS: usize = 100;
    let mut tx = pool.begin().await.unwrap();
    for chunk in readings.chunks(ROWS) {
        let mut sql = String::from(
            "INSERT INTO readings (meter_id, channel, timestamp_ms, value, unit, quality) VALUES ",
        );
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?,?)"
            });
        }
        // Only placeholders are built into the text; the values are bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            query = query
                .bind(&r.meter_id)
                .bind(&r.channel)
                .bind(r.timestamp)
                .bind(r.value)
                .bind(&r.unit)
                .bind(&r.quality);
        }
        query.execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    axum::http::StatusCode::OK
}

/// The floor doing the same work: seconds.
async fn floor_run(dir: &std::path::Path, bodies: &[Vec<u8>], n: usize) -> Result<Duration> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let server = client_system(dir, "floor").await?;
    let options = SqliteConnectOptions::new()
        .filename(dir.join("floor.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let pool = SqlitePool::connect_with(options).await?;
    sqlx::query("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, meter_id TEXT NOT NULL, channel TEXT NOT NULL, timestamp_ms INTEGER NOT NULL, value REAL NOT NULL, unit TEXT NOT NULL, quality TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    let app = axum::Router::new()
        .route("/ingest", axum::routing::post(floor_ingest))
        .with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let http = syncd::daemon::http_client()?;
    let token: serde_json::Value = http
        .post(format!("{}/auth", server.base_url()))
        .json(&serde_json::json!({ "api_key": common::API_KEY }))
        .send()
        .await?
        .json()
        .await?;
    let token = token["token"].as_str().context("a token")?.to_owned();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (pool, http, done) = (pool.clone(), http.clone(), Arc::clone(&done));
        let url = format!("{}/readings/batch", server.base_url());
        tokio::spawn(async move {
            #[derive(serde::Serialize)]
            struct Out<'a> {
                id: i64,
                meter_id: &'a str,
                channel: &'a str,
                timestamp: i64,
                value: f64,
                unit: &'a str,
                quality: &'a str,
            }
            let mut batch = 0u64;
            loop {
                let rows = sqlx::query("SELECT id, meter_id, channel, timestamp_ms, value, unit, quality FROM readings ORDER BY id LIMIT ?")
                    .bind(BATCH as i64)
                    .fetch_all(&pool)
                    .await?;
                if rows.is_empty() {
                    if done.load(Ordering::SeqCst) {
                        return Ok::<(), anyhow::Error>(());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let meter: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
                let channel: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
                let unit: Vec<String> = rows.iter().map(|r| r.get(5)).collect();
                let quality: Vec<String> = rows.iter().map(|r| r.get(6)).collect();
                let readings: Vec<Out> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Out {
                        id: r.get(0),
                        meter_id: &meter[i],
                        channel: &channel[i],
                        timestamp: r.get(3),
                        value: r.get(4),
                        unit: &unit[i],
                        quality: &quality[i],
                    })
                    .collect();
                batch += 1;
                let batch_id = format!("floor-{batch}");
                let body = serde_json::to_vec(&serde_json::json!({
                    "batch_id": batch_id, "site_id": "bench", "readings": readings,
                }))?;
                let last: i64 = rows.last().unwrap().get(0);
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", &batch_id)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "upload: {}",
                    response.status()
                );
                sqlx::query("DELETE FROM readings WHERE id <= ?")
                    .bind(last)
                    .execute(&pool)
                    .await?;
            }
        })
    };
    let started = Instant::now();
    post_all(&format!("http://{addr}/ingest"), bodies).await?;
    done.store(true, Ordering::SeqCst);
    sender.await??;
    wait_until_stored(&server, n).await?;
    let elapsed = started.elapsed();
    server.stop().await;
    Ok(elapsed)
}

/// The batch every encoder figure is taken on: 1000 readings like the daemon's.
fn encoder_batch() -> (Vec<types::Reading>, types::BatchInfo) {
    let readings = (0..1000)
        .map(|i| types::Reading {
            id: i,
            meter_id: format!("elec-{:05}", i % 20_000),
            channel: "import-kwh".into(),
            timestamp_ms: 1_795_305_600_000 + i as i64 * 1000,
            value: 1000.0 + i as f64 * 0.125,
            unit: "kWh".into(),
            quality: "good".into(),
            attributes: vec![("phase".into(), "L1".into())],
        })
        .collect();
    let info = types::BatchInfo {
        batch_id: "0193bench".into(),
        site_id: "bench".into(),
        client_system: "meterit".into(),
        attempt: 1,
    };
    (readings, info)
}

/// The encoder plugin built from the crate `name`, as a Client System's.
async fn load_encoder(engine: &PluginEngine, name: &str) -> Result<EncoderPlugin> {
    let context = PluginContext::new(
        "bench",
        "meterit",
        "http://127.0.0.1:9/",
        Default::default(),
        None,
        Duration::from_secs(1),
        syncd::daemon::http_client()?,
    )?;
    engine.load_encoder(&plugin(name), Arc::new(context)).await
}

/// Instructions per batch of the native and the WASM `json_batch`, counted by
/// valgrind's callgrind: unlike times, the same from one run to the next whatever
/// else the machine does. Each side runs in a process of its own ([`encoder_loop`])
/// twice, for `CALLS` batches and for twice as many; the difference is what `CALLS`
/// batches cost, without the process's start-up. `None` without valgrind.
fn encoder_instructions() -> Result<Option<Instructions>> {
    const CALLS: u64 = 100;
    let found = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("bench: no valgrind: encoder instructions not counted");
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let counted = |side: &str, calls: u64| -> Result<u64> {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .args(["--encoder-loop", side, &calls.to_string()])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            out.status.success(),
            "callgrind on the {side} encoder failed:\n{stderr}"
        );
        stderr
            .lines()
            .find_map(|l| {
                l.split_once("Collected : ")
                    .map(|(_, n)| n.trim().to_owned())
            })
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no instruction count in callgrind's output:\n{stderr}"))
    };
    let per_batch = |side: &str| -> Result<f64> {
        // The first run of the WASM side also compiles the component into the cache,
        // under valgrind's view of the processor, for the two runs after it.
        counted(side, 1)?;
        let (once, twice) = (counted(side, CALLS)?, counted(side, 2 * CALLS)?);
        Ok(twice.saturating_sub(once) as f64 / CALLS as f64)
    };
    Ok(Some(Instructions {
        native: per_batch("native")?,
        wasm: per_batch("wasm")?,
    }))
}

/// Run under callgrind by [`encoder_instructions`]: `calls` batches encoded by one
/// side, `native` or `wasm` (the WASM call as the daemon makes it: the batch handed
/// over, encoded, and the document handed back).
fn encoder_loop(runtime: &tokio::runtime::Runtime, side: &str, calls: u64) -> Result<()> {
    runtime.block_on(async {
        let (readings, info) = encoder_batch();
        let columns = syncd::plugin::columns(&readings)?;
        match side {
            "native" => {
                for _ in 0..calls {
                    let body = document::encode_document(&info.batch_id, &info.site_id, &columns);
                    std::hint::black_box(body.map_err(anyhow::Error::msg)?);
                }
            }
            "wasm" => {
                let engine = PluginEngine::new()?
                    .with_cache_dir(common::target_dir().join("bench/encoder-cache"));
                let mut wasm = load_encoder(&engine, "json_batch").await?;
                for _ in 0..calls {
                    let encoded = wasm.encode(&info, &columns).await?;
                    std::hint::black_box(encoded.map_err(anyhow::Error::msg)?);
                }
            }
            other => anyhow::bail!("--encoder-loop native|wasm, not {other}"),
        }
        Ok(())
    })
}

/// What [`encoder_instructions`] counted, per batch of 1000 readings.
struct Instructions {
    native: f64,
    wasm: f64,
}

/// Per-batch cost of encoding 1000 readings: the WASM `json_batch`, the same code
/// native, and a WASM call that only receives the readings (the `hostile_encoder`
/// fixture with no behaviour set refuses them at once): what crossing the boundary costs.
/// All three start from the batch in columns, the encoder's input, which the daemon
/// lays out from the queue's rows before the call; that layout is timed on its own.
async fn encoder_costs() -> Result<EncoderCosts> {
    let (readings, info) = encoder_batch();
    let engine = PluginEngine::new()?;
    let mut wasm = load_encoder(&engine, "json_batch").await?;
    let mut receive_only = load_encoder(&engine, "hostile_encoder").await?;
    const ROUNDS: u32 = 100;
    const TURNS: u32 = 6;
    // Same output, or the comparison is void.
    let columns = syncd::plugin::columns(&readings)?;
    let expected = document::encode_document(&info.batch_id, &info.site_id, &columns)
        .map_err(anyhow::Error::msg)?;
    let got = wasm
        .encode(&info, &columns)
        .await?
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        got.body == expected,
        "the WASM and native encoders disagree"
    );

    // The four, in turns, several times: the machine's load moves over a run, and the
    // fastest turn of each is the one least disturbed by it.
    let (mut native, mut in_wasm, mut boundary) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut layout = Duration::MAX;
    for _ in 0..TURNS {
        let started = Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(syncd::plugin::columns(std::hint::black_box(&readings))?);
        }
        layout = layout.min(started.elapsed() / ROUNDS);
        let started = Instant::now();
        for _ in 0..ROUNDS {
            let _ = std::hint::black_box(document::encode_document(
                &info.batch_id,
                &info.site_id,
                std::hint::black_box(&columns),
            ));
        }
        native = native.min(started.elapsed() / ROUNDS);
        let started = Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(
                wasm.encode(&info, &columns)
                    .await?
                    .map_err(anyhow::Error::msg)?,
            );
        }
        in_wasm = in_wasm.min(started.elapsed() / ROUNDS);
        let started = Instant::now();
        for _ in 0..ROUNDS {
            let refused = receive_only.encode(&info, &columns).await?;
            anyhow::ensure!(refused.is_err(), "the fixture refuses");
        }
        boundary = boundary.min(started.elapsed() / ROUNDS);
    }
    Ok(EncoderCosts {
        native,
        wasm: in_wasm,
        boundary,
        layout,
    })
}

/// `d` in microseconds.
fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// What [`encoder_costs`] measured, per batch of 1000 readings.
struct EncoderCosts {
    native: Duration,
    wasm: Duration,
    /// A WASM call that receives the batch and does nothing with it.
    boundary: Duration,
    /// Laying the batch out in columns, in the host, before the call.
    layout: Duration,
}

fn main() -> Result<()> {
    let n = common::number("--readings", 100_000)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--encoder-loop") {
        let (side, calls) = (args.get(at + 1), args.get(at + 2));
        let calls = calls
            .and_then(|c| c.parse().ok())
            .context("--encoder-loop SIDE CALLS")?;
        return encoder_loop(&runtime, side.map_or("", String::as_str), calls);
    }
    if args.iter().any(|a| a == "--encoder-only") {
        // For work on the encoder: its figures alone, printed, no JSON written.
        let costs = runtime.block_on(encoder_costs())?;
        print_encoder(&costs, encoder_instructions()?.as_ref());
        return Ok(());
    }
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let bodies = bodies(n);
        // Alternate, so that neither always runs on a cooler machine; the best of each
        // is the run least disturbed by whatever else the machine did.
        let mut syncd_times = Vec::new();
        let mut floor_times = Vec::new();
        for round in 0..E2E_ROUNDS {
            let sub = dir.path().join(format!("round-{round}"));
            std::fs::create_dir_all(sub.join("s"))?;
            std::fs::create_dir_all(sub.join("f"))?;
            floor_times.push(floor_run(&sub.join("f"), &bodies, n).await?);
            syncd_times.push(syncd_run(&sub.join("s"), "sqlite://syncd.db", &bodies, n).await?);
        }
        let postgres = match common::fresh_postgres("syncd_bench_e2e").await {
            Ok(url) => {
                let sub = dir.path().join("postgres");
                std::fs::create_dir_all(&sub)?;
                Some(syncd_run(&sub, &url, &bodies, n).await?)
            }
            Err(why) => {
                eprintln!("bench: PostgreSQL skipped: {why:#}");
                None
            }
        };
        let best = |t: &[Duration]| t.iter().min().copied().unwrap();
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let (syncd, floor) = (rate(best(&syncd_times)), rate(best(&floor_times)));
        let encoder = encoder_costs().await?;
        let instructions = encoder_instructions()?;

        println!();
        println!("end to end, {n} readings, SQLite (best of {E2E_ROUNDS} each, alternated)");
        println!("  syncd                    {syncd:>10.0} readings/s");
        println!("  native floor             {floor:>10.0} readings/s");
        println!("  syncd / floor            {:>10.2}", syncd / floor);
        let postgres = postgres.map(rate);
        match postgres {
            Some(pg) => {
                println!("end to end, {n} readings, syncd on PostgreSQL (one run)");
                println!("  syncd                    {pg:>10.0} readings/s");
                println!("  syncd / SQLite floor     {:>10.2}", pg / floor);
            }
            None => println!("end to end on PostgreSQL: skipped, no server answered"),
        }
        print_encoder(&encoder, instructions.as_ref());
        let json = serde_json::json!({
            "readings": n,
            "syncd_readings_per_s": syncd,
            "floor_readings_per_s": floor,
            "syncd_over_floor": syncd / floor,
            "syncd_postgres_readings_per_s": postgres,
            "encoder_native_us": us(encoder.native),
            "encoder_wasm_us": us(encoder.wasm),
            "encoder_wasm_over_native": encoder.wasm.as_secs_f64() / encoder.native.as_secs_f64(),
            "encoder_boundary_us": us(encoder.boundary),
            "encoder_columns_layout_us": us(encoder.layout),
            "encoder_native_instructions": instructions.as_ref().map(|i| i.native),
            "encoder_wasm_instructions": instructions.as_ref().map(|i| i.wasm),
            "encoder_instructions_wasm_over_native": instructions.as_ref().map(|i| i.wasm / i.native),
        });
        common::write_json("e2e", &json)?;
        Ok(())
    })
}

/// The encoder's figures, as a table.
fn print_encoder(c: &EncoderCosts, instructions: Option<&Instructions>) {
    println!("encoder, one batch of 1000 readings");
    println!("  native json_batch        {:>10.1} µs", us(c.native));
    println!("  WASM json_batch          {:>10.1} µs", us(c.wasm));
    println!(
        "  WASM / native            {:>10.2}",
        c.wasm.as_secs_f64() / c.native.as_secs_f64()
    );
    println!(
        "  passing the readings in  {:>10.1} µs ({:.0}% of the WASM call)",
        us(c.boundary),
        100.0 * c.boundary.as_secs_f64() / c.wasm.as_secs_f64()
    );
    println!(
        "  laying out the columns   {:>10.1} µs (host, before either encoder)",
        us(c.layout)
    );
    match instructions {
        Some(i) => {
            println!("  instructions, native     {:>10.0} (callgrind)", i.native);
            println!("  instructions, WASM       {:>10.0} (callgrind)", i.wasm);
            println!("  instructions WASM/native {:>10.2}", i.wasm / i.native);
        }
        None => println!("  instructions: not counted, no valgrind"),
    }
}
