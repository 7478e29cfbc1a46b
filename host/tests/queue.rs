//! The durable queue, on SQLite and on a real PostgreSQL server: all-or-nothing ingest,
//! fan-out to several Client Systems, dead letters, and a crash between sending a
//! batch and recording its acknowledgement.

mod common;

use std::process::Command;
use std::time::Duration;

use client_system::Fault;
use common::{Backend, Site, eventually, readings, times_stored};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

async fn post(url: &str, body: Vec<u8>) -> (u16, Value) {
    let response = syncd::daemon::http_client()
        .unwrap()
        .post(url)
        .body(body)
        .send()
        .await
        .expect("the API answers");
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(Value::Null);
    (status, json)
}

fn json_array(n: usize, bad_at: Option<usize>) -> Vec<u8> {
    let records: Vec<String> = (1..=n)
        .map(|i| {
            if Some(i) == bad_at {
                format!(r#"{{"meter_id":"m{i}","timestamp":1790000000000,"value":"high"}}"#)
            } else {
                format!(
                    r#"{{"meter_id":"m{i}","timestamp":{},"value":{i}.5}}"#,
                    1_790_000_000_000i64 + i as i64
                )
            }
        })
        .collect();
    format!("[{}]", records.join(",")).into_bytes()
}

async fn ingest_is_all_or_nothing(backend: Backend, test: &str) {
    let site = Site::build(
        backend,
        test,
        "max_queue_readings = 2500",
        &[("meterit", "interval = \"1h\"")],
    )
    .await;
    let queue = site.queue().await;
    let daemon = site.start();
    let url = format!("{}/v1/readings", site.api());
    site.wait_for_api().await;

    let (status, body) = post(&url, json_array(5, Some(3))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["record"], 3, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nothing was queued"),
        "{body}"
    );

    let lines = b"{\"meter_id\":\"a\",\"timestamp\":1790000000000,\"value\":1}\n{\"timestamp\":1790000000000,\"value\":1}\n".to_vec();
    let (status, body) = post(&url, lines).await;
    assert_eq!((status, body["record"].as_u64()), (400, Some(2)), "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("meter_id"),
        "{body}"
    );
    assert_eq!(
        queue.reading_count().await.unwrap(),
        0,
        "a refused request stored something"
    );

    let (status, body) = post(&url, json_array(2000, None)).await;
    assert_eq!(
        (status, body["queued"].as_u64()),
        (200, Some(2000)),
        "{body}"
    );

    // 2000 + 1000 > max_queue_readings = 2500: refused whole.
    let (status, body) = post(&url, json_array(1000, None)).await;
    assert_eq!(status, 507, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("max_queue_readings"),
        "{body}"
    );

    let huge = vec![b' '; syncd::api::MAX_INGEST_BYTES + 1];
    let (status, _) = post(&url, huge).await;
    assert_eq!(status, 413);

    assert_eq!(queue.reading_count().await.unwrap(), 2000);
    daemon.stop().await;
}
on_both_backends!(ingest_is_all_or_nothing);

async fn fan_out_survives_one_client_system_down(backend: Backend, test: &str) {
    let policy = "interval = \"200ms\"\nbatch_size = 500\nconnectivity_check = \"200ms\"\nbackoff = { initial = \"50ms\", max = \"200ms\" }";
    let mut site = Site::build(backend, test, "", &[("alpha", policy), ("beta", policy)]).await;
    site.endpoints[1].stop().await;
    let queue = site.queue().await;
    queue.enqueue(&readings(1500)).await.unwrap();

    let daemon = site.start();
    eventually(LIMIT, "alpha to receive everything", || async {
        site.endpoints[0].server().stats().await.unwrap().readings == 1500
    })
    .await;
    // Beta stays down for many more failed checks than max_retries (5).
    site.wait_for_api().await;
    eventually(LIMIT, "beta's failures to exceed max_retries", || async {
        let beta = site.status_of("beta").await;
        beta["connectivity"]["state"] == "offline"
            && beta["connectivity"]["consecutive_failures"].as_u64() > Some(10)
    })
    .await;
    queue.enqueue(&readings(300)).await.unwrap();
    eventually(LIMIT, "alpha to receive the late readings", || async {
        site.endpoints[0].server().stats().await.unwrap().readings == 1800
    })
    .await;
    assert_eq!(
        queue.reading_count().await.unwrap(),
        1800,
        "beta's readings are kept"
    );
    assert!(
        queue.dead_letters().await.unwrap().is_empty(),
        "an outage dead-lettered a batch"
    );

    site.endpoints[1].start().await;
    eventually(
        LIMIT,
        "beta to receive everything after it is back",
        || async { site.endpoints[1].server().stats().await.unwrap().readings == 1800 },
    )
    .await;
    eventually(LIMIT, "the queue to empty", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    daemon.stop().await;

    for endpoint in &site.endpoints {
        let stored = endpoint.server().stored_readings().await.unwrap();
        let seen = times_stored(&stored);
        assert_eq!(seen.len(), 1800, "{}", endpoint.name);
        assert!(
            seen.values().all(|&n| n == 1),
            "{} stored a reading twice",
            endpoint.name
        );
    }
    assert!(queue.dead_letters().await.unwrap().is_empty());
}
on_both_backends!(fan_out_survives_one_client_system_down);

async fn dead_letters_are_listed_requeued_and_purged(backend: Backend, test: &str) {
    let site = Site::build(
        backend,
        test,
        "",
        &[("meterit", "batch_size = 10\ninterval = \"100ms\"")],
    )
    .await;
    let queue = site.queue().await;
    queue.enqueue(&readings(20)).await.unwrap();
    site.client().inject_faults([
        Fault {
            status: 400,
            ..Fault::default()
        },
        Fault {
            status: 422,
            ..Fault::default()
        },
    ]);
    let daemon = site.start();
    eventually(LIMIT, "two dead letters", || async {
        queue.dead_letters().await.unwrap().len() == 2
    })
    .await;
    let dead = queue.dead_letters().await.unwrap();
    assert!(dead[0].reason.contains("HTTP 400") && dead[1].reason.contains("HTTP 422"));
    assert_eq!(
        queue.reading_count().await.unwrap(),
        20,
        "dead letters keep their readings"
    );

    // Requeue the first: delivered under its own batch id.
    assert_eq!(
        queue.requeue_dead_letters(Some(&dead[0].id)).await.unwrap(),
        1
    );
    eventually(LIMIT, "the requeued batch to arrive", || async {
        site.client().stats().await.unwrap().readings == 10
    })
    .await;
    let stored = site.client().stored_readings().await.unwrap();
    assert!(
        stored.iter().all(|r| r.batch_id == dead[0].id),
        "the batch id changed"
    );
    // The Client System stores before it answers: wait for syncd to record the answer.
    eventually(LIMIT, "the acknowledgement", || async {
        queue.pending_batch("meterit").await.unwrap().is_none()
    })
    .await;
    // Delivering the first pruned its readings, and none of the other's.
    assert_eq!(
        queue.reading_count().await.unwrap(),
        10,
        "the other dead letter keeps its readings"
    );

    // Purge the other: its readings go, since no Client System needs them any more.
    assert_eq!(queue.purge_dead_letters(None).await.unwrap(), 1);
    assert!(queue.dead_letters().await.unwrap().is_empty());
    assert_eq!(queue.reading_count().await.unwrap(), 0);

    let stats = queue.stats_since(0).await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (
            stats[0].rejected,
            stats[0].batches_delivered,
            stats[0].readings_delivered
        ),
        (2, 1, 10)
    );
    daemon.stop().await;
}
on_both_backends!(dead_letters_are_listed_requeued_and_purged);

async fn a_crash_between_sending_and_acknowledging_resends_the_same_batch(
    backend: Backend,
    test: &str,
) {
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(50)).await.unwrap();
    // The Client System stores the batch, then holds its answer: syncd is killed
    // before it can record the acknowledgement.
    site.client().inject_faults([Fault {
        store: true,
        delay_ms: Some(30_000),
        ..Fault::default()
    }]);
    let config = site.dir.path().join("sync.toml");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_syncd"))
            .args(["--config", config.to_str().unwrap(), "run"])
            .spawn()
            .expect("syncd starts")
    };
    let mut first = run();
    eventually(LIMIT, "the batch to be stored", || async {
        site.client().stats().await.unwrap().batches == 1
    })
    .await;
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    assert_eq!(
        queue.reading_count().await.unwrap(),
        50,
        "nothing was acknowledged yet"
    );
    let pending = queue
        .pending_batch("meterit")
        .await
        .unwrap()
        .expect("the batch is recorded");

    let mut second = run();
    eventually(LIMIT, "the queue to empty after the restart", || async {
        queue.reading_count().await.unwrap() == 0
    })
    .await;
    assert!(
        Command::new("kill")
            .args(["-TERM", &second.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(second.wait().unwrap().success());

    let stats = site.client().stats().await.unwrap();
    assert_eq!(
        (stats.batches, stats.duplicates),
        (1, 1),
        "re-sent once, dropped as a duplicate"
    );
    let stored = site.client().stored_readings().await.unwrap();
    assert_eq!(stored.len(), 50);
    assert!(
        stored.iter().all(|r| r.batch_id == pending.id),
        "re-sent under another id"
    );
    assert!(times_stored(&stored).values().all(|&n| n == 1));
}
on_both_backends!(a_crash_between_sending_and_acknowledging_resends_the_same_batch);

async fn concurrent_ingest_while_draining_loses_nothing(backend: Backend, test: &str) {
    // A smoke test of many clients ingesting through the API while the worker drains.
    // (It rarely hits the out-of-order commit race by chance; the next test forces it.)
    const CLIENTS: usize = 4;
    const REQUESTS: usize = 25;
    const PER_REQUEST: usize = 40;
    let site = Site::build(
        backend,
        test,
        "",
        &[("meterit", "interval = \"20ms\"\nbatch_size = 100")],
    )
    .await;
    let queue = site.queue().await;
    let daemon = site.start();
    let url = format!("{}/v1/readings", site.api());
    let http = syncd::daemon::http_client().unwrap();
    site.wait_for_api().await;
    let mut lanes = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url) = (http.clone(), url.clone());
        lanes.push(tokio::spawn(async move {
            for _ in 0..REQUESTS {
                let response = http
                    .post(&url)
                    .body(json_array(PER_REQUEST, None))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200);
            }
        }));
    }
    for lane in lanes {
        lane.await.unwrap();
    }
    let total = CLIENTS * REQUESTS * PER_REQUEST;
    eventually(
        Duration::from_secs(30),
        "every reading to arrive",
        || async { site.client().stats().await.unwrap().readings == total as u64 },
    )
    .await;
    daemon.stop().await;
    let seen = times_stored(&site.client().stored_readings().await.unwrap());
    assert_eq!(seen.len(), total);
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(queue.reading_count().await.unwrap(), 0);
}
on_both_backends!(concurrent_ingest_while_draining_loses_nothing);

async fn a_reading_committed_late_with_a_lower_id_is_not_skipped(backend: Backend, test: &str) {
    let site = Site::build(
        backend,
        test,
        "",
        &[("meterit", "interval = \"20ms\"\nbatch_size = 100")],
    )
    .await;
    let queue = site.queue().await;
    let daemon = site.start();

    // The slow ingest takes the lower id and holds its transaction open...
    let mut slow = queue.ingest().await.unwrap();
    slow.add(&readings(1)).await.unwrap();
    // ...while a second ingest (another connection) tries to commit higher ids, and the
    // worker keeps syncing every 20 ms.
    let other = site.queue().await;
    let fast = tokio::spawn(async move { other.enqueue(&readings(5)).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    slow.commit().await.unwrap();
    assert_eq!(fast.await.unwrap(), 5);

    eventually(
        Duration::from_secs(20),
        "all 6 readings, the late one included",
        || async { site.client().stats().await.unwrap().readings == 6 },
    )
    .await;
    daemon.stop().await;
    assert_eq!(
        times_stored(&site.client().stored_readings().await.unwrap()).len(),
        6
    );
}
on_both_backends!(a_reading_committed_late_with_a_lower_id_is_not_skipped);

async fn concurrent_first_opens_all_succeed(backend: Backend, test: &str) {
    // The daemon and `syncd enqueue` started together on a new database both connect to
    // it and migrate it. On SQLite, several new files, as the race is one of timing.
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let rounds = if backend == Backend::Sqlite { 5 } else { 1 };
    for round in 0..rounds {
        let mut config = site.config.clone();
        if backend == Backend::Sqlite {
            config.database.url = format!("sqlite://race-{round}.db");
        }
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move { syncd::queue::Queue::open_for(&config).await.map(drop) })
            })
            .collect();
        for open in opens {
            open.await.unwrap().expect("every concurrent open succeeds");
        }
    }
}
on_both_backends!(concurrent_first_opens_all_succeed);

async fn a_client_system_added_later_starts_after_what_was_queued(backend: Backend, test: &str) {
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(5)).await.unwrap();
    // On a queue already in use, a new Client System starts after what is queued...
    queue
        .register_client_systems(&["meterit".to_owned(), "later".to_owned()])
        .await
        .unwrap();
    assert_eq!(queue.queued_for("meterit").await.unwrap(), 5);
    assert_eq!(queue.queued_for("later").await.unwrap(), 0);
    queue.enqueue(&readings(2)).await.unwrap();
    assert_eq!(queue.queued_for("later").await.unwrap(), 2);
    assert!(
        queue
            .new_batch("later", 100)
            .await
            .unwrap()
            .unwrap()
            .1
            .len()
            == 2
    );
}
on_both_backends!(a_client_system_added_later_starts_after_what_was_queued);

async fn readings_read_ahead_are_recorded_only_while_still_the_next(backend: Backend, test: &str) {
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(10)).await.unwrap();
    let (first, rows) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    assert_eq!(rows.len(), 4);

    // Read ahead while the first batch is out: the next four.
    let ahead = queue
        .readings_after(first.last_reading_id, 4)
        .await
        .unwrap();
    let ids: Vec<i64> = ahead.iter().map(|r| r.id).collect();
    let expected: Vec<i64> = (1..=4).map(|k| first.last_reading_id + k).collect();
    assert_eq!(ids, expected);
    let second = queue
        .record_read_ahead("meterit", first.last_reading_id, &ahead, None)
        .await
        .unwrap()
        .expect("still the next readings: recorded");
    assert_eq!(
        (second.first_reading_id, second.last_reading_id),
        (expected[0], expected[3])
    );

    // Once batched past, the same read-ahead is refused and nothing is recorded twice.
    assert!(
        queue
            .record_read_ahead("meterit", first.last_reading_id, &ahead, None)
            .await
            .unwrap()
            .is_none()
    );
    let (third, rest) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    assert_eq!(third.first_reading_id, second.last_reading_id + 1);
    assert_eq!(rest.len(), 2);
}
on_both_backends!(readings_read_ahead_are_recorded_only_while_still_the_next);

/// While the batch just delivered waits for its acknowledgement, the next one is
/// recorded from the readings read ahead only when no other batch is to be claimed
/// first: a batch waiting for its retry goes before new ones.
async fn a_read_ahead_waits_behind_a_batch_to_claim(backend: Backend, test: &str) {
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(12)).await.unwrap();
    let (waiting, _) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    let (delivered, _) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    let retry_at = syncd::clock::now_ms() + 60_000;
    queue
        .schedule_retry(&waiting, common::attempt(&waiting, "retry"), 1, retry_at)
        .await
        .unwrap();
    let ahead = queue
        .readings_after(delivered.last_reading_id, 4)
        .await
        .unwrap();
    assert_eq!(ahead.len(), 4);
    // The next batch recorded while `delivered` waits for its acknowledgement.
    let record_next = async || {
        queue
            .record_read_ahead(
                "meterit",
                delivered.last_reading_id,
                &ahead,
                Some(&delivered.id),
            )
            .await
            .unwrap()
    };

    let refused = record_next().await;
    assert!(
        refused.is_none(),
        "recorded past a batch waiting for its retry: {refused:?}"
    );
    let claimed = queue.claim_batch("meterit").await.unwrap().unwrap();
    assert_eq!(claimed.id, waiting.id, "the batch a claim takes first");

    // Once the waiting batch is gone, only the delivered one is left: not in the way.
    queue
        .dead_letter(&waiting, common::attempt(&waiting, "rejected"), "refused")
        .await
        .unwrap();
    let next = record_next()
        .await
        .expect("nothing else to claim: recorded");
    assert_eq!(
        (next.first_reading_id, next.last_reading_id),
        (ahead[0].id, ahead[3].id)
    );
}
on_both_backends!(a_read_ahead_waits_behind_a_batch_to_claim);

/// An acknowledgement forgets its batch, logs the attempt as it was, and deletes the
/// readings no batch still covers, saying how many: none while an earlier batch is out.
async fn an_acknowledgement_forgets_logs_and_prunes(backend: Backend, test: &str) {
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(10)).await.unwrap();
    let (first, _) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    let (second, _) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    let attempt = |batch: &syncd::queue::Batch, error: Option<&str>| syncd::queue::Attempt {
        client_system: "meterit".into(),
        batch_id: batch.id.clone(),
        attempt: 2,
        started_at_ms: 1_795_305_600_123,
        duration_ms: 17,
        reading_count: batch.reading_count,
        outcome: "accepted",
        error: error.map(str::to_owned),
    };

    let pruned = queue
        .acknowledge(&second, attempt(&second, None))
        .await
        .unwrap();
    assert_eq!(
        pruned, 0,
        "the first batch still covers the oldest readings"
    );
    let pruned = queue
        .acknowledge(&first, attempt(&first, Some("slow, but \"accepted\"")))
        .await
        .unwrap();
    assert_eq!(pruned, 8, "both batches' readings go once neither is out");
    assert_eq!(queue.reading_count().await.unwrap(), 2);
    assert!(queue.pending_batch("meterit").await.unwrap().is_none());

    let log = queue.sync_log_since(0).await.unwrap();
    let logged: Vec<_> = log
        .iter()
        .map(|r| {
            (
                r.client_system.as_str(),
                r.batch_id.as_deref(),
                r.attempt,
                r.started_at_ms,
                r.duration_ms,
                r.reading_count,
                r.outcome.as_str(),
                r.error.as_deref(),
            )
        })
        .collect();
    let at = 1_795_305_600_123;
    assert_eq!(
        logged,
        [
            (
                "meterit",
                Some(second.id.as_str()),
                2,
                at,
                17,
                4,
                "accepted",
                None
            ),
            (
                "meterit",
                Some(first.id.as_str()),
                2,
                at,
                17,
                4,
                "accepted",
                Some("slow, but \"accepted\"")
            ),
        ]
    );
}
on_both_backends!(an_acknowledgement_forgets_logs_and_prunes);

/// Values a meter may send and values it should not but could: every one comes back
/// from the queue with the same bits (SQLite hands most over as whole millionths, the
/// rest as REALs), and so do strings that JSON must escape and attributes.
async fn readings_come_back_from_the_queue_exactly(backend: Backend, test: &str) {
    let values = [
        0.0,
        1.5,
        -2.25,
        0.1,
        0.1 + 0.2,
        1e-7,
        123.456_789_1,
        -0.000_001,
        8_999_999_999.999_999,
        9.0e9 + 0.5,
        -9.0e9,
        1e15 + 0.25,
        4_503_599_627_370_497.0,
        1e300,
        -1e-300,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        f64::EPSILON,
        1234.5678,
    ];
    let written: Vec<syncd::reading::NewReading> = values
        .iter()
        .enumerate()
        .map(|(i, &value)| syncd::reading::NewReading {
            meter_id: format!("m\"{i}\\\u{1}\u{e9}\u{1F600}"),
            channel: "ch\n\t".into(),
            timestamp_ms: -1_000 + i64::MAX / 32 * i as i64,
            value,
            unit: "m\u{b3}".into(),
            quality: String::new(),
            attributes: if i % 2 == 0 {
                vec![
                    ("k\"ey".into(), format!("v{i}")),
                    ("n".into(), String::new()),
                ]
            } else {
                Vec::new()
            },
        })
        .collect();
    let site = Site::build(backend, test, "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&written).await.unwrap();
    let same = |read: &[syncd::queue::QueuedReading], from: usize| {
        assert!(!read.is_empty());
        for (k, r) in read.iter().enumerate() {
            let w = &written[from + k];
            assert_eq!(
                r.reading.value.to_bits(),
                w.value.to_bits(),
                "value {:e} came back as {:e}",
                w.value,
                r.reading.value
            );
            assert_eq!(
                (
                    &r.reading.meter_id,
                    &r.reading.channel,
                    r.reading.timestamp_ms,
                    &r.reading.unit,
                    &r.reading.quality
                ),
                (&w.meter_id, &w.channel, w.timestamp_ms, &w.unit, &w.quality)
            );
            let mut attributes = r.reading.attributes.clone();
            attributes.sort();
            let mut expected = w.attributes.clone();
            expected.sort();
            assert_eq!(attributes, expected);
        }
    };
    // A new batch (in a transaction), a read-ahead, and a recorded batch read again.
    let (batch, rows) = queue.new_batch("meterit", 7).await.unwrap().unwrap();
    same(&rows, 0);
    let ahead = queue
        .readings_after(batch.last_reading_id, 100)
        .await
        .unwrap();
    assert_eq!(ahead.len(), values.len() - 7);
    same(&ahead, 7);
    same(&queue.batch_readings(&batch).await.unwrap(), 0);
    let ids: Vec<i64> = rows.iter().chain(&ahead).map(|r| r.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in queue order: {ids:?}"
    );
}
on_both_backends!(readings_come_back_from_the_queue_exactly);

/// Runs `sql` on the site's database through a connection of its own, not the queue's.
async fn run_sql(site: &Site, sql: &str) {
    use sea_orm::ConnectionTrait;
    let url = match site.backend {
        Backend::Sqlite => format!("sqlite://{}", site.dir.path().join("syncd.db").display()),
        Backend::Postgres => site.config.database.url.clone(),
    };
    let db = sea_orm::Database::connect(&url).await.unwrap();
    db.execute_unprepared(sql).await.unwrap();
    db.close().await.unwrap();
}

/// Writes `n` attempts logged at `started_at_ms` into the site's `sync_log` with plain
/// SQL.
async fn log_attempts(site: &Site, n: u64, started_at_ms: i64) {
    let sql = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
         INSERT INTO sync_log \
         (client_system, batch_id, attempt, started_at_ms, duration_ms, reading_count, outcome) \
         SELECT 'meterit', 'b-' || i, 1, {started_at_ms}, 5, 10, 'accepted' FROM n"
    );
    run_sql(site, &sql).await;
}

/// On SQLite, recording a batch read ahead and acknowledging one are each a
/// transaction written out in one query (`BEGIN IMMEDIATE` to `COMMIT`). One that fails
/// after its first statement must leave nothing of itself: what it changed undone, and
/// no connection of the queue's pool left inside it, holding the write lock (the next
/// write would wait out the busy timeout and fail, or fail to begin at once).
#[tokio::test]
async fn a_transaction_failing_halfway_leaves_nothing_behind() {
    let site = Site::build(Backend::Sqlite, "failing_halfway", "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(8)).await.unwrap();
    let (first, _) = queue.new_batch("meterit", 4).await.unwrap().unwrap();
    let ahead = queue
        .readings_after(first.last_reading_id, 4)
        .await
        .unwrap();
    let refuse = |table: &str| {
        format!(
            "CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    };

    // The batch cannot be inserted: the progress moved before it must be undone.
    run_sql(&site, &refuse("batches")).await;
    let error = queue
        .record_read_ahead("meterit", first.last_reading_id, &ahead, Some(&first.id))
        .await
        .expect_err("the insert is refused");
    assert!(
        format!("{error:#}").contains("refused by the test"),
        "{error:#}"
    );
    run_sql(&site, "DROP TRIGGER refuse_batches").await;

    // The attempt cannot be logged: the batch forgotten before must be back.
    run_sql(&site, &refuse("sync_log")).await;
    let error = queue
        .acknowledge(&first, common::attempt(&first, "accepted"))
        .await
        .expect_err("the log is refused");
    assert!(
        format!("{error:#}").contains("refused by the test"),
        "{error:#}"
    );
    run_sql(&site, "DROP TRIGGER refuse_sync_log").await;
    assert_eq!(
        queue.pending_batch("meterit").await.unwrap().map(|b| b.id),
        Some(first.id.clone())
    );

    // Both go through now, from where they were, on every connection the pool has.
    let written = async {
        let second = queue
            .record_read_ahead("meterit", first.last_reading_id, &ahead, Some(&first.id))
            .await
            .unwrap()
            .expect("still the next readings: recorded");
        assert_eq!(second.first_reading_id, ahead[0].id);
        let pruned = queue
            .acknowledge(&first, common::attempt(&first, "accepted"))
            .await
            .unwrap();
        assert_eq!(pruned, 4, "the first batch's readings");
        let pruned = queue
            .acknowledge(&second, common::attempt(&second, "accepted"))
            .await
            .unwrap();
        assert_eq!(pruned, 4, "the second batch's readings");
    };
    tokio::time::timeout(Duration::from_secs(5), written)
        .await
        .expect("no connection waits for a lock left held");
    assert_eq!(queue.reading_count().await.unwrap(), 0);
    let logged = queue.sync_log_since(0).await.unwrap();
    assert_eq!(
        logged.len(),
        2,
        "only the attempts acknowledged: {logged:?}"
    );
}

async fn old_delivery_attempts_are_deleted(backend: Backend, test: &str) {
    let site = Site::build(backend, test, "sync_log_keep = \"1h\"", &[("meterit", "")]).await;
    let queue = site.queue().await;
    let now = syncd::clock::now_ms();
    let hour = 3_600_000;
    // Two and a half chunks of old attempts, and a few within the hour.
    let old = syncd::queue::SYNC_LOG_PRUNE_CHUNK * 5 / 2;
    log_attempts(&site, old, now - 2 * hour).await;
    log_attempts(&site, 3, now - hour / 2).await;
    assert_eq!(queue.prune_sync_log(now - hour).await.unwrap(), old);
    let left = queue.sync_log_since(0).await.unwrap();
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|a| a.started_at_ms == now - hour / 2));
    assert_eq!(queue.prune_sync_log(now - hour).await.unwrap(), 0);

    // The daemon deletes them by itself, at start, by `[database] sync_log_keep`.
    log_attempts(&site, 40, now - 2 * hour).await;
    let daemon = site.start();
    eventually(LIMIT, "the old attempts deleted", || async {
        queue.sync_log_since(0).await.unwrap().len() == 3
    })
    .await;
    daemon.stop().await;
    let left = queue.sync_log_since(0).await.unwrap();
    assert!(left.iter().all(|a| a.started_at_ms == now - hour / 2));
}
on_both_backends!(old_delivery_attempts_are_deleted);

#[tokio::test]
async fn a_checkpoint_empties_the_sqlite_write_ahead_log() {
    let site = Site::build(Backend::Sqlite, "checkpoint", "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&readings(100)).await.unwrap();
    let wal = site.dir.path().join("syncd.db-wal");
    assert!(
        wal.metadata().unwrap().len() > 0,
        "the readings are in the log"
    );
    queue.checkpoint().await.unwrap();
    assert_eq!(wal.metadata().unwrap().len(), 0);
    assert_eq!(queue.reading_count().await.unwrap(), 100);
}
