//! Heartbeat settings and the timer thread that detects dead and half-open links.
//!
//! The timer thread sleeps on a crossbeam `after` deadline (no polling loop). When it
//! wakes it looks at the current connection under the lock and either sends a probe,
//! counts a missed reply, declares the link dead, or computes the next deadline. Inbound
//! traffic only moves the deadline later; the timer finds that out when it wakes (while a
//! probe is outstanding it looks at least every `interval`, so a reply is followed by the
//! next probe `interval` later even when `timeout` is longer). What counts as a sign of
//! life is the heartbeat's [`Liveness`] rule.
//! While the consumer is behind and the reader does not read (`event_capacity`), unread
//! input (bytes in the socket, or frames left in tungstenite's buffer) counts as traffic
//! and as a reply: the peer sent it, so it is alive, and the consumer's pace must not
//! kill the link. With nothing unread, probes and deadlines run as usual (a reply makes
//! the socket readable).
//! Heartbeat state lives inside each connection, so a new connection always starts
//! fresh and a stale deadline can never kill it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::time::deadline;
use crate::{DisconnectReason, Error, Message, Result};

/// Decides whether an inbound message is the reply to an application-level probe. It is
/// shown text and binary messages, and pongs only when the probe is a ping (so a pong
/// that the matcher recognises answers a ping probe; any other pong is no reply).
///
/// It runs on the reader thread *while the client's lock is held* (a client with a
/// matcher never reads the socket on your thread in
/// [`Events::recv`](crate::Events::recv)): keep it short, and do not call back into the
/// [`Client`](crate::Client) from it (the lock is not reentrant). A slow matcher delays
/// everything else that takes that lock, on every thread: sends, probes, `state()`,
/// `stats()`, `wait_connected` and `close()` wait for it. A probe that waits for it still
/// gets its whole reply timeout once written.
/// Do not capture a `Client` either (the client owns its matcher: that would keep it
/// alive forever), nor upgrade a captured [`WeakClient`](crate::WeakClient) in it.
/// A matcher that panics is treated as "not a reply" (logged as an error).
pub type ReplyMatcher = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Mode {
    Ping,
    App {
        probe: Message,
        matcher: ReplyMatcher,
        deliver_replies: bool,
    },
    Passive,
    Off,
}

/// How the client checks that the link is alive.
///
/// The default is [`Heartbeat::ping`] with a 15 s idle interval and a 10 s timeout: a
/// dead or half-open link is declared dead at most 25 s after the last inbound traffic.
///
/// A probe's reply clock runs from when the probe reached the peer's TCP (where the
/// kernel tells, Linux and macOS; elsewhere from when the OS took it): a probe queued
/// behind a long upload, which a live peer reads steadily, waits with it instead of
/// killing the link every `interval + timeout`. A peer that stops taking our bytes stops
/// that wait (and a full send buffer is a write stall after the write timeout).
///
/// Zero intervals and timeouts make no sense (probes back to back, every probe missed
/// at once): `connect()` rejects them with [`Error::InvalidConfig`]. `Duration::MAX`
/// means "never" (no probe, or no deadline for the reply).
///
/// ```
/// use std::time::Duration;
/// use wsbeat::{Heartbeat, Message};
///
/// // WebSocket pings after 5 s of silence; dead 3 s after an unanswered ping.
/// let hb = Heartbeat::ping(Duration::from_secs(5), Duration::from_secs(3));
/// // Application-level heartbeat for servers that want {"op":"ping"}.
/// let app = Heartbeat::app(
///     Duration::from_secs(5),
///     Duration::from_secs(3),
///     Message::text(r#"{"op":"ping"}"#),
///     |m| matches!(m, Message::Text(t) if t.as_str() == r#"{"op":"pong"}"#),
/// );
/// // Server-driven protocols: anything must arrive every 30 s.
/// let passive = Heartbeat::passive(Duration::from_secs(30));
/// # let _ = (hb, app, passive);
/// ```
#[derive(Clone)]
#[must_use = "a Heartbeat does nothing until given to ClientBuilder::heartbeat"]
pub struct Heartbeat {
    pub(crate) mode: Mode,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) max_missed: u32,
    pub(crate) liveness: Liveness,
}

/// What proves the peer alive: the three rules side by side.
///
/// | what arrives | `Traffic` | `Data` | `Replies` |
/// |---|---|---|---|
/// | a reply to our probe (pong with our payload, or a matched app reply) | yes | yes | yes |
/// | a text or binary message | yes | yes | no |
/// | bytes of a message still arriving | yes | yes | no |
/// | a ping or an unsolicited pong from the peer | yes | **no** | no |
///
/// - `Traffic` (default for [`Heartbeat::ping`] and [`Heartbeat::passive`]): anything at
///   all. A reply stuck behind a large frame never causes a false timeout; but a server
///   whose WebSocket library keeps pinging while its application hangs looks alive.
/// - `Data` (default for [`Heartbeat::app`]): the browser rule, for application-level
///   heartbeats. A browser never sees control frames, so a page that sends `"ping"` and
///   waits for any message judges the *application*: a library that pings on its own
///   does not keep a hung application alive, while a busy data stream does.
/// - `Replies` ([`Heartbeat::strict`]): only replies to our probes. Detects an
///   application that keeps streaming data but stopped answering; the reply must not get
///   stuck behind more than `timeout` of bulk data.
///
/// In passive mode there are no probes, so `Replies` behaves like `Traffic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Liveness {
    /// Any inbound byte, control frames included.
    Traffic,
    /// Data messages (and bytes of one still arriving) and probe replies; not control
    /// frames.
    Data,
    /// Probe replies only.
    Replies,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::ping(Duration::from_secs(15), Duration::from_secs(10))
    }
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Ping => "ping",
            Mode::App { .. } => "app",
            Mode::Passive => "passive",
            Mode::Off => "off",
        };
        f.debug_struct("Heartbeat")
            .field("mode", &mode)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("max_missed", &self.max_missed)
            .field("liveness", &self.liveness)
            .finish()
    }
}

impl Heartbeat {
    /// The probe with sequence number `seq`: a Ping carrying it, or the app's probe.
    pub(crate) fn probe_message(&self, seq: u64) -> Message {
        match &self.mode {
            Mode::App { probe, .. } => probe.clone(),
            _ => Message::Ping(seq.to_be_bytes().to_vec().into()),
        }
    }

    /// Whether inbound data messages go through a reply matcher (app-level probes).
    #[inline]
    pub(crate) fn matches_replies(&self) -> bool {
        matches!(self.mode, Mode::App { .. })
    }

    /// WebSocket Ping frames (payload: a sequence number) after `interval` without
    /// inbound traffic; dead when no reply arrives within `timeout`.
    pub fn ping(interval: Duration, timeout: Duration) -> Self {
        Heartbeat {
            mode: Mode::Ping,
            interval,
            timeout,
            max_missed: 1,
            liveness: Liveness::Traffic,
        }
    }

    /// An application-level probe message; `matcher` recognises the reply among the
    /// text and binary messages that arrive, and, when the probe is a ping, the pongs.
    /// Replies are consumed (not delivered as events) unless
    /// [`deliver_replies`](Self::deliver_replies) (a pong then still needs
    /// [`surface_pings`](crate::ClientBuilder::surface_pings) to be delivered).
    ///
    /// The matcher runs on the reader thread with the client's lock held: it must not
    /// call the `Client` (see [`ReplyMatcher`]).
    ///
    /// The probe must be a message [`Client::send`](crate::Client::send) accepts (not a
    /// close frame or a raw frame, a ping of at most 125 bytes, within
    /// `max_message_size`); `connect()` rejects any other with [`Error::InvalidConfig`].
    pub fn app(
        interval: Duration,
        timeout: Duration,
        probe: Message,
        matcher: impl Fn(&Message) -> bool + Send + Sync + 'static,
    ) -> Self {
        Heartbeat {
            mode: Mode::App {
                probe,
                matcher: Arc::new(matcher),
                deliver_replies: false,
            },
            interval,
            timeout,
            max_missed: 1,
            liveness: Liveness::Data,
        }
    }

    /// Sends nothing; the link is dead when nothing at all arrives for `max_silence`.
    pub fn passive(max_silence: Duration) -> Self {
        Heartbeat {
            mode: Mode::Passive,
            interval: max_silence,
            timeout: Duration::ZERO,
            max_missed: 1,
            liveness: Liveness::Traffic,
        }
    }

    /// No heartbeat. A silently vanished peer then goes unnoticed until a write stalls.
    pub fn off() -> Self {
        Heartbeat {
            mode: Mode::Off,
            interval: Duration::ZERO,
            timeout: Duration::ZERO,
            max_missed: 1,
            liveness: Liveness::Traffic,
        }
    }

    /// Probes that may go unanswered in a row before the link is declared dead (default 1).
    /// Each extra one adds a timeout to the detection bound: a dead link is then detected
    /// within `interval + n * timeout`.
    pub fn max_missed(mut self, n: u32) -> Self {
        self.max_missed = n.max(1);
        self
    }

    /// `true`: only probe replies prove liveness ([`Liveness::Replies`]); `false`: back
    /// to the mode's default (`Traffic`, or `Data` for app heartbeats). No effect in
    /// passive mode.
    pub fn strict(mut self, yes: bool) -> Self {
        self.liveness = match (yes, &self.mode) {
            (true, _) => Liveness::Replies,
            (false, Mode::App { .. }) => Liveness::Data,
            (false, _) => Liveness::Traffic,
        };
        self
    }

    /// Sets what proves the peer alive (see [`Liveness`] for the three rules).
    ///
    /// ```
    /// use std::time::Duration;
    /// use wsbeat::{Heartbeat, Liveness, Message};
    ///
    /// // Any data message resets the timers; the server's own pings do not.
    /// let hb = Heartbeat::ping(Duration::from_secs(10), Duration::from_secs(11))
    ///     .liveness(Liveness::Data);
    /// # let _ = hb;
    /// ```
    pub fn liveness(mut self, rule: Liveness) -> Self {
        self.liveness = rule;
        self
    }

    /// For [`Heartbeat::app`]: also deliver matched replies as events.
    pub fn deliver_replies(mut self, yes: bool) -> Self {
        if let Mode::App {
            deliver_replies, ..
        } = &mut self.mode
        {
            *deliver_replies = yes;
        }
        self
    }

    /// The idle interval (or the max silence for passive mode).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The reply timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Rejects settings that cannot work (see the type's docs), and an app probe that
    /// `Client::send` would refuse (a close frame, a raw frame, a ping or pong over 125
    /// bytes, a message over `max_message_size`): sent on every connection, the peer
    /// would drop each one.
    pub(crate) fn validate(&self, max_message_size: usize) -> Result<()> {
        if let Mode::App { probe, .. } = &self.mode
            && let Err(e) = crate::queue::check_outgoing(probe.clone(), max_message_size)
        {
            let reason = match e {
                Error::MessageTooLarge { .. } => format!("{e}: make the probe smaller"),
                _ => "a close frame or a raw Message::Frame cannot be a probe: use a text or \
                      binary message (or a ping of at most 125 bytes)"
                    .into(),
            };
            return Err(Error::InvalidConfig {
                setting: "Heartbeat::app probe",
                reason,
            });
        }
        let invalid = |setting, reason: &str| {
            Err(Error::InvalidConfig {
                setting,
                reason: reason.into(),
            })
        };
        match self.mode {
            Mode::Off => Ok(()),
            Mode::Passive if self.interval.is_zero() => invalid(
                "Heartbeat::passive max_silence",
                "zero would declare every connection dead at once; use Heartbeat::off() \
                 for no check, or Duration::MAX",
            ),
            Mode::Passive => Ok(()),
            Mode::Ping | Mode::App { .. } if self.interval.is_zero() => invalid(
                "heartbeat interval",
                "zero would send probes back to back; use Heartbeat::off() for no \
                 heartbeat, or an interval of at least a few milliseconds",
            ),
            Mode::Ping | Mode::App { .. } if self.timeout.is_zero() => invalid(
                "heartbeat timeout",
                "zero would count every probe as missed at once; give the peer time to \
                 answer (e.g. a few seconds), or Duration::MAX for no deadline",
            ),
            Mode::Ping | Mode::App { .. } => Ok(()),
        }
    }
}

/// Heartbeat state of one connection (lives in its `Live`, guarded by the link lock).
#[derive(Debug)]
pub(crate) struct HbState {
    /// Last inbound anything (bytes or frames).
    pub last_inbound: Instant,
    /// Last complete data message, or bytes that completed no frame (a data message
    /// still arriving): what `Liveness::Data` counts.
    pub last_data: Instant,
    /// Last probe reply (pong with our payload, or an app reply).
    pub last_reply: Instant,
    /// Outstanding probe: sequence number and send time.
    pub probe: Option<(u64, Instant)>,
    pub next_seq: u64,
    pub missed: u32,
    pub rtt: Option<Duration>,
}

impl HbState {
    pub(crate) fn new(now: Instant) -> Self {
        HbState {
            last_inbound: now,
            last_data: now,
            last_reply: now,
            probe: None,
            next_seq: 1,
            missed: 0,
            rtt: None,
        }
    }

    /// Called by the timer while the reader is held back by a full event channel (the
    /// consumer is behind) and input waits unread, in the socket or in tungstenite's
    /// buffer. That input proves the peer alive, and a probe reply may wait behind it, so
    /// it counts as traffic and, even in strict mode, as a reply: a slow consumer must
    /// never get a live peer declared dead. A peer that vanished meanwhile is judged once
    /// the consumer catches up and reading resumes (at most `interval + timeout` later).
    pub(crate) fn held_back(&mut self, at: Instant) {
        self.last_inbound = self.last_inbound.max(at);
        self.last_data = self.last_data.max(at);
        self.last_reply = self.last_reply.max(at);
    }

    /// Called by the timer when output ahead of the outstanding probe is still draining
    /// to the peer (see `Live::output_moved`): the probe may not have reached it yet, so
    /// its reply clock starts again now. A long upload to a live, reading peer is then no
    /// missed reply. A peer that stops taking our bytes stops this: the clock runs out
    /// (and the write-stall timeout judges a peer that stopped reading). A probe already
    /// answered by a sign of life that counts (see [`evaluate`]) keeps its time, so that
    /// `evaluate` sees the answer.
    pub(crate) fn output_moved(&mut self, hb: &Heartbeat, now: Instant) {
        if let Some((seq, sent)) = self.probe
            && self.alive_since(hb) <= sent
        {
            self.probe = Some((seq, now));
        }
    }

    /// The last sign of life that counts for `hb`'s liveness rule.
    fn alive_since(&self, hb: &Heartbeat) -> Instant {
        match hb.liveness {
            Liveness::Traffic => self.last_inbound,
            Liveness::Data => self.last_data.max(self.last_reply),
            Liveness::Replies => self.last_reply,
        }
    }

    /// Called by the reader for each inbound frame. Returns true when the message is a
    /// heartbeat reply to be consumed (not delivered).
    #[inline]
    pub(crate) fn on_inbound(&mut self, hb: &Heartbeat, msg: &Message, now: Instant) -> bool {
        // The usual case, inline in the reader's loop: a data message that no reply
        // matcher has to look at (what the general path below does for it).
        if (msg.is_text() || msg.is_binary()) && !hb.matches_replies() {
            self.on_data(now);
            return false;
        }
        self.on_inbound_general(hb, msg, now)
    }

    /// Data arrived at `now` that no reply matcher has to look at: whole data messages
    /// (the reader's fast path marks them once per drain; what
    /// [`on_inbound`](Self::on_inbound) does for each), or bytes a drain read besides the
    /// pings and pongs it read. Those are part of a large frame still arriving: they prove
    /// the peer alive while a probe reply may be queued behind that frame on its side, and
    /// count as data in progress for `Liveness::Data`. Not a reply: strict mode ignores it.
    #[inline]
    pub(crate) fn on_data(&mut self, now: Instant) {
        self.last_inbound = now;
        self.last_data = now;
    }

    fn on_inbound_general(&mut self, hb: &Heartbeat, msg: &Message, now: Instant) -> bool {
        self.last_inbound = now;
        if let Message::Text(_) | Message::Binary(_) = msg {
            self.last_data = now;
        }
        let (is_reply, consume) = match (&hb.mode, msg) {
            (Mode::Ping, Message::Pong(p)) => {
                let seq = <[u8; 8]>::try_from(&p[..]).ok().map(u64::from_be_bytes);
                (seq.is_some() && seq == self.probe.map(|p| p.0), false)
            }
            (
                Mode::App {
                    matcher,
                    deliver_replies,
                    probe,
                },
                Message::Text(_) | Message::Binary(_) | Message::Pong(_),
            ) if !msg.is_pong() || probe.is_ping() => {
                // A pong only for a ping probe: else a server whose library pongs on
                // its own while its application hangs would pass a lax matcher.
                // User code on the reader thread, under the lock: a panic must not take
                // the reader down with the lock's protected state half-updated.
                let r =
                    Error::catch("Heartbeat::app reply matcher", || matcher(msg)).unwrap_or(false);
                (r, r && !deliver_replies)
            }
            _ => (false, false),
        };
        if is_reply {
            if let Some((_, sent)) = self.probe.take() {
                self.rtt = Some(now.saturating_duration_since(sent));
            }
            self.last_reply = now;
            self.missed = 0;
        }
        consume
    }
}

/// What the timer decided for the current connection.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    SleepUntil(Instant),
    Probe(Message, u64),
    Dead(DisconnectReason),
    Missed(u32, Message, u64),
}

/// The heartbeat's decision for one connection at `now`: sleep, probe, count a miss or
/// declare it dead. Pure: no threads, no sockets, no clock (the timer applies it).
pub(crate) fn evaluate(hb: &Heartbeat, st: &mut HbState, now: Instant) -> Option<Step> {
    let alive_since = st.alive_since(hb);
    match hb.mode {
        Mode::Off => None,
        Mode::Passive => {
            // No probes, so no replies: `Replies` cannot apply and counts all traffic.
            let since = match hb.liveness {
                Liveness::Data => st.last_data,
                Liveness::Traffic | Liveness::Replies => st.last_inbound,
            };
            let due = deadline(since, hb.interval);
            Some(if now >= due {
                Step::Dead(DisconnectReason::HeartbeatTimeout {
                    silent_for: now - since,
                })
            } else {
                Step::SleepUntil(due)
            })
        }
        Mode::Ping | Mode::App { .. } => {
            if let Some((_, sent)) = st.probe {
                if alive_since > sent {
                    // Any inbound frame after the probe proves liveness.
                    st.probe = None;
                    st.missed = 0;
                } else {
                    let due = deadline(sent, hb.timeout);
                    if now < due {
                        // Traffic arriving from now on makes the next probe due at the
                        // earliest `interval` from now: look again then, so a reply does
                        // not leave the link unprobed until this deadline (interval < timeout).
                        // (A zero interval is rejected by `Heartbeat::validate`.)
                        return Some(Step::SleepUntil(due.min(deadline(now, hb.interval))));
                    }
                    st.missed += 1;
                    if st.missed >= hb.max_missed {
                        // Silent by the liveness rule, as in passive mode: under `Data`
                        // the peer's own pings do not shorten it.
                        return Some(Step::Dead(DisconnectReason::HeartbeatTimeout {
                            silent_for: now.saturating_duration_since(alive_since),
                        }));
                    }
                    let seq = st.next_seq;
                    return Some(Step::Missed(st.missed, hb.probe_message(seq), seq));
                }
            }
            let due = deadline(
                alive_since.max(st.probe.map_or(alive_since, |p| p.1)),
                hb.interval,
            );
            if now < due {
                return Some(Step::SleepUntil(due));
            }
            let seq = st.next_seq;
            Some(Step::Probe(hb.probe_message(seq), seq))
        }
    }
}

/// The decision logic on its own: a clock that is just `Instant`s, no threads, no sockets.
#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ping_of(seq: u64) -> Message {
        Message::Ping(seq.to_be_bytes().to_vec().into())
    }

    /// What the timer does with a probe step: remember the probe.
    fn sent(st: &mut HbState, seq: u64, now: Instant) {
        st.next_seq += 1;
        st.probe = Some((seq, now));
    }

    fn dead_after(silent_for: Duration) -> Option<Step> {
        Some(Step::Dead(DisconnectReason::HeartbeatTimeout {
            silent_for,
        }))
    }

    #[test]
    fn output_moving_after_a_sign_of_life_does_not_hide_it() {
        let hb = Heartbeat::ping(15 * S, 10 * S);
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 15 * S),
            Some(Step::Probe(ping_of(1), 1))
        );
        sent(&mut st, 1, t0 + 15 * S);
        // The peer sends something just after the probe, then falls silent.
        st.on_data(t0 + 15 * S + S / 10);
        // Our upload still moved when the timer looks at the reply deadline: the sign
        // of life answers the probe, and the next probe is due `interval` after it.
        st.output_moved(&hb, t0 + 25 * S);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 25 * S),
            Some(Step::SleepUntil(t0 + 30 * S + S / 10))
        );
        // With no sign of life, moving output restarts the probe's clock.
        sent(&mut st, 2, t0 + 31 * S);
        st.output_moved(&hb, t0 + 40 * S);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 45 * S),
            Some(Step::SleepUntil(t0 + 50 * S))
        );
    }

    #[test]
    fn ping_probes_after_the_interval_and_dies_after_the_timeout() {
        let hb = Heartbeat::ping(10 * S, 3 * S);
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 5 * S),
            Some(Step::SleepUntil(t0 + 10 * S))
        );
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 10 * S),
            Some(Step::Probe(ping_of(1), 1))
        );
        sent(&mut st, 1, t0 + 10 * S);
        // Waiting for the reply: look again at the reply deadline.
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 11 * S),
            Some(Step::SleepUntil(t0 + 13 * S))
        );
        assert_eq!(evaluate(&hb, &mut st, t0 + 13 * S), dead_after(13 * S));
    }

    #[test]
    fn a_reply_clears_the_probe_and_measures_the_round_trip() {
        let hb = Heartbeat::ping(10 * S, 3 * S);
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        sent(&mut st, 1, t0 + 10 * S);
        let consumed = st.on_inbound(
            &hb,
            &Message::Pong(1u64.to_be_bytes().to_vec().into()),
            t0 + 11 * S,
        );
        assert!(!consumed, "pongs are never delivered anyway");
        assert_eq!(st.probe, None);
        assert_eq!(st.rtt, Some(S));
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 12 * S),
            Some(Step::SleepUntil(t0 + 21 * S))
        );
        // A pong with another payload is not our reply, but it is traffic.
        sent(&mut st, 2, t0 + 21 * S);
        st.on_inbound(&hb, &Message::Pong(b"other".to_vec().into()), t0 + 22 * S);
        assert_eq!(st.probe.map(|p| p.0), Some(2));
        assert_eq!(st.last_reply, t0 + 11 * S);
    }

    #[test]
    fn max_missed_probes_again_before_declaring_death() {
        let hb = Heartbeat::ping(10 * S, 3 * S).max_missed(2);
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        sent(&mut st, 1, t0 + 10 * S);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 13 * S),
            Some(Step::Missed(1, ping_of(2), 2))
        );
        sent(&mut st, 2, t0 + 13 * S);
        assert_eq!(evaluate(&hb, &mut st, t0 + 16 * S), dead_after(16 * S));
    }

    #[test]
    fn the_peers_own_pings_prove_traffic_but_not_data() {
        let probe = Message::text("检测");
        let app = Heartbeat::app(10 * S, 3 * S, probe.clone(), |m| {
            m.to_text().is_ok_and(|t| t == "ok")
        });
        let ping = Heartbeat::ping(10 * S, 3 * S);
        for (hb, dies) in [(&app, true), (&ping, false)] {
            let t0 = Instant::now();
            let mut st = HbState::new(t0);
            sent(&mut st, 1, t0 + 10 * S);
            // The server's library pings; its application does not answer.
            // A ping, all the drain read (no `on_data`: nothing besides it).
            st.on_inbound(hb, &Message::Ping(Vec::new().into()), t0 + 11 * S);
            let step = evaluate(hb, &mut st, t0 + 13 * S);
            if dies {
                // Dead, silent for the 13 s since the start (the last sign of life that
                // counts for `Liveness::Data`), not the 2 s since the ping.
                assert_eq!(step, dead_after(13 * S));
            } else {
                assert!(!matches!(step, Some(Step::Dead(_))), "{step:?}");
            }
        }
    }

    #[test]
    fn data_keeps_app_mode_alive_unless_strict() {
        let matcher = |m: &Message| m.to_text().is_ok_and(|t| t == "ok");
        let probe = Message::text("检测");
        for strict in [false, true] {
            let hb = Heartbeat::app(10 * S, 3 * S, probe.clone(), matcher).strict(strict);
            let t0 = Instant::now();
            let mut st = HbState::new(t0);
            sent(&mut st, 1, t0 + 10 * S);
            assert!(!st.on_inbound(&hb, &Message::text("tick"), t0 + 11 * S));
            let step = evaluate(&hb, &mut st, t0 + 13 * S);
            assert_eq!(
                matches!(step, Some(Step::Dead(_))),
                strict,
                "strict: {strict}"
            );
            // The reply itself is consumed (not delivered) and counts in every mode.
            let mut st = HbState::new(t0);
            sent(&mut st, 1, t0 + 10 * S);
            assert!(st.on_inbound(&hb, &Message::text("ok"), t0 + 11 * S));
            assert_eq!(
                evaluate(&hb, &mut st, t0 + 13 * S),
                Some(Step::SleepUntil(t0 + 21 * S))
            );
        }
    }

    #[test]
    fn a_held_back_reader_counts_as_a_reply_even_when_strict() {
        let hb = Heartbeat::ping(10 * S, 3 * S).strict(true);
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        sent(&mut st, 1, t0 + 10 * S);
        st.held_back(t0 + 12 * S);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 13 * S),
            Some(Step::SleepUntil(t0 + 22 * S))
        );
        assert_eq!(st.probe, None);
    }

    #[test]
    fn passive_mode_only_counts_silence() {
        let hb = Heartbeat::passive(30 * S);
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 20 * S),
            Some(Step::SleepUntil(t0 + 30 * S))
        );
        st.on_inbound(&hb, &Message::text("x"), t0 + 25 * S);
        assert_eq!(
            evaluate(&hb, &mut st, t0 + 30 * S),
            Some(Step::SleepUntil(t0 + 55 * S))
        );
        assert_eq!(evaluate(&hb, &mut st, t0 + 55 * S), dead_after(30 * S));
        assert_eq!(evaluate(&Heartbeat::off(), &mut st, t0 + 1000 * S), None);
    }

    #[test]
    fn duration_max_means_never() {
        let t0 = Instant::now();
        let mut st = HbState::new(t0);
        let never_probe = Heartbeat::ping(Duration::MAX, 3 * S);
        let Some(Step::SleepUntil(t)) = evaluate(&never_probe, &mut st, t0 + 1000 * S) else {
            panic!("should sleep");
        };
        assert!(t > t0 + 1_000_000 * S);
        let never_dead = Heartbeat::ping(10 * S, Duration::MAX);
        sent(&mut st, 1, t0 + 10 * S);
        assert!(matches!(
            evaluate(&never_dead, &mut st, t0 + 1000 * S),
            Some(Step::SleepUntil(_))
        ));
    }
}
