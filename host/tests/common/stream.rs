//! A stream of readings posted to a daemon's ingest API through restarts and outages,
//! and what the Client System stored of it, by sequence number.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The first reading's timestamp; a reading's sequence number is its offset from it.
pub const EPOCH_MS: i64 = 1_790_000_000_000;
/// Readings per ingest request.
pub const PER_POST: u64 = 25;

/// What the stream of ingest requests learnt: each reading's sequence number, by
/// whether the daemon answered 200 (accepted) or was killed before answering (unknown:
/// it may or may not have been queued).
#[derive(Default)]
pub struct Ingested {
    pub accepted: Vec<u64>,
    pub unknown: Vec<u64>,
}

/// Posts [`PER_POST`] readings to the daemon's API every `pause` until told to stop,
/// through every kill and restart.
pub fn stream_readings(
    api: String,
    pause: Duration,
    ingested: Arc<Mutex<Ingested>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    stream_readings_from(api, 0, pause, ingested, stop)
}

/// [`stream_readings`] with sequence numbers from `first`.
pub fn stream_readings_from(
    api: String,
    first: u64,
    pause: Duration,
    ingested: Arc<Mutex<Ingested>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = syncd::daemon::http_client().expect("an HTTP client");
        let mut next: u64 = first;
        while !*stop.borrow() {
            let seqs: Vec<u64> = (next..next + PER_POST).collect();
            let body: Vec<_> = seqs
                .iter()
                .map(|&seq| {
                    serde_json::json!({
                        "meter_id": format!("crash-{}", seq % 16),
                        "timestamp": EPOCH_MS + seq as i64,
                        "value": seq as f64,
                    })
                })
                .collect();
            match http
                .post(format!("{api}/v1/readings"))
                .json(&body)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {
                    ingested.lock().unwrap().accepted.extend(&seqs);
                    next += PER_POST;
                }
                Ok(response) => panic!("ingest refused: {}", response.status()),
                Err(e) if e.is_connect() => {
                    // The daemon is down: nothing was sent. Try again shortly.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => {
                    // Sent, and the daemon died before answering.
                    ingested.lock().unwrap().unknown.extend(&seqs);
                    next += PER_POST;
                }
            }
            tokio::time::sleep(pause).await;
        }
    })
}

/// How many times the server stored each sequence number.
pub async fn stored_seqs(server: &client_system::Server) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for r in server.stored_readings().await.unwrap() {
        *seen.entry((r.timestamp - EPOCH_MS) as u64).or_insert(0) += 1;
    }
    seen
}

/// Asserts that the server stored every accepted reading exactly once, and nothing
/// else but readings whose ingest was cut off (each at most once); returns what it
/// stored.
pub async fn assert_exactly_once(
    server: &client_system::Server,
    accepted: &[u64],
    unknown: &[u64],
) -> BTreeMap<u64, usize> {
    let stored = stored_seqs(server).await;
    for seq in accepted {
        let times = stored.get(seq).copied().unwrap_or(0);
        assert_eq!(times, 1, "reading {seq} stored {times} times");
    }
    for (seq, times) in &stored {
        assert!(
            accepted.binary_search(seq).is_ok() || unknown.contains(seq),
            "reading {seq} stored but never sent"
        );
        assert_eq!(*times, 1, "reading {seq} stored {times} times");
    }
    stored
}
