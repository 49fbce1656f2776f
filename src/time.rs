//! Deadline arithmetic that cannot overflow.
//!
//! `Instant + Duration` panics on overflow, and `Duration::MAX` is the usual way to say
//! "no limit". Every deadline in the crate is computed here: one that would overflow is
//! pushed so far out (about 136 years) that it never comes, which is what "no limit"
//! means. Crossbeam's `after` / `recv_timeout` and parking_lot's `wait_for` already treat
//! an overflowing timeout as "forever", so only our own `+` needs this.

use std::time::{Duration, Instant};

/// Further than any real wait: about 136 years.
const FAR: Duration = Duration::from_secs(u32::MAX as u64);

/// `now + d`, saturating to a deadline that never comes.
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        // An `Instant` this close to its own end does not exist on any supported
        // platform; still, never panic.
        .unwrap_or(now)
}

/// A deadline `d` from now.
pub(crate) fn deadline_in(d: Duration) -> Instant {
    deadline(Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) >= now + Duration::from_secs(100 * 365 * 86_400));
        assert_eq!(deadline(now, Duration::ZERO), now);
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
