//! Test fixture for the host's sandbox: an encoder that misbehaves the way its
//! `behaviour` setting says, so that tests can show the host cuts it off and keeps the
//! batch. Not a plugin to deploy.
//!
//! - `spin`: never returns (an endless loop);
//! - `trap`: panics (a trap, with `panic = "abort"`);
//! - `grow`: allocates until the memory limit stops it;
//! - `huge`: returns a body of 80 MiB;
//! - `miscount`: says it encoded a thousand readings more than it was given;
//! - `bad-content-type`: returns a content type that would inject a header;
//! - `invalid-utf8`: refuses the batch with a reason that is not UTF-8;
//! - `claim-0.1.0`: `describe` names WIT 0.1.0, though it implements 0.2.0.

wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit/v0.2.0",
});

use sync::plugin::settings;

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "hostile-encoder".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            // Built against 0.2.0; `claim-0.1.0` makes it say otherwise.
            wit_version: match settings::get("behaviour").as_deref() {
                Some("claim-0.1.0") => "0.1.0".into(),
                _ => "0.2.0".into(),
            },
        }
    }

    fn encode(_info: BatchInfo, readings: Readings) -> Result<EncodedBatch, String> {
        match settings::get("behaviour").as_deref() {
            Some("spin") => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Some("trap") => panic!("the hostile encoder panics, as asked"),
            Some("grow") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("huge") => Ok(EncodedBatch {
                content_type: "application/octet-stream".into(),
                body: vec![b'x'; 80 << 20],
                reading_count: readings.ids.len() as u32,
            }),
            Some("miscount") => Ok(EncodedBatch {
                content_type: "application/json".into(),
                body: b"[]".to_vec(),
                reading_count: readings.ids.len() as u32 + 1000,
            }),
            Some("bad-content-type") => Ok(EncodedBatch {
                content_type: "application/json\r\nX-Injected: yes".into(),
                body: b"[]".to_vec(),
                reading_count: readings.ids.len() as u32,
            }),
            Some("invalid-utf8") => {
                let bytes = vec![b'b', b'a', b'd', 0xff, 0xfe];
                // SAFETY: deliberately not UTF-8: the host must refuse to lift it.
                Err(unsafe { String::from_utf8_unchecked(bytes) })
            }
            _ => Err(format!(
                "behaviour not set; refusing {} readings",
                readings.ids.len()
            )),
        }
    }
}

export!(Hostile);
