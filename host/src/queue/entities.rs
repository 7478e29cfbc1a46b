//! sea-orm entities of the queue's tables (schema: the `syncd-migrations` crate).

/// `readings`: the queue itself.
pub mod reading {
    use sea_orm::entity::prelude::*;

    /// One queued reading.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "readings")]
    pub struct Model {
        /// Increasing, never reused.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The meter.
        pub meter_id: String,
        /// The register or quantity.
        pub channel: String,
        /// Milliseconds since the Unix epoch, UTC.
        pub timestamp_ms: i64,
        /// The value.
        pub value: f64,
        /// The unit.
        pub unit: String,
        /// The quality flag.
        pub quality: String,
        /// A JSON object of string attributes, or null.
        pub attributes: Option<String>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `client_systems`: how far each Client System has been batched.
pub mod client_system {
    use sea_orm::entity::prelude::*;

    /// One Client System's progress.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "client_systems")]
    pub struct Model {
        /// The Client System's name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// Every reading with an id up to this one is in a batch for it, or delivered.
        pub batched_through: i64,
        /// When it was first seen, milliseconds since the Unix epoch.
        pub added_at_ms: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `batches`: batches recorded and not yet acknowledged.
pub mod batch {
    use sea_orm::entity::prelude::*;

    /// One batch: a range of reading ids for one Client System.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "batches")]
    pub struct Model {
        /// The batch id, sent as the idempotency key.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The Client System it goes to.
        pub client_system: String,
        /// The first reading id of the range.
        pub first_reading_id: i64,
        /// The last reading id of the range.
        pub last_reading_id: i64,
        /// Readings in the range when the batch was made.
        pub reading_count: i32,
        /// Attempts made so far.
        pub attempts: i32,
        /// Not to be attempted before this time, milliseconds since the Unix epoch.
        pub next_attempt_at_ms: i64,
        /// Why the last attempt failed.
        pub last_error: Option<String>,
        /// When the batch was made.
        pub created_at_ms: i64,
        /// The process sending it, while its lease lasts.
        pub leased_by: Option<String>,
        /// Until when `leased_by` holds it, milliseconds since the Unix epoch; after
        /// that any process may take it over.
        pub lease_until_ms: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `dead_letters`: batches that will not be retried without an operator.
pub mod dead_letter {
    use sea_orm::entity::prelude::*;

    /// One dead batch.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "dead_letters")]
    pub struct Model {
        /// The batch id (kept if the batch is requeued).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The Client System it was going to.
        pub client_system: String,
        /// The first reading id of the range.
        pub first_reading_id: i64,
        /// The last reading id of the range.
        pub last_reading_id: i64,
        /// Readings in the range.
        pub reading_count: i32,
        /// Attempts made.
        pub attempts: i32,
        /// Why it is dead.
        pub reason: String,
        /// When the batch was made.
        pub created_at_ms: i64,
        /// When it died.
        pub dead_at_ms: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `sync_log`: one row per delivery attempt.
pub mod sync_log {
    use sea_orm::entity::prelude::*;

    /// One attempt.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_log")]
    pub struct Model {
        /// Row id.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The Client System.
        pub client_system: String,
        /// The batch attempted.
        pub batch_id: Option<String>,
        /// 1 for the first attempt at the batch.
        pub attempt: i32,
        /// When the attempt started, milliseconds since the Unix epoch.
        pub started_at_ms: i64,
        /// How long it took.
        pub duration_ms: i64,
        /// Readings in the batch.
        pub reading_count: i32,
        /// `accepted`, `retry`, `rejected`, `unauthorized` or `failed`.
        pub outcome: String,
        /// What went wrong, if anything.
        pub error: Option<String>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `remote_configs`: the last good remote configuration of each Client System.
pub mod remote_config {
    use sea_orm::entity::prelude::*;

    /// One Client System's remote configuration.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "remote_configs")]
    pub struct Model {
        /// The Client System's name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub client_system: String,
        /// The version label the Client System gave it.
        pub version: String,
        /// The settings, a JSON object.
        pub body: String,
        /// When it was downloaded, milliseconds since the Unix epoch.
        pub fetched_at_ms: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `processes`: the syncd processes using the queue.
pub mod process {
    use sea_orm::entity::prelude::*;

    /// One process, as it last reported itself.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize)]
    #[sea_orm(table_name = "processes")]
    pub struct Model {
        /// Its name in the queue (`database.process_name`).
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// The machine it runs on.
        pub host: String,
        /// Its process id there.
        pub pid: i64,
        /// syncd's version.
        pub version: String,
        /// When it started, milliseconds since the Unix epoch.
        pub started_at_ms: i64,
        /// When it last said it was alive.
        pub last_seen_ms: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `connectivity`: per Client System, the last change of reachability any process saw.
pub mod connectivity {
    use sea_orm::entity::prelude::*;

    /// The last online/offline change seen for one Client System.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "connectivity")]
    pub struct Model {
        /// The Client System's name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub client_system: String,
        /// `online` or `offline`.
        pub state: String,
        /// Since when, milliseconds since the Unix epoch.
        pub since_ms: i64,
        /// The process that saw it.
        pub reported_by: String,
        /// When it said so.
        pub reported_at_ms: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
