//! Faults on the wire: while readings stream in, the reference Client System answers a
//! random share of the uploads with an error status, a throttle, a slow answer, a
//! reset before or after storing, or a truncated answer, and goes away entirely for
//! longer than a batch's retries would last. Nothing is lost, nothing stored twice,
//! nothing dead-lettered.
//!
//! The suite runs a short version; `cargo xtask reliability` a long one. Knobs:
//! - `SYNCD_FAULT_SECONDS`: how long readings stream in (default 6);
//! - `SYNCD_FAULT_RATE`: the share of uploads that meet a fault (default 0.4);
//! - `SYNCD_FAULT_SEED`: the seed of the faults (default: from the clock, printed).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stream::{Ingested, assert_exactly_once, stream_readings};
use common::{Site, eventually};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_and_an_outage_lose_nothing_and_dead_letter_nothing() {
    let seconds: u64 = env_or("SYNCD_FAULT_SECONDS", 6);
    let rate: f64 = env_or("SYNCD_FAULT_RATE", 0.4);
    let seed: u64 = env_or(
        "SYNCD_FAULT_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    println!("SYNCD_FAULT_SEED={seed}");
    let started = Instant::now();

    // Ten retries on a fast backoff (about a second in all): the outage of two seconds
    // outlasts them, and must spend none. Ten, not the default five, because a batch
    // meeting six error statuses in a row does deserve its dead letter, and at this
    // fault rate that happens once in a few thousand batches. Slow answers (up to
    // 1.5 s) overrun the request timeout.
    let policy = "interval = \"100ms\"\nbatch_size = 100\nmax_retries = 10\nbackoff = { initial = \"20ms\", max = \"100ms\" }\nrequest_timeout = \"1s\"\nconnectivity_check = \"200ms\"\n";
    let mut site = Site::new(policy).await;
    let chaos = client_system::Chaos {
        seed,
        rate,
        max_delay_ms: 1500,
    };
    site.client().set_chaos(Some(chaos));
    let daemon = site.start();
    site.wait_for_api().await;

    let ingested = Arc::new(Mutex::new(Ingested::default()));
    let (stop_stream, stream_stop) = tokio::sync::watch::channel(false);
    let stream = stream_readings(
        site.api(),
        Duration::from_millis(20),
        Arc::clone(&ingested),
        stream_stop,
    );

    // Faults for the first third, an outage in the middle, faults again after.
    let third = Duration::from_secs(seconds) / 3;
    tokio::time::sleep(third).await;
    let mut drawn = site.client().chaos_drawn();
    site.endpoints[0].stop().await;
    let outage = Instant::now();
    tokio::time::sleep(third).await;
    eventually(Duration::from_secs(30), "the outage noticed", || async {
        site.status().await["connectivity"]["state"] == "offline"
    })
    .await;
    site.endpoints[0].start().await;
    let outage = outage.elapsed();
    site.client().set_chaos(Some(client_system::Chaos {
        seed: seed.wrapping_add(1),
        ..chaos
    }));
    tokio::time::sleep(third).await;
    let _ = stop_stream.send(true);
    stream.await.unwrap();

    let (accepted, unknown) = {
        let ingested = ingested.lock().unwrap();
        (ingested.accepted.clone(), ingested.unknown.clone())
    };
    assert!(unknown.is_empty(), "the daemon never stopped answering");
    // Readings come at about 1200/s; under 40% of faults (each costing up to a second:
    // a Retry-After, a slow answer) one worker delivers about 350/s, so the backlog
    // drains after the stream stops, in about three times its length.
    eventually(
        Duration::from_secs(120 + 5 * seconds),
        "every reading delivered",
        || async { site.status().await["queued"] == 0 },
    )
    .await;
    for (kind, n) in site.client().chaos_drawn() {
        *drawn.entry(kind).or_default() += n;
    }
    site.client().set_chaos(None);
    daemon.stop().await;

    let queue = site.queue().await;
    let dead = queue.dead_letters().await.unwrap();
    if !dead.is_empty() {
        for entry in queue.sync_log_since(0).await.unwrap() {
            if entry.batch_id.as_deref() == Some(dead[0].id.as_str()) {
                println!("{entry:?}");
            }
        }
    }
    assert!(dead.is_empty(), "dead-lettered: {dead:#?}");
    assert_exactly_once(site.client(), &accepted, &unknown).await;
    assert_eq!(
        queue.reading_count().await.unwrap(),
        0,
        "the queue is empty"
    );
    let stats = site.client().stats().await.unwrap();
    println!(
        "fault run (seed {seed}), {:.1} s: {} readings delivered once each in {} batches; \
         {} re-sent batches dropped as duplicates; an outage of {:.1} s; faults injected: {drawn:?}",
        started.elapsed().as_secs_f64(),
        accepted.len(),
        stats.batches,
        stats.duplicates,
        outage.as_secs_f64(),
    );
    assert!(
        drawn.values().sum::<u64>() > 0,
        "the run met no fault at all"
    );
}
