//! What the client tells its user: events, disconnect reasons, connection state.

use std::fmt;
use std::time::Duration;

use crate::{Error, Message};

/// Something that happened on the client. Read them from [`Client::events`](crate::Client::events).
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
    /// A heartbeat probe got no answer in time (sent before death when more than
    /// one miss is allowed).
    HeartbeatMissed {
        /// Connection number.
        generation: u64,
        /// Probes missed in a row.
        missed: u32,
    },
    /// The client is closed and every internal thread has ended. Always the last event.
    Closed,
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
