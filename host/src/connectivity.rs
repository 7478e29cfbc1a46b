//! Whether a Client System can be reached: a state machine fed with evidence.
//!
//! Every request a transport makes is evidence: one that gets any answer shows the
//! Client System reachable, one that gets none (connection refused, timeout) counts
//! against it, and so does a failed probe. The state changes only on evidence: to
//! online at the first success, to offline after [`OFFLINE_THRESHOLD`] failures in a
//! row. Each change is an [`Event`]. The monitor keeps no clock of its own: every call
//! says what time it is, so tests drive it with any clock they like.

use std::time::Duration;

use serde::Serialize;

/// Failures in a row that take a Client System offline. One failed request is not an
/// outage: a single timeout on a busy link must not stop deliveries.
pub const OFFLINE_THRESHOLD: u32 = 3;

/// What is known of the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No evidence yet (just started), or failures fewer than the threshold since.
    #[default]
    Unknown,
    /// The last evidence was a success.
    Online,
    /// [`OFFLINE_THRESHOLD`] failures or more in a row.
    Offline,
}

/// A change of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Reachable again (or for the first time).
    Connected {
        /// The Client System.
        client_system: String,
        /// When, ms since the Unix epoch.
        at_ms: i64,
        /// How long it was offline, if it was.
        after_outage_ms: Option<i64>,
    },
    /// Gone offline.
    Disconnected {
        /// The Client System.
        client_system: String,
        /// When, ms since the Unix epoch.
        at_ms: i64,
        /// The last failure.
        reason: String,
    },
}

/// What the monitor says of the link, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Connectivity {
    /// The state.
    pub state: State,
    /// Since when, ms since the Unix epoch.
    pub since_ms: i64,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// The last failure.
    pub last_failure: Option<String>,
    /// When evidence last came in (a request or a probe).
    pub last_check_ms: Option<i64>,
    /// Time spent online.
    pub uptime_ms: i64,
    /// Time spent offline.
    pub downtime_ms: i64,
    /// Times it went offline.
    pub outages: u32,
}

/// The monitor of one Client System.
#[derive(Debug, Clone)]
pub struct Monitor {
    client_system: String,
    status: Connectivity,
}

impl Monitor {
    /// A monitor that knows nothing yet, started at `now_ms`.
    pub fn new(client_system: &str, now_ms: i64) -> Self {
        Self {
            client_system: client_system.to_owned(),
            status: Connectivity {
                since_ms: now_ms,
                ..Connectivity::default()
            },
        }
    }

    /// The state.
    pub fn state(&self) -> State {
        self.status.state
    }

    /// Failures in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.status.consecutive_failures
    }

    /// When a probe is next due: `every` after the last evidence.
    pub fn next_probe_ms(&self, every: Duration) -> i64 {
        let last = self.status.last_check_ms.unwrap_or(self.status.since_ms);
        last.saturating_add(crate::clock::millis(every))
    }

    /// The Client System answered.
    pub fn success(&mut self, now_ms: i64) -> Option<Event> {
        self.status.last_check_ms = Some(now_ms);
        self.status.consecutive_failures = 0;
        if self.status.state == State::Online {
            return None;
        }
        let after_outage_ms =
            (self.status.state == State::Offline).then(|| now_ms - self.status.since_ms);
        self.change(State::Online, now_ms);
        Some(Event::Connected {
            client_system: self.client_system.clone(),
            at_ms: now_ms,
            after_outage_ms,
        })
    }

    /// A request got no answer, or a probe failed.
    pub fn failure(&mut self, now_ms: i64, reason: &str) -> Option<Event> {
        self.status.last_check_ms = Some(now_ms);
        self.status.consecutive_failures = self.status.consecutive_failures.saturating_add(1);
        self.status.last_failure = Some(reason.to_owned());
        if self.status.state == State::Offline
            || self.status.consecutive_failures < OFFLINE_THRESHOLD
        {
            return None;
        }
        Some(self.go_offline(now_ms, reason))
    }

    fn go_offline(&mut self, now_ms: i64, reason: &str) -> Event {
        self.change(State::Offline, now_ms);
        self.status.outages += 1;
        Event::Disconnected {
            client_system: self.client_system.clone(),
            at_ms: now_ms,
            reason: reason.to_owned(),
        }
    }

    /// Another process sharing the queue found the Client System offline, and this one
    /// has heard nothing from it since: offline here too, until a probe or a request
    /// gets an answer.
    pub fn adopt_offline(&mut self, now_ms: i64, reason: &str) -> Option<Event> {
        if self.status.state == State::Offline {
            return None;
        }
        self.status.consecutive_failures = self.status.consecutive_failures.max(OFFLINE_THRESHOLD);
        self.status.last_failure = Some(reason.to_owned());
        Some(self.go_offline(now_ms, reason))
    }

    /// When the Client System last answered, if the last evidence was an answer.
    pub fn last_answer_ms(&self) -> Option<i64> {
        (self.status.consecutive_failures == 0)
            .then_some(self.status.last_check_ms)
            .flatten()
    }

    /// What the monitor says, up to the last change of state (see
    /// [`Connectivity::as_of`] for the time since).
    pub fn status(&self) -> &Connectivity {
        &self.status
    }

    /// What the monitor says at `now_ms`.
    pub fn snapshot(&self, now_ms: i64) -> Connectivity {
        self.status.as_of(now_ms)
    }

    fn change(&mut self, to: State, now_ms: i64) {
        self.status = self.status.as_of(now_ms);
        self.status.state = to;
        self.status.since_ms = now_ms;
    }
}

impl Connectivity {
    /// This at `now_ms`: the time spent in the current state since `since_ms` counted
    /// into uptime or downtime.
    pub fn as_of(&self, now_ms: i64) -> Connectivity {
        let mut status = self.clone();
        let current = (now_ms - status.since_ms).max(0);
        match status.state {
            State::Online => status.uptime_ms += current,
            State::Offline => status.downtime_ms += current,
            State::Unknown => {}
        }
        status
    }
}

impl State {
    /// The state's name, as in status and metrics.
    pub fn label(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Online => "online",
            State::Offline => "offline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn goes_offline_only_after_the_threshold_and_says_so_once() {
        let clock = Clock::manual(1_000_000);
        let mut m = Monitor::new("cs", clock.now_ms());
        assert_eq!(m.state(), State::Unknown);
        assert!(matches!(
            m.success(clock.now_ms()),
            Some(Event::Connected {
                after_outage_ms: None,
                ..
            })
        ));
        assert_eq!(m.success(clock.now_ms()), None, "no event without a change");
        for _ in 1..OFFLINE_THRESHOLD {
            clock.advance(S);
            assert_eq!(m.failure(clock.now_ms(), "refused"), None);
            assert_eq!(m.state(), State::Online, "changed before the threshold");
        }
        clock.advance(S);
        let event = m.failure(clock.now_ms(), "connection refused");
        assert_eq!(
            event,
            Some(Event::Disconnected {
                client_system: "cs".into(),
                at_ms: clock.now_ms(),
                reason: "connection refused".into(),
            })
        );
        clock.advance(S);
        assert_eq!(m.failure(clock.now_ms(), "refused"), None, "said once");
        assert_eq!(m.snapshot(clock.now_ms()).consecutive_failures, 4);
    }

    #[test]
    fn a_success_resets_the_failures() {
        let mut m = Monitor::new("cs", 0);
        m.success(0);
        for t in 1..OFFLINE_THRESHOLD as i64 {
            m.failure(t, "timeout");
        }
        m.success(10);
        for t in 11..10 + OFFLINE_THRESHOLD as i64 {
            m.failure(t, "timeout");
        }
        assert_eq!(m.state(), State::Online, "failures were not in a row");
    }

    #[test]
    fn counts_uptime_downtime_and_outages() {
        let clock = Clock::manual(0);
        let mut m = Monitor::new("cs", 0);
        clock.advance(5 * S);
        m.success(clock.now_ms()); // online at 5 s; the unknown start counts as neither
        clock.advance(60 * S);
        for _ in 0..OFFLINE_THRESHOLD {
            m.failure(clock.now_ms(), "down"); // offline at 65 s
        }
        clock.advance(30 * S);
        let during = m.snapshot(clock.now_ms());
        assert_eq!(during.state, State::Offline);
        assert_eq!((during.uptime_ms, during.downtime_ms), (60_000, 30_000));
        assert_eq!(during.since_ms, 65_000);
        let event = m.success(clock.now_ms()); // back at 95 s
        assert!(matches!(
            event,
            Some(Event::Connected {
                after_outage_ms: Some(30_000),
                ..
            })
        ));
        clock.advance(10 * S);
        for _ in 0..OFFLINE_THRESHOLD {
            m.failure(clock.now_ms(), "down again");
        }
        let after = m.snapshot(clock.now_ms());
        assert_eq!((after.uptime_ms, after.downtime_ms), (70_000, 30_000));
        assert_eq!(after.outages, 2);
        assert_eq!(after.last_failure.as_deref(), Some("down again"));
    }

    #[test]
    fn probes_fall_due_after_the_last_evidence() {
        let mut m = Monitor::new("cs", 1_000);
        assert_eq!(m.next_probe_ms(60 * S), 61_000);
        m.success(30_000); // a delivery counts as a check
        assert_eq!(m.next_probe_ms(60 * S), 90_000);
        assert_eq!(m.status().last_check_ms, Some(30_000));
    }
}
