//! Several syncd processes sharing one PostgreSQL queue: readings ingested through
//! each of them and by plain SQL, one process killed mid-run, every reading delivered
//! once, no batch sent by two processes at the same time.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::stream::{EPOCH_MS, Ingested, assert_exactly_once, stream_readings_from};
use common::{Backend, Site, attempt, eventually, free_addr};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement, TransactionTrait};

/// A `syncd run` process, killed when dropped.
struct Process {
    child: Child,
    api: String,
    config: std::path::PathBuf,
}

impl Process {
    fn spawn(config: &std::path::Path, api: String, log: &std::path::Path) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_syncd"))
            .args(["-c", config.to_str().unwrap(), "run"])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("the daemon starts");
        Self {
            child,
            api,
            config: config.to_owned(),
        }
    }

    /// Waits until its API answers.
    async fn answers(&self) {
        let api = self.api.clone();
        eventually(Duration::from_secs(30), "the process answers", || {
            let api = api.clone();
            async move {
                let http = syncd::daemon::http_client().unwrap();
                http.get(format!("{api}/healthz")).send().await.is_ok()
            }
        })
        .await;
    }

    async fn status(&self) -> serde_json::Value {
        syncd::daemon::http_client()
            .unwrap()
            .get(format!("{}/v1/status", self.api))
            .send()
            .await
            .expect("status answers")
            .json()
            .await
            .expect("status is JSON")
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("the daemon is reaped");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The site's sync.toml for process `i`: its own API port and process name.
fn process_config(site: &Site, i: usize) -> (std::path::PathBuf, String) {
    process_config_with(site, i, "")
}

/// [`process_config`] with `client_extra` added to the (last) Client System's table.
fn process_config_with(site: &Site, i: usize, client_extra: &str) -> (std::path::PathBuf, String) {
    let text = std::fs::read_to_string(site.config_path()).expect("config read") + client_extra;
    let addr = free_addr();
    let text = text
        .replace(&site.config.api.listen.to_string(), &addr.to_string())
        .replace(
            "[database]\n",
            &format!("[database]\nprocess_name = \"p{i}\"\n"),
        );
    let path = site.config_path().with_file_name(format!("sync-{i}.toml"));
    std::fs::write(&path, text).expect("config written");
    (path, format!("http://{addr}"))
}

/// Inserts readings with plain SQL, as a collection service would, in transactions
/// that stay open a while after their INSERT (so that they commit after others that
/// began later), knowing nothing of syncd's locks. Sequence numbers from `first`.
fn sql_writer(
    url: String,
    first: u64,
    seed: u64,
    ingested: Arc<Mutex<Ingested>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let db = Database::connect(&url).await.expect("SQL writer connects");
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut next = first;
        while !*stop.borrow() {
            let seqs: Vec<u64> = (next..next + 10).collect();
            let values: Vec<String> = seqs
                .iter()
                .map(|seq| {
                    format!(
                        "('sql-{}', 'import-kwh', {}, {seq}, 'kWh', 'good')",
                        seq % 7,
                        EPOCH_MS + *seq as i64
                    )
                })
                .collect();
            let txn = db.begin().await.expect("transaction");
            txn.execute_unprepared(&format!(
                "INSERT INTO readings (meter_id, channel, timestamp_ms, value, unit, quality) VALUES {}",
                values.join(",")
            ))
            .await
            .expect("readings inserted");
            tokio::time::sleep(Duration::from_millis(rng.u64(0..60))).await;
            txn.commit().await.expect("committed");
            ingested.lock().unwrap().accepted.extend(&seqs);
            next += 10;
            tokio::time::sleep(Duration::from_millis(rng.u64(0..40))).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_one_killed_every_reading_delivered_once() {
    let site = Site::build(
        Backend::Postgres,
        "scale_out",
        "batch_lease = \"3s\"",
        &[(
            "meterit",
            "interval = \"200ms\"\nbatch_size = 40\nconnectivity_check = \"1s\"\nbackoff = { initial = \"100ms\", max = \"500ms\" }\nmax_retries = 30",
        )],
    )
    .await;
    let url = site.config.database.url.clone();
    let dir = site.config_path().parent().unwrap().to_owned();
    let mut processes: Vec<Process> = (0..3)
        .map(|i| {
            let (config, api) = process_config(&site, i);
            Process::spawn(&config, api, &dir.join(format!("p{i}.log")))
        })
        .collect();
    for p in &processes {
        p.answers().await;
    }
    // Some uploads answered slowly (after storing), so that batches are in flight
    // when the process is killed.
    site.client()
        .inject_faults((0..200).map(|i| client_system::Fault {
            store: true,
            delay_ms: Some(if i % 4 == 0 { 700 } else { 20 }),
            ..Default::default()
        }));

    let ingested = Arc::new(Mutex::new(Ingested::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (stop_killed, killed_stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (i, p) in processes.iter().enumerate() {
        let stop = if i == 1 {
            killed_stopped.clone()
        } else {
            stopped.clone()
        };
        tasks.push(stream_readings_from(
            p.api.clone(),
            i as u64 * 1_000_000,
            Duration::from_millis(20),
            Arc::clone(&ingested),
            stop,
        ));
    }
    for w in 0..2u64 {
        tasks.push(sql_writer(
            url.clone(),
            (3 + w) * 1_000_000,
            w,
            Arc::clone(&ingested),
            stopped.clone(),
        ));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    // Kill process p1 while it has a batch in flight.
    let mut held = None;
    for _ in 0..400 {
        let status = processes[1].status().await;
        if let Some(batch) = status["client_systems"][0]["in_flight"].as_str() {
            held = Some(batch.to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = held.expect("p1 had a batch in flight within 4 s");
    processes[1].kill();
    let _ = stop_killed.send(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _ = stop.send(true);
    for task in tasks {
        task.await.expect("ingest task");
    }
    let (accepted, unknown) = {
        let ingested = ingested.lock().unwrap();
        let mut accepted = ingested.accepted.clone();
        accepted.sort_unstable();
        (accepted, ingested.unknown.clone())
    };
    assert!(
        accepted.len() > 1000,
        "only {} readings ingested",
        accepted.len()
    );
    let from_sql = accepted.iter().filter(|&&s| s >= 3_000_000).count();
    assert!(from_sql > 100, "only {from_sql} readings inserted with SQL");

    let queue = site.queue().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while queue.reading_count().await.unwrap() > 0 {
        if std::time::Instant::now() > deadline {
            let stats = site.client().stats().await.unwrap();
            panic!(
                "the queue did not drain: {} readings left, oldest batch {:?}, client system {stats:?}, {} accepted",
                queue.reading_count().await.unwrap(),
                queue.pending_batch("meterit").await.unwrap(),
                accepted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = assert_exactly_once(site.client(), &accepted, &unknown).await;
    assert!(stored.len() >= accepted.len());
    assert!(queue.dead_letters().await.unwrap().is_empty());
    let stats = site.client().stats().await.unwrap();
    assert_eq!(
        stats.overlapping, 0,
        "a batch was sent by two processes at once"
    );
    // The batch p1 held was delivered by another process, after its lease.
    let batches = site.client().stored_batches().await.unwrap();
    assert!(
        batches.iter().any(|b| b.batch_id == held),
        "the batch p1 held ({held}) was never delivered"
    );

    // The survivors see each other, and p1 as last seen before its death.
    let status = processes[0].status().await;
    let names: Vec<&str> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["p0", "p1", "p2"]);
    let shown = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["-c", processes[0].config.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("processes sharing the queue"), "{shown}");
    for line in ["p0 ", "(this)", "p1 ", "p2 "] {
        assert!(shown.contains(line), "{line:?} not in {shown}");
    }
    let p1 = &status["processes"][1];
    assert!(p1["batches"].as_array().unwrap().is_empty());
    let now = syncd::clock::now_ms();
    assert!(now - p1["last_seen_ms"].as_i64().unwrap() > 3000);
    assert!(now - status["processes"][2]["last_seen_ms"].as_i64().unwrap() < 3000);
    println!(
        "{} readings ({} by SQL), {} batches stored, {} duplicates dropped",
        accepted.len(),
        from_sql,
        stats.batches,
        stats.duplicates
    );
}

/// A transaction that inserted readings (a lower id) and commits after another that
/// inserted later (a higher id): the first is not skipped, because the trigger on
/// `readings` makes the second wait for the first to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_committed_late_with_a_lower_id_is_not_skipped() {
    let site = Site::build(Backend::Postgres, "late_commit", "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    let db = Database::connect(&site.config.database.url).await.unwrap();
    let slow = db.begin().await.unwrap();
    slow.execute_unprepared(
        "INSERT INTO readings (meter_id, channel, timestamp_ms, value, unit, quality) \
         VALUES ('slow', '', 1, 1, '', '')",
    )
    .await
    .unwrap();
    let later = tokio::spawn({
        let queue = queue.clone();
        async move { queue.enqueue(&common::readings(1)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!later.is_finished(), "the later ingest committed first");
    assert!(
        queue.new_batch("meterit", 100).await.unwrap().is_none(),
        "nothing committed yet"
    );
    slow.commit().await.unwrap();
    assert_eq!(later.await.unwrap(), 1);
    let (batch, rows) = queue
        .new_batch("meterit", 100)
        .await
        .unwrap()
        .expect("a batch");
    assert_eq!(rows.len(), 2, "both readings in the batch");
    assert_eq!(rows[0].reading.meter_id, "slow");
    assert_eq!(batch.reading_count, 2);

    // The same from two plain SQL writers: the second waits for the first.
    let first = db.begin().await.unwrap();
    first
        .execute_unprepared(
            "INSERT INTO readings (meter_id, channel, timestamp_ms, value, unit, quality) \
             VALUES ('first', '', 1, 1, '', '')",
        )
        .await
        .unwrap();
    let second = tokio::spawn({
        let url = site.config.database.url.clone();
        async move {
            let db = Database::connect(&url).await.unwrap();
            db.execute_raw(Statement::from_string(
                DbBackend::Postgres,
                "INSERT INTO readings (meter_id, channel, timestamp_ms, value, unit, quality) \
                 VALUES ('second', '', 1, 1, '', '')",
            ))
            .await
            .unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second writer committed first");
    first.commit().await.unwrap();
    second.await.unwrap();
    let (_, rows) = queue.new_batch("meterit", 100).await.unwrap().unwrap();
    let meters: Vec<&str> = rows.iter().map(|r| r.reading.meter_id.as_str()).collect();
    assert_eq!(meters, ["first", "second"]);
}

/// A batch is leased to one process at a time: another queue (process) cannot claim
/// it until the lease runs out, then can; the first can then no longer renew it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_taken_over_only_after_its_lease() {
    let site = Site::build(
        Backend::Postgres,
        "lease",
        "batch_lease = \"1s\"",
        &[("meterit", "")],
    )
    .await;
    let one = site.queue().await;
    let mut config = site.config.clone();
    config.database.process_name = Some("other".into());
    let two = syncd::queue::Queue::open_for(&config).await.unwrap();
    assert_ne!(one.process_name(), two.process_name());
    one.enqueue(&common::readings(5)).await.unwrap();
    let (batch, _) = one.new_batch("meterit", 5).await.unwrap().unwrap();
    assert!(two.claim_batch("meterit").await.unwrap().is_none());
    assert_eq!(
        one.claim_batch("meterit").await.unwrap().map(|b| b.id),
        Some(batch.id.clone())
    );
    assert!(one.renew_lease(&batch).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let taken = two
        .claim_batch("meterit")
        .await
        .unwrap()
        .expect("taken over");
    assert_eq!(taken.id, batch.id);
    assert_eq!(taken.leased_by.as_deref(), Some("other"));
    assert!(
        !one.renew_lease(&batch).await.unwrap(),
        "renewed a lost lease"
    );
    assert!(one.claim_batch("meterit").await.unwrap().is_none());
    // A process that stops gives its batches back at once.
    two.leave().await.unwrap();
    assert_eq!(
        one.claim_batch("meterit")
            .await
            .unwrap()
            .map(|b| b.id.clone()),
        Some(batch.id.clone())
    );

    // A batch waiting for its retry stays with its process until the retry time and a
    // lease after: longer than a lease from now.
    let retry_at = syncd::clock::now_ms() + 2000;
    one.schedule_retry(&batch, attempt(&batch, "retry"), 1, retry_at)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(two.claim_batch("meterit").await.unwrap().is_none());

    // A process that lost the batch and then gives up on it does not dead-letter it
    // when the one that took it over has delivered it.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let taken = two
        .claim_batch("meterit")
        .await
        .unwrap()
        .expect("taken over");
    two.acknowledge(&taken, attempt(&taken, "accepted"))
        .await
        .unwrap();
    one.dead_letter(&batch, attempt(&batch, "rejected"), "refused")
        .await
        .unwrap();
    assert!(one.dead_letters().await.unwrap().is_empty());
    assert_eq!(one.reading_count().await.unwrap(), 0);
}

/// A batch a dead process left behind goes as soon as its lease runs out, even while
/// another process is in the middle of a backlog: before the rest of the backlog's
/// batches, not after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_left_behind_goes_before_the_rest_of_a_backlog() {
    let site = Site::build(
        Backend::Postgres,
        "left_behind",
        "batch_lease = \"1s\"",
        &[("meterit", "batch_size = 100")],
    )
    .await;
    let mut config = site.config.clone();
    config.database.process_name = Some("dead".into());
    let dead = syncd::queue::Queue::open_for(&config).await.unwrap();
    let all = common::readings(3100);
    dead.enqueue(&all[..100]).await.unwrap();
    let (left, _) = dead.new_batch("meterit", 100).await.unwrap().unwrap();
    dead.enqueue(&all[100..]).await.unwrap();
    // Each upload stored at once and answered 100 ms later: the backlog's 30 batches
    // take at least 3 s, the lease of the batch left behind runs out after 1 s.
    site.client()
        .inject_faults((0..40).map(|_| client_system::Fault {
            store: true,
            delay_ms: Some(100),
            ..client_system::Fault::default()
        }));

    let daemon = site.start();
    eventually(Duration::from_secs(60), "every batch stored", || async {
        site.client().stored_batches().await.unwrap().len() == 31
    })
    .await;
    daemon.stop().await;
    let order: Vec<String> = site
        .client()
        .stored_batches()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.batch_id)
        .collect();
    let at = order
        .iter()
        .position(|id| *id == left.id)
        .expect("the batch left behind was stored");
    assert!(
        at < 20,
        "the batch left behind was stored {}th of {}: behind the backlog",
        at + 1,
        order.len()
    );
    common::assert_each_once(site.client(), 3100).await;
}

/// What one process finds, the others learn: p1 checks nothing by itself for an hour,
/// yet goes offline when p0 finds the Client System gone, comes back when p0 finds it
/// back, and applies the remote configuration p0 downloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_connectivity_and_remote_configuration() {
    let mut site = Site::build(
        Backend::Postgres,
        "shared_state",
        "batch_lease = \"3s\"",
        &[("meterit", "interval = \"1h\"\nheartbeat = \"1h\"\n")],
    )
    .await;
    let dir = site.config_path().parent().unwrap().to_owned();
    let extras = [
        "connectivity_check = \"300ms\"\nconfig_refresh = \"500ms\"\n",
        "connectivity_check = \"1h\"\nconfig_refresh = \"1h\"\n",
    ];
    let processes: Vec<Process> = extras
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let (config, api) = process_config_with(&site, i, extra);
            Process::spawn(&config, api, &dir.join(format!("p{i}.log")))
        })
        .collect();
    let state = |p: usize| {
        let api = processes[p].api.clone();
        async move {
            let http = syncd::daemon::http_client().unwrap();
            match http.get(format!("{api}/v1/status")).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.unwrap()["client_systems"][0].clone(),
                Err(_) => serde_json::Value::Null,
            }
        }
    };
    for p in 0..2 {
        eventually(Duration::from_secs(30), "both online", || async move {
            state(p).await["connectivity"]["state"] == "online"
        })
        .await;
    }

    site.endpoints[0].stop().await;
    eventually(
        Duration::from_secs(10),
        "p1 offline, as p0 found",
        || async {
            let cs = state(1).await;
            cs["connectivity"]["state"] == "offline"
                && cs["connectivity"]["last_failure"] == "found offline by process p0"
        },
    )
    .await;
    site.endpoints[0].start().await;
    eventually(Duration::from_secs(10), "p1 online again", || async {
        state(1).await["connectivity"]["state"] == "online"
    })
    .await;

    site.client()
        .set_remote_config("v2", serde_json::json!({ "batch_size": 7 }));
    eventually(
        Duration::from_secs(10),
        "p1 applies what p0 downloaded",
        || async {
            let cs = state(1).await;
            cs["remote_config"]["version"] == "v2" && cs["remote_config"]["source"] == "shared"
        },
    )
    .await;
    assert_eq!(state(1).await["settings"]["batch_size"], 7);
}

/// An upload that takes longer than the lease: the lease is renewed while it lasts, so
/// the other process does not take the batch over and send it at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_longer_than_its_lease_stays_with_its_process() {
    let site = Site::build(
        Backend::Postgres,
        "long_upload",
        "batch_lease = \"1s\"",
        &[("meterit", "interval = \"100ms\"\nbatch_size = 10")],
    )
    .await;
    site.client().inject_faults([client_system::Fault {
        store: true,
        delay_ms: Some(3500),
        ..Default::default()
    }]);
    site.queue()
        .await
        .enqueue(&common::readings(10))
        .await
        .unwrap();
    let dir = site.config_path().parent().unwrap().to_owned();
    let _processes: Vec<Process> = (0..2)
        .map(|i| {
            let (config, api) = process_config(&site, i);
            Process::spawn(&config, api, &dir.join(format!("p{i}.log")))
        })
        .collect();
    eventually(Duration::from_secs(30), "the batch delivered", || async {
        site.client().stats().await.unwrap().batches == 1
    })
    .await;
    let queue = site.queue().await;
    eventually(
        Duration::from_secs(10),
        "the batch acknowledged",
        || async { queue.pending_batch("meterit").await.unwrap().is_none() },
    )
    .await;
    let stats = site.client().stats().await.unwrap();
    assert_eq!(stats.overlapping, 0, "sent by both processes at once");
    assert_eq!(stats.duplicates, 0, "sent again after its lease");
    let attempts = queue.sync_log_since(0).await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].outcome, "accepted");
}

/// An acknowledgement made while another process is pruning waits for it and then
/// prunes what it can: the last acknowledgement of a drain leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_during_another_prune_still_prunes() {
    let site = Site::build(Backend::Postgres, "prune_turns", "", &[("meterit", "")]).await;
    let queue = site.queue().await;
    queue.enqueue(&common::readings(5)).await.unwrap();
    let (batch, _) = queue.new_batch("meterit", 5).await.unwrap().unwrap();
    let db = Database::connect(&site.config.database.url).await.unwrap();
    let other = db.begin().await.unwrap();
    other
        .execute_unprepared(&format!(
            "SELECT pg_advisory_xact_lock({})",
            syncd::queue::PRUNE_LOCK_KEY
        ))
        .await
        .unwrap();
    let acknowledged = tokio::spawn({
        let queue = queue.clone();
        async move {
            let attempt = attempt(&batch, "accepted");
            queue.acknowledge(&batch, attempt).await.unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !acknowledged.is_finished(),
        "did not wait for the other prune"
    );
    other.commit().await.unwrap();
    assert_eq!(acknowledged.await.unwrap(), 5, "readings pruned");
    assert_eq!(queue.reading_count().await.unwrap(), 0);
}

/// A second process under a name a live process uses is refused at start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_in_use_is_refused() {
    let site = Site::build(Backend::Postgres, "name_in_use", "", &[("meterit", "")]).await;
    let dir = site.config_path().parent().unwrap().to_owned();
    let (config, api) = process_config(&site, 0);
    let first = Process::spawn(&config, api, &dir.join("p0.log"));
    first.answers().await;
    // Its own API port and file, the same name.
    let text = std::fs::read_to_string(&first.config).unwrap();
    let port = first.api.rsplit(':').next().unwrap().to_owned();
    let text = text.replace(&format!(":{port}\""), &format!(":{}\"", free_addr().port()));
    let second = dir.join("sync-0-again.toml");
    std::fs::write(&second, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["-c", second.to_str().unwrap(), "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second process under the same name was not refused");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("another syncd process uses the name \"p0\""),
        "{stderr}"
    );
    drop(first);
}

/// A Client System missing from one process's file is kept in the queue while another
/// process that delivers to it is alive: its readings are not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_system_another_process_uses_is_not_forgotten() {
    let site = Site::build(
        Backend::Postgres,
        "forget_guard",
        "",
        &[("meterit", ""), ("second", "")],
    )
    .await;
    let dir = site.config_path().parent().unwrap().to_owned();
    let (config, api) = process_config(&site, 0);
    let both = Process::spawn(&config, api, &dir.join("p0.log"));
    both.answers().await;
    // p1's file has only the first Client System.
    let (config, api) = process_config(&site, 1);
    let text = std::fs::read_to_string(&config).unwrap();
    let second = text.find("[[client_system]]\nname = \"second\"").unwrap();
    std::fs::write(&config, &text[..second]).unwrap();
    let only_first = Process::spawn(&config, api, &dir.join("p1.log"));
    only_first.answers().await;
    // Opened without registering the site's Client Systems again.
    let queue = syncd::queue::Queue::open(
        &site.config.database.url,
        site.config.database.durability,
        &dir,
    )
    .await
    .unwrap();
    assert_eq!(queue.client_systems().await.unwrap(), ["meterit", "second"]);
    drop((both, only_first));
}
