//! `sync.toml`: the schema, `${ENV}` interpolation, path resolution and validation.
//!
//! A configuration is parsed, interpolated and validated as a whole before anything
//! is built from it; any error names the file, and where the parser knows it, the line
//! and key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration error, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or does not match the schema.
    #[error("{path}: {}", crate::clip(.message))]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// A value is present but wrong.
    #[error("{path}: {}: {}", crate::clip(.key), crate::clip(.message))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, as a dotted path, e.g. `client_system[0].base_url`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The largest configuration file read: a real one is a few kilobytes.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// The longest source line a parse error quotes; past it, only the position is given.
const MAX_QUOTED_LINE: usize = 200;

/// The line and column (1-based, in characters) just after `before`.
fn position(before: &[u8]) -> (usize, usize) {
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = 1 + String::from_utf8_lossy(&before[start..]).chars().count();
    (line, column)
}

/// The TOML parser's message, quoting the offending line unless it is too long to.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    // Control characters of the quoted line would go to the log as they are.
    let shown: String = e
        .to_string()
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect();
    if shown.lines().all(|l| l.len() <= MAX_QUOTED_LINE + 20) {
        return shown.trim_end().replace('\n', "\n  ");
    }
    match e.span() {
        Some(span) => {
            let (line, column) = position(&text.as_bytes()[..span.start.min(text.len())]);
            format!(
                "TOML parse error at line {line}, column {column}: {}",
                e.message().trim_end()
            )
        }
        None => e.message().trim_end().to_owned(),
    }
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The whole of `sync.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The site this daemon runs at.
    pub site: Site,
    /// Where the queue is kept.
    #[serde(default)]
    pub database: Database,
    /// The local HTTP API.
    #[serde(default)]
    pub api: Api,
    /// How plugins are loaded.
    #[serde(default)]
    pub plugins: Plugins,
    /// Settings every Client System inherits unless it sets its own.
    #[serde(default)]
    pub defaults: Policy,
    /// The Client Systems readings are delivered to.
    #[serde(default, rename = "client_system")]
    pub client_systems: Vec<ClientSystem>,
    /// The folder relative paths in this file are resolved against.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this configuration came from.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[site]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The site's id, sent with every batch and heartbeat.
    pub id: String,
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// `sqlite://path/to/file.db` (relative to the config file's folder) or
    /// `postgres://…`.
    #[serde(default = "default_database_url")]
    pub url: String,
    /// How hard a commit is pushed to disk.
    #[serde(default)]
    pub durability: Durability,
    /// The most readings the queue may hold; past it, ingest is refused (HTTP 507)
    /// until deliveries make room. Unbounded when absent.
    pub max_queue_readings: Option<u64>,
    /// How long a batch stays with the process that took it (renewed while that
    /// process works on it): when a process sharing a PostgreSQL queue dies, another
    /// takes its batches over after this long.
    #[serde(default = "default_batch_lease", with = "humantime_serde")]
    pub batch_lease: Duration,
    /// This process's name among those sharing the queue; by default
    /// `<host name>:<API port>`, which stays the same across restarts (so a restarted
    /// process takes its own batches back at once).
    pub process_name: Option<String>,
    /// How long `sync_log` keeps a delivery attempt: older ones are deleted at start and
    /// every hour, so that the log does not fill the disk of a site that runs for years.
    #[serde(default = "default_sync_log_keep", with = "humantime_serde")]
    pub sync_log_keep: Duration,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            durability: Durability::default(),
            max_queue_readings: None,
            batch_lease: default_batch_lease(),
            process_name: None,
            sync_log_keep: default_sync_log_keep(),
        }
    }
}

fn default_sync_log_keep() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

fn default_batch_lease() -> Duration {
    crate::queue::DEFAULT_BATCH_LEASE
}

fn default_database_url() -> String {
    "sqlite://data/syncd.db".to_owned()
}

/// What a committed reading survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// SQLite WAL with `synchronous=NORMAL`: a committed reading survives a crash of
    /// the process; a power cut may lose the last moments.
    #[default]
    Normal,
    /// Every commit is fsynced: a committed reading also survives a power cut.
    Full,
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// The address the local HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A bearer token every request but `GET /healthz` must carry. Use
    /// `${VARIABLE}` rather than writing it here.
    pub token: Option<Secret>,
    /// Serve a non-loopback `listen` address without a token: anyone who can reach it
    /// may then queue readings and read status. Off by default.
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            allow_unauthenticated: false,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7878))
}

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugins {
    /// Where compiled plugins are kept so that a restart or a re-deploy of a known
    /// version does not compile again (relative to the config file's folder); empty
    /// to compile at every load.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

impl Default for Plugins {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
        }
    }
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("data/plugin-cache")
}

/// Scheduling, batching and retry settings (`[defaults]`, or per Client System).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// How often the queue is checked for readings to send (default 5m). A full batch
    /// is sent at once without waiting for the next check.
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Readings per batch at most (default 1000).
    pub batch_size: Option<u32>,
    /// Retries of a batch after its first attempt (default 5) before it goes to dead
    /// letters.
    pub max_retries: Option<u32>,
    /// The delay between retries.
    pub backoff: Option<BackoffConfig>,
    /// Deadline of one request to the Client System (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// How often connectivity is probed (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub connectivity_check: Option<Duration>,
    /// How often a heartbeat is sent (default 5m).
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// How often the Client System's remote configuration is downloaded (default 15m).
    #[serde(default, with = "humantime_serde")]
    pub config_refresh: Option<Duration>,
}

impl Policy {
    /// This policy with every setting `over` has replaced by `over`'s.
    pub fn overlaid_with(&self, over: &Policy) -> Policy {
        Policy {
            interval: over.interval.or(self.interval),
            batch_size: over.batch_size.or(self.batch_size),
            max_retries: over.max_retries.or(self.max_retries),
            backoff: over.backoff.clone().or_else(|| self.backoff.clone()),
            request_timeout: over.request_timeout.or(self.request_timeout),
            connectivity_check: over.connectivity_check.or(self.connectivity_check),
            heartbeat: over.heartbeat.or(self.heartbeat),
            config_refresh: over.config_refresh.or(self.config_refresh),
        }
    }

    /// The names of the settings this policy sets, in schema order.
    pub fn keys(&self) -> Vec<&'static str> {
        [
            ("interval", self.interval.is_some()),
            ("batch_size", self.batch_size.is_some()),
            ("max_retries", self.max_retries.is_some()),
            ("backoff", self.backoff.is_some()),
            ("request_timeout", self.request_timeout.is_some()),
            ("connectivity_check", self.connectivity_check.is_some()),
            ("heartbeat", self.heartbeat.is_some()),
            ("config_refresh", self.config_refresh.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// Every setting, built-in defaults filling what this policy leaves unset.
    pub fn effective(&self) -> EffectivePolicy {
        EffectivePolicy {
            interval: self.interval.unwrap_or(Duration::from_secs(300)),
            batch_size: self.batch_size.unwrap_or(1000),
            max_retries: self.max_retries.unwrap_or(5),
            backoff: self.backoff.clone().unwrap_or_default(),
            request_timeout: self.request_timeout.unwrap_or(Duration::from_secs(30)),
            connectivity_check: self.connectivity_check.unwrap_or(Duration::from_secs(60)),
            heartbeat: self.heartbeat.unwrap_or(Duration::from_secs(300)),
            config_refresh: self.config_refresh.unwrap_or(Duration::from_secs(900)),
        }
    }

    /// Reads the settings a Client System sends as its remote configuration: a JSON
    /// object with any of the keys of `[defaults]`, written as in `sync.toml`
    /// (durations as text such as `"90s"`). Unknown keys and bad values are errors
    /// that name the key.
    pub fn from_remote_json(body: &str) -> std::result::Result<Policy, String> {
        let json = &mut serde_json::Deserializer::from_str(body);
        let policy: Policy = serde_path_to_error::deserialize(json).map_err(|e| {
            let key = e.path().to_string();
            let message = if key == "." {
                e.inner().to_string()
            } else {
                format!("{key}: {}", e.inner())
            };
            crate::clip(&message).into_owned()
        })?;
        check_policy(&policy)
            .map_err(|(key, message)| format!("{key}: {}", crate::clip(&message)))?;
        Ok(policy)
    }
}

/// Exponential backoff: `initial * multiplier^(retry-1)`, at most `max`, each delay
/// moved at random by up to `jitter` (a fraction) either way.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first delay (default 2s).
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub initial: Duration,
    /// The longest delay (default 32s).
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub max: Duration,
    /// Growth per retry (default 2.0).
    #[serde(default = "default_backoff_multiplier")]
    pub multiplier: f64,
    /// Random spread, a fraction from 0 to 1 (default 0.2).
    #[serde(default = "default_backoff_jitter")]
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
            jitter: default_backoff_jitter(),
        }
    }
}

fn default_backoff_initial() -> Duration {
    Duration::from_secs(2)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(32)
}
fn default_backoff_multiplier() -> f64 {
    2.0
}
fn default_backoff_jitter() -> f64 {
    0.2
}

/// A secret, such as an API key: its `Debug` output is `<redacted>`, so it cannot
/// reach a log through a struct that holds it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[[client_system]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSystem {
    /// A unique name, used in logs, status and the queue's progress records.
    pub name: String,
    /// Every request of its plugins must be under this URL.
    pub base_url: String,
    /// The API key, handed to the transport as the secret "api-key". Use
    /// `${VARIABLE}`, or set `SYNCD_<NAME>_API_KEY`, rather than writing it here.
    pub api_key: Option<Secret>,
    /// The encoder component (relative to the config file's folder).
    pub encoder: PathBuf,
    /// The transport component (relative to the config file's folder).
    pub transport: PathBuf,
    /// Free-form settings handed to both plugins.
    #[serde(default)]
    pub plugin: toml::Table,
    /// Overrides of `[defaults]`.
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Overrides `[defaults] batch_size`.
    pub batch_size: Option<u32>,
    /// Overrides `[defaults] max_retries`.
    pub max_retries: Option<u32>,
    /// Overrides `[defaults] backoff`.
    pub backoff: Option<BackoffConfig>,
    /// Overrides `[defaults] request_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Overrides `[defaults] connectivity_check`.
    #[serde(default, with = "humantime_serde")]
    pub connectivity_check: Option<Duration>,
    /// Overrides `[defaults] heartbeat`.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// Overrides `[defaults] config_refresh`.
    #[serde(default, with = "humantime_serde")]
    pub config_refresh: Option<Duration>,
    /// Whether the settings the Client System sends as its remote configuration are
    /// applied (default true). They take precedence over this file's.
    #[serde(default = "default_true")]
    pub remote_config: bool,
}

fn default_true() -> bool {
    true
}

/// The settings in force for one Client System: its own, else `[defaults]`, else
/// the built-in defaults. Serialized as in `sync.toml` (durations as text).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EffectivePolicy {
    /// See [`Policy::interval`].
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// See [`Policy::batch_size`].
    pub batch_size: u32,
    /// See [`Policy::max_retries`].
    pub max_retries: u32,
    /// See [`Policy::backoff`].
    pub backoff: BackoffConfig,
    /// See [`Policy::request_timeout`].
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// See [`Policy::connectivity_check`].
    #[serde(with = "humantime_serde")]
    pub connectivity_check: Duration,
    /// See [`Policy::heartbeat`].
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// See [`Policy::config_refresh`].
    #[serde(with = "humantime_serde")]
    pub config_refresh: Duration,
}

impl ClientSystem {
    /// The settings this Client System's own table sets.
    pub fn own_policy(&self) -> Policy {
        Policy {
            interval: self.interval,
            batch_size: self.batch_size,
            max_retries: self.max_retries,
            backoff: self.backoff.clone(),
            request_timeout: self.request_timeout,
            connectivity_check: self.connectivity_check,
            heartbeat: self.heartbeat,
            config_refresh: self.config_refresh,
        }
    }

    /// The settings from the file for this Client System: its own, else
    /// `[defaults]`'s.
    pub fn local_policy(&self, defaults: &Policy) -> Policy {
        defaults.overlaid_with(&self.own_policy())
    }

    /// The settings in force for this Client System before any remote configuration:
    /// its own, else `[defaults]`, else the built-in defaults.
    pub fn policy(&self, defaults: &Policy) -> EffectivePolicy {
        self.local_policy(defaults).effective()
    }

    /// The `[plugin]` table as the `settings` host import serves it: strings as they
    /// are, anything else as JSON text.
    pub fn plugin_settings(&self) -> BTreeMap<String, String> {
        self.plugin
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => serde_json::to_string(other).unwrap_or_else(|_| other.to_string()),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

/// Upper bound of `batch_size`: a batch is one request and one transaction.
pub const MAX_BATCH_SIZE: u32 = 100_000;

impl Config {
    /// Reads, parses, interpolates and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes, path, &|name| std::env::var(name).ok())
    }

    /// Parses a configuration file's bytes: at most [`MAX_CONFIG_BYTES`], UTF-8 (the
    /// error says so, and where, when they are not), then as [`Config::parse`].
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let parse_error = |message: String| Error::Parse {
            path: path.to_owned(),
            message,
        };
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(parse_error(format!(
                "the file is {} bytes, larger than {MAX_CONFIG_BYTES}: is it the right file?",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
                return parse_error("the file is UTF-16 text: save it as UTF-8".to_owned());
            }
            let at = e.valid_up_to();
            let (line, column) = position(&bytes[..at]);
            parse_error(format!(
                "not UTF-8 text: byte 0x{:02x} at line {line}, column {column}; save the file as UTF-8",
                bytes[at]
            ))
        })?;
        Self::parse(text, path, env)
    }

    /// Parses a configuration's text. `path` names it in errors and gives the folder
    /// relative paths are resolved against; `env` looks up `${VARIABLE}`s.
    pub fn parse(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let mut config: Config = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        config.path = path.to_owned();
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.interpolate(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Replaces `${VARIABLE}` in every string value, and applies the
    /// `SYNCD_DATABASE_URL` and `SYNCD_<NAME>_API_KEY` overrides.
    fn interpolate(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        let path = self.path.clone();
        let sub = |key: &str, value: &mut String| -> Result<()> {
            *value = interpolate(value, env).map_err(|message| Error::Invalid {
                path: path.clone(),
                key: key.to_owned(),
                message,
            })?;
            Ok(())
        };
        sub("site.id", &mut self.site.id)?;
        if let Some(url) = env(DATABASE_URL_VARIABLE) {
            self.database.url = url;
        }
        sub("database.url", &mut self.database.url)?;
        if let Some(token) = &mut self.api.token {
            sub("api.token", &mut token.0)?;
        }
        for (i, cs) in self.client_systems.iter_mut().enumerate() {
            sub(&format!("client_system[{i}].name"), &mut cs.name)?;
            sub(&format!("client_system[{i}].base_url"), &mut cs.base_url)?;
            if let Some(key) = &mut cs.api_key {
                sub(&format!("client_system[{i}].api_key"), &mut key.0)?;
            }
            if let Some(key) = env(&api_key_variable(&cs.name)) {
                cs.api_key = Some(Secret(key));
            }
            for (field, p) in [
                ("encoder", &mut cs.encoder),
                ("transport", &mut cs.transport),
            ] {
                let mut s = p.to_string_lossy().into_owned();
                sub(&format!("client_system[{i}].{field}"), &mut s)?;
                *p = PathBuf::from(s);
            }
            for (k, v) in cs.plugin.iter_mut() {
                if let toml::Value::String(s) = v {
                    sub(&format!("client_system[{i}].plugin.{k}"), s)?;
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let invalid = |key: String, message: String| Error::Invalid {
            path: self.path.clone(),
            key,
            message,
        };
        if self.site.id.trim().is_empty() {
            return Err(invalid("site.id".into(), "must not be empty".into()));
        }
        match &self.api.token {
            Some(token) if token.expose().trim().is_empty() => {
                return Err(invalid("api.token".into(), "must not be empty".into()));
            }
            None if !self.api.listen.ip().is_loopback() && !self.api.allow_unauthenticated => {
                return Err(invalid(
                    "api.listen".into(),
                    format!(
                        "{} is reachable from other machines: set [api] token, or allow_unauthenticated = true to serve it without one",
                        self.api.listen
                    ),
                ));
            }
            _ => {}
        }
        if self.database.batch_lease < MIN_BATCH_LEASE {
            return Err(invalid(
                "database.batch_lease".into(),
                format!(
                    "{} is too short: at least {} (a lease is renewed every third of it)",
                    humantime::format_duration(self.database.batch_lease),
                    humantime::format_duration(MIN_BATCH_LEASE)
                ),
            ));
        }
        if self.database.sync_log_keep < MIN_SYNC_LOG_KEEP {
            return Err(invalid(
                "database.sync_log_keep".into(),
                format!(
                    "{} is too short: at least {} (`syncd stats` reads the log)",
                    humantime::format_duration(self.database.sync_log_keep),
                    humantime::format_duration(MIN_SYNC_LOG_KEEP)
                ),
            ));
        }
        if let Some(name) = &self.database.process_name
            && name.trim().is_empty()
        {
            return Err(invalid(
                "database.process_name".into(),
                "must not be empty".into(),
            ));
        }
        check_policy(&self.defaults).map_err(|(k, m)| invalid(format!("defaults.{k}"), m))?;
        let mut names = std::collections::HashSet::new();
        for (i, cs) in self.client_systems.iter().enumerate() {
            let key = |field: &str| format!("client_system[{i}].{field}");
            if cs.name.trim().is_empty() {
                return Err(invalid(key("name"), "must not be empty".into()));
            }
            if !names.insert(cs.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("\"{}\" is used by two client systems", cs.name),
                ));
            }
            let url = reqwest::Url::parse(&cs.base_url)
                .map_err(|e| invalid(key("base_url"), format!("\"{}\": {e}", cs.base_url)))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    key("base_url"),
                    format!("\"{}\": only http and https are supported", cs.base_url),
                ));
            }
            check_policy(&cs.own_policy()).map_err(|(k, m)| invalid(key(k), m))?;
        }
        Ok(())
    }

    /// The folder compiled plugins are kept in, if any.
    pub fn plugin_cache_dir(&self) -> Option<PathBuf> {
        let dir = &self.plugins.cache_dir;
        (!dir.as_os_str().is_empty()).then(|| self.resolve(dir))
    }

    /// This process's name among those sharing the queue: `database.process_name`, or
    /// `<host name>:<API port>`.
    pub fn process_name(&self) -> String {
        match &self.database.process_name {
            Some(name) => name.clone(),
            None => format!("{}:{}", crate::queue::host_name(), self.api.listen.port()),
        }
    }

    /// The names of the configured Client Systems, in order.
    pub fn client_system_names(&self) -> Vec<String> {
        self.client_systems.iter().map(|c| c.name.clone()).collect()
    }

    /// A Client System's encoder or transport path, resolved against the config
    /// file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// The shortest `database.sync_log_keep` accepted.
pub const MIN_SYNC_LOG_KEEP: Duration = Duration::from_secs(3600);

/// The shortest `database.batch_lease` accepted.
pub const MIN_BATCH_LEASE: Duration = Duration::from_secs(1);

/// The environment variable that overrides `[database] url`.
pub const DATABASE_URL_VARIABLE: &str = "SYNCD_DATABASE_URL";

/// The environment variable that overrides a Client System's `api_key`:
/// `SYNCD_<NAME>_API_KEY`, the name upper-cased with anything not alphanumeric as `_`.
pub fn api_key_variable(client_system: &str) -> String {
    let name: String = client_system
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("SYNCD_{name}_API_KEY")
}

fn check_policy(p: &Policy) -> std::result::Result<(), (&'static str, String)> {
    if let Some(size) = p.batch_size.filter(|&s| s == 0 || s > MAX_BATCH_SIZE) {
        return Err((
            "batch_size",
            format!("{size}: must be 1 to {MAX_BATCH_SIZE}"),
        ));
    }
    for (key, value) in [
        ("interval", p.interval),
        ("request_timeout", p.request_timeout),
        ("connectivity_check", p.connectivity_check),
        ("heartbeat", p.heartbeat),
        ("config_refresh", p.config_refresh),
    ] {
        if value.is_some_and(|d| d.is_zero()) {
            return Err((key, "must be longer than zero".into()));
        }
    }
    if let Some(b) = &p.backoff {
        if b.initial.is_zero() || b.max < b.initial {
            return Err((
                "backoff",
                "initial must be above zero and max at least initial".into(),
            ));
        }
        if !(b.multiplier >= 1.0 && b.multiplier.is_finite()) {
            return Err((
                "backoff.multiplier",
                format!("{}: must be 1 or more", b.multiplier),
            ));
        }
        if !(0.0..=1.0).contains(&b.jitter) {
            return Err((
                "backoff.jitter",
                format!("{}: must be from 0 to 1", b.jitter),
            ));
        }
    }
    Ok(())
}

/// Replaces each `${NAME}` with the variable's value; `$${` stands for a literal `${`.
fn interpolate(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    if !value.contains("${") {
        return Ok(value.to_owned());
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push_str(&rest[..at - 1]);
            out.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed \"${{\" in \"{value}\""))?;
        let name = &after[..end];
        if name.is_empty() {
            return Err("empty variable name in \"${}\"".into());
        }
        let resolved =
            env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[site]
id = "site-001"
[[client_system]]
name = "meterit"
base_url = "http://127.0.0.1:8080/api"
api_key = "${KEY}"
encoder = "e.wasm"
transport = "t.wasm"
"#;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "secret".to_owned())
    }

    #[test]
    fn interpolates_and_applies_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/etc/syncd/sync.toml"), &env).unwrap();
        let key = c.client_systems[0].api_key.as_ref().map(Secret::expose);
        assert_eq!(key, Some("secret"));
        assert!(
            !format!("{c:?}").contains("secret"),
            "the key shows in Debug output"
        );
        let p = c.client_systems[0].policy(&c.defaults);
        assert_eq!(p.batch_size, 1000);
        assert_eq!(p.max_retries, 5);
        assert_eq!(p.interval, Duration::from_secs(300));
        assert_eq!(
            c.resolve(&c.client_systems[0].encoder),
            PathBuf::from("/etc/syncd/e.wasm")
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = MINIMAL.replace("encoder =", "encodr = \"x\"\nencoder =");
        let err = Config::parse(&text, Path::new("sync.toml"), &env).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("encodr"), "{msg}");
        assert!(msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = Config::parse(MINIMAL, Path::new("sync.toml"), &|_| None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("client_system[0].api_key"), "{msg}");
        assert!(msg.contains("KEY is not set"), "{msg}");
    }

    #[test]
    fn per_client_system_override_wins() {
        let text = format!("[defaults]\nbatch_size = 10\n{MINIMAL}\nbatch_size = 7\n");
        let c = Config::parse(&text, Path::new("sync.toml"), &env).unwrap();
        assert_eq!(c.client_systems[0].policy(&c.defaults).batch_size, 7);
        let text = format!("[defaults]\nbatch_size = 10\n{MINIMAL}");
        let c = Config::parse(&text, Path::new("sync.toml"), &env).unwrap();
        assert_eq!(c.client_systems[0].policy(&c.defaults).batch_size, 10);
    }

    #[test]
    fn environment_overrides_api_key() {
        let env = |name: &str| match name {
            "KEY" => Some("from-file".to_owned()),
            "SYNCD_METERIT_API_KEY" => Some("from-env".to_owned()),
            _ => None,
        };
        let c = Config::parse(MINIMAL, Path::new("sync.toml"), &env).unwrap();
        let key = c.client_systems[0].api_key.as_ref().map(Secret::expose);
        assert_eq!(key, Some("from-env"));
    }

    #[test]
    fn environment_overrides_database_url() {
        let env = |name: &str| match name {
            "KEY" => Some("k".to_owned()),
            "SYNCD_DATABASE_URL" => Some("sqlite:///tmp/elsewhere.db".to_owned()),
            _ => None,
        };
        let c = Config::parse(MINIMAL, Path::new("sync.toml"), &env).unwrap();
        assert_eq!(c.database.url, "sqlite:///tmp/elsewhere.db");
    }

    #[test]
    fn the_sync_log_is_kept_thirty_days_unless_told() {
        let c = Config::parse(MINIMAL, Path::new("sync.toml"), &env).unwrap();
        assert_eq!(
            c.database.sync_log_keep,
            Duration::from_secs(30 * 24 * 3600)
        );
        let text = format!("[database]\nsync_log_keep = \"1year\"\n{MINIMAL}");
        let c = Config::parse(&text, Path::new("sync.toml"), &env).unwrap();
        assert_eq!(c.database.sync_log_keep.as_secs(), 31_557_600);
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, key) in [
            (MINIMAL.replace("http://127", "ftp://127"), "base_url"),
            (format!("{MINIMAL}batch_size = 0\n"), "batch_size"),
            (format!("{MINIMAL}interval = \"0s\"\n"), "interval"),
            (
                format!("[database]\nsync_log_keep = \"10m\"\n{MINIMAL}"),
                "database.sync_log_keep",
            ),
        ] {
            let err = Config::parse(&text, Path::new("sync.toml"), &env).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn remote_settings_are_read_like_the_file_and_win_over_it() {
        let c = Config::parse(
            &format!("[defaults]\nheartbeat = \"1m\"\n{MINIMAL}batch_size = 50\n"),
            Path::new("sync.toml"),
            &env,
        )
        .unwrap();
        let local = c.client_systems[0].local_policy(&c.defaults);
        let remote = Policy::from_remote_json(
            r#"{"batch_size": 200, "interval": "90s", "backoff": {"initial": "1s"}}"#,
        )
        .unwrap();
        assert_eq!(remote.keys(), ["interval", "batch_size", "backoff"]);
        let p = local.overlaid_with(&remote).effective();
        assert_eq!(
            p.batch_size, 200,
            "remote wins over the client system's own"
        );
        assert_eq!(p.interval, Duration::from_secs(90));
        assert_eq!(
            p.heartbeat,
            Duration::from_secs(60),
            "unset remotely: the file's"
        );
        assert_eq!(p.backoff.initial, Duration::from_secs(1));
        assert_eq!(
            p.backoff.max,
            Duration::from_secs(32),
            "backoff fields default"
        );
        assert_eq!(p.config_refresh, Duration::from_secs(900));
    }

    #[test]
    fn bad_remote_settings_name_the_key() {
        for (body, key) in [
            (r#"{"batch_size": 0}"#, "batch_size"),
            (r#"{"intervall": "1m"}"#, "intervall"),
            (r#"{"interval": 60}"#, "interval"),
            (r#"{"heartbeat": "0s"}"#, "heartbeat"),
            (r#"{"backoff": {"jitter": 3}}"#, "jitter"),
        ] {
            let err = Policy::from_remote_json(body).unwrap_err();
            assert!(err.contains(key), "{body}: {err}");
        }
        assert!(Policy::from_remote_json("[1]").is_err());
        assert_eq!(Policy::from_remote_json("{}").unwrap(), Policy::default());
    }

    #[test]
    fn a_remote_api_needs_a_token_or_a_waiver() {
        let with = |api: &str| {
            Config::parse(
                &format!("{MINIMAL}[api]\n{api}\n"),
                Path::new("sync.toml"),
                &env,
            )
        };
        let err = with("listen = \"0.0.0.0:7878\"").unwrap_err().to_string();
        assert!(err.contains("api.listen") && err.contains("token"), "{err}");
        assert!(with("listen = \"0.0.0.0:7878\"\ntoken = \"${KEY}\"").is_ok());
        assert!(with("listen = \"0.0.0.0:7878\"\nallow_unauthenticated = true").is_ok());
        assert!(with("listen = \"127.0.0.1:7878\"").is_ok());
        let c = with("token = \"${KEY}\"").unwrap();
        assert_eq!(c.api.token.as_ref().map(Secret::expose), Some("secret"));
        assert!(with("token = \"\"").is_err());
    }

    #[test]
    fn dollar_escape_is_literal() {
        assert_eq!(interpolate("a$${B}", &|_| None).unwrap(), "a${B}");
    }
}
