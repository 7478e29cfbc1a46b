//! The sandbox: a plugin that never returns, traps, exhausts its memory or answers
//! nonsense is cut off, the daemon keeps running, the batch is kept for a retry, and
//! repeated failure marks the plugin failed in status; a plugin reaches nothing outside
//! its Client System's base URL and nothing of the host through WASI.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Site, eventually, plugin, readings};
use syncd::plugin::bindings::types;
use syncd::plugin::{CallError, EncoderPlugin, PluginContext, PluginEngine};

/// A context whose plugins reach nothing (port 9 on loopback).
fn context(settings: BTreeMap<String, String>) -> Arc<PluginContext> {
    context_at("http://127.0.0.1:9/", settings)
}

/// A context whose Client System is at `base_url`.
fn context_at(base_url: &str, settings: BTreeMap<String, String>) -> Arc<PluginContext> {
    let context = PluginContext::new(
        "site",
        "cs",
        base_url,
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
        let started = std::time::Instant::now();
        match encoder.encode_records(&info, &readings).await {
            Err(CallError::Deadline(d)) => assert_eq!(d, Duration::from_millis(200)),
            other => panic!("expected the deadline to cut the call off, got {other:?}"),
        }
        // Cut off within an epoch tick or so of the deadline, not whenever.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1200), "cut off after {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_and_a_memory_bomb_are_traps_not_crashes() {
    let engine = PluginEngine::new().unwrap();
    let (info, readings) = batch();
    for behaviour in ["trap", "grow"] {
        let mut encoder = hostile(&engine, behaviour).await;
        match encoder.encode_records(&info, &readings).await {
            Err(CallError::Trap(_)) => {}
            other => panic!("{behaviour}: expected a trap, got {other:?}"),
        }
    }
    // The host is unharmed: a well-behaved plugin still loads and encodes on the same engine.
    let mut good = engine
        .load_encoder(&plugin("json_batch"), context(BTreeMap::new()))
        .await
        .unwrap();
    let encoded = good
        .encode_records(&info, &readings)
        .await
        .unwrap()
        .unwrap();
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
    assert_eq!(log[0].outcome, "plugin_failed");
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

/// Counts the connections made to it: a place no plugin may reach.
struct Canary {
    addr: std::net::SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Canary {
    fn start() -> Canary {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        Canary { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A Client System whose only route, `GET /api/redirect`, redirects to `to`.
async fn redirecting_server(to: String) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/api/redirect",
        axum::routing::get(move || {
            let to = to.clone();
            async move { axum::response::Redirect::temporary(&to) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn hostile_transport(
    base_url: &str,
    settings: &[(&str, &str)],
) -> syncd::plugin::TransportPlugin {
    let settings = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    PluginEngine::new()
        .unwrap()
        .load_transport(&plugin("hostile_transport"), context_at(base_url, settings))
        .await
        .expect("the hostile transport loads")
}

fn encoded() -> types::EncodedBatch {
    types::EncodedBatch {
        content_type: "application/json".into(),
        body: b"[]".to_vec(),
        reading_count: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_reaches_nothing_outside_its_base_url() {
    let canary = Canary::start();
    let outside = format!("http://{}/stolen", canary.addr);
    let server = redirecting_server(outside.clone()).await;
    let base_url = format!("http://{server}/api");
    let targets = [
        outside.clone(),
        format!("http://user@{}/stolen", canary.addr),
        // Starts like the base URL, but is not under it.
        format!("http://{server}/api-admin/stats"),
        format!("http://{server}/admin/stats"),
        "file:///etc/passwd".to_owned(),
        // Inside: answered 307, which the host must not follow.
        "redirect".to_owned(),
    ];
    let mut transport = hostile_transport(
        &base_url,
        &[("behaviour", "escape"), ("targets", &targets.join(" "))],
    )
    .await;
    let (info, _) = batch();
    let outcome = transport.upload(&info, &encoded()).await.unwrap();
    let syncd::plugin::bindings::UploadOutcome::Rejected(report) = outcome else {
        panic!("the fixture reports through rejected, got {outcome:?}");
    };
    let lines: Vec<&str> = report.split("; ").collect();
    assert_eq!(lines.len(), targets.len() + 4, "{report}");
    for line in &lines {
        if line.starts_with("redirect =>") {
            assert_eq!(*line, "redirect => status 307", "{report}");
        } else {
            assert!(line.ends_with("=> not-allowed"), "{line}\nin: {report}");
        }
    }
    assert_eq!(canary.hits(), 0, "a request reached the canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_grants_no_environment_no_arguments_and_no_files() {
    // The test process itself has an environment and a working directory.
    assert!(std::env::vars().count() > 0);
    let mut transport = hostile_transport("http://127.0.0.1:9/", &[("behaviour", "wasi")]).await;
    let (info, _) = batch();
    let outcome = transport.upload(&info, &encoded()).await.unwrap();
    match outcome {
        syncd::plugin::bindings::UploadOutcome::Rejected(report) => {
            assert_eq!(report, "env=0 args=0 cwd=false dirs=0")
        }
        other => panic!("the fixture reports through rejected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_is_a_trap_not_a_crash() {
    let (info, readings) = batch();
    let mut encoder = hostile(&PluginEngine::new().unwrap(), "invalid-utf8").await;
    match encoder.encode_records(&info, &readings).await {
        Err(CallError::Trap(e)) => assert!(format!("{e:#}").contains("utf-8"), "{e:#}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let mut transport =
        hostile_transport("http://127.0.0.1:9/", &[("behaviour", "invalid-utf8")]).await;
    match transport.upload(&info, &encoded()).await {
        Err(CallError::Trap(e)) => assert!(format!("{e:#}").contains("utf-8"), "{e:#}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

/// One daemon, one Client System per misbehaviour: each failing encoder or transport
/// is marked failed in status after repeated failures, its batch is kept (no dead
/// letter, no retry spent), nothing reaches the Client System, and the well-behaved
/// Client System beside them delivers as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_are_marked_failed_and_their_batches_kept() {
    let fast = "interval = \"100ms\"\nbackoff = { initial = \"50ms\", max = \"200ms\" }\nmax_retries = 2\n";
    let cases: [(&str, &str, &str, &str); 6] = [
        (
            "huge",
            "hostile_encoder",
            "huge",
            "over the limit of 67108864",
        ),
        (
            "miscount",
            "hostile_encoder",
            "miscount",
            "encoded 1008 readings of a batch of 8",
        ),
        (
            "header",
            "hostile_encoder",
            "bad-content-type",
            "which an HTTP header cannot carry",
        ),
        ("trap", "hostile_encoder", "trap", "the plugin trapped"),
        ("grow", "hostile_encoder", "grow", "the plugin trapped"),
        (
            "utf8",
            "hostile_transport",
            "invalid-utf8",
            "the plugin trapped",
        ),
    ];
    let mut clients: Vec<(String, String)> = cases
        .iter()
        .map(|(name, _, behaviour, _)| {
            (
                (*name).to_owned(),
                format!("{fast}[client_system.plugin]\nbehaviour = \"{behaviour}\"\n"),
            )
        })
        .collect();
    clients.push(("good".to_owned(), fast.to_owned()));
    let clients: Vec<(&str, &str)> = clients
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let mut site = Site::build(common::Backend::Sqlite, "sandbox", "", &clients).await;
    for (cs, (_, fixture, _, _)) in site.config.client_systems.iter_mut().zip(&cases) {
        match *fixture {
            "hostile_encoder" => cs.encoder = plugin(fixture),
            _ => cs.transport = plugin(fixture),
        }
    }
    let queue = site.queue().await;
    queue.enqueue(&readings(8)).await.unwrap();

    let daemon = site.start();
    site.wait_for_api().await;
    for (name, fixture, _, expected) in &cases {
        let which = if *fixture == "hostile_encoder" {
            "encoder"
        } else {
            "transport"
        };
        eventually(
            Duration::from_secs(60),
            &format!("{name}: its {which} marked failed"),
            || async { site.status_of(name).await[which]["health"] == "failed" },
        )
        .await;
        let status = site.status_of(name).await;
        let failure = status[which]["last_failure"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(failure.contains(expected), "{name}: {failure}");
        assert!(status[which]["failures_in_a_row"].as_u64().unwrap() >= 3);
        assert_eq!(status["last_outcome"], "plugin_failed", "{name}");
        assert_eq!(status["queued"], 8, "{name}: the readings are kept");
        assert_eq!(
            status["retry"]["attempts"], 0,
            "{name}: no retry of the batch is spent on a failing plugin"
        );
        assert_eq!(site.endpoint(name).stats().await.unwrap().readings, 0);
    }
    eventually(Duration::from_secs(30), "the good one delivers", || async {
        site.endpoint("good").stats().await.unwrap().readings == 8
    })
    .await;
    assert!(
        queue.dead_letters().await.unwrap().is_empty(),
        "no dead letters"
    );
    daemon.stop().await;
    let _ = &mut site;
}

/// Once a batch failing on its plugin has a retry scheduled, the status never shows it
/// without one: each attempt's outcome is published with the retry still there, until
/// the next retry replaces it (a status read between the two used to find none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_again_and_again_always_shows_its_retry() {
    let mut site = Site::new(
        "interval = \"100ms\"\nbackoff = { initial = \"10ms\", max = \"20ms\" }\n\
         [client_system.plugin]\nbehaviour = \"trap\"\n",
    )
    .await;
    site.config.client_systems[0].encoder = plugin("hostile_encoder");
    site.queue().await.enqueue(&readings(3)).await.unwrap();
    let daemon = site.start();
    site.wait_for_api().await;
    eventually(
        Duration::from_secs(30),
        "a first retry scheduled",
        || async { site.status().await["retry"].is_object() },
    )
    .await;
    // Read the status as fast as it answers while the plugin fails 50 times more.
    let first = site.status().await["encoder"]["failures_in_a_row"]
        .as_u64()
        .unwrap();
    let started = std::time::Instant::now();
    let (mut reads, mut failures) = (0, first);
    while failures < first + 50 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the plugin did not fail 50 times more"
        );
        let status = site.status().await;
        assert!(
            status["retry"].is_object(),
            "read {reads}: no retry shown after {failures} failures: {status}"
        );
        failures = status["encoder"]["failures_in_a_row"].as_u64().unwrap();
        reads += 1;
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_later_for_ever_waits_at_most_an_hour() {
    let mut site = Site::new("[client_system.plugin]\nbehaviour = \"retry-forever\"\n").await;
    site.config.client_systems[0].transport = plugin("hostile_transport");
    let queue = site.queue().await;
    queue.enqueue(&readings(3)).await.unwrap();
    let daemon = site.start();
    site.wait_for_api().await;
    eventually(Duration::from_secs(30), "a retry scheduled", || async {
        site.status().await["retry"]["next_attempt_ms"].is_i64()
    })
    .await;
    let status = site.status().await;
    let wait_ms = status["retry"]["next_attempt_ms"].as_i64().unwrap()
        - status["last_attempt_ms"].as_i64().unwrap();
    let cap = syncd::plugin::output::MAX_RETRY_LATER.as_millis() as i64;
    assert!(wait_ms <= cap + 1000, "waits {wait_ms} ms");
    assert!(wait_ms >= cap - 60_000, "waits {wait_ms} ms");
    daemon.stop().await;
}

#[tokio::test]
async fn an_encoder_naming_another_wit_version_than_it_implements_is_refused() {
    let engine = PluginEngine::new().unwrap();
    let settings = BTreeMap::from([("behaviour".to_owned(), "claim-0.1.0".to_owned())]);
    let error = match engine
        .load_encoder(&plugin("hostile_encoder"), context(settings))
        .await
    {
        Ok(_) => panic!("a plugin misnaming its WIT version was accepted"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains(
            "says it was built for WIT sync:plugin@0.1.0, but it implements the world of 0.2.0"
        ),
        "{error}"
    );
}
