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

wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit",
});


struct JsonBatch;

impl Guest for JsonBatch {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "json-batch".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    fn encode(info: BatchInfo, readings: Vec<Reading>) -> Result<EncodedBatch, String> {
        let body = encode_document(&info.batch_id, &info.site_id, &readings);
        Ok(EncodedBatch {
            content_type: "application/json".into(),
            body,
            reading_count: u32::try_from(readings.len())
                .map_err(|_| format!("batch of {} readings is too large", readings.len()))?,
        })
    }
}

export!(JsonBatch);

mod document;
pub use document::encode_document;
