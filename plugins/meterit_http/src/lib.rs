//! syncd transport plugin for the MeterIt Client System API.
//!
//! - `POST auth` with `{"api_key": …}` returns `{"token": …}`; the token is kept in this
//!   instance and sent as `Authorization: Bearer …`.
//! - `POST readings/batch` with the encoded batch and `Idempotency-Key: <batch id>`.
//! - `GET config`, `POST heartbeat`, `GET health`.
//!
//! Responses map to outcomes: 2xx accepted; 401 unauthorized; 408, 429 and 5xx retry
//! later (honouring `Retry-After` in seconds); any other status rejected. A request that
//! got no response at all (connection refused, timeout) is retried later.
//!
//! Settings (`[client_system.plugin]`): none required. `auth_path`, `upload_path`,
//! `config_path`, `heartbeat_path` and `health_path` override the default paths.

use std::cell::RefCell;

wit_bindgen::generate!({
    world: "transport",
    path: "../../wit",
});

use sync::plugin::http::{self, HttpError, Request, Response};
use sync::plugin::log::{self, Level};
use sync::plugin::settings;

thread_local! {
    /// The bearer token obtained by `authenticate`, kept for later calls.
    static TOKEN: RefCell<Option<String>> = const { RefCell::new(None) };
}

struct MeterItHttp;

impl Guest for MeterItHttp {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "meterit-http".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    fn authenticate() -> Result<(), String> {
        TOKEN.with(|t| t.borrow_mut().take());
        let api_key =
            settings::secret("api-key").ok_or("no api_key is configured for this client system")?;
        let body = serde_json::to_vec(&serde_json::json!({ "api_key": api_key }))
            .map_err(|e| e.to_string())?;
        let response = send("POST", &path("auth_path", "auth"), json_headers(None), body)
            .map_err(|e| format!("authentication request failed: {}", describe_error(&e)))?;
        if response.status != 200 {
            return Err(format!(
                "authentication refused: HTTP {}: {}",
                response.status,
                excerpt(&response.body)
            ));
        }
        let parsed: serde_json::Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("authentication answer is not JSON: {e}"))?;
        let token = parsed
            .get("token")
            .and_then(|t| t.as_str())
            .ok_or("authentication answer has no \"token\"")?;
        TOKEN.with(|t| *t.borrow_mut() = Some(token.to_owned()));
        log::write(Level::Debug, "authenticated");
        Ok(())
    }

    fn upload(info: BatchInfo, batch: EncodedBatch) -> UploadOutcome {
        let token = match current_token() {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let mut headers = vec![
            ("content-type".to_owned(), batch.content_type),
            ("idempotency-key".to_owned(), info.batch_id),
        ];
        headers.push(("authorization".to_owned(), format!("Bearer {token}")));
        match send(
            "POST",
            &path("upload_path", "readings/batch"),
            headers,
            batch.body,
        ) {
            Ok(response) => outcome_of(&response),
            Err(error) => UploadOutcome::RetryLater(RetryInfo {
                delay_ms: None,
                reason: describe_error(&error),
            }),
        }
    }

    fn probe() -> Result<(), String> {
        let response = send(
            "GET",
            &path("health_path", "health"),
            Vec::new(),
            Vec::new(),
        )
        .map_err(|e| describe_error(&e))?;
        if (200..300).contains(&response.status) {
            Ok(())
        } else {
            Err(format!("health check answered HTTP {}", response.status))
        }
    }

    fn heartbeat(status: SiteStatus) -> Result<(), String> {
        let token = current_token().map_err(|_| "not authenticated".to_owned())?;
        let body = serde_json::to_vec(&serde_json::json!({
            "site_id": status.site_id,
            "queued": status.queued,
            "last_success_ms": status.last_success_ms,
            "daemon_version": status.daemon_version,
        }))
        .map_err(|e| e.to_string())?;
        let response = send(
            "POST",
            &path("heartbeat_path", "heartbeat"),
            json_headers(Some(&token)),
            body,
        )
        .map_err(|e| describe_error(&e))?;
        check_ok(&response)
    }

    fn fetch_config() -> Result<Option<RemoteConfig>, String> {
        let token = current_token().map_err(|_| "not authenticated".to_owned())?;
        let response = send(
            "GET",
            &path("config_path", "config"),
            json_headers(Some(&token)),
            Vec::new(),
        )
        .map_err(|e| describe_error(&e))?;
        if response.status == 404 {
            return Ok(None);
        }
        check_ok(&response)?;
        let parsed: serde_json::Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("configuration is not JSON: {e}"))?;
        let version = match parsed.get("version") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let body = parsed
            .get("config")
            .map(|c| c.to_string())
            .ok_or("configuration answer has no \"config\" object")?;
        Ok(Some(RemoteConfig { version, body }))
    }
}

export!(MeterItHttp);

/// The token in hand, authenticating first when there is none.
fn current_token() -> Result<String, UploadOutcome> {
    if let Some(token) = TOKEN.with(|t| t.borrow().clone()) {
        return Ok(token);
    }
    match MeterItHttp::authenticate() {
        Ok(()) => TOKEN
            .with(|t| t.borrow().clone())
            .ok_or_else(|| UploadOutcome::Unauthorized("no token after authentication".into())),
        // Without a response there is nothing to conclude about the credentials.
        Err(reason) if reason.starts_with("authentication request failed") => {
            Err(UploadOutcome::RetryLater(RetryInfo {
                delay_ms: None,
                reason,
            }))
        }
        Err(reason) => Err(UploadOutcome::Unauthorized(reason)),
    }
}

/// Maps an upload's HTTP response to an outcome.
fn outcome_of(response: &Response) -> UploadOutcome {
    match response.status {
        200..=299 => UploadOutcome::Accepted,
        401 | 403 => {
            TOKEN.with(|t| t.borrow_mut().take());
            UploadOutcome::Unauthorized(format!("HTTP {}", response.status))
        }
        408 | 429 | 500..=599 => UploadOutcome::RetryLater(RetryInfo {
            delay_ms: retry_after_ms(response),
            reason: format!("HTTP {}: {}", response.status, excerpt(&response.body)),
        }),
        status => UploadOutcome::Rejected(format!("HTTP {status}: {}", excerpt(&response.body))),
    }
}

/// `Retry-After` given in seconds, as milliseconds. (An HTTP date is ignored: a plugin
/// has no clock; the host's backoff applies instead.)
fn retry_after_ms(response: &Response) -> Option<u64> {
    response
        .headers
        .iter()
        .find(|(name, _)| name == "retry-after")
        .and_then(|(_, value)| value.trim().parse::<u64>().ok())
        .map(|seconds| seconds.saturating_mul(1000))
}

fn check_ok(response: &Response) -> Result<(), String> {
    if (200..300).contains(&response.status) {
        Ok(())
    } else {
        if response.status == 401 {
            TOKEN.with(|t| t.borrow_mut().take());
        }
        Err(format!(
            "HTTP {}: {}",
            response.status,
            excerpt(&response.body)
        ))
    }
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

fn json_headers(token: Option<&str>) -> Vec<(String, String)> {
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Some(token) = token {
        headers.push(("authorization".to_owned(), format!("Bearer {token}")));
    }
    headers
}

/// A path from the settings, or the default.
fn path(setting: &str, default: &str) -> String {
    settings::get(setting).unwrap_or_else(|| default.to_owned())
}

fn describe_error(error: &HttpError) -> String {
    match error {
        HttpError::NotAllowed(m) => format!("request not allowed: {m}"),
        HttpError::Connect(m) => format!("connection failed: {m}"),
        HttpError::Timeout => "request timed out".to_owned(),
        HttpError::TooLarge => "response too large".to_owned(),
        HttpError::Other(m) => m.clone(),
    }
}

/// The start of a response body, for error messages.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    text.trim().to_owned()
}
