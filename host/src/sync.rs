//! One worker per Client System: schedule, batch, encode, upload, retry.
//!
//! A worker wakes every `interval` (or when triggered) and drains: it re-sends the
//! pending batch if there is one (when it is due, or at once when triggered), else
//! records a new batch of up to `batch_size` readings, until nothing is left to send.
//! Every attempt is logged to `sync_log` in the same transaction that records its
//! effect on the batch. Every `heartbeat`, the worker sends the Client System a
//! heartbeat through the transport, with the readings queued for it, its last success
//! and the daemon's version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::clock::now_ms;
use crate::config::{BackoffConfig, EffectivePolicy};
use crate::plugin::bindings::{UploadOutcome, types};
use crate::plugin::host::HttpTally;
use crate::plugin::{CallError, EncoderPlugin, TransportPlugin};
use crate::queue::{Attempt, Batch, Queue, QueuedReading};

/// How long a worker waits before trying again after the database failed it.
const DATABASE_RETRY: Duration = Duration::from_secs(5);

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
}

impl Verdict {
    fn label(&self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Retry { .. } => "retry",
            Verdict::Unauthorized(_) => "unauthorized",
            Verdict::Unreachable(_) => "unreachable",
            Verdict::Rejected(_) => "rejected",
        }
    }

    fn error(&self) -> Option<String> {
        match self {
            Verdict::Accepted => None,
            Verdict::Retry { reason, .. } => Some(reason.clone()),
            Verdict::Unauthorized(reason)
            | Verdict::Unreachable(reason)
            | Verdict::Rejected(reason) => Some(reason.clone()),
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
    /// The encoder in service: name and version.
    pub encoder: String,
    /// The transport in service: name and version.
    pub transport: String,
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
    /// Attempts in a row that found the Client System out of reach.
    pub consecutive_unreachable: u32,
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

/// Delivers readings to one Client System.
pub struct Worker {
    /// The Client System's name.
    pub name: String,
    /// The site's id.
    pub site_id: String,
    /// Its settings.
    pub policy: EffectivePolicy,
    /// The queue.
    pub queue: Queue,
    /// Its encoder.
    pub encoder: EncoderPlugin,
    /// Its transport.
    pub transport: TransportPlugin,
    /// Every configured Client System (a reading is deleted once all are done with it).
    pub all_client_systems: Arc<Vec<String>>,
    /// Notified to sync now.
    pub trigger: Arc<Notify>,
    /// Consecutive attempts that found the Client System out of reach.
    outage_streak: u32,
    /// When the next heartbeat is due.
    next_heartbeat: tokio::time::Instant,
    /// What it publishes about itself.
    status: SharedStatus,
}

/// Why a wait ended.
enum Wake {
    Elapsed,
    Triggered,
    Shutdown,
}

/// Waits for `pause`, a trigger, or shutdown, whichever comes first.
async fn wait_for(trigger: &Notify, pause: Duration, shutdown: &mut watch::Receiver<bool>) -> Wake {
    tokio::select! {
        _ = tokio::time::sleep(pause) => Wake::Elapsed,
        _ = trigger.notified() => Wake::Triggered,
        _ = shutdown.changed() => Wake::Shutdown,
    }
}

impl Worker {
    /// A worker for one Client System.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        site_id: String,
        policy: EffectivePolicy,
        queue: Queue,
        encoder: EncoderPlugin,
        transport: TransportPlugin,
        all_client_systems: Arc<Vec<String>>,
        trigger: Arc<Notify>,
    ) -> Self {
        let status = WorkerStatus {
            client_system: name.clone(),
            encoder: format!("{} {}", encoder.info().name, encoder.info().version),
            transport: format!("{} {}", transport.info().name, transport.info().version),
            ..WorkerStatus::default()
        };
        Self {
            name,
            site_id,
            policy,
            queue,
            encoder,
            transport,
            all_client_systems,
            trigger,
            outage_streak: 0,
            next_heartbeat: tokio::time::Instant::now(),
            status: Arc::new(std::sync::RwLock::new(status)),
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

    /// Waits for `pause`, a trigger or shutdown, sending heartbeats as they fall due
    /// meanwhile.
    async fn pause(&mut self, pause: Duration, shutdown: &mut watch::Receiver<bool>) -> Wake {
        let until = tokio::time::Instant::now() + pause;
        let trigger = Arc::clone(&self.trigger);
        loop {
            let heartbeat_first = self.next_heartbeat < until;
            let wake_at = if heartbeat_first {
                self.next_heartbeat
            } else {
                until
            };
            let wait = wake_at.saturating_duration_since(tokio::time::Instant::now());
            match wait_for(&trigger, wait, shutdown).await {
                Wake::Elapsed if heartbeat_first => self.heartbeat_if_due().await,
                wake => return wake,
            }
        }
    }

    /// Sends a heartbeat through the transport if one is due. A failed heartbeat is
    /// logged and tried again at the next one.
    async fn heartbeat_if_due(&mut self) {
        let now = tokio::time::Instant::now();
        if now < self.next_heartbeat {
            return;
        }
        self.next_heartbeat = now + self.policy.heartbeat;
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
        match self.transport.heartbeat(&status).await {
            Ok(Ok(())) => debug!(queued, "heartbeat sent"),
            Ok(Err(reason)) => warn!(%reason, "heartbeat refused"),
            Err(error) => warn!("heartbeat failed: {error}"),
        }
    }

    /// Runs until `shutdown` turns true. The batch in flight then is finished (within
    /// its deadline) or, if the task is dropped, re-sent after the restart.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let span = info_span!("worker", client_system = %self.name);
        async move {
            info!(
                encoder = %self.encoder.info().name,
                transport = %self.transport.info().name,
                interval = ?self.policy.interval,
                "worker started"
            );
            loop {
                let pause = match self.drain(&mut shutdown).await {
                    Ok(()) => self.policy.interval,
                    Err(error) => {
                        warn!("sync stopped by an error, will try again: {error:#}");
                        DATABASE_RETRY
                    }
                };
                if *shutdown.borrow() {
                    break;
                }
                if let Wake::Shutdown = self.pause(pause, &mut shutdown).await {
                    break;
                }
            }
            info!("worker stopped");
        }
        .instrument(span)
        .await
    }

    /// Sends batches until none is left, or the pending one is waiting for its retry
    /// time and `shutdown` comes first.
    async fn drain(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // A long backlog must not silence the heartbeat.
            self.heartbeat_if_due().await;
            if let Some(batch) = self.queue.pending_batch(&self.name).await? {
                let wait_ms = batch.next_attempt_at_ms - now_ms();
                if wait_ms > 0 {
                    let pause = Duration::from_millis(wait_ms as u64);
                    debug!(batch_id = %batch.id, ?pause, "waiting to retry");
                    if let Wake::Shutdown = self.pause(pause, shutdown).await {
                        return Ok(());
                    }
                }
                let readings = self.queue.batch_readings(&batch).await?;
                self.attempt(batch, readings).await?;
            } else if let Some((batch, readings)) = self
                .queue
                .new_batch(&self.name, self.policy.batch_size)
                .await?
            {
                self.attempt(batch, readings).await?;
            } else {
                return Ok(());
            }
        }
    }

    /// One attempt at a batch, and its consequence in the queue.
    async fn attempt(&mut self, batch: Batch, readings: Vec<QueuedReading>) -> Result<()> {
        let span = info_span!("batch", batch_id = %batch.id, attempt = batch.attempts + 1);
        self.attempt_in_span(batch, readings).instrument(span).await
    }

    async fn attempt_in_span(&mut self, batch: Batch, readings: Vec<QueuedReading>) -> Result<()> {
        let number = batch.attempts + 1;
        let started_at_ms = now_ms();
        let clock = Instant::now();
        self.publish(|s| s.in_flight = Some(batch.id.clone()));
        let verdict = if readings.is_empty() {
            // Every reading of the range was deleted behind syncd's back (by an
            // operator): there is nothing left to deliver.
            Verdict::Accepted
        } else {
            self.deliver(&batch, number, readings).await
        };
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
        self.publish(|s| {
            s.in_flight = None;
            s.retry = None;
            s.last_attempt_ms = Some(started_at_ms);
            s.last_outcome = Some(verdict.label().to_owned());
            s.consecutive_unreachable = self.outage_streak;
            match verdict.error() {
                None => s.last_success_ms = Some(started_at_ms),
                Some(error) => {
                    s.last_error = Some(error);
                    s.last_error_ms = Some(started_at_ms);
                }
            }
        });
        let retries_used = u32::try_from(number).unwrap_or(u32::MAX);
        match verdict {
            Verdict::Accepted => {
                let pruned = self
                    .queue
                    .acknowledge(&batch, attempt, &self.all_client_systems)
                    .await?;
                info!(
                    readings = batch.reading_count,
                    pruned,
                    ms = clock.elapsed().as_millis() as u64,
                    "batch delivered"
                );
            }
            Verdict::Rejected(reason) => {
                warn!(%reason, "batch rejected: moved to dead letters");
                self.queue.dead_letter(&batch, attempt, &reason).await?;
            }
            Verdict::Retry { reason, .. } if retries_used > self.policy.max_retries => {
                let reason =
                    format!("out of retries after {number} attempts; last error: {reason}");
                warn!(%reason, "batch moved to dead letters");
                self.queue.dead_letter(&batch, attempt, &reason).await?;
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
        let at = later(pause);
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
        let readings: Vec<types::Reading> = readings.into_iter().map(into_wit).collect();
        let encoded = match self.encoder.encode(&info, &readings).await {
            Ok(Ok(encoded)) => encoded,
            Ok(Err(reason)) => {
                return Verdict::Rejected(format!("encoder refused the batch: {reason}"));
            }
            Err(error) => return plugin_failure("encoder", error),
        };
        drop(readings);
        match self.upload(&info, &encoded).await {
            Verdict::Unauthorized(reason) => {
                debug!(%reason, "unauthorized: authenticating again");
                let result = self.transport.authenticate().await;
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
                    Err(error) => plugin_failure("transport", error),
                }
            }
            other => other,
        }
    }

    async fn upload(&mut self, info: &types::BatchInfo, encoded: &types::EncodedBatch) -> Verdict {
        let result = self.transport.upload(info, encoded).await;
        let tally = self.transport.last_tally();
        match result {
            Ok(UploadOutcome::Accepted) => Verdict::Accepted,
            Ok(UploadOutcome::RetryLater(_)) | Err(_) if tally.unreachable() => unreachable(tally),
            Ok(UploadOutcome::RetryLater(retry)) => Verdict::Retry {
                reason: retry.reason,
                delay: retry.delay_ms.map(Duration::from_millis),
            },
            Ok(UploadOutcome::Rejected(reason)) => Verdict::Rejected(reason),
            Ok(UploadOutcome::Unauthorized(reason)) => Verdict::Unauthorized(reason),
            Err(error) => plugin_failure("transport", error),
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

/// The time `pause` from now, in ms since the Unix epoch.
fn later(pause: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(pause.as_millis()).unwrap_or(i64::MAX))
}

/// A plugin that trapped or overran its deadline: the batch is kept and retried; the
/// plugin gets a fresh instance.
fn plugin_failure(which: &str, error: CallError) -> Verdict {
    Verdict::Retry {
        reason: format!("{which} failed: {error}"),
        delay: None,
    }
}

fn into_wit(r: QueuedReading) -> types::Reading {
    types::Reading {
        id: r.id as u64,
        meter_id: r.reading.meter_id,
        channel: r.reading.channel,
        timestamp_ms: r.reading.timestamp_ms,
        value: r.reading.value,
        unit: r.reading.unit,
        quality: r.reading.quality,
        attributes: r.reading.attributes,
    }
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
