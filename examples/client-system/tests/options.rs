//! The reference Client System's storage options, over real HTTP on loopback: what a
//! batch leaves behind with its readings stored and without, flushed or not.

use client_system::{Options, Server};
use serde_json::{Value, json};

const KEY: &str = "options-test-key";

/// Starts a server in `dir` with the two storage options.
async fn start(dir: &std::path::Path, flush_each_batch: bool, store_readings: bool) -> Server {
    Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Options {
            api_key: KEY.into(),
            database: dir.join("client-system.db"),
            flush_each_batch,
            store_readings,
        },
    )
    .await
    .expect("the server starts")
}

/// Uploads batch `id` of `n` readings; the answer's JSON.
async fn upload(server: &Server, id: &str, n: usize) -> Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let base = server.base_url();
    let auth: Value = http
        .post(format!("{base}/auth"))
        .json(&json!({ "api_key": KEY }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = auth["token"].as_str().expect("a token").to_owned();
    let readings: Vec<Value> = (0..n)
        .map(|i| {
            json!({"id": i, "meter_id": format!("m-{i}"), "channel": "kwh",
                   "timestamp": 1_700_000_000_000_i64 + i as i64, "value": i as f64 * 0.5,
                   "unit": "kWh", "quality": "good", "attributes": {"phase": "L1"}})
        })
        .collect();
    let answer = http
        .post(format!("{base}/readings/batch"))
        .bearer_auth(token)
        .header("idempotency-key", id)
        .json(&json!({ "batch_id": id, "site_id": "site", "readings": readings }))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    answer.json().await.unwrap()
}

#[tokio::test]
async fn without_its_readings_a_batch_is_still_counted_and_recognised_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), false, false).await;
    assert!(!server.flushes_each_batch().await.unwrap());
    assert_eq!(upload(&server, "b-1", 3).await["accepted"], 3);
    assert_eq!(upload(&server, "b-2", 5).await["accepted"], 5);
    let again = upload(&server, "b-1", 3).await;
    assert_eq!(again["duplicate"], true, "{again}");

    let stats = server.stats().await.unwrap();
    assert_eq!((stats.batches, stats.readings, stats.duplicates), (2, 8, 1));
    assert!(server.stored_readings().await.unwrap().is_empty());
    let batches = server.stored_batches().await.unwrap();
    let counts: Vec<_> = batches.iter().map(|b| b.reading_count).collect();
    assert_eq!(counts, [3, 5]);
    server.stop().await;
}

#[tokio::test]
async fn readings_are_stored_by_default_flushed_at_each_batch_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), true, true).await;
    assert!(server.flushes_each_batch().await.unwrap());
    upload(&server, "b-1", 4).await;
    let stats = server.stats().await.unwrap();
    assert_eq!((stats.batches, stats.readings), (1, 4));
    let stored = server.stored_readings().await.unwrap();
    let ids: Vec<_> = stored.iter().map(|r| r.id).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    server.stop().await;

    // Written without waiting for the disk: still there for a server that starts again
    // on the same file (only a crash of the machine could lose it).
    let server = start(dir.path(), false, true).await;
    assert!(!server.flushes_each_batch().await.unwrap());
    upload(&server, "b-2", 2).await;
    let stats = server.stats().await.unwrap();
    assert_eq!((stats.batches, stats.readings), (2, 6));
    server.stop().await;
}
