//! The document's pieces against what they must equal, natively (`cargo test`).

use crate::document::{push_f64, push_i64, push_str, push_u64};

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
        let mut out = String::new();
        push_f64(&mut out, v);
        assert_eq!(out, format!("{v}"), "{v:?}");
    }
}

#[test]
fn integers_and_escapes() {
    for v in [0, 7, 10, 99, 1000, u64::MAX] {
        let mut out = String::new();
        push_u64(&mut out, v);
        assert_eq!(out, v.to_string());
    }
    let mut out = String::new();
    push_i64(&mut out, i64::MIN);
    assert_eq!(out, i64::MIN.to_string());
    for text in [
        "",
        "plain",
        "eight ch",
        "a longer text, no escapes",
        "q\"uote",
        "back\\slash\there",
        "ctl\u{1}x",
        "Zürich \"Nord\"\n",
    ] {
        let mut out = String::new();
        push_str(&mut out, text);
        let expected: String = {
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
        };
        assert_eq!(out, expected, "{text:?}");
    }
}
