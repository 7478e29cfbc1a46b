//! The compiled-component cache: a component compiled once is kept on disk, keyed by
//! the SHA-256 of its file and by the engine's settings, so a restart, or the
//! re-deploy of a version already seen, loads it in milliseconds instead of
//! compiling it again.
//!
//! Entries are wasmtime's own serialized artifacts, which wasmtime checks for version
//! and settings on load; an entry that fails to load is compiled again and replaced.
//! Loading one runs code that was compiled before, so the folder must be writable by
//! syncd alone (as its database is).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Compiled now.
    Compiled,
    /// Loaded from the cache.
    Cache,
}

/// A compiled component and what identifies it (cheap to clone).
#[derive(Clone)]
pub struct Compiled {
    /// The component.
    pub component: Component,
    /// SHA-256 of the component file, in hex.
    pub sha256: String,
    /// Compiled now, or loaded from the cache.
    pub origin: Origin,
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compiles `bytes` (read from `path`), or loads them from `cache_dir` if compiled
/// before. Blocking: CPU and file work, to be run off the async runtime's threads.
pub fn compile(
    engine: &Engine,
    cache_dir: Option<&Path>,
    path: &Path,
    bytes: &[u8],
) -> Result<Compiled> {
    let sha256 = sha256_hex(bytes);
    let entry = cache_dir.map(|dir| dir.join(entry_name(engine, &sha256)));
    if let Some(entry) = entry.as_deref().filter(|e| e.is_file()) {
        // SAFETY: the entry was written by `Component::serialize` of this host into a
        // folder only syncd writes to (see the module's documentation); wasmtime
        // checks that it was made by the same version with the same settings.
        match unsafe { Component::deserialize_file(engine, entry) } {
            Ok(component) => {
                return Ok(Compiled {
                    component,
                    sha256,
                    origin: Origin::Cache,
                });
            }
            Err(error) => tracing::warn!(
                entry = %entry.display(),
                "compiled-plugin cache entry unusable, compiling again: {error:#}"
            ),
        }
    }
    let component = Component::new(engine, bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a valid WebAssembly component", path.display()))?;
    if let Some(entry) = &entry
        && let Err(error) = store(&component, entry)
    {
        // The cache only saves time: a plugin that compiled is served regardless.
        tracing::warn!(
            entry = %entry.display(),
            "compiled plugin not cached: {error:#}"
        );
    }
    Ok(Compiled {
        component,
        sha256,
        origin: Origin::Compiled,
    })
}

/// The entry's file name: the component's hash and the engine's compatibility hash.
fn entry_name(engine: &Engine, sha256: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{sha256}-{:016x}.cwasm", hasher.finish())
}

/// Writes an entry whole or not at all (a temporary file renamed into place).
fn store(component: &Component, entry: &Path) -> Result<()> {
    let dir = entry.parent().context("cache entry without a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = component.serialize()?;
    let temporary: PathBuf = entry.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, entry).with_context(|| format!("cannot write {}", entry.display()))
}
