//! Crash consistency: the `syncd` binary, fed readings without pause, is killed with
//! SIGKILL at random moments — while it ingests, encodes, uploads, acknowledges,
//! prunes or reloads — and started again, many times. At the end every reading whose
//! ingest was answered 200 is stored by the Client System exactly once, the queue is
//! empty, and nothing went to dead letters.
//!
//! The suite runs a short version. `cargo xtask reliability` runs a long one and prints
//! its figures; the knobs are environment variables:
//! - `SYNCD_CRASH_KILLS`: how many kills (default 6);
//! - `SYNCD_CRASH_SEED`: the seed of every random choice (default: from the clock; the
//!   seed in use is printed, so a failing run can be repeated);
//! - `SYNCD_CRASH_CHAOS`: also inject random faults on the wire at this rate (0 to 1).

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stream::{Ingested, assert_exactly_once, stored_seqs, stream_readings};
use common::{Site, eventually};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    seed: u64,
    kills: usize,
    kills_during_reload: usize,
    accepted: usize,
    unknown_stored: usize,
    unknown_lost: usize,
    duplicates_resent: u64,
    resume_ms: Vec<u128>,
    chaos: BTreeMap<&'static str, u64>,
    elapsed: Duration,
}

impl Figures {
    fn print(&self) {
        let mut resume = self.resume_ms.clone();
        resume.sort_unstable();
        let pick = |q: f64| {
            resume
                .get(((resume.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "crash run (seed {}), {:.1} s",
            self.seed,
            self.elapsed.as_secs_f64()
        );
        println!("  kills survived:             {}", self.kills);
        println!("  kills during a reload:      {}", self.kills_during_reload);
        println!("  readings accepted:          {}", self.accepted);
        println!(
            "  readings cut off by a kill: {} stored, {} never queued",
            self.unknown_stored, self.unknown_lost
        );
        println!(
            "  batches re-sent, dropped by the server as duplicates: {}",
            self.duplicates_resent
        );
        println!(
            "  restart to first batch stored: median {} ms, p90 {} ms, max {} ms ({} restarts)",
            pick(0.5),
            pick(0.9),
            pick(1.0),
            resume.len()
        );
        if !self.chaos.is_empty() {
            println!("  faults injected on the wire: {:?}", self.chaos);
        }
    }
}

struct Process(Child);

impl Process {
    fn spawn(site: &Site, log: &std::path::Path) -> Process {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_syncd"))
            .args(["-c", site.config_path().to_str().unwrap(), "run"])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("the daemon starts");
        Process(child)
    }

    fn kill(&mut self) {
        // Child::kill sends SIGKILL.
        self.0.kill().expect("SIGKILL sent");
        self.0.wait().expect("the daemon is reaped");
    }

    fn terminate(&mut self) {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM sent");
        let status = self.0.wait().expect("the daemon exits");
        assert!(status.success(), "graceful stop: {status}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `rounds` rounds of two kills each; see the module's documentation.
async fn crash_run(rounds: usize, seed: u64, chaos_rate: f64) -> Figures {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    // Short interval and backoff so that every phase happens often; retries generous
    // enough that random faults never exhaust them (a dead letter would fail the run).
    let policy = "interval = \"100ms\"\nbatch_size = 200\nmax_retries = 30\nbackoff = { initial = \"50ms\", max = \"400ms\" }\nrequest_timeout = \"2s\"\nconnectivity_check = \"300ms\"\n";
    let site = Site::new(policy).await;
    let server = site.client();
    if chaos_rate > 0.0 {
        server.set_chaos(Some(client_system::Chaos {
            seed,
            rate: chaos_rate,
            max_delay_ms: 2500,
        }));
    }
    let config_path = site.config_path();
    let config_text = std::fs::read_to_string(&config_path).unwrap();
    let log = site.dir.path().join("daemon.log");

    let ingested = Arc::new(Mutex::new(Ingested::default()));
    let (stop_stream, stream_stop) = tokio::sync::watch::channel(false);
    let stream = stream_readings(
        site.api(),
        Duration::from_millis(5),
        Arc::clone(&ingested),
        stream_stop,
    );

    let mut figures = Figures {
        seed,
        kills: 0,
        kills_during_reload: 0,
        accepted: 0,
        unknown_stored: 0,
        unknown_lost: 0,
        duplicates_resent: 0,
        resume_ms: Vec::new(),
        chaos: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    for round in 0..rounds {
        // A kill at a random moment of its life, from before its API answers to well
        // into steady delivery; one time in three while a sync.toml edit is reloaded.
        let mut daemon = Process::spawn(&site, &log);
        tokio::time::sleep(Duration::from_millis(rng.u64(50..1500))).await;
        if rng.u8(..3) == 0 {
            let batch_size = if round % 2 == 0 { 150 } else { 200 };
            let edited =
                config_text.replace("batch_size = 200", &format!("batch_size = {batch_size}"));
            std::fs::write(&config_path, edited).unwrap();
            // The reload is debounced, parsed and applied within this window.
            tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
            figures.kills_during_reload += 1;
        }
        daemon.kill();
        figures.kills += 1;

        // A kill the moment the Client System has stored a batch: the daemon is about
        // to acknowledge it, or pruning it. This also measures how soon delivery
        // resumes after a restart.
        let before = server.stats().await.unwrap().batches;
        let restarted = Instant::now();
        let mut daemon = Process::spawn(&site, &log);
        let resumed = tokio::time::timeout(Duration::from_secs(30), async {
            while server.stats().await.unwrap().batches == before {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        if resumed.is_ok() {
            figures.resume_ms.push(restarted.elapsed().as_millis());
        }
        daemon.kill();
        figures.kills += 1;
    }

    // The last life: stop ingest, let it drain, stop it gracefully.
    let _ = stop_stream.send(true);
    stream.await.unwrap();
    if chaos_rate > 0.0 {
        figures.chaos = server.chaos_drawn();
        server.set_chaos(None);
    }
    let mut daemon = Process::spawn(&site, &log);
    let (accepted, unknown) = {
        let ingested = ingested.lock().unwrap();
        (ingested.accepted.clone(), ingested.unknown.clone())
    };
    eventually(
        Duration::from_secs(120),
        "every accepted reading stored",
        || async {
            let stored = stored_seqs(server).await;
            accepted.iter().all(|seq| stored.contains_key(seq))
        },
    )
    .await;
    site.wait_for_api().await;
    eventually(Duration::from_secs(60), "the queue drained", || async {
        site.status().await["queued"] == 0
    })
    .await;
    daemon.terminate();

    let stored = assert_exactly_once(server, &accepted, &unknown).await;
    let queue = site.queue().await;
    assert_eq!(
        queue.reading_count().await.unwrap(),
        0,
        "the queue is empty"
    );
    assert!(
        queue.dead_letters().await.unwrap().is_empty(),
        "no dead letters"
    );

    figures.accepted = accepted.len();
    figures.unknown_stored = unknown.iter().filter(|s| stored.contains_key(s)).count();
    figures.unknown_lost = unknown.len() - figures.unknown_stored;
    figures.duplicates_resent = server.stats().await.unwrap().duplicates;
    figures.elapsed = started.elapsed();
    figures
}

fn seed() -> u64 {
    env_or(
        "SYNCD_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice() {
    let kills = env_or("SYNCD_CRASH_KILLS", 6_usize);
    let seed = seed();
    println!("SYNCD_CRASH_SEED={seed}");
    let figures = crash_run(kills.div_ceil(2), seed, env_or("SYNCD_CRASH_CHAOS", 0.0)).await;
    figures.print();
}
