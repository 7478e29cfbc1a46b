//! The supervisor: starts a worker per Client System and applies a new `sync.toml` or
//! new plugins to the running daemon.
//!
//! A reload reads and validates the whole file first: an invalid one changes nothing.
//! Then it applies the difference, Client System by Client System: one removed is
//! stopped (after its batch in flight) and forgotten; one added is started; one whose
//! plugins, base URL, API key or plugin settings changed gets new plugins, compiled and
//! checked before they are handed over, and swapped in between batches; one whose
//! settings changed gets them between batches. A plugin that fails to compile or to
//! check is refused and the one in service stays. The others are not touched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, info_span, warn};

use crate::api::{Handle, Workers};
use crate::clock::Clock;
use crate::config::{ClientSystem, Config, Policy, Secret};
use crate::connectivity::Event;
use crate::plugin::cache::sha256_hex;
use crate::plugin::{EncoderPlugin, PluginContext, PluginEngine, TransportPlugin};
use crate::queue::Queue;
use crate::sync::{Control, SharedStatus, Worker, WorkerSettings};
use crate::watch::FileWatcher;

/// How long files must be quiet after a change before it is reloaded: an editor or a
/// deploy script often writes a file in several steps.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(250);

/// How long a worker being stopped gets to finish the batch in flight. A batch cut off
/// is not lost: it is recorded, and re-sent with the same id after a restart.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often attempts older than `[database] sync_log_keep` are deleted (and once at
/// start).
pub const SYNC_LOG_PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What the configuration's last reload came to, for status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    /// The file.
    pub path: String,
    /// The site's id in force.
    pub site_id: String,
    /// When the configuration in force was loaded, ms since the Unix epoch.
    pub loaded_at_ms: i64,
    /// Reloads done (successful or not).
    pub reloads: u64,
    /// Reloads refused in whole or in part.
    pub reload_failures: u64,
    /// When the last reload happened.
    pub last_reload_ms: Option<i64>,
    /// Why the last reload was refused, in whole or in part; cleared by the next one
    /// that succeeds.
    pub last_error: Option<String>,
    /// Settings changed in the file that take effect only at the next restart.
    pub restart_needed: Vec<String>,
}

/// The configuration status, shared with the API.
pub type SharedConfigStatus = Arc<std::sync::RwLock<ConfigStatus>>;

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// What was refused (a Client System whose new plugins failed), one line each;
    /// what it had before stays in service.
    pub refused: Vec<String>,
    /// Settings that changed but take effect only at the next restart.
    pub restart_needed: Vec<String>,
}

/// A reload, or why the new file was refused as a whole.
pub type ReloadOutcome = std::result::Result<ReloadReport, String>;

/// A request to reload (from `POST /v1/reload`), with where to send the outcome.
pub type ReloadRequest = oneshot::Sender<ReloadOutcome>;

/// What a worker is running with.
struct Running {
    site_id: String,
    base_url: String,
    api_key: Option<Secret>,
    plugin_settings: toml::Table,
    policy: Policy,
    remote_config: bool,
    encoder: (PathBuf, String),
    transport: (PathBuf, String),
    context: Arc<PluginContext>,
    control: mpsc::UnboundedSender<Control>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    status: SharedStatus,
}

/// Starts, changes and stops the workers.
pub struct Supervisor {
    config: Config,
    engine: PluginEngine,
    queue: Queue,
    http: reqwest::Client,
    clock: Clock,
    events: tokio::sync::broadcast::Sender<Event>,
    running: BTreeMap<String, Running>,
    workers: Workers,
    status: SharedConfigStatus,
    started_at_ms: i64,
}

impl Supervisor {
    /// Opens the queue and starts a worker per configured Client System. Fails if any
    /// cannot start: a daemon that starts runs everything its file asks for.
    pub async fn start(
        config: Config,
        clock: Clock,
        events: tokio::sync::broadcast::Sender<Event>,
    ) -> Result<Self> {
        let queue = Queue::open_for(&config).await?;
        let mut engine = PluginEngine::new()?;
        if let Some(dir) = config.plugin_cache_dir() {
            engine = engine.with_cache_dir(dir);
        }
        let status = ConfigStatus {
            path: config.path.display().to_string(),
            site_id: config.site.id.clone(),
            loaded_at_ms: clock.now_ms(),
            ..ConfigStatus::default()
        };
        let mut supervisor = Self {
            engine,
            queue,
            http: crate::daemon::http_client()?,
            clock,
            events,
            running: BTreeMap::new(),
            workers: Workers::default(),
            started_at_ms: status.loaded_at_ms,
            status: Arc::new(std::sync::RwLock::new(status)),
            config,
        };
        supervisor.queue.check_name_free().await?;
        supervisor
            .queue
            .report_alive(supervisor.started_at_ms)
            .await?;
        supervisor.forget_unconfigured().await?;
        for cs in supervisor.config.client_systems.clone() {
            supervisor
                .start_worker(&cs)
                .await
                .with_context(|| format!("client system {}", cs.name))?;
        }
        Ok(supervisor)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The workers' triggers and statuses, for the API.
    pub fn workers(&self) -> Workers {
        Arc::clone(&self.workers)
    }

    /// The configuration's status, for the API.
    pub fn config_status(&self) -> SharedConfigStatus {
        Arc::clone(&self.status)
    }

    /// The files whose change is a reason to reload: the configuration and every
    /// plugin it names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config.path.clone()];
        for cs in &self.config.client_systems {
            files.push(self.config.resolve(&cs.encoder));
            files.push(self.config.resolve(&cs.transport));
        }
        files.sort();
        files.dedup();
        files
    }

    /// A Client System kept in the queue but no longer configured is forgotten, as if
    /// it had been removed by a reload.
    async fn forget_unconfigured(&self) -> Result<()> {
        let configured = self.config.client_system_names();
        for name in self.queue.client_systems().await? {
            if !configured.contains(&name) {
                if let Some(other) = self.other_process_alive().await? {
                    warn!(
                        client_system = %name,
                        %other,
                        "client system not configured here but kept in the queue: another process shares it"
                    );
                    continue;
                }
                let undelivered = self.queue.forget_client_system(&name).await?;
                warn!(
                    client_system = %name,
                    undelivered,
                    "client system no longer configured: forgotten, with the readings it had not received"
                );
            }
        }
        Ok(())
    }

    fn new_context(&self, cs: &ClientSystem, site_id: &str) -> Result<Arc<PluginContext>> {
        Ok(Arc::new(PluginContext::new(
            site_id,
            &cs.name,
            &cs.base_url,
            cs.plugin_settings(),
            cs.api_key.clone(),
            cs.policy(&self.config.defaults).request_timeout,
            self.http.clone(),
        )?))
    }

    async fn load_encoder(
        &self,
        path: &Path,
        context: &Arc<PluginContext>,
    ) -> Result<EncoderPlugin> {
        self.engine
            .load_encoder(path, Arc::clone(context))
            .await
            .context("encoder")
    }

    async fn load_transport(
        &self,
        path: &Path,
        context: &Arc<PluginContext>,
    ) -> Result<TransportPlugin> {
        self.engine
            .load_transport(path, Arc::clone(context))
            .await
            .context("transport")
    }

    /// Loads a Client System's plugins and starts its worker.
    async fn start_worker(&mut self, cs: &ClientSystem) -> Result<()> {
        let site_id = self.config.site.id.clone();
        let context = self.new_context(cs, &site_id)?;
        let encoder_path = self.config.resolve(&cs.encoder);
        let transport_path = self.config.resolve(&cs.transport);
        let encoder = self.load_encoder(&encoder_path, &context).await?;
        let transport = self.load_transport(&transport_path, &context).await?;
        self.queue
            .register_client_systems(std::slice::from_ref(&cs.name))
            .await?;
        let policy = cs.local_policy(&self.config.defaults);
        let settings = WorkerSettings {
            name: cs.name.clone(),
            site_id: site_id.clone(),
            policy: policy.clone(),
            remote_config: cs.remote_config,
            clock: self.clock.clone(),
            events: self.events.clone(),
        };
        let (control, controls) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let trigger = Arc::new(Notify::new());
        let encoder_id = (encoder_path, encoder.sha256().to_owned());
        let transport_id = (transport_path, transport.sha256().to_owned());
        let worker = Worker::new(
            settings,
            self.queue.clone(),
            encoder,
            transport,
            controls,
            Arc::clone(&trigger),
        );
        let status = worker.status();
        let task = tokio::spawn(worker.run(stopped));
        self.workers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                cs.name.clone(),
                Handle {
                    trigger,
                    status: Arc::clone(&status),
                },
            );
        self.running.insert(
            cs.name.clone(),
            Running {
                site_id,
                base_url: cs.base_url.clone(),
                api_key: cs.api_key.clone(),
                plugin_settings: cs.plugin.clone(),
                policy,
                remote_config: cs.remote_config,
                encoder: encoder_id,
                transport: transport_id,
                context,
                control,
                stop,
                task,
                status,
            },
        );
        Ok(())
    }

    /// Stops a worker after its batch in flight (within [`SHUTDOWN_GRACE`]).
    async fn stop_worker(&mut self, name: &str) {
        self.workers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(name);
        if let Some(running) = self.running.remove(name) {
            let _ = running.stop.send(true);
            join_within(vec![running.task], SHUTDOWN_GRACE).await;
        }
    }

    /// Stops every worker, each after its batch in flight, within [`SHUTDOWN_GRACE`];
    /// then gives back the batches this process holds, for the others sharing the
    /// queue.
    pub async fn shutdown(mut self) {
        let running = std::mem::take(&mut self.running);
        let mut tasks = Vec::new();
        for (_, worker) in running {
            let _ = worker.stop.send(true);
            tasks.push(worker.task);
        }
        join_within(tasks, SHUTDOWN_GRACE).await;
        if let Err(error) = self.queue.leave().await {
            warn!("could not give back this process's batches: {error:#}");
        }
    }

    /// Says this process is alive, in the queue's registry of processes.
    pub async fn report_alive(&self) {
        if let Err(error) = self.queue.report_alive(self.started_at_ms).await {
            warn!("cannot report this process alive in the queue: {error:#}");
        }
    }

    /// Another process that shares the queue and was heard of within three leases.
    async fn other_process_alive(&self) -> Result<Option<String>> {
        let recent = self.clock.now_ms() - 3 * self.queue.batch_lease().as_millis() as i64;
        Ok(self
            .queue
            .processes()
            .await?
            .into_iter()
            .find(|p| !p.this && p.process.last_seen_ms >= recent)
            .map(|p| p.process.name))
    }

    /// Reads the configuration file again and applies what changed, plugins included.
    pub async fn reload(&mut self) -> ReloadOutcome {
        let now = self.clock.now_ms();
        let outcome = self.reload_inner().await;
        let mut status = self
            .status
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        status.reloads += 1;
        status.last_reload_ms = Some(now);
        match &outcome {
            Err(reason) => {
                error!(%reason, "configuration refused: the one in force stays");
                status.reload_failures += 1;
                status.last_error = Some(reason.clone());
            }
            Ok(report) => {
                for change in &report.changes {
                    info!("reload: {change}");
                }
                for refusal in &report.refused {
                    error!("reload refused: {refusal}");
                }
                for key in &report.restart_needed {
                    warn!("reload: {key} changed; it takes effect at the next restart");
                }
                status.loaded_at_ms = now;
                status.site_id = self.config.site.id.clone();
                status.restart_needed = report.restart_needed.clone();
                if report.refused.is_empty() {
                    status.last_error = None;
                } else {
                    status.reload_failures += 1;
                    status.last_error = Some(report.refused.join("; "));
                }
            }
        }
        outcome
    }

    async fn reload_inner(&mut self) -> ReloadOutcome {
        let mut new = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        let mut report = ReloadReport::default();
        // What the daemon was started with stays until a restart.
        for (key, changed) in [
            ("[database]", new.database != self.config.database),
            ("[api]", new.api != self.config.api),
            ("[plugins]", new.plugins != self.config.plugins),
        ] {
            if changed {
                report.restart_needed.push(key.to_owned());
            }
        }
        new.database = self.config.database.clone();
        new.api = self.config.api.clone();
        new.plugins = self.config.plugins.clone();
        self.config = new;

        let wanted: BTreeSet<String> = self.config.client_system_names().into_iter().collect();
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains(*name))
            .cloned()
            .collect();
        for name in removed {
            self.stop_worker(&name).await;
            match self.other_process_alive().await {
                Ok(Some(other)) => {
                    report.changes.push(format!(
                        "client system {name} removed from this process; still kept in the queue, which {other} shares"
                    ));
                    continue;
                }
                Ok(None) => {}
                Err(error) => {
                    report.refused.push(format!(
                        "client system {name} stopped, but not forgotten in the queue: {error:#}"
                    ));
                    continue;
                }
            }
            match self.queue.forget_client_system(&name).await {
                Ok(undelivered) => report.changes.push(format!(
                    "client system {name} removed; the {undelivered} readings it had not received are no longer kept for it"
                )),
                Err(error) => report.refused.push(format!(
                    "client system {name} stopped, but not forgotten in the queue: {error:#}"
                )),
            }
        }
        for cs in self.config.client_systems.clone() {
            if self.running.contains_key(&cs.name) {
                self.update_worker(&cs, &mut report).await;
            } else {
                match self.start_worker(&cs).await {
                    Ok(()) => report
                        .changes
                        .push(format!("client system {} added", cs.name)),
                    Err(error) => report
                        .refused
                        .push(format!("client system {} not started: {error:#}", cs.name)),
                }
            }
        }
        Ok(report)
    }

    /// Applies a changed `[[client_system]]` table, or changed plugin files, to its
    /// running worker.
    async fn update_worker(&mut self, cs: &ClientSystem, report: &mut ReloadReport) {
        let site_id = self.config.site.id.clone();
        let encoder_path = self.config.resolve(&cs.encoder);
        let transport_path = self.config.resolve(&cs.transport);
        let Some(running) = self.running.get(&cs.name) else {
            return;
        };
        let site_changed = running.site_id != site_id;
        let context_changed = site_changed
            || running.base_url != cs.base_url
            || running.api_key != cs.api_key
            || running.plugin_settings != cs.plugin;
        let encoder_changed = context_changed
            || running.encoder.0 != encoder_path
            || file_sha256(&encoder_path).await.ok() != Some(running.encoder.1.clone());
        let transport_changed = context_changed
            || running.transport.0 != transport_path
            || file_sha256(&transport_path).await.ok() != Some(running.transport.1.clone());
        let context = Arc::clone(&running.context);
        let status = Arc::clone(&running.status);
        let name = cs.name.clone();

        let mut refused = None;
        if encoder_changed || transport_changed {
            match self
                .load_plugins(
                    cs,
                    &site_id,
                    context_changed,
                    context,
                    encoder_changed,
                    transport_changed,
                )
                .await
            {
                Ok((context, encoder, transport)) => {
                    let Some(running) = self.running.get_mut(&name) else {
                        return;
                    };
                    let mut what = Vec::new();
                    if let Some(encoder) = &encoder {
                        what.push(format!(
                            "encoder {} {} ({})",
                            encoder.info().name,
                            encoder.info().version,
                            short(encoder.sha256())
                        ));
                        running.encoder = (encoder_path, encoder.sha256().to_owned());
                    }
                    if let Some(transport) = &transport {
                        what.push(format!(
                            "transport {} {} ({})",
                            transport.info().name,
                            transport.info().version,
                            short(transport.sha256())
                        ));
                        running.transport = (transport_path, transport.sha256().to_owned());
                    }
                    running.context = context;
                    running.site_id = site_id.clone();
                    running.base_url = cs.base_url.clone();
                    running.api_key = cs.api_key.clone();
                    running.plugin_settings = cs.plugin.clone();
                    let _ = running.control.send(Control::Plugins {
                        encoder: encoder.map(Box::new),
                        transport: transport.map(Box::new),
                    });
                    report.changes.push(format!(
                        "client system {name}: {} from its next batch",
                        what.join(" and ")
                    ));
                }
                Err(error) => {
                    let reason =
                        format!("client system {name}: {error:#}; the plugins in service stay");
                    report.refused.push(reason.clone());
                    refused = Some(reason);
                }
            }
        }

        // The worker takes the new site id only with plugins that carry it too.
        let site_moved = site_changed && refused.is_none();
        let policy = cs.local_policy(&self.config.defaults);
        if let Some(running) = self.running.get_mut(&name)
            && (running.policy != policy || running.remote_config != cs.remote_config || site_moved)
        {
            running.policy = policy.clone();
            running.remote_config = cs.remote_config;
            let _ = running.control.send(Control::Settings {
                site_id: running.site_id.clone(),
                policy,
                remote_config: cs.remote_config,
            });
            report
                .changes
                .push(format!("client system {name}: settings changed"));
        }
        status
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .reload_error = refused;
    }

    /// Compiles and checks the plugins that changed, with a new context if the
    /// Client System's base URL, key or plugin settings changed.
    #[allow(clippy::type_complexity)]
    async fn load_plugins(
        &self,
        cs: &ClientSystem,
        site_id: &str,
        context_changed: bool,
        context: Arc<PluginContext>,
        encoder_changed: bool,
        transport_changed: bool,
    ) -> Result<(
        Arc<PluginContext>,
        Option<EncoderPlugin>,
        Option<TransportPlugin>,
    )> {
        let context = if context_changed {
            self.new_context(cs, site_id)?
        } else {
            context
        };
        let encoder = if encoder_changed {
            Some(
                self.load_encoder(&self.config.resolve(&cs.encoder), &context)
                    .await?,
            )
        } else {
            None
        };
        let transport = if transport_changed {
            Some(
                self.load_transport(&self.config.resolve(&cs.transport), &context)
                    .await?,
            )
        } else {
            None
        };
        Ok((context, encoder, transport))
    }
}

/// The first 12 hex digits of a hash, enough to tell versions apart in a log line.
fn short(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}

async fn file_sha256(path: &Path) -> Result<String> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// Waits for `tasks`, at most `grace` in all.
async fn join_within(tasks: Vec<JoinHandle<()>>, grace: Duration) {
    let all = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(grace, all).await.is_err() {
        warn!(
            "workers did not stop within {grace:?}; batches in flight will be re-sent after restart"
        );
    }
}

/// Waits until no change has come for [`RELOAD_DEBOUNCE`].
pub async fn debounce(changed: &mut mpsc::UnboundedReceiver<()>) {
    while let Ok(Some(())) = tokio::time::timeout(RELOAD_DEBOUNCE, changed.recv()).await {}
}

/// Runs the supervisor's loop: reloads on file changes, SIGHUP and API requests, until
/// `shutdown` resolves; then stops the workers.
pub async fn supervise(
    mut supervisor: Supervisor,
    mut requests: mpsc::UnboundedReceiver<ReloadRequest>,
    shutdown: impl Future<Output = ()>,
) {
    let (changed, mut changes) = mpsc::unbounded_channel();
    let mut watcher = FileWatcher::new(changed);
    watcher.watch(&supervisor.watched_files());
    let mut hangups = hangup_signals();
    let pruning = tokio::spawn(
        prune_sync_log(
            supervisor.queue.clone(),
            supervisor.clock.clone(),
            supervisor.config.database.sync_log_keep,
        )
        .instrument(info_span!("sync_log")),
    );
    let mut alive = tokio::time::interval(supervisor.queue.batch_lease() / 3);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    async {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = alive.tick() => {
                    supervisor.report_alive().await;
                    continue;
                }
                Some(reply) = requests.recv() => {
                    info!("reload requested");
                    let outcome = supervisor.reload().await;
                    let _ = reply.send(outcome);
                }
                Some(()) = changes.recv() => {
                    debounce(&mut changes).await;
                    info!("configuration or plugin files changed: reloading");
                    let _ = supervisor.reload().await;
                }
                Some(()) = hangups.recv() => {
                    info!("SIGHUP: reloading");
                    let _ = supervisor.reload().await;
                }
            }
            watcher.watch(&supervisor.watched_files());
        }
    }
    .instrument(info_span!("supervisor"))
    .await;
    // A deletion cut off here rolls back; those rows go at the next start.
    pruning.abort();
    supervisor.shutdown().await;
}

/// Deletes the attempts older than `keep` from `sync_log`, at start and every
/// [`SYNC_LOG_PRUNE_EVERY`], apart from the supervisor's loop (the first prune of a
/// long log can take a while). A failure is logged and tried again at the next turn.
async fn prune_sync_log(queue: Queue, clock: Clock, keep: Duration) {
    let mut every = tokio::time::interval(SYNC_LOG_PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let before_ms = clock.now_ms().saturating_sub(crate::clock::millis(keep));
        match queue.prune_sync_log(before_ms).await {
            Ok(0) => {}
            Ok(deleted) => info!(
                "deleted {deleted} delivery attempts older than {} from sync_log",
                humantime::format_duration(keep)
            ),
            Err(error) => warn!("cannot delete old delivery attempts from sync_log: {error:#}"),
        }
    }
}

/// SIGHUP, as a channel (never sends where there is no such signal).
fn hangup_signals() -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        if tx.send(()).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(error) => warn!("cannot listen for SIGHUP: {error}"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}
