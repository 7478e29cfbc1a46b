//! The engine: compiling components, checking them, instantiating them, and calling
//! them within a deadline and a memory limit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder};

use super::bindings::{Encoder, EncoderPre, Transport, TransportPre, types};
use super::host::{PluginContext, PluginState};

/// WIT package versions this host accepts from `describe`.
pub const SUPPORTED_WIT_VERSIONS: &[&str] = &["0.1.0"];

/// Linear memory one plugin instance may use.
pub const MEMORY_LIMIT_BYTES: usize = 256 * 1024 * 1024;

/// How often the engine's epoch advances. A running guest yields to the async runtime
/// at each tick, which is what lets a deadline cut off a guest stuck in a loop; a
/// shorter tick cuts it off sooner and costs a little more.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Deadline of an encoder call, and of `describe`.
pub const ENCODE_DEADLINE: Duration = Duration::from_secs(10);

/// Why a call into a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call ran past its deadline and was cut off.
    #[error("the plugin call ran past its deadline of {0:?} and was cut off")]
    Deadline(Duration),
    /// The plugin trapped (a panic, an out-of-bounds access, the memory limit...).
    #[error("the plugin trapped: {0:#}")]
    Trap(anyhow::Error),
}

/// One engine for every plugin, and the linker with the host imports.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    linker: Arc<Linker<PluginState>>,
}

impl PluginEngine {
    /// Makes the engine and starts its epoch ticker.
    pub fn new() -> Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // Components made by other toolchains import WASI even when they use none of it;
        // they get it with nothing granted.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Transport::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .context("failed to start the epoch thread")?;

        Ok(Self {
            engine,
            linker: Arc::new(linker),
        })
    }

    /// Compiles a component, on a blocking thread (compilation is CPU work).
    pub async fn compile(&self, path: &Path) -> Result<Component> {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("cannot read plugin {}", path.display()))?;
        let engine = self.engine.clone();
        let display = path.display().to_string();
        tokio::task::spawn_blocking(move || {
            Component::new(&engine, &bytes)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("{display} is not a valid WebAssembly component"))
        })
        .await?
    }

    /// Loads an encoder: compiles it, checks its world and its `describe`.
    pub async fn load_encoder(
        &self,
        path: &Path,
        context: Arc<PluginContext>,
    ) -> Result<EncoderPlugin> {
        let component = self.compile(path).await?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .and_then(|pre| EncoderPre::new(pre).map_err(anyhow::Error::from))
            .with_context(|| {
                format!(
                    "{} is not an encoder for this host (world sync:plugin/encoder@0.1.0)",
                    path.display()
                )
            })?;
        let mut plugin = EncoderPlugin {
            engine: self.engine.clone(),
            pre,
            context,
            deadline: ENCODE_DEADLINE,
            info: placeholder_info(path),
            instance: None,
        };
        let info = plugin
            .describe()
            .await
            .with_context(|| format!("{}: describe failed", path.display()))?;
        check_info(&info, path)?;
        plugin.info = info;
        Ok(plugin)
    }

    /// Loads a transport: compiles it, checks its world and its `describe`.
    pub async fn load_transport(
        &self,
        path: &Path,
        context: Arc<PluginContext>,
    ) -> Result<TransportPlugin> {
        let component = self.compile(path).await?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .and_then(|pre| TransportPre::new(pre).map_err(anyhow::Error::from))
            .with_context(|| {
                format!(
                    "{} is not a transport for this host (world sync:plugin/transport@0.1.0)",
                    path.display()
                )
            })?;
        let mut plugin = TransportPlugin {
            engine: self.engine.clone(),
            pre,
            context,
            info: placeholder_info(path),
            instance: None,
        };
        let info = plugin
            .describe()
            .await
            .with_context(|| format!("{}: describe failed", path.display()))?;
        check_info(&info, path)?;
        plugin.info = info;
        Ok(plugin)
    }
}

fn placeholder_info(path: &Path) -> types::PluginInfo {
    types::PluginInfo {
        name: path.display().to_string(),
        version: String::new(),
        wit_version: String::new(),
    }
}

fn check_info(info: &types::PluginInfo, path: &Path) -> Result<()> {
    if !SUPPORTED_WIT_VERSIONS.contains(&info.wit_version.as_str()) {
        bail!(
            "{} ({} {}) was built for WIT sync:plugin@{}, but this host supports {}",
            path.display(),
            info.name,
            info.version,
            info.wit_version,
            SUPPORTED_WIT_VERSIONS.join(", ")
        );
    }
    Ok(())
}

fn new_store(engine: &Engine, context: &Arc<PluginContext>, plugin: &str) -> Store<PluginState> {
    let limits = StoreLimitsBuilder::new()
        .memory_size(MEMORY_LIMIT_BYTES)
        .trap_on_grow_failure(true)
        .build();
    let mut store = Store::new(
        engine,
        PluginState::new(Arc::clone(context), plugin.to_owned(), limits),
    );
    store.limiter(|state| &mut state.limits);
    // Yield to the async runtime at every epoch tick, from instantiation on: that is
    // what lets a deadline (a tokio timeout) cut off a guest that never returns.
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);
    store
}

/// Runs one call into a guest within `deadline`. The guest yields to the runtime at
/// every epoch tick, so the timeout fires even while it computes; a call cut off or
/// trapped leaves the instance unusable, and the caller drops it.
async fn bounded<T>(
    store: &mut Store<PluginState>,
    deadline: Duration,
    call: impl AsyncFnOnce(&mut Store<PluginState>) -> wasmtime::Result<T>,
) -> Result<T, CallError> {
    match tokio::time::timeout(deadline, call(store)).await {
        Err(_) => Err(CallError::Deadline(deadline)),
        Ok(Err(trap)) => Err(CallError::Trap(trap.into())),
        Ok(Ok(value)) => Ok(value),
    }
}

/// A loaded encoder, with an instance kept between calls (made again after a failure).
pub struct EncoderPlugin {
    engine: Engine,
    pre: EncoderPre<PluginState>,
    context: Arc<PluginContext>,
    deadline: Duration,
    info: types::PluginInfo,
    instance: Option<(Store<PluginState>, Encoder)>,
}

impl EncoderPlugin {
    /// What the plugin said of itself.
    pub fn info(&self) -> &types::PluginInfo {
        &self.info
    }

    async fn instance(&mut self) -> Result<&mut (Store<PluginState>, Encoder), CallError> {
        if self.instance.is_none() {
            let mut store = new_store(&self.engine, &self.context, &self.info.name);
            let pre = &self.pre;
            let bindings = bounded(&mut store, ENCODE_DEADLINE, async |s| {
                pre.instantiate_async(s).await
            })
            .await
            .map_err(|e| match e {
                CallError::Trap(e) => CallError::Trap(e.context("instantiation failed")),
                deadline => deadline,
            })?;
            self.instance = Some((store, bindings));
        }
        Ok(self.instance.as_mut().expect("instance was just made"))
    }

    /// Sets the deadline of each call (default [`ENCODE_DEADLINE`]).
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    async fn describe(&mut self) -> Result<types::PluginInfo, CallError> {
        let deadline = self.deadline;
        let (store, bindings) = self.instance().await?;
        let bindings = &*bindings;
        let result = bounded(store, deadline, async |s| bindings.call_describe(s).await).await;
        self.forget_on_failure(result)
    }

    /// Encodes a batch. `Ok(Err(reason))` is the plugin refusing the batch.
    pub async fn encode(
        &mut self,
        info: &types::BatchInfo,
        readings: &[types::Reading],
    ) -> Result<Result<types::EncodedBatch, String>, CallError> {
        let deadline = self.deadline;
        let (store, bindings) = self.instance().await?;
        let bindings = &*bindings;
        let result = bounded(store, deadline, async |s| {
            bindings.call_encode(s, info, readings).await
        })
        .await;
        self.forget_on_failure(result)
    }

    fn forget_on_failure<T>(&mut self, result: Result<T, CallError>) -> Result<T, CallError> {
        if result.is_err() {
            self.instance = None;
        }
        result
    }
}

/// A loaded transport, with an instance kept between calls (it holds the plugin's
/// credentials) and made again after a failure.
pub struct TransportPlugin {
    engine: Engine,
    pre: TransportPre<PluginState>,
    context: Arc<PluginContext>,
    info: types::PluginInfo,
    instance: Option<(Store<PluginState>, Transport)>,
}

/// Generates a bounded call of a transport export.
macro_rules! transport_call {
    ($(#[$doc:meta])* $name:ident => $call:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        pub async fn $name(&mut self, $($arg: $ty),*) -> Result<$ret, CallError> {
            let deadline = self.deadline();
            let (store, bindings) = self.instance().await?;
            let bindings = &*bindings;
            let result = bounded(store, deadline, async |s| bindings.$call(s, $($arg),*).await).await;
            self.forget_on_failure(result)
        }
    };
}

impl TransportPlugin {
    /// What the plugin said of itself.
    pub fn info(&self) -> &types::PluginInfo {
        &self.info
    }

    /// A transport call may make a few requests (authenticate, then upload), each
    /// bounded by `request_timeout`.
    fn deadline(&self) -> Duration {
        self.context.request_timeout * 3 + Duration::from_secs(5)
    }

    async fn instance(&mut self) -> Result<&mut (Store<PluginState>, Transport), CallError> {
        if self.instance.is_none() {
            let mut store = new_store(&self.engine, &self.context, &self.info.name);
            let pre = &self.pre;
            let bindings = bounded(&mut store, ENCODE_DEADLINE, async |s| {
                pre.instantiate_async(s).await
            })
            .await
            .map_err(|e| match e {
                CallError::Trap(e) => CallError::Trap(e.context("instantiation failed")),
                deadline => deadline,
            })?;
            self.instance = Some((store, bindings));
        }
        Ok(self.instance.as_mut().expect("instance was just made"))
    }

    fn forget_on_failure<T>(&mut self, result: Result<T, CallError>) -> Result<T, CallError> {
        if result.is_err() {
            self.instance = None;
        }
        result
    }

    transport_call!(
        /// Asks the plugin to describe itself.
        describe => call_describe() -> types::PluginInfo
    );
    transport_call!(
        /// Asks the plugin for fresh credentials.
        authenticate => call_authenticate() -> Result<(), String>
    );
    transport_call!(
        /// Delivers a batch.
        upload => call_upload(info: &types::BatchInfo, batch: &types::EncodedBatch) -> super::bindings::UploadOutcome
    );
    transport_call!(
        /// Checks that the Client System answers.
        probe => call_probe() -> Result<(), String>
    );
    transport_call!(
        /// Sends a heartbeat.
        heartbeat => call_heartbeat(status: &types::SiteStatus) -> Result<(), String>
    );
    transport_call!(
        /// Downloads the remote configuration.
        fetch_config => call_fetch_config() -> Result<Option<types::RemoteConfig>, String>
    );
}
