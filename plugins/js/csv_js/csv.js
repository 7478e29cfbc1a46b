// syncd encoder plugin written in JavaScript, built into a component with
// componentize-js (`npm run build`): a batch as CSV (RFC 4180), one row a reading.
//
//   id,meter_id,channel,timestamp,value,unit,quality,attributes
//   1,elec-1,import-kwh,2026-11-30T01:00:00.000Z,12.5,kWh,good,"{""phase"":""L1""}"
//
// Settings (`[client_system.plugin]` in sync.toml):
//   timestamp = "rfc3339" (the default) or "ms" (milliseconds since the Unix epoch)
//   header    = true (the default) or false: the first row names the columns
//
// It is written against `sync:plugin@0.2.0`, whose readings arrive column by column:
// see docs/plugins.md.

import { get } from 'sync:plugin/settings@0.2.0';
import { write } from 'sync:plugin/log@0.2.0';

const HEADER = 'id,meter_id,channel,timestamp,value,unit,quality,attributes';
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

// The strings of a `strings` column. `ends` are byte offsets into the UTF-8 text, and
// a JavaScript string counts UTF-16 units, so non-ASCII text is cut as bytes.
function column(strings) {
  const bytes = utf8.encode(strings.text);
  const ascii = bytes.length === strings.text.length;
  const out = new Array(strings.ends.length);
  let start = 0;
  for (let i = 0; i < strings.ends.length; i++) {
    const end = strings.ends[i];
    if (end < start || end > bytes.length) {
      throw `string ${i} of a column ends out of place`;
    }
    out[i] = ascii ? strings.text.slice(start, end) : fromUtf8.decode(bytes.subarray(start, end));
    start = end;
  }
  return out;
}

// A CSV field: quoted when it holds a quote, the delimiter or a line break.
function field(s) {
  return /[",\r\n]/.test(s) ? '"' + s.replaceAll('"', '""') + '"' : s;
}

// A setting's value, or `fallback` with a warning when it is not one of `allowed`:
// a wrong setting must not turn every batch into a dead letter.
function setting(key, allowed, fallback) {
  const value = get(key);
  if (value === undefined || value === null) return fallback;
  if (allowed.includes(value)) return value;
  write('warn', `setting ${key} = ${value} is not one of ${allowed.join(', ')}; using ${fallback}`);
  return fallback;
}

export function describe() {
  return { name: 'csv-js', version: '0.1.0', witVersion: '0.2.0' };
}

// An error thrown here is the plugin refusing the batch: it goes to dead letters.
export function encode(info, r) {
  const n = r.ids.length;
  if (r.timestampsMs.length !== n || r.values.length !== n || r.attributeEnds.length !== n) {
    throw 'the batch columns differ in length';
  }
  const meters = column(r.meterIds);
  const channels = column(r.channels);
  const units = column(r.units);
  const qualities = column(r.qualities);
  const keys = column(r.attributeKeys);
  const values = column(r.attributeValues);
  const rfc3339 = setting('timestamp', ['rfc3339', 'ms'], 'rfc3339') === 'rfc3339';
  const rows = setting('header', ['true', 'false'], 'true') === 'true' ? [HEADER] : [];
  let pair = 0;
  for (let i = 0; i < n; i++) {
    const attributes = {};
    for (; pair < r.attributeEnds[i]; pair++) attributes[keys[pair]] = values[pair];
    const ms = r.timestampsMs[i];
    rows.push([
      String(r.ids[i]),
      field(meters[i]),
      field(channels[i]),
      rfc3339 ? new Date(Number(ms)).toISOString() : String(ms),
      String(r.values[i]),
      field(units[i]),
      field(qualities[i]),
      field(JSON.stringify(attributes)),
    ].join(','));
  }
  // console.log and console.error reach syncd's log too (at debug level, and as warnings).
  console.log(`batch ${info.batchId}: ${n} readings as CSV`);
  return {
    contentType: 'text/csv; charset=utf-8; header=' + (rows[0] === HEADER ? 'present' : 'absent'),
    body: utf8.encode(rows.join('\r\n') + '\r\n'),
    readingCount: n,
  };
}
