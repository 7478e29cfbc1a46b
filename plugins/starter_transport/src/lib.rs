//! A syncd transport plugin: delivers encoded batches to a Client System, and speaks
//! for the site (authentication, connectivity probes, heartbeats, remote
//! configuration). This one is the simplest useful kind:
//!
//! - `upload`: `POST <base_url>/<path>` with the encoded body, `Authorization: Bearer
//!   <api key>` and `Idempotency-Key: <batch id>`; the answer's status decides the
//!   outcome (see [`outcome`]);
//! - `probe`: `GET <base_url>`: any answer shows the Client System reachable;
//! - `authenticate`, `heartbeat`, `fetch-config`: nothing to do here.
//!
//! Settings (`[client_system.plugin]` in sync.toml): `path`, default "readings".
//! Change it for your Client System; the contract (the WIT files in `wit/`) and what
//! the host does with each answer are in syncd's docs/plugins.md.

wit_bindgen::generate!({
    world: "transport",
    path: "../../wit",
});

use sync::plugin::http::{self, Request};
use sync::plugin::log::{self, Level};
use sync::plugin::settings;

struct Plugin;

impl Guest for Plugin {
    /// Who this plugin is; `wit-version` must be the version of the WIT it was built
    /// against, or the host refuses it.
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "starter-transport".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    /// Called after an upload answered `unauthorized`: get fresh credentials here
    /// (a token, say, kept in a `thread_local!`). The API key needs none.
    fn authenticate() -> Result<(), String> {
        Ok(())
    }

    fn upload(info: BatchInfo, batch: EncodedBatch) -> UploadOutcome {
        let Some(api_key) = settings::secret("api-key") else {
            return UploadOutcome::Unauthorized("no api_key is configured".into());
        };
        let path = settings::get("path").unwrap_or_else(|| "readings".into());
        let request = Request {
            method: "POST".into(),
            url: path,
            headers: vec![
                ("content-type".into(), batch.content_type),
                ("authorization".into(), format!("Bearer {api_key}")),
                // The same batch id on every retry: the Client System can drop repeats.
                ("idempotency-key".into(), info.batch_id),
            ],
            body: batch.body,
        };
        match http::send(&request) {
            Ok(response) => {
                let retry_after = response
                    .headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))
                    .map(|(_, value)| value.as_str());
                outcome(response.status, retry_after)
            }
            // No answer at all: the host counts it against connectivity, whatever we say.
            Err(error) => UploadOutcome::RetryLater(RetryInfo {
                reason: format!("{error:?}"),
                delay_ms: None,
            }),
        }
    }

    fn probe() -> Result<(), String> {
        let request = Request {
            method: "GET".into(),
            url: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
        };
        http::send(&request).map(drop).map_err(|e| format!("{e:?}"))
    }

    fn heartbeat(status: SiteStatus) -> Result<(), String> {
        log::write(Level::Debug, &format!("{} readings queued", status.queued));
        Ok(())
    }

    fn fetch_config() -> Result<Option<RemoteConfig>, String> {
        Ok(None)
    }
}

export!(Plugin);

/// What an HTTP status means for the batch: 2xx stored; 401 and 403 unauthorized
/// (the host calls `authenticate` and tries once more); 408, 429 and 5xx a passing
/// failure, retried (after `Retry-After` seconds when given); any other status
/// refused for good: the batch goes to dead letters.
pub fn outcome(status: u16, retry_after: Option<&str>) -> UploadOutcome {
    let reason = format!("HTTP {status}");
    match status {
        200..=299 => UploadOutcome::Accepted,
        401 | 403 => UploadOutcome::Unauthorized(reason),
        408 | 429 | 500..=599 => UploadOutcome::RetryLater(RetryInfo {
            reason,
            delay_ms: retry_after
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|seconds| seconds * 1000),
        }),
        _ => UploadOutcome::Rejected(reason),
    }
}

// `cargo test` runs these natively: the plugin's logic, without the host.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        assert!(matches!(outcome(201, None), UploadOutcome::Accepted));
        assert!(matches!(outcome(401, None), UploadOutcome::Unauthorized(_)));
        assert!(matches!(outcome(400, None), UploadOutcome::Rejected(_)));
        match outcome(503, Some("7")) {
            UploadOutcome::RetryLater(retry) => assert_eq!(retry.delay_ms, Some(7000)),
            _ => panic!("503 is retried"),
        }
    }
}
