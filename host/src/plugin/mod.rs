//! WebAssembly plugins: the bindings of the WIT package, the host imports, and the
//! engine that loads, checks and calls components within their limits.
pub mod bindings;
pub mod cache;
pub mod host;
pub mod kit;
pub mod output;
pub mod runtime;

pub use host::PluginContext;
pub use runtime::{
    CallError, Columns, ColumnsBuilder, EncoderPlugin, PluginEngine, TransportPlugin, columns,
};
