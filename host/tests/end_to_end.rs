//! Readings travel from the queue through the real encoder and transport components
//! to the reference Client System on loopback.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use client_system::Fault;
use common::{Site, eventually, readings};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_arrives_exactly_once_and_leaves_the_queue() {
    let site = Site::new("batch_size = 400").await;
    let queue = site.queue().await;
    let sent = readings(2_345);
    assert_eq!(queue.enqueue(&sent).await.unwrap(), 2_345);

    let daemon = site.start();
    eventually(LIMIT, "the queue to drain", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    daemon.stop().await;

    let stored = site.client().stored_readings().await.unwrap();
    let mut times_seen: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &stored {
        *times_seen.entry(r.id).or_default() += 1;
        assert_eq!(r.site_id, "site-test");
    }
    assert_eq!(stored.len(), 2_345, "stored readings");
    assert!(
        times_seen.values().all(|&n| n == 1),
        "a reading was stored twice"
    );
    // Content survived the trip: the 1000th reading, by queue order.
    let r = &stored[999];
    assert_eq!(r.meter_id, sent[999].meter_id);
    assert_eq!(r.timestamp, sent[999].timestamp_ms);
    assert_eq!(r.value, sent[999].value);

    // One sync_log row per attempt: ceil(2345 / 400) = 6 batches, all accepted.
    let log = queue.sync_log_since(0).await.unwrap();
    assert_eq!(log.len(), 6);
    assert!(
        log.iter()
            .all(|row| row.outcome == "accepted" && row.client_system == "meterit")
    );
    assert_eq!(log.iter().map(|r| r.reading_count).sum::<i32>(), 2_345);
    let stats = site.client().stats().await.unwrap();
    assert_eq!((stats.batches, stats.duplicates), (6, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_keeps_its_id_and_is_stored_once() {
    let site = Site::new(r#"backoff = { initial = "50ms", max = "200ms" }"#).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(30)).await.unwrap();
    site.client().inject_faults([
        Fault {
            status: 503,
            ..Fault::default()
        },
        Fault {
            status: 429,
            retry_after: Some(1),
            ..Fault::default()
        },
    ]);

    let daemon = site.start();
    eventually(LIMIT, "the queue to drain", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    daemon.stop().await;

    let log = queue.sync_log_since(0).await.unwrap();
    let outcomes: Vec<&str> = log.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["retry", "retry", "accepted"]);
    assert!(
        log.iter().all(|r| r.batch_id == log[0].batch_id),
        "the batch id changed"
    );
    assert_eq!(log.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(
        log[0].error.as_deref().unwrap().contains("HTTP 503"),
        "{:?}",
        log[0].error
    );
    // Retry-After: 1 was honoured over the 50-200 ms backoff.
    let gap = log[2].started_at_ms - log[1].started_at_ms;
    assert!(
        gap >= 1_000,
        "retried after {gap} ms despite Retry-After: 1"
    );
    assert_eq!(site.client().stored_readings().await.unwrap().len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_goes_to_dead_letters_with_its_readings_kept() {
    let site = Site::new("").await;
    let queue = site.queue().await;
    queue.enqueue(&readings(12)).await.unwrap();
    site.client().inject_faults([Fault {
        status: 400,
        ..Fault::default()
    }]);

    let daemon = site.start();
    eventually(LIMIT, "a dead letter", || async {
        !queue.dead_letters().await.unwrap().is_empty()
    })
    .await;
    daemon.stop().await;

    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reading_count, 12);
    assert!(dead[0].reason.contains("HTTP 400"), "{}", dead[0].reason);
    assert_eq!(
        queue.reading_count().await.unwrap(),
        12,
        "dead-lettered readings are kept"
    );
    assert_eq!(site.client().stats().await.unwrap().readings, 0);
    let log = queue.sync_log_since(0).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].outcome, "rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_leads_to_one_reauthentication_and_delivery() {
    let site = Site::new("").await;
    let queue = site.queue().await;
    queue.enqueue(&readings(5)).await.unwrap();
    site.client().inject_faults([Fault {
        status: 401,
        ..Fault::default()
    }]);

    let daemon = site.start();
    eventually(LIMIT, "the queue to drain", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    daemon.stop().await;

    let log = queue.sync_log_since(0).await.unwrap();
    assert_eq!(log.len(), 1, "re-authentication happens within the attempt");
    assert_eq!(log[0].outcome, "accepted");
    assert_eq!(site.client().stored_readings().await.unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_queued_by_another_process_are_picked_up() {
    // `syncd enqueue` writes to the same SQLite file while the daemon runs.
    let site = Site::new("interval = \"100ms\"").await;
    let queue = site.queue().await;
    let daemon = site.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writer = site.queue().await;
    writer.enqueue(&readings(50)).await.unwrap();
    eventually(LIMIT, "delivery of late readings", || async {
        site.client().stats().await.unwrap().readings == 50
    })
    .await;
    daemon.stop().await;
    assert_eq!(queue.reading_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_the_queue_depth_and_last_success() {
    let site = Site::new("heartbeat = \"100ms\"").await;
    let queue = site.queue().await;
    queue.enqueue(&readings(3)).await.unwrap();
    // The first upload is told to come back in an hour: the 3 readings stay queued.
    site.client().inject_faults([Fault {
        status: 503,
        retry_after: Some(3600),
        ..Fault::default()
    }]);
    let daemon = site.start();
    eventually(
        LIMIT,
        "a heartbeat reporting 3 queued, no success yet",
        || async {
            site.client()
                .heartbeats()
                .iter()
                .any(|h| h["queued"] == 3 && h["last_success_ms"].is_null())
        },
    )
    .await;

    // Asked to sync now, the worker stops waiting for the hour and delivers.
    let sync = format!("{}/v1/sync", site.api());
    let answer = syncd::daemon::http_client()
        .unwrap()
        .post(sync)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    eventually(LIMIT, "a heartbeat after the delivery", || async {
        site.client()
            .heartbeats()
            .iter()
            .any(|h| h["queued"] == 0 && h["last_success_ms"].is_i64())
    })
    .await;
    daemon.stop().await;

    let beats = site.client().heartbeats();
    assert!(beats.iter().all(|h| h["site_id"] == "site-test"));
    assert!(
        beats
            .iter()
            .all(|h| h["daemon_version"] == env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(site.client().stats().await.unwrap().readings, 3);
}

/// The `json_batch` component (WIT 0.2.0, the batch in columns) writes every field of
/// every reading: attributes on some readings and none on others, text that JSON must
/// escape, non-ASCII text, empty strings (a later attribute with an empty key and
/// value, or a key escaped in full, once made the component trap).
#[tokio::test]
async fn json_batch_carries_every_field_of_every_reading() {
    use syncd::plugin::bindings::types::{BatchInfo, Reading};
    use syncd::plugin::{PluginContext, PluginEngine};

    let reading = |id: u64, meter: &str, attributes: &[(&str, &str)]| Reading {
        id,
        meter_id: meter.into(),
        channel: if id.is_multiple_of(2) {
            String::new()
        } else {
            "import-kwh".into()
        },
        timestamp_ms: 1_790_000_000_000 + id as i64,
        value: id as f64 * -0.125,
        unit: "m³".into(),
        quality: if id == 3 {
            String::new()
        } else {
            "good".into()
        },
        attributes: attributes
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    };
    let readings = [
        reading(
            1,
            "élec-\"1\"",
            &[("phase", "L1"), ("note", "a\\b\nc\u{1}")],
        ),
        reading(2, "water-2", &[]),
        reading(3, "", &[("k", "")]),
        reading(4, "gas-4", &[("a", "b"), ("", "")]),
        reading(5, "gas-5", &[("a", "b"), ("\u{1}", "")]),
    ];
    let info = BatchInfo {
        batch_id: "b-1".into(),
        site_id: "site-7".into(),
        client_system: "cs".into(),
        attempt: 1,
    };
    let context = PluginContext::new(
        "site-7",
        "cs",
        "http://127.0.0.1:9/",
        BTreeMap::new(),
        None,
        Duration::from_secs(1),
        syncd::daemon::http_client().unwrap(),
    )
    .unwrap();
    let mut encoder = PluginEngine::new()
        .unwrap()
        .load_encoder(&common::plugin("json_batch"), std::sync::Arc::new(context))
        .await
        .unwrap();
    assert_eq!(encoder.info().wit_version, "0.2.0");
    let encoded = encoder
        .encode_records(&info, &readings)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(encoded.reading_count, 5);

    let document: serde_json::Value = serde_json::from_slice(&encoded.body).unwrap();
    assert_eq!(document["batch_id"], "b-1");
    assert_eq!(document["site_id"], "site-7");
    let sent = document["readings"].as_array().unwrap();
    assert_eq!(sent.len(), readings.len());
    for (got, want) in sent.iter().zip(&readings) {
        assert_eq!(got["id"], want.id);
        assert_eq!(got["meter_id"], want.meter_id.as_str());
        assert_eq!(got["channel"], want.channel.as_str());
        assert_eq!(got["timestamp"], want.timestamp_ms);
        assert_eq!(got["value"].as_f64(), Some(want.value));
        assert_eq!(got["unit"], want.unit.as_str());
        assert_eq!(got["quality"], want.quality.as_str());
        let attributes: Vec<(String, String)> = got["attributes"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let mut expected = want.attributes.clone();
        expected.sort();
        assert_eq!(attributes, expected, "attributes of reading {}", want.id);
    }
}

/// A batch the Client System accepts while the daemon is being stopped is acknowledged
/// before the daemon stops: not left to be sent again after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_accepted_during_a_stop_is_acknowledged_before_it() {
    let site = Site::new("batch_size = 10").await;
    let queue = site.queue().await;
    queue.enqueue(&readings(20)).await.unwrap();
    // The first batch stored at once, answered a second later.
    site.client().inject_faults([Fault {
        store: true,
        delay_ms: Some(1000),
        ..Fault::default()
    }]);

    let daemon = site.start();
    eventually(LIMIT, "the first batch stored", || async {
        site.client().stored_batches().await.unwrap().len() == 1
    })
    .await;
    daemon.stop().await;

    let log = queue.sync_log_since(0).await.unwrap();
    let outcomes: Vec<&str> = log.iter().map(|row| row.outcome.as_str()).collect();
    assert_eq!(outcomes, ["accepted"], "the attempt logged");
    assert_eq!(
        queue.reading_count().await.unwrap(),
        10,
        "the first batch's readings pruned, the second's kept"
    );
    assert!(
        queue.pending_batch("meterit").await.unwrap().is_none(),
        "the accepted batch still recorded: it would be sent again"
    );
}
