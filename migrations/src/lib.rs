//! The schema of syncd's queue, as sea-orm migrations, applied by `syncd migrate` and
//! on every start of the daemon.
//!
//! The tables (documented for operators in the README):
//! - `readings`: the queue. A collection service may insert rows with plain SQL.
//! - `client_systems`: per Client System, how far into `readings` it has been batched.
//! - `batches`: every batch, recorded before it is sent, until it is acknowledged.
//! - `dead_letters`: batches refused for good, kept with their reason.
//! - `sync_log`: one row per delivery attempt.
//! - `remote_configs`: the last good remote configuration of each Client System.
//! - `processes`: the syncd processes using the queue, and when each was last seen.
//! - `connectivity`: per Client System, the last online/offline change any process saw.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_create_queue;
mod m20261122_000002_remote_configs;
mod m20261130_000003_scale_out;

/// The PostgreSQL advisory lock every transaction inserting readings holds until it
/// ends ("syncd" in ASCII), taken by a trigger on `readings`: ids then commit in the
/// order they were handed out, which the queue's progress ("batched through id N")
/// relies on.
pub const INGEST_LOCK_KEY: i64 = 495_958_516_580;

/// Applies syncd's migrations in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_create_queue::Migration),
            Box::new(m20261122_000002_remote_configs::Migration),
            Box::new(m20261130_000003_scale_out::Migration),
        ]
    }
}
