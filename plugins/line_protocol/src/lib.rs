//! syncd encoder plugin: a batch in the line protocol that InfluxDB and other
//! time-series databases take, one line a reading:
//!
//! ```text
//! reading,meter_id=elec-1,channel=import-kwh,unit=kWh,quality=good,phase=L1 value=12.5,id=7i 1767225600000000000
//! ```
//!
//! The meter, channel, unit, quality and attributes are tags (empty ones left out,
//! as the protocol has no empty tag), the value is the float field `value`, the
//! reading's queue id the integer field `id`. Settings (`[client_system.plugin]`):
//! `measurement` (default "reading") and `precision` of the timestamps, one of `ns`
//! (the default, as the databases expect without a precision parameter), `us`, `ms`
//! or `s`. Text holding a line break or another control character cannot be written
//! in the protocol: such a batch is refused (it goes to dead letters, with the reason).

use std::fmt::Write as _;

wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit/v0.2.0",
});

use sync::plugin::settings;
use sync::plugin::types::Strings;

struct LineProtocol;

impl Guest for LineProtocol {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "line-protocol".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.2.0".into(),
        }
    }

    fn encode(_info: BatchInfo, readings: Readings) -> Result<EncodedBatch, String> {
        let measurement = settings::get("measurement").unwrap_or_else(|| "reading".into());
        let precision = settings::get("precision").unwrap_or_else(|| "ns".into());
        let body = encode_lines(&readings, &measurement, &precision)?;
        Ok(EncodedBatch {
            content_type: "text/plain; charset=utf-8".into(),
            body: body.into_bytes(),
            reading_count: readings.ids.len() as u32,
        })
    }
}

export!(LineProtocol);

/// The lines of a batch, in the given measurement and timestamp precision.
pub fn encode_lines(r: &Readings, measurement: &str, precision: &str) -> Result<String, String> {
    let per_ms: i64 = match precision {
        "ns" => 1_000_000,
        "us" => 1_000,
        "ms" => 1,
        "s" => 0,
        other => {
            return Err(format!(
                "setting precision = {other:?}: use ns, us, ms or s"
            ));
        }
    };
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
    let meters = Column::new(&r.meter_ids, n)?;
    let channels = Column::new(&r.channels, n)?;
    let units = Column::new(&r.units, n)?;
    let qualities = Column::new(&r.qualities, n)?;
    let keys = Column::new(&r.attribute_keys, pairs)?;
    let values = Column::new(&r.attribute_values, pairs)?;

    let mut out = String::with_capacity(n * 120);
    let mut pair = 0;
    for i in 0..n {
        let tag = |out: &mut String, key: &str, value: &str| -> Result<(), String> {
            if value.is_empty() {
                return Ok(());
            }
            out.push(',');
            escape(out, key, i)?;
            out.push('=');
            escape(out, value, i)
        };
        escape_measurement(&mut out, measurement, i)?;
        tag(&mut out, "meter_id", meters.get(i)?)?;
        tag(&mut out, "channel", channels.get(i)?)?;
        tag(&mut out, "unit", units.get(i)?)?;
        tag(&mut out, "quality", qualities.get(i)?)?;
        let end = r.attribute_ends[i] as usize;
        if end < pair {
            return Err(format!("attribute ends decrease at reading {i}"));
        }
        for j in pair..end {
            tag(&mut out, keys.get(j)?, values.get(j)?)?;
        }
        pair = end;
        let value = r.values[i];
        if !value.is_finite() {
            return Err(format!("reading {} has the value {value}", r.ids[i]));
        }
        let ms = r.timestamps_ms[i];
        let timestamp = if per_ms == 0 {
            ms.div_euclid(1000)
        } else {
            ms.saturating_mul(per_ms)
        };
        // Writing into a String cannot fail.
        let _ = writeln!(out, " value={value:?},id={}i {timestamp}", r.ids[i]);
    }
    Ok(out)
}

/// A tag key or value: commas, equals signs and spaces escaped with a backslash.
fn escape(out: &mut String, text: &str, reading: usize) -> Result<(), String> {
    for c in text.chars() {
        match c {
            ',' | '=' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => return Err(control(text, reading)),
            c => out.push(c),
        }
    }
    Ok(())
}

/// The measurement: commas and spaces escaped.
fn escape_measurement(out: &mut String, text: &str, reading: usize) -> Result<(), String> {
    for c in text.chars() {
        match c {
            ',' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => return Err(control(text, reading)),
            c => out.push(c),
        }
    }
    Ok(())
}

fn control(text: &str, reading: usize) -> String {
    format!(
        "reading {reading} of the batch holds {text:?}: the line protocol cannot carry a control character"
    )
}

/// One column of strings, checked to hold `len` of them.
struct Column<'a>(&'a Strings);

impl<'a> Column<'a> {
    fn new(strings: &'a Strings, len: usize) -> Result<Self, String> {
        if strings.ends.len() != len {
            return Err(format!(
                "a column holds {} strings for {len}",
                strings.ends.len()
            ));
        }
        Ok(Self(strings))
    }

    fn get(&self, i: usize) -> Result<&'a str, String> {
        let start = if i == 0 {
            0
        } else {
            self.0.ends[i - 1] as usize
        };
        self.0
            .text
            .get(start..self.0.ends[i] as usize)
            .ok_or_else(|| format!("string {i} of a column is out of place"))
    }
}
