//! The `syncd` binary, as an operator runs it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Site, eventually, plugin, syncd, text};

#[test]
fn help_lists_the_commands() {
    let out = syncd(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for command in ["run", "enqueue", "migrate", "config", "plugin"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from:\n{help}"
        );
    }
}

#[test]
fn plugin_check_says_what_a_component_is() {
    let encoder = plugin("json_batch");
    let out = syncd(&["plugin", "check", encoder.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("world:       sync:plugin/encoder"),
        "{report}"
    );
    assert!(report.contains("name:        json-batch"), "{report}");
    assert!(report.contains("wit version: 0.2.0"), "{report}");
    assert!(!report.contains("@0.1.0"), "{report}");

    // An encoder of the older WIT version is still accepted.
    let older = plugin("json_batch_v2");
    let out = syncd(&["plugin", "check", older.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("world:       sync:plugin/encoder"),
        "{report}"
    );
    assert!(report.contains("wit version: 0.1.0"), "{report}");

    let transport = plugin("meterit_http");
    let out = syncd(&["plugin", "check", transport.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("world:       sync:plugin/transport"),
        "{report}"
    );
    assert!(
        report.contains("imports:     sync:plugin/http@0.1.0, sync:plugin/log@0.1.0"),
        "{report}"
    );
    assert!(
        report.contains("exports:     describe, authenticate, upload"),
        "{report}"
    );

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let out = syncd(&["plugin", "check", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a valid WebAssembly component"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_check_names_the_bad_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sync.toml");
    std::fs::write(
        &path,
        "[site]\nid = \"s\"\n\n[api]\nlisten = \"127.0.0.1:1\"\nlsten = 3\n",
    )
    .unwrap();
    let out = syncd(&["config", "check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("lsten") && err.contains("line 6"), "{err}");

    std::fs::write(&path, "[site]\nid = \"s\"\n").unwrap();
    let out = syncd(&["config", "check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_then_run_delivers_and_stops_cleanly_on_sigterm() {
    let site = Site::new("").await;
    let config = site.dir.path().join("sync.toml");
    let config = config.to_str().unwrap();

    // A bad file queues nothing and names the record.
    let bad = site.dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"meter_id\":\"m\",\"timestamp\":1790000000000,\"value\":1}\n{\"meter_id\":\"m\",\"timestamp\":1790000000000,\"value\":\"x\"}\n",
    )
    .unwrap();
    let out = syncd(&["-c", config, "enqueue", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("record 2"),
        "{}",
        text(&out.stderr)
    );

    let good = site.dir.path().join("good.jsonl");
    let lines: String = (0..1500)
        .map(|i| {
            format!(
                "{{\"meter_id\":\"m{}\",\"timestamp\":{},\"value\":{i}}}\n",
                i % 3,
                1_790_000_000_000i64 + i
            )
        })
        .collect();
    std::fs::write(&good, lines).unwrap();
    let out = syncd(&["-c", config, "enqueue", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("queued 1500 readings"));

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["-c", config, "run"])
        .spawn()
        .expect("daemon starts");
    eventually(
        Duration::from_secs(60),
        "1500 readings at the Client System",
        || async { site.client().stats().await.unwrap().readings == 1500 },
    )
    .await;
    let term = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon exited with {status}");
    let queue = site.queue().await;
    assert_eq!(queue.reading_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_and_stats_commands() {
    use client_system::Fault;

    let site = Site::new("batch_size = 5\ninterval = \"100ms\"").await;
    let queue = site.queue().await;
    queue.enqueue(&common::readings(10)).await.unwrap();
    site.client().inject_faults([
        Fault {
            status: 400,
            ..Fault::default()
        },
        Fault {
            status: 400,
            ..Fault::default()
        },
    ]);
    let daemon = site.start();
    eventually(Duration::from_secs(60), "two dead letters", || async {
        queue.dead_letters().await.unwrap().len() == 2
    })
    .await;
    daemon.stop().await;
    let config = site.dir.path().join("sync.toml");
    let config = config.to_str().unwrap();

    let out = syncd(&["-c", config, "dead-letter", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0]["reason"].as_str().unwrap().contains("HTTP 400"));
    let first = listed[0]["id"].as_str().unwrap();
    let table = text(&syncd(&["-c", config, "dead-letter", "list"]).stdout);
    assert!(
        table.contains(first) && table.contains("HTTP 400"),
        "{table}"
    );

    let out = syncd(&["-c", config, "dead-letter", "requeue", first]);
    assert!(
        text(&out.stdout).contains("requeued 1 dead letter"),
        "{}",
        text(&out.stderr)
    );
    let out = syncd(&["-c", config, "dead-letter", "requeue", "no-such-batch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no dead letter with batch id no-such-batch"));
    let out = syncd(&["-c", config, "dead-letter", "requeue"]);
    assert_eq!(out.status.code(), Some(2), "an id or --all is required");
    let out = syncd(&["-c", config, "dead-letter", "purge", "--all"]);
    assert!(
        text(&out.stdout).contains("purged 1 dead letter"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(queue.dead_letters().await.unwrap().len(), 0);
    assert!(
        queue.pending_batch("meterit").await.unwrap().is_some(),
        "the requeued batch waits"
    );

    let out = syncd(&["-c", config, "stats", "--hours", "1", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["client_systems"][0]["client_system"], "meterit");
    assert_eq!(stats["client_systems"][0]["rejected"], 2);
    let table = text(&syncd(&["-c", config, "stats"]).stdout);
    assert!(table.lines().any(|l| l.starts_with("meterit")), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_reads_csv_all_or_nothing() {
    let site = Site::new("").await;
    let config = site.dir.path().join("sync.toml");
    let config = config.to_str().unwrap();
    let csv = site.dir.path().join("readings.csv");
    std::fs::write(
        &csv,
        "meter_id,channel,timestamp,value,unit,attr.phase\nelec-1,kwh,2026-11-22T10:00:00Z,1.5,kWh,L1\nelec-2,kwh,1795341600000,2,kWh,\n",
    )
    .unwrap();
    let out = syncd(&["-c", config, "enqueue", csv.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("queued 2 readings"));

    std::fs::write(
        &csv,
        "meter_id,timestamp,value\nelec-1,1795341600000,1\nelec-2,1795341600000,\n",
    )
    .unwrap();
    let out = syncd(&["-c", config, "enqueue", csv.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("record 2: value is missing"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        site.queue().await.reading_count().await.unwrap(),
        2,
        "the bad file queued nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_asks_the_running_daemon() {
    let site = Site::new("interval = \"1h\"").await;
    let config = site.dir.path().join("sync.toml");
    let config = config.to_str().unwrap();
    let out = syncd(&["-c", config, "sync"]);
    assert_eq!(out.status.code(), Some(1), "no daemon yet");
    assert!(
        text(&out.stderr).contains("no daemon answers"),
        "{}",
        text(&out.stderr)
    );

    let daemon = site.start();
    let queue = site.queue().await;
    eventually(Duration::from_secs(30), "the daemon's API", || async {
        syncd(&["-c", config, "sync", "--client", "meterit"])
            .status
            .success()
    })
    .await;
    // Readings queued after the start-up sync wait for the hour... unless asked.
    queue.enqueue(&common::readings(4)).await.unwrap();
    let out = syncd(&["-c", config, "sync", "--client", "meterit"]);
    assert!(
        text(&out.stdout).contains("syncing now: meterit"),
        "{}",
        text(&out.stderr)
    );
    eventually(Duration::from_secs(30), "delivery on request", || async {
        site.client().stats().await.unwrap().readings == 4
    })
    .await;
    let out = syncd(&["-c", config, "sync", "--client", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no client system named \"nobody\""),
        "{}",
        text(&out.stderr)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_client_systems_state() {
    use client_system::Fault;

    let site = Site::new("").await;
    let config = site.dir.path().join("sync.toml");
    let config = config.to_str().unwrap();
    site.queue()
        .await
        .enqueue(&common::readings(3))
        .await
        .unwrap();
    site.client().inject_faults([Fault {
        status: 503,
        retry_after: Some(3600),
        ..Fault::default()
    }]);
    let daemon = site.start();
    let status = || {
        let out = syncd(&["-c", config, "status", "--json"]);
        assert!(
            !text(&out.stdout).contains(common::API_KEY),
            "the API key leaked into status"
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    eventually(Duration::from_secs(30), "a retry in status", || async {
        !status()["client_systems"][0]["retry"].is_null()
    })
    .await;
    let s = status();
    let cs = &s["client_systems"][0];
    assert_eq!(s["site_id"], "site-test");
    assert_eq!(cs["client_system"], "meterit");
    assert_eq!(cs["queued"], 3);
    assert_eq!(cs["encoder"]["name"], "json-batch");
    assert_eq!(cs["encoder"]["version"], "0.1.0");
    assert_eq!(cs["encoder"]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(cs["transport"]["name"], "meterit-http");
    assert_eq!(cs["last_outcome"], "retry");
    assert!(
        cs["last_error"].as_str().unwrap().contains("HTTP 503"),
        "{cs}"
    );
    assert!(cs["last_success_ms"].is_null());
    let table = text(&syncd(&["-c", config, "status"]).stdout);
    assert!(
        table.contains("totals: 1 client systems (1 online, 0 offline), 3 deliveries pending"),
        "{table}"
    );
    let block: Vec<&str> = table
        .lines()
        .skip_while(|l| *l != "meterit")
        .take_while(|l| !l.is_empty())
        .collect();
    let row = |label: &str| {
        block
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {label} row in\n{table}"))
    };
    assert_eq!(row("queued"), "3", "{table}");
    assert!(row("last error").contains("HTTP 503"), "{table}");
    assert!(
        row("next retry").contains("1 of 6 attempts used"),
        "{table}"
    );
    assert_eq!(row("authentication"), "ok", "{table}");
    assert!(row("connectivity").starts_with("online since"), "{table}");
    assert!(row("outages").starts_with("0 (up"), "{table}");
    assert!(
        row("encoder").starts_with("json-batch 0.1.0 (sha256 "),
        "{table}"
    );
    assert_eq!(row("remote config "), "none", "{table}");

    assert!(syncd(&["-c", config, "sync"]).status.success());
    eventually(Duration::from_secs(30), "a success in status", || async {
        status()["client_systems"][0]["last_success_ms"].is_i64()
    })
    .await;
    let s = status();
    assert_eq!(s["client_systems"][0]["queued"], 0);
    assert!(s["client_systems"][0]["retry"].is_null());
    daemon.stop().await;
    let out = syncd(&["-c", config, "status"]);
    assert_eq!(out.status.code(), Some(1), "no daemon any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_command_and_by_sighup() {
    let mut site = Site::new("").await;
    let encoder = site.use_plugin_copy("json_batch", "encoder.wasm");
    let config = site.config_path();
    let config = config.to_str().unwrap();
    let mut daemon = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_syncd"))
            .args(["-c", config, "run"])
            .spawn()
            .expect("daemon starts"),
    );
    site.wait_for_api().await;
    let reloads = || async {
        let http = syncd::daemon::http_client().unwrap();
        let body: serde_json::Value = http
            .get(format!("{}/v1/status", site.api()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["config"]["reloads"].as_u64().unwrap()
    };

    let out = syncd(&["-c", config, "reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "nothing changed");
    assert_eq!(reloads().await, 1);

    let hup = Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually(Duration::from_secs(30), "the SIGHUP reload", || async {
        reloads().await == 2
    })
    .await;

    // A broken encoder: refused, exit 1 with the reason; the daemon keeps running.
    std::fs::write(&encoder, b"garbage").unwrap();
    let out = syncd(&["-c", config, "reload"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("reload refused")
            && stderr.contains("meterit")
            && stderr.contains("encoder"),
        "{stderr}"
    );
    // Fixed: the watcher or the command (whichever comes first) puts it in service.
    std::fs::copy(plugin("json_batch_v2"), &encoder).unwrap();
    let out = syncd(&["-c", config, "reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    eventually(
        Duration::from_secs(30),
        "encoder 0.2.0 in service",
        || async { site.status().await["encoder"]["version"] == "0.2.0" },
    )
    .await;
    assert!(site.status().await["reload_error"].is_null());

    let term = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(daemon.0.wait().unwrap().success());
}

/// A daemon process, killed if the test ends before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_is_enforced_and_no_secret_leaks() {
    const TOKEN: &str = "tok-5f2c-9a71";
    let mut site = Site::new("").await;
    let config_path = site.config_path();
    let original = std::fs::read_to_string(&config_path).unwrap();
    let with_token = original.replacen("[api]\n", &format!("[api]\ntoken = \"{TOKEN}\"\n"), 1);
    std::fs::write(&config_path, with_token).unwrap();
    site.config = syncd::config::Config::load(&config_path).unwrap();
    let config = config_path.to_str().unwrap();
    site.queue()
        .await
        .enqueue(&common::readings(20))
        .await
        .unwrap();

    let log_path = site.dir.path().join("daemon.log");
    let mut daemon = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_syncd"))
            .args(["-c", config, "--log-level", "debug", "run"])
            .stdout(std::fs::File::create(&log_path).unwrap())
            .stderr(std::fs::File::create(site.dir.path().join("daemon.err")).unwrap())
            .spawn()
            .expect("daemon starts"),
    );
    site.wait_for_api().await;
    eventually(Duration::from_secs(60), "20 readings delivered", || async {
        site.client().stats().await.unwrap().readings == 20
    })
    .await;

    let http = syncd::daemon::http_client().unwrap();
    let get = |path: &str, token: Option<&str>| {
        let mut request = http.get(format!("{}{path}", site.api()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for path in ["/v1/status", "/metrics", "/v1/stats"] {
        assert_eq!(get(path, None).await.unwrap().status(), 401, "{path}");
        assert_eq!(
            get(path, Some("wrong")).await.unwrap().status(),
            401,
            "{path}"
        );
        assert_eq!(
            get(path, Some(TOKEN)).await.unwrap().status(),
            200,
            "{path}"
        );
    }
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    let ingest = http
        .post(format!("{}/v1/readings", site.api()))
        .body("{\"meter_id\":\"m\",\"timestamp\":1790000000000,\"value\":1}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(ingest.status(), 401);

    // The CLI carries the token from the config.
    let out = syncd(&["-c", config, "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = text(&out.stdout);
    let metrics = get("/metrics", Some(TOKEN))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let wrong = site.dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&config_path)
            .unwrap()
            .replace(TOKEN, "not-the-token"),
    )
    .unwrap();
    let out = syncd(&["-c", wrong.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("refused the API token"),
        "{}",
        text(&out.stderr)
    );

    let term = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(daemon.0.wait().unwrap().success());
    let logs = std::fs::read_to_string(&log_path).unwrap()
        + &std::fs::read_to_string(site.dir.path().join("daemon.err")).unwrap();
    // Written to a file, not a terminal: plain text, no colour codes.
    assert!(
        !logs.contains('\u{1b}'),
        "escape codes in the log file:\n{logs}"
    );
    assert!(
        logs.contains("batch delivered"),
        "the debug log was captured"
    );
    for (what, output) in [("logs", &logs), ("status", &status), ("metrics", &metrics)] {
        assert!(
            !output.contains(common::API_KEY),
            "the API key is in the {what}"
        );
        assert!(!output.contains(TOKEN), "the API token is in the {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_refreshes_in_place() {
    let site = Site::new("").await;
    let config = site.config_path();
    let daemon = site.start();
    site.wait_for_api().await;
    let watcher = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["-c", config.to_str().unwrap(), "status", "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut watcher = KillOnDrop(watcher);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    watcher.0.kill().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(watcher.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let screens = out.matches("\x1b[H\x1b[2J").count();
    assert!(screens >= 2, "{screens} refreshes in 2.5 s:\n{out}");
    assert!(out.matches("site site-test").count() >= 2, "{out}");
    daemon.stop().await;
}

#[test]
fn migrate_creates_the_schema_once_and_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sync.toml");
    std::fs::write(
        &config,
        "[site]\nid = \"s\"\n[database]\nurl = \"sqlite://state/queue.db\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for _ in 0..2 {
        let out = syncd(&["-c", config, "migrate"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert!(dir.path().join("state/queue.db").is_file());

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[site]\nid = \"s\"\n[database]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n",
    )
    .unwrap();
    // Nothing listens on port 1: refused quickly, with the database named (its
    // password, if any, redacted).
    let started = std::time::Instant::now();
    let out = syncd(&["-c", bad.to_str().unwrap(), "migrate"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("failed to open the database"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// Output piped into a program that stops reading (`syncd plugin check … | head -1`)
/// ends the command quietly, as other command-line tools do: no panic, no error.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["plugin", "check"])
        .arg(plugin("json_batch"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("syncd runs");
    // The reader goes away before syncd writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("syncd ends");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
}
