//! Time, as the sync engine sees it: wall-clock milliseconds (what the queue stores)
//! and waits measured against them.
//!
//! In service the clock is the system's. Tests use a manual clock that stands still
//! until they move it, so a schedule (backoff, heartbeats, configuration refresh) can
//! be checked step by step instead of by sleeping.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds in a duration, saturated to `i64`.
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The system clock, or a manual one.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// The manual clock's time; `None` for the system clock.
    manual: Option<Arc<watch::Sender<i64>>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that shows `start_ms` until [`Clock::advance`] moves it.
    pub fn manual(start_ms: i64) -> Self {
        Self {
            manual: Some(Arc::new(watch::Sender::new(start_ms))),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            None => now_ms(),
            Some(time) => *time.borrow(),
        }
    }

    /// The time `pause` from now.
    pub fn after(&self, pause: Duration) -> i64 {
        self.now_ms().saturating_add(millis(pause))
    }

    /// Resolves once the clock shows `at_ms` or later.
    pub async fn sleep_until(&self, at_ms: i64) {
        match &self.manual {
            None => {
                let wait = at_ms.saturating_sub(now_ms()).max(0) as u64;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Some(time) => {
                let mut time = time.subscribe();
                // The sender lives as long as this clock, so this cannot fail.
                let _ = time.wait_for(|&now| now >= at_ms).await;
            }
        }
    }

    /// Moves a manual clock forward, waking whatever waits for the new time.
    ///
    /// # Panics
    /// On the system clock, which only time moves.
    pub fn advance(&self, by: Duration) {
        let time = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        time.send_modify(|now| *now = now.saturating_add(millis(by)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_advanced_past_their_time() {
        let clock = Clock::manual(1_000);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(3_000).await }
        });
        clock.advance(Duration::from_millis(1_500));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke at 2500 for 3000");
        clock.advance(Duration::from_millis(500));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woke at 3000")
            .unwrap();
        assert_eq!(clock.now_ms(), 3_000);
    }
}
