//! syncd encoder plugin: a batch as one JSON document.
//!
//! ```json
//! {"batch_id":"0193…","site_id":"site-001","readings":[
//!   {"id":1,"meter_id":"elec-1","channel":"import-kwh","timestamp":1700000000000,
//!    "value":12.5,"unit":"kWh","quality":"good","attributes":{"phase":"L1"}}]}
//! ```
//!
//! `timestamp` is milliseconds since the Unix epoch (UTC). The document is written by
//! hand rather than through a serialisation framework: its shape is fixed, and this is
//! the per-reading path of every batch.

// Built against WIT 0.2.0: the batch arrives column by column, which costs the host
// far less to hand over than a list of records.
wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit/v0.2.0",
});

pub use sync::plugin::types::Strings;

struct JsonBatch;

impl Guest for JsonBatch {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "json-batch".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.2.0".into(),
        }
    }

    fn encode(info: BatchInfo, readings: Readings) -> Result<EncodedBatch, String> {
        let body = encode_document(&info.batch_id, &info.site_id, &readings)?;
        Ok(EncodedBatch {
            content_type: "application/json".into(),
            body,
            reading_count: u32::try_from(readings.ids.len())
                .map_err(|_| format!("batch of {} readings is too large", readings.ids.len()))?,
        })
    }
}

export!(JsonBatch);

mod document;
pub use document::encode_document;

#[cfg(test)]
mod tests;
