//! Fuzzing on stable Rust: seeded mutation of a corpus, for the three places where the
//! host decodes what it does not control — the configuration file, ingest payloads,
//! and what plugins hand back (an encoded batch, a URL to send to, a remote
//! configuration). Each target checks properties beyond "does not panic".
//!
//! Before mutating, every input kept under `tests/corpus/fuzz/<target>/` is replayed:
//! that is where an input that broke a target is saved (as `crash-<hash>`), to stay a
//! regression test once fixed.
//!
//! The suite runs each target for a fixed number of inputs; `cargo xtask reliability`
//! runs them for a while. Knobs:
//! - `SYNCD_FUZZ_SECONDS`: run each target this long instead of `SYNCD_FUZZ_RUNS`;
//! - `SYNCD_FUZZ_RUNS`: inputs per target (default 3000);
//! - `SYNCD_FUZZ_SEED`: the seed (default: from the clock; printed).

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncd::config::{Config, Policy};
use syncd::plugin::PluginContext;
use syncd::plugin::bindings::types::EncodedBatch;
use syncd::reading::{FileFormat, NewReading, parse_body, read_records};

/// The longest error message any target may produce: an operator reads it in a log
/// line, and it must never echo a whole input back.
const MAX_ERROR_BYTES: usize = 2048;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/fuzz")
        .join(target)
}

/// The check of one input, which panics when a property does not hold.
type Check = Box<dyn Fn(&[u8])>;

/// A fuzz target: seeds, words worth inserting, and its check.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    words: &'static [&'static str],
    check: Check,
}

/// Mutates `input` in place, one to four times.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, target: &Target) {
    for _ in 0..rng.usize(1..=4) {
        let len = input.len();
        match rng.u8(..8) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                input[i] ^= 1 << rng.u8(..8);
            }
            1 => input.insert(rng.usize(..=len), rng.u8(..)),
            2 if len > 0 => {
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..=16)).min(len);
                input.drain(start..end);
            }
            3 if len > 0 => {
                // Repeat a slice: deep nesting, long names, many records.
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..=8)).min(len);
                let piece = input[start..end].to_vec();
                let times = *[2, 16, 1000].get(rng.usize(..3)).unwrap();
                let at = rng.usize(..=input.len());
                for _ in 0..times {
                    input.splice(at..at, piece.iter().copied());
                }
            }
            4 | 5 => {
                let word = target.words[rng.usize(..target.words.len())].as_bytes();
                let at = rng.usize(..=len);
                input.splice(at..at, word.iter().copied());
            }
            6 if !target.seeds.is_empty() => {
                // Splice in part of another seed.
                let other = &target.seeds[rng.usize(..target.seeds.len())];
                if !other.is_empty() {
                    let start = rng.usize(..other.len());
                    let end = (start + rng.usize(1..=64)).min(other.len());
                    let at = rng.usize(..=len);
                    input.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ if len > 0 => {
                // Replace a byte with one from the interesting ones.
                let i = rng.usize(..len);
                input[i] = *[0u8, 0xff, b'"', b'\\', b'\n', b'[', b'{', b'9', 0xc3, 0x80]
                    .get(rng.usize(..10))
                    .unwrap();
            }
            _ => {}
        }
    }
}

/// Runs `check` on `input`; a panic is saved as a crash input and reported.
fn run_one(target: &Target, input: &[u8], save: bool) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| (target.check)(input))) {
        Ok(()) => Ok(()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let mut saved = String::new();
            if save {
                let dir = corpus(target.name);
                std::fs::create_dir_all(&dir).unwrap();
                let name = format!("crash-{}", syncd::plugin::cache::sha256_hex(input));
                std::fs::write(dir.join(&name), input).unwrap();
                saved = format!(" (input saved as tests/corpus/fuzz/{}/{name})", target.name);
            }
            Err(format!("{}: {message}{saved}", target.name))
        }
    }
}

fn fuzz(target: Target) {
    // Replay what broke this target before.
    if let Ok(entries) = std::fs::read_dir(corpus(target.name)) {
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            if let Err(e) = run_one(&target, &input, false) {
                panic!("regression {}: {e}", path.display());
            }
        }
    }
    let seed: u64 = env_or(
        "SYNCD_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let seconds: u64 = env_or("SYNCD_FUZZ_SECONDS", 0);
    let runs: u64 = env_or("SYNCD_FUZZ_RUNS", 3000);
    let until = (seconds > 0).then(|| Instant::now() + Duration::from_secs(seconds));
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut done: u64 = 0;
    // Quiet the default hook: caught panics would flood the output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for seed_input in &target.seeds {
        if let Err(e) = run_one(&target, seed_input, true) {
            failure = Some(e);
        }
    }
    while failure.is_none() && until.map_or(done < runs, |t| Instant::now() < t) {
        let mut input = target.seeds[rng.usize(..target.seeds.len())].clone();
        mutate(&mut rng, &mut input, &target);
        if let Err(e) = run_one(&target, &input, true) {
            failure = Some(e);
        }
        done += 1;
    }
    std::panic::set_hook(hook);
    println!(
        "fuzz {}: {done} inputs in {:.1} s (seed {seed})",
        target.name,
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = failure {
        panic!("{e}; reproduce with SYNCD_FUZZ_SEED={seed}");
    }
}

fn error_is_short(error: &str) {
    assert!(
        error.len() <= MAX_ERROR_BYTES,
        "an error of {} bytes: {}…",
        error.len(),
        &error.chars().take(200).collect::<String>()
    );
}

#[test]
fn fuzz_config() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    seeds.push(std::fs::read(dir.join("../sync.toml")).unwrap());
    for entry in std::fs::read_dir(dir.join("tests/corpus/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") && path.metadata().unwrap().len() < 4096 {
            seeds.push(std::fs::read(path).unwrap());
        }
    }
    fuzz(Target {
        name: "config",
        seeds,
        words: &[
            "[site]",
            "[[client_system]]",
            "[defaults]",
            "[api]",
            "[database]",
            " = ",
            "\"5m\"",
            "\"${X}\"",
            "${",
            "1e999",
            "-1",
            "99999999999999999999",
            "{ a = ",
            "[[",
            "]]",
            "\"\"\"",
            "'''",
            "\\u0000",
            "\n",
            "\"http://x/\"",
            "jitter",
            "batch_size",
            "backoff",
            "true",
            "nan",
            "inf",
        ],
        check: Box::new(|input| {
            let env = |name: &str| (name == "X").then(|| "x".repeat(10));
            match Config::from_bytes(input, Path::new("fuzz.toml"), &env) {
                Ok(config) => {
                    // Whatever is accepted is usable: every Client System's settings
                    // resolve without panicking.
                    for cs in &config.client_systems {
                        let _ = cs.policy(&config.defaults);
                    }
                }
                Err(e) => error_is_short(&format!("{:#}", anyhow::Error::from(e))),
            }
        }),
    });
}

/// What an accepted reading must be, whatever the input.
fn sound(r: &NewReading) {
    assert!(r.value.is_finite());
    assert!((946_684_800_000..4_102_444_800_000).contains(&r.timestamp_ms));
    assert!(!r.meter_id.trim().is_empty());
    for text in [&r.meter_id, &r.channel, &r.unit, &r.quality] {
        assert!(text.len() <= syncd::reading::MAX_NAME_BYTES);
        assert!(!text.chars().any(char::is_control));
    }
    assert!(r.attributes.len() <= syncd::reading::MAX_ATTRIBUTES);
}

#[test]
fn fuzz_ingest() {
    let seeds = [
        r#"[{"meter_id":"m1","timestamp":1790000000000,"value":1.5}]"#,
        r#"[{"meter_id":"m1","channel":"kwh","timestamp":"2026-11-22T10:00:00Z","value":1.5,"unit":"kWh","quality":"good","attributes":{"a":"b","n":3}}]"#,
        "{\"meter_id\":\"a\",\"timestamp\":1790000000000,\"value\":1}\n{\"meter_id\":\"b\",\"timestamp\":\"2026-11-22T10:00:00.123+01:00\",\"value\":-2e3}\n",
        "meter_id,timestamp,value,unit,attr.phase\nm1,1790000000000,1.5,kWh,L1\nm2,2026-11-22T10:00:00Z,2,kWh,\n",
    ];
    fuzz(Target {
        name: "ingest",
        seeds: seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        words: &[
            "\"meter_id\":",
            "\"timestamp\":",
            "\"value\":",
            "\"attributes\":{",
            "1e308",
            "-0",
            "null",
            "\"2026-02-30T25:61:00Z\"",
            "\"1970-01-01T00:00:00Z\"",
            "\\u0000",
            "\\ud800",
            ",",
            "[",
            "]",
            "{",
            "}",
            "\n",
            "\r\n",
            "\"",
            "9223372036854775808",
            "NaN",
            "attr.",
        ],
        check: Box::new(|input| {
            match parse_body(input) {
                Ok(readings) => readings.iter().for_each(sound),
                Err(e) => error_is_short(&e.to_string()),
            }
            for format in [FileFormat::Csv, FileFormat::JsonLines] {
                for record in read_records(input, format).take(1000) {
                    match record {
                        Ok(reading) => sound(&reading),
                        Err(e) => error_is_short(&format!("{e:#}")),
                    }
                }
            }
        }),
    });
}

#[test]
fn fuzz_plugin_output() {
    let http = syncd::daemon::http_client().unwrap();
    let context = Arc::new(
        PluginContext::new(
            "site",
            "cs",
            "http://127.0.0.1:8080/api",
            BTreeMap::new(),
            None,
            Duration::from_secs(1),
            http,
        )
        .unwrap(),
    );
    let seeds = [
        "url\x00readings/batch",
        "url\x00http://127.0.0.1:8080/api/readings/batch?x=1",
        "url\x00../admin",
        "config\x00{\"batch_size\": 500, \"interval\": \"1m\", \"backoff\": {\"initial\": \"5s\"}}",
        "config\x00{\"heartbeat\": \"30s\", \"max_retries\": 7}",
        "batch\x00application/json\x00[]",
    ];
    fuzz(Target {
        name: "plugin_output",
        seeds: seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        words: &[
            "..",
            "/",
            "%2e",
            "%2f",
            "@",
            ":",
            "?",
            "#",
            "\\",
            "//",
            "http://",
            "https://",
            "127.0.0.1:8080",
            "localhost",
            "api",
            "\r\n",
            "\"",
            "{",
            "}",
            "1e999",
            "\"1h\"",
            "-1",
            "\"jitter\": 2",
        ],
        check: Box::new(move |input| {
            let mut parts = input.splitn(3, |&b| b == 0);
            let kind = parts.next().unwrap_or_default();
            let rest = parts.next().unwrap_or_default();
            let text = String::from_utf8_lossy(rest);
            match kind {
                b"url" => match context.resolve_url(&text) {
                    // Whatever resolves stays on the Client System's host and port,
                    // under its base path.
                    Ok(url) => {
                        assert_eq!(url.host_str(), Some("127.0.0.1"), "{url}");
                        assert_eq!(url.port_or_known_default(), Some(8080), "{url}");
                        assert!(url.path().starts_with("/api"), "{url}");
                        assert!(url.username().is_empty() && url.password().is_none());
                    }
                    Err(e) => error_is_short(&e),
                },
                b"config" => match Policy::from_remote_json(&text) {
                    Ok(policy) => {
                        let _ = policy.effective();
                    }
                    Err(e) => error_is_short(&e),
                },
                _ => {
                    let body = parts.next().unwrap_or_default().to_vec();
                    let batch = EncodedBatch {
                        content_type: text.into_owned(),
                        reading_count: body.len() as u32,
                        body,
                    };
                    let readings = batch.reading_count as usize;
                    if syncd::plugin::output::check_encoded(&batch, readings).is_ok() {
                        // What passes can be sent as a header.
                        assert!(
                            reqwest::header::HeaderValue::from_str(&batch.content_type).is_ok()
                        );
                    }
                }
            }
        }),
    });
}
