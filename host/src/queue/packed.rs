//! Reading a batch's readings out of SQLite as one result row.
//!
//! sqlx runs each SQLite connection on a thread of its own and hands every result row
//! to the async side through a channel, waking the reading task for each one it
//! finds waiting: a batch of 1000 readings read row by row cost about 240 context
//! switches, and on a shared two-core machine more time than SQLite's own work (3.9 to
//! 4.7 ms a batch against 2.6 to 2.7 ms read this way, 1.3 cores busy against one).
//! Here SQLite packs the whole batch into one JSON array, which crosses once.
//!
//! JSON text would round a value to 15 significant digits, so no value goes through
//! text. A value goes as its whole number of millionths when that number divided by a
//! million is exactly the stored value, checked in the same statement with the same
//! IEEE division that turns it back here; any other value (more than six decimals, or
//! a magnitude of 9·10⁹ or more) follows the array as a REAL in a row of its own. Both
//! come from one statement, so from one snapshot of the table.

use std::sync::LazyLock;

use anyhow::{Context, Result, bail};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Deserialize;

use super::entities::reading;
use super::{QueuedReading, Range, into_queued};

/// Millionths: the finest step of a value sent as an integer.
const SCALE: f64 = 1_000_000.0;

/// The statement for readings after an id (bound: the id, the limit).
static AFTER: LazyLock<String> = LazyLock::new(|| statement("id > ? ORDER BY id LIMIT ?"));

/// The statement for readings between two ids (bound: the first, the last).
static BETWEEN: LazyLock<String> = LazyLock::new(|| statement("id BETWEEN ? AND ? ORDER BY id"));

/// The statement reading the readings that match `condition`. `abs(value) < 9.0e9`
/// keeps the millionths under 2⁵³, where a double holds every integer; `micros` is
/// NULL for a value they do not give back exactly (NaN is stored as NULL by SQLite, and
/// the column is NOT NULL).
fn statement(condition: &str) -> String {
    format!(
        "WITH batch AS MATERIALIZED (\
           SELECT id, meter_id, channel, timestamp_ms, value, unit, quality, attributes, \
             CASE WHEN abs(value) < 9.0e9 \
               AND CAST(round(value * {SCALE:.1}) AS INTEGER) / {SCALE:.1} = value \
             THEN CAST(round(value * {SCALE:.1}) AS INTEGER) END AS micros \
           FROM readings WHERE {condition}) \
         SELECT 0, json_group_array(json_array(id, meter_id, channel, timestamp_ms, micros, \
           unit, quality, attributes)), NULL FROM batch \
         UNION ALL SELECT 1, id, value FROM batch WHERE micros IS NULL"
    )
}

/// One reading of the array, its fields in the order of the statement's
/// `json_array`; the value in millionths, or none when it follows as a REAL.
#[derive(Deserialize)]
struct Packed(
    i64,
    String,
    String,
    i64,
    Option<i64>,
    String,
    String,
    Option<String>,
);

/// The readings of `range` from a SQLite queue, in id order.
pub(super) async fn read(db: &impl ConnectionTrait, range: Range) -> Result<Vec<QueuedReading>> {
    let (sql, values): (&str, Vec<sea_orm::Value>) = match range {
        Range::After { id, limit } => (&AFTER, vec![id.into(), limit.into()]),
        Range::Between { first, last } => (&BETWEEN, vec![first.into(), last.into()]),
    };
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            sql,
            values,
        ))
        .await
        .context("failed to read readings from the queue")?;
    let mut array = None;
    let mut exact: Vec<(i64, f64)> = Vec::new();
    for row in &rows {
        match row.try_get_by_index::<i64>(0)? {
            0 => array = Some(row.try_get_by_index::<String>(1)?),
            _ => exact.push((row.try_get_by_index(1)?, row.try_get_by_index(2)?)),
        }
    }
    let array = array.context("the queue's reading statement returned no array")?;
    unpack(&array, exact)
}

/// The readings of the statement's array and of the rows of exact values after it, in
/// id order.
///
/// The array holds the readings in the order the aggregate was fed them, which is the
/// batch's (the materialized rows, in id order) but which SQLite does not promise: they
/// are sorted here when they are not. An `ORDER BY` in the aggregate would promise it,
/// at the cost of SQLite sorting every batch again (about 30% of the statement's time
/// for 1000 readings), where checking the order costs a pass over them.
fn unpack(array: &str, mut exact: Vec<(i64, f64)>) -> Result<Vec<QueuedReading>> {
    let mut packed: Vec<Packed> =
        serde_json::from_str(array).context("the queue's packed readings do not parse")?;
    if !packed.is_sorted_by_key(|p| p.0) {
        packed.sort_unstable_by_key(|p| p.0);
    }
    exact.sort_unstable_by_key(|&(id, _)| id);
    let mut readings = Vec::with_capacity(packed.len());
    let mut previous = i64::MIN;
    for Packed(id, meter_id, channel, timestamp_ms, micros, unit, quality, attributes) in packed {
        if id == previous {
            bail!("the queue's packed readings hold id {id} twice");
        }
        previous = id;
        let value = match micros {
            Some(micros) => micros as f64 / SCALE,
            None => match exact.binary_search_by_key(&id, |&(id, _)| id) {
                Ok(at) => exact[at].1,
                Err(_) => bail!("the value of reading {id} is missing from the queue's answer"),
            },
        };
        readings.push(into_queued(reading::Model {
            id,
            meter_id,
            channel,
            timestamp_ms,
            value,
            unit,
            quality,
            attributes,
        }));
    }
    Ok(readings)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings that come out of the aggregate in another order than their ids' still
    /// come back in id order, each with its own value, exact ones included.
    #[test]
    fn readings_packed_out_of_order_come_back_in_id_order() {
        let array = r#"[[3,"m-3","c",3000,3500000,"kWh","good",null],
            [1,"m-1","c",1000,null,"kWh","good","{\"phase\":\"L1\"}"],
            [2,"m-2","c",2000,2250000,"kWh","good",null]]"#;
        let readings = unpack(array, vec![(1, 0.1 + 0.2)]).unwrap();
        let got: Vec<(i64, &str, i64, f64)> = readings
            .iter()
            .map(|r| {
                let n = &r.reading;
                (r.id, n.meter_id.as_str(), n.timestamp_ms, n.value)
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, "m-1", 1000, 0.1 + 0.2),
                (2, "m-2", 2000, 2.25),
                (3, "m-3", 3000, 3.5)
            ]
        );
        assert_eq!(readings[0].reading.attributes.len(), 1);
    }

    #[test]
    fn an_id_packed_twice_is_an_error() {
        let array = r#"[[1,"m","c",1,1000000,"","",null],[1,"m","c",1,1000000,"","",null]]"#;
        let error = unpack(array, Vec::new()).unwrap_err();
        assert!(error.to_string().contains("id 1 twice"), "{error:#}");
    }
}
