//! The engine: compiling components, checking them, instantiating them, and calling
//! them within a deadline and a memory limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder};

use super::bindings::{self, Transport, TransportPre, UploadOutcome, types, v2};
use super::cache::{self, Compiled, Origin};
use super::host::{HttpTally, PluginContext, PluginState};

/// WIT package versions this host accepts from `describe`: encoders of 0.1.0 and
/// 0.2.0, transports of 0.1.0 (0.2.0 changed the encoder world only).
pub const SUPPORTED_WIT_VERSIONS: &[&str] = &["0.1.0", "0.2.0"];

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
        // For profiling plugins with `perf`: name the compiled guest functions in
        // /tmp/perf-<pid>.map.
        if std::env::var_os("SYNCD_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // Components made by other toolchains import WASI even when they use none of it;
        // they get it with nothing granted.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Transport::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)?;
        v2::Encoder::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)?;

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

    /// Loads a component as whichever world it implements, compiled once; the error
    /// says why it is neither an encoder nor a transport.
    pub async fn load_any(&self, path: &Path, context: Arc<PluginContext>) -> Result<Loaded> {
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
        let plugin = match self
            .load_compiled(path, compiled.clone(), Arc::clone(&context))
            .await
        {
            Ok(encoder) => AnyPlugin::Encoder(encoder),
            Err(encoder_error) => match self.load_compiled(path, compiled, context).await {
                Ok(transport) => AnyPlugin::Transport(transport),
                Err(transport_error) => anyhow::bail!(
                    "{} is refused by this host.\n  as an encoder: {encoder_error:#}\n  as a transport: {transport_error:#}",
                    path.display()
                ),
            },
        };
        Ok(Loaded {
            plugin,
            imports,
            exports,
        })
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
        let compiled = self.compile(path).await?;
        self.load_compiled(path, compiled, context).await
    }

    async fn load_compiled<W: World>(
        &self,
        path: &Path,
        compiled: Compiled,
        context: Arc<PluginContext>,
    ) -> Result<Plugin<W>> {
        let Compiled {
            component,
            sha256,
            origin,
        } = compiled;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(W::prepare)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "{} is not {} for this host ({})",
                    path.display(),
                    W::ARTICLE_NAME,
                    W::WORLDS
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
        check_info(&info, W::wit_version(&plugin.pre), path)?;
        plugin.info = info;
        Ok(plugin)
    }
}

/// A component loaded as whichever world it implements, with what it imports and
/// exports (e.g. `sync:plugin/http@0.1.0`).
pub struct Loaded {
    /// The plugin.
    pub plugin: AnyPlugin,
    /// The names it imports.
    pub imports: Vec<String>,
    /// The names it exports.
    pub exports: Vec<String>,
}

/// An encoder or a transport.
pub enum AnyPlugin {
    /// An encoder (0.1.0 or 0.2.0).
    Encoder(EncoderPlugin),
    /// A transport.
    Transport(TransportPlugin),
}

impl AnyPlugin {
    /// The world's name: "encoder" or "transport".
    pub fn world(&self) -> &'static str {
        match self {
            AnyPlugin::Encoder(_) => "encoder",
            AnyPlugin::Transport(_) => "transport",
        }
    }

    /// What the plugin's `describe` said.
    pub fn info(&self) -> &types::PluginInfo {
        match self {
            AnyPlugin::Encoder(p) => p.info(),
            AnyPlugin::Transport(p) => p.info(),
        }
    }
}

/// Logs what a plugin printed during a call (stdout at debug level, stderr as a
/// warning), or lists it in the call's tally when the context lists requests.
fn pass_on_printed(
    state: &PluginState,
    context: &PluginContext,
    plugin: &str,
    tally: &mut HttpTally,
) {
    let cs = &context.client_system;
    for (stream, printed) in [("stdout", &state.stdout), ("stderr", &state.stderr)] {
        let (lines, dropped) = printed.take();
        for line in lines {
            if context.lists_requests() {
                tally.printed.push(format!("{stream}: {line}"));
            } else if stream == "stdout" {
                tracing::debug!(client_system = %cs, %plugin, "stdout: {line}");
            } else {
                tracing::warn!(client_system = %cs, %plugin, "stderr: {line}");
            }
        }
        if dropped > 0 {
            tracing::warn!(
                client_system = %cs,
                %plugin,
                "the plugin printed {dropped} more bytes on {stream} in one call than the {} kept",
                super::host::MAX_PRINTED_BYTES
            );
        }
    }
}

fn placeholder_info(path: &Path) -> types::PluginInfo {
    types::PluginInfo {
        name: path.display().to_string(),
        version: String::new(),
        wit_version: String::new(),
    }
}

/// `describe` must name a version this host supports, and the one whose world the
/// component implements.
fn check_info(info: &types::PluginInfo, implemented: &str, path: &Path) -> Result<()> {
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
    if info.wit_version != implemented {
        bail!(
            "{} ({} {}) says it was built for WIT sync:plugin@{}, but it implements the world of {implemented}",
            path.display(),
            info.name,
            info.version,
            info.wit_version,
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
    /// The world's name with its article, for messages: "an encoder".
    const ARTICLE_NAME: &'static str;
    /// The worlds accepted, fully named, for messages.
    const WORLDS: &'static str;
    /// The pre-instantiated component.
    type Pre: Send + Sync + 'static;
    /// Checks a component against the world.
    fn prepare(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre>;
    /// The version of the WIT package whose world the component implements.
    fn wit_version(pre: &Self::Pre) -> &'static str;
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

/// An encoder of either WIT version: 0.1.0 receives its batch as a list of records,
/// 0.2.0 as columns.
pub enum Encoder {
    /// `sync:plugin/encoder@0.1.0`.
    V1(bindings::Encoder),
    /// `sync:plugin/encoder@0.2.0`.
    V2(v2::Encoder),
}

/// A pre-instantiated encoder of either version.
pub enum EncoderPre {
    /// `sync:plugin/encoder@0.1.0`.
    V1(bindings::EncoderPre<PluginState>),
    /// `sync:plugin/encoder@0.2.0`.
    V2(v2::EncoderPre<PluginState>),
}

impl World for Encoder {
    const ARTICLE_NAME: &'static str = "an encoder";
    const WORLDS: &'static str = "world sync:plugin/encoder@0.2.0 or @0.1.0";
    type Pre = EncoderPre;
    fn prepare(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
        match v2::EncoderPre::new(pre.clone()) {
            Ok(pre) => Ok(EncoderPre::V2(pre)),
            Err(v2_error) => match bindings::EncoderPre::new(pre) {
                Ok(pre) => Ok(EncoderPre::V1(pre)),
                Err(v1_error) => Err(v1_error.context(format!("as 0.2.0: {v2_error:#}; as 0.1.0"))),
            },
        }
    }
    fn wit_version(pre: &Self::Pre) -> &'static str {
        match pre {
            EncoderPre::V1(_) => "0.1.0",
            EncoderPre::V2(_) => "0.2.0",
        }
    }
    async fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<Self> {
        Ok(match pre {
            EncoderPre::V1(pre) => Encoder::V1(pre.instantiate_async(store).await?),
            EncoderPre::V2(pre) => Encoder::V2(pre.instantiate_async(store).await?),
        })
    }
    async fn describe(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<types::PluginInfo> {
        Ok(match self {
            Encoder::V1(e) => e.call_describe(store).await?,
            Encoder::V2(e) => {
                let info = e.call_describe(store).await?;
                types::PluginInfo {
                    name: info.name,
                    version: info.version,
                    wit_version: info.wit_version,
                }
            }
        })
    }
    fn default_deadline(_: &PluginContext) -> Duration {
        ENCODE_DEADLINE
    }
}

impl World for Transport {
    const ARTICLE_NAME: &'static str = "a transport";
    const WORLDS: &'static str = "world sync:plugin/transport@0.1.0";
    type Pre = TransportPre<PluginState>;
    fn prepare(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
        TransportPre::new(pre)
    }
    fn wit_version(_: &Self::Pre) -> &'static str {
        "0.1.0"
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
        pass_on_printed(
            store.data(),
            &self.context,
            &self.info.name,
            &mut self.last_tally,
        );
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
    /// Encodes a batch given in columns (see [`Columns`]), as the daemon hands it over.
    /// `Ok(Err(reason))` is the plugin refusing the batch.
    pub async fn encode(
        &mut self,
        info: &types::BatchInfo,
        readings: &Columns,
    ) -> Result<Result<types::EncodedBatch, String>, CallError> {
        match &self.pre {
            EncoderPre::V1(_) => {
                let records = records(readings);
                self.encode_v1(info, &records).await
            }
            EncoderPre::V2(_) => self.encode_v2(info, readings).await,
        }
    }

    /// Encodes a batch given as a list of readings.
    pub async fn encode_records(
        &mut self,
        info: &types::BatchInfo,
        readings: &[types::Reading],
    ) -> Result<Result<types::EncodedBatch, String>, CallError> {
        match &self.pre {
            EncoderPre::V1(_) => self.encode_v1(info, readings).await,
            EncoderPre::V2(_) => self.encode_v2(info, &columns(readings)?).await,
        }
    }

    async fn encode_v1(
        &mut self,
        info: &types::BatchInfo,
        readings: &[types::Reading],
    ) -> Result<Result<types::EncodedBatch, String>, CallError> {
        self.call(async |b, s| match b {
            Encoder::V1(b) => b.call_encode(s, info, readings).await,
            Encoder::V2(_) => unreachable!("the instance follows its pre"),
        })
        .await
    }

    async fn encode_v2(
        &mut self,
        info: &types::BatchInfo,
        readings: &Columns,
    ) -> Result<Result<types::EncodedBatch, String>, CallError> {
        let info = v2::types::BatchInfo {
            batch_id: info.batch_id.clone(),
            site_id: info.site_id.clone(),
            client_system: info.client_system.clone(),
            attempt: info.attempt,
        };
        let encoded = self
            .call(async |b, s| match b {
                Encoder::V2(b) => b.call_encode(s, &info, readings).await,
                Encoder::V1(_) => unreachable!("the instance follows its pre"),
            })
            .await?;
        Ok(encoded.map(|e| types::EncodedBatch {
            content_type: e.content_type,
            body: e.body,
            reading_count: e.reading_count,
        }))
    }
}

/// A batch laid out column by column, as WIT 0.2.0 hands it to an encoder: one list
/// per field, the strings of a field end to end in one text with their end offsets.
/// Handing over a dozen lists costs a plugin far less than a list of records, whose
/// every string is its own allocation inside the plugin.
pub type Columns = v2::types::Readings;

/// Builds [`Columns`] one reading at a time.
pub struct ColumnsBuilder {
    columns: Columns,
}

impl ColumnsBuilder {
    /// Room for `n` readings of the usual sizes.
    pub fn with_capacity(n: usize) -> Self {
        /// A column of strings with room for `n`, of `bytes` bytes each on average.
        fn strings(n: usize, bytes: usize) -> v2::types::Strings {
            v2::types::Strings {
                text: String::with_capacity(n * bytes),
                ends: Vec::with_capacity(n),
            }
        }
        Self {
            columns: Columns {
                ids: Vec::with_capacity(n),
                meter_ids: strings(n, 16),
                channels: strings(n, 12),
                timestamps_ms: Vec::with_capacity(n),
                values: Vec::with_capacity(n),
                units: strings(n, 4),
                qualities: strings(n, 4),
                attribute_ends: Vec::with_capacity(n),
                attribute_keys: strings(0, 0),
                attribute_values: strings(0, 0),
            },
        }
    }

    /// Appends one reading.
    #[allow(clippy::too_many_arguments)]
    pub fn push<'a>(
        &mut self,
        id: u64,
        meter_id: &str,
        channel: &str,
        timestamp_ms: i64,
        value: f64,
        unit: &str,
        quality: &str,
        attributes: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        fn push(column: &mut v2::types::Strings, s: &str) {
            column.text.push_str(s);
            // A column past 4 GiB is refused by `finish`.
            column
                .ends
                .push(u32::try_from(column.text.len()).unwrap_or(u32::MAX));
        }
        let c = &mut self.columns;
        c.ids.push(id);
        push(&mut c.meter_ids, meter_id);
        push(&mut c.channels, channel);
        c.timestamps_ms.push(timestamp_ms);
        c.values.push(value);
        push(&mut c.units, unit);
        push(&mut c.qualities, quality);
        for (k, v) in attributes {
            push(&mut c.attribute_keys, k);
            push(&mut c.attribute_values, v);
        }
        c.attribute_ends
            .push(u32::try_from(c.attribute_keys.ends.len()).unwrap_or(u32::MAX));
    }

    /// The columns; an error for a batch whose text cannot be addressed by a 32-bit
    /// plugin (far beyond the plugin's memory limit anyway).
    pub fn finish(self) -> Result<Columns, CallError> {
        let c = self.columns;
        let longest = [
            &c.meter_ids,
            &c.channels,
            &c.units,
            &c.qualities,
            &c.attribute_keys,
            &c.attribute_values,
        ]
        .iter()
        .map(|column| column.text.len())
        .max()
        .unwrap_or(0);
        if longest >= u32::MAX as usize {
            return Err(CallError::Trap(anyhow::anyhow!(
                "the batch's text ({longest} bytes in one column) cannot be handed to a plugin: over 4 GiB"
            )));
        }
        Ok(c)
    }
}

/// Readings as [`Columns`].
pub fn columns(readings: &[types::Reading]) -> Result<Columns, CallError> {
    let mut builder = ColumnsBuilder::with_capacity(readings.len());
    for r in readings {
        builder.push(
            r.id,
            &r.meter_id,
            &r.channel,
            r.timestamp_ms,
            r.value,
            &r.unit,
            &r.quality,
            r.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
    }
    builder.finish()
}

/// [`Columns`] as a list of readings, for encoders of WIT 0.1.0. The columns are the
/// host's own, built by [`ColumnsBuilder`], so they hold together.
fn records(c: &Columns) -> Vec<types::Reading> {
    fn strings(column: &v2::types::Strings) -> Vec<String> {
        let mut start = 0;
        column
            .ends
            .iter()
            .map(|&end| {
                let end = end as usize;
                let s = column.text.get(start..end).unwrap_or_default().to_owned();
                start = end;
                s
            })
            .collect()
    }
    let mut pairs = strings(&c.attribute_keys)
        .into_iter()
        .zip(strings(&c.attribute_values));
    let mut taken = 0;
    let texts = strings(&c.meter_ids)
        .into_iter()
        .zip(strings(&c.channels))
        .zip(strings(&c.units).into_iter().zip(strings(&c.qualities)));
    c.ids
        .iter()
        .zip(&c.timestamps_ms)
        .zip(&c.values)
        .zip(&c.attribute_ends)
        .zip(texts)
        .map(
            |((((&id, &timestamp_ms), &value), &end), ((meter_id, channel), (unit, quality)))| {
                let count = (end as usize).saturating_sub(taken);
                taken += count;
                types::Reading {
                    id,
                    meter_id,
                    channel,
                    timestamp_ms,
                    value,
                    unit,
                    quality,
                    attributes: pairs.by_ref().take(count).collect(),
                }
            },
        )
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(id: u64, meter: &str, attributes: &[(&str, &str)]) -> types::Reading {
        types::Reading {
            id,
            meter_id: meter.into(),
            channel: String::new(),
            timestamp_ms: id as i64,
            value: id as f64 / 2.0,
            unit: "kWh".into(),
            quality: "good".into(),
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    /// String `i` of a column, as a plugin reads it.
    fn nth(column: &v2::types::Strings, i: usize) -> &str {
        let start = if i == 0 {
            0
        } else {
            column.ends[i - 1] as usize
        };
        &column.text[start..column.ends[i] as usize]
    }

    #[test]
    fn columns_hold_every_field_of_every_reading() {
        let rows = [
            reading(7, "élec-1", &[("phase", "L1"), ("ct", "200/5")]),
            reading(8, "water-2", &[]),
            reading(9, "", &[("k", "")]),
        ];
        let c = columns(&rows).unwrap();
        assert_eq!(c.ids, [7, 8, 9]);
        assert_eq!(c.timestamps_ms, [7, 8, 9]);
        assert_eq!(c.values, [3.5, 4.0, 4.5]);
        let meters: Vec<&str> = (0..3).map(|i| nth(&c.meter_ids, i)).collect();
        assert_eq!(meters, ["élec-1", "water-2", ""]);
        assert_eq!(c.channels.ends, [0, 0, 0]);
        assert_eq!(nth(&c.units, 2), "kWh");
        assert_eq!(nth(&c.qualities, 1), "good");
        // Reading 0 has pairs 0..2, reading 1 none, reading 2 pair 2..3.
        assert_eq!(c.attribute_ends, [2, 2, 3]);
        let keys: Vec<&str> = (0..3).map(|i| nth(&c.attribute_keys, i)).collect();
        let values: Vec<&str> = (0..3).map(|i| nth(&c.attribute_values, i)).collect();
        assert_eq!(keys, ["phase", "ct", "k"]);
        assert_eq!(values, ["L1", "200/5", ""]);
    }

    #[test]
    fn columns_read_back_as_the_same_readings() {
        let rows = [
            reading(7, "élec-1", &[("phase", "L1"), ("ct", "200/5")]),
            reading(8, "water-2", &[]),
            reading(9, "", &[("k", "")]),
            reading(10, "gas-3", &[("a", "1"), ("b", "2"), ("c", "3")]),
        ];
        let back = records(&columns(&rows).unwrap());
        assert_eq!(format!("{back:?}"), format!("{rows:?}"));
        assert!(records(&columns(&[]).unwrap()).is_empty());
    }
}
