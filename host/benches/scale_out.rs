//! Several syncd processes sharing one PostgreSQL queue (`cargo xtask bench`): a
//! backlog of `--scale-readings N` readings (default 100000) is queued, then 1, 2 and 3
//! `syncd run` processes are started together on it and timed until the reference
//! Client System has stored every reading. Prints readings/s for each and the ratio to
//! one process; writes `target/bench/scale_out.json`. When no PostgreSQL server
//! answers (`SYNCD_TEST_POSTGRES_URL`, default the local one), says so and writes
//! null figures.
//!
//! Every process and the Client System run on this machine: with fewer cores than
//! processes, the figures show what sharing the queue costs rather than what more
//! machines would gain.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use syncd::queue::Queue;

mod common;
use common::{client_system, plugin, reading, write_site};

const DATABASE: &str = "syncd_bench_scale_out";

/// `syncd run` processes, stopped (SIGTERM, then SIGKILL) when dropped.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Queues `readings` on a fresh database, starts `processes` daemons on it, and
/// returns how long until the Client System stored them all.
async fn run(dir: &Path, processes: usize, readings: usize) -> Result<Duration> {
    let url = common::fresh_postgres(DATABASE).await?;
    let run_dir = dir.join(format!("run-{processes}-{readings}"));
    std::fs::create_dir_all(&run_dir)?;
    let server = client_system(&run_dir, "meterit").await?;
    let configs = (0..processes)
        .map(|i| {
            let path = dir.join(format!("sync-{processes}-{readings}-{i}.toml"));
            write_site(
                &path,
                &url,
                &server.base_url(),
                &plugin("json_batch"),
                "interval = \"1s\"\nbatch_size = 1000\n[plugins]\ncache_dir = \"plugin-cache\"",
            )
            .map(|config| (path, config))
        })
        .collect::<Result<Vec<_>>>()?;
    let queue = Queue::open_for(&configs[0].1).await?;
    for start in (0..readings).step_by(10_000) {
        let chunk: Vec<_> = (start..(start + 10_000).min(readings))
            .map(reading)
            .collect();
        queue.enqueue(&chunk).await?;
    }
    let started = Instant::now();
    let _daemons = Processes(
        configs
            .iter()
            .map(|(path, _)| {
                Command::new(env!("CARGO_BIN_EXE_syncd"))
                    .arg("--config")
                    .arg(path)
                    .args(["--log-level", "warn", "run"])
                    .current_dir(dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .context("cannot start the syncd binary")
            })
            .collect::<Result<Vec<_>>>()?,
    );
    let deadline = started + Duration::from_secs(600);
    loop {
        if server.stats().await?.readings >= readings as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{processes} processes did not deliver {readings} readings in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let stats = server.stats().await?;
    if stats.readings != readings as u64 || stats.overlapping != 0 {
        bail!(
            "{processes} processes: {} readings stored for {readings}, {} overlapping uploads",
            stats.readings,
            stats.overlapping
        );
    }
    server.stop().await;
    Ok(elapsed)
}

fn main() -> Result<()> {
    let readings = common::number("--scale-readings", 100_000)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    println!("scale-out on PostgreSQL: {readings} readings queued, then delivered by N processes");
    let figures = runtime.block_on(async {
        // Compiles the plugins into the shared cache, so that no run pays for it.
        if let Err(error) = run(dir.path(), 1, 1000).await {
            println!("  skipped: {error:#}");
            return Ok::<_, anyhow::Error>(None);
        }
        let mut rates = Vec::new();
        for processes in 1..=3 {
            let elapsed = run(dir.path(), processes, readings).await?;
            let rate = readings as f64 / elapsed.as_secs_f64();
            rates.push(rate);
            println!(
                "  {processes} process{}            {rate:>10.0} readings/s  ({:.2} of one process)",
                if processes == 1 { " " } else { "es" },
                rate / rates[0]
            );
        }
        Ok(Some(rates))
    })?;
    let rate = |i: usize| figures.as_ref().map(|r: &Vec<f64>| r[i]);
    let ratio = |i: usize| figures.as_ref().map(|r: &Vec<f64>| r[i] / r[0]);
    common::write_json(
        "scale_out",
        &serde_json::json!({
            "readings": readings,
            "one_process_readings_per_s": rate(0),
            "two_processes_readings_per_s": rate(1),
            "three_processes_readings_per_s": rate(2),
            "two_over_one": ratio(1),
            "three_over_one": ratio(2),
        }),
    )
}
