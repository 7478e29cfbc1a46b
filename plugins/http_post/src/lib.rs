//! syncd transport plugin: a generic HTTP upload, configured entirely by settings, for
//! a Client System that takes a batch in one request and authenticates with a key sent
//! in a header. Every setting is optional (`[client_system.plugin]` in sync.toml):
//!
//! | setting | default | what |
//! | --- | --- | --- |
//! | `upload_path` | `""` (the base URL) | where batches go, under `base_url` |
//! | `method` | `"POST"` | `POST`, `PUT` or `PATCH` |
//! | `headers` | none | a table of headers sent with every request |
//! | `auth_header` | `"authorization"` | the header carrying the API key |
//! | `auth_scheme` | `"Bearer"` | written before the key; `""` sends the key alone |
//! | `idempotency_header` | `"idempotency-key"` | carries the batch id; `""` for none |
//! | `probe_path` | `""` | `GET` to check the Client System answers |
//! | `heartbeat_path` | none | when set, `POST` a JSON heartbeat there |
//! | `config_path` | none | when set, `GET` the remote configuration there (404: none) |
//!
//! The API key is the Client System's `api_key`; without one no auth header is sent.
//! Answers: 2xx accepted; 401 and 403 unauthorized; 408, 429 and 5xx retried later
//! (after `Retry-After` seconds when given); any other status rejected (dead letters).

wit_bindgen::generate!({
    world: "transport",
    path: "../../wit",
});

use sync::plugin::http::{self, HttpError, Request, Response};
use sync::plugin::log::{self, Level};
use sync::plugin::settings;

struct HttpPost;

impl Guest for HttpPost {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "http-post".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    /// A static key needs no fresh credentials.
    fn authenticate() -> Result<(), String> {
        Ok(())
    }

    fn upload(info: BatchInfo, batch: EncodedBatch) -> UploadOutcome {
        let method = setting("method").unwrap_or_else(|| "POST".into());
        if !["POST", "PUT", "PATCH"].contains(&method.as_str()) {
            // A wrong setting: retried, so that fixing sync.toml loses nothing.
            return retry(
                format!("setting method = {method:?}: use POST, PUT or PATCH"),
                None,
            );
        }
        let mut headers = match headers() {
            Ok(headers) => headers,
            Err(why) => return retry(why, None),
        };
        headers.push(("content-type".into(), batch.content_type));
        let idempotency = setting("idempotency_header").unwrap_or_else(|| "idempotency-key".into());
        if !idempotency.is_empty() {
            headers.push((idempotency, info.batch_id));
        }
        let upload_path = setting("upload_path").unwrap_or_default();
        match send(&method, &upload_path, headers, batch.body) {
            Ok(response) => outcome(&response),
            Err(error) => retry(describe(&error), None),
        }
    }

    fn probe() -> Result<(), String> {
        let path = setting("probe_path").unwrap_or_default();
        send("GET", &path, headers()?, Vec::new())
            .map(drop)
            .map_err(|e| describe(&e))
    }

    fn heartbeat(status: SiteStatus) -> Result<(), String> {
        let Some(path) = setting("heartbeat_path") else {
            return Ok(());
        };
        let body = serde_json::json!({
            "site_id": status.site_id,
            "queued": status.queued,
            "last_success_ms": status.last_success_ms,
            "daemon_version": status.daemon_version,
        });
        let mut headers = headers()?;
        headers.push(("content-type".into(), "application/json".into()));
        let response = send("POST", &path, headers, body.to_string().into_bytes())
            .map_err(|e| describe(&e))?;
        match response.status {
            200..=299 => Ok(()),
            status => Err(format!("heartbeat answered HTTP {status}")),
        }
    }

    fn fetch_config() -> Result<Option<RemoteConfig>, String> {
        let Some(path) = setting("config_path") else {
            return Ok(None);
        };
        let response = send("GET", &path, headers()?, Vec::new()).map_err(|e| describe(&e))?;
        match response.status {
            200 => {
                let body = String::from_utf8(response.body)
                    .map_err(|_| "the configuration is not UTF-8 text".to_owned())?;
                let version = header(&response.headers, "etag")
                    .or_else(|| header(&response.headers, "last-modified"))
                    .unwrap_or_default()
                    .to_owned();
                Ok(Some(RemoteConfig { version, body }))
            }
            404 => Ok(None),
            status => Err(format!("configuration request answered HTTP {status}")),
        }
    }
}

export!(HttpPost);

/// A setting; an empty value counts as given.
fn setting(key: &str) -> Option<String> {
    settings::get(key)
}

/// The headers of every request: the `headers` table, then the API key's.
fn headers() -> Result<Vec<(String, String)>, String> {
    let mut headers = Vec::new();
    if let Some(text) = setting("headers") {
        let table: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|_| format!("setting headers = {text}: expected a table of strings"))?;
        for (name, value) in table {
            let value = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            headers.push((name, value));
        }
    }
    if let Some(key) = settings::secret("api-key") {
        let name = setting("auth_header").unwrap_or_else(|| "authorization".into());
        let scheme = setting("auth_scheme").unwrap_or_else(|| "Bearer".into());
        let value = if scheme.is_empty() {
            key
        } else {
            format!("{scheme} {key}")
        };
        headers.push((name, value));
    }
    Ok(headers)
}

fn send(
    method: &str,
    url: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<Response, HttpError> {
    http::send(&Request {
        method: method.into(),
        url: url.into(),
        headers,
        body,
    })
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn retry(reason: String, delay_ms: Option<u64>) -> UploadOutcome {
    UploadOutcome::RetryLater(RetryInfo { reason, delay_ms })
}

/// What the answer to an upload means for the batch.
fn outcome(response: &Response) -> UploadOutcome {
    let excerpt = String::from_utf8_lossy(&response.body[..response.body.len().min(200)]);
    let reason = format!("HTTP {}: {}", response.status, excerpt.trim());
    match response.status {
        200..=299 => UploadOutcome::Accepted,
        401 | 403 => UploadOutcome::Unauthorized(reason),
        408 | 429 | 500..=599 => {
            let delay_ms = header(&response.headers, "retry-after")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|seconds| seconds.saturating_mul(1000));
            retry(reason, delay_ms)
        }
        _ => {
            log::write(Level::Warn, &format!("upload rejected: {reason}"));
            UploadOutcome::Rejected(reason)
        }
    }
}

fn describe(error: &HttpError) -> String {
    match error {
        HttpError::NotAllowed(why) => format!("not allowed: {why}"),
        HttpError::Connect(why) => format!("connection failed: {why}"),
        HttpError::Timeout => "timed out".into(),
        HttpError::TooLarge => "the answer is too large".into(),
        HttpError::Other(why) => why.clone(),
    }
}
