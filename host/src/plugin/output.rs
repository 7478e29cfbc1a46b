//! What the host accepts from a plugin's answers. A plugin is code the deployer wrote,
//! not code the host trusts: an answer that makes no sense is refused here, the way a
//! trap is, and never reaches the queue, the log or the Client System.

use std::time::Duration;

use super::bindings::types::EncodedBatch;

/// The largest encoded batch the host takes from an encoder, in bytes.
pub const MAX_ENCODED_BYTES: usize = 64 * 1024 * 1024;

/// The longest content type the host takes from an encoder, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;

/// The longest delay a transport's `retry-later` may ask for; a longer one is cut to
/// this, so that a confused plugin or Client System cannot park a batch for ever.
pub const MAX_RETRY_LATER: Duration = Duration::from_secs(60 * 60);

/// Checks an encoder's answer for a batch of `readings` readings: it must say it
/// encoded exactly those, within [`MAX_ENCODED_BYTES`], with a content type that can be
/// sent as an HTTP header value.
pub fn check_encoded(batch: &EncodedBatch, readings: usize) -> Result<(), String> {
    if batch.reading_count as usize != readings {
        return Err(format!(
            "the encoder says it encoded {} readings of a batch of {readings}",
            batch.reading_count
        ));
    }
    if batch.body.len() > MAX_ENCODED_BYTES {
        return Err(format!(
            "the encoded batch is {} bytes, over the limit of {MAX_ENCODED_BYTES}",
            batch.body.len()
        ));
    }
    let content_type = &batch.content_type;
    if content_type.is_empty() || content_type.len() > MAX_CONTENT_TYPE_BYTES {
        return Err(format!(
            "the content type must have 1 to {MAX_CONTENT_TYPE_BYTES} bytes, not {}",
            content_type.len()
        ));
    }
    if let Some(c) = content_type
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' '))
    {
        return Err(format!(
            "the content type {:?} holds {c:?}, which an HTTP header cannot carry",
            content_type.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// The delay a transport's `retry-later` asked for, at most [`MAX_RETRY_LATER`].
pub fn retry_later_delay(delay_ms: Option<u64>) -> Option<Duration> {
    delay_ms.map(|ms| Duration::from_millis(ms).min(MAX_RETRY_LATER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(content_type: &str, body: usize, reading_count: u32) -> EncodedBatch {
        EncodedBatch {
            content_type: content_type.into(),
            body: vec![b'x'; body],
            reading_count,
        }
    }

    #[test]
    fn a_sound_batch_passes() {
        assert_eq!(
            check_encoded(&batch("application/json; schema=2", 10, 3), 3),
            Ok(())
        );
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        let refused = |b: EncodedBatch, n| check_encoded(&b, n).unwrap_err();
        assert!(refused(batch("text/csv", 1, 4), 3).contains("encoded 4 readings of a batch of 3"));
        assert!(refused(batch("", 1, 3), 3).contains("content type must have"));
        assert!(refused(batch("a\r\nX-Injected: 1", 1, 3), 3).contains("cannot carry"));
        assert!(refused(batch("caf\u{e9}", 1, 3), 3).contains("cannot carry"));
        assert!(refused(batch("text/csv", MAX_ENCODED_BYTES + 1, 3), 3).contains("over the limit"));
    }

    #[test]
    fn retry_later_is_capped() {
        assert_eq!(retry_later_delay(None), None);
        assert_eq!(
            retry_later_delay(Some(1500)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_later_delay(Some(u64::MAX)), Some(MAX_RETRY_LATER));
    }
}
