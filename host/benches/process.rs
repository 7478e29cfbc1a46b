//! The daemon as a process (`cargo xtask bench`): the release `syncd` binary run as an
//! operator runs it, against the reference Client System on loopback, on SQLite.
//! Prints a table and writes `target/bench/process.json`.
//!
//! - Start-up to the first batch: readings already queued, `syncd run` spawned, timed
//!   until the Client System has stored the first batch; with an empty component cache
//!   (the plugins compiled) and with a warm one.
//! - Idle: resident memory once the daemon has started and has nothing to do.
//! - Steady load: readings posted at a fixed rate (`--rate N`, default 10000 per second)
//!   for `--seconds N` (default 20); the daemon's CPU time over the wall time of the
//!   measured window (1.0 is one core), its peak resident memory, and how far delivery
//!   lags ingest at the end.
//!
//! The CPU and memory figures are the daemon's alone (read from `/proc/<pid>`): the
//! Client System and the load generator run in this process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use client_system::Server;
use syncd::config::Config;
use syncd::queue::Queue;
use syncd::reading::NewReading;

const BATCH: usize = 1000;
/// Readings per ingest request under steady load (one request every 10 ms at 10k/s).
const PER_REQUEST: usize = 100;

mod common;
use common::{client_system, plugin, reading, request_body, write_site};

/// One site: its folder, config and API address, delivering to `server`.
struct Site {
    dir: PathBuf,
    config_path: PathBuf,
    config: Config,
    api: std::net::SocketAddr,
}

impl Site {
    fn new(dir: &Path, server: &Server) -> Result<Self> {
        let config_path = dir.join("sync.toml");
        let config = write_site(
            &config_path,
            "sqlite://syncd.db",
            &server.base_url(),
            &plugin("json_batch"),
            &format!(
                "interval = \"1s\"\nbatch_size = {BATCH}\n[plugins]\ncache_dir = \"plugin-cache\""
            ),
        )?;
        let api = config.api.listen;
        Ok(Self {
            dir: dir.to_owned(),
            config_path,
            config,
            api,
        })
    }

    fn spawn(&self) -> Result<Child> {
        Command::new(env!("CARGO_BIN_EXE_syncd"))
            .arg("--config")
            .arg(&self.config_path)
            .args(["--log-level", "warn", "run"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the syncd binary")
    }

    async fn wait_for_api(&self, child: &mut Child) -> Result<()> {
        let http = syncd::daemon::http_client()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("syncd exited at start-up: {status}");
            }
            if http
                .get(format!("http://{}/healthz", self.api))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("syncd's API did not answer within a minute");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Asks the daemon to stop as an operator would (SIGTERM) and waits for it.
fn stop(mut child: Child) -> Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "syncd exited with {status}");
    Ok(())
}

/// A field of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line.split_whitespace()
        .nth(1)
        .context("a number")?
        .parse()
        .context("a number")
}

/// User + system CPU time the process has used so far.
fn cpu_time(pid: u32, ticks_per_s: f64) -> Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let rest = &text[text.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_s))
}

fn clock_ticks_per_second() -> Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

async fn stored(server: &Server) -> Result<usize> {
    Ok(server.stats().await?.readings as usize)
}

/// Spawn → the first batch stored by the Client System, with one batch queued.
async fn start_to_first_batch(site: &Site, server: &Server, cold: bool) -> Result<Duration> {
    if cold {
        let _ = std::fs::remove_dir_all(site.dir.join("plugin-cache"));
    }
    let queue = Queue::open_for(&site.config).await?;
    let readings: Vec<NewReading> = (0..BATCH).map(reading).collect();
    queue.enqueue(&readings).await?;
    drop(queue);
    let before = stored(server).await?;
    let started = Instant::now();
    let mut child = site.spawn()?;
    let deadline = started + Duration::from_secs(60);
    while stored(server).await? < before + BATCH {
        if let Some(status) = child.try_wait()? {
            bail!("syncd exited before its first batch: {status}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("no batch within a minute of start-up");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    stop(child)?;
    Ok(elapsed)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

struct Load {
    offered_per_s: f64,
    cpu_share: f64,
    peak_rss_kib: u64,
    rss_at_end_kib: u64,
    /// Of `rss_at_end_kib`, memory of the process's own (not pages of mapped files).
    rss_anon_at_end_kib: u64,
    drained_after: Duration,
}

/// Readings posted at `rate` per second for `seconds`; the daemon's CPU share over the
/// window after the first fifth, its peak RSS, and the time to deliver what is left.
async fn steady_load(
    site: &Site,
    server: &Server,
    child: &Child,
    rate: usize,
    seconds: u64,
) -> Result<Load> {
    let pid = child.id();
    let ticks = clock_ticks_per_second()?;
    let http = syncd::daemon::http_client()?;
    let url = format!("http://{}/v1/readings", site.api);
    let before = stored(server).await?;
    let requests = rate * seconds as usize / PER_REQUEST;
    let period = Duration::from_secs_f64(PER_REQUEST as f64 / rate as f64);
    let posted = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let warm_up = requests / 5;
    let mut window_start = None;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(requests);
    for r in 0..requests {
        ticker.tick().await;
        if r == warm_up {
            window_start = Some((Instant::now(), cpu_time(pid, ticks)?));
        }
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let (http, url, posted) = (http.clone(), url.clone(), Arc::clone(&posted));
        let body = request_body(1_000_000 + r * PER_REQUEST, PER_REQUEST);
        tasks.push(tokio::spawn(async move {
            let response = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            drop(permit);
            anyhow::ensure!(
                response.status().is_success(),
                "ingest: {}",
                response.status()
            );
            posted.fetch_add(PER_REQUEST, Ordering::Relaxed);
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let offered = requests * PER_REQUEST;
    let offered_per_s = offered as f64 / started.elapsed().as_secs_f64();
    let (window_wall, window_cpu) = window_start.context("a window")?;
    let cpu_share =
        (cpu_time(pid, ticks)? - window_cpu).as_secs_f64() / window_wall.elapsed().as_secs_f64();
    let ingest_done = Instant::now();
    let deadline = ingest_done + Duration::from_secs(120);
    while stored(server).await? < before + offered {
        anyhow::ensure!(
            Instant::now() < deadline,
            "readings still undelivered two minutes after the load stopped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained_after = ingest_done.elapsed();
    Ok(Load {
        offered_per_s,
        cpu_share,
        peak_rss_kib: status_kib(pid, "VmHWM:")?,
        rss_at_end_kib: status_kib(pid, "VmRSS:")?,
        rss_anon_at_end_kib: status_kib(pid, "RssAnon:")?,
        drained_after,
    })
}

fn main() -> Result<()> {
    let rate = common::number("--rate", 10_000)?;
    let seconds = common::number("--seconds", 20)? as u64;
    anyhow::ensure!(
        Path::new("/proc/self/stat").exists(),
        "this benchmark reads /proc (Linux)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let server = client_system(dir.path(), "process").await?;
        let site = Site::new(dir.path(), &server)?;

        eprintln!("bench: start-up to the first batch…");
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        for _ in 0..3 {
            cold.push(start_to_first_batch(&site, &server, true).await?);
        }
        for _ in 0..5 {
            warm.push(start_to_first_batch(&site, &server, false).await?);
        }
        let (cold, warm) = (median(cold), median(warm));

        eprintln!("bench: idle, then {rate} readings/s for {seconds} s…");
        let mut child = site.spawn()?;
        site.wait_for_api(&mut child).await?;
        // Past start-up: the first probe, heartbeat and config download are done.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_rss = status_kib(child.id(), "VmRSS:")?;
        // RSS also counts the pages of the binary's code that have run (mapped from
        // the file, clean: the kernel can drop them and read them again); what the
        // daemon holds of its own is the anonymous part.
        let idle_rss_anon = status_kib(child.id(), "RssAnon:")?;
        let load = steady_load(&site, &server, &child, rate, seconds).await;
        let load = match load {
            Ok(load) => load,
            Err(e) => {
                let _ = child.kill();
                return Err(e);
            }
        };
        stop(child)?;
        server.stop().await;

        let mib = |kib: u64| kib as f64 / 1024.0;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!();
        println!("the daemon as a process (release binary, SQLite)");
        println!(
            "  start-up to first batch, cold cache  {:>10.0} ms (median of 3)",
            ms(cold)
        );
        println!(
            "  start-up to first batch, warm cache  {:>10.0} ms (median of 5)",
            ms(warm)
        );
        println!(
            "  idle RSS                             {:>10.1} MiB",
            mib(idle_rss)
        );
        println!(
            "    of it anonymous (not mapped files) {:>10.1} MiB",
            mib(idle_rss_anon)
        );
        println!(
            "  steady load offered                  {:>10.0} readings/s",
            load.offered_per_s
        );
        println!(
            "  CPU, share of one core               {:>10.2}",
            load.cpu_share
        );
        println!(
            "  peak RSS                             {:>10.1} MiB",
            mib(load.peak_rss_kib)
        );
        println!(
            "  RSS after the load                   {:>10.1} MiB",
            mib(load.rss_at_end_kib)
        );
        println!(
            "    of it anonymous (not mapped files) {:>10.1} MiB",
            mib(load.rss_anon_at_end_kib)
        );
        println!(
            "  delivered all, after the load ended  {:>10.0} ms",
            ms(load.drained_after)
        );
        let json = serde_json::json!({
            "startup_to_first_batch_cold_ms": ms(cold),
            "startup_to_first_batch_warm_ms": ms(warm),
            "idle_rss_mib": mib(idle_rss),
            "idle_rss_anon_mib": mib(idle_rss_anon),
            "steady_rate_offered_per_s": load.offered_per_s,
            "steady_cpu_share_of_one_core": load.cpu_share,
            "steady_peak_rss_mib": mib(load.peak_rss_kib),
            "steady_rss_after_mib": mib(load.rss_at_end_kib),
            "steady_rss_after_anon_mib": mib(load.rss_anon_at_end_kib),
            "steady_drained_after_ms": ms(load.drained_after),
        });
        common::write_json("process", &json)?;
        Ok(())
    })
}
