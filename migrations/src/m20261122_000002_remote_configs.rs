//! The last good remote configuration of each Client System, so that a site that
//! boots while its Client System is out of reach still applies it.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum RemoteConfigs {
    Table,
    ClientSystem,
    Version,
    Body,
    FetchedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RemoteConfigs::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RemoteConfigs::ClientSystem)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(RemoteConfigs::Version).text().not_null())
                    .col(ColumnDef::new(RemoteConfigs::Body).text().not_null())
                    .col(
                        ColumnDef::new(RemoteConfigs::FetchedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(RemoteConfigs::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
