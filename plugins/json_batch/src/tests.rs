//! The document's pieces against what they must equal, natively (`cargo test`).

use crate::document::{Cursor, NUMBER_ROOM, Scan, VALUE_ROOM, Writer, string_room};

/// What `piece` writes, given `room` bytes.
fn written(room: usize, piece: impl FnOnce(&mut Cursor<'_>)) -> String {
    let mut out = Writer::with_capacity(0);
    // SAFETY: each test gives the room its piece is written for; this debug build
    // checks every write against it.
    unsafe { out.write(room, piece) };
    String::from_utf8(out.into_bytes()).unwrap()
}

#[test]
fn values_are_written_as_display_writes_them() {
    let mut values = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        0.125,
        0.001,
        0.01,
        0.1,
        0.2,
        0.3,
        1.005,
        12345.5,
        -2.5,
        100.0,
        1e-7,
        1e21,
        0.1 + 0.2,
        4.4e12,
        4.3e12 + 0.125,
        f64::MAX,
        f64::MIN_POSITIVE,
        // The longest texts: VALUE_ROOM must hold them.
        -f64::MAX,
        -5e-324,
        -2.2250738585072014e-308,
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let thousandths = (x % 2_000_000_000) as f64 - 1e9;
        values.push(thousandths / 1000.0);
        values.push(thousandths / 100.0);
        values.push(f64::from_bits(x >> 2));
    }
    for v in values {
        assert_eq!(written(VALUE_ROOM, |c| c.f64(v)), format!("{v}"), "{v:?}");
    }
}

#[test]
fn integers_and_escapes() {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut integers = vec![0, 7, 10, 99, 100, 1000, 99_999_999, 100_000_000];
    integers.extend([u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX]);
    integers.extend([9_999_999_999_999_999, 10_000_000_000_000_000]);
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        integers.push(x >> (x % 64));
    }
    for v in integers {
        assert_eq!(written(NUMBER_ROOM, |c| c.u64(v)), v.to_string());
        let negative = (v as i64).wrapping_neg();
        assert_eq!(
            written(NUMBER_ROOM, |c| c.i64(negative)),
            negative.to_string()
        );
    }
    assert_eq!(
        written(NUMBER_ROOM, |c| c.i64(i64::MIN)),
        i64::MIN.to_string()
    );
    for text in &texts() {
        let got = written(string_room(text.len()), |c| c.string(text.as_bytes()));
        assert_eq!(got, quoted(text), "{text:?}");
    }
}

/// Strings of every length up to 20, with one byte needing escape at each place, and
/// none; and a few more.
fn texts() -> Vec<String> {
    let mut texts = vec![
        "",
        "plain",
        "eight ch",
        "a longer text, no escapes",
        "q\"uote",
        "back\\slash\there",
        "ctl\u{1}x",
        "Zürich \"Nord\"\n",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    for len in 0..20 {
        let plain: String = (0..len).map(|i| (b'a' + i as u8) as char).collect();
        texts.push(plain.clone());
        for at in 0..len {
            for special in ['"', '\\', '\n', '\u{1f}', '\u{0}'] {
                let mut text: Vec<char> = plain.chars().collect();
                text[at] = special;
                texts.push(text.into_iter().collect());
            }
        }
    }
    texts
}

/// `text` as a JSON string literal, escaped character by character.
fn quoted(text: &str) -> String {
    let mut e = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => e.push_str("\\\""),
            '\\' => e.push_str("\\\\"),
            '\n' => e.push_str("\\n"),
            '\r' => e.push_str("\\r"),
            '\t' => e.push_str("\\t"),
            c if (c as u32) < 0x20 => e.push_str(&format!("\\u{:04x}", c as u32)),
            c => e.push(c),
        }
    }
    e.push('"');
    e
}

/// Each string of [`texts`] in each string column of a document, where a column's
/// strings are read in words past their ends (and the last ones are not).
#[test]
fn strings_in_a_document_are_written_as_alone() {
    strings_written_as_alone(&texts());
}

/// The same with no string needing escape: the document is then written without
/// looking for any.
#[test]
fn strings_without_escapes_in_a_document_are_written_as_alone() {
    let texts = texts()
        .into_iter()
        .filter(|t| quoted(t) == format!("\"{t}\""))
        .collect::<Vec<_>>();
    assert!(texts.len() > 20);
    strings_written_as_alone(&texts);
}

/// Texts longer than a turn of [`Scan`], with a character needing escape, or one not
/// ASCII, at each place, and without.
#[test]
fn a_scan_finds_every_character_to_escape_and_every_one_not_ascii() {
    let mut checked = 0;
    for len in 0..70 {
        let plain: Vec<char> = (0..len).map(|i| (b' ' + (i % 95) as u8) as char).collect();
        // The printable ASCII characters with `"` and `\` taken out.
        let plain: Vec<char> = plain
            .into_iter()
            .map(|c| if c == '"' || c == '\\' { 'x' } else { c })
            .collect();
        let text: String = plain.iter().collect();
        assert_eq!(
            Scan::of(text.as_bytes()),
            Scan {
                ascii: true,
                plain: true
            },
            "{text:?}"
        );
        for at in 0..len {
            for special in ['"', '\\', '\n', '\u{1f}', '\u{0}', 'é', '\u{7f}', '\u{80}'] {
                let mut text = plain.clone();
                text[at] = special;
                let text: String = text.into_iter().collect();
                let expected = Scan {
                    ascii: text.is_ascii(),
                    plain: quoted(&text) == format!("\"{text}\""),
                };
                assert_eq!(Scan::of(text.as_bytes()), expected, "{text:?}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8 * (0..70).sum::<usize>());
}

fn strings_written_as_alone(texts: &[String]) {
    let n = texts.len();
    let nth = |i: usize, shift: usize| texts[(i + shift) % n].as_str();
    let column = |shift: usize| strings(&(0..n).map(|i| nth(i, shift)).collect::<Vec<_>>());
    let readings = crate::Readings {
        ids: (0..n as u64).collect(),
        meter_ids: column(0),
        channels: column(1),
        timestamps_ms: vec![7; n],
        values: vec![0.5; n],
        units: column(2),
        qualities: column(3),
        // One attribute for even readings, none for odd ones.
        attribute_ends: (0..n as u32).map(|i| i / 2 + 1).collect(),
        attribute_keys: strings(&(0..n).step_by(2).map(|i| nth(i, 4)).collect::<Vec<_>>()),
        attribute_values: strings(&(0..n).step_by(2).map(|i| nth(i, 5)).collect::<Vec<_>>()),
    };
    let mut expected = String::from(r#"{"batch_id":"b","site_id":"s","readings":["#);
    for i in 0..n {
        if i > 0 {
            expected.push(',');
        }
        let attributes = if i % 2 == 0 {
            format!("{}:{}", quoted(nth(i, 4)), quoted(nth(i, 5)))
        } else {
            String::new()
        };
        expected.push_str(&format!(
            r#"{{"id":{i},"meter_id":{},"channel":{},"timestamp":7,"value":0.5,"unit":{},"quality":{},"attributes":{{{attributes}}}}}"#,
            quoted(nth(i, 0)),
            quoted(nth(i, 1)),
            quoted(nth(i, 2)),
            quoted(nth(i, 3)),
        ));
    }
    expected.push_str("]}");
    let body = crate::encode_document("b", "s", &readings).unwrap();
    assert_eq!(String::from_utf8(body).unwrap(), expected);
}

fn strings(items: &[&str]) -> crate::Strings {
    let mut ends = Vec::new();
    let mut text = String::new();
    for item in items {
        text.push_str(item);
        ends.push(text.len() as u32);
    }
    crate::Strings { text, ends }
}

fn two_readings() -> crate::Readings {
    crate::Readings {
        ids: vec![1, 2],
        meter_ids: strings(&["elec-1", "Zürich \"Nord\""]),
        channels: strings(&["", "import-kwh"]),
        timestamps_ms: vec![1_700_000_000_000, -5],
        values: vec![12.5, 1e-7],
        units: strings(&["kWh", ""]),
        qualities: strings(&["good", "estimated"]),
        attribute_ends: vec![0, 2],
        attribute_keys: strings(&["phase", "k"]),
        attribute_values: strings(&["L1", "v\n"]),
    }
}

#[test]
fn a_whole_document() {
    let body = crate::encode_document("b-1", "site", &two_readings()).unwrap();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        concat!(
            r#"{"batch_id":"b-1","site_id":"site","readings":["#,
            r#"{"id":1,"meter_id":"elec-1","channel":"","timestamp":1700000000000,"value":12.5,"#,
            r#""unit":"kWh","quality":"good","attributes":{}},"#,
            r#"{"id":2,"meter_id":"Zürich \"Nord\"","channel":"import-kwh","timestamp":-5,"#,
            r#""value":0.0000001,"unit":"","quality":"estimated","attributes":{"phase":"L1","k":"v\n"}}]}"#
        )
    );
}

/// Readings at their longest: every number at its most digits and every byte of
/// every string (the batch's ids too) escaped as `\u00XX`, the second reading with an
/// attribute after another. The writes inside a room are checked against it in this
/// debug build only, so a room reckoned short fails here.
#[test]
fn readings_at_their_longest_fit_their_room() {
    let control = "\u{1}".repeat(9);
    let column = |s: &str, n: usize| strings(&vec![s; n]);
    let one = |s: &str| column(s, 2);
    let readings = crate::Readings {
        ids: vec![u64::MAX, u64::MAX],
        meter_ids: one(&control),
        channels: one(&control),
        timestamps_ms: vec![i64::MIN, i64::MIN],
        // The longest texts `Display` writes for an f64.
        values: vec![-5e-324, -f64::MAX],
        units: one(&control),
        qualities: one(&control),
        attribute_ends: vec![1, 3],
        attribute_keys: column(&control, 3),
        attribute_values: column(&control, 3),
    };
    let body = crate::encode_document(&control, &control, &readings).unwrap();
    let s = quoted(&control);
    let reading = |value: f64, attributes: &str| {
        format!(
            r#"{{"id":{},"meter_id":{s},"channel":{s},"timestamp":{},"value":{value},"unit":{s},"quality":{s},"attributes":{{{attributes}}}}}"#,
            u64::MAX,
            i64::MIN,
        )
    };
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!(
            r#"{{"batch_id":{s},"site_id":{s},"readings":[{},{}]}}"#,
            reading(-5e-324, &format!("{s}:{s}")),
            reading(-f64::MAX, &format!("{s}:{s},{s}:{s}"))
        )
    );
}

/// An attribute after another with an empty key and value: once written past the
/// room made for it (a trap in the component).
#[test]
fn an_empty_attribute_after_another() {
    let mut r = two_readings();
    r.attribute_keys = strings(&["phase", ""]);
    r.attribute_values = strings(&["L1", ""]);
    let body = String::from_utf8(crate::encode_document("b", "s", &r).unwrap()).unwrap();
    assert!(
        body.ends_with(r#""attributes":{"phase":"L1","":""}}]}"#),
        "{body}"
    );
}

#[test]
fn columns_that_do_not_hold_together_are_refused() {
    let mut r = two_readings();
    r.meter_ids.ends[0] = 8; // inside the "ü" of the next string
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "string 0 of column meter-ids is out of place");

    let mut r = two_readings();
    r.units.ends[1] = 100;
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "string 1 of column units is out of place");

    let mut r = two_readings();
    r.channels.ends = vec![5, 3];
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "string 1 of column channels is out of place");

    let mut r = two_readings();
    r.values.pop();
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert!(
        err.starts_with("the batch's columns differ in length"),
        "{err}"
    );

    let mut r = two_readings();
    r.attribute_keys = strings(&["a"]);
    r.attribute_values = strings(&["b"]);
    r.attribute_ends = vec![1, 0];
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert!(
        err.starts_with("column attribute-keys holds 1 strings for 0"),
        "{err}"
    );

    let mut r = two_readings();
    r.ids.push(3);
    r.meter_ids = strings(&["m", "m", "m"]);
    r.channels = strings(&["", "", ""]);
    r.timestamps_ms.push(0);
    r.values.push(0.0);
    r.units = strings(&["", "", ""]);
    r.qualities = strings(&["", "", ""]);
    r.attribute_ends = vec![2, 1, 2];
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "attribute ends decrease at reading 1");

    // An end past the last reading's: reading 0's attributes would lie beyond the
    // attribute columns.
    let mut r = two_readings();
    r.attribute_ends = vec![5, 2];
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "attribute ends decrease after reading 0");

    // Out of place in a text of ASCII only (checked without looking at characters).
    let mut r = two_readings();
    r.units.ends = vec![3, 2];
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "string 1 of column units is out of place");

    // Inside a character of a long text (past the 32 bytes checked a word at a time).
    let mut r = two_readings();
    let long = "x".repeat(40);
    r.meter_ids = strings(&[&long, &format!("{long}ü")]);
    r.meter_ids.ends[1] -= 1;
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "string 1 of column meter-ids is out of place");
    r.meter_ids.ends[1] += 1;
    assert!(crate::encode_document("b", "s", &r).is_ok());

    let mut r = two_readings();
    r.qualities.ends.pop();
    let err = crate::encode_document("b", "s", &r).unwrap_err();
    assert_eq!(err, "column qualities holds 1 strings for 2 entries");
}

#[test]
fn the_split_by_a_hundred_million_is_exact() {
    let mut values = vec![0, 1, u64::MAX, u64::MAX - 1, u64::from(u32::MAX)];
    for k in [1u64, 2, 3, 99, 12_345, 184_467_440_737] {
        let m = k * 100_000_000;
        values.extend([m - 1, m, m + 1]);
    }
    let mut x: u64 = 0x853C_49E6_748F_EA9B;
    for _ in 0..1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values.push(x >> (x % 64));
    }
    for v in values {
        assert_eq!(crate::document::div_1e8(v), v / 100_000_000, "{v}");
    }
}

#[test]
fn every_fraction_is_written_without_trailing_zeros() {
    for thousandths in 1..1000u32 {
        let v = 7.0 + f64::from(thousandths) / 1000.0;
        assert_eq!(written(VALUE_ROOM, |c| c.f64(v)), format!("{v}"));
    }
}
