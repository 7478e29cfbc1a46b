//! The plugin author's kit, as docs/plugins.md tells an author to use it: a new plugin
//! from `syncd plugin new` built, tested natively and with `syncd plugin test`, then
//! hot-deployed to a running daemon; the line-protocol encoder and the generic HTTP
//! transport delivering to a server that is not the reference Client System; the
//! JavaScript encoder built with componentize-js.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use common::{Site, eventually, plugin, syncd, text};
use syncd::plugin::{PluginContext, PluginEngine};

const LIMIT: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate is in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs `command`, panicking with its output unless it succeeds.
fn succeed(command: &mut Command, what: &str) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `cargo xtask build-plugin DIR`, as the walkthrough says, through the xtask binary
/// that runs these tests (`cargo xtask test` names it in SYNCD_XTASK): a nested
/// `cargo xtask` would wait for the lock this test run holds.
fn build_plugin(dir: &Path) {
    let xtask = std::env::var_os("SYNCD_XTASK")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/xtask"));
    assert!(
        xtask.is_file(),
        "{} is missing: run the tests with `cargo xtask test`",
        xtask.display()
    );
    succeed(
        Command::new(xtask)
            .arg("build-plugin")
            .arg(dir)
            .env("CARGO_MANIFEST_DIR", root().join("xtask")),
        "cargo xtask build-plugin",
    );
}

/// The crate's own tests, natively (`cargo test` in its folder).
fn cargo_test(dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    succeed(
        Command::new(cargo)
            .arg("test")
            .arg("--target-dir")
            .arg(target_dir().join("plugin-kit-native"))
            .current_dir(dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS"),
        "cargo test of the new plugin",
    );
}

/// A new plugin crate `name` of `world` in `parent`, built: its component's path.
fn new_built_plugin(parent: &Path, name: &str, world: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let plugin_new = || {
        let parent = parent.to_str().unwrap();
        syncd(&["plugin", "new", name, "--world", world, "--dir", parent])
    };
    let out = plugin_new();
    assert!(out.status.success(), "plugin new: {}", text(&out.stderr));
    let dir = parent.join(name);
    for file in ["Cargo.toml", "src/lib.rs", "wit/plugin.wit", "README.md"] {
        assert!(dir.join(file).is_file(), "plugin new wrote no {file}");
    }
    // A second time, the folder exists: refused, nothing overwritten.
    let again = plugin_new();
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));

    edit(&dir);
    cargo_test(&dir);
    build_plugin(&dir);
    // Named after the crate, as Rust names its libraries: '-' becomes '_'.
    let component = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        component.is_file(),
        "build-plugin wrote no {}",
        component.display()
    );
    component
}

/// The walkthrough of docs/plugins.md: a new encoder, changed, tested, checked by
/// `syncd plugin test`, then deployed to a running daemon by editing sync.toml; the
/// daemon takes it between batches and every reading arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_encoder_is_built_tested_and_hot_deployed() {
    let work = tempfile::tempdir().unwrap();
    let component = new_built_plugin(work.path(), "site_json", "encoder", |dir| {
        // The walkthrough's change: a content type of the author's own.
        let lib = dir.join("src/lib.rs");
        let source = std::fs::read_to_string(&lib).unwrap();
        assert!(
            source.contains("name: \"site-json\".into()"),
            "the starter renamed"
        );
        let changed = source.replace(
            "\"application/json; charset=utf-8\"",
            "\"application/vnd.site+json\"",
        );
        assert_ne!(
            changed, source,
            "the starter's content type is where the docs say"
        );
        std::fs::write(&lib, changed).unwrap();
    });

    let out = syncd(&[
        "plugin",
        "test",
        component.to_str().unwrap(),
        "--count",
        "6",
    ]);
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "plugin test:\n{report}{}",
        text(&out.stderr)
    );
    assert!(report.contains("describe: site-json 0.1.0"), "{report}");
    assert!(
        report.contains("6 readings → ") && report.contains("application/vnd.site+json"),
        "{report}"
    );
    assert!(
        report.contains("\"meter_id\":\"gas-\\\"Zürich\\\"-3\""),
        "{report}"
    );

    // A daemon delivering with json_batch; then the new encoder, named in sync.toml.
    let site = Site::new("interval = \"100ms\"\nbatch_size = 50").await;
    let daemon = site.start();
    site.wait_for_api().await;
    site.post_readings(0, 120).await;
    eventually(LIMIT, "the first readings delivered", || async {
        site.client().stats().await.unwrap().readings == 120
    })
    .await;
    let config = std::fs::read_to_string(site.config_path()).unwrap();
    let edited = config.replace(
        &plugin("json_batch").display().to_string(),
        &component.display().to_string(),
    );
    std::fs::write(site.config_path(), edited).unwrap();
    eventually(LIMIT, "the new encoder in service", || async {
        site.status().await["encoder"]["name"] == "site-json"
    })
    .await;
    site.post_readings(120, 120).await;
    eventually(LIMIT, "the later readings delivered", || async {
        site.client().stats().await.unwrap().readings == 240
    })
    .await;
    common::assert_each_once(site.client(), 240).await;
    let batches = site.client().stored_batches().await.unwrap();
    let by_new: i64 = batches
        .iter()
        .filter(|b| b.content_type == "application/vnd.site+json")
        .map(|b| b.reading_count)
        .sum();
    assert_eq!(
        by_new, 120,
        "the readings after the deploy went through the new encoder"
    );
    daemon.stop().await;
}

/// What a test server received.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// An answer the test server gives: status, headers, body.
type Answer = (StatusCode, Vec<(&'static str, &'static str)>, &'static str);

/// A Client System that is not the reference one: answers each request with the
/// status its path is given (200 otherwise) and keeps what it received.
#[derive(Clone, Default)]
struct Recorder {
    received: Arc<Mutex<Vec<Received>>>,
    answers: Arc<Mutex<BTreeMap<String, Answer>>>,
}

impl Recorder {
    async fn start(&self) -> String {
        async fn handle(
            State(recorder): State<Recorder>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> axum::response::Response {
            let path = uri.path().to_owned();
            recorder.received.lock().unwrap().push(Received {
                method,
                path: path.clone(),
                headers,
                body: body.to_vec(),
            });
            let answer = recorder.answers.lock().unwrap().get(&path).cloned();
            match answer {
                Some((status, headers, body)) => {
                    let mut response = (status, body).into_response();
                    for (name, value) in headers {
                        response.headers_mut().insert(name, value.parse().unwrap());
                    }
                    response
                }
                None => StatusCode::OK.into_response(),
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    fn answer(
        &self,
        path: &str,
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &'static str,
    ) {
        self.answers.lock().unwrap().insert(
            path.to_owned(),
            (
                StatusCode::from_u16(status).unwrap(),
                headers.to_vec(),
                body,
            ),
        );
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// The transport starter: built, its own tests passing, and `syncd plugin test`
/// showing every export against a server that takes its uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_transport_is_built_tested_and_tried_against_a_server() {
    let work = tempfile::tempdir().unwrap();
    let component = new_built_plugin(work.path(), "my-upload", "transport", |_| {});
    assert!(component.ends_with("my_upload.wasm"));
    let server = Recorder::default();
    let url = server.start().await;
    let args: Vec<String> = [
        "plugin",
        "test",
        component.to_str().unwrap(),
        "--url",
        &url,
        "--api-key",
        "k-1",
        "--setting",
        "path=ingest",
    ]
    .map(String::from)
    .into();
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            syncd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let out = run(args.clone()).await;
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "plugin test:\n{report}{}",
        text(&out.stderr)
    );
    for line in [
        "authenticate",
        "probe",
        "fetch-config",
        "heartbeat",
        "upload         accepted",
    ] {
        assert!(report.contains(line), "{line} missing from:\n{report}");
    }
    assert!(
        report.contains(&format!("POST {url}ingest → 200")),
        "{report}"
    );
    let uploads: Vec<Received> = server
        .received()
        .into_iter()
        .filter(|r| r.path == "/ingest")
        .collect();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].headers["authorization"], "Bearer k-1");
    assert!(uploads[0].headers.contains_key("idempotency-key"));

    // The same plugin refused by the server: `plugin test` says what the host would
    // do, and fails.
    server.answer("/ingest", 400, &[], "no such site");
    let out = run(args).await;
    let report = text(&out.stdout);
    assert!(!out.status.success());
    assert!(
        report.contains("rejected") && report.contains("dead letters"),
        "{report}"
    );
}

/// The generic HTTP transport, configured only by settings, with the line-protocol
/// encoder: a daemon delivers every reading once to a server that speaks neither the
/// reference Client System's paths nor its authentication, through a passing failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_transport_delivers_line_protocol_to_another_server() {
    let server = Recorder::default();
    let url = server.start().await;
    server.answer(
        "/db/cfg",
        200,
        &[("etag", "\"v7\"")],
        "{\"interval\":\"1s\"}",
    );
    // The first upload meets a passing failure, with Retry-After: 0.
    server.answer("/db/write", 503, &[("retry-after", "0")], "busy");

    let mut site = Site::build(common::Backend::Sqlite, "sqlite", "", &[]).await;
    let table = format!(
        r#"
[[client_system]]
name = "tsdb"
base_url = "{url}db/"
api_key = "tok-9"
encoder = "{encoder}"
transport = "{transport}"
interval = "100ms"
batch_size = 40
[client_system.plugin]
method = "PUT"
upload_path = "write?precision=ms"
headers = {{ "X-Site" = "north" }}
auth_header = "X-Api-Key"
auth_scheme = ""
config_path = "cfg"
precision = "ms"
measurement = "energy"
"#,
        encoder = plugin("line_protocol").display(),
        transport = plugin("http_post").display(),
    );
    let mut config = std::fs::read_to_string(site.config_path()).unwrap();
    config.push_str(&table);
    std::fs::write(site.config_path(), config).unwrap();
    site.config = syncd::config::Config::load(&site.config_path()).unwrap();
    let queue = site.queue().await;
    queue.enqueue(&common::readings(100)).await.unwrap();
    let daemon = site.start();
    let delivered = || {
        // Lines per distinct batch id: a batch retried counts once.
        let mut batches = BTreeMap::new();
        for r in server.received() {
            if r.method == Method::PUT && r.path == "/db/write" {
                let key = r.headers["idempotency-key"].to_str().unwrap().to_owned();
                batches.insert(key, r);
            }
        }
        batches
    };
    eventually(LIMIT, "a first upload, answered 503", || async {
        server.received().iter().any(|r| r.path == "/db/write")
    })
    .await;
    server.answers.lock().unwrap().remove("/db/write");
    eventually(LIMIT, "every reading delivered", || async {
        delivered()
            .values()
            .map(|r| text(&r.body).lines().count())
            .sum::<usize>()
            == 100
    })
    .await;
    daemon.stop().await;

    let batches = delivered();
    let first = batches.values().next().unwrap();
    assert_eq!(
        first.headers["x-api-key"], "tok-9",
        "the key alone, in its header"
    );
    assert!(!first.headers.contains_key("authorization"));
    assert_eq!(first.headers["x-site"], "north");
    assert_eq!(first.headers["content-type"], "text/plain; charset=utf-8");
    let mut ids = Vec::new();
    for request in batches.values() {
        for line in text(&request.body).lines() {
            assert!(line.starts_with("energy,meter_id=meter-"), "{line}");
            let (_, fields_and_time) = line.split_once(' ').unwrap();
            let (fields, time) = fields_and_time.split_once(' ').unwrap();
            assert!(time.starts_with("1790000"), "milliseconds: {line}");
            let id = fields.split(",id=").nth(1).unwrap().trim_end_matches('i');
            ids.push(id.parse::<u64>().unwrap());
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "each reading once");
    let uploads = server
        .received()
        .iter()
        .filter(|r| r.path == "/db/write")
        .count();
    assert!(uploads > batches.len(), "the 503 was retried");
    assert!(
        server.received().iter().any(|r| r.path == "/db/cfg"),
        "the remote configuration was fetched"
    );
}

/// The JavaScript encoder (plugins/js/csv_js, built with componentize-js): loaded by
/// the same host, every field of every reading in its CSV, non-ASCII text and quotes
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_encoder_writes_every_reading_as_csv() {
    let file = plugin("csv_js");
    let engine = PluginEngine::new().unwrap();
    let mut settings = BTreeMap::new();
    settings.insert("timestamp".to_owned(), "ms".to_owned());
    let context = PluginContext::new(
        "site-js",
        "csv",
        "http://127.0.0.1/",
        settings,
        None,
        Duration::from_secs(5),
        syncd::daemon::http_client().unwrap(),
    )
    .unwrap()
    .listing_requests();
    let mut encoder = engine.load_encoder(&file, Arc::new(context)).await.unwrap();
    assert_eq!(encoder.info().name, "csv-js");
    assert_eq!(encoder.info().wit_version, "0.2.0");

    let readings = syncd::plugin::kit::sample_readings(9);
    let info = syncd::plugin::bindings::types::BatchInfo {
        batch_id: "b-js".into(),
        site_id: "site-js".into(),
        client_system: "csv".into(),
        attempt: 1,
    };
    let batch = encoder
        .encode_records(&info, &readings)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.reading_count, 9);
    // What it printed with console.log reaches the host.
    assert_eq!(
        encoder.last_tally().printed,
        ["stdout: batch b-js: 9 readings as CSV"]
    );
    assert!(batch.content_type.starts_with("text/csv"));
    let mut csv = csv::Reader::from_reader(batch.body.as_slice());
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), readings.len());
    for (row, reading) in rows.iter().zip(&readings) {
        assert_eq!(row[0], reading.id.to_string());
        assert_eq!(row[1], reading.meter_id);
        assert_eq!(row[2], reading.channel);
        assert_eq!(row[3], reading.timestamp_ms.to_string());
        assert_eq!(row[4].parse::<f64>().unwrap(), reading.value);
        assert_eq!(row[5], reading.unit);
        assert_eq!(row[6], reading.quality);
        let attributes: BTreeMap<String, String> = serde_json::from_str(&row[7]).unwrap();
        let expected: BTreeMap<String, String> = reading.attributes.iter().cloned().collect();
        assert_eq!(attributes, expected);
    }
}

/// `syncd plugin test --client-system NAME` tries a plugin with what sync.toml gives
/// that Client System (its base_url, API key and settings), and keeps the compiled
/// component in the site's plugin cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_is_tried_as_a_client_system_of_sync_toml_has_it() {
    let site = Site::new("").await;
    let config = site.config_path();
    let transport = plugin("meterit_http");
    let out = tokio::task::spawn_blocking(move || {
        syncd(&[
            "--config",
            config.to_str().unwrap(),
            "plugin",
            "test",
            transport.to_str().unwrap(),
            "--client-system",
            "meterit",
            "--count",
            "5",
        ])
    })
    .await
    .unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "plugin test:\n{report}{}",
        text(&out.stderr)
    );
    assert!(report.contains("upload         accepted"), "{report}");
    assert_eq!(site.client().stats().await.unwrap().readings, 5);
    let cache = site.config.plugin_cache_dir().expect("a plugin cache");
    assert!(
        std::fs::read_dir(&cache).unwrap().next().is_some(),
        "the compiled component is kept in {}",
        cache.display()
    );

    let unknown = syncd(&[
        "--config",
        site.config_path().to_str().unwrap(),
        "plugin",
        "test",
        plugin("meterit_http").to_str().unwrap(),
        "--client-system",
        "nowhere",
    ]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("no client system named \"nowhere\""));
}

/// `plugin check` and `plugin test` load a component as whichever world it implements:
/// it is compiled once, even when it turns out not to be the first world tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_of_either_world_is_compiled_once() {
    let cache = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new()
        .unwrap()
        .with_cache_dir(cache.path().to_owned());
    let context = PluginContext::new(
        "site",
        "cs",
        "http://127.0.0.1/",
        BTreeMap::new(),
        None,
        Duration::from_secs(5),
        syncd::daemon::http_client().unwrap(),
    )
    .unwrap();
    let loaded = engine
        .load_any(&plugin("meterit_http"), Arc::new(context))
        .await
        .unwrap();
    let syncd::plugin::runtime::AnyPlugin::Transport(transport) = loaded.plugin else {
        panic!("meterit_http is a transport");
    };
    // Tried as an encoder first; compiled again for the transport, it would have come
    // from the cache the first compile filled.
    assert_eq!(transport.origin(), syncd::plugin::cache::Origin::Compiled);
    assert!(
        loaded.exports.iter().any(|e| e == "upload"),
        "{:?}",
        loaded.exports
    );
    assert!(
        loaded.imports.iter().any(|i| i == "sync:plugin/http@0.1.0"),
        "{:?}",
        loaded.imports
    );
}
