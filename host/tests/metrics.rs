//! `GET /metrics`, read with a Prometheus text-format parser after real deliveries.

mod common;

use std::time::Duration;

use client_system::Fault;
use common::{API_KEY, Site, eventually};

/// The value of `name` with exactly these labels.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels.len() == s.labels.iter().count()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} is a {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_was_delivered() {
    let site =
        Site::new("batch_size = 10\nbackoff = { initial = \"50ms\", max = \"100ms\" }").await;
    site.client().inject_faults([Fault {
        status: 503,
        ..Fault::default()
    }]);
    let daemon = site.start();
    site.wait_for_api().await;
    let http = syncd::daemon::http_client().unwrap();
    site.post_readings(0, 25).await;
    site.sync_now().await;
    eventually(Duration::from_secs(60), "25 readings delivered", || async {
        site.client().stats().await.unwrap().readings == 25
    })
    .await;

    let scrape = || async {
        let response = http
            .get(format!("{}/metrics", site.api()))
            .send()
            .await
            .unwrap();
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        response.text().await.unwrap()
    };
    // The acknowledgement of the last batch may still be on its way.
    eventually(Duration::from_secs(30), "3 batches counted", || async {
        scrape()
            .await
            .contains("syncd_batches_delivered_total{client_system=\"meterit\"} 3")
    })
    .await;
    let text = scrape().await;
    assert!(!text.contains(API_KEY), "the API key is in the metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let cs = [("client_system", "meterit")];
    let outcome = |o| [("client_system", "meterit"), ("outcome", o)];
    assert_eq!(value(&scrape, "syncd_readings_ingested_total", &[]), 25.0);
    assert_eq!(value(&scrape, "syncd_readings_delivered_total", &cs), 25.0);
    assert_eq!(value(&scrape, "syncd_batches_delivered_total", &cs), 3.0);
    assert_eq!(
        value(&scrape, "syncd_attempts_total", &outcome("accepted")),
        3.0
    );
    assert_eq!(
        value(&scrape, "syncd_attempts_total", &outcome("retry")),
        1.0
    );
    assert_eq!(
        value(&scrape, "syncd_attempts_total", &outcome("rejected")),
        0.0
    );
    assert_eq!(
        value(&scrape, "syncd_readings_dead_lettered_total", &cs),
        0.0
    );
    assert_eq!(value(&scrape, "syncd_queue_depth", &cs), 0.0);
    assert_eq!(
        value(
            &scrape,
            "syncd_connectivity_state",
            &[("client_system", "meterit"), ("state", "online")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "syncd_outages_total", &cs), 0.0);
    assert_eq!(value(&scrape, "syncd_config_reloads_total", &[]), 0.0);
    // Histograms: one observation per attempt, one encode per attempt.
    let histogram_count = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets)
                    if s.metric == name
                        && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) =>
                {
                    buckets.last().map(|b| b.count)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}"))
    };
    assert_eq!(histogram_count("syncd_attempt_seconds", &cs), 4.0);
    assert_eq!(
        histogram_count(
            "syncd_plugin_call_seconds",
            &[("client_system", "meterit"), ("plugin", "encoder")]
        ),
        4.0
    );
    let info = scrape
        .samples
        .iter()
        .find(|s| s.metric == "syncd_plugin_info" && s.labels.get("plugin") == Some("encoder"))
        .unwrap();
    assert_eq!(info.labels.get("name"), Some("json-batch"));
    daemon.stop().await;
}
