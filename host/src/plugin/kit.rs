//! The plugin author's kit behind `syncd plugin check|test|new`: load a component
//! whatever its world, call every export of it outside any site and report what each
//! call produced and what the host would do with it, and write a new plugin crate from
//! the project's starters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::PluginContext;
use super::bindings::{UploadOutcome, types};
use super::host::HttpTally;
use super::output::check_encoded;
use super::runtime::{AnyPlugin, CallError, EncoderPlugin, PluginEngine, TransportPlugin};
use crate::config::Secret;
use crate::reading::{FileFormat, NewReading, read_records};

/// What `syncd plugin test` runs a plugin with.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// The component.
    pub file: PathBuf,
    /// Readings to encode or upload (JSON lines, or CSV for a `.csv` name); generated
    /// samples when none.
    pub readings: Option<PathBuf>,
    /// How many sample readings to generate.
    pub count: usize,
    /// The Client System a transport talks to (its `base_url`).
    pub url: Option<String>,
    /// The secret "api-key".
    pub api_key: Option<Secret>,
    /// The plugin's settings, as `[client_system.plugin]` would give them.
    pub settings: BTreeMap<String, String>,
    /// An encoder whose output a transport uploads; without one the host writes the
    /// batch as the `json_batch` encoder does.
    pub encoder: Option<PathBuf>,
    /// The site id the plugin is told.
    pub site_id: String,
    /// The Client System's name the plugin is told.
    pub client_system: String,
    /// Deadline of one request.
    pub request_timeout: Duration,
    /// Where compiled components are kept (as `[plugins] cache_dir`), if anywhere:
    /// a large component then compiles once, not at every run.
    pub cache_dir: Option<PathBuf>,
    /// How much of an encoded body to print, in bytes.
    pub show_bytes: usize,
}

/// The site id and Client System name `syncd plugin test` runs a plugin as.
pub const TEST_SITE: &str = "plugin-test";

/// Calls every export of the plugin in `options.file` and writes what happened to
/// `out`. True when every call succeeded (for an upload: accepted).
pub async fn test(options: &TestOptions, out: &mut dyn Write) -> Result<bool> {
    let mut engine = PluginEngine::new()?;
    if let Some(dir) = &options.cache_dir {
        engine = engine.with_cache_dir(dir.clone());
    }
    let base_url = options.url.as_deref().unwrap_or("http://127.0.0.1/");
    let context = Arc::new(
        PluginContext::new(
            &options.site_id,
            &options.client_system,
            base_url,
            options.settings.clone(),
            options.api_key.clone(),
            options.request_timeout,
            crate::daemon::http_client()?,
        )?
        .listing_requests(),
    );
    let loaded = engine
        .load_any(&options.file, Arc::clone(&context))
        .await?
        .plugin;
    let info = loaded.info();
    writeln!(out, "{}", options.file.display())?;
    writeln!(
        out,
        "  world sync:plugin/{}@{}; describe: {} {}",
        loaded.world(),
        info.wit_version,
        info.name,
        info.version
    )?;
    let readings = match &options.readings {
        Some(path) => readings_from_file(path)?,
        None => sample_readings(options.count),
    };
    let batch = types::BatchInfo {
        batch_id: uuid::Uuid::now_v7().to_string(),
        site_id: options.site_id.clone(),
        client_system: options.client_system.clone(),
        attempt: 1,
    };
    let mut report = Report { out, ok: true };
    match loaded {
        AnyPlugin::Encoder(mut encoder) => {
            let encoded = report.encode(&mut encoder, &batch, &readings).await?;
            if let Some(encoded) = encoded {
                report.body(&encoded, options.show_bytes)?;
            }
        }
        AnyPlugin::Transport(mut transport) => {
            if options.url.is_none() {
                bail!(
                    "{} is a transport: give the URL of a Client System to test it against with --url \
                     (the reference one listens on http://127.0.0.1:8080/ by default)",
                    options.file.display()
                );
            }
            let encoded = match &options.encoder {
                Some(path) => {
                    let mut encoder = engine.load_encoder(path, Arc::clone(&context)).await?;
                    match report.encode(&mut encoder, &batch, &readings).await? {
                        Some(encoded) => encoded,
                        None => {
                            writeln!(report.out, "no upload: the encoder produced no batch")?;
                            return Ok(false);
                        }
                    }
                }
                None => json_document(&batch, &readings),
            };
            report.transport(&mut transport, &batch, &encoded).await?;
        }
    }
    writeln!(
        report.out,
        "{}",
        if report.ok {
            "result: every call succeeded"
        } else {
            "result: some calls failed (above)"
        }
    )?;
    Ok(report.ok)
}

/// The report being written, and whether every call so far succeeded.
struct Report<'a> {
    out: &'a mut dyn Write,
    ok: bool,
}

impl Report<'_> {
    /// One line: the export, its verdict, details, and how long it took.
    fn call(&mut self, export: &str, verdict: &str, detail: &str, took: Duration) -> Result<()> {
        let ms = took.as_secs_f64() * 1e3;
        writeln!(self.out, "{export:<14} {verdict:<12} {detail} ({ms:.1} ms)")?;
        Ok(())
    }

    /// The requests of the call just made, and what the plugin printed.
    fn requests(&mut self, transport: &TransportPlugin) -> Result<()> {
        self.tally(transport.last_tally())
    }

    fn tally(&mut self, tally: &HttpTally) -> Result<()> {
        for line in tally.requests.iter().chain(&tally.printed) {
            writeln!(self.out, "    {line}")?;
        }
        Ok(())
    }

    /// A call that trapped or overran its deadline.
    fn failed(&mut self, export: &str, error: &CallError, took: Duration) -> Result<()> {
        self.ok = false;
        self.call(
            export,
            "FAILED",
            &format!("{error} — the host keeps the batch and tries again later"),
            took,
        )
    }

    async fn encode(
        &mut self,
        encoder: &mut EncoderPlugin,
        batch: &types::BatchInfo,
        readings: &[types::Reading],
    ) -> Result<Option<types::EncodedBatch>> {
        let started = Instant::now();
        let result = encoder.encode_records(batch, readings).await;
        let took = started.elapsed();
        let encoded = self.encoded(result, readings.len(), took)?;
        self.tally(encoder.last_tally())?;
        Ok(encoded)
    }

    /// The verdict on an encoder's answer.
    fn encoded(
        &mut self,
        result: Result<Result<types::EncodedBatch, String>, CallError>,
        count: usize,
        took: Duration,
    ) -> Result<Option<types::EncodedBatch>> {
        match result {
            Ok(Ok(encoded)) => match check_encoded(&encoded, count) {
                Ok(()) => {
                    let detail = format!(
                        "{} readings → {} bytes of {}",
                        encoded.reading_count,
                        encoded.body.len(),
                        encoded.content_type
                    );
                    self.call("encode", "ok", &detail, took)?;
                    Ok(Some(encoded))
                }
                Err(why) => {
                    self.ok = false;
                    let detail = format!(
                        "by the host: {why} — the host keeps the batch and tries again later"
                    );
                    self.call("encode", "REFUSED", &detail, took)?;
                    Ok(None)
                }
            },
            Ok(Err(reason)) => {
                self.ok = false;
                self.call(
                    "encode",
                    "err",
                    &format!("{reason} — the batch would go to dead letters"),
                    took,
                )?;
                Ok(None)
            }
            Err(error) => {
                self.failed("encode", &error, took)?;
                Ok(None)
            }
        }
    }

    /// The encoded body: as text when it is UTF-8, else its first bytes in hex.
    fn body(&mut self, encoded: &types::EncodedBatch, show: usize) -> Result<()> {
        let body = &encoded.body;
        let shown = &body[..body.len().min(show)];
        writeln!(self.out, "--- body ({} bytes) ---", body.len())?;
        match std::str::from_utf8(body) {
            Ok(text) => {
                let mut cut = shown.len();
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                write!(self.out, "{}", &text[..cut])?;
                if !text[..cut].ends_with('\n') {
                    writeln!(self.out)?;
                }
            }
            Err(_) => {
                let mut hex = String::new();
                for (i, b) in shown.iter().enumerate() {
                    let _ = write!(hex, "{b:02x}{}", if i % 32 == 31 { "\n" } else { " " });
                }
                writeln!(self.out, "{}", hex.trim_end())?;
            }
        }
        if shown.len() < body.len() {
            writeln!(
                self.out,
                "--- {} more bytes (--show-bytes to see more) ---",
                body.len() - shown.len()
            )?;
        } else {
            writeln!(self.out, "---")?;
        }
        Ok(())
    }

    /// A call of a transport's that answers `result<_, string>`.
    async fn simple<T>(
        &mut self,
        export: &str,
        transport: &mut TransportPlugin,
        call: impl AsyncFnOnce(&mut TransportPlugin) -> Result<Result<T, String>, CallError>,
        describe: impl FnOnce(&T) -> String,
        on_err: &str,
    ) -> Result<()> {
        let started = Instant::now();
        let result = call(transport).await;
        let took = started.elapsed();
        match result {
            Ok(Ok(value)) => self.call(export, "ok", &describe(&value), took)?,
            Ok(Err(reason)) => {
                self.ok = false;
                self.call(export, "err", &format!("{reason} — {on_err}"), took)?;
            }
            Err(error) => self.failed(export, &error, took)?,
        }
        self.requests(transport)
    }

    async fn transport(
        &mut self,
        transport: &mut TransportPlugin,
        batch: &types::BatchInfo,
        encoded: &types::EncodedBatch,
    ) -> Result<()> {
        self.simple(
            "authenticate",
            transport,
            async |t| t.authenticate().await,
            |_| String::new(),
            "uploads refused as unauthorized wait their backoff",
        )
        .await?;
        self.simple(
            "probe",
            transport,
            async |t| t.probe().await,
            |_| "the Client System answers".to_owned(),
            "an error alone is not evidence: the host judges by whether requests got answers",
        )
        .await?;
        let answered = !transport.last_tally().unreachable();
        writeln!(
            self.out,
            "{:<14} {:<12} {}",
            "",
            "",
            if answered {
                "connectivity evidence: reachable"
            } else {
                "connectivity evidence: unreachable (no request got an answer)"
            }
        )?;
        self.simple(
            "fetch-config",
            transport,
            async |t| t.fetch_config().await,
            |config: &Option<types::RemoteConfig>| match config {
                Some(c) => format!("version {:?}, {} bytes", c.version, c.body.len()),
                None => "none: the Client System has no configuration for this site".to_owned(),
            },
            "the host keeps the configuration it has",
        )
        .await?;
        let status = types::SiteStatus {
            site_id: batch.site_id.clone(),
            queued: encoded.reading_count.into(),
            last_success_ms: None,
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.simple(
            "heartbeat",
            transport,
            async |t| t.heartbeat(&status).await,
            |_| String::new(),
            "logged and counted; the next heartbeat comes on schedule",
        )
        .await?;

        if self.upload(transport, batch, encoded, "upload").await? {
            // What the host does: authenticate once, and try the same batch again.
            let started = Instant::now();
            let result = transport.authenticate().await;
            let took = started.elapsed();
            match result {
                Ok(Ok(())) => self.call("authenticate", "ok", "after unauthorized", took)?,
                Ok(Err(reason)) => self.call("authenticate", "err", &reason, took)?,
                Err(error) => self.failed("authenticate", &error, took)?,
            }
            self.requests(transport)?;
            if self
                .upload(transport, batch, encoded, "upload again")
                .await?
            {
                self.ok = false;
                writeln!(
                    self.out,
                    "{:<14} {:<12} refused twice: the batch would wait its backoff, its retries unspent",
                    "", ""
                )?;
            }
        }
        Ok(())
    }

    /// One upload; true when the answer was `unauthorized`.
    async fn upload(
        &mut self,
        transport: &mut TransportPlugin,
        batch: &types::BatchInfo,
        encoded: &types::EncodedBatch,
        export: &str,
    ) -> Result<bool> {
        let started = Instant::now();
        let result = transport.upload(batch, encoded).await;
        let took = started.elapsed();
        let mut unauthorized = false;
        match result {
            Ok(UploadOutcome::Accepted) => self.call(
                export,
                "accepted",
                &format!(
                    "batch {} ({} readings)",
                    batch.batch_id, encoded.reading_count
                ),
                took,
            )?,
            Ok(UploadOutcome::RetryLater(retry)) => {
                self.ok = false;
                let after = match retry.delay_ms {
                    Some(ms) => format!("after {ms} ms, as asked"),
                    None => "after its backoff".to_owned(),
                };
                self.call(
                    export,
                    "retry",
                    &format!("{} — the host retries {after}", retry.reason),
                    took,
                )?;
            }
            Ok(UploadOutcome::Rejected(reason)) => {
                self.ok = false;
                self.call(
                    export,
                    "rejected",
                    &format!("{reason} — the batch would go to dead letters"),
                    took,
                )?;
            }
            Ok(UploadOutcome::Unauthorized(reason)) => {
                unauthorized = true;
                self.call(export, "unauthorized", &reason, took)?;
            }
            Err(error) => self.failed(export, &error, took)?,
        }
        self.requests(transport)?;
        Ok(unauthorized)
    }
}

/// `n` readings of several kinds of meters, with the text an encoder must escape
/// (quotes, a comma, non-ASCII), at fixed times, so that two runs print the same.
pub fn sample_readings(n: usize) -> Vec<types::Reading> {
    /// 2026-01-01T00:00:00Z.
    const START_MS: i64 = 1_767_225_600_000;
    /// Meter, channel, unit, first value, attributes.
    type Kind = (
        &'static str,
        &'static str,
        &'static str,
        f64,
        &'static [(&'static str, &'static str)],
    );
    let kinds: [Kind; 4] = [
        (
            "elec-0001",
            "import-kwh",
            "kWh",
            12_345.5,
            &[("phase", "L1")],
        ),
        ("water-0002", "flow", "m3", 87.25, &[]),
        (
            "gas-\"Zürich\"-3",
            "volume",
            "m3",
            4_051.125,
            &[("site", "north, hall 2")],
        ),
        ("heat-0004", "", "", 0.0, &[("note", "estimated")]),
    ];
    (0..n)
        .map(|i| {
            let (meter, channel, unit, base, attributes) = kinds[i % kinds.len()];
            let round = (i / kinds.len()) as f64;
            types::Reading {
                id: i as u64 + 1,
                meter_id: meter.to_owned(),
                channel: channel.to_owned(),
                timestamp_ms: START_MS + i as i64 * 60 * 1000,
                value: base + round * 0.25,
                unit: unit.to_owned(),
                quality: if i % kinds.len() == 3 {
                    "estimated"
                } else {
                    "good"
                }
                .to_owned(),
                attributes: attributes
                    .iter()
                    .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            }
        })
        .collect()
}

/// Readings from a file in the formats `syncd enqueue` takes, numbered from 1.
fn readings_from_file(path: &Path) -> Result<Vec<types::Reading>> {
    let format = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        FileFormat::Csv
    } else {
        FileFormat::JsonLines
    };
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_records(std::io::BufReader::new(file), format)
        .enumerate()
        .map(|(i, reading)| {
            let r: NewReading = reading.with_context(|| format!("in {}", path.display()))?;
            Ok(types::Reading {
                id: i as u64 + 1,
                meter_id: r.meter_id,
                channel: r.channel,
                timestamp_ms: r.timestamp_ms,
                value: r.value,
                unit: r.unit,
                quality: r.quality,
                attributes: r.attributes,
            })
        })
        .collect()
}

/// The batch as the `json_batch` encoder writes it: what a transport uploads when
/// `syncd plugin test` is given no encoder.
fn json_document(batch: &types::BatchInfo, readings: &[types::Reading]) -> types::EncodedBatch {
    let readings: Vec<serde_json::Value> = readings
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.id,
                "meter_id": r.meter_id,
                "channel": r.channel,
                "timestamp": r.timestamp_ms,
                "value": r.value,
                "unit": r.unit,
                "quality": r.quality,
                "attributes": r
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let body = serde_json::json!({
        "batch_id": batch.batch_id,
        "site_id": batch.site_id,
        "readings": readings,
    });
    types::EncodedBatch {
        content_type: "application/json".to_owned(),
        body: body.to_string().into_bytes(),
        reading_count: readings.len() as u32,
    }
}

/// The world a new plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NewWorld {
    /// Turns a batch into bytes (`sync:plugin/encoder@0.2.0`).
    Encoder,
    /// Delivers bytes to a Client System (`sync:plugin/transport@0.1.0`).
    Transport,
}

/// The starters `syncd plugin new` copies: crates of the plugins workspace, built and
/// tested with the others.
struct Starter {
    crate_name: &'static str,
    lib_rs: &'static str,
    uses_serde_json: bool,
    wit_path: &'static str,
    wit: &'static str,
}

const STARTER_ENCODER: Starter = Starter {
    crate_name: "starter_encoder",
    lib_rs: include_str!("../../../plugins/starter_encoder/src/lib.rs"),
    uses_serde_json: true,
    wit_path: "../../wit/v0.2.0",
    wit: include_str!("../../../wit/v0.2.0/plugin.wit"),
};

const STARTER_TRANSPORT: Starter = Starter {
    crate_name: "starter_transport",
    lib_rs: include_str!("../../../plugins/starter_transport/src/lib.rs"),
    uses_serde_json: false,
    wit_path: "../../wit",
    wit: include_str!("../../../wit/plugin.wit"),
};

/// Writes a new plugin crate `name` into `parent/name`: the starter of `world` with
/// the WIT files it builds against, a Cargo.toml of its own (no workspace around it),
/// and a README with the commands that build, test and deploy it. Returns its folder.
pub fn new_plugin(name: &str, world: NewWorld, parent: &Path) -> Result<PathBuf> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        bail!(
            "{name:?} cannot name a plugin crate: use lower-case letters, digits, '_' and '-', \
             starting with a letter"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists: choose another name or folder",
            dir.display()
        );
    }
    let starter = match world {
        NewWorld::Encoder => STARTER_ENCODER,
        NewWorld::Transport => STARTER_TRANSPORT,
    };
    let plugin_name = name.replace('_', "-");
    let lib_rs = starter
        .lib_rs
        .replace(&format!("path: \"{}\"", starter.wit_path), "path: \"wit\"")
        .replace(&starter.crate_name.replace('_', "-"), &plugin_name);
    let world_name = match world {
        NewWorld::Encoder => "encoder",
        NewWorld::Transport => "transport",
    };
    let serde_json = if starter.uses_serde_json {
        "serde_json = { version = \"1\", default-features = false, features = [\"std\"] }\n"
    } else {
        ""
    };
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
description = "syncd {world_name} plugin"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the WebAssembly module made into a component; rlib: `cargo test`.
crate-type = ["cdylib", "rlib"]

[dependencies]
wit-bindgen = {{ version = "0.61", default-features = false, features = ["macros", "realloc", "std"] }}
{serde_json}
# A crate of its own, whatever folder it is in.
[workspace]

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    );
    let readme = format!(
        "# {name}\n\n\
         A syncd {world_name} plugin (world `sync:plugin/{world_name}`, WIT in `wit/`), made by\n\
         `syncd plugin new`. The contract and a walkthrough are in syncd's docs/plugins.md.\n\n\
         ```sh\n\
         cargo test                                  # its logic, natively\n\
         cargo xtask build-plugin {path}   # from syncd's checkout: writes {name_}.wasm here\n\
         syncd plugin test {path}/{name_}.wasm{url}\n\
         ```\n\n\
         To deploy, name the file as `{world_name}` in sync.toml (or copy it over the file\n\
         named there, through a temporary name and a rename): the running daemon picks\n\
         it up between batches.\n",
        path = dir.display(),
        name_ = name.replace('-', "_"),
        url = match world {
            NewWorld::Encoder => "",
            NewWorld::Transport => " --url http://127.0.0.1:8080/",
        },
    );
    let files = [
        ("Cargo.toml", cargo_toml.as_str()),
        ("src/lib.rs", lib_rs.as_str()),
        ("wit/plugin.wit", starter.wit),
        ("README.md", readme.as_str()),
        (".gitignore", "/target\n*.wasm\n"),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}
