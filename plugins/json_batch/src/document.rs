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
        out.push_str("{\"id\":");
        push_u64(&mut out, readings.ids[i]);
        out.push_str(",\"meter_id\":");
        push_str(&mut out, meter_ids.get(i)?);
        out.push_str(",\"channel\":");
        push_str(&mut out, channels.get(i)?);
        out.push_str(",\"timestamp\":");
        push_i64(&mut out, readings.timestamps_ms[i]);
        out.push_str(",\"value\":");
        push_f64(&mut out, readings.values[i]);
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
pub(crate) fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time while none needs escaping: most text needs none.
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            if !needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Whether any of the eight bytes of `word` is a control character, `"` or `\`.
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS != 0;
    below_space
        || zero_byte(word ^ (ONES * u64::from(b'"')))
        || zero_byte(word ^ (ONES * u64::from(b'\\')))
}

/// Appends `v` in decimal.
pub(crate) fn push_u64(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// Appends `v` in decimal.
pub(crate) fn push_i64(out: &mut String, v: i64) {
    if v < 0 {
        out.push('-');
    }
    push_u64(out, v.unsigned_abs());
}

/// Below this magnitude, a value with at most three decimals is the only such decimal
/// that reads back as it: an f64's spacing there is under 0.001.
const SHORT_DECIMAL_LIMIT: f64 = (1u64 << 42) as f64;

/// Appends `v` as Rust's `Display` writes it (the shortest decimal that reads back as
/// `v`, without an exponent). Meter values mostly have at most three decimals: those
/// are written with integer arithmetic, the rest by `Display`.
pub(crate) fn push_f64(out: &mut String, v: f64) {
    if v == 0.0 {
        out.push_str(if v.is_sign_negative() { "-0" } else { "0" });
        return;
    }
    if v.abs() < SHORT_DECIMAL_LIMIT {
        let thousandths = (v * 1000.0).round();
        if thousandths / 1000.0 == v {
            let m = thousandths as i64;
            if m < 0 {
                out.push('-');
            }
            let m = m.unsigned_abs();
            push_u64(out, m / 1000);
            let mut fraction = m % 1000;
            if fraction != 0 {
                let mut width = 3;
                while fraction.is_multiple_of(10) {
                    fraction /= 10;
                    width -= 1;
                }
                out.push('.');
                for _ in 0..width - digits(fraction) {
                    out.push('0');
                }
                push_u64(out, fraction);
            }
            return;
        }
    }
    let _ = write!(out, "{v}");
}

/// How many decimal digits `v` (under 1000) has.
fn digits(v: u64) -> usize {
    match v {
        0..=9 => 1,
        10..=99 => 2,
        _ => 3,
    }
}
