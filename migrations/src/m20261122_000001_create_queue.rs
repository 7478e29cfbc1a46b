//! The queue, per-Client-System progress, batches, dead letters and the sync log.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Readings {
    Table,
    Id,
    MeterId,
    Channel,
    TimestampMs,
    Value,
    Unit,
    Quality,
    Attributes,
}

#[derive(DeriveIden)]
enum ClientSystems {
    Table,
    Name,
    BatchedThrough,
    AddedAtMs,
}

#[derive(DeriveIden)]
enum Batches {
    Table,
    Id,
    ClientSystem,
    FirstReadingId,
    LastReadingId,
    ReadingCount,
    Attempts,
    NextAttemptAtMs,
    LastError,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum DeadLetters {
    Table,
    Id,
    ClientSystem,
    FirstReadingId,
    LastReadingId,
    ReadingCount,
    Attempts,
    Reason,
    CreatedAtMs,
    DeadAtMs,
}

#[derive(DeriveIden)]
enum SyncLog {
    Table,
    Id,
    ClientSystem,
    BatchId,
    Attempt,
    StartedAtMs,
    DurationMs,
    ReadingCount,
    Outcome,
    Error,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Reading ids must never be reused, even once every reading is deleted:
        // progress is tracked as "batched through id N". On SQLite an auto-increment
        // primary key gets AUTOINCREMENT, which guarantees that.
        manager
            .create_table(
                Table::create()
                    .table(Readings::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Readings::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Readings::MeterId).text().not_null())
                    .col(
                        ColumnDef::new(Readings::Channel)
                            .text()
                            .not_null()
                            .default(""),
                    )
                    .col(
                        ColumnDef::new(Readings::TimestampMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Readings::Value).double().not_null())
                    .col(ColumnDef::new(Readings::Unit).text().not_null().default(""))
                    .col(
                        ColumnDef::new(Readings::Quality)
                            .text()
                            .not_null()
                            .default(""),
                    )
                    .col(ColumnDef::new(Readings::Attributes).text().null())
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ClientSystems::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ClientSystems::Name)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(ClientSystems::BatchedThrough)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ClientSystems::AddedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Batches::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Batches::Id).text().not_null().primary_key())
                    .col(ColumnDef::new(Batches::ClientSystem).text().not_null())
                    .col(
                        ColumnDef::new(Batches::FirstReadingId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Batches::LastReadingId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Batches::ReadingCount).integer().not_null())
                    .col(
                        ColumnDef::new(Batches::Attempts)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(
                        ColumnDef::new(Batches::NextAttemptAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Batches::LastError).text().null())
                    .col(
                        ColumnDef::new(Batches::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("batches_by_client_system")
                    .table(Batches::Table)
                    .col(Batches::ClientSystem)
                    .col(Batches::FirstReadingId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(DeadLetters::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(DeadLetters::Id)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(DeadLetters::ClientSystem).text().not_null())
                    .col(
                        ColumnDef::new(DeadLetters::FirstReadingId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DeadLetters::LastReadingId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DeadLetters::ReadingCount)
                            .integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(DeadLetters::Attempts).integer().not_null())
                    .col(ColumnDef::new(DeadLetters::Reason).text().not_null())
                    .col(
                        ColumnDef::new(DeadLetters::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(DeadLetters::DeadAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("dead_letters_by_first_reading")
                    .table(DeadLetters::Table)
                    .col(DeadLetters::FirstReadingId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SyncLog::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncLog::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SyncLog::ClientSystem).text().not_null())
                    .col(ColumnDef::new(SyncLog::BatchId).text().null())
                    .col(ColumnDef::new(SyncLog::Attempt).integer().not_null())
                    .col(
                        ColumnDef::new(SyncLog::StartedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncLog::DurationMs).big_integer().not_null())
                    .col(ColumnDef::new(SyncLog::ReadingCount).integer().not_null())
                    .col(ColumnDef::new(SyncLog::Outcome).text().not_null())
                    .col(ColumnDef::new(SyncLog::Error).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("sync_log_by_time")
                    .table(SyncLog::Table)
                    .col(SyncLog::StartedAtMs)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            SyncLog::Table.into_iden(),
            DeadLetters::Table.into_iden(),
            Batches::Table.into_iden(),
            ClientSystems::Table.into_iden(),
            Readings::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
