//! The one error type of the crate.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::Message;

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
        /// Time since the last sign of life when death was declared, by the heartbeat's
        /// [`Liveness`](crate::Liveness) rule: any inbound traffic by default; under
        /// `Liveness::Data` (the default of app-level heartbeats) the peer's own pings do
        /// not count, and under `Liveness::Replies` only replies to our probes do (in
        /// passive mode, which sends no probes, all traffic).
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
                write!(f, "heartbeat timeout: no sign of life for {silent_for:?}")
            }
            DisconnectReason::WriteStalled => {
                f.write_str("write stalled: the peer stopped reading")
            }
            DisconnectReason::ClosedByUser => f.write_str("closed by user"),
            DisconnectReason::ReconnectRequested => f.write_str("reconnect requested"),
        }
    }
}

/// Which step of opening a connection ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectStage {
    /// Resolving the host name.
    Dns,
    /// The TCP connect (every resolved address was tried).
    Tcp,
    /// The exchange with a proxy: HTTP CONNECT or the SOCKS5 handshake.
    Proxy,
    /// The TLS handshake.
    Tls,
    /// The HTTP upgrade request and response.
    Upgrade,
}

impl fmt::Display for ConnectStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectStage::Dns => "DNS resolution",
            ConnectStage::Tcp => "TCP connect",
            ConnectStage::Proxy => "proxy handshake (HTTP CONNECT or SOCKS)",
            ConnectStage::Tls => "TLS handshake",
            ConnectStage::Upgrade => "WebSocket upgrade",
        })
    }
}

/// What kind of TLS failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// A certificate was rejected: the server's (unknown issuer, wrong host name,
    /// expired), or ours by the server (a client certificate it does not trust), or a
    /// certificate, key or identity that cannot be used. Retrying will not help; fix
    /// the CA configuration, the URL or the identity.
    Certificate,
    /// Any other TLS failure (protocol mismatch, the peer hung up mid-handshake, ...).
    Other,
}

/// Why a SOCKS proxy did not open the tunnel ([`Error::Socks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocksFailure {
    /// The proxy answered `CONNECT` with this reply code. SOCKS5 (RFC 1928 6):
    /// 1 general failure, 2 not allowed by its rules, 3 network unreachable, 4 host
    /// unreachable, 5 connection refused, 6 TTL expired, 7 command not supported,
    /// 8 address type not supported; Tor's extended errors 0xF0-0xF7 (onion services).
    /// SOCKS4: 91 rejected or failed, 92 and 93 identd failures.
    Reply(u8),
    /// The proxy requires a user name and password and the proxy URL has none
    /// (`socks5h://user:password@host:port`).
    AuthRequired,
    /// The proxy rejected the user name or password (RFC 1929).
    AuthRejected,
}

impl fmt::Display for SocksFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocksFailure::Reply(code) => {
                let what = match code {
                    1 => "general failure",
                    2 => "connection not allowed by the proxy's rules",
                    3 => "network unreachable",
                    4 => "host unreachable",
                    5 => "connection refused by the destination",
                    6 => "TTL expired",
                    7 => "command not supported",
                    8 => {
                        "address type not supported (try socks5h:// to let the proxy resolve names)"
                    }
                    91 => {
                        "SOCKS4 request rejected or failed (a proxy without SOCKS4a rejects \
                         host names: use socks4:// or socks5h://)"
                    }
                    92 | 93 => {
                        "SOCKS4 request rejected: the proxy could not check the user id with identd"
                    }
                    // Tor's extended errors (its SocksPort flag `ExtendedErrors`).
                    0xF0 => "Tor: onion service descriptor not found",
                    0xF1 => "Tor: onion service descriptor invalid",
                    0xF2 => "Tor: onion service introduction failed",
                    0xF3 => "Tor: onion service rendezvous failed",
                    0xF4 => "Tor: onion service client authorization missing",
                    0xF5 => "Tor: onion service client authorization wrong",
                    0xF6 => "Tor: invalid onion service address",
                    0xF7 => "Tor: onion service introduction timed out",
                    _ => "unknown reply code (retried)",
                };
                write!(f, "reply code {code}: {what}")
            }
            SocksFailure::AuthRequired => {
                f.write_str("the proxy requires authentication: put user:password in the proxy URL")
            }
            SocksFailure::AuthRejected => {
                f.write_str("the proxy rejected the user name or password")
            }
        }
    }
}

/// Why a redirect of the upgrade request was not followed ([`Error::Redirect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedirectRefusal {
    /// The redirect points back to a URL already visited in this attempt.
    Loop,
    /// More redirects than [`ClientBuilder::max_redirects`](crate::ClientBuilder::max_redirects).
    TooMany(usize),
    /// From `wss://` to `ws://` (or `http://`): never followed, it would drop TLS.
    Downgrade,
    /// The `Location` is missing, unparsable, or not a ws/wss/http/https URL.
    BadLocation,
}

impl fmt::Display for RedirectRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedirectRefusal::Loop => f.write_str("redirect loop"),
            RedirectRefusal::TooMany(n) => {
                write!(f, "more than {n} redirects (raise max_redirects)")
            }
            RedirectRefusal::Downgrade => f.write_str("refusing a redirect from wss to ws"),
            RedirectRefusal::BadLocation => f.write_str("unusable Location header"),
        }
    }
}

/// Every error wsbeat returns.
///
/// Errors that refuse a message (`QueueFull`, `Offline`, `Closed`, `WouldBlock`,
/// `MessageTooLarge`, `NotSendable`, `DuplicateId`) carry it so nothing is lost: take it
/// back with [`Error::into_message`].
///
/// ```
/// let err = wsbeat::Client::builder("http://example.com").connect().unwrap_err();
/// assert!(matches!(err, wsbeat::Error::InvalidUrl { .. }));
/// assert!(err.to_string().contains("ws://"));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL (of the server, or of a proxy) could not be parsed or is not one wsbeat
    /// can use; `reason` says which and what was expected.
    #[error("invalid URL: {reason}")]
    InvalidUrl {
        /// Why it was rejected.
        reason: String,
    },
    /// A header name or value given to the builder is not valid HTTP.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name as given.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The host name could not be resolved. Check the spelling and the DNS setup.
    #[error("could not resolve host {host:?}: {message}")]
    Dns {
        /// The host that failed to resolve.
        host: String,
        /// The resolver's message.
        message: String,
    },
    /// The server refused the TCP connection: nothing listens on that port.
    #[error("connection refused by {addr}: is the server running?")]
    Refused {
        /// The last address tried.
        addr: String,
    },
    /// A step of connecting took longer than the connect timeout.
    #[error(
        "timed out during {stage} after {elapsed:?}; raise connect_timeout or check the network"
    )]
    Timeout {
        /// The step that ran out of time.
        stage: ConnectStage,
        /// Time spent in the whole connect when it gave up.
        elapsed: Duration,
    },
    /// The TLS handshake failed (or the server sent a TLS alert during the upgrade).
    #[error("TLS error ({kind:?}): {message}{}", tls_hint(*.kind))]
    Tls {
        /// Certificate problem or other failure.
        kind: TlsErrorKind,
        /// The TLS library's message.
        message: String,
    },
    /// A `wss://` URL, but wsbeat was built without a TLS backend: enable its
    /// `native-tls` or `rustls` feature. Returned by `connect()` / `connect_lazy()` (and for a request
    /// factory's `wss://` request), never a panic.
    #[error(
        "wss:// needs TLS, but wsbeat was built without a TLS backend: enable its `native-tls` or `rustls` feature"
    )]
    NoTls,
    /// The server answered the upgrade request with a non-101 HTTP status
    /// (401/403: check credentials; 404: check the path; 429/503: come back later).
    #[error("server rejected the WebSocket upgrade with HTTP {status}{}", body_hint(.body))]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The `Retry-After` delay, when the server sent one (in seconds or as an
        /// HTTP date, counted from now).
        retry_after: Option<Duration>,
        /// The start of the response body, if any (at most 512 bytes, lossy UTF-8).
        body: Option<String>,
    },
    /// An HTTP proxy refused the CONNECT request.
    #[error("HTTP proxy answered CONNECT with {status}{}", proxy_hint(*.status))]
    Proxy {
        /// The proxy's HTTP status code.
        status: u16,
    },
    /// A proxy's answer could not be read: not HTTP from an `http://` proxy, not SOCKS
    /// from a `socks*://` one, or too large. Often a proxy URL whose scheme does not
    /// match the proxy. Retried, as the proxy may be restarting.
    #[error("proxy handshake failed: {0} (check that the proxy URL's scheme matches the proxy)")]
    ProxyProtocol(String),
    /// A SOCKS proxy refused to open the tunnel.
    #[error("SOCKS proxy: {0}")]
    Socks(SocksFailure),
    /// The proxy URL (from the builder or the environment) has a scheme wsbeat does not
    /// speak. wsbeat never falls back to a direct connection.
    #[error(
        "unsupported proxy scheme {scheme:?}: use http://, socks5://, socks5h://, socks4:// or socks4a:// (or no_proxy())"
    )]
    UnsupportedProxy {
        /// The scheme of the proxy URL.
        scheme: String,
    },
    /// The server redirected the upgrade request and the redirect was not followed.
    #[error("redirect not followed: {reason} (Location: {location})")]
    Redirect {
        /// Why it was refused.
        reason: RedirectRefusal,
        /// The redirect target, credentials and query removed.
        location: String,
    },
    /// The server accepted the upgrade with an extension that was not offered
    /// (RFC 6455 4.1): the frames it sends could not be read.
    #[error("the server enabled the WebSocket extension {name:?}, which was not offered")]
    UnexpectedExtension {
        /// The extension's name as the server sent it.
        name: String,
    },
    /// The server's subprotocol answer does not fit the request (RFC 6455 4.1): it chose
    /// one that was not asked for (`chosen: Some`), or none of those asked for
    /// (`chosen: None`; ask for one it speaks, or for none).
    #[error("{}", subprotocol_mismatch(.chosen.as_deref()))]
    UnexpectedSubprotocol {
        /// The subprotocol the server chose, as it sent it (`<redacted>` if it may be a
        /// credential, see [`ClientBuilder::subprotocol`](crate::ClientBuilder::subprotocol)).
        chosen: Option<String>,
    },
    /// The peer broke the WebSocket protocol, or a size limit was exceeded.
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    /// `send` (or `try_send`, `send_all`, an `on_connect` hook's `Session::send`) was
    /// given what cannot go out as a message: a close frame (use `Client::close()`) or a
    /// raw `Message::Frame`. The message is handed back.
    #[error("this cannot be sent as a message: {reason}")]
    NotSendable {
        /// What was refused and what to do instead.
        reason: &'static str,
        /// The message, handed back.
        message: Message,
    },
    /// A network I/O error. The underlying `io::Error` is its
    /// [`source`](std::error::Error::source).
    #[error("I/O error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The client is closed (or gave up); the message is handed back.
    #[error("the client is closed")]
    Closed {
        /// The message that was not sent, if the call carried one.
        message: Option<Message>,
    },
    /// The offline queue, or the outbox of acked delivery, is full
    /// (`OverflowPolicy::Reject` or a timed-out `Block`); or as many messages as the
    /// queue holds, handed back in `Undelivered` / `Unconfirmed` events, wait unread
    /// (read the events to make room). The message is handed back.
    #[error(
        "no room: the offline queue is full (Limits::queue_messages / queue_bytes), or \
         acked delivery's outbox holds Acks::max_messages messages (or Acks::max_bytes) \
         waiting for their ack, \
         or as many handed-back messages wait unread in the event stream (read them); \
         message handed back"
    )]
    QueueFull {
        /// The message that was not queued.
        message: Message,
    },
    /// Acked delivery: a message with the same id (`Acks` `id_of`) still waits for its
    /// ack. Ids must be unique among the unacked messages; the message is handed back.
    #[error(
        "message id {id} is still waiting for its ack (Acks ids must be unique among the \
         unacked messages); message handed back"
    )]
    DuplicateId {
        /// The id both messages have.
        id: u64,
        /// The message that was not sent.
        message: Message,
    },
    /// No connection is open and the offline queue is off
    /// ([`ClientBuilder::offline_queue`](crate::ClientBuilder::offline_queue)); the
    /// message is handed back. Retry after `Event::Connected`, or drop it.
    #[error("not connected (offline queue off); message handed back")]
    Offline {
        /// The message that was not sent.
        message: Message,
    },
    /// `try_send` could not send without waiting; or a blocking send found the
    /// connection's buffer full for the write timeout while the peer waits for your
    /// consumer (see [`ClientBuilder::write_timeout`](crate::ClientBuilder::write_timeout)).
    /// The message is handed back.
    #[error("sending would block; message handed back")]
    WouldBlock {
        /// The message that was not sent.
        message: Message,
    },
    /// A message is larger than the configured maximum message size, or a ping or pong
    /// payload is larger than the 125 bytes the protocol allows (RFC 6455 5.5).
    #[error("message of {size} bytes exceeds the limit of {limit} bytes{}", control_hint(.message))]
    MessageTooLarge {
        /// The message size.
        size: usize,
        /// The configured limit.
        limit: usize,
        /// The message, handed back.
        message: Message,
    },
    /// An open connection ended (the reason a reconnect policy is told about).
    #[error("connection lost: {0}")]
    ConnectionLost(DisconnectReason),
    /// `wait_connected` ran out of time.
    #[error("not connected within {0:?}")]
    NotConnected(Duration),
    /// The client stopped trying to connect: the reconnect policy gave up (fatal error,
    /// attempt or time limit), or automatic reconnection is off and the connection (or the
    /// one attempt) ended. This is what [`Event::GaveUp`](crate::Event::GaveUp) carries,
    /// always; the cause is `last`.
    #[error("gave up after {attempts} failures in a row; last error: {last}")]
    GaveUp {
        /// Failures in a row (failed attempts and lost connections) when it gave up.
        attempts: u32,
        /// The last failure: why the last attempt failed or the last connection ended.
        last: Box<Error>,
    },
    /// A setting given to the builder cannot work (for example a zero heartbeat
    /// interval). Reported by `connect()` / `connect_lazy()`.
    #[error("invalid setting {setting}: {reason}")]
    InvalidConfig {
        /// The builder method or value at fault, e.g. `"Heartbeat::ping interval"`.
        setting: &'static str,
        /// What is wrong and what to use instead.
        reason: String,
    },
    /// Code given to wsbeat panicked: a reconnect policy, request factory, `on_connect`
    /// hook or heartbeat reply matcher (`origin` says which; `"wsbeat"` means a bug in
    /// wsbeat itself, please report it). The client does not die silently: a panic in the
    /// factory or hook fails that attempt with this error, which is fatal (the default
    /// policy gives up, see [`Error::is_fatal`]); a panic in the policy, or anywhere else
    /// on the supervisor thread, closes the client (`GaveUp`, `Undelivered`, `Closed`).
    #[error("{origin} panicked: {message}")]
    Panicked {
        /// Which callback panicked.
        origin: &'static str,
        /// The panic message.
        message: String,
    },
}

fn subprotocol_mismatch(chosen: Option<&str>) -> String {
    match chosen {
        Some(p) => format!("the server chose the subprotocol {p:?}, which was not asked for"),
        None => "the server accepted none of the subprotocols asked for".into(),
    }
}

fn control_hint(message: &Message) -> &'static str {
    match message {
        Message::Ping(_) | Message::Pong(_) => {
            " (a ping or pong carries at most 125 bytes, RFC 6455 5.5)"
        }
        _ => "",
    }
}

fn body_hint(body: &Option<String>) -> String {
    // One line: an HTML error page is reduced to its <title>.
    let Some(b) = body else {
        return String::new();
    };
    let text = match (b.find("<title>"), b.find("</title>")) {
        (Some(s), Some(e)) if s + 7 <= e => &b[s + 7..e],
        _ => b.as_str(),
    };
    let text: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

impl Error {
    /// `Dns` for `host`, shown at most as long as a DNS name may be (253 bytes): a host
    /// from a hostile `Location` header can be 60 KB, which would end up whole in every
    /// log line and error message.
    pub(crate) fn dns(host: &str, message: impl Into<String>) -> Error {
        Error::Dns {
            host: shortened(host, 253),
            message: message.into(),
        }
    }

    /// `Redirect` to `location` (credentials already taken out), shown at most 512 bytes
    /// long: a hostile server's `Location` can be 60 KB, and the error goes into every
    /// `Reconnecting` event and log line.
    pub(crate) fn redirect(reason: RedirectRefusal, location: &str) -> Error {
        Error::Redirect {
            reason,
            location: shortened(location, 512),
        }
    }

    /// Takes back the message carried by `QueueFull`, `Offline`, `Closed`, `WouldBlock`,
    /// `MessageTooLarge`, `NotSendable` or `DuplicateId`.
    pub fn into_message(self) -> Option<Message> {
        match self {
            Error::QueueFull { message }
            | Error::Offline { message }
            | Error::WouldBlock { message }
            | Error::DuplicateId { message, .. }
            | Error::NotSendable { message, .. }
            | Error::MessageTooLarge { message, .. } => Some(message),
            Error::Closed { message } => message,
            _ => None,
        }
    }

    /// True when retrying the same request cannot succeed: authentication and
    /// not-found rejections (HTTP 400/401/403/404), a server that wants another protocol
    /// (426 Upgrade Required), a redirect that is not followed, an extension that was not
    /// offered, a subprotocol answer that does not fit the request, certificate errors, bad URLs, headers or settings; from a proxy: refused
    /// credentials or destination (HTTP 401/403/407; SOCKS rules, authentication,
    /// unsupported command or address type, Tor's bad address or authorization) and a
    /// proxy scheme wsbeat does not speak; a message that can never be sent (too large,
    /// or a close frame: from an `on_connect` hook, the same send fails on every attempt).
    /// The default reconnect policy gives up on these.
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::InvalidUrl { .. } | Error::InvalidHeader { .. } | Error::NoTls => true,
            // A 3xx reaches the policy only when it was not followed (following is off).
            Error::Http { status, .. } => {
                matches!(status, 300..=399 | 400 | 401 | 403 | 404 | 426)
            }
            // Fatal: the proxy's rules, what it cannot do, credentials, and Tor's verdicts
            // on the onion address or the client's authorization. Everything else (the
            // network behind the proxy, SOCKS4's 91, which means "rejected or failed"
            // alike, Tor's failed circuits, unknown codes) is retried.
            Error::Socks(f) => matches!(
                f,
                SocksFailure::AuthRequired
                    | SocksFailure::AuthRejected
                    | SocksFailure::Reply(2 | 7 | 8 | 92 | 93 | 0xF1 | 0xF4 | 0xF5 | 0xF6)
            ),
            Error::UnsupportedProxy { .. }
            | Error::Redirect { .. }
            | Error::UnexpectedExtension { .. }
            | Error::UnexpectedSubprotocol { .. } => true,
            Error::Tls { kind, .. } => *kind == TlsErrorKind::Certificate,
            // Wrong or missing proxy credentials (tinyproxy answers 401, others 407),
            // or a destination the proxy forbids.
            Error::Proxy { status } => matches!(status, 401 | 403 | 407),
            Error::GaveUp { .. } | Error::InvalidConfig { .. } | Error::Panicked { .. } => true,
            // From an `on_connect` hook that passes on a refused send with `?`: the same
            // message is refused again on every attempt.
            Error::NotSendable { .. } | Error::MessageTooLarge { .. } => true,
            _ => false,
        }
    }

    /// Runs user code (or any code that must not take a thread down); a panic becomes
    /// [`Error::Panicked`].
    pub(crate) fn catch<R>(origin: &'static str, f: impl FnOnce() -> R) -> Result<R> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
            let e = Error::panicked(origin, p.as_ref());
            log::error!("{e}");
            e
        })
    }

    /// [`Error::Panicked`] from a panic payload.
    pub(crate) fn panicked(origin: &'static str, payload: &(dyn std::any::Any + Send)) -> Error {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Error::Panicked { origin, message }
    }

    pub(crate) fn io(e: io::Error) -> Error {
        Error::Io(Arc::new(e))
    }

    /// A thread that could not be started (out of threads, memory or address space):
    /// [`Error::Io`] of the same kind, saying which thread.
    pub(crate) fn spawn(thread: &str, e: io::Error) -> Error {
        Error::io(spawn_failure(thread, e))
    }

    pub(crate) fn from_ws(e: tungstenite::Error) -> Error {
        use tungstenite::Error as W;
        match e {
            W::Io(e) => Error::io(e),
            W::Http(resp) => {
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| retry_after(s, std::time::SystemTime::now()));
                let body = resp.body().as_ref().map(|b| {
                    let end = b.len().min(512);
                    String::from_utf8_lossy(&b[..end]).into_owned()
                });
                Error::Http {
                    status: resp.status().as_u16(),
                    retry_after,
                    body,
                }
            }
            W::Url(u) => Error::InvalidUrl {
                reason: format!("{u} ({})", crate::config::URL_HINT),
            },
            W::ConnectionClosed | W::AlreadyClosed => Error::Closed { message: None },
            W::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete) => {
                Error::io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the WebSocket upgrade",
                ))
            }
            // Its own text, without tungstenite's "WebSocket protocol error: " (ours says it).
            W::Protocol(p) => Error::Protocol(p.to_string()),
            other => Error::Protocol(other.to_string()),
        }
    }
}

/// `Retry-After` in either form (RFC 9110 10.2.3): delay-seconds or an HTTP date, the
/// latter counted from `now` (a date in the past is no delay).
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::io(e)
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `text` up to `max` bytes (cut at a character boundary), with its length when cut.
/// The error of a thread that could not be started, saying which thread.
pub(crate) fn spawn_failure(thread: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("could not start the {thread} thread: {e}"),
    )
}

/// What to do about a certificate error, for [`Error::Tls`]'s message.
fn tls_hint(kind: TlsErrorKind) -> &'static str {
    match kind {
        TlsErrorKind::Certificate => {
            " (not retried: check the URL's host name, trust a private CA with \
             add_root_certificate, or fix the client identity)"
        }
        TlsErrorKind::Other => "",
    }
}

/// What to do about an HTTP proxy's refusal of CONNECT, for [`Error::Proxy`]'s message.
fn proxy_hint(status: u16) -> &'static str {
    match status {
        401 | 407 => {
            ": the proxy requires authentication (put user:password in the proxy URL, or \
             check them)"
        }
        403 => ": the proxy forbids this destination",
        _ => "",
    }
}

pub(crate) fn shortened(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}... ({} bytes)", &text[..cut], text.len())
}
#[cfg(test)]
mod tests {
    #[test]
    fn a_dns_error_shows_at_most_a_dns_name_of_the_host() {
        let long = format!("{}.example", "é".repeat(40_000));
        let e = Error::dns(&long, "no addresses");
        let shown = e.to_string();
        assert!(shown.len() < 400, "{} bytes", shown.len());
        assert!(shown.contains("(80008 bytes)"), "{shown}");
        let e = Error::dns("example.com", "no addresses");
        assert!(matches!(e, Error::Dns { host, .. } if host == "example.com"));
    }

    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// tungstenite's protocol errors already start with "WebSocket protocol error: ";
    /// ours and the disconnect reason say it once, not twice.
    #[test]
    fn protocol_errors_say_what_they_are_once() {
        use tungstenite::error::{ProtocolError, SubProtocolError};
        let e = || {
            tungstenite::Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(
                SubProtocolError::NoSubProtocol,
            ))
        };
        let shown = Error::from_ws(e()).to_string();
        assert_eq!(shown.matches("protocol error").count(), 1, "{shown}");
        assert!(shown.contains("Server sent no subprotocol"), "{shown}");
        let reason = crate::transport::stream::reason_of(&e()).to_string();
        assert_eq!(reason.matches("protocol error").count(), 1, "{reason}");
    }

    #[test]
    fn which_http_rejections_are_fatal() {
        let http = |status| Error::Http {
            status,
            retry_after: None,
            body: None,
        };
        // 426 Upgrade Required: the server wants another protocol; asking again the same
        // way cannot succeed (connect probe of 2026-12-01: retried for good, before).
        for status in [400, 401, 403, 404, 426] {
            assert!(http(status).is_fatal(), "{status}");
        }
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(!http(status).is_fatal(), "{status}");
        }
    }

    #[test]
    fn which_socks_failures_are_fatal() {
        use super::SocksFailure::*;
        // The proxy's rules, what it cannot do, credentials, Tor's verdicts on the
        // address or the authorization: asking again cannot succeed.
        for f in [AuthRequired, AuthRejected] {
            assert!(Error::Socks(f).is_fatal(), "{f:?}");
        }
        for code in [2, 7, 8, 92, 93, 0xF1, 0xF4, 0xF5, 0xF6] {
            assert!(Error::Socks(Reply(code)).is_fatal(), "{code}");
        }
        // The network behind the proxy, Tor circuits (with its ExtendedErrors flag), and
        // codes nobody knows yet (before: unknown codes were fatal, so a Tor client gave
        // up on its first failed rendezvous).
        for code in [1, 3, 4, 5, 6, 91, 0xF0, 0xF2, 0xF3, 0xF7, 9, 0x7F, 0xFF] {
            assert!(!Error::Socks(Reply(code)).is_fatal(), "{code}");
        }
        let tor = Error::Socks(Reply(0xF3)).to_string();
        assert!(tor.contains("rendezvous"), "{tor}");
    }

    #[test]
    fn no_room_names_every_bound_it_may_be() {
        // Docs review: with acked delivery's outbox full, the message spoke only of the
        // offline queue, which was empty.
        let e = Error::QueueFull {
            message: Message::text("x"),
        }
        .to_string();
        for bound in [
            "Limits::queue_messages",
            "Acks::max_messages",
            "Acks::max_bytes",
            "read them",
        ] {
            assert!(e.contains(bound), "{e}");
        }
    }

    #[test]
    fn an_http_proxys_refusal_says_what_to_do() {
        let auth = Error::Proxy { status: 407 }.to_string();
        assert!(
            auth.contains("put user:password in the proxy URL"),
            "{auth}"
        );
        let forbidden = Error::Proxy { status: 403 }.to_string();
        assert!(
            forbidden.contains("forbids this destination"),
            "{forbidden}"
        );
        let other = Error::Proxy { status: 502 }.to_string();
        assert_eq!(other, "HTTP proxy answered CONNECT with 502");
    }

    #[test]
    fn retry_after_both_forms() {
        // Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example) is 784111777.
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777 - 90);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(90))
        );
        let later = UNIX_EPOCH + Duration::from_secs(784_111_777 + 5);
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", SystemTime::now()), None);
        assert_eq!(retry_after("-3", SystemTime::now()), None);
    }
}
