//! Bad input: every malformed sync.toml of `tests/corpus/config` and every malformed
//! ingest payload below is answered by an error naming what is wrong; none stops the
//! daemon, and none stores anything, in part or in whole.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Site, eventually};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config")
}

/// Each corpus file with the fragment its error must contain.
fn config_corpus() -> Vec<(PathBuf, String)> {
    let manifest = std::fs::read_to_string(corpus_dir().join("expected.tsv")).unwrap();
    let cases: Vec<(PathBuf, String)> = manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (name, expected) = line.split_once('\t').expect("name<TAB>fragment");
            (
                corpus_dir().join(format!("{name}.toml")),
                expected.to_owned(),
            )
        })
        .collect();
    // Every file is listed, so none is left untested.
    let files = std::fs::read_dir(corpus_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert_eq!(
        files,
        cases.len(),
        "every corpus file has a line in expected.tsv"
    );
    cases
}

/// A config too large to be one, made here rather than kept in the repository.
fn huge_config(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("huge.toml");
    let text = format!(
        "[site]\nid = \"{}\"\n[database]\nurl = \"sqlite://syncd.db\"\n",
        "x".repeat(20 << 20)
    );
    std::fs::write(&path, text).unwrap();
    (path, "larger than".to_owned())
}

#[test]
fn every_malformed_config_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases = config_corpus();
    cases.push(huge_config(dir.path()));
    for (path, expected) in &cases {
        let error = match syncd::config::Config::load(path) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        assert!(
            error.len() < 2000,
            "{}: an error of {} bytes",
            path.display(),
            error.len()
        );
        assert!(
            error.contains(expected.as_str()),
            "{}: the error does not say {expected:?}:\n{error}",
            path.display()
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(error.contains(name), "the error names the file: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_refuses_each_malformed_config_and_keeps_delivering() {
    let site = Site::new("interval = \"100ms\"").await;
    let good = std::fs::read_to_string(site.config_path()).unwrap();
    let daemon = site.start();
    site.wait_for_api().await;
    let http = syncd::daemon::http_client().unwrap();
    let mut cases = config_corpus();
    cases.push(huge_config(site.dir.path()));
    for (path, expected) in &cases {
        std::fs::copy(path, site.config_path()).unwrap();
        let response = http
            .post(format!("{}/v1/reload", site.api()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{}", path.display());
        let body: serde_json::Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(expected.as_str()),
            "{}: {error}",
            path.display()
        );
        assert!(error.contains("sync.toml"), "names the file: {error}");
    }
    std::fs::write(site.config_path(), &good).unwrap();
    site.post_readings(0, 40).await;
    eventually(Duration::from_secs(30), "delivery after it all", || async {
        site.client().stats().await.unwrap().readings == 40
    })
    .await;
    daemon.stop().await;
}

/// Malformed ingest payloads: (what, body, status, fragment of the error).
fn ingest_corpus() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let reading = |fields: &str| format!("[{{{fields}}}]").into_bytes();
    let ok = r#""meter_id":"m1","timestamp":1790000000000,"value":1"#;
    let mut deep =
        String::from(r#"[{"meter_id":"m1","timestamp":1790000000000,"value":1,"attributes":{"a":"#);
    deep.push_str(&"[".repeat(10_000));
    deep.push_str(&"]".repeat(10_000));
    deep.push_str("}}]");
    let many_attributes: String = (0..65)
        .map(|i| format!("\"k{i}\":\"v\""))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        ("not JSON", b"this is not json".to_vec(), 400, "record 1"),
        (
            "truncated array",
            br#"[{"meter_id":"m1","timestamp":1790000000000,"#.to_vec(),
            400,
            "EOF",
        ),
        (
            "an object, not an array",
            br#"{"meter_id":"m1"}"#.to_vec(),
            400,
            "timestamp is missing",
        ),
        (
            "missing meter_id",
            reading(r#""timestamp":1790000000000,"value":1"#),
            400,
            "meter_id",
        ),
        (
            "missing value",
            reading(r#""meter_id":"m1","timestamp":1790000000000"#),
            400,
            "value is missing",
        ),
        (
            "value as text",
            reading(r#""meter_id":"m1","timestamp":1790000000000,"value":"1""#),
            400,
            "invalid type: string",
        ),
        (
            "value too large",
            reading(r#""meter_id":"m1","timestamp":1790000000000,"value":1e999"#),
            400,
            "number out of range",
        ),
        (
            "timestamp as object",
            reading(r#""meter_id":"m1","timestamp":{},"value":1"#),
            400,
            "timestamp",
        ),
        (
            "timestamp in seconds",
            reading(r#""meter_id":"m1","timestamp":1790000000,"value":1"#),
            400,
            "milliseconds expected",
        ),
        (
            "timestamp past i64",
            reading(r#""meter_id":"m1","timestamp":99999999999999999999,"value":1"#),
            400,
            "timestamp",
        ),
        (
            "unknown field",
            reading(&format!(r#"{ok},"colour":"red""#)),
            400,
            "unknown field `colour`",
        ),
        (
            "meter_id of a megabyte",
            reading(&format!(
                r#""meter_id":"{}","timestamp":1790000000000,"value":1"#,
                "m".repeat(1 << 20)
            )),
            400,
            "meter_id is 1048576 bytes long",
        ),
        (
            "NUL in meter_id",
            reading(r#""meter_id":"m\u0000","timestamp":1790000000000,"value":1"#),
            400,
            "meter_id holds a control character",
        ),
        (
            "newline in unit",
            reading(&format!(r#"{ok},"unit":"k\nWh""#)),
            400,
            "unit holds a control character",
        ),
        (
            "65 attributes",
            reading(&format!(r#"{ok},"attributes":{{{many_attributes}}}"#)),
            400,
            "65 attributes",
        ),
        (
            "attribute value of 5 KB",
            reading(&format!(
                r#"{ok},"attributes":{{"note":"{}"}}"#,
                "n".repeat(5000)
            )),
            400,
            "attribute \"note\" is 5000 bytes long",
        ),
        ("deep nesting", deep.into_bytes(), 400, "recursion limit"),
        (
            "Latin-1 bytes in JSON lines",
            b"{\"meter_id\":\"caf\xe9\",\"timestamp\":1790000000000,\"value\":1}\n".to_vec(),
            400,
            "not valid UTF-8",
        ),
        (
            "Latin-1 bytes in an array",
            b"[{\"meter_id\":\"caf\xe9\",\"timestamp\":1790000000000,\"value\":1}]".to_vec(),
            400,
            "UTF-8",
        ),
        (
            "good then bad",
            format!(r#"[{{{ok}}},{{"meter_id":"m2"}}]"#).into_bytes(),
            400,
            "record 2",
        ),
        ("over 32 MiB", vec![b' '; 33 << 20], 413, "larger than"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_ingest_is_refused_whole_with_a_clear_error() {
    let site = Site::new("").await;
    let daemon = site.start();
    site.wait_for_api().await;
    let http = syncd::daemon::http_client().unwrap();
    for (what, body, status, expected) in ingest_corpus() {
        let response = http
            .post(format!("{}/v1/readings", site.api()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: the daemon answers: {e}"));
        assert_eq!(response.status().as_u16(), status, "{what}");
        let answer: serde_json::Value = response.json().await.unwrap_or_else(|e| {
            panic!("{what}: the error is JSON: {e}");
        });
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(expected),
            "{what}: {expected:?} not in {error:?}"
        );
    }
    // Nothing stored, in part or in whole; the daemon still takes good readings.
    let queue = site.queue().await;
    assert_eq!(
        queue.reading_count().await.unwrap(),
        0,
        "nothing partial was queued"
    );
    site.post_readings(0, 5).await;
    assert_eq!(queue.reading_count().await.unwrap(), 5);
    daemon.stop().await;
}
