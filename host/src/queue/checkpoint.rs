//! SQLite's write-ahead log copied into the database file in the background.
//!
//! Left to itself, SQLite checkpoints inside the commit that takes the log past
//! `wal_autocheckpoint` pages: that commit copies thousands of pages and flushes the
//! file before it returns, and whatever waits for it (the next batch of a drain, an
//! ingest request) waits too. Here a task on a connection of its own copies the log
//! every [`INTERVAL`] without holding up writers (a passive checkpoint), and once the
//! log is past [`RESTART_FRAMES`] it takes the writers' lock for the little that is
//! left, so that the next writer starts the log again from its beginning (a
//! checkpoint that never does that lets the log grow). The commit-time checkpoint
//! stays as the fallback, for a process that runs no such task or one that falls
//! behind.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};

/// How often the log is copied into the database file.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// Pages in the log past which the checkpoint also makes the next writer start it
/// again (4 MiB of 4 KiB pages): a quarter of the commit-time threshold, so that the
/// background keeps the log under it.
pub const RESTART_FRAMES: i64 = 1024;

/// How long the restarting checkpoint waits for the writer in progress and for
/// readers of the log; writers wait for it meanwhile. Past it, it copies what it can
/// and tries again next time.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// The background checkpoints of one SQLite database, running until this is dropped.
pub struct Checkpointer {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checkpointer {
    /// Starts checkpointing the database at `path` (which exists, in WAL mode).
    pub(super) async fn start(path: PathBuf) -> Result<Self> {
        let mut options = ConnectOptions::new(format!("sqlite://{}", path.display()));
        let shown = path.display().to_string();
        options
            .max_connections(1)
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(move |o| o.filename(&path).busy_timeout(BUSY_TIMEOUT));
        super::without_pool_maintenance(&mut options);
        let db = Database::connect(options)
            .await
            .with_context(|| format!("failed to open {shown} for checkpoints"))?;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A failure is told once, not every tick, until a checkpoint succeeds
            // again; the commit-time checkpoint covers for it meanwhile.
            let mut failing = false;
            loop {
                tick.tick().await;
                match pass(&db).await {
                    Ok(()) if failing => {
                        tracing::info!(database = %shown, "background checkpoints work again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        tracing::warn!(
                            database = %shown,
                            "background checkpoint failed (commits checkpoint meanwhile): {e:#}"
                        );
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        Ok(Self { task })
    }
}

/// One turn: the log copied without waiting for anyone, then, if it has grown long,
/// restarted.
async fn pass(db: &DatabaseConnection) -> Result<()> {
    let log = checkpoint(db, "PASSIVE").await?.log;
    if log >= RESTART_FRAMES {
        checkpoint(db, "RESTART").await?;
    }
    Ok(())
}

/// What `PRAGMA wal_checkpoint` answers.
pub(crate) struct WalState {
    /// Pages in the log.
    pub log: i64,
}

/// Runs `PRAGMA wal_checkpoint(mode)` on `db`.
pub(crate) async fn checkpoint(db: &impl ConnectionTrait, mode: &str) -> Result<WalState> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("PRAGMA wal_checkpoint({mode})"),
        ))
        .await?
        .context("PRAGMA wal_checkpoint answered nothing")?;
    Ok(WalState {
        log: row.try_get_by_index(1)?,
    })
}
