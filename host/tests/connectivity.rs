//! Offline operation and resumption: the reference Client System goes away for longer
//! than a batch's retries would last, readings keep arriving, and it comes back.

mod common;

use std::time::Duration;

use common::{Site, eventually};
use syncd::clock::{Clock, now_ms};
use syncd::connectivity::Event;
use syncd::daemon::Runtime;

const LIMIT: Duration = Duration::from_secs(60);
/// The site's `connectivity_check`.
const PROBE_EVERY: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_loses_nothing_spends_no_retries_and_ends_within_one_probe() {
    // Two retries of 2 s and 4 s: an outage of a minute is ten times as long.
    let mut site = Site::new(&format!(
        "batch_size = 50\nmax_retries = 2\nconnectivity_check = \"{}s\"",
        PROBE_EVERY.as_secs()
    ))
    .await;
    let queue = site.queue().await;
    let clock = Clock::manual(now_ms());
    let runtime = Runtime {
        clock: clock.clone(),
        ..Runtime::default()
    };
    let mut events = runtime.events.subscribe();
    let daemon = site.start_in(runtime);
    site.wait_for_api().await;

    // Online.
    site.post_readings(0, 100).await;
    site.sync_now().await;
    eventually(LIMIT, "the first 100 delivered", || async {
        site.client().stats().await.unwrap().readings == 100
    })
    .await;
    assert_eq!(site.status().await["connectivity"]["state"], "online");

    // The Client System goes away for a minute while readings keep arriving.
    site.endpoints[0].stop().await;
    let went_offline_by = clock.now_ms();
    for round in 0..12 {
        site.post_readings(100 + round * 25, 25).await;
        site.sync_now().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        clock.advance(Duration::from_secs(5));
    }
    eventually(LIMIT, "status to say offline", || async {
        site.status().await["connectivity"]["state"] == "offline"
    })
    .await;
    assert!(queue.dead_letters().await.unwrap().is_empty());
    let status = site.status().await;
    assert_eq!(status["connectivity"]["outages"], 1);
    assert!(
        status["connectivity"]["consecutive_failures"].as_u64() >= Some(3),
        "{status}"
    );

    // Back. Nothing is sent before a probe finds it; one probe interval is enough.
    site.endpoints[0].start().await;
    let back_at = clock.now_ms();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(site.client().stats().await.unwrap().readings, 100);
    clock.advance(PROBE_EVERY);
    eventually(LIMIT, "the backlog delivered", || async {
        site.client().stats().await.unwrap().readings == 400
    })
    .await;
    assert!(
        clock.now_ms() - back_at <= PROBE_EVERY.as_millis() as i64,
        "the clock moved on"
    );

    // Every reading exactly once, none dead-lettered, no retry spent on the outage.
    // 400: stored before and after the outage.
    common::assert_each_once(site.client(), 400).await;
    assert!(queue.dead_letters().await.unwrap().is_empty());
    eventually(LIMIT, "the queue to empty", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    let log = queue.sync_log_since(0).await.unwrap();
    assert!(
        log.iter().all(|row| row.attempt == 1),
        "an outage used up a retry: {:?}",
        log.iter()
            .map(|r| (&r.outcome, r.attempt))
            .collect::<Vec<_>>()
    );
    let unreachable = log.iter().filter(|r| r.outcome == "unreachable").count();
    assert!(
        (1..=3).contains(&unreachable),
        "{unreachable} attempts while out of reach: batches must wait offline"
    );

    // Status reports the outage.
    let c = &site.status().await["connectivity"];
    assert_eq!(c["state"], "online");
    assert_eq!(c["outages"], 1);
    assert_eq!(c["consecutive_failures"], 0);
    let downtime = c["downtime_ms"].as_i64().unwrap();
    let longest = clock.now_ms() - went_offline_by;
    assert!(
        (50_000..=longest).contains(&downtime),
        "downtime {downtime} ms of at most {longest}"
    );
    assert!(c["last_failure"].as_str().unwrap().contains("connection"));

    // One event per change, in order.
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::Connected {
                    after_outage_ms: None,
                    ..
                },
                Event::Disconnected { .. },
                Event::Connected {
                    after_outage_ms: Some(_),
                    ..
                },
            ]
        ),
        "{seen:?}"
    );
    daemon.stop().await;
}
