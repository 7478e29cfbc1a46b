//! One worker per Client System: schedule, batch, encode, upload, retry.
//!
//! A worker wakes every `interval` (or when triggered) and drains: it re-sends the
//! pending batch if there is one (when it is due, or at once when triggered), else
//! records a new batch of up to `batch_size` readings, until nothing is left to send.
//! Every attempt is logged to `sync_log` in the same transaction that records its
//! effect on the batch. Through a backlog the queue's work overlaps the delivery: the
//! next batch's readings are read while a full batch is sent, and the acknowledgement
//! of an accepted batch is written while the next one is sent (recorded first: SQLite
//! takes one writer at a time, and the record would wait for the acknowledgement).
//!
//! Every `heartbeat`, the worker sends the Client System a heartbeat through the
//! transport, with the readings queued for it, its last success and the daemon's
//! version. On start and every `config_refresh` it downloads the
//! Client System's remote configuration, applies it between batches, and keeps the
//! last good one in the queue's database for a start while the Client System is out
//! of reach.
//!
//! Each worker keeps a connectivity [`Monitor`] fed by every request its transport
//! makes and, when no request has said anything for `connectivity_check`, by a probe.
//! While the Client System is offline no batch is attempted (so no retry is spent on
//! an outage); when it answers again, the worker drains at once.
//!
//! Time comes from a [`Clock`], so tests can move it by hand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::clock::{Clock, millis};
use crate::config::{BackoffConfig, EffectivePolicy, Policy};
use crate::connectivity::{Connectivity, Event, Monitor, State};
use crate::metrics::WorkerMetrics;
use crate::plugin::bindings::{UploadOutcome, types};
use crate::plugin::cache::Origin;
use crate::plugin::host::HttpTally;
use crate::plugin::{CallError, Columns, ColumnsBuilder, EncoderPlugin, TransportPlugin, output};
use crate::queue::{Attempt, Batch, Queue, QueuedReading, StoredRemoteConfig};

/// How long a worker waits before trying again after the database failed it.
const DATABASE_RETRY: Duration = Duration::from_secs(5);

/// How soon a remote configuration that could not be downloaded is asked for again
/// (or after `config_refresh`, if that is sooner).
pub const CONFIG_RETRY: Duration = Duration::from_secs(60);

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Delivered and acknowledged.
    Accepted,
    /// A passing failure: try again after the backoff (or after the delay asked for).
    Retry {
        /// Why.
        reason: String,
        /// The delay the Client System asked for.
        delay: Option<Duration>,
    },
    /// The credentials are refused even after re-authenticating. Not the batch's
    /// fault: retried after the backoff without using up its retries.
    Unauthorized(String),
    /// No request of the attempt got any response (connection refused, timeouts): the
    /// Client System is out of reach. Not the batch's fault either: retried after a
    /// backoff that grows with the outage, without using up its retries.
    Unreachable(String),
    /// Refused for good: dead letters.
    Rejected(String),
    /// A plugin trapped, overran its deadline or answered nonsense. Not the batch's
    /// fault: retried with a fresh instance after a backoff that grows with the
    /// plugin's failures in a row, without using up the batch's retries.
    PluginFailed(String),
}

impl Verdict {
    fn label(&self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Retry { .. } => "retry",
            Verdict::Unauthorized(_) => "unauthorized",
            Verdict::Unreachable(_) => "unreachable",
            Verdict::Rejected(_) => "rejected",
            Verdict::PluginFailed(_) => "plugin_failed",
        }
    }

    fn error(&self) -> Option<String> {
        match self {
            Verdict::Accepted => None,
            Verdict::Retry { reason, .. } => Some(reason.clone()),
            Verdict::Unauthorized(reason)
            | Verdict::Unreachable(reason)
            | Verdict::Rejected(reason)
            | Verdict::PluginFailed(reason) => Some(reason.clone()),
        }
    }
}

/// The delay before retry number `retry` (1 for the first retry): `initial *
/// multiplier^(retry-1)`, at most `max`, spread by up to ±`jitter`. `unit` is a
/// number from 0 to 1 that places the delay within the spread (random in service).
pub fn backoff_delay(backoff: &BackoffConfig, retry: u32, unit: f64) -> Duration {
    let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = backoff.initial.as_secs_f64() * backoff.multiplier.powi(exponent);
    let capped = base.min(backoff.max.as_secs_f64());
    let spread = 1.0 + backoff.jitter * (unit.clamp(0.0, 1.0) * 2.0 - 1.0);
    Duration::from_secs_f64((capped * spread).max(0.0))
}

/// What a worker says of itself, for `GET /v1/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStatus {
    /// The Client System.
    pub client_system: String,
    /// The encoder in service.
    pub encoder: PluginStatus,
    /// The transport in service.
    pub transport: PluginStatus,
    /// Why the last reload of this Client System's plugins or settings was refused;
    /// cleared by the next one that succeeds.
    pub reload_error: Option<String>,
    /// The batch being attempted right now.
    pub in_flight: Option<String>,
    /// When the last attempt started, ms since the Unix epoch.
    pub last_attempt_ms: Option<i64>,
    /// What it came to (`accepted`, `retry`, `unreachable`, …).
    pub last_outcome: Option<String>,
    /// When a batch was last delivered.
    pub last_success_ms: Option<i64>,
    /// The last error, and when.
    pub last_error: Option<String>,
    /// When the last error happened.
    pub last_error_ms: Option<i64>,
    /// The batch waiting for its retry, if any.
    pub retry: Option<RetryState>,
    /// Whether the Client System can be reached, as of its last change of state
    /// ([`WorkerStatus::as_of`] counts the time since).
    pub connectivity: Connectivity,
    /// Whether the Client System accepts the credentials, as last seen.
    pub authentication: Authentication,
    /// When the last heartbeat was delivered.
    pub last_heartbeat_ms: Option<i64>,
    /// The remote configuration in force, if any.
    pub remote_config: Option<RemoteConfigStatus>,
    /// Why the last remote configuration could not be downloaded or was refused.
    pub remote_config_error: Option<String>,
    /// The settings in force: the file's, with the remote configuration's on top.
    pub settings: Option<EffectivePolicy>,
    /// What it has counted since the start, for `GET /metrics`.
    #[serde(skip)]
    pub metrics: WorkerMetrics,
}

/// A plugin in service.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PluginStatus {
    /// What it calls itself.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The WIT package version it was built for.
    pub wit_version: String,
    /// The component file.
    pub path: String,
    /// SHA-256 of the component file, in hex.
    pub sha256: String,
    /// When it went into service, ms since the Unix epoch.
    pub loaded_at_ms: i64,
    /// Whether it was compiled when loaded, or came from the compiled-plugin cache.
    pub origin: Option<Origin>,
    /// `ok`, or `failed` once [`PLUGIN_FAILED_AFTER`] calls in a row have failed;
    /// back to `ok` at its next call that succeeds, or when it is replaced.
    pub health: PluginHealth,
    /// Calls that failed in a row: trapped, overran the deadline, or answered what the
    /// host refuses.
    pub failures_in_a_row: u32,
    /// The last such failure, while `failures_in_a_row` is not 0.
    pub last_failure: Option<String>,
}

/// Whether a plugin in service works; see [`PluginStatus::health`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginHealth {
    /// Its last call succeeded, or fewer than [`PLUGIN_FAILED_AFTER`] failed in a row.
    #[default]
    Ok,
    /// At least [`PLUGIN_FAILED_AFTER`] calls failed in a row.
    Failed,
}

/// Calls of a plugin failing in a row after which status marks it failed.
pub const PLUGIN_FAILED_AFTER: u32 = 3;

/// Uploads of one batch in a row that got no answer while the Client System answered a
/// probe right after each, before the batch spends its retries like any failure: a
/// batch the Client System cannot take (too large for a proxy, fatal to its parser)
/// must end in dead letters rather than hold back the queue for ever.
pub const UNANSWERED_BATCH_AFTER: u32 = 3;

impl PluginStatus {
    /// Records a call that failed.
    fn failed(&mut self, failure: String) {
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        self.last_failure = Some(failure);
        if self.failures_in_a_row >= PLUGIN_FAILED_AFTER {
            self.health = PluginHealth::Failed;
        }
    }

    /// Records a call that succeeded.
    fn succeeded(&mut self) {
        self.failures_in_a_row = 0;
        self.last_failure = None;
        self.health = PluginHealth::Ok;
    }
}

impl PluginStatus {
    fn of<W: crate::plugin::runtime::World>(
        plugin: &crate::plugin::runtime::Plugin<W>,
        loaded_at_ms: i64,
    ) -> Self {
        let info = plugin.info();
        Self {
            name: info.name.clone(),
            version: info.version.clone(),
            wit_version: info.wit_version.clone(),
            path: plugin.path().display().to_string(),
            sha256: plugin.sha256().to_owned(),
            loaded_at_ms,
            origin: Some(plugin.origin()),
            ..Self::default()
        }
    }
}

/// A change the supervisor sends a running worker; applied between batches.
pub enum Control {
    /// New settings from the configuration file.
    Settings {
        /// The site's id.
        site_id: String,
        /// The file's settings for this Client System.
        policy: Policy,
        /// Whether its remote configuration is applied.
        remote_config: bool,
    },
    /// New plugins, each replacing the one in service from the next batch on.
    Plugins {
        /// A new encoder, if it changed.
        encoder: Option<Box<EncoderPlugin>>,
        /// A new transport, if it changed.
        transport: Option<Box<TransportPlugin>>,
    },
}

/// Whether the Client System accepts the credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Authentication {
    /// Nothing that needs them has been done yet.
    #[default]
    Unknown,
    /// The last call that needed them succeeded.
    Ok,
    /// Refused, even after authenticating again.
    Refused,
}

/// The remote configuration in force.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteConfigStatus {
    /// The version label the Client System gave it.
    pub version: String,
    /// The settings it sets.
    pub keys: Vec<&'static str>,
    /// When it was downloaded, ms since the Unix epoch.
    pub fetched_at_ms: i64,
    /// `downloaded` (this run) or `cached` (kept from an earlier run, the Client
    /// System has not answered since the start).
    pub source: &'static str,
}

impl WorkerStatus {
    /// The status at `now_ms`: the time spent in the current connectivity state counted
    /// in.
    pub fn as_of(&self, now_ms: i64) -> WorkerStatus {
        let mut status = self.clone();
        status.connectivity = self.connectivity.as_of(now_ms);
        status
    }
}

/// A batch waiting for its retry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetryState {
    /// The batch.
    pub batch_id: String,
    /// Attempts that count towards `max_retries`.
    pub attempts: i32,
    /// When it will be attempted again, ms since the Unix epoch.
    pub next_attempt_ms: i64,
}

/// A worker's status, shared with the API.
pub type SharedStatus = Arc<std::sync::RwLock<WorkerStatus>>;

/// What a worker is set up with, from the configuration.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The Client System's name.
    pub name: String,
    /// The site's id.
    pub site_id: String,
    /// The settings from the file (`[defaults]` with the Client System's own on top).
    pub policy: Policy,
    /// Whether the Client System's remote configuration is downloaded and applied.
    pub remote_config: bool,
    /// Where time comes from.
    pub clock: Clock,
    /// Where connectivity changes are published.
    pub events: broadcast::Sender<Event>,
}

/// A remote configuration in force.
struct RemoteConfig {
    stored: StoredRemoteConfig,
    settings: Policy,
}

/// Delivers readings to one Client System.
pub struct Worker {
    /// The Client System's name.
    pub name: String,
    /// The site's id.
    pub site_id: String,
    /// The settings from the file.
    local_policy: Policy,
    /// Whether the remote configuration is applied.
    accepts_remote_config: bool,
    /// The remote configuration in force.
    remote: Option<RemoteConfig>,
    /// The settings in force.
    pub policy: EffectivePolicy,
    /// Where time comes from.
    clock: Clock,
    /// The queue.
    pub queue: Queue,
    /// Its encoder.
    pub encoder: EncoderPlugin,
    /// Its transport.
    pub transport: TransportPlugin,
    /// Changes from the supervisor.
    control: mpsc::UnboundedReceiver<Control>,
    /// Notified to sync now.
    pub trigger: Arc<Notify>,
    /// Consecutive attempts that found the Client System out of reach.
    outage_streak: u32,
    /// The batch whose last uploads got no answer while the Client System answered
    /// probes, and how many in a row.
    unanswered: Option<(String, u32)>,
    /// Whether the Client System can be reached.
    monitor: Monitor,
    /// Where connectivity changes are published.
    events: broadcast::Sender<Event>,
    /// Set when the Client System answers again after an outage: drain at once.
    reconnected: bool,
    /// When the next heartbeat is due, ms since the Unix epoch.
    next_heartbeat_ms: i64,
    /// When the remote configuration is next downloaded.
    next_config_fetch_ms: i64,
    /// The next batch's readings, read while the last full batch was being delivered.
    read_ahead: Option<ReadAhead>,
    /// The last batch delivered, until its acknowledgement is written: after the next
    /// batch is recorded, so that it is written while that one is delivered.
    delivered: Option<Delivered>,
    /// That acknowledgement, while it is being written.
    acknowledging: Option<Acknowledging>,
    /// What it publishes about itself.
    status: SharedStatus,
    /// What it shares with the other processes of a shared queue.
    shared: Shared,
}

/// Connectivity shared through the queue with the other processes using it.
#[derive(Debug, Default)]
struct Shared {
    /// When to look next, ms since the Unix epoch.
    next_check_ms: i64,
    /// The last report read (its time), so that each is acted on once.
    seen_report_ms: i64,
    /// A change of state seen here and not yet reported: online or not, since when.
    to_report: Option<(bool, i64)>,
}

/// How often a worker looks at what the other processes sharing its queue found of
/// its Client System's connectivity (and at the remote configuration they downloaded).
pub const SHARED_STATE_CHECK: Duration = Duration::from_secs(2);

/// Readings read ahead: the `rows` after id `after`.
struct ReadAhead {
    after: i64,
    rows: Vec<QueuedReading>,
}

/// A batch the Client System accepted, whose acknowledgement is not written yet.
struct Delivered {
    batch: Batch,
    attempt: Attempt,
    /// Since its attempt started.
    clock: Instant,
}

/// An acknowledgement being written while the next batch is delivered.
struct Acknowledging {
    batch_id: String,
    reading_count: i32,
    clock: Instant,
    task: tokio::task::JoinHandle<Result<u64>>,
}

/// Why a wait ended.
enum Wake {
    Elapsed,
    Control(Box<Control>),
    Triggered,
    Shutdown,
}

/// The end of a pause.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// `interval` after this time: follows a change of `interval` made meanwhile.
    IntervalAfter(i64),
    /// This time.
    At(i64),
}

/// Waits until `at_ms`, a trigger, a change from the supervisor, or shutdown,
/// whichever comes first.
async fn wait_for(
    clock: &Clock,
    trigger: &Notify,
    at_ms: i64,
    control: &mut mpsc::UnboundedReceiver<Control>,
    shutdown: &mut watch::Receiver<bool>,
) -> Wake {
    tokio::select! {
        _ = clock.sleep_until(at_ms) => Wake::Elapsed,
        Some(change) = control.recv() => Wake::Control(Box::new(change)),
        _ = trigger.notified() => Wake::Triggered,
        _ = shutdown.changed() => Wake::Shutdown,
    }
}

impl Worker {
    /// A worker for one Client System.
    pub fn new(
        settings: WorkerSettings,
        queue: Queue,
        encoder: EncoderPlugin,
        transport: TransportPlugin,
        control: mpsc::UnboundedReceiver<Control>,
        trigger: Arc<Notify>,
    ) -> Self {
        let WorkerSettings {
            name,
            site_id,
            policy: local_policy,
            remote_config,
            clock,
            events,
        } = settings;
        let policy = local_policy.effective();
        let status = WorkerStatus {
            client_system: name.clone(),
            encoder: PluginStatus::of(&encoder, clock.now_ms()),
            transport: PluginStatus::of(&transport, clock.now_ms()),
            settings: Some(policy.clone()),
            ..WorkerStatus::default()
        };
        let now = clock.now_ms();
        let monitor = Monitor::new(&name, now);
        let status = WorkerStatus {
            connectivity: monitor.status().clone(),
            ..status
        };
        Self {
            name,
            site_id,
            local_policy,
            accepts_remote_config: remote_config,
            remote: None,
            policy,
            clock,
            queue,
            encoder,
            transport,
            control,
            trigger,
            outage_streak: 0,
            unanswered: None,
            monitor,
            events,
            reconnected: false,
            next_heartbeat_ms: now,
            next_config_fetch_ms: now,
            read_ahead: None,
            delivered: None,
            acknowledging: None,
            status: Arc::new(std::sync::RwLock::new(status)),
            shared: Shared {
                next_check_ms: now,
                ..Shared::default()
            },
        }
    }

    /// The status this worker publishes.
    pub fn status(&self) -> SharedStatus {
        Arc::clone(&self.status)
    }

    fn publish(&self, update: impl FnOnce(&mut WorkerStatus)) {
        let mut status = self
            .status
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        update(&mut status);
    }

    /// Waits for the end of the pause, a trigger or shutdown, doing the periodic
    /// chores (heartbeat, remote configuration) as they fall due meanwhile.
    async fn pause(&mut self, until: Until, shutdown: &mut watch::Receiver<bool>) -> Wake {
        let trigger = Arc::clone(&self.trigger);
        loop {
            // Read each time round: a remote configuration may change the interval.
            let end = match until {
                Until::IntervalAfter(since) => since.saturating_add(millis(self.policy.interval)),
                Until::At(at) => at,
            };
            let chore = self.next_chore_ms();
            let chore_first = chore < end;
            let wake_at = if chore_first { chore } else { end };
            match wait_for(&self.clock, &trigger, wake_at, &mut self.control, shutdown).await {
                Wake::Control(change) => self.apply(*change),
                Wake::Elapsed if chore_first => {
                    self.chores().await;
                    if self.reconnected {
                        return Wake::Triggered;
                    }
                }
                wake => return wake,
            }
        }
    }

    /// When the next periodic chore is due.
    fn next_chore_ms(&self) -> i64 {
        let probe = self.monitor.next_probe_ms(self.policy.connectivity_check);
        let mut chore = self.next_heartbeat_ms.min(probe);
        // Only on PostgreSQL can other processes share the queue.
        if self.queue.is_postgres() {
            chore = chore.min(self.shared.next_check_ms);
        }
        if self.accepts_remote_config {
            chore.min(self.next_config_fetch_ms)
        } else {
            chore
        }
    }

    /// Does the periodic chores that are due.
    async fn chores(&mut self) {
        self.share_if_due().await;
        self.probe_if_due().await;
        self.refresh_config_if_due().await;
        self.heartbeat_if_due().await;
        self.report_connectivity().await;
    }

    /// Tells the other processes sharing the queue what this one found of the Client
    /// System's connectivity, and learns what they found: a Client System another
    /// process saw come back is probed at once (so deliveries resume here too); one
    /// another process found offline, and this one has not heard from since, is
    /// offline here too (no retries spent on it). A remote configuration another
    /// process downloaded, newer than the one in force, is applied.
    async fn share_if_due(&mut self) {
        self.report_connectivity().await;
        let now = self.clock.now_ms();
        if !self.queue.is_postgres() || now < self.shared.next_check_ms {
            return;
        }
        self.shared.next_check_ms = now.saturating_add(millis(SHARED_STATE_CHECK));
        match self.queue.shared_connectivity(&self.name).await {
            Ok(Some(report))
                if report.reported_by != self.queue.process_name()
                    && report.reported_at_ms > self.shared.seen_report_ms =>
            {
                self.shared.seen_report_ms = report.reported_at_ms;
                if report.online && self.monitor.state() == State::Offline {
                    info!(process = %report.reported_by, "another process found the client system reachable: probing now");
                    self.probe().await;
                } else if !report.online
                    && self.monitor.state() != State::Offline
                    && self
                        .monitor
                        .last_answer_ms()
                        .is_none_or(|answered| answered < report.since_ms)
                {
                    let reason = format!("found offline by process {}", report.reported_by);
                    let event = self.monitor.adopt_offline(now, &reason);
                    // Already known to the others: not reported back.
                    self.publish_connectivity(event);
                    self.shared.to_report = None;
                }
            }
            Ok(_) => {}
            Err(error) => debug!("cannot read the shared connectivity: {error:#}"),
        }
        if self.accepts_remote_config {
            match self.queue.remote_config(&self.name).await {
                Ok(Some(stored))
                    if self
                        .remote
                        .as_ref()
                        .is_none_or(|r| r.stored.fetched_at_ms < stored.fetched_at_ms) =>
                {
                    self.take_remote_config(stored, "shared").await;
                }
                Ok(_) => {}
                Err(error) => debug!("cannot read the kept remote configuration: {error:#}"),
            }
        }
    }

    /// Tells the other processes of a change of connectivity seen here, if any.
    async fn report_connectivity(&mut self) {
        if let Some((online, since_ms)) = self.shared.to_report.take()
            && let Err(error) = self
                .queue
                .report_connectivity(&self.name, online, since_ms)
                .await
        {
            debug!("{error:#}");
        }
    }

    /// Probes the Client System if nothing has been heard of it for
    /// `connectivity_check`.
    async fn probe_if_due(&mut self) {
        if self.clock.now_ms() >= self.monitor.next_probe_ms(self.policy.connectivity_check) {
            self.probe().await;
        }
    }

    /// Asks the transport whether the Client System answers.
    async fn probe(&mut self) {
        let result = self.transport.probe().await;
        let now = self.clock.now_ms();
        let event = match result {
            Ok(Ok(())) => self.monitor.success(now),
            Ok(Err(reason)) => self
                .monitor
                .failure(now, &format!("probe failed: {reason}")),
            Err(error) => self.monitor.failure(now, &format!("probe failed: {error}")),
        };
        self.publish_connectivity(event);
    }

    /// Learns from the requests of the transport's last call: any answer shows the
    /// Client System reachable; requests that all got none count against it.
    fn observe_requests(&mut self) {
        let tally = self.transport.last_tally();
        let now = self.clock.now_ms();
        let event = if tally.responses > 0 {
            self.monitor.success(now)
        } else if tally.unreachable > 0 {
            let reason = tally.last_failure.as_deref().unwrap_or("no response");
            self.monitor.failure(now, reason)
        } else {
            return;
        };
        self.publish_connectivity(event);
    }

    /// Publishes the monitor's state, and a change, if any, as an event and a log line.
    fn publish_connectivity(&mut self, event: Option<Event>) {
        let connectivity = self.monitor.status().clone();
        self.publish(|s| s.connectivity = connectivity);
        let Some(event) = event else {
            return;
        };
        self.shared.to_report = Some(match &event {
            Event::Connected { at_ms, .. } => (true, *at_ms),
            Event::Disconnected { at_ms, .. } => (false, *at_ms),
        });
        match &event {
            Event::Connected {
                after_outage_ms: Some(ms),
                ..
            } => {
                info!(
                    outage = ?Duration::from_millis(*ms as u64),
                    "client system reachable again: delivering what queued meanwhile"
                );
                self.reconnected = true;
                // Tell it at once that the site is back, and catch up on its settings.
                let now = self.clock.now_ms();
                self.next_heartbeat_ms = now;
                self.next_config_fetch_ms = self.next_config_fetch_ms.min(now);
            }
            Event::Connected { .. } => info!("client system reachable"),
            Event::Disconnected { reason, .. } => warn!(
                %reason,
                "client system offline: deliveries paused, readings keep queueing"
            ),
        }
        // Nobody listening is fine: the event is also in the log and in status.
        let _ = self.events.send(event);
    }

    /// Sends a heartbeat through the transport if one is due. A failed heartbeat is
    /// logged and tried again at the next one.
    async fn heartbeat_if_due(&mut self) {
        let now = self.clock.now_ms();
        if now < self.next_heartbeat_ms {
            return;
        }
        self.next_heartbeat_ms = now.saturating_add(millis(self.policy.heartbeat));
        let queued = match self.queue.queued_for(&self.name).await {
            Ok(queued) => queued,
            Err(error) => {
                warn!("heartbeat skipped: cannot read the queue: {error:#}");
                return;
            }
        };
        let last_success_ms = self
            .status
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .last_success_ms;
        let status = types::SiteStatus {
            site_id: self.site_id.clone(),
            queued,
            last_success_ms,
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let result = self.transport.heartbeat(&status).await;
        self.observe_requests();
        match result {
            Ok(Ok(())) => {
                debug!(queued, "heartbeat sent");
                self.publish(|s| {
                    s.last_heartbeat_ms = Some(now);
                    s.authentication = Authentication::Ok;
                    s.metrics.heartbeats += 1;
                });
            }
            Ok(Err(reason)) => {
                warn!(%reason, "heartbeat refused");
                self.publish(|s| s.metrics.heartbeat_failures += 1);
            }
            Err(error) => {
                warn!("heartbeat failed: {error}");
                let _ = self.plugin_failure(Which::Transport, error);
                self.publish(|s| s.metrics.heartbeat_failures += 1);
            }
        }
    }

    /// Applies the remote configuration kept from an earlier run, if any: it holds
    /// until the Client System answers with its current one.
    async fn restore_remote_config(&mut self) {
        if !self.accepts_remote_config {
            return;
        }
        match self.queue.remote_config(&self.name).await {
            Ok(Some(stored)) => self.take_remote_config(stored, "cached").await,
            Ok(None) => {}
            Err(error) => warn!("cannot read the kept remote configuration: {error:#}"),
        }
    }

    /// Downloads the remote configuration if it is due, and applies it.
    async fn refresh_config_if_due(&mut self) {
        let now = self.clock.now_ms();
        if !self.accepts_remote_config || now < self.next_config_fetch_ms {
            return;
        }
        let result = self.transport.fetch_config().await;
        self.observe_requests();
        let failure = match result {
            Ok(Ok(Some(remote))) => {
                self.publish(|s| s.authentication = Authentication::Ok);
                let stored = StoredRemoteConfig {
                    client_system: self.name.clone(),
                    version: remote.version,
                    body: remote.body,
                    fetched_at_ms: now,
                };
                self.take_remote_config(stored, "downloaded").await;
                None
            }
            Ok(Ok(None)) => {
                self.publish(|s| s.authentication = Authentication::Ok);
                self.drop_remote_config().await;
                None
            }
            Ok(Err(reason)) => Some(reason),
            Err(error) => Some(error.to_string()),
        };
        let next = match failure {
            None => self.policy.config_refresh,
            Some(reason) => {
                warn!(%reason, "remote configuration not downloaded, will try again");
                self.publish(|s| {
                    s.remote_config_error = Some(format!("download failed: {reason}"));
                });
                self.policy.config_refresh.min(CONFIG_RETRY)
            }
        };
        self.next_config_fetch_ms = now.saturating_add(millis(next));
    }

    /// Validates a remote configuration and, if good, puts it in force and keeps it.
    /// A bad one changes nothing.
    async fn take_remote_config(&mut self, config: StoredRemoteConfig, source: &'static str) {
        let settings = match Policy::from_remote_json(&config.body) {
            Ok(settings) => settings,
            Err(reason) => {
                let reason = format!("version \"{}\" refused: {reason}", config.version);
                warn!(%reason, "remote configuration refused, the settings in force stay");
                self.publish(|s| s.remote_config_error = Some(reason));
                return;
            }
        };
        let same = self
            .remote
            .as_ref()
            .is_some_and(|r| r.stored.version == config.version && r.stored.body == config.body);
        if same {
            self.publish(|s| s.remote_config_error = None);
            return;
        }
        if source == "downloaded"
            && let Err(error) = self.queue.save_remote_config(&config).await
        {
            warn!("remote configuration applied but not kept for the next start: {error:#}");
        }
        info!(
            version = %config.version,
            source,
            keys = ?settings.keys(),
            "remote configuration applied"
        );
        let status = RemoteConfigStatus {
            version: config.version.clone(),
            keys: settings.keys(),
            fetched_at_ms: config.fetched_at_ms,
            source,
        };
        self.remote = Some(RemoteConfig {
            stored: config,
            settings,
        });
        self.publish(|s| {
            s.remote_config = Some(status);
            s.remote_config_error = None;
        });
        self.apply_settings();
    }

    /// The Client System has no remote configuration for this site (any more).
    async fn drop_remote_config(&mut self) {
        self.publish(|s| s.remote_config_error = None);
        if self.remote.take().is_none() {
            return;
        }
        info!("the client system has no remote configuration any more: the file's settings apply");
        if let Err(error) = self.queue.forget_remote_config(&self.name).await {
            warn!("cannot forget the kept remote configuration: {error:#}");
        }
        self.publish(|s| s.remote_config = None);
        self.apply_settings();
    }

    /// Puts in force the file's settings with the remote configuration's on top.
    fn apply_settings(&mut self) {
        let layered = match &self.remote {
            Some(remote) => self.local_policy.overlaid_with(&remote.settings),
            None => self.local_policy.clone(),
        };
        let new = layered.effective();
        if new == self.policy {
            return;
        }
        let now = self.clock.now_ms();
        // A shorter period takes effect now, not after the longer one runs out.
        self.next_heartbeat_ms = self
            .next_heartbeat_ms
            .min(now.saturating_add(millis(new.heartbeat)));
        self.next_config_fetch_ms = self
            .next_config_fetch_ms
            .min(now.saturating_add(millis(new.config_refresh)));
        self.transport
            .context()
            .set_request_timeout(new.request_timeout);
        debug!(settings = ?new, "settings changed");
        self.policy = new.clone();
        self.publish(|s| s.settings = Some(new));
    }

    /// Counts a plugin call that trapped or ran past its deadline.
    /// A plugin that trapped or overran its deadline: counted, shown in status, and
    /// the batch kept for a retry with a fresh instance (the failed one was dropped).
    fn plugin_failure(&self, which: Which, error: CallError) -> Verdict {
        let reason = format!("{} failed: {error}", which.name());
        self.publish(|s| {
            let counts = match error {
                CallError::Trap(_) => &mut s.metrics.plugin_traps,
                CallError::Deadline(_) => &mut s.metrics.plugin_deadlines,
            };
            *counts.entry(which.name()).or_default() += 1;
            match which {
                Which::Encoder => s.encoder.failed(reason.clone()),
                Which::Transport => s.transport.failed(reason.clone()),
            }
        });
        Verdict::PluginFailed(reason)
    }

    /// Applies a change from the supervisor (between batches: the batch in flight, if
    /// any, finished under the old settings and plugins).
    fn apply(&mut self, change: Control) {
        let now = self.clock.now_ms();
        match change {
            Control::Settings {
                site_id,
                policy,
                remote_config,
            } => {
                self.site_id = site_id;
                self.local_policy = policy;
                if remote_config != self.accepts_remote_config {
                    self.accepts_remote_config = remote_config;
                    if remote_config {
                        self.next_config_fetch_ms = now;
                    } else if self.remote.take().is_some() {
                        self.publish(|s| s.remote_config = None);
                    }
                }
                self.apply_settings();
                info!("settings reloaded");
            }
            Control::Plugins { encoder, transport } => {
                if let Some(encoder) = encoder {
                    info!(
                        from = %self.encoder.info().version,
                        to = %encoder.info().version,
                        name = %encoder.info().name,
                        sha256 = %encoder.sha256(),
                        "encoder replaced"
                    );
                    self.encoder = *encoder;
                    let status = PluginStatus::of(&self.encoder, now);
                    self.publish(|s| s.encoder = status);
                }
                if let Some(transport) = transport {
                    info!(
                        from = %self.transport.info().version,
                        to = %transport.info().version,
                        name = %transport.info().name,
                        sha256 = %transport.sha256(),
                        "transport replaced"
                    );
                    self.transport = *transport;
                    // The remote configuration may have changed the request timeout.
                    self.transport
                        .context()
                        .set_request_timeout(self.policy.request_timeout);
                    let status = PluginStatus::of(&self.transport, now);
                    self.publish(|s| s.transport = status);
                }
            }
        }
    }

    /// Runs until `shutdown` turns true. The batch in flight then is finished (within
    /// its deadline) or, if the task is dropped, re-sent after the restart.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let span = info_span!("worker", client_system = %self.name);
        async move {
            self.restore_remote_config().await;
            info!(
                encoder = %self.encoder.info().name,
                transport = %self.transport.info().name,
                interval = ?self.policy.interval,
                "worker started"
            );
            loop {
                let until = match self.drain(&mut shutdown).await {
                    Ok(()) => Until::IntervalAfter(self.clock.now_ms()),
                    Err(error) => {
                        warn!("sync stopped by an error, will try again: {error:#}");
                        Until::At(self.clock.after(DATABASE_RETRY))
                    }
                };
                if *shutdown.borrow() {
                    break;
                }
                if let Wake::Shutdown = self.pause(until, &mut shutdown).await {
                    break;
                }
            }
            info!("worker stopped");
        }
        .instrument(span)
        .await
    }

    /// Sends batches until none is left, or the pending one is waiting for its retry
    /// time and `shutdown` comes first. Every batch delivered is acknowledged by the
    /// time it returns.
    async fn drain(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        let drained = self.send_batches(shutdown).await;
        let acknowledged = self.acknowledge_delivered().await;
        drained.and(acknowledged)
    }

    async fn send_batches(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // Changes from the supervisor take effect between batches.
            while let Ok(change) = self.control.try_recv() {
                self.apply(change);
            }
            // A long backlog must not hold back the heartbeat or a new configuration.
            self.chores().await;
            self.reconnected = false;
            if self.monitor.state() == State::Offline {
                // Woken while offline (interval, `syncd sync`): look again now.
                self.probe().await;
                self.reconnected = false;
                if self.monitor.state() == State::Offline {
                    debug!("offline: no batch attempted");
                    return Ok(());
                }
            }
            if let Some((batch, readings)) = self.record_next_then_acknowledge().await? {
                self.attempt(batch, readings).await?;
                continue;
            }
            if let Some(batch) = self.queue.claim_batch(&self.name).await? {
                self.read_ahead = None;
                // A batch held back by an outage goes as soon as the Client System has
                // answered since.
                let held_by_outage =
                    self.outage_streak > 0 && self.monitor.consecutive_failures() == 0;
                if batch.next_attempt_at_ms > self.clock.now_ms() && !held_by_outage {
                    debug!(batch_id = %batch.id, at_ms = batch.next_attempt_at_ms, "waiting to retry");
                    let until = Until::At(batch.next_attempt_at_ms);
                    if let Wake::Shutdown = self.pause(until, shutdown).await {
                        return Ok(());
                    }
                    if !self.queue.renew_lease(&batch).await? {
                        debug!(batch_id = %batch.id, "batch taken over by another process meanwhile");
                        continue;
                    }
                }
                let readings = self.queue.batch_readings(&batch).await?;
                self.attempt(batch, readings).await?;
            } else if let Some((batch, readings)) = self.new_batch().await? {
                self.attempt(batch, readings).await?;
            } else {
                return Ok(());
            }
        }
    }

    /// After a batch was delivered, records the next one from the readings read ahead
    /// (when they are still the next ones and a full batch at the current size, and no
    /// other batch is to be claimed first), then starts writing the acknowledgement of
    /// the one delivered, which goes on while the next is delivered: the queue's work
    /// and the delivery overlap. The acknowledgement is written now, and no batch
    /// recorded, when there is no such next batch.
    async fn record_next_then_acknowledge(
        &mut self,
    ) -> Result<Option<(Batch, Vec<QueuedReading>)>> {
        let Some(delivered) = self.delivered.take() else {
            return Ok(None);
        };
        let recorded = match self.read_ahead.take() {
            Some(ahead) if ahead.rows.len() == self.policy.batch_size as usize => {
                let recorded = self
                    .queue
                    .record_read_ahead(
                        &self.name,
                        ahead.after,
                        &ahead.rows,
                        Some(&delivered.batch.id),
                    )
                    .await;
                match recorded {
                    Ok(Some(batch)) => Some((batch, ahead.rows)),
                    Ok(None) => {
                        self.read_ahead = Some(ahead);
                        None
                    }
                    Err(error) => {
                        // Written by `drain` on the way out, if the database lets it.
                        self.delivered = Some(delivered);
                        return Err(error);
                    }
                }
            }
            ahead => {
                self.read_ahead = ahead;
                None
            }
        };
        let Some(next) = recorded else {
            self.write_acknowledgement(delivered).await?;
            return Ok(None);
        };
        let Delivered {
            batch,
            attempt,
            clock,
        } = delivered;
        let queue = self.queue.clone();
        let batch_id = batch.id.clone();
        let reading_count = batch.reading_count;
        let task = tokio::spawn(async move { queue.acknowledge(&batch, attempt).await });
        self.acknowledging = Some(Acknowledging {
            batch_id,
            reading_count,
            clock,
            task,
        });
        Ok(Some(next))
    }

    /// Writes the acknowledgement of the batch delivered last, or waits for the one
    /// being written.
    async fn acknowledge_delivered(&mut self) -> Result<()> {
        self.acknowledged_meanwhile().await?;
        match self.delivered.take() {
            Some(delivered) => self.write_acknowledgement(delivered).await,
            None => Ok(()),
        }
    }

    /// Waits for the acknowledgement written while the batch after it was delivered.
    async fn acknowledged_meanwhile(&mut self) -> Result<()> {
        let Some(acknowledging) = self.acknowledging.take() else {
            return Ok(());
        };
        let pruned = acknowledging
            .task
            .await
            .map_err(|error| anyhow::anyhow!("the acknowledgement's task failed: {error}"))??;
        self.acknowledged(
            &acknowledging.batch_id,
            acknowledging.reading_count,
            pruned,
            acknowledging.clock,
        );
        Ok(())
    }

    async fn write_acknowledgement(&mut self, delivered: Delivered) -> Result<()> {
        let Delivered {
            batch,
            attempt,
            clock,
        } = delivered;
        let pruned = self.queue.acknowledge(&batch, attempt).await?;
        self.acknowledged(&batch.id, batch.reading_count, pruned, clock);
        Ok(())
    }

    fn acknowledged(&self, batch_id: &str, readings: i32, pruned: u64, clock: Instant) {
        self.publish(|s| {
            s.metrics.batches_delivered += 1;
            s.metrics.readings_delivered += readings as u64;
        });
        info!(
            batch_id,
            readings,
            pruned,
            ms = clock.elapsed().as_millis() as u64,
            "batch delivered"
        );
    }

    /// Records the next batch: the readings read ahead when they are still the next
    /// ones and a full batch at the current size, else readings read now.
    async fn new_batch(&mut self) -> Result<Option<(Batch, Vec<QueuedReading>)>> {
        if let Some(ReadAhead { after, rows }) = self.read_ahead.take()
            && rows.len() == self.policy.batch_size as usize
            && let Some(batch) = self
                .queue
                .record_read_ahead(&self.name, after, &rows, None)
                .await?
        {
            return Ok(Some((batch, rows)));
        }
        self.queue
            .new_batch(&self.name, self.policy.batch_size)
            .await
    }

    /// One attempt at a batch, and its consequence in the queue.
    async fn attempt(&mut self, batch: Batch, readings: Vec<QueuedReading>) -> Result<()> {
        let span = info_span!("batch", batch_id = %batch.id, attempt = batch.attempts + 1);
        self.attempt_in_span(batch, readings).instrument(span).await
    }

    async fn attempt_in_span(&mut self, batch: Batch, readings: Vec<QueuedReading>) -> Result<()> {
        let number = batch.attempts + 1;
        let started_at_ms = self.clock.now_ms();
        let clock = Instant::now();
        self.publish(|s| s.in_flight = Some(batch.id.clone()));
        // A full batch suggests a backlog: the next batch's readings are read while
        // this one is encoded and uploaded (the database and the network overlap).
        let read_ahead = (readings.len() == self.policy.batch_size as usize).then(|| {
            let (queue, after, size) = (
                self.queue.clone(),
                batch.last_reading_id,
                self.policy.batch_size,
            );
            async move { (after, queue.readings_after(after, size).await) }
        });
        let queue = self.queue.clone();
        let verdict = if readings.is_empty() {
            // Every reading of the range was deleted behind syncd's back (by an
            // operator): there is nothing left to deliver.
            Verdict::Accepted
        } else if let Some(read_ahead) = read_ahead {
            let (verdict, (after, rows)) = while_leased(&queue, &batch, async {
                tokio::join!(self.deliver(&batch, number, readings), read_ahead)
            })
            .await;
            match rows {
                Ok(rows) => self.read_ahead = Some(ReadAhead { after, rows }),
                // Not an error of this batch: the next one is read the usual way.
                Err(error) => debug!("reading ahead failed: {error:#}"),
            }
            verdict
        } else {
            while_leased(&queue, &batch, self.deliver(&batch, number, readings)).await
        };
        let verdict = self.judge_unanswered(&batch, verdict).await;
        let attempt = Attempt {
            client_system: self.name.clone(),
            batch_id: batch.id.clone(),
            attempt: number,
            started_at_ms,
            duration_ms: clock.elapsed().as_millis() as i64,
            reading_count: batch.reading_count,
            outcome: verdict.label(),
            error: verdict.error(),
        };
        self.outage_streak = match verdict {
            Verdict::Unreachable(_) => self.outage_streak.saturating_add(1),
            _ => 0,
        };
        let retries_used = u32::try_from(number).unwrap_or(u32::MAX);
        let out_of_retries = retries_used > self.policy.max_retries;
        // Whether the batch will be tried again (the match below, keep the two alike).
        let tried_again = match verdict {
            Verdict::Accepted | Verdict::Rejected(_) => false,
            Verdict::Retry { .. } => !out_of_retries,
            Verdict::Unauthorized(_) | Verdict::Unreachable(_) | Verdict::PluginFailed(_) => true,
        };
        self.publish(|s| {
            s.in_flight = None;
            // A batch tried again keeps the retry its attempt before scheduled until
            // `retry_later` replaces it: a batch failing again and again is never shown
            // without its retry between two attempts.
            if !tried_again {
                s.retry = None;
            }
            s.last_attempt_ms = Some(started_at_ms);
            s.last_outcome = Some(verdict.label().to_owned());
            *s.metrics.attempts.entry(verdict.label()).or_default() += 1;
            s.metrics.attempt_seconds.observe(clock.elapsed());
            match verdict {
                Verdict::Accepted => s.authentication = Authentication::Ok,
                Verdict::Unauthorized(_) => s.authentication = Authentication::Refused,
                _ => {}
            }
            match verdict.error() {
                None => s.last_success_ms = Some(started_at_ms),
                Some(error) => {
                    s.last_error = Some(error);
                    s.last_error_ms = Some(started_at_ms);
                }
            }
        });
        // The batch before, acknowledged meanwhile. Should that have failed, this one's
        // outcome is not written either: both are sent again after the pause for
        // the database, and the Client System drops what it already has.
        self.acknowledged_meanwhile().await?;
        match verdict {
            // Written once the next batch is recorded, or when the drain ends.
            Verdict::Accepted => {
                self.delivered = Some(Delivered {
                    batch,
                    attempt,
                    clock,
                })
            }
            Verdict::Rejected(reason) => {
                warn!(%reason, "batch rejected: moved to dead letters");
                self.queue.dead_letter(&batch, attempt, &reason).await?;
                self.publish(|s| s.metrics.readings_dead_lettered += batch.reading_count as u64);
            }
            Verdict::Retry { reason, .. } if out_of_retries => {
                let reason =
                    format!("out of retries after {number} attempts; last error: {reason}");
                warn!(%reason, "batch moved to dead letters");
                self.queue.dead_letter(&batch, attempt, &reason).await?;
                self.publish(|s| s.metrics.readings_dead_lettered += batch.reading_count as u64);
            }
            Verdict::Retry { reason, delay } => {
                let backoff = backoff_delay(&self.policy.backoff, retries_used, fastrand::f64());
                let pause = delay.map_or(backoff, |asked| asked.max(backoff));
                warn!(%reason, retry_in = ?pause, "batch not delivered, will retry");
                self.retry_later(&batch, attempt, number, pause).await?;
            }
            // Neither is the batch's fault: retried without spending its retries.
            Verdict::Unauthorized(reason) => {
                let pause = backoff_delay(&self.policy.backoff, retries_used, fastrand::f64());
                warn!(%reason, retry_in = ?pause, "credentials refused, will retry");
                self.retry_later(&batch, attempt, batch.attempts, pause)
                    .await?;
            }
            Verdict::Unreachable(reason) => {
                let pause =
                    backoff_delay(&self.policy.backoff, self.outage_streak, fastrand::f64());
                warn!(%reason, retry_in = ?pause, "client system out of reach, will retry");
                self.retry_later(&batch, attempt, batch.attempts, pause)
                    .await?;
            }
            Verdict::PluginFailed(reason) => {
                let streak = {
                    let status = self.status.read().unwrap_or_else(|p| p.into_inner());
                    status
                        .encoder
                        .failures_in_a_row
                        .max(status.transport.failures_in_a_row)
                };
                let pause = backoff_delay(&self.policy.backoff, streak, fastrand::f64());
                warn!(%reason, retry_in = ?pause, "plugin failed, will retry the batch");
                self.retry_later(&batch, attempt, batch.attempts, pause)
                    .await?;
            }
        }
        Ok(())
    }

    /// Records the attempt and when the batch is to be tried again; `attempts_used` is
    /// what counts towards its retries from now on.
    async fn retry_later(
        &mut self,
        batch: &Batch,
        attempt: Attempt,
        attempts_used: i32,
        pause: Duration,
    ) -> Result<()> {
        let at = self.clock.after(pause);
        self.queue
            .schedule_retry(batch, attempt, attempts_used, at)
            .await?;
        self.publish(|s| {
            s.retry = Some(RetryState {
                batch_id: batch.id.clone(),
                attempts: attempts_used,
                next_attempt_ms: at,
            })
        });
        Ok(())
    }

    /// Encodes and uploads; never fails: every failure is a verdict.
    async fn deliver(
        &mut self,
        batch: &Batch,
        number: i32,
        readings: Vec<QueuedReading>,
    ) -> Verdict {
        let info = types::BatchInfo {
            batch_id: batch.id.clone(),
            site_id: self.site_id.clone(),
            client_system: self.name.clone(),
            attempt: u32::try_from(number).unwrap_or(u32::MAX),
        };
        let count = readings.len();
        let started = Instant::now();
        let result = match in_columns(readings) {
            Ok(columns) => self.encoder.encode(&info, &columns).await,
            Err(error) => Err(error),
        };
        self.publish(|s| s.metrics.encoder_seconds.observe(started.elapsed()));
        let encoded = match result {
            Ok(Ok(encoded)) => match output::check_encoded(&encoded, count) {
                Ok(()) => {
                    self.publish(|s| s.encoder.succeeded());
                    encoded
                }
                Err(reason) => {
                    let reason = format!("encoder answered nonsense: {reason}");
                    self.publish(|s| s.encoder.failed(reason.clone()));
                    return Verdict::PluginFailed(reason);
                }
            },
            Ok(Err(reason)) => {
                self.publish(|s| s.encoder.succeeded());
                return Verdict::Rejected(format!("encoder refused the batch: {reason}"));
            }
            Err(error) => return self.plugin_failure(Which::Encoder, error),
        };
        match self.upload(&info, &encoded).await {
            Verdict::Unauthorized(reason) => {
                debug!(%reason, "unauthorized: authenticating again");
                let result = self.transport.authenticate().await;
                self.observe_requests();
                let tally = self.transport.last_tally();
                match result {
                    Ok(Ok(())) => match self.upload(&info, &encoded).await {
                        Verdict::Unauthorized(reason) => Verdict::Unauthorized(format!(
                            "refused again after authenticating: {reason}"
                        )),
                        other => other,
                    },
                    _ if tally.unreachable() => unreachable(tally),
                    Ok(Err(reason)) => {
                        Verdict::Unauthorized(format!("authentication failed: {reason}"))
                    }
                    Err(error) => self.plugin_failure(Which::Transport, error),
                }
            }
            other => other,
        }
    }

    /// An upload that got no answer is an outage, not the batch's fault, unless the
    /// Client System answers a probe right after: after [`UNANSWERED_BATCH_AFTER`]
    /// such uploads of the same batch in a row, it spends a retry like a server error.
    async fn judge_unanswered(&mut self, batch: &Batch, verdict: Verdict) -> Verdict {
        let Verdict::Unreachable(reason) = verdict else {
            self.unanswered = None;
            return verdict;
        };
        if self.monitor.state() == State::Offline {
            // Known out of reach: no probe on top of the monitor's own.
            return Verdict::Unreachable(reason);
        }
        self.probe().await;
        if self.transport.last_tally().responses == 0 {
            // The link is down: an outage, whatever the batch.
            return Verdict::Unreachable(reason);
        }
        let count = match &self.unanswered {
            Some((id, count)) if *id == batch.id => count + 1,
            _ => 1,
        };
        self.unanswered = Some((batch.id.clone(), count));
        if count < UNANSWERED_BATCH_AFTER {
            return Verdict::Unreachable(reason);
        }
        warn!(%reason, count, "the client system answers, but not to this batch: a retry spent");
        Verdict::Retry {
            reason: format!(
                "{reason} (no answer to this batch {count} times in a row, while the client system answered probes)"
            ),
            delay: None,
        }
    }

    async fn upload(&mut self, info: &types::BatchInfo, encoded: &types::EncodedBatch) -> Verdict {
        let started = Instant::now();
        let result = self.transport.upload(info, encoded).await;
        self.publish(|s| s.metrics.transport_seconds.observe(started.elapsed()));
        self.observe_requests();
        if result.is_ok() {
            self.publish(|s| s.transport.succeeded());
        }
        let tally = self.transport.last_tally().clone();
        match result {
            Ok(UploadOutcome::Accepted) => Verdict::Accepted,
            Ok(UploadOutcome::RetryLater(_)) if tally.unreachable() => unreachable(&tally),
            Ok(UploadOutcome::RetryLater(retry)) => Verdict::Retry {
                reason: retry.reason,
                delay: output::retry_later_delay(retry.delay_ms),
            },
            Ok(UploadOutcome::Rejected(reason)) => Verdict::Rejected(reason),
            Ok(UploadOutcome::Unauthorized(reason)) => Verdict::Unauthorized(reason),
            // Cut off while the Client System did not answer: the outage, not the plugin.
            Err(CallError::Deadline(_)) if tally.unreachable() => unreachable(&tally),
            Err(error) => self.plugin_failure(Which::Transport, error),
        }
    }
}

/// Runs `work` on a batch, renewing this process's lease of it every third of the
/// lease meanwhile, so that no other process takes it over while it is being sent.
async fn while_leased<T>(queue: &Queue, batch: &Batch, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let every = queue.batch_lease() / 3;
    let mut held = true;
    loop {
        tokio::select! {
            out = &mut work => return out,
            () = tokio::time::sleep(every), if held => match queue.renew_lease(batch).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(batch_id = %batch.id, "lease of the batch in flight lost (this process stalled longer than batch_lease): another process may send it too");
                    held = false;
                }
                Err(error) => warn!(batch_id = %batch.id, "cannot renew the lease of the batch in flight: {error:#}"),
            },
        }
    }
}

fn unreachable(tally: &HttpTally) -> Verdict {
    Verdict::Unreachable(
        tally
            .last_failure
            .clone()
            .unwrap_or_else(|| "no response".to_owned()),
    )
}

/// Which of a worker's plugins.
#[derive(Debug, Clone, Copy)]
enum Which {
    Encoder,
    Transport,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Encoder => "encoder",
            Which::Transport => "transport",
        }
    }
}

/// The queue's rows as the columns an encoder receives (the rows are freed here: the
/// columns hold the same text).
fn in_columns(rows: Vec<QueuedReading>) -> Result<Columns, CallError> {
    let mut columns = ColumnsBuilder::with_capacity(rows.len());
    for row in &rows {
        let r = &row.reading;
        columns.push(
            row.id as u64,
            &r.meter_id,
            &r.channel,
            r.timestamp_ms,
            r.value,
            &r.unit,
            &r.quality,
            r.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
    }
    columns.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backoff_is_2_4_8_16_32_seconds() {
        let b = BackoffConfig::default();
        let delays: Vec<u64> = (1..=6)
            .map(|n| backoff_delay(&b, n, 0.5).as_secs())
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 32]);
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let b = BackoffConfig::default();
        assert_eq!(backoff_delay(&b, 1, 0.0), Duration::from_secs_f64(1.6));
        assert_eq!(backoff_delay(&b, 1, 1.0), Duration::from_secs_f64(2.4));
    }
}
