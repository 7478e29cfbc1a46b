//! The engine: compiling components, checking them, instantiating them, and calling
//! them within a deadline and a memory limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder};

use super::bindings::{Encoder, EncoderPre, Transport, TransportPre, UploadOutcome, types};
use super::cache::{self, Compiled, Origin};
use super::host::{HttpTally, PluginContext, PluginState};

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
    /// Where compiled components are kept, if anywhere.
    cache_dir: Option<Arc<PathBuf>>,
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
            cache_dir: None,
        })
    }

    /// Keeps compiled components in `dir` (see [`cache`]).
    pub fn with_cache_dir(mut self, dir: PathBuf) -> Self {
        self.cache_dir = Some(Arc::new(dir));
        self
    }

    /// Compiles a component, or loads it from the cache, on a blocking thread
    /// (compilation is CPU work).
    pub async fn compile(&self, path: &Path) -> Result<Compiled> {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("cannot read plugin {}", path.display()))?;
        let engine = self.engine.clone();
        let cache_dir = self.cache_dir.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            cache::compile(
                &engine,
                cache_dir.as_deref().map(PathBuf::as_path),
                &path,
                &bytes,
            )
        })
        .await?
    }

    /// The names a component imports and exports, e.g. `sync:plugin/http@0.1.0`.
    pub async fn interface(&self, path: &Path) -> Result<(Vec<String>, Vec<String>)> {
        let compiled = self.compile(path).await?;
        let ty = compiled.component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        Ok((imports, exports))
    }

    /// Loads an encoder: compiles it, checks its world and its `describe`.
    pub async fn load_encoder(
        &self,
        path: &Path,
        context: Arc<PluginContext>,
    ) -> Result<EncoderPlugin> {
        self.load(path, context).await
    }

    /// Loads a transport: compiles it, checks its world and its `describe`.
    pub async fn load_transport(
        &self,
        path: &Path,
        context: Arc<PluginContext>,
    ) -> Result<TransportPlugin> {
        self.load(path, context).await
    }

    async fn load<W: World>(&self, path: &Path, context: Arc<PluginContext>) -> Result<Plugin<W>> {
        let Compiled {
            component,
            sha256,
            origin,
        } = self.compile(path).await?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(W::prepare)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "{} is not {} for this host (world sync:plugin/{}@0.1.0)",
                    path.display(),
                    W::ARTICLE_NAME,
                    W::NAME
                )
            })?;
        let mut plugin: Plugin<W> = Plugin {
            engine: self.engine.clone(),
            pre,
            deadline: None,
            context,
            info: placeholder_info(path),
            path: path.to_owned(),
            sha256,
            origin,
            instance: None,
            last_tally: HttpTally::default(),
        };
        let info = plugin
            .call(async |bindings, store| bindings.describe(store).await)
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

/// What differs between the plugin worlds.
pub trait World: Sized + Send + 'static {
    /// The world's name in the WIT package, e.g. "encoder".
    const NAME: &'static str;
    /// The world's name with its article, for messages: "an encoder".
    const ARTICLE_NAME: &'static str;
    /// The pre-instantiated component.
    type Pre: Send + Sync + 'static;
    /// Checks a component against the world.
    fn prepare(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre>;
    /// Makes an instance.
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<PluginState>,
    ) -> impl Future<Output = wasmtime::Result<Self>> + Send;
    /// Calls the plugin's `describe`.
    fn describe(
        &self,
        store: &mut Store<PluginState>,
    ) -> impl Future<Output = wasmtime::Result<types::PluginInfo>> + Send;
    /// The deadline of one call.
    fn default_deadline(context: &PluginContext) -> Duration;
}

impl World for Encoder {
    const NAME: &'static str = "encoder";
    const ARTICLE_NAME: &'static str = "an encoder";
    type Pre = EncoderPre<PluginState>;
    fn prepare(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
        EncoderPre::new(pre)
    }
    async fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<Self> {
        pre.instantiate_async(store).await
    }
    async fn describe(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<types::PluginInfo> {
        self.call_describe(store).await
    }
    fn default_deadline(_: &PluginContext) -> Duration {
        ENCODE_DEADLINE
    }
}

impl World for Transport {
    const NAME: &'static str = "transport";
    const ARTICLE_NAME: &'static str = "a transport";
    type Pre = TransportPre<PluginState>;
    fn prepare(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
        TransportPre::new(pre)
    }
    async fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<Self> {
        pre.instantiate_async(store).await
    }
    async fn describe(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<types::PluginInfo> {
        self.call_describe(store).await
    }
    /// A transport call may make a few requests (authenticate, then upload), each
    /// bounded by `request_timeout`.
    fn default_deadline(context: &PluginContext) -> Duration {
        context.request_timeout() * 3 + Duration::from_secs(5)
    }
}

/// A loaded plugin of world `W`, with an instance kept between calls (a transport keeps
/// its credentials in it) and made again after a call fails.
pub struct Plugin<W: World> {
    engine: Engine,
    pre: W::Pre,
    context: Arc<PluginContext>,
    /// A deadline set for every call, instead of the world's default.
    deadline: Option<Duration>,
    info: types::PluginInfo,
    path: PathBuf,
    sha256: String,
    origin: Origin,
    instance: Option<(Store<PluginState>, W)>,
    last_tally: HttpTally,
}

/// A loaded encoder.
pub type EncoderPlugin = Plugin<Encoder>;
/// A loaded transport.
pub type TransportPlugin = Plugin<Transport>;

impl<W: World> Plugin<W> {
    /// What the plugin said of itself.
    pub fn info(&self) -> &types::PluginInfo {
        &self.info
    }

    /// The component file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 of the component file, in hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether it was compiled on loading or came from the cache.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// What the plugin may know and reach.
    pub fn context(&self) -> &PluginContext {
        &self.context
    }

    /// Sets the deadline of each call, instead of the world's default (which, for a
    /// transport, follows the request timeout).
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = Some(deadline);
    }

    /// Runs one call within the deadline, on the kept instance or a new one; a call
    /// that fails drops the instance.
    async fn call<T>(
        &mut self,
        call: impl AsyncFnOnce(&W, &mut Store<PluginState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let deadline = self
            .deadline
            .unwrap_or_else(|| W::default_deadline(&self.context));
        if self.instance.is_none() {
            let mut store = new_store(&self.engine, &self.context, &self.info.name);
            let pre = &self.pre;
            let bindings = bounded(&mut store, deadline, async |s| W::instantiate(pre, s).await)
                .await
                .map_err(|e| match e {
                    CallError::Trap(e) => CallError::Trap(e.context("instantiation failed")),
                    deadline => deadline,
                })?;
            self.instance = Some((store, bindings));
        }
        let Some((store, bindings)) = self.instance.as_mut() else {
            unreachable!("the instance was made above");
        };
        store.data_mut().tally = HttpTally::default();
        let bindings = &*bindings;
        let result = bounded(store, deadline, async |s| call(bindings, s).await).await;
        self.last_tally = std::mem::take(&mut store.data_mut().tally);
        if result.is_err() {
            self.instance = None;
        }
        result
    }

    /// What the requests of the last call came to.
    pub fn last_tally(&self) -> &HttpTally {
        &self.last_tally
    }
}

impl Plugin<Encoder> {
    /// Encodes a batch. `Ok(Err(reason))` is the plugin refusing the batch.
    pub async fn encode(
        &mut self,
        info: &types::BatchInfo,
        readings: &[types::Reading],
    ) -> Result<Result<types::EncodedBatch, String>, CallError> {
        self.call(async |b, s| b.call_encode(s, info, readings).await)
            .await
    }
}

impl Plugin<Transport> {
    /// Asks the plugin for fresh credentials.
    pub async fn authenticate(&mut self) -> Result<Result<(), String>, CallError> {
        self.call(async |b, s| b.call_authenticate(s).await).await
    }

    /// Delivers a batch.
    pub async fn upload(
        &mut self,
        info: &types::BatchInfo,
        batch: &types::EncodedBatch,
    ) -> Result<UploadOutcome, CallError> {
        self.call(async |b, s| b.call_upload(s, info, batch).await)
            .await
    }

    /// Checks that the Client System answers.
    pub async fn probe(&mut self) -> Result<Result<(), String>, CallError> {
        self.call(async |b, s| b.call_probe(s).await).await
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(
        &mut self,
        status: &types::SiteStatus,
    ) -> Result<Result<(), String>, CallError> {
        self.call(async |b, s| b.call_heartbeat(s, status).await)
            .await
    }

    /// Downloads the remote configuration.
    pub async fn fetch_config(
        &mut self,
    ) -> Result<Result<Option<types::RemoteConfig>, String>, CallError> {
        self.call(async |b, s| b.call_fetch_config(s).await).await
    }
}
