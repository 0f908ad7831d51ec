//! Time: memcached's exptime rules, the wall clock, and item versions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Exptimes up to this many seconds are relative; larger ones are Unix times.
const RELATIVE_EXPTIME_MAX: i64 = 60 * 60 * 24 * 30;

/// memcached's exptime (already cut to 32 bits, as memcached stores it: see
/// `protocol::token::exptime_token`) as an absolute expiry in Unix seconds:
/// 0 = never; up to 30 days relative to `now`; above that a Unix time;
/// negative or past = already expired (`now`, which TTL will sweep: TTL
/// ignores times more than five years old, so an item is never written with
/// 1970 as its expiry).
pub fn expiry(exptime: i32, now: u32) -> u32 {
    let now64 = i64::from(now);
    let at = match i64::from(exptime) {
        0 => return 0,
        e if e < 0 => now64,
        e if e <= RELATIVE_EXPTIME_MAX => now64 + e,
        e => e.max(now64),
    };
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// The wall clock in microseconds since the epoch.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The wall clock in whole Unix seconds, as memcached keeps it.
pub fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Bits below a version's microseconds (a per-process tag).
pub const VERSION_TAG_BITS: u32 = 10;

/// The version a write made at `micros` would have at least: versions date
/// their writes, which `flush_all` relies on.
pub fn version_at(micros: u64) -> u64 {
    micros << VERSION_TAG_BITS
}

/// Item versions (cas uniques): microseconds since the epoch shifted left by
/// 10 bits, with a random per-process tag in those bits, strictly increasing
/// within the process. Unique across processes unless two pick the same tag
/// in the same microsecond; roughly ordered by time across hosts.
pub struct VersionClock {
    last: AtomicU64,
    tag: u64,
}

impl VersionClock {
    pub fn new() -> VersionClock {
        use std::hash::BuildHasher;
        let tag =
            std::collections::hash_map::RandomState::new().hash_one(std::process::id()) & 0x3ff;
        VersionClock {
            last: AtomicU64::new(0),
            tag,
        }
    }

    /// A new version, above every one this clock gave before.
    pub fn next(&self) -> u64 {
        self.next_after(0)
    }

    /// A new version, also above `floor` (the version being replaced, or a
    /// flush time): a host whose clock lags still moves versions forward.
    pub fn next_after(&self, floor: u64) -> u64 {
        let candidate =
            (version_at(unix_micros()) | self.tag).max(floor.saturating_add(1 << VERSION_TAG_BITS));
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = candidate.max(last + (1 << VERSION_TAG_BITS));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

impl Default for VersionClock {
    fn default() -> Self {
        VersionClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1_800_000_000;

    #[test]
    fn exptime_rules() {
        assert_eq!(expiry(0, NOW), 0);
        assert_eq!(expiry(-1, NOW), NOW);
        assert_eq!(expiry(1, NOW), NOW + 1);
        assert_eq!(expiry(2_592_000, NOW), NOW + 2_592_000);
        // Past 30 days it is a Unix time; one in the past is already expired.
        assert_eq!(expiry(2_592_001, NOW), NOW);
        assert_eq!(expiry(NOW as i32 + 50, NOW), NOW + 50);
        assert_eq!(expiry(i32::MAX, NOW), i32::MAX as u32);
        assert_eq!(expiry(i32::MIN, NOW), NOW);
    }

    #[test]
    fn versions_increase_date_their_writes_and_pass_a_floor() {
        let clock = VersionClock::new();
        let before = version_at(unix_micros());
        let mut last = 0;
        for _ in 0..10_000 {
            let v = clock.next();
            assert!(v > last && v >= before);
            last = v;
        }
        let far = version_at(unix_micros() + 60_000_000);
        assert!(
            clock.next_after(far) > far,
            "a lagging clock still moves forward"
        );
        assert!(clock.next() > far);
    }
}
