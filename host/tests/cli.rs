//! The `syncd` binary, as an operator runs it.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Site, eventually, plugin};

fn syncd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("syncd runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

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
    assert!(report.contains("wit version: 0.1.0"), "{report}");

    let transport = plugin("meterit_http");
    let out = syncd(&["plugin", "check", transport.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("world:       sync:plugin/transport"));

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
