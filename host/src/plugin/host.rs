//! The host side of the plugin imports: `http`, `log` and `settings`, and the store
//! data every plugin instance runs with.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Url;
use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{http, log, settings, types, v2};
use crate::config::Secret;

/// Largest response body handed to a plugin.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Longest log line a plugin may write; the rest is cut.
const MAX_LOG_LINE: usize = 4096;

/// What the plugins of one Client System may know and reach.
#[derive(Debug)]
pub struct PluginContext {
    /// The site's id.
    pub site_id: String,
    /// The Client System's name.
    pub client_system: String,
    /// Every request must be under this URL (always ends with '/').
    pub base_url: Url,
    /// The `[plugin]` table, as `settings.get` serves it.
    pub settings: BTreeMap<String, String>,
    /// The secret "api-key".
    pub api_key: Option<Secret>,
    /// The HTTP client requests go through.
    pub http: reqwest::Client,
    /// Deadline of one request, in ms (a remote configuration may change it).
    request_timeout_ms: AtomicU64,
    /// Whether each call's requests are listed in its [`HttpTally`] (for
    /// `syncd plugin test`; the daemon only counts them).
    list_requests: bool,
}

impl PluginContext {
    /// A context for `client_system`, whose plugins may only reach `base_url`.
    pub fn new(
        site_id: &str,
        client_system: &str,
        base_url: &str,
        settings: BTreeMap<String, String>,
        api_key: Option<Secret>,
        request_timeout: Duration,
        http: reqwest::Client,
    ) -> anyhow::Result<Self> {
        let mut base = Url::parse(base_url)
            .map_err(|e| anyhow::anyhow!("invalid base_url \"{base_url}\": {e}"))?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.set_query(None);
        base.set_fragment(None);
        Ok(Self {
            site_id: site_id.to_owned(),
            client_system: client_system.to_owned(),
            base_url: base,
            settings,
            api_key,
            http,
            request_timeout_ms: AtomicU64::new(request_timeout.as_millis() as u64),
            list_requests: false,
        })
    }

    /// Lists every request of a call, with its answer, and what the plugin printed, in
    /// the call's [`HttpTally`].
    pub fn listing_requests(mut self) -> Self {
        self.list_requests = true;
        self
    }

    /// Whether calls list their requests and prints.
    pub fn lists_requests(&self) -> bool {
        self.list_requests
    }

    /// Deadline of one request.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed))
    }

    /// Changes the deadline of the requests made from now on.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.request_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves a plugin's request URL, refusing anything outside `base_url`.
    pub fn resolve_url(&self, target: &str) -> Result<Url, String> {
        let url = if target.starts_with("http://") || target.starts_with("https://") {
            Url::parse(target)
        } else {
            self.base_url.join(target.trim_start_matches('/'))
        }
        .map_err(|e| format!("\"{}\": {e}", crate::clip(target)))?;
        let base = self.base_url.as_str();
        let inside = url.as_str().starts_with(base)
            || url.as_str() == base.trim_end_matches('/')
            || url
                .as_str()
                .strip_prefix(base.trim_end_matches('/'))
                .is_some_and(|r| r.starts_with('?'));
        if inside {
            Ok(url)
        } else {
            Err(format!(
                "{} is outside the client system's base_url {base}",
                crate::clip(url.as_str())
            ))
        }
    }
}

/// What the requests of one plugin call came to: the host's own evidence of whether
/// the Client System was reachable, whatever the plugin concludes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpTally {
    /// Requests that got a response (any status).
    pub responses: u32,
    /// Requests that got none: connection failures and timeouts.
    pub unreachable: u32,
    /// The last of those failures, described.
    pub last_failure: Option<String>,
    /// Each request and what it got, e.g. "POST http://…/api/auth → 200 (3 ms)", when
    /// the context lists requests.
    pub requests: Vec<String>,
    /// What the plugin printed during the call, e.g. "stdout: …", when the context
    /// lists requests (the daemon logs it instead).
    pub printed: Vec<String>,
}

impl HttpTally {
    /// True when the call made requests and none of them got a response.
    pub fn unreachable(&self) -> bool {
        self.responses == 0 && self.unreachable > 0
    }
}

/// Most bytes a plugin may print (WASI stdout or stderr) during one call; the rest is
/// dropped, and the log says so.
pub const MAX_PRINTED_BYTES: usize = 16 * 1024;

/// A plugin's WASI stdout or stderr: kept for the host to log after each call
/// (components from other toolchains print, e.g. JavaScript's `console.log`), bounded,
/// and never an error for the plugin, which may print as much as it likes.
#[derive(Clone, Default)]
pub struct Printed {
    bytes: Arc<std::sync::Mutex<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
}

impl Printed {
    /// The lines printed since the last call, and how many bytes were dropped.
    pub fn take(&self) -> (Vec<String>, u64) {
        let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()));
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        let text = String::from_utf8_lossy(&bytes);
        let lines = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| crate::clip(l).into_owned())
            .collect();
        (lines, dropped)
    }
}

impl tokio::io::AsyncWrite for Printed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let room = MAX_PRINTED_BYTES.saturating_sub(bytes.len()).min(buf.len());
        bytes.extend_from_slice(&buf[..room]);
        self.dropped
            .fetch_add((buf.len() - room) as u64, Ordering::Relaxed);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for Printed {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for Printed {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// The data of one plugin instance's store.
pub struct PluginState {
    pub(super) context: Arc<PluginContext>,
    /// The plugin's name, for log lines.
    pub(super) plugin: String,
    pub(super) limits: StoreLimits,
    /// The requests of the current call.
    pub(super) tally: HttpTally,
    /// What the plugin printed on WASI's stdout and stderr.
    pub(super) stdout: Printed,
    pub(super) stderr: Printed,
    /// WASI with nothing granted: no files, no sockets, no environment.
    wasi: WasiCtx,
    table: ResourceTable,
}

impl PluginState {
    pub(super) fn new(context: Arc<PluginContext>, plugin: String, limits: StoreLimits) -> Self {
        let (stdout, stderr) = (Printed::default(), Printed::default());
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build();
        Self {
            context,
            plugin,
            limits,
            tally: HttpTally::default(),
            stdout,
            stderr,
            wasi,
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for PluginState {}

impl http::Host for PluginState {
    async fn send(&mut self, req: http::Request) -> Result<http::Response, http::HttpError> {
        let context = Arc::clone(&self.context);
        let listed = context.list_requests.then(|| {
            let url = context
                .resolve_url(&req.url)
                .map_or_else(|_| req.url.clone(), String::from);
            (format!("{} {url}", req.method), std::time::Instant::now())
        });
        let result = send(&context, req).await;
        if let Some((request, started)) = listed {
            let answer = match &result {
                Ok(response) => format!("{}", response.status),
                Err(error) => format!("{error:?}"),
            };
            let ms = started.elapsed().as_secs_f64() * 1e3;
            self.tally
                .requests
                .push(format!("{request} → {answer} ({ms:.1} ms)"));
        }
        match &result {
            Ok(_) => self.tally.responses += 1,
            Err(http::HttpError::Connect(m)) => {
                self.tally.unreachable += 1;
                self.tally.last_failure = Some(format!("connection failed: {m}"));
            }
            Err(http::HttpError::Timeout) => {
                self.tally.unreachable += 1;
                self.tally.last_failure = Some("request timed out".to_owned());
            }
            Err(_) => {}
        }
        if let Err(error) = &result {
            tracing::debug!(
                client_system = %context.client_system,
                plugin = %self.plugin,
                ?error,
                "plugin request failed"
            );
        }
        result
    }
}

async fn send(
    context: &PluginContext,
    req: http::Request,
) -> Result<http::Response, http::HttpError> {
    use http::HttpError;

    let url = context
        .resolve_url(&req.url)
        .map_err(HttpError::NotAllowed)?;
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| HttpError::Other(format!("invalid method \"{}\"", req.method)))?;
    let mut builder = context
        .http
        .request(method, url)
        .timeout(context.request_timeout())
        .body(req.body);
    for (name, value) in req.headers {
        builder = builder.header(name, value);
    }
    let mut response = builder.send().await.map_err(classify)?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(http::Response {
        status,
        headers,
        body,
    })
}

fn classify(error: reqwest::Error) -> http::HttpError {
    if error.is_timeout() {
        http::HttpError::Timeout
    } else if error.is_connect() || error.is_request() || error.is_body() {
        // Refused, reset, or closed before the answer was complete: the link or the
        // Client System failed, not the request. (A request the host could not even
        // build is `is_builder`, and stays `other`.)
        http::HttpError::Connect(error_chain(&error))
    } else {
        http::HttpError::Other(error_chain(&error))
    }
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl log::Host for PluginState {
    fn write(&mut self, level: log::Level, message: String) {
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let cs = &self.context.client_system;
        let plugin = &self.plugin;
        match level {
            log::Level::Trace => tracing::trace!(client_system = %cs, %plugin, "{message}"),
            log::Level::Debug => tracing::debug!(client_system = %cs, %plugin, "{message}"),
            log::Level::Info => tracing::info!(client_system = %cs, %plugin, "{message}"),
            log::Level::Warn => tracing::warn!(client_system = %cs, %plugin, "{message}"),
            log::Level::Error => tracing::error!(client_system = %cs, %plugin, "{message}"),
        }
    }
}

impl settings::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.context.settings.get(&key).cloned()
    }

    fn all(&mut self) -> Vec<(String, String)> {
        self.context
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn secret(&mut self, name: String) -> Option<String> {
        match name.as_str() {
            "api-key" => self.context.api_key.as_ref().map(|k| k.expose().to_owned()),
            _ => None,
        }
    }

    fn site_id(&mut self) -> String {
        self.context.site_id.clone()
    }

    fn client_system(&mut self) -> String {
        self.context.client_system.clone()
    }
}

// The imports of `sync:plugin@0.2.0` are those of 0.1.0 under a new name.

impl v2::types::Host for PluginState {}

impl v2::log::Host for PluginState {
    fn write(&mut self, level: v2::log::Level, message: String) {
        let level = match level {
            v2::log::Level::Trace => log::Level::Trace,
            v2::log::Level::Debug => log::Level::Debug,
            v2::log::Level::Info => log::Level::Info,
            v2::log::Level::Warn => log::Level::Warn,
            v2::log::Level::Error => log::Level::Error,
        };
        log::Host::write(self, level, message);
    }
}

impl v2::settings::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        settings::Host::get(self, key)
    }

    fn all(&mut self) -> Vec<(String, String)> {
        settings::Host::all(self)
    }

    fn secret(&mut self, name: String) -> Option<String> {
        settings::Host::secret(self, name)
    }

    fn site_id(&mut self) -> String {
        settings::Host::site_id(self)
    }

    fn client_system(&mut self) -> String {
        settings::Host::client_system(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(base: &str) -> PluginContext {
        PluginContext::new(
            "site",
            "cs",
            base,
            BTreeMap::new(),
            None,
            Duration::from_secs(1),
            crate::daemon::http_client().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn urls_are_confined_to_base_url() {
        let c = context("http://127.0.0.1:8080/api");
        for ok in [
            "readings/batch",
            "/readings/batch",
            "readings/batch?x=1",
            "http://127.0.0.1:8080/api/health",
            "http://127.0.0.1:8080/api",
        ] {
            let url = c.resolve_url(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(
                url.as_str().starts_with("http://127.0.0.1:8080/api"),
                "{url}"
            );
        }
        for bad in [
            "../admin",
            "/../../etc",
            "http://127.0.0.1:8080/apix",
            "http://127.0.0.1:8080/other",
            "http://127.0.0.2:8080/api/x",
            "https://127.0.0.1:8080/api/x",
            "http://user@127.0.0.1:8080/api/x",
        ] {
            assert!(c.resolve_url(bad).is_err(), "{bad} was allowed");
        }
    }

    #[tokio::test]
    async fn prints_are_kept_by_line_and_bounded_without_failing_the_plugin() {
        use tokio::io::AsyncWriteExt;
        let printed = Printed::default();
        let mut stream =
            std::pin::Pin::from(wasmtime_wasi::cli::StdoutStream::async_stream(&printed));
        stream.write_all(b"first line\n\nsecond").await.unwrap();
        assert_eq!(
            printed.take(),
            (vec!["first line".into(), "second".into()], 0)
        );
        assert_eq!(printed.take(), (Vec::<String>::new(), 0), "taken once");

        let flood = vec![b'x'; MAX_PRINTED_BYTES + 100];
        stream.write_all(&flood).await.unwrap();
        let (lines, dropped) = printed.take();
        assert_eq!(dropped, 100);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].len() <= MAX_PRINTED_BYTES);
    }
}
