//! Several syncd processes on one PostgreSQL queue: batches are leased by one process
//! at a time, the processes register themselves, connectivity evidence is shared, and
//! every transaction inserting readings commits its ids in order, whoever it is.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Batches {
    Table,
    LeasedBy,
    LeaseUntilMs,
}

#[derive(DeriveIden)]
enum Processes {
    Table,
    Name,
    Host,
    Pid,
    Version,
    StartedAtMs,
    LastSeenMs,
}

#[derive(DeriveIden)]
enum Connectivity {
    Table,
    ClientSystem,
    State,
    SinceMs,
    ReportedBy,
    ReportedAtMs,
}

/// Takes the ingest lock ([`crate::INGEST_LOCK_KEY`]) before a statement inserting
/// readings allocates its ids, and holds it to the end of the transaction: ids then
/// commit in the order they were handed out, even from writers that know nothing of
/// syncd. A statement-level BEFORE trigger fires before any row's default (the
/// sequence) is evaluated.
fn ingest_order_trigger() -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION syncd_ingest_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({});
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS syncd_ingest_order ON readings;
CREATE TRIGGER syncd_ingest_order BEFORE INSERT ON readings
    FOR EACH STATEMENT EXECUTE FUNCTION syncd_ingest_order();
"#,
        crate::INGEST_LOCK_KEY
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite adds one column per statement.
        manager
            .alter_table(
                Table::alter()
                    .table(Batches::Table)
                    .add_column(ColumnDef::new(Batches::LeasedBy).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Batches::Table)
                    .add_column(
                        ColumnDef::new(Batches::LeaseUntilMs)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Processes::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Processes::Name)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Processes::Host).text().not_null())
                    .col(ColumnDef::new(Processes::Pid).big_integer().not_null())
                    .col(ColumnDef::new(Processes::Version).text().not_null())
                    .col(
                        ColumnDef::new(Processes::StartedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Processes::LastSeenMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Connectivity::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Connectivity::ClientSystem)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Connectivity::State).text().not_null())
                    .col(
                        ColumnDef::new(Connectivity::SinceMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Connectivity::ReportedBy).text().not_null())
                    .col(
                        ColumnDef::new(Connectivity::ReportedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(&ingest_order_trigger()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(
                "DROP TRIGGER IF EXISTS syncd_ingest_order ON readings; \
                 DROP FUNCTION IF EXISTS syncd_ingest_order();",
            )
            .await?;
        }
        for table in [
            Processes::Table.into_iden(),
            Connectivity::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        for column in [
            Batches::LeasedBy.into_iden(),
            Batches::LeaseUntilMs.into_iden(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Batches::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
