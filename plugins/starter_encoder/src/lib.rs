//! A syncd encoder plugin: turns a batch of readings into the bytes a Client System
//! receives. This one writes the JSON document of the reference Client System:
//!
//! ```json
//! {"batch_id":"0193…","site_id":"site-001","readings":[{"id":1,"meter_id":"elec-1",
//!  "channel":"import-kwh","timestamp":1767225600000,"value":12.5,"unit":"kWh",
//!  "quality":"good","attributes":{"phase":"L1"}}]}
//! ```
//!
//! Change `encode` to write what your Client System takes. The contract (the WIT
//! files in `wit/`) and what the host does with each answer are in syncd's
//! docs/plugins.md.

wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit/v0.2.0",
});

use sync::plugin::types::Strings;

struct Plugin;

impl Guest for Plugin {
    /// Who this plugin is; `wit-version` must be the version of the WIT it was built
    /// against, or the host refuses it.
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "starter-encoder".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.2.0".into(),
        }
    }

    /// An `Err` says this batch can never be encoded: the host moves it to dead
    /// letters. A panic is a bug: the host keeps the batch and tries again later.
    fn encode(info: BatchInfo, readings: Readings) -> Result<EncodedBatch, String> {
        let mut rows = Vec::with_capacity(readings.ids.len());
        for reading in each_reading(&readings)? {
            let attributes: serde_json::Map<String, serde_json::Value> = reading
                .attributes
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.into()))
                .collect();
            rows.push(serde_json::json!({
                "id": reading.id,
                "meter_id": reading.meter_id,
                "channel": reading.channel,
                "timestamp": reading.timestamp_ms,
                "value": reading.value,
                "unit": reading.unit,
                "quality": reading.quality,
                "attributes": attributes,
            }));
        }
        let document = serde_json::json!({
            "batch_id": info.batch_id,
            "site_id": info.site_id,
            "readings": rows,
        });
        Ok(EncodedBatch {
            content_type: "application/json; charset=utf-8".into(),
            body: document.to_string().into_bytes(),
            // Must equal the number of readings given, or the host refuses the answer.
            reading_count: rows.len() as u32,
        })
    }
}

export!(Plugin);

/// One reading of a batch, borrowed from its columns.
#[derive(Debug, PartialEq)]
pub struct Reading<'a> {
    pub id: u64,
    pub meter_id: &'a str,
    pub channel: &'a str,
    /// Milliseconds since the Unix epoch, UTC.
    pub timestamp_ms: i64,
    pub value: f64,
    pub unit: &'a str,
    pub quality: &'a str,
    pub attributes: Vec<(&'a str, &'a str)>,
}

/// The readings of a batch one by one. WIT 0.2.0 hands a batch over column by column
/// (far cheaper than one record per reading); this puts each reading back together.
pub fn each_reading(r: &Readings) -> Result<Vec<Reading<'_>>, String> {
    let n = r.ids.len();
    if [
        r.timestamps_ms.len(),
        r.values.len(),
        r.attribute_ends.len(),
    ] != [n; 3]
    {
        return Err("the batch's columns differ in length".into());
    }
    let pairs = r.attribute_ends.last().copied().unwrap_or(0) as usize;
    let (meters, channels) = (split(&r.meter_ids, n)?, split(&r.channels, n)?);
    let (units, qualities) = (split(&r.units, n)?, split(&r.qualities, n)?);
    let keys = split(&r.attribute_keys, pairs)?;
    let values = split(&r.attribute_values, pairs)?;
    let mut start = 0;
    (0..n)
        .map(|i| {
            let end = r.attribute_ends[i] as usize;
            let attributes = (start..end)
                .map(|j| Some((*keys.get(j)?, *values.get(j)?)))
                .collect::<Option<Vec<_>>>()
                .ok_or("attribute ends out of place")?;
            start = end;
            Ok(Reading {
                id: r.ids[i],
                meter_id: meters[i],
                channel: channels[i],
                timestamp_ms: r.timestamps_ms[i],
                value: r.values[i],
                unit: units[i],
                quality: qualities[i],
                attributes,
            })
        })
        .collect()
}

/// The `len` strings of a column: `text` cut at each of `ends` (byte offsets).
fn split(column: &Strings, len: usize) -> Result<Vec<&str>, String> {
    if column.ends.len() != len {
        return Err(format!(
            "a column holds {} strings for {len}",
            column.ends.len()
        ));
    }
    let mut start = 0;
    column
        .ends
        .iter()
        .map(|&end| {
            let s = column
                .text
                .get(start..end as usize)
                .ok_or("a string ends out of place")?;
            start = end as usize;
            Ok(s)
        })
        .collect()
}

// `cargo test` runs these natively: the plugin's logic, without the host.
#[cfg(test)]
mod tests {
    use super::*;

    fn column(strings: &[&str]) -> Strings {
        let mut ends = Vec::new();
        let mut text = String::new();
        for s in strings {
            text.push_str(s);
            ends.push(text.len() as u32);
        }
        Strings { text, ends }
    }

    #[test]
    fn a_batch_becomes_one_document_with_every_field() {
        let readings = Readings {
            ids: vec![7, 8],
            meter_ids: column(&["elec-1", "gas-\"Zürich\""]),
            channels: column(&["import-kwh", ""]),
            timestamps_ms: vec![1_767_225_600_000, 1_767_225_900_000],
            values: vec![12.5, 0.125],
            units: column(&["kWh", "m3"]),
            qualities: column(&["good", "estimated"]),
            attribute_ends: vec![1, 1],
            attribute_keys: column(&["phase"]),
            attribute_values: column(&["L1"]),
        };
        let info = BatchInfo {
            batch_id: "b-1".into(),
            site_id: "site-1".into(),
            client_system: "central".into(),
            attempt: 1,
        };
        let batch = Plugin::encode(info, readings).unwrap();
        assert_eq!(batch.reading_count, 2);
        let document: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        assert_eq!(document["batch_id"], "b-1");
        assert_eq!(document["readings"][0]["attributes"]["phase"], "L1");
        assert_eq!(document["readings"][1]["meter_id"], "gas-\"Zürich\"");
        assert_eq!(document["readings"][1]["value"], 0.125);
    }

    #[test]
    fn columns_that_do_not_hold_together_are_refused() {
        let mut short = column(&["a"]);
        short.ends.push(99);
        assert!(split(&short, 2).is_err());
        assert!(split(&column(&["a", "b"]), 3).is_err());
    }
}
