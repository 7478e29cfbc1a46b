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
#[error("record {record}: {}", crate::clip(.message))]
pub struct InvalidReading {
    /// 1-based position of the record (the line, in a JSON-lines file); 0 when the
    /// input as a whole is malformed.
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

enum Timestamp {
    Millis(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Expected;
        impl serde::de::Visitor<'_> for Expected {
            type Value = Timestamp;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a timestamp: milliseconds since the Unix epoch (an integer) or RFC 3339 text",
                )
            }
            fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<Timestamp, E> {
                Ok(Timestamp::Millis(ms))
            }
            fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<Timestamp, E> {
                i64::try_from(ms)
                    .map(Timestamp::Millis)
                    .map_err(|_| E::custom(format!("timestamp {ms} is too large")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Timestamp, E> {
                Ok(Timestamp::Text(text.to_owned()))
            }
        }
        deserializer.deserialize_any(Expected)
    }
}

/// Earliest accepted timestamp: 2000-01-01T00:00:00Z.
const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;
/// Latest accepted timestamp: 2100-01-01T00:00:00Z.
const MAX_TIMESTAMP_MS: i64 = 4_102_444_800_000;
/// The longest `meter_id`, `channel`, `unit`, `quality` or attribute name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// The longest attribute value, in bytes (a JSON value that is not a string counts as
/// its JSON text).
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;
/// The most attributes a reading may carry.
pub const MAX_ATTRIBUTES: usize = 64;

/// Checks a name-like field: not too long, no control characters (which also keeps
/// out NUL, that PostgreSQL cannot store).
fn check_name(field: &str, text: &str) -> Result<(), String> {
    if text.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{field} is {} bytes long, over the limit of {MAX_NAME_BYTES}",
            text.len()
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(format!("{field} holds a control character"));
    }
    Ok(())
}

impl NewReading {
    /// Parses and validates one JSON record; `record` numbers it in errors.
    pub fn from_json(text: &str, record: usize) -> Result<Self, InvalidReading> {
        let wire: Wire = serde_json::from_str(text).map_err(|e| InvalidReading {
            record,
            message: e.to_string(),
        })?;
        Self::from_wire(wire, record)
    }

    fn from_wire(wire: Wire, record: usize) -> Result<Self, InvalidReading> {
        let invalid = |message: String| InvalidReading { record, message };
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
        check_name("meter_id", &meter_id).map_err(invalid)?;
        check_name("channel", &wire.channel).map_err(invalid)?;
        check_name("unit", &wire.unit).map_err(invalid)?;
        check_name("quality", &wire.quality).map_err(invalid)?;
        if wire.attributes.len() > MAX_ATTRIBUTES {
            return Err(invalid(format!(
                "{} attributes, over the limit of {MAX_ATTRIBUTES}",
                wire.attributes.len()
            )));
        }
        let attributes: Vec<(String, String)> = wire
            .attributes
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        for (name, value) in &attributes {
            check_name("an attribute name", name).map_err(invalid)?;
            if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(invalid(format!(
                    "attribute \"{name}\" is {} bytes long, over the limit of {MAX_ATTRIBUTE_VALUE_BYTES}",
                    value.len()
                )));
            }
            if value.contains('\0') {
                return Err(invalid(format!(
                    "attribute \"{name}\" holds a NUL character"
                )));
            }
        }
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

/// Parses JSON lines (blank lines skipped), all or nothing. Records are numbered by
/// line.
pub fn parse_json_lines(input: impl BufRead) -> anyhow::Result<Vec<NewReading>> {
    read_records(input, FileFormat::JsonLines).collect()
}

/// The formats of a readings file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON object per line.
    JsonLines,
    /// CSV with a header row: `meter_id`, `timestamp`, `value` and optionally
    /// `channel`, `unit`, `quality`, and `attr.<name>` columns for attributes.
    Csv,
}

/// Reads readings one by one from a file's contents, numbering records by line (JSON
/// lines) or by row after the header (CSV).
pub fn read_records<'a>(
    input: impl BufRead + 'a,
    format: FileFormat,
) -> Box<dyn Iterator<Item = anyhow::Result<NewReading>> + 'a> {
    match format {
        FileFormat::JsonLines => {
            Box::new(
                input
                    .lines()
                    .enumerate()
                    .filter_map(|(i, line)| match line {
                        Err(e) => Some(Err(e.into())),
                        Ok(line) if line.trim().is_empty() => None,
                        Ok(line) => Some(NewReading::from_json(&line, i + 1).map_err(Into::into)),
                    }),
            )
        }
        FileFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .from_reader(input);
            let headers = match reader.headers() {
                Ok(h) => h.clone(),
                Err(e) => return Box::new(std::iter::once(Err(e.into()))),
            };
            let columns = match CsvColumns::new(&headers) {
                Ok(c) => c,
                Err(e) => return Box::new(std::iter::once(Err(e.into()))),
            };
            Box::new(reader.into_records().enumerate().map(move |(i, row)| {
                let row = row.map_err(|e| InvalidReading {
                    record: i + 1,
                    message: e.to_string(),
                })?;
                Ok(columns.reading(&row, i + 1)?)
            }))
        }
    }
}

/// Where each field is in a CSV file's rows.
struct CsvColumns {
    meter_id: usize,
    timestamp: usize,
    value: usize,
    channel: Option<usize>,
    unit: Option<usize>,
    quality: Option<usize>,
    attributes: Vec<(String, usize)>,
}

impl CsvColumns {
    fn new(headers: &csv::StringRecord) -> Result<Self, InvalidReading> {
        let header_error = |message: String| InvalidReading { record: 0, message };
        let find = |name: &str| headers.iter().position(|h| h == name);
        let required = |name: &str| {
            find(name)
                .ok_or_else(|| header_error(format!("the header row has no \"{name}\" column")))
        };
        let mut attributes = Vec::new();
        for (i, h) in headers.iter().enumerate() {
            match h {
                "meter_id" | "timestamp" | "value" | "channel" | "unit" | "quality" => {}
                other => match other.strip_prefix("attr.") {
                    Some(name) if !name.is_empty() => attributes.push((name.to_owned(), i)),
                    _ => {
                        return Err(header_error(format!(
                            "unknown column \"{other}\" (attributes are written attr.<name>)"
                        )));
                    }
                },
            }
        }
        Ok(Self {
            meter_id: required("meter_id")?,
            timestamp: required("timestamp")?,
            value: required("value")?,
            channel: find("channel"),
            unit: find("unit"),
            quality: find("quality"),
            attributes,
        })
    }

    fn reading(
        &self,
        row: &csv::StringRecord,
        record: usize,
    ) -> Result<NewReading, InvalidReading> {
        let cell = |i: usize| row.get(i).unwrap_or("");
        let optional = |i: Option<usize>| i.map(cell).unwrap_or("").to_owned();
        let timestamp = cell(self.timestamp);
        let value = cell(self.value);
        let wire = Wire {
            meter_id: Some(cell(self.meter_id).to_owned()),
            channel: optional(self.channel),
            timestamp: (!timestamp.is_empty()).then(|| match timestamp.parse::<i64>() {
                Ok(ms) => Timestamp::Millis(ms),
                Err(_) => Timestamp::Text(timestamp.to_owned()),
            }),
            value: if value.is_empty() {
                None
            } else {
                Some(value.parse::<f64>().map_err(|_| InvalidReading {
                    record,
                    message: format!("value \"{value}\" is not a number"),
                })?)
            },
            unit: optional(self.unit),
            quality: optional(self.quality),
            attributes: self
                .attributes
                .iter()
                .filter(|(_, i)| !cell(*i).is_empty())
                .map(|(name, i)| (name.clone(), serde_json::Value::String(cell(*i).to_owned())))
                .collect(),
        };
        NewReading::from_wire(wire, record)
    }
}

/// Parses a request body: a JSON array of readings, or JSON lines. All or nothing.
pub fn parse_body(body: &[u8]) -> Result<Vec<NewReading>, InvalidReading> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Ok(Vec::new()),
        Some(b'[') => match std::str::from_utf8(body) {
            Ok(_) => parse_json_array(body),
            Err(e) => {
                let before = &body[..e.valid_up_to()];
                let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
                let column = before.len()
                    - before
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1)
                    + 1;
                Err(InvalidReading {
                    record: 0,
                    message: format!(
                        "not valid UTF-8: byte 0x{:02x} at line {line}, column {column}",
                        body[e.valid_up_to()]
                    ),
                })
            }
        },
        Some(_) => {
            let text = std::str::from_utf8(body).map_err(|e| InvalidReading {
                record: 1 + body[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count(),
                message: "not valid UTF-8".into(),
            })?;
            parse_json_lines(text.as_bytes()).map_err(|e| match e.downcast::<InvalidReading>() {
                Ok(invalid) => invalid,
                Err(other) => InvalidReading {
                    record: 0,
                    message: other.to_string(),
                },
            })
        }
    }
}

/// Parses a JSON array of readings, validating each as it is read, so that an error
/// names the record (1-based position in the array).
pub fn parse_json_array(body: &[u8]) -> Result<Vec<NewReading>, InvalidReading> {
    use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
    use std::cell::RefCell;

    struct Records<'a>(&'a RefCell<Option<InvalidReading>>);

    impl<'de> Visitor<'de> for Records<'_> {
        type Value = Vec<NewReading>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of readings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            let mut record = 0;
            loop {
                record += 1;
                let failure = match seq.next_element::<Wire>() {
                    Ok(None) => return Ok(out),
                    Ok(Some(wire)) => match NewReading::from_wire(wire, record) {
                        Ok(reading) => {
                            out.push(reading);
                            continue;
                        }
                        Err(invalid) => invalid,
                    },
                    Err(e) => InvalidReading {
                        record,
                        message: e.to_string(),
                    },
                };
                *self.0.borrow_mut() = Some(failure);
                return Err(A::Error::custom("invalid record"));
            }
        }
    }

    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = de
        .deserialize_seq(Records(&failure))
        .and_then(|readings| de.end().map(|()| readings));
    result.map_err(|e| {
        failure.into_inner().unwrap_or_else(|| InvalidReading {
            record: 0,
            message: e.to_string(),
        })
    })
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
    fn arrays_name_the_bad_record() {
        let ok = br#"[{"meter_id":"a","timestamp":1700000000000,"value":1},{"meter_id":"b","timestamp":1700000000000,"value":2}]"#;
        assert_eq!(parse_body(ok).unwrap().len(), 2);
        let bad = br#"[{"meter_id":"a","timestamp":1700000000000,"value":1},{"meter_id":"b","timestamp":1700000000000}]"#;
        let err = parse_body(bad).unwrap_err();
        assert_eq!(err.record, 2);
        assert!(err.message.contains("value"), "{err}");
        let wrong_type = br#"[{"meter_id":"a","timestamp":1700000000000,"value":"high"}]"#;
        assert_eq!(parse_body(wrong_type).unwrap_err().record, 1);
        let truncated = br#"[{"meter_id":"a","timestamp":1700000000000,"value":1}"#;
        let err = parse_body(truncated).unwrap_err();
        assert!(err.message.contains("EOF"), "{err}");
        let lines =
            b"{\"meter_id\":\"a\",\"timestamp\":1700000000000,\"value\":1}\n{\"meter_id\":\"a\"}\n";
        assert_eq!(parse_body(lines).unwrap_err().record, 2);
    }

    #[test]
    fn csv_rows_become_readings_and_bad_rows_are_named() {
        let csv = "meter_id,timestamp,value,unit,attr.phase\nm1,1700000000000,1.5,kWh,L1\nm2,2026-11-22T10:00:00Z,2,kWh,\n";
        let readings: Vec<_> = read_records(csv.as_bytes(), FileFormat::Csv)
            .collect::<anyhow::Result<_>>()
            .unwrap();
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[0].attributes, vec![("phase".into(), "L1".into())]);
        assert!(readings[1].attributes.is_empty());
        assert_eq!(readings[1].timestamp_ms, 1_795_341_600_000);

        let bad = "meter_id,timestamp,value\nm1,1700000000000,1\nm2,1700000000000,NaN\n";
        let err = read_records(bad.as_bytes(), FileFormat::Csv)
            .collect::<anyhow::Result<Vec<_>>>()
            .unwrap_err();
        assert!(err.to_string().starts_with("record 2: value NaN"), "{err}");

        let unknown = "meter_id,timestamp,value,colour\n";
        let err = read_records(unknown.as_bytes(), FileFormat::Csv)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
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
