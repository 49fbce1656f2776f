//! Every setting of a client and its defaults ([`ClientBuilder`](crate::ClientBuilder) sets them).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::backoff::ReconnectPolicy;
use crate::heartbeat::Heartbeat;
use crate::outbox::Delivery;
use crate::redact::{RedactedUrl, is_secret_header, shown_subprotocol};
pub(crate) use crate::tls_config::TlsSettings;
use crate::{Error, Result};

/// Default connect timeout: DNS + TCP + proxy + TLS + upgrade together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default write timeout: a send that cannot drain for this long declares the link stalled.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bounded wait for the peer's close reply.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest [`ClientBuilder::close_timeout`](crate::ClientBuilder::close_timeout): `close()` ends within it (plus thread
/// joins) even when the peer never answers.
pub const MAX_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection request: URL, extra headers and subprotocols.
///
/// ```
/// let req = wsbeat::Request::new("wss://user:pw@example.com/feed?token=s3cret")?
///     .header("Authorization", "Bearer abc")
///     .subprotocol("v1.json");
/// // Credentials never show in Debug output or logs.
/// let shown = format!("{req:?}");
/// assert!(!shown.contains("s3cret") && !shown.contains("abc") && !shown.contains("pw"));
/// # Ok::<(), wsbeat::Error>(())
/// ```
#[derive(Clone)]
#[must_use = "a Request does nothing until given to ClientBuilder::from_request or returned by a request factory"]
pub struct Request {
    pub(crate) url: Url,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) subprotocols: Vec<String>,
}

/// What a server URL must look like, in the errors about one.
pub(crate) const URL_HINT: &str = "expected ws://host[:port]/path or wss://...";

impl Request {
    /// Parses and checks a `ws://` or `wss://` URL.
    pub fn new(url: &str) -> Result<Request> {
        let url = Url::parse(url).map_err(|e| Error::InvalidUrl {
            reason: format!("{e} in {:?} ({URL_HINT})", RedactedUrl::raw(url)),
        })?;
        Self::from_url(url)
    }

    /// Uses an already parsed URL (must be `ws` or `wss` with a host).
    pub fn from_url(url: Url) -> Result<Request> {
        match url.scheme() {
            "ws" => {}
            "wss" if cfg!(any(feature = "native-tls", feature = "rustls")) => {}
            "wss" => return Err(Error::NoTls),
            other => {
                return Err(Error::InvalidUrl {
                    reason: format!("scheme {other:?} is not ws or wss ({URL_HINT})"),
                });
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::InvalidUrl {
                reason: format!("the URL has no host ({URL_HINT})"),
            });
        }
        // Credentials that cannot be sent as written: refused now, not by every attempt.
        user_info(&url, "server", true)?;
        // What the upgrade request line will carry (credentials go in a header): refused
        // here, once, rather than by every attempt after DNS and the dial (an HTTP URI
        // is at most 65 534 bytes). The reason never shows the URL (it may hold secrets).
        let sent = without_credentials(&url);
        if let Err(e) = tungstenite::http::Uri::try_from(sent.as_str()) {
            return Err(Error::InvalidUrl {
                reason: format!(
                    "{e} ({} bytes): not usable as a request URI",
                    sent.as_str().len()
                ),
            });
        }
        Ok(Request {
            url,
            headers: Vec::new(),
            subprotocols: Vec::new(),
        })
    }

    /// Adds a header to the upgrade request (checked when connecting).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Asks the server for a subprotocol (`Sec-WebSocket-Protocol`; checked when
    /// connecting: a name that is not an HTTP token is [`Error::InvalidHeader`]).
    pub fn subprotocol(mut self, protocol: impl Into<String>) -> Self {
        self.subprotocols.push(protocol.into());
        self
    }

    /// The URL.
    pub fn url(&self) -> &Url {
        &self.url
    }
}

/// The user name and password of `url` (the `what` URL: "server" or "proxy"),
/// percent-decoded; `None` when it has neither (a password with an empty user name,
/// `http://:pw@host`, is a credential too: Basic `:pw`, as curl sends). `Err` (`InvalidUrl`, which never shows
/// them) when they cannot be sent as written: not UTF-8 once decoded (they were sent
/// with replacement characters), or, for HTTP Basic credentials (`basic`), a user name
/// with a colon, which RFC 7617 does not allow (the server reads the user name up to it).
pub(crate) fn user_info(url: &Url, what: &str, basic: bool) -> Result<Option<(String, String)>> {
    if url.username().is_empty() && url.password().is_none() {
        return Ok(None);
    }
    let bad = |why: &str| Error::InvalidUrl {
        reason: format!("the {what} URL's credentials {why}"),
    };
    let decode = |s: &str| {
        String::from_utf8(percent_decode(s))
            .map_err(|_| bad("are not UTF-8 once percent-decoded (%XX escapes)"))
    };
    let user = decode(url.username())?;
    let pass = url.password().map(decode).transpose()?.unwrap_or_default();
    if basic && user.contains(':') {
        return Err(bad(
            "have a ':' in the user name, which Basic authentication cannot carry (RFC 7617)",
        ));
    }
    Ok(Some((user, pass)))
}

/// Checks a proxy URL's credentials before any attempt (so a proxy that is down does not
/// hide a mistake behind retried connection errors): they must decode, HTTP Basic takes
/// no ':' in the user name, and SOCKS5 (RFC 1929) needs a user name of 1 to 255 bytes
/// with a password of at most 255.
pub(crate) fn check_proxy_credentials(url: &Url) -> Result<()> {
    let creds = user_info(url, "proxy", url.scheme() == "http")?;
    if let Some((user, pass)) = creds
        && url.scheme().starts_with("socks5")
        && (user.is_empty() || user.len() > 255 || pass.len() > 255)
    {
        return Err(Error::InvalidUrl {
            reason: "SOCKS5 authentication needs a user name with the password, each of \
                     1 to 255 bytes (socks5://user:password@host)"
                .into(),
        });
    }
    Ok(())
}

/// `url` without its user name and password (they travel in a header, or not at all).
pub(crate) fn without_credentials(url: &Url) -> Url {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url
}

/// `%XX` escapes decoded to bytes (a `%` not followed by two hex digits stays as is).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A header as the upgrade request will carry it, or the error that refuses it (which
/// names the header, never its value).
pub(crate) fn parse_header(
    name: &str,
    value: &str,
) -> Result<(
    tungstenite::http::HeaderName,
    tungstenite::http::HeaderValue,
)> {
    let n = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|e| header_err(name, e))?;
    let v = tungstenite::http::HeaderValue::from_str(value).map_err(|e| header_err(name, e))?;
    Ok((n, v))
}

/// A subprotocol name as RFC 6455 (4.1) wants it: a non-empty HTTP token (no spaces,
/// commas, separators or control characters), or the error that refuses it (which, as
/// for headers, never shows the name).
pub(crate) fn check_subprotocol(name: &str) -> Result<()> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(tchar) {
        return Err(header_err(
            "Sec-WebSocket-Protocol",
            // Not shown: some servers take a credential as a subprotocol (Kubernetes).
            "a subprotocol name is empty or not a token: use letters, digits and \
             !#$%&'*+-.^_`|~ only (no spaces or commas), one name per call",
        ));
    }
    Ok(())
}

/// A header refused: names it, never shows its value.
pub(crate) fn header_err(name: &str, e: impl fmt::Display) -> Error {
    Error::InvalidHeader {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<_> = self
            .headers
            .iter()
            .map(|(k, v)| {
                if is_secret_header(k) {
                    format!("{k}: <redacted>")
                } else {
                    format!("{k}: {v}")
                }
            })
            .collect();
        let subprotocols: Vec<_> = self
            .subprotocols
            .iter()
            .map(|p| shown_subprotocol(p))
            .collect();
        f.debug_struct("Request")
            .field("url", &RedactedUrl(&self.url).to_string())
            .field("headers", &headers)
            .field("subprotocols", &subprotocols)
            .finish()
    }
}

/// What the request factory is told about the attempt it builds a request for.
#[derive(Debug)]
pub struct Attempt<'a> {
    /// 1 for the very first connection, then one more per attempt.
    pub number: u64,
    /// Why the previous attempt or connection failed, if it did.
    pub last_error: Option<&'a Error>,
}

/// What `send` does when the offline queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Return [`Error::QueueFull`] with the message (default).
    Reject,
    /// Drop the oldest queued messages to make room and hand them back in
    /// [`Event::Undelivered`](crate::Event::Undelivered). While as many dropped
    /// messages as the queue holds wait unread in the event stream, no more are dropped:
    /// the new message gets [`Error::QueueFull`](crate::Error::QueueFull) instead, so
    /// memory stays bounded when nobody reads events.
    DropOldest,
    /// Wait up to the given time for room, then return [`Error::QueueFull`]
    /// (`Duration::MAX`: wait as long as it takes; zero: like `Reject`).
    ///
    /// Room comes from the connection taking queued messages, and also from the event
    /// consumer: while as many handed-back messages (`Undelivered`, `Unconfirmed`) wait
    /// unread in the event stream as the queue holds, a send waits for them to be taken.
    /// A thread that takes events should therefore not block here without a bound: it
    /// would wait for itself.
    Block(Duration),
}

/// Size limits. The defaults are safe for untrusted servers.
///
/// Start from [`Limits::default`] and change what you need with the setters (the struct
/// is `#[non_exhaustive]`, so a limit added later does not break your code); the fields
/// stay readable.
///
/// ```
/// let limits = wsbeat::Limits::default()
///     .max_message_size(1 << 20)
///     .max_frame_size(256 << 10)
///     .queue_messages(500);
/// assert_eq!(limits.max_message_size, 1 << 20);
/// assert_eq!(limits.queue_bytes, 16 << 20); // untouched: the default
///
/// let builder = wsbeat::Client::builder("ws://127.0.0.1:9/feed").limits(limits);
/// # let _ = builder;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
#[must_use = "a Limits does nothing until given to ClientBuilder::limits"]
pub struct Limits {
    /// Largest incoming or outgoing message (default 16 MiB).
    pub max_message_size: usize,
    /// Largest incoming frame (default 16 MiB).
    pub max_frame_size: usize,
    /// Most bytes buffered for writing on one connection (default: max message + 64 KiB;
    /// never less than that, so the largest message always fits). The client's record
    /// of each buffered message (56-80 bytes, payload shared) counts against it too.
    pub max_write_buffer: usize,
    /// Offline queue bound in messages (default 10 000).
    pub queue_messages: usize,
    /// Offline queue bound in payload bytes (default 16 MiB). Sends are refused past it
    /// (or wait, per [`OverflowPolicy`]); messages put back after a connection died go in
    /// front regardless, so the queue may briefly exceed it by that connection's tracked
    /// messages (at most its kernel send queue, or 4 MiB where the OS has no figure).
    pub queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 16 << 20,
            max_frame_size: 16 << 20,
            max_write_buffer: (16 << 20) + (64 << 10),
            queue_messages: 10_000,
            queue_bytes: 16 << 20,
        }
    }
}

impl Limits {
    /// Largest incoming or outgoing message in bytes (default 16 MiB; `usize::MAX`: no
    /// limit). A bigger incoming message closes the connection; a bigger outgoing one is
    /// handed back by `send` in [`Error::MessageTooLarge`]. Zero, which any message from
    /// the peer would break, is an [`Error::InvalidConfig`] from `connect()`.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Largest incoming frame in bytes (default 16 MiB; `usize::MAX`: no limit; zero is
    /// an [`Error::InvalidConfig`] from `connect()`).
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Most bytes buffered for writing on one connection (default: max message +
    /// 64 KiB). A smaller value is raised to that, so the largest message always fits.
    /// The client's record of each buffered message (56-80 bytes) counts against it
    /// too: a flood of tiny messages holds about as much memory as this, not ten times.
    pub fn max_write_buffer(mut self, bytes: usize) -> Self {
        self.max_write_buffer = bytes;
        self
    }

    /// Most messages waiting in the offline queue (default 10 000); past it,
    /// [`OverflowPolicy`] decides.
    pub fn queue_messages(mut self, messages: usize) -> Self {
        self.queue_messages = messages;
        self
    }

    /// Most payload bytes waiting in the offline queue (default 16 MiB); past it,
    /// [`OverflowPolicy`] decides.
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }
}

/// How to pick a proxy.
#[derive(Clone, Debug)]
pub(crate) enum ProxySetting {
    /// `https_proxy` / `http_proxy` / `all_proxy` / `no_proxy` from the environment (default).
    Env,
    /// Never use a proxy.
    None,
    /// Always use this `http`, `socks5`, `socks5h`, `socks4` or `socks4a` proxy.
    Explicit(Url),
}

/// The proxy URL schemes wsbeat speaks; any other is an error, never a direct connection.
pub(crate) const PROXY_SCHEMES: [&str; 5] = ["http", "socks5", "socks5h", "socks4", "socks4a"];

/// TCP keepalive probes (`SO_KEEPALIVE`), for links where the OS should notice a dead
/// peer even without traffic (the heartbeat does this at the WebSocket level).
///
/// ```
/// use std::time::Duration;
/// let ka = wsbeat::TcpKeepalive::new(Duration::from_secs(60))
///     .interval(Duration::from_secs(10))
///     .retries(3);
/// # let _ = ka;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub(crate) time: Duration,
    pub(crate) interval: Option<Duration>,
    pub(crate) retries: Option<u32>,
}

impl TcpKeepalive {
    /// Probes start after the connection was idle for `time`. Where the OS counts whole
    /// seconds (Unix) a fraction is rounded up; past the OS's limit (Linux: 32767 s for
    /// the time and the interval, 127 probes) a value is capped, so `Duration::MAX` means
    /// "as long as the OS allows". Zero is an [`Error::InvalidConfig`] from `connect()`.
    pub fn new(time: Duration) -> TcpKeepalive {
        TcpKeepalive {
            time,
            interval: None,
            retries: None,
        }
    }
    /// Time between two unanswered probes (system default when not set).
    pub fn interval(mut self, interval: Duration) -> TcpKeepalive {
        self.interval = Some(interval);
        self
    }
    /// Unanswered probes before the OS declares the connection dead (system default
    /// when not set).
    pub fn retries(mut self, retries: u32) -> TcpKeepalive {
        self.retries = Some(retries);
        self
    }

    /// Zero is a value no OS takes: refused before anything starts.
    fn validate(&self) -> Result<()> {
        let reason = if self.time.is_zero() {
            "zero idle time: probes need at least one second of idle time first"
        } else if self.interval.is_some_and(|i| i.is_zero()) {
            "zero interval between probes: use at least one second, or leave it unset for \
             the system default"
        } else if self.retries == Some(0) {
            "zero probes: the OS needs at least one; leave it unset for the system default"
        } else {
            return Ok(());
        };
        Err(Error::InvalidConfig {
            setting: "tcp_keepalive",
            reason: reason.into(),
        })
    }
}

/// Default most text/binary messages waiting for the consumer.
pub const DEFAULT_EVENT_CAPACITY_MESSAGES: usize = 10_000;
/// Default most payload bytes waiting for the consumer.
pub const DEFAULT_EVENT_CAPACITY_BYTES: usize = 32 << 20;
/// Default time a consumer may take no event while the event channel is full before it
/// is reported stalled.
pub const DEFAULT_CONSUMER_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest spin of a consumer waiting for events, see
/// [`ClientBuilder::event_spin`](crate::ClientBuilder::event_spin).
pub const DEFAULT_EVENT_SPIN: Duration = Duration::from_micros(50);
/// The longest [`ClientBuilder::event_spin`](crate::ClientBuilder::event_spin): a
/// longer spin would only burn CPU between events that are not back to back.
pub const MAX_EVENT_SPIN: Duration = Duration::from_millis(1);
/// The largest [`ClientBuilder::read_buffer_size`](crate::ClientBuilder::read_buffer_size):
/// tungstenite allocates and zero-fills the whole buffer for each connection.
pub const MAX_READ_BUFFER_SIZE: usize = 16 << 20;
/// The smallest stack of the thread that connects (the supervisor), whatever
/// [`ClientBuilder::thread_stack_size`](crate::ClientBuilder::thread_stack_size) says.
pub(crate) const SUPERVISOR_MIN_STACK: usize = 256 << 10;

/// The largest [`ClientBuilder::thread_stack_size`](crate::ClientBuilder::thread_stack_size)
/// (the threads' stacks are reserved, not touched, so this costs address space only).
pub const MAX_THREAD_STACK_SIZE: usize = 256 << 20;
/// Default delay between two connection attempts of Happy Eyeballs (RFC 8305 5).
pub const DEFAULT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// Default number of redirects followed on the upgrade request.
pub const DEFAULT_MAX_REDIRECTS: usize = 5;

/// Socket-level settings of every TCP connection the client opens (to the server or to
/// the proxy).
#[derive(Debug, Clone)]
pub(crate) struct SocketOptions {
    pub keepalive: Option<TcpKeepalive>,
    pub local_address: Option<std::net::IpAddr>,
    pub device: Option<String>,
    pub attempt_delay: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            keepalive: None,
            local_address: None,
            device: None,
            attempt_delay: DEFAULT_ATTEMPT_DELAY,
        }
    }
}

/// The complete configuration of a client (built by [`ClientBuilder`]).
#[derive(Clone)]
pub(crate) struct Config {
    pub request: Request,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub close_timeout: Duration,
    pub limits: Limits,
    pub tls: TlsSettings,
    pub proxy: ProxySetting,
    pub socket: SocketOptions,
    pub max_redirects: usize,
    pub heartbeat: Heartbeat,
    pub reconnect: bool,
    pub policy: Arc<parking_lot::Mutex<Box<dyn ReconnectPolicy>>>,
    pub overflow: OverflowPolicy,
    pub surface_pings: bool,
    pub read_budget: usize,
    pub stack_size: usize,
    pub read_buffer_size: usize,
    /// Most (messages, payload bytes) waiting for the consumer.
    pub event_capacity: (usize, usize),
    pub consumer_stall_timeout: Duration,
    pub event_spin: Duration,
    pub delivery: Delivery,
    pub offline_queue: bool,
}

impl Config {
    /// Rejects settings that cannot work, before any thread starts.
    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |setting, reason: &str| {
            Err(Error::InvalidConfig {
                setting,
                reason: reason.into(),
            })
        };
        if self.connect_timeout.is_zero() {
            return invalid(
                "connect_timeout",
                "zero would fail every attempt at once; use Duration::MAX for no limit",
            );
        }
        if self.write_timeout.is_zero() {
            return invalid(
                "write_timeout",
                "zero would declare a stall whenever the socket buffer is full; use \
                 Duration::MAX to never declare one",
            );
        }
        if let Some(ka) = &self.socket.keepalive {
            ka.validate()?;
        }
        if let Some(dev) = &self.socket.device {
            // The OS reads the name up to a NUL, and an empty one unbinds: either would
            // connect through another interface than the one asked for.
            if dev.is_empty() || dev.contains('\0') {
                return invalid(
                    "bind_device",
                    "the interface name is empty or contains a NUL byte; give a name such as \
                     \"eth0\", or leave bind_device unset",
                );
            }
        }
        if self.limits.max_message_size == 0 || self.limits.max_frame_size == 0 {
            // Every message the peer sends would close the connection, and the client
            // would reconnect for good (docs review: 87 connections in 2 s).
            return invalid(
                if self.limits.max_message_size == 0 {
                    "Limits::max_message_size"
                } else {
                    "Limits::max_frame_size"
                },
                "zero would close the connection on any message the peer sends; use \
                 usize::MAX for no limit",
            );
        }
        if let Delivery::Acked(acks) = &self.delivery
            && acks.timeout.is_zero()
        {
            return invalid(
                "Acks::timeout",
                "zero would send every unacked message again without pause; use \
                 Duration::MAX to send again only after a reconnect",
            );
        }
        self.heartbeat.validate(self.limits.max_message_size)
    }

    pub(crate) fn ws_config(&self) -> tungstenite::protocol::WebSocketConfig {
        let write_buffer = 128 << 10;
        tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(write_buffer)
            // Room for at least one largest message, or it could never be sent.
            .max_write_buffer_size(
                self.limits
                    .max_write_buffer
                    .max(self.limits.max_message_size.saturating_add(64 << 10))
                    .max(write_buffer + 1),
            )
            .max_message_size(Some(self.limits.max_message_size))
            .max_frame_size(Some(self.limits.max_frame_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_decodes_and_refuses_what_cannot_be_sent() {
        let info = |u: &str, basic| user_info(&Url::parse(u).unwrap(), "server", basic);
        let ok = |u: &str| info(u, true).unwrap();
        assert_eq!(ok("http://h:1"), None);
        assert_eq!(ok("http://u@h"), Some(("u".into(), "".into())));
        assert_eq!(ok("http://u:p%40ss@h"), Some(("u".into(), "p@ss".into())));
        assert_eq!(ok("http://u:100%@h"), Some(("u".into(), "100%".into())));
        // A password alone is not dropped.
        assert_eq!(ok("http://:pw@h"), Some(("".into(), "pw".into())));
        // Not UTF-8 once decoded: it was sent with replacement characters.
        let e = info("http://u%FF%FE:s3cret@h", true).unwrap_err();
        assert!(matches!(&e, Error::InvalidUrl { reason } if reason.contains("not UTF-8")));
        assert!(!format!("{e} {e:?}").contains("s3cret"));
        // A ':' in the user name: Basic cannot carry it; SOCKS can.
        let e = info("http://us%3Aer:p%40ss@h", true).unwrap_err();
        assert!(matches!(&e, Error::InvalidUrl { reason } if reason.contains("RFC 7617")));
        assert!(!format!("{e} {e:?}").contains("p@ss"));
        assert_eq!(
            info("socks5://us%3Aer:pw@h", false).unwrap(),
            Some(("us:er".into(), "pw".into()))
        );
    }
}
