//! Helpers around the wsbeat client itself: a fixed-delay reconnect policy, and a
//! panic counter for the client's own threads (their panics are not surfaced otherwise).

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use wsbeat::{Failure, ReconnectPolicy};

/// Retries after the same delay, forever, whatever happened.
pub struct Fixed(pub Duration);

impl ReconnectPolicy for Fixed {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        Some(self.0)
    }
}

static WSBEAT_PANICS: AtomicUsize = AtomicUsize::new(0);
/// Panics, on any thread, whose message is `MATCHER_PANIC` (user code the client runs:
/// on its own threads, or on the consumer's thread when `recv` reads the socket).
static MATCHER_PANICS: AtomicUsize = AtomicUsize::new(0);
/// The message of the panicking reply matcher in the hardening tests.
pub const MATCHER_PANIC: &str = "matcher bug";

/// Starts counting panics in threads named `wsbeat-*` (idempotent).
pub fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            if message == Some(MATCHER_PANIC) {
                MATCHER_PANICS.fetch_add(1, SeqCst);
            } else if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("wsbeat-"))
            {
                WSBEAT_PANICS.fetch_add(1, SeqCst);
            }
            previous(info);
        }));
    });
}

/// Panics seen in `wsbeat-*` threads since [`watch_panics`] (other than [`MATCHER_PANIC`]).
pub fn client_panics() -> usize {
    WSBEAT_PANICS.load(SeqCst)
}

/// Panics with the message [`MATCHER_PANIC`], on any thread, since [`watch_panics`].
pub fn matcher_panics() -> usize {
    MATCHER_PANICS.load(SeqCst)
}

/// Receives events until `Closed` (or `timeout`), returning them in order.
pub fn events_until_closed(rx: &wsbeat::Events, timeout: Duration) -> Vec<wsbeat::Event> {
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while let Ok(ev) = rx.recv_deadline(deadline) {
        let last = matches!(ev, wsbeat::Event::Closed);
        out.push(ev);
        if last {
            break;
        }
    }
    out
}

/// Checks `events` against the grammar documented on `wsbeat::Event`:
///
/// ```text
/// stream     = ( connection | Reconnecting | Undelivered )*  GaveUp?  Undelivered?  Closed
/// connection = Connected ( Message | HeartbeatMissed | Undelivered | Unconfirmed )*  Disconnected
/// ```
///
/// with `Connected`/`Disconnected` pairs of one generation, generations growing, and
/// at most one `Unconfirmed` per connection, of its generation. With
/// `complete`, the stream must end with `Closed`; otherwise it may stop anywhere.
/// Returns a description of the first violation.
pub fn check_grammar(events: &[wsbeat::Event], complete: bool) -> Result<(), String> {
    use wsbeat::Event as E;
    #[derive(Debug, PartialEq)]
    enum At {
        Between,
        Open(u64),
        GaveUp,
        Tail,
        Closed,
    }
    let mut at = At::Between;
    let mut last_gen = 0;
    // The connection whose `Unconfirmed` came (at most one per connection).
    let mut unconfirmed = 0;
    let names: Vec<String> = events
        .iter()
        .map(|e| {
            let d = format!("{e:?}");
            d.split([' ', '(', '{']).next().unwrap_or("").to_string()
        })
        .collect();
    for (i, ev) in events.iter().enumerate() {
        let next = match (&at, ev) {
            (At::Between, E::Connected { generation, .. }) if *generation > last_gen => {
                last_gen = *generation;
                At::Open(*generation)
            }
            (At::Between, E::Reconnecting { .. } | E::Undelivered(_)) => At::Between,
            (At::Between, E::GaveUp(_)) => At::GaveUp,
            (At::Between | At::GaveUp | At::Tail, E::Closed) => At::Closed,
            (At::Open(g), E::Message(_) | E::HeartbeatMissed { .. } | E::Undelivered(_)) if !matches!(ev, E::HeartbeatMissed { generation, .. } if generation != g) => {
                At::Open(*g)
            }
            (At::Open(g), E::Unconfirmed { generation, .. })
                if generation == g && unconfirmed != *g =>
            {
                unconfirmed = *g;
                At::Open(*g)
            }
            (At::Open(g), E::Disconnected { generation, .. }) if generation == g => At::Between,
            (At::GaveUp, E::Undelivered(_)) => At::Tail,
            _ => {
                return Err(format!(
                    "event {i} ({}) not allowed after {at:?}; stream: {names:?}",
                    names[i]
                ));
            }
        };
        at = next;
    }
    if complete && at != At::Closed {
        return Err(format!("the stream does not end with Closed: {names:?}"));
    }
    Ok(())
}

/// Panics unless `events` follow the grammar (see [`check_grammar`]).
pub fn assert_grammar(events: &[wsbeat::Event], complete: bool) {
    if let Err(e) = check_grammar(events, complete) {
        panic!("event grammar violated: {e}");
    }
}

/// Fails unless every `wsbeat-*` thread is gone within `timeout` (threads that just
/// finished may linger briefly). Exact only under `util::exclusive()`.
pub fn assert_no_client_threads(what: &str, timeout: Duration) {
    use super::util;
    assert!(
        util::wait_until(timeout, || util::threads_named("wsbeat-") == 0),
        "{what}: wsbeat threads left: {:?}",
        util::thread_names()
            .into_iter()
            .filter(|n| n.starts_with("wsbeat-"))
            .collect::<Vec<_>>()
    );
}
