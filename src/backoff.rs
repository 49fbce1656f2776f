//! Reconnect policies: when to try again, and when to give up.

use std::fmt;
use std::time::Duration;

use crate::{DisconnectReason, Error};

/// What a policy is told about a failure.
#[derive(Debug)]
pub struct Failure<'a> {
    /// Failures in a row since the last stable connection (1 = first).
    pub attempt: u32,
    /// The connect error, when an attempt failed.
    pub error: Option<&'a Error>,
    /// Why an open connection ended, when one did.
    pub reason: Option<&'a DisconnectReason>,
    /// Time since the first failure of this series.
    pub elapsed: Duration,
}

/// Decides the delay before the next connection attempt.
///
/// ```
/// use std::time::Duration;
/// use wsbeat::{Failure, ReconnectPolicy};
///
/// /// Retry every second, forever, whatever happened.
/// struct Fixed;
/// impl ReconnectPolicy for Fixed {
///     fn next_delay(&mut self, _f: &Failure<'_>) -> Option<Duration> {
///         Some(Duration::from_secs(1))
///     }
/// }
/// let builder = wsbeat::Client::builder("ws://127.0.0.1:9/").reconnect_policy(Fixed);
/// # let _ = builder;
/// # Ok::<(), wsbeat::Error>(())
/// ```
pub trait ReconnectPolicy: Send + 'static {
    /// `Some(delay)` to try again after `delay`, `None` to give up.
    fn next_delay(&mut self, failure: &Failure<'_>) -> Option<Duration>;

    /// How long a connection must stay open before the failure count resets
    /// (so a server that accepts and then kicks cannot cause a reconnect storm).
    fn min_uptime(&self) -> Duration {
        Duration::from_secs(5)
    }
}

/// Exponential backoff with full jitter, the default policy.
///
/// Delay for attempt `n` is uniform in `[0, min(max, initial * factor^(n-1))]`, but at
/// least what the server asked for:
/// - `Retry-After` on an HTTP rejection (429/503), up to `max_retry_after`;
/// - close code 1013 "try again later": at least `try_later` (default 5 s);
/// - close code 1012 "service restart": a random delay in `service_restart` (default
///   5-30 s, as the IANA registry asks), so that the clients of a restarting server do
///   not all come back at the same moment.
///
/// The server-requested waits of the two close codes are capped by `max`. Fatal errors
/// ([`Error::is_fatal`]: HTTP 400/401/403/404, certificate errors, a panicking callback)
/// give up unless `retry_fatal` is set. Every setting accepts any `Duration`, including
/// `ZERO` (retry at once) and `Duration::MAX` (no limit).
///
/// ```
/// use std::time::Duration;
/// let policy = wsbeat::Backoff::default()
///     .initial(Duration::from_millis(200))
///     .max(Duration::from_secs(10))
///     .max_attempts(Some(20));
/// # let _ = policy;
/// ```
///
/// A clone draws its own random delays (a fresh seed): give each client a clone of one
/// configured policy and their retries still spread out. Call [`seed`](Backoff::seed)
/// on a clone for a fixed sequence.
#[must_use = "a Backoff does nothing until given to ClientBuilder::reconnect_policy"]
pub struct Backoff {
    initial: Duration,
    factor: f64,
    max: Duration,
    min_uptime: Duration,
    max_attempts: Option<u32>,
    max_elapsed: Option<Duration>,
    try_later: Duration,
    restart: (Duration, Duration),
    max_retry_after: Duration,
    retry_fatal: bool,
    jitter: bool,
    rng: u64,
}

impl Clone for Backoff {
    /// The same settings with a fresh seed: clones that failed together (one policy
    /// cloned for many clients) do not retry together (scale probe: 100 clones drew one
    /// and the same first delay, and all reconnected within 170 ms).
    fn clone(&self) -> Self {
        Backoff {
            rng: seed(),
            ..*self
        }
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("initial", &self.initial)
            .field("factor", &self.factor)
            .field("max", &self.max)
            .field("min_uptime", &self.min_uptime)
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("jitter", &self.jitter)
            .finish_non_exhaustive()
    }
}

impl Default for Backoff {
    /// 500 ms initial, factor 2, 30 s max, 5 s min uptime, no attempt or time limit.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            factor: 2.0,
            max: Duration::from_secs(30),
            min_uptime: Duration::from_secs(5),
            max_attempts: None,
            max_elapsed: None,
            try_later: Duration::from_secs(5),
            restart: (Duration::from_secs(5), Duration::from_secs(30)),
            max_retry_after: Duration::from_secs(600),
            retry_fatal: false,
            jitter: true,
            rng: seed(),
        }
    }
}

/// A seed unlike any other drawn in this process: the clock, a stack address and a
/// counter (two seeds in one clock tick still differ), mixed by splitmix64.
fn seed() -> u64 {
    static DRAWN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    let n = DRAWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut z =
        t ^ (&local as *const u8 as u64).rotate_left(32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

impl Backoff {
    /// The same delay before every attempt, without jitter (the classic "retry every 3 s"),
    /// keeping the rest of the default policy: fatal errors give up, and what the server
    /// asks for is honoured even when longer than `delay` (`Retry-After`, up to
    /// [`max_retry_after`](Backoff::max_retry_after); close code 1013 at least 5 s, 1012 a
    /// random 5-30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let every_3s = wsbeat::Backoff::fixed(Duration::from_secs(3));
    /// assert_eq!(every_3s.ceiling(1), Duration::from_secs(3));
    /// assert_eq!(every_3s.ceiling(10), Duration::from_secs(3));
    /// ```
    pub fn fixed(delay: Duration) -> Self {
        Backoff::default()
            .initial(delay)
            .factor(1.0)
            .max(delay)
            .jitter(false)
    }
    /// Full jitter (default `true`): each delay is uniform in `[0, ceiling]`, so clients
    /// that failed together do not retry together. `false`: each delay is the ceiling.
    pub fn jitter(mut self, yes: bool) -> Self {
        self.jitter = yes;
        self
    }
    /// Upper bound of the first delay.
    pub fn initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }
    /// Growth factor per attempt (at least 1).
    pub fn factor(mut self, f: f64) -> Self {
        self.factor = if f.is_finite() { f.max(1.0) } else { 2.0 };
        self
    }
    /// Largest delay.
    pub fn max(mut self, d: Duration) -> Self {
        self.max = d;
        self
    }
    /// A connection shorter than this does not reset the failure count.
    pub fn min_uptime(mut self, d: Duration) -> Self {
        self.min_uptime = d;
        self
    }
    /// Retry at most this many times in a row: the failure after the `n`-th retry gives
    /// up (`None`: never give up on count).
    pub fn max_attempts(mut self, n: Option<u32>) -> Self {
        self.max_attempts = n;
        self
    }
    /// Give up when failures have lasted this long (`None`: never).
    pub fn max_elapsed(mut self, d: Option<Duration>) -> Self {
        self.max_elapsed = d;
        self
    }
    /// Least wait after close code 1013 (try again later). Default 5 s.
    pub fn try_later(mut self, d: Duration) -> Self {
        self.try_later = d;
        self
    }
    /// After close code 1012 (service restart), wait a random time between `min` and
    /// `max` (default 5 s to 30 s), capped by [`max`](Self::max). Reversed bounds are
    /// swapped.
    pub fn service_restart(mut self, min: Duration, max: Duration) -> Self {
        self.restart = (min.min(max), min.max(max));
        self
    }
    /// Longest `Retry-After` honoured (default 10 min): a server cannot park the client
    /// for days.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }
    /// Also retry errors that are fatal by default (401, certificate errors...).
    pub fn retry_fatal(mut self, yes: bool) -> Self {
        self.retry_fatal = yes;
        self
    }
    /// Fixes the jitter seed (for reproducible tests).
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = seed | 1;
        self
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let v = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The jitter-free upper bound for `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        // Past `Duration::MAX` (a huge `initial` or `max`): saturate, never panic.
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// A uniformly random duration in `[0, d]`, never panicking for huge `d`.
    fn random_upto(&mut self, d: Duration) -> Duration {
        Duration::try_from_secs_f64(d.as_secs_f64() * self.next_random())
            .unwrap_or(d)
            .min(d)
    }
}

impl ReconnectPolicy for Backoff {
    fn next_delay(&mut self, f: &Failure<'_>) -> Option<Duration> {
        if let Some(e) = f.error
            && e.is_fatal()
            && !self.retry_fatal
        {
            return None;
        }
        if self.max_attempts.is_some_and(|m| f.attempt > m) {
            return None;
        }
        if self.max_elapsed.is_some_and(|m| f.elapsed >= m) {
            return None;
        }
        let ceiling = self.ceiling(f.attempt);
        let mut delay = if self.jitter {
            self.random_upto(ceiling)
        } else {
            ceiling
        };
        if let Some(Error::Http {
            retry_after: Some(ra),
            ..
        }) = f.error
        {
            delay = delay.max((*ra).min(self.max_retry_after));
        }
        match f.reason {
            Some(DisconnectReason::ClosedByPeer { code: 1013, .. }) => {
                delay = delay.max(self.try_later.min(self.max));
            }
            Some(DisconnectReason::ClosedByPeer { code: 1012, .. }) => {
                let (min, max) = self.restart;
                let wait = min.saturating_add(self.random_upto(max - min));
                delay = delay.max(wait.min(self.max));
            }
            _ => {}
        }
        Some(delay)
    }

    fn min_uptime(&self) -> Duration {
        self.min_uptime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(attempt: u32, error: Option<&Error>) -> Failure<'_> {
        Failure {
            attempt,
            error,
            reason: None,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_grows() {
        let mut b = Backoff::default().seed(7);
        for attempt in 1..20 {
            let d = b.next_delay(&fail(attempt, None)).unwrap();
            assert!(d <= b.ceiling(attempt), "{d:?}");
        }
        assert_eq!(b.ceiling(1), Duration::from_millis(500));
        assert_eq!(b.ceiling(3), Duration::from_secs(2));
        assert_eq!(b.ceiling(30), Duration::from_secs(30));
    }

    #[test]
    fn clones_draw_their_own_delays() {
        // One policy cloned for many clients (scale probe: every clone drew the same
        // delays, so 100 clients reconnected within 170 ms of each other).
        let policy = Backoff::default().initial(Duration::from_secs(10));
        let firsts: std::collections::HashSet<Duration> = (0..100)
            .map(|_| policy.clone().next_delay(&fail(1, None)).unwrap())
            .collect();
        assert!(firsts.len() >= 95, "{} distinct first delays", firsts.len());
        // Policies made in a tight loop too.
        let firsts: std::collections::HashSet<Duration> = (0..100)
            .map(|_| {
                Backoff::default()
                    .initial(Duration::from_secs(10))
                    .next_delay(&fail(1, None))
                    .unwrap()
            })
            .collect();
        assert!(firsts.len() >= 95, "{} distinct first delays", firsts.len());
        // A fixed seed set on the clone gives a fixed sequence.
        let a = policy.clone().seed(9).next_delay(&fail(1, None));
        let b = policy.clone().seed(9).next_delay(&fail(1, None));
        assert_eq!(a, b);
    }

    #[test]
    fn fatal_and_limits_give_up() {
        let mut b = Backoff::default().max_attempts(Some(2));
        let e401 = Error::Http {
            status: 401,
            retry_after: None,
            body: None,
        };
        assert!(b.next_delay(&fail(1, Some(&e401))).is_none());
        assert!(b.next_delay(&fail(3, None)).is_none());
        let e503 = Error::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(3)),
            body: None,
        };
        assert!(b.next_delay(&fail(1, Some(&e503))).unwrap() >= Duration::from_secs(3));
        let forever = Error::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(1 << 40)),
            body: None,
        };
        let capped = b.next_delay(&fail(1, Some(&forever))).unwrap();
        assert_eq!(capped, Duration::from_secs(600));
    }

    #[test]
    fn fixed_waits_the_same_delay_every_time() {
        let mut b = Backoff::fixed(Duration::from_secs(3));
        for attempt in [1, 2, 7, 100] {
            assert_eq!(
                b.next_delay(&fail(attempt, None)),
                Some(Duration::from_secs(3))
            );
        }
        let e401 = Error::Http {
            status: 401,
            retry_after: None,
            body: None,
        };
        assert_eq!(b.next_delay(&fail(1, Some(&e401))), None, "still fatal");
    }

    fn closed(code: u16) -> DisconnectReason {
        DisconnectReason::ClosedByPeer {
            code,
            reason: String::new(),
        }
    }

    #[test]
    fn service_restart_waits_a_random_5_to_30_seconds() {
        let mut b = Backoff::default().seed(3);
        let reason = closed(1012);
        let mut seen = Vec::new();
        for attempt in 1..200 {
            let f = Failure {
                attempt: attempt % 3 + 1,
                error: None,
                reason: Some(&reason),
                elapsed: Duration::ZERO,
            };
            let d = b.next_delay(&f).unwrap();
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(30),
                "{d:?}"
            );
            seen.push(d);
        }
        // Randomised: a herd of clients spreads out over the window.
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*hi - *lo > Duration::from_secs(15), "{lo:?}..{hi:?}");
        // Configurable like try_later, and capped by max.
        let mut fixed = Backoff::default()
            .service_restart(Duration::from_secs(2), Duration::from_secs(2))
            .seed(5);
        let f = Failure {
            attempt: 1,
            error: None,
            reason: Some(&reason),
            elapsed: Duration::ZERO,
        };
        assert_eq!(fixed.next_delay(&f), Some(Duration::from_secs(2)));
        let mut capped = Backoff::default().max(Duration::from_secs(1));
        assert!(capped.next_delay(&f).unwrap() <= Duration::from_secs(1));
    }

    #[test]
    fn extreme_durations_never_panic() {
        for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let mut b = Backoff::default()
                .initial(d)
                .max(d)
                .min_uptime(d)
                .max_elapsed(Some(d))
                .try_later(d)
                .max_retry_after(d)
                .service_restart(d, Duration::MAX)
                .factor(f64::MAX);
            for attempt in [1, 2, 64, u32::MAX] {
                assert!(b.ceiling(attempt) <= d);
                for reason in [None, Some(closed(1012)), Some(closed(1013))] {
                    let f = Failure {
                        attempt,
                        error: None,
                        reason: reason.as_ref(),
                        elapsed: Duration::ZERO,
                    };
                    let _ = b.next_delay(&f);
                }
            }
        }
    }
}
