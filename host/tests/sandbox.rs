//! The sandbox: a plugin that never returns, traps, or exhausts its memory is cut off,
//! the daemon keeps running, and the batch is kept for a retry.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Site, eventually, plugin, readings};
use syncd::plugin::bindings::types;
use syncd::plugin::{CallError, EncoderPlugin, PluginContext, PluginEngine};

/// A context whose plugins reach nothing (port 9 on loopback).
fn context(settings: BTreeMap<String, String>) -> Arc<PluginContext> {
    let context = PluginContext::new(
        "site",
        "cs",
        "http://127.0.0.1:9/",
        settings,
        None,
        Duration::from_secs(1),
        syncd::daemon::http_client().unwrap(),
    )
    .unwrap();
    Arc::new(context)
}

async fn hostile(engine: &PluginEngine, behaviour: &str) -> EncoderPlugin {
    let settings = BTreeMap::from([("behaviour".to_owned(), behaviour.to_owned())]);
    engine
        .load_encoder(&plugin("hostile_encoder"), context(settings))
        .await
        .expect("describe behaves; only encode misbehaves")
}

fn batch() -> (types::BatchInfo, Vec<types::Reading>) {
    let info = types::BatchInfo {
        batch_id: "b-1".into(),
        site_id: "site".into(),
        client_system: "cs".into(),
        attempt: 1,
    };
    let reading = types::Reading {
        id: 1,
        meter_id: "m".into(),
        channel: String::new(),
        timestamp_ms: 1_790_000_000_000,
        value: 1.0,
        unit: String::new(),
        quality: String::new(),
        attributes: Vec::new(),
    };
    (info, vec![reading])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_cut_off_at_the_deadline_again_and_again() {
    let engine = PluginEngine::new().unwrap();
    let mut encoder = hostile(&engine, "spin").await;
    encoder.set_deadline(Duration::from_millis(200));
    let (info, readings) = batch();
    for _ in 0..2 {
        // The second call runs on a fresh instance: the first was dropped.
        match encoder.encode(&info, &readings).await {
            Err(CallError::Deadline(d)) => assert_eq!(d, Duration::from_millis(200)),
            other => panic!("expected the deadline to cut the call off, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_and_a_memory_bomb_are_traps_not_crashes() {
    let engine = PluginEngine::new().unwrap();
    let (info, readings) = batch();
    for behaviour in ["trap", "grow"] {
        let mut encoder = hostile(&engine, behaviour).await;
        match encoder.encode(&info, &readings).await {
            Err(CallError::Trap(_)) => {}
            other => panic!("{behaviour}: expected a trap, got {other:?}"),
        }
    }
    // The host is unharmed: a well-behaved plugin still loads and encodes on the same engine.
    let mut good = engine
        .load_encoder(&plugin("json_batch"), context(BTreeMap::new()))
        .await
        .unwrap();
    let encoded = good.encode(&info, &readings).await.unwrap().unwrap();
    assert_eq!(encoded.reading_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_encoder_keeps_the_batch_for_a_retry() {
    let site = Site::new("[client_system.plugin]\nbehaviour = \"trap\"\n").await;
    // Swap the encoder for the hostile one.
    let mut config = site.config.clone();
    config.client_systems[0].encoder = plugin("hostile_encoder");
    let site = Site { config, ..site };
    let queue = site.queue().await;
    queue.enqueue(&readings(8)).await.unwrap();

    let daemon = site.start();
    eventually(
        Duration::from_secs(30),
        "a failed attempt in sync_log",
        || async { !queue.sync_log_since(0).await.unwrap().is_empty() },
    )
    .await;
    daemon.stop().await;

    let log = queue.sync_log_since(0).await.unwrap();
    assert_eq!(log[0].outcome, "retry");
    let error = log[0].error.as_deref().unwrap();
    assert!(
        error.contains("encoder failed: the plugin trapped"),
        "{error}"
    );
    assert_eq!(
        queue.reading_count().await.unwrap(),
        8,
        "the readings are kept"
    );
    assert!(queue.dead_letters().await.unwrap().is_empty());
    assert!(
        queue.pending_batch("meterit").await.unwrap().is_some(),
        "the batch is kept"
    );
}
