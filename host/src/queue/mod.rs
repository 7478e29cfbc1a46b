//! The durable queue: every query syncd makes, through sea-orm.
//!
//! Readings are rows with increasing ids that are never reused. Each Client System
//! has a progress record, "batched through id N". A batch is a range of reading ids
//! for one Client System, recorded (in the same transaction that advances its
//! progress) before it is sent, so a crash at any instant re-sends the same range
//! under the same batch id. A reading is deleted once no Client System still needs it:
//! every configured Client System has batched past it and no batch or dead letter
//! covers it.

pub mod entities;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    TransactionTrait,
};
use syncd_migrations::{Migrator, MigratorTrait};

use crate::config::Durability;
use crate::reading::{NewReading, attributes_from_json, attributes_to_json};
pub use entities::batch::Model as Batch;
use entities::{batch, client_system, dead_letter, reading, sync_log};

/// Rows per INSERT statement when enqueueing (SQLite allows 32766 bound values; a
/// reading binds 7).
const INSERT_CHUNK: usize = 1000;

/// How long a writer waits for SQLite's lock before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A reading taken from the queue, as handed to an encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedReading {
    /// The queue id.
    pub id: i64,
    /// The rest of the reading.
    pub reading: NewReading,
}

/// One row of `sync_log`, before it is written.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The Client System.
    pub client_system: String,
    /// The batch.
    pub batch_id: String,
    /// 1 for the first attempt.
    pub attempt: i32,
    /// When it started, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// How long it took, ms.
    pub duration_ms: i64,
    /// Readings in the batch.
    pub reading_count: i32,
    /// `accepted`, `retry`, `rejected`, `unauthorized` or `failed`.
    pub outcome: &'static str,
    /// What went wrong.
    pub error: Option<String>,
}

/// The queue, on SQLite or PostgreSQL.
#[derive(Clone)]
pub struct Queue {
    db: DatabaseConnection,
}

impl Queue {
    /// Opens (creating if needed) the database at `url` and brings its schema up to
    /// date. Relative SQLite paths are resolved against `base_dir`.
    pub async fn open(url: &str, durability: Durability, base_dir: &Path) -> Result<Self> {
        let mut options = if let Some(path) = sqlite_path(url) {
            let path = if path.is_absolute() || path == Path::new(":memory:") {
                path.to_owned()
            } else {
                base_dir.join(path)
            };
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("failed to create {}", parent.display()))?;
            }
            let mut options = ConnectOptions::new(format!("sqlite://{}", path.display()));
            options.map_sqlx_sqlite_opts(move |o| {
                use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
                o.filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(match durability {
                        Durability::Normal => SqliteSynchronous::Normal,
                        Durability::Full => SqliteSynchronous::Full,
                    })
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
            });
            options
        } else {
            ConnectOptions::new(url.to_owned())
        };
        options.sqlx_logging(false);
        let db = Database::connect(options)
            .await
            .with_context(|| format!("failed to open the database {}", redact_url(url)))?;
        Migrator::up(&db, None)
            .await
            .context("failed to bring the database schema up to date")?;
        Ok(Self { db })
    }

    /// Opens the queue a configuration names, and registers its Client Systems.
    pub async fn open_for(config: &crate::config::Config) -> Result<Self> {
        let db = &config.database;
        let queue = Self::open(&db.url, db.durability, &config.base_dir).await?;
        queue
            .register_client_systems(&config.client_system_names())
            .await?;
        Ok(queue)
    }

    /// Adds readings to the queue, all or none, and returns how many were added.
    pub async fn enqueue(&self, readings: &[NewReading]) -> Result<u64> {
        if readings.is_empty() {
            return Ok(0);
        }
        let txn = self.db.begin().await?;
        for chunk in readings.chunks(INSERT_CHUNK) {
            let rows = chunk.iter().map(|r| reading::ActiveModel {
                meter_id: Set(r.meter_id.clone()),
                channel: Set(r.channel.clone()),
                timestamp_ms: Set(r.timestamp_ms),
                value: Set(r.value),
                unit: Set(r.unit.clone()),
                quality: Set(r.quality.clone()),
                attributes: Set(attributes_to_json(&r.attributes)),
                ..Default::default()
            });
            reading::Entity::insert_many(rows)
                .exec_without_returning(&txn)
                .await
                .context("failed to insert readings")?;
        }
        txn.commit().await.context("failed to commit readings")?;
        Ok(readings.len() as u64)
    }

    /// Makes sure every named Client System has a progress record. On a queue that has
    /// none yet, each starts from the beginning (everything queued so far is
    /// delivered); one added to a queue already in use starts after the readings
    /// queued so far.
    pub async fn register_client_systems(&self, names: &[String]) -> Result<()> {
        let txn = self.db.begin().await?;
        let known = client_system::Entity::find().all(&txn).await?;
        let start_after = if known.is_empty() {
            0
        } else {
            max_reading_id(&txn).await?
        };
        let now = crate::clock::now_ms();
        for name in names {
            if known.iter().any(|k| &k.name == name) {
                continue;
            }
            client_system::ActiveModel {
                name: Set(name.clone()),
                batched_through: Set(start_after),
                added_at_ms: Set(now),
            }
            .insert(&txn)
            .await
            .with_context(|| format!("failed to register client system {name}"))?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// The oldest batch recorded for a Client System and not yet acknowledged.
    pub async fn pending_batch(&self, client_system: &str) -> Result<Option<Batch>> {
        Ok(batch::Entity::find()
            .filter(batch::Column::ClientSystem.eq(client_system))
            .order_by_asc(batch::Column::FirstReadingId)
            .one(&self.db)
            .await?)
    }

    /// Records a new batch of up to `size` readings the Client System has not been
    /// sent yet, and returns it with its readings; none when there are none.
    pub async fn new_batch(
        &self,
        client_system: &str,
        size: u32,
    ) -> Result<Option<(Batch, Vec<QueuedReading>)>> {
        let txn = self.db.begin().await?;
        let progress = client_system::Entity::find_by_id(client_system)
            .one(&txn)
            .await?
            .with_context(|| format!("client system {client_system} is not registered"))?;
        let rows = reading::Entity::find()
            .filter(reading::Column::Id.gt(progress.batched_through))
            .order_by_asc(reading::Column::Id)
            .limit(u64::from(size))
            .all(&txn)
            .await?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(None);
        };
        let now = crate::clock::now_ms();
        let record = batch::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            client_system: Set(client_system.to_owned()),
            first_reading_id: Set(first.id),
            last_reading_id: Set(last.id),
            reading_count: Set(rows.len() as i32),
            attempts: Set(0),
            next_attempt_at_ms: Set(now),
            last_error: Set(None),
            created_at_ms: Set(now),
        }
        .insert(&txn)
        .await?;
        client_system::Entity::update_many()
            .col_expr(client_system::Column::BatchedThrough, Expr::value(last.id))
            .filter(client_system::Column::Name.eq(client_system))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(Some((record, rows.into_iter().map(into_queued).collect())))
    }

    /// The readings of a recorded batch, in queue order.
    pub async fn batch_readings(&self, batch: &Batch) -> Result<Vec<QueuedReading>> {
        let rows = reading::Entity::find()
            .filter(reading::Column::Id.between(batch.first_reading_id, batch.last_reading_id))
            .order_by_asc(reading::Column::Id)
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(into_queued).collect())
    }

    /// The batch was delivered: forgets it, logs the attempt, and deletes the readings
    /// that no Client System in `client_systems` (the configured ones) still needs.
    pub async fn acknowledge(
        &self,
        batch: &Batch,
        attempt: Attempt,
        client_systems: &[String],
    ) -> Result<u64> {
        let txn = self.db.begin().await?;
        batch::Entity::delete_by_id(batch.id.clone())
            .exec(&txn)
            .await?;
        log_attempt(&txn, attempt).await?;
        let pruned = prune(&txn, client_systems).await?;
        txn.commit().await?;
        Ok(pruned)
    }

    /// The attempt failed and the batch will be retried at `next_attempt_at_ms`.
    pub async fn schedule_retry(
        &self,
        batch: &Batch,
        attempt: Attempt,
        next_attempt_at_ms: i64,
    ) -> Result<()> {
        let txn = self.db.begin().await?;
        batch::Entity::update_many()
            .col_expr(batch::Column::Attempts, Expr::value(attempt.attempt))
            .col_expr(
                batch::Column::NextAttemptAtMs,
                Expr::value(next_attempt_at_ms),
            )
            .col_expr(batch::Column::LastError, Expr::value(attempt.error.clone()))
            .filter(batch::Column::Id.eq(batch.id.as_str()))
            .exec(&txn)
            .await?;
        log_attempt(&txn, attempt).await?;
        txn.commit().await?;
        Ok(())
    }

    /// The batch will not be retried: moves it to dead letters with `reason`. Its
    /// readings are kept until an operator requeues or purges it.
    pub async fn dead_letter(&self, batch: &Batch, attempt: Attempt, reason: &str) -> Result<()> {
        let txn = self.db.begin().await?;
        batch::Entity::delete_by_id(batch.id.clone())
            .exec(&txn)
            .await?;
        dead_letter::ActiveModel {
            id: Set(batch.id.clone()),
            client_system: Set(batch.client_system.clone()),
            first_reading_id: Set(batch.first_reading_id),
            last_reading_id: Set(batch.last_reading_id),
            reading_count: Set(batch.reading_count),
            attempts: Set(attempt.attempt),
            reason: Set(reason.to_owned()),
            created_at_ms: Set(batch.created_at_ms),
            dead_at_ms: Set(crate::clock::now_ms()),
        }
        .insert(&txn)
        .await?;
        log_attempt(&txn, attempt).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Readings in the queue, whoever they are for.
    pub async fn reading_count(&self) -> Result<u64> {
        Ok(reading::Entity::find().count(&self.db).await?)
    }

    /// Dead-lettered batches, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<dead_letter::Model>> {
        Ok(dead_letter::Entity::find()
            .order_by_asc(dead_letter::Column::DeadAtMs)
            .all(&self.db)
            .await?)
    }

    /// Every attempt logged since `since_ms`, oldest first.
    pub async fn sync_log_since(&self, since_ms: i64) -> Result<Vec<sync_log::Model>> {
        Ok(sync_log::Entity::find()
            .filter(sync_log::Column::StartedAtMs.gte(since_ms))
            .order_by_asc(sync_log::Column::Id)
            .all(&self.db)
            .await?)
    }
}

async fn log_attempt(txn: &DatabaseTransaction, a: Attempt) -> Result<()> {
    sync_log::Entity::insert(sync_log::ActiveModel {
        client_system: Set(a.client_system),
        batch_id: Set(Some(a.batch_id)),
        attempt: Set(a.attempt),
        started_at_ms: Set(a.started_at_ms),
        duration_ms: Set(a.duration_ms),
        reading_count: Set(a.reading_count),
        outcome: Set(a.outcome.to_owned()),
        error: Set(a.error),
        ..Default::default()
    })
    .exec_without_returning(txn)
    .await
    .context("failed to write sync_log")?;
    Ok(())
}

/// Deletes every reading no Client System still needs; returns how many.
async fn prune(txn: &DatabaseTransaction, client_systems: &[String]) -> Result<u64> {
    let batched: Option<i64> = client_system::Entity::find()
        .select_only()
        .column_as(client_system::Column::BatchedThrough.min(), "m")
        .filter(client_system::Column::Name.is_in(client_systems.iter().map(String::as_str)))
        .into_tuple()
        .one(txn)
        .await?
        .flatten();
    let Some(mut watermark) = batched else {
        return Ok(0);
    };
    let in_batches: Option<i64> = batch::Entity::find()
        .select_only()
        .column_as(batch::Column::FirstReadingId.min(), "m")
        .into_tuple()
        .one(txn)
        .await?
        .flatten();
    let in_dead_letters: Option<i64> = dead_letter::Entity::find()
        .select_only()
        .column_as(dead_letter::Column::FirstReadingId.min(), "m")
        .into_tuple()
        .one(txn)
        .await?
        .flatten();
    for first in [in_batches, in_dead_letters].into_iter().flatten() {
        watermark = watermark.min(first - 1);
    }
    let deleted = reading::Entity::delete_many()
        .filter(reading::Column::Id.lte(watermark))
        .exec(txn)
        .await?;
    Ok(deleted.rows_affected)
}

async fn max_reading_id(txn: &impl ConnectionTrait) -> Result<i64> {
    let max: Option<i64> = reading::Entity::find()
        .select_only()
        .column_as(reading::Column::Id.max(), "m")
        .into_tuple()
        .one(txn)
        .await?
        .flatten();
    Ok(max.unwrap_or(0))
}

fn into_queued(row: reading::Model) -> QueuedReading {
    QueuedReading {
        id: row.id,
        reading: NewReading {
            meter_id: row.meter_id,
            channel: row.channel,
            timestamp_ms: row.timestamp_ms,
            value: row.value,
            unit: row.unit,
            quality: row.quality,
            attributes: attributes_from_json(row.attributes.as_deref()),
        },
    }
}

/// The file of a `sqlite:` URL; none for another database.
fn sqlite_path(url: &str) -> Option<&Path> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    Some(Path::new(rest.split('?').next().unwrap_or(rest)))
}

/// A database URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
