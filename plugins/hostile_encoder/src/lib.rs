//! Test fixture for the host's sandbox: an encoder that misbehaves the way its
//! `behaviour` setting says, so that tests can show the host cuts it off and keeps the
//! batch. Not a plugin to deploy.
//!
//! - `spin`: never returns (an endless loop);
//! - `trap`: panics (a trap, with `panic = "abort"`);
//! - `grow`: allocates until the memory limit stops it.

wit_bindgen::generate!({
    world: "encoder",
    path: "../../wit",
});

use sync::plugin::settings;

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "hostile-encoder".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wit_version: "0.1.0".into(),
        }
    }

    fn encode(_info: BatchInfo, readings: Vec<Reading>) -> Result<EncodedBatch, String> {
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
            _ => Err(format!(
                "behaviour not set; refusing {} readings",
                readings.len()
            )),
        }
    }
}

export!(Hostile);
