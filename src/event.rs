//! What the client tells its user: events and connection state. The grammar documented
//! on [`Event`] is enforced by `EventSink` (inbound.rs).

use std::time::Duration;

use crate::{DisconnectReason, Error, Message};

/// Something that happened on the client. Read them from [`Client::events`](crate::Client::events).
///
/// # Order
/// Events follow one grammar, on every path (user close, give-up, a panic in a
/// callback, close from inside a callback):
///
/// ```text
/// stream     = ( connection | Reconnecting | Undelivered )*  GaveUp?  Undelivered?  Closed
/// connection = Connected ( Message | HeartbeatMissed | Undelivered | Unconfirmed )*  Disconnected
/// ```
///
/// - `Connected` and `Disconnected` come in pairs with the same `generation`; every
///   `Message` lies between the pair of the connection it arrived on.
/// - `Unconfirmed` (at-most-once delivery only) at most once per connection, before
///   the `Disconnected` of the connection whose in-flight messages it hands back.
/// - `Reconnecting` comes only between connections, never once `close` has begun.
/// - `GaveUp` at most once, then `Undelivered` (if anything was still queued and not
///   returned by [`Client::close`](crate::Client::close)), then `Closed`.
/// - `Closed` exactly once, always last: a loop that stops at `Closed` has seen every
///   message that was handed back.
/// - A consumer that leaves [`CONTROL_EVENT_CAP`](crate::CONTROL_EVENT_CAP) control
///   events unread misses, from then on, the connections that bring nothing for it
///   (their `Connected` / `Disconnected` pair, `Reconnecting`, `HeartbeatMissed`;
///   counted in [`Stats::events_elided`](crate::Stats::events_elided)): the grammar
///   holds, generation numbers have gaps.
///
/// ```
/// use wsbeat::{Event, Message};
///
/// fn handle(event: Event, resend: &mut Vec<Message>) -> bool {
///     match event {
///         Event::Message(m) => println!("got {m}"),
///         Event::Connected { generation, .. } => println!("connection {generation} open"),
///         Event::Disconnected { reason, .. } => println!("lost: {reason}"),
///         Event::Reconnecting { delay, .. } => println!("retrying in {delay:?}"),
///         Event::GaveUp(e) => println!("gave up: {e}"),
///         // Accepted by `send` but never written: keep them, log them, or send elsewhere.
///         Event::Undelivered(msgs) => resend.extend(msgs),
///         Event::Closed => return false, // the last event: stop reading
///         _ => {}
///     }
///     true
/// }
/// # let mut v = Vec::new();
/// # assert!(!handle(Event::Closed, &mut v));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A connection is open. `generation` starts at 1 and grows by one per connection.
    Connected {
        /// Connection number.
        generation: u64,
        /// Subprotocol the server selected, if any.
        protocol: Option<String>,
    },
    /// A text or binary message arrived (and, if enabled, pings and pongs).
    Message(Message),
    /// The connection `generation` ended.
    Disconnected {
        /// Connection number that ended.
        generation: u64,
        /// Why it ended.
        reason: DisconnectReason,
    },
    /// The client will try to connect again after `delay`.
    Reconnecting {
        /// Failures in a row since the last stable connection (1 = first retry); a
        /// connection shorter than [`ReconnectPolicy::min_uptime`](crate::ReconnectPolicy::min_uptime)
        /// does not start the count over.
        attempt: u32,
        /// Wait before the attempt.
        delay: Duration,
        /// Why the previous attempt or connection failed.
        last_error: Option<Error>,
    },
    /// The reconnect policy stopped trying; the client is now closed.
    GaveUp(Error),
    /// Messages accepted by `send` that will never be sent (again): dropped by
    /// `OverflowPolicy::DropOldest`; still queued when the client gave up, or closed from
    /// its own callback (where `close()` cannot return them); the chunk of a `send_all`
    /// whose iterator panicked; or the messages a `restart()` took over when its new
    /// client could not start. With acked delivery they are the unacknowledged ones,
    /// which may have been written and may have arrived without their ack
    /// (RELIABILITY.md 1 and 3c).
    Undelivered(Vec<Message>),
    /// At-most-once delivery: messages that were being written when connection
    /// `generation` died. They are not sent again; the peer may or may not have them.
    /// Emitted once, before that connection's `Disconnected`.
    Unconfirmed {
        /// Connection number that died.
        generation: u64,
        /// The messages, in the order they were sent.
        messages: Vec<Message>,
    },
    /// A heartbeat probe got no answer in time (sent before death when more than
    /// one miss is allowed).
    HeartbeatMissed {
        /// Connection number.
        generation: u64,
        /// Probes missed in a row.
        missed: u32,
    },
    /// The client is closed and every internal thread has ended (or is returning). Exactly
    /// once, always the last event.
    Closed,
}

/// Where the client is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Opening a connection.
    Connecting,
    /// Connected; sends go to the socket.
    Open,
    /// Waiting before the next attempt; sends are queued.
    Backoff,
    /// `close` was called; finishing the close handshake.
    Closing,
    /// Closed for good (by the user, or the policy gave up).
    Closed,
}
