//! The daemon: the supervisor with its workers, and the local API, from start to
//! shutdown.

use anyhow::{Context, Result};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::info;

use crate::api;
use crate::clock::Clock;
use crate::config::Config;
use crate::connectivity::Event;
use crate::supervisor::{Supervisor, supervise};

/// The HTTP client every plugin request goes through.
pub fn http_client() -> Result<reqwest::Client> {
    // Several crates may race to install a provider; any installed one will do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("syncd/", env!("CARGO_PKG_VERSION")))
        // Plugins send through this client, and may only reach their Client System's
        // base URL: a redirect elsewhere is handed to the plugin as the 3xx it is,
        // never followed.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("failed to build the HTTP client")
}

/// How many connectivity events wait for a slow listener before it misses some.
const EVENT_BACKLOG: usize = 256;

/// What a run of the daemon gets besides its configuration.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Where time comes from (a manual clock in tests).
    pub clock: Clock,
    /// Where the workers publish connectivity changes; subscribe to hear them.
    pub events: broadcast::Sender<Event>,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            clock: Clock::system(),
            events: broadcast::Sender::new(EVENT_BACKLOG),
        }
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_with(config, Runtime::default(), shutdown).await
}

/// Runs the daemon in `runtime` until `shutdown` resolves.
pub async fn run_with(
    config: Config,
    runtime: Runtime,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Runtime { clock, events } = runtime;
    let supervisor = Supervisor::start(config, clock.clone(), events).await?;
    let listen = supervisor.config().api.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} ([api] listen)"))?;
    info!(
        site = %supervisor.config().site.id,
        api = %listen,
        client_systems = supervisor.config().client_systems.len(),
        "syncd started"
    );
    let (reload, reloads) = mpsc::unbounded_channel();
    let (stop_api, api_stopped) = watch::channel(false);
    let api_task = tokio::spawn(api::serve(
        listener,
        api::State {
            workers: supervisor.workers(),
            config: supervisor.config_status(),
            clock,
            queue: supervisor.queue().clone(),
            reload,
            ingested: Default::default(),
            token: supervisor.config().api.token.clone(),
        },
        api_stopped,
    ));
    supervise(supervisor, reloads, async {
        shutdown.await;
        info!("shutting down");
    })
    .await;
    let _ = stop_api.send(true);
    let _ = api_task.await;
    info!("stopped");
    Ok(())
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
