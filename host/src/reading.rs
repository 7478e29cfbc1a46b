//! Readings as they arrive: the JSON ingest format and its validation.
//!
//! One reading, as a JSON object (one per line in a JSON-lines file):
//!
//! ```json
//! {"meter_id":"elec-1","channel":"import-kwh","timestamp":"2026-11-22T10:00:00Z",
//!  "value":12.5,"unit":"kWh","quality":"good","attributes":{"phase":"L1"}}
//! ```
//!
//! `meter_id`, `timestamp` and `value` are required. `timestamp` is an RFC 3339 time or
//! milliseconds since the Unix epoch. Unknown fields are refused.

use std::io::BufRead;

use serde::Deserialize;

/// A valid reading, ready to be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReading {
    /// The meter.
    pub meter_id: String,
    /// The register or quantity; empty for none.
    pub channel: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub timestamp_ms: i64,
    /// The value; finite.
    pub value: f64,
    /// The unit; empty when unknown.
    pub unit: String,
    /// The quality flag; empty for none.
    pub quality: String,
    /// Free-form attributes, in the order given.
    pub attributes: Vec<(String, String)>,
}

/// Why a reading was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("record {record}: {message}")]
pub struct InvalidReading {
    /// 1-based position of the record (the line, in a JSON-lines file).
    pub record: usize,
    /// What is wrong, naming the field.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    meter_id: Option<String>,
    #[serde(default)]
    channel: String,
    timestamp: Option<Timestamp>,
    value: Option<f64>,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    quality: String,
    #[serde(default)]
    attributes: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Timestamp {
    Millis(i64),
    Text(String),
}

/// Earliest accepted timestamp: 2000-01-01T00:00:00Z.
const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;
/// Latest accepted timestamp: 2100-01-01T00:00:00Z.
const MAX_TIMESTAMP_MS: i64 = 4_102_444_800_000;

impl NewReading {
    /// Parses and validates one JSON record; `record` numbers it in errors.
    pub fn from_json(text: &str, record: usize) -> Result<Self, InvalidReading> {
        let invalid = |message: String| InvalidReading { record, message };
        let wire: Wire = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let meter_id = wire
            .meter_id
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| invalid("meter_id is missing or empty".into()))?;
        let timestamp_ms = match wire.timestamp {
            None => return Err(invalid("timestamp is missing".into())),
            Some(Timestamp::Millis(ms)) => ms,
            Some(Timestamp::Text(text)) => parse_rfc3339_ms(&text).ok_or_else(|| {
                invalid(format!(
                    "timestamp \"{text}\" is neither RFC 3339 nor milliseconds since the epoch"
                ))
            })?,
        };
        if !(MIN_TIMESTAMP_MS..MAX_TIMESTAMP_MS).contains(&timestamp_ms) {
            return Err(invalid(format!(
                "timestamp {timestamp_ms} is outside 2000-01-01 to 2100-01-01 (milliseconds expected)"
            )));
        }
        let value = wire
            .value
            .ok_or_else(|| invalid("value is missing".into()))?;
        if !value.is_finite() {
            return Err(invalid(format!("value {value} is not a finite number")));
        }
        let attributes = wire
            .attributes
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        Ok(Self {
            meter_id,
            channel: wire.channel,
            timestamp_ms,
            value,
            unit: wire.unit,
            quality: wire.quality,
            attributes,
        })
    }
}

/// Parses JSON lines (blank lines skipped), all or nothing.
pub fn parse_json_lines(input: impl BufRead) -> anyhow::Result<Vec<NewReading>> {
    let mut readings = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        readings.push(NewReading::from_json(&line, i + 1)?);
    }
    Ok(readings)
}

fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Attributes as stored: a JSON object, or none when there are none.
pub fn attributes_to_json(attributes: &[(String, String)]) -> Option<String> {
    if attributes.is_empty() {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    Some(serde_json::Value::Object(map).to_string())
}

/// Attributes from their stored JSON object. Rows written by other programs may hold
/// non-string values (kept as their JSON text) or text that is not an object (kept
/// under the key "attributes", so nothing is lost).
pub fn attributes_from_json(text: Option<&str>) -> Vec<(String, String)> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Vec::new();
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => vec![("attributes".to_owned(), text.to_owned())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_reading() {
        let r = NewReading::from_json(
            r#"{"meter_id":"m1","channel":"kwh","timestamp":"2026-11-22T10:00:00Z","value":1.5,"unit":"kWh","quality":"good","attributes":{"a":"b","n":3}}"#,
            1,
        )
        .unwrap();
        assert_eq!(r.timestamp_ms, 1_795_341_600_000);
        assert_eq!(
            r.attributes,
            vec![("a".into(), "b".into()), ("n".into(), "3".into())]
        );
    }

    #[test]
    fn refusals_name_the_record_and_field() {
        for (text, needle) in [
            (r#"{"timestamp":1700000000000,"value":1}"#, "meter_id"),
            (r#"{"meter_id":"m","value":1}"#, "timestamp"),
            (
                r#"{"meter_id":"m","timestamp":"yesterday","value":1}"#,
                "timestamp",
            ),
            (
                r#"{"meter_id":"m","timestamp":1700000000,"value":1}"#,
                "outside",
            ),
            (r#"{"meter_id":"m","timestamp":1700000000000}"#, "value"),
            (
                r#"{"meter_id":"m","timestamp":1700000000000,"value":1,"colour":"red"}"#,
                "colour",
            ),
        ] {
            let err = NewReading::from_json(text, 7).unwrap_err();
            assert_eq!(err.record, 7);
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
    }

    #[test]
    fn json_lines_are_all_or_nothing() {
        let input = "{\"meter_id\":\"a\",\"timestamp\":1700000000000,\"value\":1}\n\n{\"meter_id\":\"\",\"timestamp\":1700000000000,\"value\":1}\n";
        let err = parse_json_lines(input.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("record 3"), "{err}");
    }

    #[test]
    fn attributes_round_trip() {
        let attrs = vec![("phase".to_owned(), "L1".to_owned())];
        assert_eq!(
            attributes_from_json(attributes_to_json(&attrs).as_deref()),
            attrs
        );
        assert_eq!(
            attributes_from_json(Some("oops")),
            vec![("attributes".into(), "oops".into())]
        );
    }
}
