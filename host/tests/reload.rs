//! Hot reload: plugins and sync.toml replaced under a steady stream of readings,
//! without a restart, without losing or repeating a reading, and bad versions refused
//! while the old ones keep serving.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Site, eventually, plugin, readings};

const LIMIT: Duration = Duration::from_secs(60);

/// Replaces `path` the way a careful deploy does: write beside it, then rename.
fn deploy(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

async fn readings_at(site: &Site, name: &str) -> u64 {
    site.endpoint(name).stats().await.unwrap().readings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_and_config_replaced_under_load_lose_and_repeat_nothing() {
    let mut site = Site::new("interval = \"100ms\"\nbatch_size = 20").await;
    let encoder = site.use_plugin_copy("json_batch", "encoder.wasm");
    let queue = site.queue().await;
    let daemon = site.start();
    site.wait_for_api().await;

    // A steady stream: 10 readings every 40 ms until told to stop.
    let sent = Arc::new(AtomicUsize::new(0));
    let streaming = Arc::new(AtomicBool::new(true));
    let producer = tokio::spawn({
        let (queue, sent, streaming) = (queue.clone(), sent.clone(), streaming.clone());
        async move {
            while streaming.load(Ordering::Relaxed) {
                queue.enqueue(&readings(10)).await.unwrap();
                sent.fetch_add(10, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
    });
    eventually(LIMIT, "deliveries under the first encoder", || async {
        readings_at(&site, "meterit").await >= 100
    })
    .await;
    let first = site.status().await;
    assert_eq!(first["encoder"]["version"], "0.1.0");

    // 1. A new encoder version: in service from the next batch, every batch after it
    //    in the new format.
    deploy(&encoder, &std::fs::read(plugin("json_batch_v2")).unwrap());
    eventually(LIMIT, "encoder 0.2.0 in service", || async {
        site.status().await["encoder"]["version"] == "0.2.0"
    })
    .await;
    let status = site.status().await;
    assert_ne!(status["encoder"]["sha256"], first["encoder"]["sha256"]);
    assert!(status["reload_error"].is_null(), "{status}");
    eventually(LIMIT, "a batch in the new format", || async {
        let batches = site.endpoint("meterit").stored_batches().await.unwrap();
        batches
            .iter()
            .filter(|b| b.content_type.contains("schema=2"))
            .count()
            >= 3
    })
    .await;
    let batches = site.endpoint("meterit").stored_batches().await.unwrap();
    let switch = batches
        .iter()
        .position(|b| b.content_type.contains("schema=2"))
        .unwrap();
    assert!(
        switch > 0,
        "batches before the reload were in the old format"
    );
    assert!(
        batches[switch..]
            .iter()
            .all(|b| b.content_type.contains("schema=2")),
        "an old-format batch after the switch: {:?}",
        batches.iter().map(|b| &b.content_type).collect::<Vec<_>>()
    );

    // 2. A broken file: refused, 0.2.0 keeps serving.
    deploy(&encoder, b"this is not a component");
    eventually(LIMIT, "the broken encoder refused", || async {
        site.status().await["reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("encoder"))
    })
    .await;
    let before = readings_at(&site, "meterit").await;
    eventually(LIMIT, "deliveries after the refusal", || async {
        readings_at(&site, "meterit").await >= before + 100
    })
    .await;
    assert_eq!(site.status().await["encoder"]["version"], "0.2.0");
    let config = &site_status(&site).await["config"];
    assert!(config["reload_failures"].as_u64() >= Some(1), "{config}");

    // 3. A Client System added by editing sync.toml, then removed again.
    let original = std::fs::read_to_string(site.config_path()).unwrap();
    let table = site.add_endpoint("second", "interval = \"100ms\"").await;
    std::fs::write(site.config_path(), format!("{original}\n{table}")).unwrap();
    eventually(LIMIT, "the second Client System receiving", || async {
        readings_at(&site, "second").await >= 50
    })
    .await;
    std::fs::write(site.config_path(), &original).unwrap();
    eventually(LIMIT, "the second Client System removed", || async {
        site.status_of("second").await.is_null()
    })
    .await;
    let second_final = readings_at(&site, "second").await;

    // 4. A setting changed in the file: batches of the new size from then on.
    let smaller = original.replace("batch_size = 20", "batch_size = 7");
    assert_ne!(smaller, original);
    std::fs::write(site.config_path(), &smaller).unwrap();
    eventually(LIMIT, "batches of 7", || async {
        site.status().await["settings"]["batch_size"] == 7
    })
    .await;
    let before = site
        .endpoint("meterit")
        .stored_batches()
        .await
        .unwrap()
        .len();
    eventually(LIMIT, "batches made under the new size", || async {
        site.endpoint("meterit")
            .stored_batches()
            .await
            .unwrap()
            .len()
            >= before + 5
    })
    .await;
    let batches = site.endpoint("meterit").stored_batches().await.unwrap();
    // The batch in flight at the change may still be of the old size.
    assert!(
        batches[before + 1..].iter().all(|b| b.reading_count <= 7),
        "{:?}",
        batches.iter().map(|b| b.reading_count).collect::<Vec<_>>()
    );
    let original = smaller;

    // 5. A syntax error: refused with the file and line, nothing changes.
    std::fs::write(
        site.config_path(),
        format!("{original}\n[[client_system]\n"),
    )
    .unwrap();
    eventually(LIMIT, "the broken sync.toml refused", || async {
        site_status(&site).await["config"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("sync.toml") && e.contains("line"))
    })
    .await;
    let before = readings_at(&site, "meterit").await;
    eventually(
        LIMIT,
        "deliveries with the broken file in place",
        || async { readings_at(&site, "meterit").await >= before + 100 },
    )
    .await;

    // Everything sent reached meterit exactly once; the second one got what was
    // queued while it was configured, each reading once, and nothing after.
    streaming.store(false, Ordering::Relaxed);
    producer.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    eventually(LIMIT, "meterit to receive everything", || async {
        readings_at(&site, "meterit").await == total as u64
    })
    .await;
    common::assert_each_once(site.endpoint("meterit"), total).await;
    common::assert_each_once(site.endpoint("second"), second_final as usize).await;
    eventually(LIMIT, "the queue to empty", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    assert!(queue.dead_letters().await.unwrap().is_empty());
    assert_eq!(queue.client_systems().await.unwrap(), ["meterit"]);
    let config = &site_status(&site).await["config"];
    assert!(config["reloads"].as_u64() >= Some(4), "{config}");
    daemon.stop().await;
}

/// The whole `GET /v1/status` answer.
async fn site_status(site: &Site) -> serde_json::Value {
    let http = syncd::daemon::http_client().unwrap();
    http.get(format!("{}/v1/status", site.api()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_plugin_comes_from_the_cache_after_a_restart() {
    let site = Site::new("").await;
    let daemon = site.start();
    site.wait_for_api().await;
    let first = site.status().await;
    daemon.stop().await;
    assert_eq!(first["encoder"]["origin"], "compiled");
    let cached: Vec<_> = std::fs::read_dir(site.dir.path().join("data/plugin-cache"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 2, "one entry per component");

    let daemon = site.start();
    site.wait_for_api().await;
    let second = site.status().await;
    daemon.stop().await;
    assert_eq!(second["encoder"]["origin"], "cache");
    assert_eq!(second["transport"]["origin"], "cache");
    assert_eq!(second["encoder"]["sha256"], first["encoder"]["sha256"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_system_removed_while_stopped_is_forgotten_at_start() {
    use client_system::Fault;

    let site = Site::build(
        common::Backend::Sqlite,
        "removed_while_stopped",
        "",
        &[("meterit", ""), ("second", "")],
    )
    .await;
    let queue = site.queue().await;
    site.endpoint("second").inject_faults([Fault {
        status: 400,
        ..Fault::default()
    }]);
    queue.enqueue(&readings(5)).await.unwrap();
    let daemon = site.start();
    eventually(
        LIMIT,
        "second's dead letter, meterit's delivery",
        || async {
            !queue.dead_letters().await.unwrap().is_empty()
                && readings_at(&site, "meterit").await == 5
        },
    )
    .await;
    daemon.stop().await;

    // "second" leaves the file while the daemon is stopped.
    let text = std::fs::read_to_string(site.config_path()).unwrap();
    let kept = &text[..text.find("[[client_system]]\nname = \"second\"").unwrap()];
    std::fs::write(site.config_path(), kept).unwrap();
    let mut site = site;
    site.config = syncd::config::Config::load(&site.config_path()).unwrap();
    let daemon = site.start();
    site.wait_for_api().await;
    assert_eq!(queue.client_systems().await.unwrap(), ["meterit"]);
    // Its dead letter stays, and is not put back in a queue no one sends.
    assert_eq!(queue.requeue_dead_letters(None).await.unwrap(), 0);
    assert_eq!(queue.dead_letters().await.unwrap().len(), 1);
    daemon.stop().await;
}
