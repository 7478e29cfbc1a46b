//! The sync engine against a reference Client System told to fail in each way, on a
//! clock the test moves by hand where the schedule matters, and with remote
//! configuration.

mod common;

use std::time::Duration;

use client_system::Fault;
use common::{Site, eventually, readings};
use serde_json::json;
use syncd::clock::{Clock, now_ms};
use syncd::queue::entities::sync_log;

const LIMIT: Duration = Duration::from_secs(60);

/// Sends 10 readings through a Client System that answers the first upload with
/// `fault`; returns the sync log once they are delivered.
async fn deliver_through(client_extra: &str, fault: Fault) -> Vec<sync_log::Model> {
    let site = Site::new(client_extra).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(10)).await.unwrap();
    site.client().inject_faults([fault]);

    let daemon = site.start();
    eventually(LIMIT, "the queue to drain", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    daemon.stop().await;

    common::assert_each_once(site.client(), 10).await;
    assert!(queue.dead_letters().await.unwrap().is_empty());
    let log = queue.sync_log_since(0).await.unwrap();
    assert!(
        log.iter().all(|row| row.batch_id == log[0].batch_id),
        "the batch id changed between attempts"
    );
    log
}

fn outcomes(log: &[sync_log::Model]) -> Vec<&str> {
    log.iter().map(|row| row.outcome.as_str()).collect()
}

const FAST_BACKOFF: &str = r#"backoff = { initial = "50ms", max = "200ms" }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_is_retried_and_spends_a_retry() {
    let fault = Fault {
        status: 500,
        ..Fault::default()
    };
    let log = deliver_through(FAST_BACKOFF, fault).await;
    assert_eq!(outcomes(&log), ["retry", "accepted"]);
    assert_eq!((log[0].attempt, log[1].attempt), (1, 2));
    let error = log[0].error.as_deref().unwrap();
    assert!(error.contains("HTTP 500"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_response_is_cut_off_at_the_request_timeout() {
    let fault = Fault {
        status: 200,
        delay_ms: Some(30_000),
        ..Fault::default()
    };
    let extra = format!("request_timeout = \"500ms\"\n{FAST_BACKOFF}");
    let log = deliver_through(&extra, fault).await;
    // No answer at all: the Client System is out of reach, not the batch at fault,
    // so the retry is not counted against the batch.
    assert_eq!(outcomes(&log), ["unreachable", "accepted"]);
    assert_eq!((log[0].attempt, log[1].attempt), (1, 1));
    let error = log[0].error.as_deref().unwrap();
    assert!(error.contains("timed out"), "{error}");
    assert!(
        (450..5_000).contains(&log[0].duration_ms),
        "the hanging attempt took {} ms with a 500 ms request timeout",
        log[0].duration_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_an_outage_not_a_spent_retry() {
    let fault = Fault {
        hang_up: true,
        ..Fault::default()
    };
    let log = deliver_through(FAST_BACKOFF, fault).await;
    assert_eq!(outcomes(&log), ["unreachable", "accepted"]);
    let error = log[0].error.as_deref().unwrap();
    assert!(error.contains("connection closed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_answer_is_an_outage_and_the_resent_batch_is_stored_once() {
    // The Client System stores the batch, then the answer breaks off halfway.
    let fault = Fault {
        truncate: true,
        ..Fault::default()
    };
    let log = deliver_through(FAST_BACKOFF, fault).await;
    assert_eq!(outcomes(&log), ["unreachable", "accepted"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_unavailable_with_retry_after_waits_as_asked() {
    let fault = Fault {
        status: 503,
        retry_after: Some(1),
        ..Fault::default()
    };
    let log = deliver_through(FAST_BACKOFF, fault).await;
    assert_eq!(outcomes(&log), ["retry", "accepted"]);
    let gap = log[1].started_at_ms - log[0].started_at_ms;
    assert!(
        gap >= 1_000,
        "retried after {gap} ms despite Retry-After: 1"
    );
}

/// Waits until the sync log has `n` rows; returns them.
async fn attempts(queue: &syncd::queue::Queue, n: usize) -> Vec<sync_log::Model> {
    eventually(LIMIT, &format!("attempt {n}"), || async {
        queue.sync_log_since(0).await.unwrap().len() >= n
    })
    .await;
    queue.sync_log_since(0).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backoff_schedule_is_followed_to_the_millisecond_then_dead_letters() {
    // Default backoff (2s, doubling, at most 32s, 5 retries) without jitter.
    let site = Site::new("backoff = { jitter = 0.0 }").await;
    let queue = site.queue().await;
    queue.enqueue(&readings(5)).await.unwrap();
    let fault = Fault {
        status: 503,
        ..Fault::default()
    };
    site.client().inject_faults(std::iter::repeat_n(fault, 6));

    let clock = Clock::manual(now_ms());
    let start = clock.now_ms();
    let daemon = site.start_with_clock(clock.clone());
    let mut log = attempts(&queue, 1).await;
    assert_eq!(log[0].started_at_ms, start, "the first attempt is at once");

    for (retry, delay_ms) in [2_000, 4_000, 8_000, 16_000, 32_000]
        .into_iter()
        .enumerate()
    {
        let previous = log.last().unwrap().started_at_ms;
        // Just short of the delay: the batch must wait (an early attempt would show
        // as a start time before `previous + delay_ms` below).
        clock.advance(Duration::from_millis(delay_ms - 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        clock.advance(Duration::from_millis(1));
        log = attempts(&queue, retry + 2).await;
        let row = log.last().unwrap();
        assert_eq!(
            row.started_at_ms - previous,
            delay_ms as i64,
            "retry {} came {} ms after the attempt before it",
            retry + 1,
            row.started_at_ms - previous
        );
        assert_eq!(row.attempt, retry as i32 + 2);
    }
    assert_eq!(log.len(), 6, "one attempt and five retries");
    eventually(LIMIT, "a dead letter", || async {
        !queue.dead_letters().await.unwrap().is_empty()
    })
    .await;
    let dead = queue.dead_letters().await.unwrap();
    assert!(
        dead[0].reason.contains("out of retries after 6 attempts"),
        "{}",
        dead[0].reason
    );
    assert!(outcomes(&log).iter().all(|&o| o == "retry"));
    daemon.stop().await;
    assert_eq!(site.client().stats().await.unwrap().readings, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_follow_the_clock() {
    let site = Site::new("heartbeat = \"1m\"").await;
    let clock = Clock::manual(now_ms());
    let daemon = site.start_with_clock(clock.clone());
    eventually(LIMIT, "the first heartbeat", || async {
        site.client().heartbeats().len() == 1
    })
    .await;
    clock.advance(Duration::from_secs(59));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        site.client().heartbeats().len(),
        1,
        "a heartbeat came early"
    );
    clock.advance(Duration::from_secs(1));
    eventually(LIMIT, "the second heartbeat", || async {
        site.client().heartbeats().len() == 2
    })
    .await;
    clock.advance(Duration::from_secs(120));
    eventually(LIMIT, "the third heartbeat", || async {
        site.client().heartbeats().len() == 3
    })
    .await;
    assert!(site.status().await["last_heartbeat_ms"].as_i64() >= Some(clock.now_ms() - 60_000));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_configuration_is_applied_kept_and_used_when_starting_offline() {
    let mut site = Site::new("batch_size = 100\nconfig_refresh = \"1s\"").await;
    let queue = site.queue().await;
    site.client()
        .set_remote_config("7", json!({ "batch_size": 4, "max_retries": 9 }));
    queue.enqueue(&readings(10)).await.unwrap();

    // Online: downloaded before the first batch, applied, shown in status.
    let daemon = site.start();
    eventually(LIMIT, "the queue to drain", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    let counts: Vec<i32> = queue
        .sync_log_since(0)
        .await
        .unwrap()
        .iter()
        .map(|row| row.reading_count)
        .collect();
    assert_eq!(counts, [4, 4, 2], "batches of the remote batch_size");
    let status = site.status().await;
    assert_eq!(status["remote_config"]["version"], "7");
    assert_eq!(status["remote_config"]["source"], "downloaded");
    assert_eq!(
        status["remote_config"]["keys"],
        json!(["batch_size", "max_retries"])
    );
    assert_eq!(status["settings"]["batch_size"], 4);
    assert_eq!(status["settings"]["max_retries"], 9);
    assert_eq!(
        status["settings"]["interval"], "5m",
        "the file's, unchanged"
    );
    assert_eq!(status["authentication"], "ok");

    // A bad version is refused and the good one stays in force.
    site.client()
        .set_remote_config("8", json!({ "batch_size": 0 }));
    eventually(LIMIT, "version 8 refused", || async {
        site.status().await["remote_config_error"]
            .as_str()
            .is_some_and(|e| e.contains("\"8\"") && e.contains("batch_size"))
    })
    .await;
    let status = site.status().await;
    assert_eq!(status["remote_config"]["version"], "7");
    assert_eq!(status["settings"]["batch_size"], 4);
    daemon.stop().await;

    // Offline start: the kept version applies to the batches made meanwhile.
    site.endpoints[0].stop().await;
    queue.enqueue(&readings(10)).await.unwrap();
    let daemon = site.start();
    site.wait_for_api().await;
    eventually(LIMIT, "an attempt while offline", || async {
        queue.sync_log_since(0).await.unwrap().len() > 3
    })
    .await;
    let status = site.status().await;
    assert_eq!(status["remote_config"]["version"], "7");
    assert_eq!(status["remote_config"]["source"], "cached");
    let error = status["remote_config_error"].as_str().unwrap_or_default();
    assert!(error.contains("download failed"), "{status}");
    let offline = &queue.sync_log_since(0).await.unwrap()[3];
    assert_eq!(offline.outcome, "unreachable");
    assert_eq!(offline.reading_count, 4, "the kept batch_size applies");

    // Back online with no configuration for the site: the file's settings return.
    site.endpoints[0].start().await;
    eventually(LIMIT, "the remote configuration dropped", || async {
        site.status().await["remote_config"].is_null()
    })
    .await;
    assert_eq!(site.status().await["settings"]["batch_size"], 100);
    daemon.stop().await;
    assert!(queue.remote_config("meterit").await.unwrap().is_none());
}

/// A batch the Client System never answers, while it answers everything else (a proxy
/// that drops large bodies, a parser that dies on it): not an outage for ever, but a
/// few unanswered attempts, then retries spent, then dead letters, and the batches
/// after it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_answered_while_the_client_system_answers_ends_in_dead_letters() {
    let site = Site::new(&format!("batch_size = 10\nmax_retries = 2\n{FAST_BACKOFF}")).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(10)).await.unwrap();
    let hang_up = Fault {
        hang_up: true,
        ..Fault::default()
    };
    site.client().inject_faults(vec![hang_up; 6]);

    let daemon = site.start();
    eventually(LIMIT, "the batch in dead letters", || async {
        !queue.dead_letters().await.unwrap().is_empty()
    })
    .await;
    queue.enqueue(&readings(5)).await.unwrap();
    site.sync_now().await;
    eventually(LIMIT, "the later readings delivered", || async {
        site.client().stats().await.unwrap().readings == 5
    })
    .await;
    let connectivity = site.status().await["connectivity"]["state"].clone();
    daemon.stop().await;
    assert_eq!(connectivity, "online");

    let log = queue.sync_log_since(0).await.unwrap();
    let first = &log[0].batch_id;
    let of_first: Vec<&str> = log
        .iter()
        .filter(|row| &row.batch_id == first)
        .map(|row| row.outcome.as_str())
        .collect();
    // Two unanswered attempts are an outage; from the third, each spends a retry.
    assert_eq!(
        of_first,
        ["unreachable", "unreachable", "retry", "retry", "retry"]
    );
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("no answer to this batch"),
        "{}",
        dead[0].reason
    );
}
