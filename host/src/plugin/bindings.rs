//! Host bindings of the WIT package `sync:plugin@0.1.0`, one module per world. The
//! interfaces both worlds share are generated once (with the transport world) and
//! reused by the encoder world.

#[allow(missing_docs)]
mod gen_transport {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transport",
        // Only `http.send` does I/O. No import is traced by the macro: `settings`
        // returns secrets, which must never reach a log.
        imports: { "sync:plugin/http.send": async },
        exports: { default: async },
    });
}

#[allow(missing_docs)]
mod gen_encoder {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "encoder",
        exports: { default: async },
        with: {
            "sync:plugin/types": super::gen_transport::sync::plugin::types,
            "sync:plugin/log": super::gen_transport::sync::plugin::log,
            "sync:plugin/settings": super::gen_transport::sync::plugin::settings,
        },
    });
}

pub use gen_encoder::{Encoder, EncoderPre};
pub use gen_transport::sync::plugin::{http, log, settings, types};
pub use gen_transport::{RetryInfo, Transport, TransportPre, UploadOutcome};
