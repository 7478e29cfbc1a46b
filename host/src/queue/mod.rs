//! The durable queue: every query syncd makes, through sea-orm — but for two
//! transactions of every batch on SQLite (recording the next batch, acknowledging the
//! last), each sent as one query on sea-orm's own pool through sqlx (see
//! [`in_one_round_trip`]).
//!
//! Readings are rows with increasing ids that are never reused. Each Client System
//! has a progress record, "batched through id N". A batch is a range of reading ids
//! for one Client System, recorded (in the same transaction that advances its
//! progress) before it is sent, so a crash at any instant re-sends the same range
//! under the same batch id. A reading is deleted once no Client System still needs it:
//! every configured Client System has batched past it and no batch or dead letter
//! covers it.
//!
//! Several processes may share one PostgreSQL queue. A batch is leased by the process
//! that records or takes it, for `database.batch_lease` at a time and renewed while it
//! works on it; another process takes it over only once the lease has run out (the
//! holder died). Progress is advanced under a row lock on the Client System, and every
//! transaction inserting readings takes the ingest lock before its ids are handed out
//! (a trigger does it for writers that know nothing of syncd), so ids commit in order
//! and "batched through id N" never passes a reading still to commit.

pub mod entities;
mod packed;

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, Result};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::sqlx::{self, Row as _};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectOptions, ConnectionTrait, Database,
    DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, Statement, TransactionTrait,
};
use syncd_migrations::{Migrator, MigratorTrait};

use crate::config::Durability;
use crate::reading::{NewReading, attributes_from_json, attributes_to_json};
pub use entities::batch::Model as Batch;
pub use entities::process::Model as Process;
pub use entities::remote_config::Model as StoredRemoteConfig;
use entities::{
    batch, client_system, connectivity, dead_letter, process, reading, remote_config, sync_log,
};

/// How long a batch stays with the process that took it, unless renewed, by default.
pub const DEFAULT_BATCH_LEASE: Duration = Duration::from_secs(60);

/// Rows of `sync_log` deleted per transaction by [`Queue::prune_sync_log`].
pub const SYNC_LOG_PRUNE_CHUNK: u64 = 10_000;

/// Rows per INSERT statement when enqueueing (SQLite allows 32766 bound values; a
/// reading binds 7).
const INSERT_CHUNK: usize = 1000;

pub use syncd_migrations::INGEST_LOCK_KEY;

/// The PostgreSQL advisory lock held while pruning: processes sharing the queue prune
/// one at a time ("prune" in ASCII).
pub const PRUNE_LOCK_KEY: i64 = 482_184_015_461;

/// The batches of a Client System this process may claim, as SQL: those no process
/// holds, its own, and those whose holder's lease ran out. The arguments name the
/// statement's parameters for the Client System, this process and the time now.
/// [`Queue::claim_batch`] takes such a batch; recording a batch read ahead on SQLite
/// ([`record_on_sqlite`]) waits while there is one; the PostgreSQL path of
/// [`Queue::record_read_ahead`] builds the same condition with sea-query: keep it alike.
macro_rules! claimable {
    ($client_system:literal, $process:literal, $now:literal) => {
        concat!(
            "client_system = ",
            $client_system,
            " AND (leased_by IS NULL OR leased_by = ",
            $process,
            " OR lease_until_ms < ",
            $now,
            ")"
        )
    };
}

/// Pages of SQLite's write-ahead log (16 MiB of 4 KiB pages) past which the
/// transaction that commits copies the log into the database file (a checkpoint, with
/// a flush to disk). SQLite's default, 1000, has a delivery or an ingest checkpoint
/// about every 30 batches of 1000 readings; 4096 makes a quarter as many flushes (in the
/// queue benchmark, ingest about 8% and a large drain about 3% faster, alternated runs).
const SQLITE_AUTOCHECKPOINT: u32 = 4096;

/// Connections to a PostgreSQL server (one per worker is plenty; the rest serve ingest).
const POSTGRES_POOL: u32 = 8;

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
    max_readings: Option<u64>,
    /// This process's name among those sharing the queue.
    process: std::sync::Arc<str>,
    /// How long a batch taken stays with this process unless renewed.
    lease_ms: i64,
}

/// A process sharing the queue, with the batches it holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProcessStatus {
    /// What it last said of itself.
    #[serde(flatten)]
    pub process: Process,
    /// Whether it is this process.
    pub this: bool,
    /// The batches whose lease it holds: (Client System, batch id, lease until ms).
    pub batches: Vec<HeldBatch>,
}

/// A batch held by a process.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeldBatch {
    /// The Client System.
    pub client_system: String,
    /// The batch.
    pub batch_id: String,
    /// Until when, ms since the Unix epoch.
    pub lease_until_ms: i64,
}

/// The last change of a Client System's reachability any process reported.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConnectivity {
    /// Online or not.
    pub online: bool,
    /// Since when, ms since the Unix epoch.
    pub since_ms: i64,
    /// The process that saw it.
    pub reported_by: String,
    /// When it reported it.
    pub reported_at_ms: i64,
}

/// Ingest refused: the queue holds `max_queue_readings` already.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the queue is full: it holds about {queued} readings and max_queue_readings is {limit}; \
     {incoming} more were refused (nothing was stored). Deliveries make room; or raise the limit"
)]
pub struct QueueFull {
    /// The configured limit.
    pub limit: u64,
    /// Readings queued (an upper bound: the span of queued ids).
    pub queued: u64,
    /// Readings refused.
    pub incoming: u64,
}

/// A summary of `sync_log` for one Client System over a period.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ClientStats {
    /// The Client System.
    pub client_system: String,
    /// Attempts made.
    pub attempts: u64,
    /// Batches delivered.
    pub batches_delivered: u64,
    /// Readings delivered.
    pub readings_delivered: u64,
    /// Attempts that failed and were retried (`retry`).
    pub retries: u64,
    /// Attempts that found the Client System out of reach.
    pub unreachable: u64,
    /// Attempts whose credentials were refused.
    pub unauthorized: u64,
    /// Batches rejected (and dead-lettered).
    pub rejected: u64,
    /// Attempts cut short by a plugin that failed (trapped, overran its deadline or
    /// answered nonsense).
    pub plugin_failures: u64,
    /// Mean duration of an attempt, ms.
    pub mean_attempt_ms: f64,
    /// When a batch was last delivered, ms since the Unix epoch.
    pub last_success_ms: Option<i64>,
}

/// `sync_log` grouped by Client System and outcome.
#[derive(Debug, sea_orm::FromQueryResult)]
struct OutcomeRow {
    client_system: String,
    outcome: String,
    attempts: i64,
    readings: Option<i64>,
    duration: Option<i64>,
    last: Option<i64>,
}

/// An ingest in progress: readings added by [`Ingest::add`] are stored only when
/// [`Ingest::commit`] is called, all together.
pub struct Ingest {
    txn: DatabaseTransaction,
    added: u64,
    room: Option<(u64, u64)>,
}

impl Ingest {
    /// Adds readings to the transaction.
    pub async fn add(&mut self, readings: &[NewReading]) -> Result<()> {
        if let Some((limit, queued)) = self.room {
            let incoming = self.added + readings.len() as u64;
            if queued + incoming > limit {
                return Err(QueueFull {
                    limit,
                    queued,
                    incoming,
                }
                .into());
            }
        }
        insert_readings(&self.txn, readings).await?;
        self.added += readings.len() as u64;
        Ok(())
    }

    /// Stores everything added; returns how many readings.
    pub async fn commit(self) -> Result<u64> {
        self.txn
            .commit()
            .await
            .context("failed to commit readings")?;
        Ok(self.added)
    }
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
            sqlite_options(path, durability)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut options = ConnectOptions::new(url.to_owned());
            options
                .max_connections(POSTGRES_POOL)
                .connect_timeout(POSTGRES_CONNECT_TIMEOUT)
                .acquire_timeout(POSTGRES_CONNECT_TIMEOUT);
            options
        } else {
            anyhow::bail!(
                "unsupported database URL {}: use sqlite://path or postgres://…",
                redact_url(url)
            );
        };
        options.sqlx_logging(false);
        without_pool_maintenance(&mut options);
        let db = connect_and_migrate(options)
            .await
            .with_context(|| format!("failed to open the database {}", redact_url(url)))?;
        Ok(Self {
            db,
            max_readings: None,
            process: format!("{}:{}", host_name(), std::process::id()).into(),
            lease_ms: DEFAULT_BATCH_LEASE.as_millis() as i64,
        })
    }

    /// This process's name among those sharing the queue.
    pub fn process_name(&self) -> &str {
        &self.process
    }

    /// A statement written with PostgreSQL's `$1, $2…` parameters, for this queue's
    /// database (SQLite numbers them `?1, ?2…`).
    fn statement(&self, sql: &str, values: impl IntoIterator<Item = sea_orm::Value>) -> Statement {
        let backend = self.db.get_database_backend();
        let sql = match backend {
            DbBackend::Sqlite => sql.replace('$', "?"),
            _ => sql.to_owned(),
        };
        Statement::from_sql_and_values(backend, sql, values)
    }

    /// Writes SQLite's write-ahead log into the database file and empties it (nothing
    /// to do on PostgreSQL).
    pub async fn checkpoint(&self) -> Result<()> {
        if self.db.get_database_backend() == DbBackend::Sqlite {
            self.db
                .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await
                .context("failed to checkpoint the SQLite write-ahead log")?;
        }
        Ok(())
    }

    /// Whether the queue is on PostgreSQL (and may be shared by several processes).
    pub fn is_postgres(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// Opens the queue a configuration names, and registers its Client Systems.
    pub async fn open_for(config: &crate::config::Config) -> Result<Self> {
        let db = &config.database;
        let mut queue = Self::open(&db.url, db.durability, &config.base_dir).await?;
        queue.max_readings = db.max_queue_readings;
        queue.process = config.process_name().into();
        queue.lease_ms = db.batch_lease.as_millis() as i64;
        queue
            .register_client_systems(&config.client_system_names())
            .await?;
        Ok(queue)
    }

    /// Adds readings to the queue, all or none, and returns how many were added.
    pub async fn enqueue(&self, readings: &[NewReading]) -> Result<u64> {
        let mut ingest = self.ingest().await?;
        ingest.add(readings).await?;
        ingest.commit().await
    }

    /// Starts an ingest that may add readings in several steps and stores them all or
    /// none (for files too large to hold in memory).
    pub async fn ingest(&self) -> Result<Ingest> {
        let txn = self.db.begin().await?;
        if txn.get_database_backend() == DbBackend::Postgres {
            // Progress is "batched through id N", which is only sound if readings commit
            // in id order. PostgreSQL hands out ids as transactions insert, and they may
            // commit in another order; holding this lock makes every ingest allocate and
            // commit its ids in turn. The trigger on `readings` takes it for any writer;
            // it is taken here already so that the room left is counted under it.
            // (SQLite writes one at a time anyway.)
            txn.execute_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_advisory_xact_lock({INGEST_LOCK_KEY})"),
            ))
            .await
            .context("failed to take the ingest lock")?;
        }
        let room = match self.max_readings {
            Some(limit) => Some((limit, queued_span(&txn).await?)),
            None => None,
        };
        Ok(Ingest {
            txn,
            added: 0,
            room,
        })
    }

    /// Makes sure every named Client System has a progress record. On a queue that has
    /// none yet, each starts from the beginning (everything queued so far is
    /// delivered); one added to a queue already in use starts after the readings
    /// queued so far.
    pub async fn register_client_systems(&self, names: &[String]) -> Result<()> {
        // Processes starting together on a new SQLite file (the daemon and `syncd
        // enqueue`) may both read, then both want to write: SQLite refuses the second
        // at once ("database is locked", not covered by the busy timeout) and the whole
        // registration is tried again, reading what the first wrote.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.register_once(names).await {
                Err(error) if tries < 5 && format!("{error:#}").contains("database is locked") => {
                    tokio::time::sleep(Duration::from_millis(50) * tries).await;
                }
                result => return result,
            }
        }
    }

    async fn register_once(&self, names: &[String]) -> Result<()> {
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

    /// The Client Systems the queue keeps readings for.
    pub async fn client_systems(&self) -> Result<Vec<String>> {
        Ok(client_system::Entity::find()
            .order_by_asc(client_system::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| row.name)
            .collect())
    }

    /// Stops keeping readings for a Client System that is no longer configured: its
    /// progress, its batches not yet acknowledged and its remote configuration go (its
    /// dead letters stay until purged), and the readings only it still needed are
    /// deleted. Returns how many readings it had not received.
    pub async fn forget_client_system(&self, name: &str) -> Result<u64> {
        let undelivered = self.queued_for(name).await?;
        let txn = self.db.begin().await?;
        batch::Entity::delete_many()
            .filter(batch::Column::ClientSystem.eq(name))
            .exec(&txn)
            .await?;
        client_system::Entity::delete_by_id(name.to_owned())
            .exec(&txn)
            .await?;
        remote_config::Entity::delete_by_id(name.to_owned())
            .exec(&txn)
            .await?;
        connectivity::Entity::delete_by_id(name.to_owned())
            .exec(&txn)
            .await?;
        prune(&txn).await?;
        txn.commit().await?;
        Ok(undelivered)
    }

    /// The oldest batch recorded for a Client System and not yet acknowledged.
    pub async fn pending_batch(&self, client_system: &str) -> Result<Option<Batch>> {
        Ok(batch::Entity::find()
            .filter(batch::Column::ClientSystem.eq(client_system))
            .order_by_asc(batch::Column::FirstReadingId)
            .one(&self.db)
            .await?)
    }

    /// Takes the oldest batch of a Client System not acknowledged yet that no other
    /// process holds (or whose holder's lease ran out): it is this process's for
    /// `batch_lease` from now or from its retry time, whichever is later (which batches
    /// can be: [`claimable!`]).
    pub async fn claim_batch(&self, client_system: &str) -> Result<Option<Batch>> {
        let now = crate::clock::now_ms();
        let skip_locked = if self.is_postgres() {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE batches SET leased_by = $1, \
               lease_until_ms = CASE WHEN next_attempt_at_ms > $2 THEN next_attempt_at_ms ELSE $2 END + $3 \
             WHERE id = (SELECT id FROM batches WHERE {} \
               ORDER BY first_reading_id LIMIT 1{skip_locked}) \
             RETURNING *",
            claimable!("$4", "$1", "$2")
        );
        let statement = self.statement(
            &sql,
            [
                self.process.as_ref().into(),
                now.into(),
                self.lease_ms.into(),
                client_system.into(),
            ],
        );
        Ok(batch::Entity::find()
            .from_raw_sql(statement)
            .one(&self.db)
            .await?)
    }

    /// Extends this process's lease of a batch by `batch_lease` from now; false when
    /// the batch is no longer this process's (acknowledged, or taken over after the
    /// lease ran out).
    pub async fn renew_lease(&self, batch: &Batch) -> Result<bool> {
        let renewed = batch::Entity::update_many()
            .col_expr(
                batch::Column::LeaseUntilMs,
                Expr::value(crate::clock::now_ms() + self.lease_ms),
            )
            .filter(batch::Column::Id.eq(batch.id.as_str()))
            .filter(batch::Column::LeasedBy.eq(&*self.process))
            .exec(&self.db)
            .await?;
        Ok(renewed.rows_affected == 1)
    }

    /// How long a lease lasts.
    pub fn batch_lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms as u64)
    }

    /// Records a new batch of up to `size` readings the Client System has not been
    /// sent yet, and returns it with its readings; none when there are none.
    pub async fn new_batch(
        &self,
        client_system: &str,
        size: u32,
    ) -> Result<Option<(Batch, Vec<QueuedReading>)>> {
        let txn = self.db.begin().await?;
        let progress = batched_through(&txn, client_system).await?;
        let range = Range::After {
            id: progress,
            limit: size,
        };
        let rows = read_readings(&txn, range).await?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        // The progress read above cannot have moved since: on PostgreSQL its row is
        // locked; on SQLite (a pool of connections, one writer at a time) a transaction
        // that has read cannot write after another connection wrote (SQLITE_BUSY_SNAPSHOT,
        // an error), and `move_progress` checks where it was either way.
        anyhow::ensure!(
            move_progress(&txn, client_system, progress, last.id, None).await?,
            "the progress of client system {client_system} moved while locked"
        );
        let record = self.batch_of(client_system, &rows)?;
        insert_batch(&txn, &record).await?;
        txn.commit().await?;
        Ok(Some((record, rows)))
    }

    /// Up to `size` readings after id `after`, in queue order, read without recording
    /// anything: the next batch, read ahead while the current one is being delivered.
    /// Readings commit in the order of their ids (see [`Queue::ingest`]), so these stay
    /// the next ones for as long as nothing is batched after `after`.
    pub async fn readings_after(&self, after: i64, size: u32) -> Result<Vec<QueuedReading>> {
        let range = Range::After {
            id: after,
            limit: size,
        };
        read_readings(&self.db, range).await
    }

    /// Records the batch of `rows` read ahead by [`Queue::readings_after`], if the
    /// Client System is still batched through `after` (else none: read them again).
    ///
    /// With `delivered`, the batch just delivered and not acknowledged yet, nothing is
    /// recorded either when this process could claim ([`Queue::claim_batch`]) a batch
    /// of the Client System other than that one: such a batch (a retry, or one whose
    /// holder's lease ran out) goes before new ones.
    pub async fn record_read_ahead(
        &self,
        client_system: &str,
        after: i64,
        rows: &[QueuedReading],
        delivered: Option<&str>,
    ) -> Result<Option<Batch>> {
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        let record = self.batch_of(client_system, rows)?;
        if !self.is_postgres() {
            return record_on_sqlite(&self.db, after, record, delivered).await;
        }
        // Which batches can be claimed, as in `claimable!` (keep the two alike). Built
        // with sea-query rather than as text: a custom expression's `$N` values are
        // dropped on SQLite.
        let nothing_to_claim = delivered.map(|id| {
            let claimable = Query::select()
                .expr(Expr::val(1))
                .from(batch::Entity)
                .and_where(batch::Column::ClientSystem.eq(client_system))
                .and_where(batch::Column::Id.ne(id))
                .cond_where(
                    Condition::any()
                        .add(batch::Column::LeasedBy.is_null())
                        .add(batch::Column::LeasedBy.eq(&*self.process))
                        .add(batch::Column::LeaseUntilMs.lt(record.created_at_ms)),
                )
                .to_owned();
            sea_orm::sea_query::ExprTrait::not(Expr::exists(claimable))
        });
        let txn = self.db.begin().await?;
        if !move_progress(&txn, client_system, after, last.id, nothing_to_claim).await? {
            // Batched further meanwhile (or the Client System is gone), or a batch to
            // claim first: nothing recorded.
            return Ok(None);
        }
        insert_batch(&txn, &record).await?;
        txn.commit().await?;
        Ok(Some(record))
    }

    /// The readings of a recorded batch, in queue order.
    pub async fn batch_readings(&self, batch: &Batch) -> Result<Vec<QueuedReading>> {
        let range = Range::Between {
            first: batch.first_reading_id,
            last: batch.last_reading_id,
        };
        read_readings(&self.db, range).await
    }

    /// The batch was delivered: forgets it, logs the attempt, and deletes the readings
    /// that no Client System in `client_systems` (the configured ones) still needs.
    pub async fn acknowledge(&self, batch: &Batch, attempt: Attempt) -> Result<u64> {
        if !self.is_postgres() {
            return acknowledge_on_sqlite(&self.db, &batch.id, attempt).await;
        }
        let txn = self.db.begin().await?;
        batch::Entity::delete_by_id(batch.id.clone())
            .exec(&txn)
            .await?;
        log_attempt(&txn, attempt).await?;
        let pruned = prune(&txn).await?;
        txn.commit().await?;
        Ok(pruned)
    }

    /// The attempt failed and the batch will be retried at `next_attempt_at_ms`;
    /// `attempts_used` is what counts towards its retries from now on.
    /// The batch stays this process's until its retry time and `batch_lease` after.
    pub async fn schedule_retry(
        &self,
        batch: &Batch,
        attempt: Attempt,
        attempts_used: i32,
        next_attempt_at_ms: i64,
    ) -> Result<()> {
        let txn = self.db.begin().await?;
        batch::Entity::update_many()
            .col_expr(batch::Column::Attempts, Expr::value(attempts_used))
            .col_expr(
                batch::Column::NextAttemptAtMs,
                Expr::value(next_attempt_at_ms),
            )
            .col_expr(batch::Column::LastError, Expr::value(attempt.error.clone()))
            .col_expr(
                batch::Column::LeaseUntilMs,
                Expr::value(next_attempt_at_ms.max(crate::clock::now_ms()) + self.lease_ms),
            )
            .filter(batch::Column::Id.eq(batch.id.as_str()))
            .filter(batch::Column::LeasedBy.eq(&*self.process))
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
        let gone = batch::Entity::delete_by_id(batch.id.clone())
            .exec(&txn)
            .await?;
        // None gone: acknowledged meanwhile, by another process that took it over.
        if gone.rows_affected == 1 {
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
        }
        log_attempt(&txn, attempt).await?;
        txn.commit().await?;
        Ok(())
    }

    /// About how many readings are queued for a Client System and not yet
    /// acknowledged by it (those in its dead letters aside), cheap at any queue size:
    /// the ids past its progress plus its recorded batches. Can only overstate.
    pub async fn queued_for(&self, client_system: &str) -> Result<u64> {
        let progress = client_system::Entity::find_by_id(client_system)
            .one(&self.db)
            .await?
            .with_context(|| format!("client system {client_system} is not registered"))?;
        let newest = max_reading_id(&self.db).await?;
        let in_batches: Option<i64> = batch::Entity::find()
            .select_only()
            .column_as(Expr::cust("CAST(SUM(reading_count) AS BIGINT)"), "n")
            .filter(batch::Column::ClientSystem.eq(client_system))
            .into_tuple()
            .one(&self.db)
            .await?
            .flatten();
        let unbatched = (newest - progress.batched_through).max(0);
        Ok((unbatched + in_batches.unwrap_or(0)) as u64)
    }

    /// Whether any reading is queued: a cheap check at any queue size (unlike
    /// [`Queue::reading_count`], which counts).
    pub async fn has_readings(&self) -> Result<bool> {
        Ok(reading::Entity::find()
            .select_only()
            .column(reading::Column::Id)
            .limit(1)
            .into_tuple::<i64>()
            .one(&self.db)
            .await?
            .is_some())
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

    /// Moves dead letters back into the queue of batches (`id`, or all when none), to
    /// be sent again under the same batch ids with fresh retries. Returns how many.
    /// Dead letters of a Client System no longer configured stay where they are: there
    /// is no one to send them to.
    pub async fn requeue_dead_letters(&self, id: Option<&str>) -> Result<u64> {
        let txn = self.db.begin().await?;
        let mut find = dead_letter::Entity::find().filter(
            dead_letter::Column::ClientSystem.in_subquery(
                Query::select()
                    .column(client_system::Column::Name)
                    .from(client_system::Entity)
                    .to_owned(),
            ),
        );
        if let Some(id) = id {
            find = find.filter(dead_letter::Column::Id.eq(id));
        }
        let dead = find.all(&txn).await?;
        let now = crate::clock::now_ms();
        for d in &dead {
            batch::ActiveModel {
                id: Set(d.id.clone()),
                client_system: Set(d.client_system.clone()),
                first_reading_id: Set(d.first_reading_id),
                last_reading_id: Set(d.last_reading_id),
                reading_count: Set(d.reading_count),
                attempts: Set(0),
                next_attempt_at_ms: Set(now),
                last_error: Set(Some(format!("requeued from dead letters: {}", d.reason))),
                created_at_ms: Set(d.created_at_ms),
                leased_by: Set(None),
                lease_until_ms: Set(0),
            }
            .insert(&txn)
            .await?;
            dead_letter::Entity::delete_by_id(d.id.clone())
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(dead.len() as u64)
    }

    /// Deletes dead letters (`id`, or all when none) and the readings no Client System
    /// needs any more. Returns how many dead letters.
    pub async fn purge_dead_letters(&self, id: Option<&str>) -> Result<u64> {
        let txn = self.db.begin().await?;
        let mut delete = dead_letter::Entity::delete_many();
        if let Some(id) = id {
            delete = delete.filter(dead_letter::Column::Id.eq(id));
        }
        let purged = delete.exec(&txn).await?.rows_affected;
        prune(&txn).await?;
        txn.commit().await?;
        Ok(purged)
    }

    /// Per Client System, what `sync_log` says of the attempts since `since_ms`.
    pub async fn stats_since(&self, since_ms: i64) -> Result<Vec<ClientStats>> {
        let rows: Vec<OutcomeRow> = sync_log::Entity::find()
            .select_only()
            .column(sync_log::Column::ClientSystem)
            .column(sync_log::Column::Outcome)
            .column_as(sync_log::Column::Id.count(), "attempts")
            // SUM of a BIGINT is NUMERIC in PostgreSQL: cast it back.
            .column_as(Expr::cust("CAST(SUM(reading_count) AS BIGINT)"), "readings")
            .column_as(Expr::cust("CAST(SUM(duration_ms) AS BIGINT)"), "duration")
            .column_as(sync_log::Column::StartedAtMs.max(), "last")
            .filter(sync_log::Column::StartedAtMs.gte(since_ms))
            .group_by(sync_log::Column::ClientSystem)
            .group_by(sync_log::Column::Outcome)
            .into_model()
            .all(&self.db)
            .await?;
        let mut by_client: std::collections::BTreeMap<String, (ClientStats, i64)> =
            Default::default();
        for OutcomeRow {
            client_system: client,
            outcome,
            attempts,
            readings,
            duration,
            last,
        } in rows
        {
            let (stats, total_ms) = by_client.entry(client.clone()).or_insert_with(|| {
                (
                    ClientStats {
                        client_system: client,
                        ..Default::default()
                    },
                    0,
                )
            });
            let attempts = attempts as u64;
            stats.attempts += attempts;
            *total_ms += duration.unwrap_or(0);
            match outcome.as_str() {
                "accepted" => {
                    stats.batches_delivered += attempts;
                    stats.readings_delivered += readings.unwrap_or(0) as u64;
                    stats.last_success_ms = last;
                }
                "retry" => stats.retries += attempts,
                "unreachable" => stats.unreachable += attempts,
                "unauthorized" => stats.unauthorized += attempts,
                "rejected" => stats.rejected += attempts,
                "plugin_failed" => stats.plugin_failures += attempts,
                _ => {}
            }
        }
        Ok(by_client
            .into_values()
            .map(|(mut stats, total_ms)| {
                if stats.attempts > 0 {
                    stats.mean_attempt_ms = total_ms as f64 / stats.attempts as f64;
                }
                stats
            })
            .collect())
    }

    /// Every attempt logged since `since_ms`, oldest first.
    pub async fn sync_log_since(&self, since_ms: i64) -> Result<Vec<sync_log::Model>> {
        Ok(sync_log::Entity::find()
            .filter(sync_log::Column::StartedAtMs.gte(since_ms))
            .order_by_asc(sync_log::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Deletes the attempts logged before `before_ms`, in chunks of
    /// [`SYNC_LOG_PRUNE_CHUNK`] (each its own short transaction, so that a first prune of
    /// a large log holds up no delivery); returns how many.
    pub async fn prune_sync_log(&self, before_ms: i64) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let chunk = self
                .db
                .execute_raw(self.statement(
                    &format!(
                        "DELETE FROM sync_log WHERE id IN (SELECT id FROM sync_log \
                         WHERE started_at_ms < $1 ORDER BY id LIMIT {SYNC_LOG_PRUNE_CHUNK})"
                    ),
                    [before_ms.into()],
                ))
                .await
                .context("failed to delete old sync_log rows")?
                .rows_affected();
            deleted += chunk;
            if chunk < SYNC_LOG_PRUNE_CHUNK {
                return Ok(deleted);
            }
        }
    }

    /// The batch record of `rows` (not empty), made now and leased to this process,
    /// not yet written: the caller inserts it ([`insert_batch`]) in the transaction
    /// that moves the Client System's progress past them.
    fn batch_of(&self, client_system: &str, rows: &[QueuedReading]) -> Result<Batch> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            anyhow::bail!("a batch of no readings");
        };
        let now = crate::clock::now_ms();
        Ok(Batch {
            id: uuid::Uuid::now_v7().to_string(),
            client_system: client_system.to_owned(),
            first_reading_id: first.id,
            last_reading_id: last.id,
            reading_count: rows.len() as i32,
            attempts: 0,
            next_attempt_at_ms: now,
            last_error: None,
            created_at_ms: now,
            leased_by: Some(self.process.to_string()),
            lease_until_ms: now + self.lease_ms,
        })
    }

    /// Refuses this process's name when another process that is alive uses it: seen
    /// within one lease, and on this machine still running. (Two processes under one
    /// name would share their leases.)
    pub async fn check_name_free(&self) -> Result<()> {
        let Some(other) = process::Entity::find_by_id(self.process.to_string())
            .one(&self.db)
            .await?
        else {
            return Ok(());
        };
        let host = host_name();
        let pid = i64::from(std::process::id());
        let seen_ago_ms = crate::clock::now_ms() - other.last_seen_ms;
        let running_here = other.host == host
            && other.pid != pid
            && Path::new(&format!("/proc/{}", other.pid)).exists();
        if seen_ago_ms < self.lease_ms && (other.host != host || running_here) {
            anyhow::bail!(
                "another syncd process uses the name {:?} in this queue (pid {} on {}, seen {:.1} s ago): \
                 give each process its own [database] process_name (or API port)",
                other.name,
                other.pid,
                other.host,
                seen_ago_ms as f64 / 1000.0
            );
        }
        Ok(())
    }

    /// Says this process is alive, registering it on the first call; processes not
    /// heard of for [`FORGET_PROCESS_AFTER`] are struck off.
    pub async fn report_alive(&self, started_at_ms: i64) -> Result<()> {
        use sea_orm::sea_query::OnConflict;
        let now = crate::clock::now_ms();
        let row = process::ActiveModel {
            name: Set(self.process.to_string()),
            host: Set(host_name()),
            pid: Set(i64::from(std::process::id())),
            version: Set(env!("CARGO_PKG_VERSION").to_owned()),
            started_at_ms: Set(started_at_ms),
            last_seen_ms: Set(now),
        };
        process::Entity::insert(row)
            .on_conflict(
                OnConflict::column(process::Column::Name)
                    .update_columns([
                        process::Column::Host,
                        process::Column::Pid,
                        process::Column::Version,
                        process::Column::StartedAtMs,
                        process::Column::LastSeenMs,
                    ])
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        process::Entity::delete_many()
            .filter(process::Column::LastSeenMs.lt(now - FORGET_PROCESS_AFTER.as_millis() as i64))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// This process stops: it leaves the registry and gives back the batches it holds,
    /// which any other process may then take at once.
    pub async fn leave(&self) -> Result<()> {
        let txn = self.db.begin().await?;
        batch::Entity::update_many()
            .col_expr(batch::Column::LeasedBy, Expr::value(Option::<String>::None))
            .col_expr(batch::Column::LeaseUntilMs, Expr::value(0i64))
            .filter(batch::Column::LeasedBy.eq(&*self.process))
            .exec(&txn)
            .await?;
        process::Entity::delete_by_id(self.process.to_string())
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(())
    }

    /// The processes sharing the queue, each with the batches whose lease it holds.
    pub async fn processes(&self) -> Result<Vec<ProcessStatus>> {
        let now = crate::clock::now_ms();
        let processes = process::Entity::find()
            .order_by_asc(process::Column::Name)
            .all(&self.db)
            .await?;
        let held = batch::Entity::find()
            .filter(batch::Column::LeasedBy.is_not_null())
            .filter(batch::Column::LeaseUntilMs.gte(now))
            .order_by_asc(batch::Column::FirstReadingId)
            .all(&self.db)
            .await?;
        Ok(processes
            .into_iter()
            .map(|process| ProcessStatus {
                this: process.name == *self.process,
                batches: held
                    .iter()
                    .filter(|b| b.leased_by.as_deref() == Some(&process.name))
                    .map(|b| HeldBatch {
                        client_system: b.client_system.clone(),
                        batch_id: b.id.clone(),
                        lease_until_ms: b.lease_until_ms,
                    })
                    .collect(),
                process,
            })
            .collect())
    }

    /// Tells the other processes that this one found a Client System online or
    /// offline (since `since_ms`). A report of an earlier change than the one
    /// recorded changes nothing: reports may arrive late.
    pub async fn report_connectivity(
        &self,
        client_system: &str,
        online: bool,
        since_ms: i64,
    ) -> Result<()> {
        let sql = "INSERT INTO connectivity (client_system, state, since_ms, reported_by, reported_at_ms) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (client_system) DO UPDATE SET state = excluded.state, \
               since_ms = excluded.since_ms, reported_by = excluded.reported_by, \
               reported_at_ms = excluded.reported_at_ms \
             WHERE connectivity.since_ms <= excluded.since_ms";
        self.db
            .execute_raw(self.statement(
                sql,
                [
                    client_system.into(),
                    if online { "online" } else { "offline" }.into(),
                    since_ms.into(),
                    self.process.as_ref().into(),
                    crate::clock::now_ms().into(),
                ],
            ))
            .await
            .context("failed to share the connectivity found")?;
        Ok(())
    }

    /// The last change of a Client System's reachability any process reported.
    pub async fn shared_connectivity(
        &self,
        client_system: &str,
    ) -> Result<Option<SharedConnectivity>> {
        Ok(connectivity::Entity::find_by_id(client_system.to_owned())
            .one(&self.db)
            .await?
            .map(|row| SharedConnectivity {
                online: row.state == "online",
                since_ms: row.since_ms,
                reported_by: row.reported_by,
                reported_at_ms: row.reported_at_ms,
            }))
    }

    /// The last good remote configuration kept for a Client System.
    pub async fn remote_config(&self, client_system: &str) -> Result<Option<StoredRemoteConfig>> {
        Ok(remote_config::Entity::find_by_id(client_system.to_owned())
            .one(&self.db)
            .await?)
    }

    /// Keeps a Client System's remote configuration, replacing the one kept before.
    pub async fn save_remote_config(&self, config: &StoredRemoteConfig) -> Result<()> {
        use sea_orm::sea_query::OnConflict;
        let row = remote_config::ActiveModel {
            client_system: Set(config.client_system.clone()),
            version: Set(config.version.clone()),
            body: Set(config.body.clone()),
            fetched_at_ms: Set(config.fetched_at_ms),
        };
        remote_config::Entity::insert(row)
            .on_conflict(
                OnConflict::column(remote_config::Column::ClientSystem)
                    .update_columns([
                        remote_config::Column::Version,
                        remote_config::Column::Body,
                        remote_config::Column::FetchedAtMs,
                    ])
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Forgets a Client System's remote configuration (it says it has none).
    pub async fn forget_remote_config(&self, client_system: &str) -> Result<()> {
        remote_config::Entity::delete_by_id(client_system.to_owned())
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

/// A process not heard of for this long is struck off the registry.
pub const FORGET_PROCESS_AFTER: Duration = Duration::from_secs(24 * 3600);

/// This machine's name, for naming processes.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// How long opening a PostgreSQL queue may wait for the server before it says why it
/// cannot (a wrong address or a server that is down should not look like a hang).
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections without an idle timeout or a lifetime, so that the pool runs no
/// maintenance task: sqlx 0.9.0's can miscount its idle connections (a release racing
/// an acquire) and then spin without end, a core busy and a runtime thread lost (sqlx
/// issue 3645, seen here as a test hanging at 100% CPU). Connections stay open; a
/// PostgreSQL one found broken when the pool checks it before use is replaced.
fn without_pool_maintenance(options: &mut ConnectOptions) {
    options
        .idle_timeout(None::<Duration>)
        .max_lifetime(None::<Duration>);
}

/// Options for the connection to the SQLite file at `path`.
fn sqlite_options(path: std::path::PathBuf, durability: Durability) -> ConnectOptions {
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
            .pragma("wal_autocheckpoint", SQLITE_AUTOCHECKPOINT.to_string())
    });
    // The pool pings a connection each time it hands it out, by default: for SQLite a
    // round trip to the connection's thread before every statement or transaction,
    // four a batch delivered. A connection in use is alive; one idle for a while is
    // still checked.
    options.test_before_acquire_if_idle_for(SQLITE_PING_IDLE);
    options
}

/// How long a SQLite connection must have been idle to be checked before it is used.
const SQLITE_PING_IDLE: Duration = Duration::from_secs(30);

/// Connects and brings the schema up to date. Two processes opening a new database at
/// the same moment (the daemon and `syncd enqueue`, say) race: on SQLite, switching a
/// new file to WAL fails at once with "database is locked", and both may run the
/// migrations. The one that loses finds the work done when it tries again.
async fn connect_and_migrate(options: ConnectOptions) -> Result<DatabaseConnection> {
    const TRIES: u32 = 5;
    let mut tries = 0;
    // A PostgreSQL server that does not answer has been waited for already
    // (`POSTGRES_CONNECT_TIMEOUT`): only racing migrations are worth another try there.
    let sqlite = options.get_url().starts_with("sqlite:");
    loop {
        tries += 1;
        let attempt = async {
            let db = Database::connect(options.clone())
                .await
                .map_err(|e| (sqlite, anyhow::Error::from(e)))?;
            Migrator::up(&db, None)
                .await
                .context("failed to bring the database schema up to date")
                .map_err(|e| (true, e))?;
            Ok::<_, (bool, anyhow::Error)>(db)
        };
        match attempt.await {
            Ok(db) => return Ok(db),
            Err((true, error)) if tries < TRIES => {
                tracing::debug!("opening raced another process, trying again: {error:#}");
                tokio::time::sleep(Duration::from_millis(200) * tries).await;
            }
            Err((_, error)) => return Err(error),
        }
    }
}

/// How far a Client System has been batched: the last reading id in a batch for it.
/// On PostgreSQL the Client System's row stays locked to the end of the transaction,
/// so that two processes never record batches from the same progress.
async fn batched_through(txn: &DatabaseTransaction, client_system: &str) -> Result<i64> {
    let mut find = client_system::Entity::find_by_id(client_system);
    if txn.get_database_backend() == DbBackend::Postgres {
        find = find.lock_exclusive();
    }
    Ok(find
        .one(txn)
        .await?
        .with_context(|| format!("client system {client_system} is not registered"))?
        .batched_through)
}

/// Moves a Client System's progress from `from` to `to`, checking and moving it in one
/// statement, and only where `condition` (if any) holds too; false when it was not at
/// `from` (batched further by then, or gone) or the condition did not hold. On
/// PostgreSQL the Client System's row stays locked to the end of the transaction.
async fn move_progress(
    txn: &DatabaseTransaction,
    client_system: &str,
    from: i64,
    to: i64,
    condition: Option<Expr>,
) -> Result<bool> {
    let mut update = client_system::Entity::update_many()
        .col_expr(client_system::Column::BatchedThrough, Expr::value(to))
        .filter(client_system::Column::Name.eq(client_system))
        .filter(client_system::Column::BatchedThrough.eq(from));
    if let Some(condition) = condition {
        update = update.filter(condition);
    }
    Ok(update.exec(txn).await?.rows_affected == 1)
}

/// Which readings to read, in queue order.
enum Range {
    /// Up to `limit` readings after this id.
    After { id: i64, limit: u32 },
    /// Those from the first id to the last, both included.
    Between { first: i64, last: i64 },
}

/// The readings of `range`, in queue order: on SQLite packed into one result row (see
/// [`packed`]), on PostgreSQL a row each.
async fn read_readings(db: &impl ConnectionTrait, range: Range) -> Result<Vec<QueuedReading>> {
    if db.get_database_backend() == DbBackend::Sqlite {
        return packed::read(db, range).await;
    }
    let query = reading::Entity::find().order_by_asc(reading::Column::Id);
    let query = match range {
        Range::After { id, limit } => query
            .filter(reading::Column::Id.gt(id))
            .limit(u64::from(limit)),
        Range::Between { first, last } => query.filter(reading::Column::Id.between(first, last)),
    };
    Ok(query.all(db).await?.into_iter().map(into_queued).collect())
}

async fn insert_readings(txn: &DatabaseTransaction, readings: &[NewReading]) -> Result<()> {
    let backend = txn.get_database_backend();
    for chunk in readings.chunks(INSERT_CHUNK) {
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * READING_COLUMNS);
        for r in chunk {
            values.extend([
                r.meter_id.clone().into(),
                r.channel.clone().into(),
                r.timestamp_ms.into(),
                r.value.into(),
                r.unit.clone().into(),
                r.quality.clone().into(),
                attributes_to_json(&r.attributes).into(),
            ]);
        }
        let sql = if chunk.len() == INSERT_CHUNK {
            full_insert_sql(backend).to_owned()
        } else {
            insert_sql(backend, chunk.len())
        };
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .context("failed to insert readings")?;
    }
    Ok(())
}

/// Values bound per reading inserted, in the order of [`insert_sql`].
const READING_COLUMNS: usize = 7;

/// The INSERT of [`INSERT_CHUNK`] readings, written once per backend: an ingest is
/// mostly such statements, and writing one (through the ORM's query builder, as
/// before) cost more than SQLite inserting its rows.
fn full_insert_sql(backend: DbBackend) -> &'static str {
    static SQLITE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static POSTGRES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let cell = match backend {
        DbBackend::Postgres => &POSTGRES,
        _ => &SQLITE,
    };
    cell.get_or_init(|| insert_sql(backend, INSERT_CHUNK))
}

/// The INSERT of `rows` readings, with the backend's parameters: `$1, $2…`, or on
/// SQLite plain `?`. Not `?1, ?2…` as [`Queue::statement`] writes them: with those, sqlx
/// took 55 ms instead of 1.5 to bind the 7000 values of 1000 readings (it asks SQLite
/// the name of each parameter, and SQLite finds a numbered one's name by a scan).
fn insert_sql(backend: DbBackend, rows: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(100 + rows * READING_COLUMNS * 7);
    sql.push_str(
        "INSERT INTO readings (meter_id, channel, timestamp_ms, value, unit, quality, attributes) VALUES ",
    );
    let mut n = 0;
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..READING_COLUMNS {
            n += 1;
            let separator = if column > 0 { ", " } else { "" };
            let _ = match backend {
                DbBackend::Postgres => write!(sql, "{separator}${n}"),
                _ => write!(sql, "{separator}?"),
            };
        }
        sql.push(')');
    }
    sql
}

/// An upper bound of the readings queued, cheap at any size: the span of their ids
/// (pruning removes the oldest, so the span has no large gaps).
async fn queued_span(txn: &impl ConnectionTrait) -> Result<u64> {
    let (min, max): (Option<i64>, Option<i64>) = reading::Entity::find()
        .select_only()
        .column_as(reading::Column::Id.min(), "lo")
        .column_as(reading::Column::Id.max(), "hi")
        .into_tuple()
        .one(txn)
        .await?
        .unwrap_or((None, None));
    Ok(match (min, max) {
        (Some(lo), Some(hi)) => (hi - lo + 1).max(0) as u64,
        _ => 0,
    })
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
async fn prune(txn: &DatabaseTransaction) -> Result<u64> {
    if txn.get_database_backend() == DbBackend::Postgres {
        // Processes sharing the queue prune one at a time (two deleting the same rows
        // would wait on each other's row locks, or deadlock). Each waits its turn rather
        // than skipping: the last acknowledgement of a drain must leave nothing behind.
        txn.execute_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT pg_advisory_xact_lock({PRUNE_LOCK_KEY})"),
        ))
        .await
        .context("failed to take the prune lock")?;
    }
    // One statement, not a query per table: each is a round trip to the database (on
    // SQLite, to the thread that owns the connection), several per batch delivered.
    let backend = txn.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => PRUNE_POSTGRES,
        _ => PRUNE_SQLITE,
    };
    let deleted = txn
        .execute_raw(Statement::from_string(backend, sql))
        .await
        .context("failed to prune readings")?;
    Ok(deleted.rows_affected())
}

/// Deletes the readings no Client System still needs (see [`prune`]): those up to the
/// least progress of any Client System, and before the first reading of any batch still
/// recorded or of any dead letter. With no Client System registered nothing goes (ids
/// start at 1). The three bounds are folded into one, so that the scan of the table
/// stops at the first reading kept: given as three conditions, SQLite ends the scan at
/// the first and tests the others on each row, reading on through the batch read
/// ahead, which only the next acknowledgement deletes (about 1000 rows, a quarter of
/// the statement's time). The two backends spell the least of several values
/// differently (SQLite's `min`, PostgreSQL's `LEAST`).
macro_rules! prune_sql {
    ($least:literal) => {
        concat!(
            "DELETE FROM readings WHERE id <= ",
            $least,
            "(COALESCE((SELECT MIN(batched_through) FROM client_systems), 0), \
              COALESCE((SELECT MIN(first_reading_id) FROM batches) - 1, 9223372036854775807), \
              COALESCE((SELECT MIN(first_reading_id) FROM dead_letters) - 1, 9223372036854775807))"
        )
    };
}
const PRUNE_SQLITE: &str = prune_sql!("min");
const PRUNE_POSTGRES: &str = prune_sql!("LEAST");

/// Inserts a batch record made by [`Queue::batch_of`].
async fn insert_batch(txn: &DatabaseTransaction, record: &Batch) -> Result<()> {
    batch::Entity::insert(batch::ActiveModel::from(record.clone()))
        .exec_without_returning(txn)
        .await
        .context("failed to record the batch")?;
    Ok(())
}

/// [`Queue::record_read_ahead`] on SQLite, in one round trip (see [`in_one_round_trip`]):
/// the progress moved, where it still is at `after` and (with `delivered`) no batch
/// but that one could be claimed ([`claimable!`]), and the batch inserted only if it was.
async fn record_on_sqlite(
    db: &DatabaseConnection,
    after: i64,
    record: Batch,
    delivered: Option<&str>,
) -> Result<Option<Batch>> {
    const SQL: &str = concat!(
        "BEGIN IMMEDIATE; \
        UPDATE client_systems SET batched_through = ?3 \
          WHERE name = ?1 AND batched_through = ?2 AND (?4 IS NULL OR NOT EXISTS ( \
            SELECT 1 FROM batches WHERE id <> ?4 AND ",
        claimable!("?1", "?5", "?6"),
        ")); \
        INSERT INTO batches (id, client_system, first_reading_id, last_reading_id, \
            reading_count, attempts, next_attempt_at_ms, last_error, created_at_ms, \
            leased_by, lease_until_ms) \
          SELECT ?7, ?1, ?8, ?3, ?9, ?10, ?11, ?12, ?6, ?5, ?13 WHERE changes() = 1; \
        SELECT changes(); \
        COMMIT"
    );
    let query = sqlx::query(SQL)
        .bind(record.client_system.clone())
        .bind(after)
        .bind(record.last_reading_id)
        .bind(delivered.map(str::to_owned))
        .bind(record.leased_by.clone())
        .bind(record.created_at_ms)
        .bind(record.id.clone())
        .bind(record.first_reading_id)
        .bind(record.reading_count)
        .bind(record.attempts)
        .bind(record.next_attempt_at_ms)
        .bind(record.last_error.clone())
        .bind(record.lease_until_ms);
    let recorded = in_one_round_trip(db, query, "record the batch read ahead").await?;
    Ok((recorded == 1).then_some(record))
}

/// The acknowledgement on SQLite — the batch forgotten, the attempt logged, the
/// readings pruned — in one round trip (see [`in_one_round_trip`]); the last statement
/// but the commit answers how many readings the prune deleted.
async fn acknowledge_on_sqlite(db: &DatabaseConnection, batch_id: &str, a: Attempt) -> Result<u64> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "BEGIN IMMEDIATE; \
             DELETE FROM batches WHERE id = ?; \
             INSERT INTO sync_log (client_system, batch_id, attempt, started_at_ms, \
               duration_ms, reading_count, outcome, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?); \
             {PRUNE_SQLITE}; \
             SELECT changes(); \
             COMMIT"
        )
    });
    let query = sqlx::query(SQL.as_str())
        .bind(batch_id.to_owned())
        .bind(a.client_system)
        .bind(a.batch_id)
        .bind(a.attempt)
        .bind(a.started_at_ms)
        .bind(a.duration_ms)
        .bind(a.reading_count)
        .bind(a.outcome)
        .bind(a.error);
    let pruned = in_one_round_trip(db, query, "acknowledge the batch").await?;
    Ok(pruned as u64)
}

/// Runs `query`, a SQLite transaction written out in full (`BEGIN IMMEDIATE` to
/// `COMMIT`), as one query on one of the pool's connections, and returns the count its
/// one result row gives (its `SELECT changes()`); `what` names what it does, in errors.
///
/// sqlx runs each SQLite connection on a thread of its own, every statement a command
/// sent there and an answer sent back (a thread woken on each side); a transaction
/// through sea-orm costs one such round trip for `BEGIN`, one a statement and one for
/// `COMMIT`, on the way between two batches of a drain. Here they are one. sqlx knows
/// nothing of a transaction begun in the text, so a connection whose query failed or
/// was dropped halfway may be left inside it, holding the write lock: such a
/// connection is closed, not put back in the pool, and SQLite rolls its transaction
/// back.
async fn in_one_round_trip(
    db: &DatabaseConnection,
    query: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    what: &str,
) -> Result<i64> {
    /// Closes the connection when dropped before [`Finished::put_back`].
    struct Finished(Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>);
    impl Finished {
        fn put_back(mut self) {
            self.0.take();
        }
    }
    impl Drop for Finished {
        fn drop(&mut self) {
            if let Some(connection) = &mut self.0 {
                connection.close_on_drop();
            }
        }
    }
    let ran = async {
        let mut connection = Finished(Some(db.get_sqlite_connection_pool().acquire().await?));
        let rows = query
            .fetch_all(&mut **connection.0.as_mut().expect("held until put back"))
            .await?;
        connection.put_back();
        Ok::<_, sqlx::Error>(rows)
    };
    let rows = ran.await.with_context(|| format!("failed to {what}"))?;
    let row = rows
        .first()
        .with_context(|| format!("failed to {what}: the transaction answered no count"))?;
    Ok(row.try_get(0)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pool_has_no_maintenance_task() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open("sqlite://queue.db", Durability::Normal, dir.path())
            .await
            .unwrap();
        let pool = queue.db.get_sqlite_connection_pool().options();
        assert_eq!(pool.get_idle_timeout(), None, "an idle timeout");
        assert_eq!(pool.get_max_lifetime(), None, "a lifetime");
        assert_eq!(pool.get_min_connections(), 0);
    }
}
