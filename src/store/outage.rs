//! One log line when DynamoDB calls start failing and one when they succeed
//! again: an outage episode, not a warning per failed request (every failure
//! is still counted in `dynacache_dynamodb_requests_total`).
//!
//! An episode starts at a failed call and ends at the first successful call
//! made after [`QUIET`] without failures, so a flapping endpoint (some calls
//! fail, some succeed) stays one episode instead of a line per flap.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::StoreError;

/// How long calls must go without failing for an episode to end.
pub const QUIET: Duration = Duration::from_secs(5);

/// Process-wide, like the metrics recorder: a process talks to one
/// DynamoDB endpoint, and this keeps the store's error paths free functions.
pub static DYNAMODB: OutageLog = OutageLog::new();

pub struct OutageLog {
    /// Whether an episode is open: lets a success skip the lock.
    failing: AtomicBool,
    episode: Mutex<Option<Episode>>,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    started: Instant,
    last_failure: Instant,
    failures: u64,
}

impl OutageLog {
    pub const fn new() -> OutageLog {
        OutageLog {
            failing: AtomicBool::new(false),
            episode: Mutex::new(None),
        }
    }

    /// A call failed: warns if this starts an episode, with the SDK's
    /// `detail` (the client was told only `error`).
    pub fn failed(&self, error: &StoreError, detail: &str) {
        if self.failed_at(Instant::now()) {
            tracing::warn!(
                %error,
                detail,
                "dynamodb calls are failing: requests that need DynamoDB get SERVER_ERROR until it answers (logged once per outage; failures are counted in dynacache_dynamodb_requests_total)"
            );
        }
    }

    /// A call succeeded: logs if this ends an episode.
    pub fn answered(&self) {
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        if let Some(episode) = self.answered_at(Instant::now()) {
            tracing::info!(
                outage = %humantime::format_duration(round_to_ms(episode.last_failure - episode.started)),
                failed_calls = episode.failures,
                "dynamodb answers again"
            );
        }
    }

    /// Returns whether this failure starts an episode.
    fn failed_at(&self, now: Instant) -> bool {
        let mut episode = self.episode.lock().unwrap_or_else(|e| e.into_inner());
        self.failing.store(true, Ordering::Relaxed);
        match episode.as_mut() {
            Some(open) => {
                open.failures += 1;
                open.last_failure = open.last_failure.max(now);
                false
            }
            None => {
                *episode = Some(Episode {
                    started: now,
                    last_failure: now,
                    failures: 1,
                });
                true
            }
        }
    }

    /// Returns the episode this success ends, if it ends one.
    fn answered_at(&self, now: Instant) -> Option<Episode> {
        let mut episode = self.episode.lock().unwrap_or_else(|e| e.into_inner());
        let open = (*episode)?;
        if now.saturating_duration_since(open.last_failure) < QUIET {
            return None;
        }
        *episode = None;
        self.failing.store(false, Ordering::Relaxed);
        Some(open)
    }
}

fn round_to_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_episode_per_outage() {
        let log = OutageLog::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(log.answered_at(at(0)).is_none(), "healthy: nothing to end");
        assert!(log.failed_at(at(1)), "the first failure starts an episode");
        assert!(
            !log.failed_at(at(2)),
            "later failures are counted, not logged"
        );
        // A success soon after a failure: the endpoint may be flapping.
        assert!(log.answered_at(at(3)).is_none());
        assert!(!log.failed_at(at(4)), "still the same episode");
        let ended = log
            .answered_at(at(4) + QUIET)
            .expect("quiet long enough: ended");
        assert_eq!(ended.failures, 3);
        assert_eq!(ended.last_failure - ended.started, Duration::from_secs(3));
        assert!(log.answered_at(at(20)).is_none(), "ended once");
        assert!(log.failed_at(at(30)), "a new outage is a new episode");
    }
}
