//! syncd: a store-and-forward sync daemon for meter readings.
//!
//! Readings are queued in a local database ([`queue`]) and delivered in batches to one
//! or more Client Systems by a worker each ([`sync`]); how a batch is encoded and
//! delivered is up to WebAssembly plugins ([`plugin`]) named in `sync.toml`
//! ([`config`]).
#![warn(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod connectivity;
pub mod daemon;
pub mod metrics;
pub mod plugin;
pub mod queue;
pub mod reading;
pub mod supervisor;
pub mod sync;
