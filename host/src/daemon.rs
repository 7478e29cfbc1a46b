//! The supervisor: opens the queue, loads the plugins, starts a worker per Client
//! System and the local API, and stops them all on shutdown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::api;
use crate::config::Config;
use crate::plugin::{PluginContext, PluginEngine};
use crate::queue::Queue;
use crate::sync::Worker;

/// How long workers get to finish the batch in flight on shutdown. A batch cut off is
/// not lost: it is recorded and re-sent, with the same id, after the restart.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The HTTP client every plugin request goes through.
pub fn http_client() -> Result<reqwest::Client> {
    // Several crates may race to install a provider; any installed one will do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("syncd/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("failed to build the HTTP client")
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let queue = Queue::open_for(&config).await?;
    let names = Arc::new(config.client_system_names());

    let engine = PluginEngine::new()?;
    let http = http_client()?;
    let mut workers = Vec::new();
    let mut triggers = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    for cs in &config.client_systems {
        let policy = cs.policy(&config.defaults);
        let context = Arc::new(PluginContext::new(
            &config.site.id,
            &cs.name,
            &cs.base_url,
            cs.plugin_settings(),
            cs.api_key.clone(),
            policy.request_timeout,
            http.clone(),
        )?);
        let encoder = engine
            .load_encoder(&config.resolve(&cs.encoder), Arc::clone(&context))
            .await
            .with_context(|| format!("client system {}: encoder", cs.name))?;
        let transport = engine
            .load_transport(&config.resolve(&cs.transport), context)
            .await
            .with_context(|| format!("client system {}: transport", cs.name))?;
        let trigger = Arc::new(Notify::new());
        triggers.insert(cs.name.clone(), Arc::clone(&trigger));
        let worker = Worker::new(
            cs.name.clone(),
            config.site.id.clone(),
            policy,
            queue.clone(),
            encoder,
            transport,
            Arc::clone(&names),
            trigger,
        );
        statuses.insert(cs.name.clone(), worker.status());
        workers.push(worker);
    }

    let (stop, stopped) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot listen on {} ([api] listen)", config.api.listen))?;
    info!(
        site = %config.site.id,
        api = %config.api.listen,
        client_systems = workers.len(),
        "syncd started"
    );
    let api_task = tokio::spawn(api::serve(
        listener,
        api::State {
            triggers: Arc::new(triggers),
            statuses: Arc::new(statuses),
            site_id: config.site.id.clone(),
            queue: queue.clone(),
        },
        stopped.clone(),
    ));
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(w.run(stopped.clone())))
        .collect();

    shutdown.await;
    info!("shutting down");
    let _ = stop.send(true);
    let all = futures_join(handles);
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        warn!(
            "workers did not stop within {SHUTDOWN_GRACE:?}; batches in flight will be re-sent after restart"
        );
    }
    let _ = api_task.await;
    info!("stopped");
    Ok(())
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
