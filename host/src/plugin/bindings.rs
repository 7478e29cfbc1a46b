//! Host bindings of the WIT packages: `sync:plugin@0.1.0`, one module per world (the
//! interfaces both worlds share are generated once, with the transport world, and
//! reused by the encoder world), and `sync:plugin@0.2.0`, whose encoder receives its
//! batch in columns ([`v2`]).

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

#[allow(missing_docs)]
mod gen_encoder_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "encoder",
        exports: { default: async },
    });
}

/// The encoder world of `sync:plugin@0.2.0`.
pub mod v2 {
    pub use super::gen_encoder_v2::sync::plugin::{log, settings, types};
    pub use super::gen_encoder_v2::{Encoder, EncoderPre};
}
