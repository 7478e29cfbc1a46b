//! Test fixture for the host's sandbox: a transport that tries what a plugin must not
//! manage, as its `behaviour` setting says, and reports what it got as the reason of a
//! `rejected` outcome (so that a test reads it from the dead letter). Not a plugin to
//! deploy.
//!
//! - `escape`: sends a request to every URL in the `targets` setting (separated by
//!   spaces) and to paths that climb out of the base URL; the reason lists, per target,
//!   `not-allowed`, `status N` or the error.
//! - `wasi`: asks WASI for the environment, the arguments, the working directory and
//!   the pre-opened directories; the reason gives their counts.
//! - `retry-forever`: answers `retry-later` with the longest delay there is.
//! - `invalid-utf8`: answers `rejected` with a reason that is not UTF-8.
//! - anything else: `accepted` without sending anything.

wit_bindgen::generate!({
    world: "syncd-test:hostile/transport-with-wasi",
    path: ["../../wit", "wit"],
    generate_all,
});

use sync::plugin::http::{self, HttpError, Request};
use sync::plugin::settings;

/// Paths that would leave the base URL if the host resolved them carelessly.
const CLIMBS: &[&str] = &[
    "../admin/stats",
    "/../admin/stats",
    "%2e%2e/admin/stats",
    "readings/../../admin/stats",
];

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "hostile-transport".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    fn authenticate() -> Result<(), String> {
        Ok(())
    }

    fn upload(_info: BatchInfo, _batch: EncodedBatch) -> UploadOutcome {
        match settings::get("behaviour").as_deref() {
            Some("escape") => UploadOutcome::Rejected(escape()),
            Some("wasi") => UploadOutcome::Rejected(wasi()),
            Some("retry-forever") => UploadOutcome::RetryLater(RetryInfo {
                delay_ms: Some(u64::MAX),
                reason: "come back at the end of time".into(),
            }),
            Some("invalid-utf8") => {
                let bytes = vec![b'b', b'a', b'd', 0xff, 0xfe];
                // SAFETY: deliberately not UTF-8: the host must refuse to lift it.
                UploadOutcome::Rejected(unsafe { String::from_utf8_unchecked(bytes) })
            }
            _ => UploadOutcome::Accepted,
        }
    }

    fn probe() -> Result<(), String> {
        Ok(())
    }

    fn heartbeat(_status: SiteStatus) -> Result<(), String> {
        Ok(())
    }

    fn fetch_config() -> Result<Option<RemoteConfig>, String> {
        Ok(None)
    }
}

fn escape() -> String {
    let targets = settings::get("targets").unwrap_or_default();
    let attempts = targets
        .split_whitespace()
        .chain(CLIMBS.iter().copied())
        .map(|url| {
            let result = http::send(&Request {
                method: "GET".into(),
                url: url.into(),
                headers: Vec::new(),
                body: Vec::new(),
            });
            let got = match result {
                Ok(response) => format!("status {}", response.status),
                Err(HttpError::NotAllowed(_)) => "not-allowed".into(),
                Err(other) => format!("{other:?}"),
            };
            format!("{url} => {got}")
        });
    attempts.collect::<Vec<_>>().join("; ")
}

fn wasi() -> String {
    let env = wasi::cli::environment::get_environment().len();
    let args = wasi::cli::environment::get_arguments().len();
    let cwd = wasi::cli::environment::initial_cwd().is_some();
    let dirs = wasi::filesystem::preopens::get_directories().len();
    format!("env={env} args={args} cwd={cwd} dirs={dirs}")
}

export!(Hostile);
