//! What the client tells its user: events, disconnect reasons, connection state, and
//! the one place that keeps the event stream in its grammar ([`EventSink`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::inbound::{EventTx, Inbound};
use crate::{Error, Message};

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
    /// Messages accepted by `send` that will never be sent (dropped by
    /// `OverflowPolicy::DropOldest`, or still queued when the client closed or gave up).
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

/// The sending end of a client's event stream. Every event goes through
/// [`EventSink::emit`], which keeps the stream in the grammar documented on [`Event`]:
/// nothing after `Closed`, `Closed` once, `GaveUp` once, no `Reconnecting` once closing
/// began. Its lock is a leaf: held only around an unbounded channel send.
pub(crate) struct EventSink {
    tx: EventTx,
    grammar: Mutex<Grammar>,
    /// Signalled when `Closed` is emitted.
    closed: Condvar,
}

#[derive(Default)]
struct Grammar {
    /// `close` has begun: no more `Reconnecting`.
    closing: bool,
    gave_up: bool,
    closed: bool,
}

impl Grammar {
    /// Whether `ev` may go out now; records it.
    fn admit(&mut self, ev: &Event) -> bool {
        if self.closed {
            return false;
        }
        match ev {
            Event::Reconnecting { .. } => !self.closing && !self.gave_up,
            Event::GaveUp(_) => !std::mem::replace(&mut self.gave_up, true),
            Event::Closed => {
                self.closed = true;
                true
            }
            _ => true,
        }
    }
}

impl EventSink {
    pub(crate) fn new(tx: EventTx) -> Self {
        EventSink {
            tx,
            grammar: Mutex::new(Grammar::default()),
            closed: Condvar::new(),
        }
    }

    /// Sends `ev` unless the grammar forbids it now. Never blocks (unbounded channel), so
    /// it may be called with the link lock held.
    pub(crate) fn emit(&self, ev: Event) {
        let mut g = self.grammar.lock();
        if !g.admit(&ev) {
            log::debug!("event dropped by the grammar: {ev:?}");
            return;
        }
        let closed = matches!(ev, Event::Closed);
        // Fails only when every receiver is gone: nobody to tell.
        let _ = self.tx.send(ev);
        if closed {
            self.closed.notify_all();
        }
    }

    /// Sends the messages of one reader drain as one batch (see `inbound.rs`), unless
    /// `Closed` was emitted (never the case while a reader runs: it is joined first).
    pub(crate) fn emit_messages(&self, events: &mut VecDeque<Event>, msgs: usize, bytes: usize) {
        let g = self.grammar.lock();
        if g.closed {
            log::debug!(
                "{} events dropped by the grammar: after Closed",
                events.len()
            );
            events.clear();
            return;
        }
        self.tx.send_messages(events, msgs, bytes);
    }

    /// The bound on inbound messages and the reader's hold on it.
    pub(crate) fn inbound(&self) -> &Arc<Inbound> {
        self.tx.inbound()
    }

    /// `close` has begun: `Reconnecting` would be a lie from now on.
    pub(crate) fn begin_close(&self) {
        self.grammar.lock().closing = true;
    }

    /// Waits until `Closed` was emitted (by the closer that joins the supervisor, or by
    /// the supervisor itself). Bounded because that closer's join is.
    pub(crate) fn wait_closed(&self) {
        let mut g = self.grammar.lock();
        while !g.closed {
            self.closed.wait(&mut g);
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The peer sent a close frame.
    ClosedByPeer {
        /// Close code (1000 = normal, 1001 = going away, 1012 = restart, 1013 = try later).
        code: u16,
        /// Close reason text.
        reason: String,
    },
    /// The peer closed TCP without a close frame (FIN or RST).
    Reset,
    /// The peer broke the protocol, or a size limit was exceeded.
    Protocol(String),
    /// A network I/O error.
    Io(String),
    /// No heartbeat reply or inbound traffic in time: the link is dead or half-open.
    HeartbeatTimeout {
        /// Time since the last inbound traffic when death was declared.
        silent_for: Duration,
    },
    /// Outgoing data did not drain within the write timeout: the peer stopped reading.
    WriteStalled,
    /// [`Client::close`](crate::Client::close) or drop of the last handle.
    ClosedByUser,
    /// [`Client::reconnect_now`](crate::Client::reconnect_now) on an open connection.
    ReconnectRequested,
}

impl DisconnectReason {
    /// From the peer's close frame (1005 "no status" when it had none).
    pub(crate) fn closed_by_peer(frame: Option<crate::CloseFrame>) -> Self {
        let (code, reason) = frame.map_or((1005, String::new()), |f| {
            (u16::from(f.code), f.reason.to_string())
        });
        DisconnectReason::ClosedByPeer { code, reason }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ClosedByPeer { code, reason } => {
                write!(f, "closed by peer with code {code}")?;
                if !reason.is_empty() {
                    write!(f, " ({reason})")?;
                }
                Ok(())
            }
            DisconnectReason::Reset => f.write_str("connection reset by peer"),
            DisconnectReason::Protocol(m) => write!(f, "protocol error: {m}"),
            DisconnectReason::Io(m) => write!(f, "I/O error: {m}"),
            DisconnectReason::HeartbeatTimeout { silent_for } => {
                write!(f, "heartbeat timeout: nothing received for {silent_for:?}")
            }
            DisconnectReason::WriteStalled => {
                f.write_str("write stalled: the peer stopped reading")
            }
            DisconnectReason::ClosedByUser => f.write_str("closed by user"),
            DisconnectReason::ReconnectRequested => f.write_str("reconnect requested"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_keeps_the_grammar() {
        let inbound = Arc::new(Inbound::new(10, 10, Duration::from_secs(1)));
        let (tx, rx) = EventTx::new(inbound.clone());
        let sink = EventSink::new(tx);
        let reconnecting = || Event::Reconnecting {
            attempt: 1,
            delay: Duration::ZERO,
            last_error: None,
        };
        sink.emit(reconnecting());
        sink.begin_close();
        sink.emit(reconnecting()); // dropped: closing
        sink.emit(Event::GaveUp(Error::Closed { message: None }));
        sink.emit(Event::GaveUp(Error::Closed { message: None })); // dropped: twice
        sink.emit(Event::Undelivered(vec![]));
        sink.emit(Event::Closed);
        sink.emit(Event::Closed); // dropped: once
        sink.emit(Event::Undelivered(vec![])); // dropped: after Closed
        sink.wait_closed();
        let kinds: Vec<_> = crate::inbound::Events::new(rx, inbound)
            .try_iter()
            .map(|e| {
                format!("{e:?}")
                    .split([' ', '('])
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(kinds, ["Reconnecting", "GaveUp", "Undelivered", "Closed"]);
    }
}
