//! The fresh connection handed to the user's `on_connect` hook, and the user's
//! connection callbacks.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Attempt, Request};
use crate::queue::check_outgoing;
use crate::time::deadline_in;
use crate::transport::stream::{READ_QUOTA, Ws, is_would_block};
use crate::transport::sys::{wait_readable, wait_writable};
use crate::{DisconnectReason, Error, Message, Result};

/// Builds the request of each attempt (`ClientBuilder::request_factory`).
pub(crate) type RequestFactory = Arc<dyn Fn(&Attempt<'_>) -> Result<Request> + Send + Sync>;
/// Runs on each fresh connection before it is published (`ClientBuilder::on_connect`).
pub(crate) type ConnectHook = Arc<dyn Fn(&mut Session<'_>) -> Result<()> + Send + Sync>;

/// The user's connection callbacks: kept beside the settings, because they name
/// transport types ([`Session`]) the settings layer cannot see.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub factory: Option<RequestFactory>,
    pub on_connect: Option<ConnectHook>,
}

/// The connection handed to an [`on_connect`](crate::ClientBuilder::on_connect) hook,
/// before any other thread can use it: authenticate, subscribe, wait for an answer.
///
/// ```no_run
/// use std::time::Duration;
/// use wsbeat::{Client, Message};
///
/// let client = Client::builder("wss://example.com/feed")
///     .on_connect(|s| {
///         s.send(Message::text(r#"{"op":"auth","token":"..."}"#))?;
///         let ack = s.read(Duration::from_secs(5))?; // e.g. {"op":"auth-ok"}
///         s.send(Message::text(r#"{"op":"subscribe","topic":"trades"}"#))?;
///         let _ = ack;
///         Ok(())
///     })
///     .connect()?;
/// # Ok::<(), wsbeat::Error>(())
/// ```
pub struct Session<'a> {
    pub(crate) ws: &'a mut Ws,
    pub(crate) generation: u64,
    pub(crate) protocol: Option<&'a str>,
    pub(crate) write_timeout: Duration,
    pub(crate) max_message_size: usize,
}

impl Session<'_> {
    /// The generation this connection will have.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The subprotocol the server selected.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol
    }

    /// Sends a message and waits (up to the write timeout) until it reached the OS.
    ///
    /// Refused like [`Client::send`](crate::Client::send) refuses them: a message over
    /// the size limit, a ping or pong over 125 bytes, a raw `Message::Frame`, and a close
    /// frame (return an error from the hook to end the attempt instead).
    pub fn send(&mut self, msg: Message) -> Result<()> {
        if let Message::Close(_) = msg {
            return Err(Error::NotSendable {
                reason: "a close frame in on_connect: return an error from the hook to end \
                         this attempt instead",
                message: msg,
            });
        }
        let msg = check_outgoing(msg, self.max_message_size)?;
        let deadline = deadline_in(self.write_timeout);
        let mut r = self.ws.write(msg);
        loop {
            match r {
                Ok(()) => match self.ws.flush() {
                    Ok(()) => return Ok(()),
                    Err(e) if is_would_block(&e) => {}
                    Err(e) => return Err(Error::from_ws(e)),
                },
                Err(e) if is_would_block(&e) => {}
                Err(e) => return Err(Error::from_ws(e)),
            }
            self.wait(deadline, true, "on_connect send: write timeout")?;
            r = Ok(());
        }
    }

    /// Waits up to `timeout` for the next text or binary message (pings are answered).
    /// The timeout holds whatever the server sends meanwhile: pings, pongs, or a message
    /// that never completes.
    pub fn read(&mut self, timeout: Duration) -> Result<Message> {
        let deadline = deadline_in(timeout);
        const TOO_LATE: &str = "on_connect read: no message in time";
        loop {
            // Past the quota the read reports WouldBlock, so the deadline is looked at
            // even while a peer sends fragments of a message that never ends.
            self.ws.get_mut().set_read_quota(Some(READ_QUOTA));
            let r = self.ws.read();
            self.ws.get_mut().set_read_quota(None);
            match r {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => return Ok(m),
                Ok(Message::Close(f)) => {
                    return Err(Error::ConnectionLost(DisconnectReason::closed_by_peer(f)));
                }
                // Pings (answered), pongs: a server sending nothing else must not keep
                // us past the deadline.
                Ok(_) if Instant::now() >= deadline => return Err(timed_out(TOO_LATE)),
                Ok(_) => {}
                Err(e) if is_would_block(&e) => self.wait(deadline, false, TOO_LATE)?,
                Err(e) => return Err(Error::from_ws(e)),
            }
        }
    }

    /// Waits until the socket is writable (or readable), bounded by `deadline`; past it,
    /// a `TimedOut` error saying `what` timed out.
    fn wait(&self, deadline: Instant, writable: bool, what: &'static str) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(what));
        }
        let sock = self.ws.get_ref().tcp();
        if writable {
            wait_writable(sock, left);
        } else {
            wait_readable(sock, left);
        }
        Ok(())
    }
}

/// A `TimedOut` error saying `what` timed out.
fn timed_out(what: &'static str) -> Error {
    Error::io(io::Error::new(io::ErrorKind::TimedOut, what))
}
