//! The JSON document of a batch. Kept apart from the plugin's bindings so that the
//! benchmarks can compile this same file natively and compare it with the component.

use std::fmt::Write as _;

use super::Reading;

/// Bytes per reading reserved up front: a typical reading takes 120 to 160.
const RESERVE_PER_READING: usize = 160;

/// Writes the JSON document for one batch.
pub fn encode_document(batch_id: &str, site_id: &str, readings: &[Reading]) -> Vec<u8> {
    let mut out = String::with_capacity(64 + readings.len() * RESERVE_PER_READING);
    out.push_str("{\"batch_id\":");
    push_str(&mut out, batch_id);
    out.push_str(",\"site_id\":");
    push_str(&mut out, site_id);
    out.push_str(",\"readings\":[");
    for (i, r) in readings.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing into a String cannot fail.
        let _ = write!(out, "{{\"id\":{},\"meter_id\":", r.id);
        push_str(&mut out, &r.meter_id);
        out.push_str(",\"channel\":");
        push_str(&mut out, &r.channel);
        let _ = write!(
            out,
            ",\"timestamp\":{},\"value\":{}",
            r.timestamp_ms, r.value
        );
        out.push_str(",\"unit\":");
        push_str(&mut out, &r.unit);
        out.push_str(",\"quality\":");
        push_str(&mut out, &r.quality);
        out.push_str(",\"attributes\":{");
        for (j, (k, v)) in r.attributes.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            push_str(&mut out, k);
            out.push(':');
            push_str(&mut out, v);
        }
        out.push_str("}}");
    }
    out.push_str("]}");
    out.into_bytes()
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
