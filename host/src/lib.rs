//! syncd: a store-and-forward sync daemon for meter readings.
//!
//! Readings are queued in a local database ([`queue`]) and delivered in batches to one
//! or more Client Systems by a worker each ([`sync`]); how a batch is encoded and
//! delivered is up to WebAssembly plugins ([`plugin`]) named in `sync.toml`
//! ([`config`]).
#![warn(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod connectivity;
pub mod daemon;
pub mod metrics;
pub mod plugin;
pub mod queue;
pub mod reading;
pub mod supervisor;
pub mod sync;
pub mod watch;

/// The most of a message an error shows: errors quote what they refuse, and what they
/// refuse can be megabytes long.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `text`, cut to [`MAX_MESSAGE_BYTES`] (at a character boundary) with a note of its
/// full length when longer.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE_BYTES {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes in all)", &text[..end], text.len()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn clip_cuts_long_text_at_a_character_boundary() {
        assert_eq!(super::clip("short"), "short");
        let long = "é".repeat(1000);
        let clipped = super::clip(&long);
        assert!(clipped.ends_with("… (2000 bytes in all)"), "{clipped}");
        assert!(clipped.len() < super::MAX_MESSAGE_BYTES + 30);
    }
}
