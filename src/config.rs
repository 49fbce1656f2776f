//! Every setting of a client, its defaults, and the builder that sets them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::backoff::{Backoff, ReconnectPolicy};
use crate::client::Client;
use crate::heartbeat::Heartbeat;
use crate::outbox::Delivery;
use crate::reconnect::Session;
use crate::redact::{RedactedUrl, is_secret_header};
#[cfg(any(feature = "native-tls", feature = "rustls"))]
use crate::tls_config::Connector;
use crate::tls_config::Identity;
pub(crate) use crate::tls_config::TlsSettings;
use crate::{Error, Result};

/// Default connect timeout: DNS + TCP + proxy + TLS + upgrade together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default write timeout: a send that cannot drain for this long declares the link stalled.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bounded wait for the peer's close reply.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest [`ClientBuilder::close_timeout`]: `close()` ends within it (plus thread
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

impl Request {
    /// Parses and checks a `ws://` or `wss://` URL.
    pub fn new(url: &str) -> Result<Request> {
        let url = Url::parse(url).map_err(|e| Error::InvalidUrl {
            reason: format!("{e} in {:?}", RedactedUrl::raw(url)),
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
                    reason: format!("scheme {other:?} is not ws or wss"),
                });
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::InvalidUrl {
                reason: "the URL has no host".into(),
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

    /// Asks the server for a subprotocol (`Sec-WebSocket-Protocol`).
    pub fn subprotocol(mut self, protocol: impl Into<String>) -> Self {
        self.subprotocols.push(protocol.into());
        self
    }

    /// The URL.
    pub fn url(&self) -> &Url {
        &self.url
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
        f.debug_struct("Request")
            .field("url", &RedactedUrl(&self.url).to_string())
            .field("headers", &headers)
            .field("subprotocols", &self.subprotocols)
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
    /// [`Event::Undelivered`](crate::Event::Undelivered).
    DropOldest,
    /// Wait up to the given time for room, then return [`Error::QueueFull`]
    /// (`Duration::MAX`: wait as long as it takes; zero: like `Reject`).
    Block(Duration),
}

/// Size limits. The defaults are safe for untrusted servers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest incoming or outgoing message (default 16 MiB).
    pub max_message_size: usize,
    /// Largest incoming frame (default 16 MiB).
    pub max_frame_size: usize,
    /// Most bytes buffered for writing on one connection (default: max message + 64 KiB;
    /// never less than that, so the largest message always fits).
    pub max_write_buffer: usize,
    /// Offline queue bound in messages (default 10 000).
    pub queue_messages: usize,
    /// Offline queue bound in payload bytes (default 16 MiB).
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

pub(crate) type RequestFactory = Arc<dyn Fn(&Attempt<'_>) -> Result<Request> + Send + Sync>;
pub(crate) type ConnectHook = Arc<dyn Fn(&mut Session<'_>) -> Result<()> + Send + Sync>;

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
    /// Probes start after the connection was idle for `time` (whole seconds on Linux).
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
}

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
    pub factory: Option<RequestFactory>,
    pub on_connect: Option<ConnectHook>,
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
        self.heartbeat.validate()
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

/// Builds a [`Client`]. Start with [`Client::builder`].
///
/// ```no_run
/// use std::time::Duration;
/// use wsbeat::{Client, Heartbeat};
///
/// let client = Client::builder("wss://example.com/feed")?
///     .connect_timeout(Duration::from_secs(5))
///     .header("Authorization", "Bearer t0ken")
///     .subprotocol("v1.json")
///     .heartbeat(Heartbeat::ping(Duration::from_secs(15), Duration::from_secs(10)))
///     .connect()?;
/// client.send_text("hello")?;
/// # Ok::<(), wsbeat::Error>(())
/// ```
#[must_use = "a builder does nothing until connect() or connect_lazy()"]
pub struct ClientBuilder {
    pub(crate) cfg: Config,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("request", &self.cfg.request)
            .field("connect_timeout", &self.cfg.connect_timeout)
            .field("heartbeat", &self.cfg.heartbeat)
            .field("reconnect", &self.cfg.reconnect)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    pub(crate) fn new(url: &str) -> Result<ClientBuilder> {
        Ok(Self::from_request(Request::new(url)?))
    }

    /// Starts from a prepared [`Request`].
    pub fn from_request(request: Request) -> ClientBuilder {
        ClientBuilder {
            cfg: Config {
                request,
                factory: None,
                on_connect: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                write_timeout: DEFAULT_WRITE_TIMEOUT,
                close_timeout: DEFAULT_CLOSE_TIMEOUT,
                limits: Limits::default(),
                tls: TlsSettings::default(),
                proxy: ProxySetting::Env,
                socket: SocketOptions::default(),
                max_redirects: DEFAULT_MAX_REDIRECTS,
                heartbeat: Heartbeat::default(),
                reconnect: true,
                policy: Arc::new(parking_lot::Mutex::new(Box::new(Backoff::default()))),
                overflow: OverflowPolicy::Reject,
                surface_pings: false,
                read_budget: 64,
                stack_size: 256 << 10,
                read_buffer_size: 64 << 10,
                event_capacity: (
                    crate::inbound::DEFAULT_EVENT_CAPACITY_MESSAGES,
                    crate::inbound::DEFAULT_EVENT_CAPACITY_BYTES,
                ),
                consumer_stall_timeout: crate::inbound::DEFAULT_CONSUMER_STALL_TIMEOUT,
                delivery: Delivery::AtLeastOnce,
                offline_queue: true,
            },
        }
    }

    /// Adds a header to every upgrade request (e.g. `Authorization`). Never logged.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.cfg.request = self.cfg.request.header(name, value);
        self
    }

    /// Asks for a subprotocol.
    pub fn subprotocol(mut self, protocol: impl Into<String>) -> Self {
        self.cfg.request = self.cfg.request.subprotocol(protocol);
        self
    }

    /// Deadline for one whole connect: DNS, TCP (every address), proxy, TLS and upgrade.
    /// Default 10 s. `Duration::MAX`: no limit (`close()` still aborts a connect in
    /// progress); zero is rejected by `connect()`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.connect_timeout = timeout;
        self
    }

    /// A send that cannot hand its bytes to the OS for this long declares the
    /// connection stalled (the peer stopped reading). Default 10 s. `Duration::MAX`:
    /// never declare a stall; zero is rejected by `connect()`.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.write_timeout = timeout;
        self
    }

    /// Bounded wait for the peer's close reply in `close()`. Default 2 s. Zero: send the
    /// close frame and do not wait for the reply. At most [`MAX_CLOSE_TIMEOUT`] (one
    /// minute; longer values, `Duration::MAX` included, are capped): `close()` must end
    /// even when the peer vanished.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.close_timeout = timeout.min(MAX_CLOSE_TIMEOUT);
        self
    }

    /// Size limits (message, frame, write buffer, offline queue).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.cfg.limits = limits;
        self
    }

    /// Heartbeat settings; default [`Heartbeat::default`] (ping after 15 s idle, 10 s timeout).
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.cfg.heartbeat = heartbeat;
        self
    }

    /// Turns automatic reconnection on (default) or off. When off, the client
    /// closes when its connection ends.
    pub fn reconnect(mut self, enabled: bool) -> Self {
        self.cfg.reconnect = enabled;
        self
    }

    /// Replaces the reconnect policy (default: [`Backoff::default`]). Not consulted when
    /// automatic reconnection is off.
    ///
    /// The policy runs on the client's supervisor thread. A panic in it closes the client
    /// (`GaveUp` with [`Error::Panicked`], then `Undelivered`, `Closed`). To reach the
    /// client from the policy, capture a [`WeakClient`](crate::WeakClient), never a
    /// `Client`: the client owns its policy, so a captured `Client` would keep it alive
    /// forever.
    pub fn reconnect_policy(mut self, policy: impl ReconnectPolicy) -> Self {
        self.cfg.policy = Arc::new(parking_lot::Mutex::new(Box::new(policy)));
        self
    }

    /// Builds the request for every attempt (fresh tokens, failover between URLs).
    /// Replaces the URL, headers and subprotocols given to the builder.
    ///
    /// It runs on the supervisor thread (on the caller's thread for the first attempt of
    /// [`connect`](Self::connect)). An error fails the attempt; a panic fails it with
    /// [`Error::Panicked`], which is fatal. Capture a [`WeakClient`](crate::WeakClient)
    /// if it needs the client, never a `Client` (see [`reconnect_policy`](Self::reconnect_policy)).
    /// Return promptly (fetch a token with a timeout): wsbeat cannot interrupt your code,
    /// so `close()` waits for a factory call in progress.
    pub fn request_factory(
        mut self,
        factory: impl Fn(&Attempt<'_>) -> Result<Request> + Send + Sync + 'static,
    ) -> Self {
        self.cfg.factory = Some(Arc::new(factory));
        self
    }

    /// Runs on every (re)connection before queued messages are flushed and before
    /// `Connected` is emitted: authenticate, resubscribe. An error fails the attempt; a
    /// panic fails it with [`Error::Panicked`], which is fatal. It runs where the request
    /// factory runs; capture a [`WeakClient`](crate::WeakClient) if it needs the client,
    /// never a `Client` (see [`reconnect_policy`](Self::reconnect_policy)).
    pub fn on_connect(
        mut self,
        hook: impl Fn(&mut Session<'_>) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.cfg.on_connect = Some(Arc::new(hook));
        self
    }

    /// What `send` does when the offline queue is full. Default [`OverflowPolicy::Reject`].
    pub fn overflow(mut self, policy: OverflowPolicy) -> Self {
        self.cfg.overflow = policy;
        self
    }

    /// What is promised about accepted messages when a connection dies: at least once
    /// (default), at most once, or end-to-end acked. See [`Delivery`].
    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.cfg.delivery = delivery;
        self
    }

    /// With `false`, a send while no connection is open fails at once with
    /// [`Error::Offline`] (the message handed back) instead of waiting in the offline
    /// queue. Default `true`. Messages already accepted (in flight on a connection that
    /// died, under at-least-once or acked delivery) are still sent on the next one.
    pub fn offline_queue(mut self, enabled: bool) -> Self {
        self.cfg.offline_queue = enabled;
        self
    }

    /// Also deliver incoming pings and pongs as [`Event::Message`](crate::Event::Message).
    pub fn surface_pings(mut self, yes: bool) -> Self {
        self.cfg.surface_pings = yes;
        self
    }

    /// Messages the reader handles per lock hold before letting writers in (default 64).
    pub fn read_budget(mut self, messages: usize) -> Self {
        self.cfg.read_budget = messages.max(1);
        self
    }

    /// Stack size of the internal threads (default 256 KiB; only touched pages use memory).
    pub fn thread_stack_size(mut self, bytes: usize) -> Self {
        self.cfg.stack_size = bytes.max(32 << 10);
        self
    }

    /// tungstenite read buffer size per connection, and the most one socket read takes
    /// (default 64 KiB). tungstenite zero-fills it on the first read, so all of it is
    /// resident: 64 KiB keeps an idle client below tokio-tungstenite's memory (which
    /// uses 128 KiB) and cost no measurable throughput with 64 KiB messages.
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.cfg.read_buffer_size = bytes.max(4096);
        self
    }

    /// Bounds the inbound messages waiting for the consumer in
    /// [`Client::events`](crate::Client::events): at most `messages` text/binary messages
    /// and `bytes` payload bytes (defaults 10 000 and 32 MiB; 0 counts as 1). When either
    /// is reached the client stops reading from the server until the consumer has taken
    /// half of them out: TCP pushes back on the server, nothing is dropped. The bound can
    /// be passed by one read of the socket (at most [`read_budget`](Self::read_budget)
    /// messages and 256 KiB, or one message up to `Limits::max_message_size`).
    ///
    /// A slow consumer never makes the heartbeat kill a live peer: while reading is held
    /// back, unread input (in the socket or already read into the client) proves the peer
    /// alive, and the peer's silence is judged again once reading resumes.
    ///
    /// ```
    /// # fn main() -> wsbeat::Result<()> {
    /// let builder = wsbeat::Client::builder("ws://127.0.0.1:9/feed")?
    ///     .event_capacity(1_000, 8 << 20); // 1000 messages or 8 MiB
    /// # let _ = builder; Ok(()) }
    /// ```
    pub fn event_capacity(mut self, messages: usize, bytes: usize) -> Self {
        self.cfg.event_capacity = (messages.max(1), bytes.max(1));
        self
    }

    /// A consumer that leaves the event channel full for this long is reported: a
    /// warning in the log and [`Stats::consumer_stalls`](crate::Stats::consumer_stalls)
    /// (while it is behind, [`Stats::consumer_behind_since`](crate::Stats::consumer_behind_since)
    /// is set). Default 10 s. Nothing is dropped; reading resumes when it catches up.
    pub fn consumer_stall_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.consumer_stall_timeout = timeout;
        self
    }

    /// Trusts these extra root certificates (PEM, one or more, or DER) besides the
    /// platform's roots. Checked now: a file the TLS backend cannot read is an
    /// [`Error::Tls`] here, not at the first connect.
    ///
    /// ```no_run
    /// let ca = std::fs::read("ca.pem")?;
    /// let client = wsbeat::Client::builder("wss://localhost:8443/")?
    ///     .add_root_certificate(&ca)?
    ///     .connect()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_root_certificate(mut self, cert: &[u8]) -> Result<Self> {
        self.cfg.tls.add_root(cert)?;
        Ok(self)
    }

    /// Presents a client certificate (mutual TLS); see [`Identity`].
    pub fn identity(mut self, identity: Identity) -> Self {
        self.cfg.tls.identity = Some(identity);
        self
    }

    /// Uses your own native-tls connector (overrides roots, identity and the `danger_`
    /// options).
    #[cfg(feature = "native-tls")]
    pub fn tls_connector(mut self, connector: native_tls::TlsConnector) -> Self {
        self.cfg.tls.connector = Some(Connector::Native(connector));
        self
    }

    /// Uses rustls with the settings of this builder (roots, identity, `danger_`
    /// options), also when native-tls is compiled in too (which is otherwise the
    /// default). With only the `rustls` feature, rustls is used anyway.
    #[cfg(feature = "rustls")]
    pub fn use_rustls(mut self) -> Self {
        self.cfg.tls.use_rustls = true;
        self
    }

    /// Uses your own rustls configuration (overrides roots, identity and the `danger_`
    /// options). With both backends compiled in, this also selects rustls (native-tls is
    /// the default otherwise).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// let mut roots = wsbeat::rustls::RootCertStore::empty();
    /// // roots.add(...)
    /// let config = wsbeat::rustls::ClientConfig::builder_with_provider(Arc::new(
    ///     wsbeat::rustls::crypto::ring::default_provider(),
    /// ))
    /// .with_safe_default_protocol_versions()?
    /// .with_root_certificates(roots)
    /// .with_no_client_auth();
    /// let client = wsbeat::Client::builder("wss://example.com/feed")?
    ///     .rustls_config(Arc::new(config))
    ///     .connect()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "rustls")]
    pub fn rustls_config(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.cfg.tls.connector = Some(Connector::Rustls(config));
        self
    }

    /// DANGER: accepts any server certificate. Only for tests against self-signed servers.
    pub fn danger_accept_invalid_certs(mut self, yes: bool) -> Self {
        self.cfg.tls.danger_accept_invalid_certs = yes;
        self
    }

    /// DANGER: accepts a certificate for another host name.
    pub fn danger_accept_invalid_hostnames(mut self, yes: bool) -> Self {
        self.cfg.tls.danger_accept_invalid_hostnames = yes;
        self
    }

    /// Connects through this proxy, whatever the environment says:
    /// - `http://[user:pass@]host:port`: an HTTP proxy, with `CONNECT`;
    /// - `socks5://[user:pass@]host:port`: SOCKS5, the host name resolved here;
    /// - `socks5h://[user:pass@]host:port`: SOCKS5, the host name resolved by the proxy
    ///   (what Tor and `ssh -D` users want: no DNS query leaves this machine);
    /// - `socks4://[user@]host:port` (IPv4 destinations, resolved here) and
    ///   `socks4a://[user@]host:port` (the proxy resolves the name); the user name is
    ///   sent as the SOCKS4 user id.
    ///
    /// Any other scheme is an [`Error::InvalidUrl`].
    ///
    /// ```
    /// let b = wsbeat::Client::builder("wss://example.com/feed")?
    ///     .proxy("socks5h://127.0.0.1:9050")?;
    /// assert!(wsbeat::Client::builder("ws://x")?.proxy("ftp://p:21").is_err());
    /// # let _ = b;
    /// # Ok::<(), wsbeat::Error>(())
    /// ```
    pub fn proxy(mut self, proxy_url: &str) -> Result<Self> {
        let u = Url::parse(proxy_url).map_err(|e| Error::InvalidUrl {
            reason: format!("proxy URL: {e}"),
        })?;
        if !PROXY_SCHEMES.contains(&u.scheme()) || u.host_str().is_none_or(str::is_empty) {
            return Err(Error::InvalidUrl {
                reason: "proxy URL must be http://, socks5://, socks5h://, socks4:// or socks4a://host:port"
                    .into(),
            });
        }
        self.cfg.proxy = ProxySetting::Explicit(u);
        Ok(self)
    }

    /// How many redirects (HTTP 301/302/303/307/308 with a `Location`) of the upgrade
    /// request to follow per connection attempt; default 5, 0 turns following off (a
    /// 3xx answer is then a fatal [`Error::Http`]). A redirect from `wss` to `ws` is never
    /// followed; `Authorization`, `Cookie`, every header named like a credential
    /// (`*token*`, `*key*`, `*secret*`, `*auth*`, `*password*`) and URL credentials are
    /// dropped when the origin (scheme, host, port) changes, and a loop is an [`Error::Redirect`]. Every attempt
    /// starts again from the configured URL.
    pub fn max_redirects(mut self, limit: usize) -> Self {
        self.cfg.max_redirects = limit;
        self
    }

    /// Turns on TCP keepalive probes on every connection (off by default).
    pub fn tcp_keepalive(mut self, keepalive: TcpKeepalive) -> Self {
        self.cfg.socket.keepalive = Some(keepalive);
        self
    }

    /// Connects from this local address (port chosen by the OS). Only destination
    /// addresses of the same family are tried.
    pub fn local_address(mut self, ip: std::net::IpAddr) -> Self {
        self.cfg.socket.local_address = Some(ip);
        self
    }

    /// Binds every socket to this network interface (`SO_BINDTODEVICE`, Linux only;
    /// needs `CAP_NET_RAW` on older kernels). Elsewhere connecting fails with
    /// [`Error::Io`] rather than silently using another interface.
    pub fn bind_device(mut self, interface: impl Into<String>) -> Self {
        self.cfg.socket.device = Some(interface.into());
        self
    }

    /// Delay between two connection attempts to the addresses of one host, alternating
    /// IPv6 and IPv4 (Happy Eyeballs, RFC 8305); default 250 ms, at least 10 ms. A
    /// failed attempt starts the next one at once.
    pub fn happy_eyeballs_delay(mut self, delay: Duration) -> Self {
        self.cfg.socket.attempt_delay = delay.max(Duration::from_millis(10));
        self
    }

    /// Connects directly, ignoring the proxy environment variables.
    ///
    /// Without this or [`proxy`](Self::proxy), the environment decides, the way curl
    /// reads it: `https_proxy` (or `HTTPS_PROXY`) for `wss://`, `http_proxy` for `ws://`
    /// (never the uppercase `HTTP_PROXY`: a CGI program inherits it from a request's
    /// `Proxy:` header), then `all_proxy` / `ALL_PROXY`. `no_proxy` (or `NO_PROXY`) lists
    /// destinations that go direct: `*`, domains (`example.com` covers its
    /// subdomains), IP addresses, CIDR ranges (`10.0.0.0/8`, `fd00::/8`), each with an
    /// optional `:port`. Loopback destinations always go direct. A proxy scheme wsbeat
    /// does not speak is [`Error::UnsupportedProxy`] when connecting, never a direct
    /// connection.
    pub fn no_proxy(mut self) -> Self {
        self.cfg.proxy = ProxySetting::None;
        self
    }

    /// Connects now (blocking until open or a typed error), then keeps the connection
    /// alive in the background.
    pub fn connect(self) -> Result<Client> {
        Client::start(self.cfg, true, Vec::new())
    }

    /// Returns at once and connects in the background, retrying per the policy.
    /// Use [`Client::wait_connected`] or the `Connected` event.
    pub fn connect_lazy(self) -> Result<Client> {
        Client::start(self.cfg, false, Vec::new())
    }
}
