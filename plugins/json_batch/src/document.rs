//! The JSON document of a batch. Kept apart from the plugin's bindings so that the
//! benchmarks can compile this same file natively and compare it with the component.

use std::fmt::Write as _;

use super::{Readings, Strings};

/// Bytes per reading reserved up front: a typical reading takes 120 to 160.
const RESERVE_PER_READING: usize = 160;

/// Writes the JSON document for one batch; an error when the columns do not hold
/// together (a column of the wrong length, a string end out of place).
pub fn encode_document(
    batch_id: &str,
    site_id: &str,
    readings: &Readings,
) -> Result<Vec<u8>, String> {
    let n = readings.ids.len();
    let meter_ids = Column::new("meter-ids", &readings.meter_ids, n)?;
    let channels = Column::new("channels", &readings.channels, n)?;
    let units = Column::new("units", &readings.units, n)?;
    let qualities = Column::new("qualities", &readings.qualities, n)?;
    let pairs = readings.attribute_ends.last().map_or(0, |&e| e as usize);
    let keys = Column::new("attribute-keys", &readings.attribute_keys, pairs)?;
    let values = Column::new("attribute-values", &readings.attribute_values, pairs)?;
    if readings.timestamps_ms.len() != n
        || readings.values.len() != n
        || readings.attribute_ends.len() != n
    {
        return Err(format!(
            "the batch's columns differ in length: {n} ids, {} timestamps, {} values, {} attribute ends",
            readings.timestamps_ms.len(),
            readings.values.len(),
            readings.attribute_ends.len()
        ));
    }

    let mut out = String::with_capacity(64 + n * RESERVE_PER_READING);
    out.push_str("{\"batch_id\":");
    push_str(&mut out, batch_id);
    out.push_str(",\"site_id\":");
    push_str(&mut out, site_id);
    out.push_str(",\"readings\":[");
    let mut pair = 0;
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        // Writing into a String cannot fail.
        let _ = write!(out, "{{\"id\":{},\"meter_id\":", readings.ids[i]);
        push_str(&mut out, meter_ids.get(i)?);
        out.push_str(",\"channel\":");
        push_str(&mut out, channels.get(i)?);
        let _ = write!(
            out,
            ",\"timestamp\":{},\"value\":{}",
            readings.timestamps_ms[i], readings.values[i]
        );
        out.push_str(",\"unit\":");
        push_str(&mut out, units.get(i)?);
        out.push_str(",\"quality\":");
        push_str(&mut out, qualities.get(i)?);
        out.push_str(",\"attributes\":{");
        let end = readings.attribute_ends[i] as usize;
        if end < pair {
            return Err(format!("attribute ends decrease at reading {i}"));
        }
        for j in pair..end {
            if j > pair {
                out.push(',');
            }
            push_str(&mut out, keys.get(j)?);
            out.push(':');
            push_str(&mut out, values.get(j)?);
        }
        pair = end;
        out.push_str("}}");
    }
    out.push_str("]}");
    Ok(out.into_bytes())
}

/// One column of strings, checked to hold `len` of them.
struct Column<'a> {
    name: &'static str,
    strings: &'a Strings,
}

impl<'a> Column<'a> {
    fn new(name: &'static str, strings: &'a Strings, len: usize) -> Result<Self, String> {
        if strings.ends.len() != len {
            return Err(format!(
                "column {name} holds {} strings for {len} entries",
                strings.ends.len()
            ));
        }
        Ok(Self { name, strings })
    }

    /// String `i`.
    fn get(&self, i: usize) -> Result<&'a str, String> {
        let start = match i {
            0 => 0,
            i => self.strings.ends[i - 1] as usize,
        };
        let end = self.strings.ends[i] as usize;
        self.strings
            .text
            .get(start..end)
            .ok_or_else(|| format!("string {i} of column {} is out of place", self.name))
    }
}

/// Appends `s` as a JSON string literal.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}
