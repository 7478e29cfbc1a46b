//! Test fixture, not a plugin to deploy: "version 0.2.0" of the `json-batch` encoder,
//! for the hot-reload tests. It writes the same document as `json_batch` (through
//! serde_json rather than by hand) and labels it `application/json; schema=2`, so a
//! Client System can tell which version encoded each batch.

wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit",
});

use serde_json::{Map, Value, json};

struct JsonBatchV2;

impl Guest for JsonBatchV2 {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "json-batch".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    fn encode(info: BatchInfo, readings: Vec<Reading>) -> Result<EncodedBatch, String> {
        let count = u32::try_from(readings.len()).map_err(|_| "batch too large".to_owned())?;
        let readings: Vec<Value> = readings
            .into_iter()
            .map(|r| {
                let attributes: Map<String, Value> = r
                    .attributes
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                json!({
                    "id": r.id,
                    "meter_id": r.meter_id,
                    "channel": r.channel,
                    "timestamp": r.timestamp_ms,
                    "value": r.value,
                    "unit": r.unit,
                    "quality": r.quality,
                    "attributes": attributes,
                })
            })
            .collect();
        let document = json!({
            "batch_id": info.batch_id,
            "site_id": info.site_id,
            "readings": readings,
        });
        Ok(EncodedBatch {
            content_type: "application/json; schema=2".into(),
            body: serde_json::to_vec(&document).map_err(|e| e.to_string())?,
            reading_count: count,
        })
    }
}

export!(JsonBatchV2);
