//! The user's way in: [`ClientBuilder`] collects the settings ([`Config`]) and starts a
//! [`Client`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::backoff::{Backoff, ReconnectPolicy};
use crate::client::Client;
use crate::config::{
    Attempt, Config, DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_REDIRECTS,
    DEFAULT_WRITE_TIMEOUT, Limits, MAX_CLOSE_TIMEOUT, MAX_EVENT_SPIN, MAX_READ_BUFFER_SIZE,
    MAX_THREAD_STACK_SIZE, OverflowPolicy, PROXY_SCHEMES, ProxySetting, Request, SocketOptions,
    TcpKeepalive,
};
use crate::heartbeat::Heartbeat;
use crate::outbox::Delivery;
#[cfg(any(feature = "native-tls", feature = "rustls"))]
use crate::tls_config::Connector;
use crate::tls_config::{Identity, TlsSettings};
use crate::transport::session::{Hooks, Session};
use crate::{Error, Result};

impl Client {
    /// Starts configuring a client for a `ws://` or `wss://` URL.
    ///
    /// Never fails here: a URL that is not a valid `ws://` or `wss://` URL (or a `wss://`
    /// URL in a build without TLS) is reported by [`ClientBuilder::connect`] or
    /// [`ClientBuilder::connect_lazy`], like every other builder error.
    ///
    /// ```
    /// let err = wsbeat::Client::builder("http://example.com/")
    ///     .connect_timeout(std::time::Duration::from_secs(5))
    ///     .connect()
    ///     .unwrap_err();
    /// assert!(matches!(err, wsbeat::Error::InvalidUrl { .. }));
    /// ```
    pub fn builder(url: &str) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    /// Connects with default settings.
    pub fn connect(url: &str) -> Result<Client> {
        Self::builder(url).connect()
    }
}

/// Builds a [`Client`]. Start with [`Client::builder`].
///
/// Every method returns the builder, so settings chain without `?`. A setting that
/// cannot be used (a bad URL, proxy URL or root certificate) is kept and returned by
/// [`connect`](Self::connect) or [`connect_lazy`](Self::connect_lazy), before any
/// thread starts; only the first such error is kept.
///
/// ```no_run
/// use std::time::Duration;
/// use wsbeat::{Client, Heartbeat};
///
/// let client = Client::builder("wss://example.com/feed")
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
    hooks: Hooks,
    /// The first error a builder method met, returned by `connect()` / `connect_lazy()`.
    error: Option<Error>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientBuilder");
        match &self.error {
            // The request is a placeholder when the URL was refused.
            Some(e) => d.field("error", e),
            None => d.field("request", &self.cfg.request),
        }
        .field("connect_timeout", &self.cfg.connect_timeout)
        .field("heartbeat", &self.cfg.heartbeat)
        .field("reconnect", &self.cfg.reconnect)
        .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    pub(crate) fn new(url: &str) -> ClientBuilder {
        match Request::new(url) {
            Ok(request) => Self::from_request(request),
            Err(e) => {
                // The request is never used: connect() returns the error first.
                let placeholder = Request {
                    url: Url::parse("ws://127.0.0.1:9/").expect("a constant, valid URL"),
                    headers: Vec::new(),
                    subprotocols: Vec::new(),
                };
                Self::from_request(placeholder).fail(e)
            }
        }
    }

    /// Keeps the first error for `connect()`.
    fn fail(mut self, error: Error) -> Self {
        self.error.get_or_insert(error);
        self
    }

    /// Starts from a prepared [`Request`].
    pub fn from_request(request: Request) -> ClientBuilder {
        ClientBuilder {
            hooks: Hooks::default(),
            cfg: Config {
                request,
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
                    crate::config::DEFAULT_EVENT_CAPACITY_MESSAGES,
                    crate::config::DEFAULT_EVENT_CAPACITY_BYTES,
                ),
                consumer_stall_timeout: crate::config::DEFAULT_CONSUMER_STALL_TIMEOUT,
                event_spin: crate::config::DEFAULT_EVENT_SPIN,
                delivery: Delivery::AtLeastOnce,
                offline_queue: true,
            },
            error: None,
        }
    }

    /// Adds a header to every upgrade request (e.g. `Authorization`). Never logged. A
    /// name or value HTTP does not allow is [`Error::InvalidHeader`] from `connect()` /
    /// `connect_lazy()` (naming the header, never showing its value).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (name.into(), value.into());
        if let Err(e) = crate::config::parse_header(&name, &value) {
            return self.fail(e);
        }
        self.cfg.request = self.cfg.request.header(name, value);
        self
    }

    /// Asks for a subprotocol (one name per call, in order of preference). A name that
    /// is not an HTTP token (empty, with a space, a comma, ...) is
    /// [`Error::InvalidHeader`] from `connect()` / `connect_lazy()`. A name that may be
    /// a credential (some servers take a token as a subprotocol): one longer than 40
    /// bytes, or with `token`, `key`, `auth`, `secret`, `password` or `bearer` in it,
    /// shows as `<redacted>` in `Debug` output and is not offered to another origin
    /// after a redirect (see [`max_redirects`](Self::max_redirects)).
    pub fn subprotocol(mut self, protocol: impl Into<String>) -> Self {
        let protocol = protocol.into();
        if let Err(e) = crate::config::check_subprotocol(&protocol) {
            return self.fail(e);
        }
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
    ///
    /// Not while your consumer is behind ([`event_capacity`](Self::event_capacity)
    /// reached) and the peer's data waits unread: a peer that reads and writes on one
    /// thread then waits for us to read, and is alive (one that never reads is judged
    /// once the consumer caught up). A blocking send stops waiting
    /// after this long instead, its message in flight (written once the peer reads
    /// again), or handed back in [`Error::WouldBlock`](crate::Error::WouldBlock) when the
    /// connection's buffer is full; the timeout starts over when reading resumes.
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
    /// forever. Return promptly: wsbeat cannot interrupt your code, so `close()` (and the
    /// drop of the last handle) waits for a call of `next_delay` or `min_uptime` in
    /// progress; waits in the client itself (a blocking send, `wait_connected`, this
    /// client's events) do end at `close()`.
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
        self.hooks.factory = Some(Arc::new(factory));
        self
    }

    /// Runs on every (re)connection before queued messages are flushed and before
    /// `Connected` is emitted: authenticate, resubscribe. An error fails the attempt; a
    /// panic fails it with [`Error::Panicked`], which is fatal. It runs where the request
    /// factory runs; capture a [`WeakClient`](crate::WeakClient) if it needs the client,
    /// never a `Client` (see [`reconnect_policy`](Self::reconnect_policy)). Return
    /// promptly, as from the policy: `close()` waits for a hook that blocks on something
    /// outside the client (its reads and sends through the [`Session`] are bounded by
    /// their timeouts).
    pub fn on_connect(
        mut self,
        hook: impl Fn(&mut Session<'_>) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_connect = Some(Arc::new(hook));
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
    /// They then count against [`event_capacity`](Self::event_capacity) like data.
    pub fn surface_pings(mut self, yes: bool) -> Self {
        self.cfg.surface_pings = yes;
        self
    }

    /// Messages the reader handles per lock hold before letting writers in (default 64;
    /// at least 1). A lock hold also ends after 256 KiB read, so `usize::MAX` means "no
    /// message limit", not an unbounded hold.
    pub fn read_budget(mut self, messages: usize) -> Self {
        self.cfg.read_budget = messages.max(1);
        self
    }

    /// Stack size of the internal threads (default 256 KiB; only touched pages use memory).
    /// At least 64 KiB and at most [`MAX_THREAD_STACK_SIZE`](crate::MAX_THREAD_STACK_SIZE)
    /// (256 MiB); other values are brought within those bounds. The thread that connects
    /// (proxies, TLS, the upgrade, your hooks and reconnect policy) gets at least
    /// 256 KiB whatever this says: that chain needs more than 64 KiB in a debug build.
    pub fn thread_stack_size(mut self, bytes: usize) -> Self {
        self.cfg.stack_size = bytes.clamp(64 << 10, MAX_THREAD_STACK_SIZE);
        self
    }

    /// tungstenite read buffer size per connection, and the most one socket read takes
    /// (default 64 KiB). tungstenite zero-fills it on the first read, so all of it is
    /// resident: 64 KiB keeps an idle client below tokio-tungstenite's memory (which
    /// uses 128 KiB) and cost no measurable throughput with 64 KiB messages. At least
    /// 4 KiB and at most [`MAX_READ_BUFFER_SIZE`](crate::MAX_READ_BUFFER_SIZE) (16 MiB);
    /// other values are brought within those bounds.
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.cfg.read_buffer_size = bytes.clamp(4096, MAX_READ_BUFFER_SIZE);
        self
    }

    /// Bounds the inbound messages waiting for the consumer in
    /// [`Client::events`](crate::Client::events): at most `messages` messages (text,
    /// binary, and surfaced pings and pongs) and `bytes` payload bytes (defaults 10 000 and 32 MiB; 0 counts as 1). When either
    /// is reached the client stops reading from the server until the consumer has taken
    /// half of them out: TCP pushes back on the server, nothing is dropped. The bound can
    /// be passed by one read of the socket (at most [`read_budget`](Self::read_budget)
    /// messages and 256 KiB, or one message up to `Limits::max_message_size`). One case
    /// reads past it: to reach the end of a connection (the peer hung up, or our close
    /// frame is out: `close()` then ends when the server answers), the client reads on,
    /// keeping up to twice the bound and dropping the messages past that
    /// ([`Stats::inbound_dropped`](crate::Stats::inbound_dropped), a warning). With a
    /// bound below half of one read (`read_budget`, 64 messages by default), one read
    /// already passes twice it, so that reading on drops most of what it reads even with
    /// a consumer that keeps up: keep the bound above `read_budget`.
    ///
    /// The bound counts what is handed over and not yet taken, whoever holds it: a
    /// [`Batch`](crate::Batch) one consumer keeps un-iterated pauses reading for every
    /// consumer of the client until it is iterated or dropped.
    ///
    /// A slow consumer never makes the heartbeat kill a live peer: while reading is held
    /// back, unread input (in the socket or already read into the client) proves the peer
    /// alive, and the peer's silence is judged again once reading resumes.
    ///
    /// ```
    /// # fn main() -> wsbeat::Result<()> {
    /// let builder = wsbeat::Client::builder("ws://127.0.0.1:9/feed")
    ///     .event_capacity(1_000, 8 << 20); // 1000 messages or 8 MiB
    /// # let _ = builder; Ok(()) }
    /// ```
    pub fn event_capacity(mut self, messages: usize, bytes: usize) -> Self {
        self.cfg.event_capacity = (messages.max(1), bytes.max(1));
        self
    }

    /// A consumer that takes no event for this long while the event channel is full is
    /// reported as stalled: a warning in the log and
    /// [`Stats::consumer_stalls`](crate::Stats::consumer_stalls), once per time the
    /// channel fills (the reader looks every quarter of the timeout, so the report
    /// comes up to that much later). A consumer
    /// that takes events, however slowly, is behind, not stalled: while it is behind,
    /// [`Stats::consumer_behind_since`](crate::Stats::consumer_behind_since) is set.
    /// Default 10 s. Nothing is dropped for either; reading resumes when it has taken
    /// half of what waits.
    pub fn consumer_stall_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.consumer_stall_timeout = timeout;
        self
    }

    /// How long a thread waiting in [`Events::recv`](crate::Events::recv) (and
    /// `recv_timeout`, `recv_deadline`, the blocking iterators) may spin, yielding the CPU,
    /// before it sleeps (in `poll` on the socket, or parked on the event channel), while
    /// events come back to back. Default 50 µs: a request/response exchange skips the
    /// wake-up of a sleeping thread on each reply (wss echo round trips of 64 B 10-20 µs
    /// shorter on a 2-core machine), at the cost of up to that much CPU per event when
    /// events keep coming just that far apart. `Duration::ZERO`: always sleep at once
    /// (least CPU). At most [`MAX_EVENT_SPIN`](crate::MAX_EVENT_SPIN) (1 ms); longer
    /// values are capped.
    ///
    /// A spin only helps replies that come within it: round trips longer than 50 µs (a
    /// 16 KiB wss echo takes about 90 µs) gain from a spin a little longer than they are
    /// (200 µs put that echo 6-13% ahead of raw tungstenite in most runs here, with the
    /// consumer busy for the whole wait: about 1.5x raw tungstenite's CPU per round trip).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = wsbeat::Client::builder("ws://127.0.0.1:9/feed")
    ///     .event_spin(Duration::ZERO); // a battery-powered device: never spin
    /// # let _ = builder;
    /// ```
    pub fn event_spin(mut self, spin: Duration) -> Self {
        self.cfg.event_spin = spin.min(MAX_EVENT_SPIN);
        self
    }

    /// Trusts these extra root certificates (PEM, one or more, or DER) besides the
    /// platform's roots. Checked now: a file the TLS backend cannot read is an
    /// [`Error::Tls`] from [`connect`](Self::connect) (or `connect_lazy`) before any
    /// thread starts, not a failure of the first connection attempt.
    ///
    /// ```no_run
    /// let ca = std::fs::read("ca.pem")?;
    /// let client = wsbeat::Client::builder("wss://localhost:8443/")
    ///     .add_root_certificate(&ca)
    ///     .connect()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_root_certificate(mut self, cert: &[u8]) -> Self {
        match self.cfg.tls.add_root(cert) {
            Ok(()) => self,
            Err(e) => self.fail(e),
        }
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
    /// let client = wsbeat::Client::builder("wss://example.com/feed")
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
    /// - `http://[user:pass@]host:port`: an HTTP proxy, with `CONNECT` (credentials as
    ///   `Proxy-Authorization: Basic`; a password alone, `http://:pass@host`, is sent
    ///   with an empty user name);
    /// - `socks5://[user:pass@]host:port`: SOCKS5, the host name resolved here (a
    ///   password needs a user name, RFC 1929, else the connect fails with
    ///   [`Error::InvalidUrl`]);
    /// - `socks5h://[user:pass@]host:port`: SOCKS5, the host name resolved by the proxy
    ///   (what Tor and `ssh -D` users want: no DNS query leaves this machine), with the
    ///   same rule for credentials;
    /// - `socks4://[user@]host:port` (IPv4 destinations, resolved here) and
    ///   `socks4a://[user@]host:port` (the proxy resolves the name); the user name is
    ///   sent as the SOCKS4 user id.
    ///
    /// Any other scheme, or a URL that does not parse, is an [`Error::InvalidUrl`] from
    /// [`connect`](Self::connect) (or `connect_lazy`), before any thread starts.
    ///
    /// ```
    /// let b = wsbeat::Client::builder("wss://example.com/feed")
    ///     .proxy("socks5h://127.0.0.1:9050");
    /// # let _ = b;
    /// let err = wsbeat::Client::builder("ws://127.0.0.1:9/")
    ///     .proxy("ftp://p:21")
    ///     .connect()
    ///     .unwrap_err();
    /// assert!(matches!(err, wsbeat::Error::InvalidUrl { .. }));
    /// ```
    pub fn proxy(mut self, proxy_url: &str) -> Self {
        match parse_proxy(proxy_url) {
            Ok(u) => {
                self.cfg.proxy = ProxySetting::Explicit(u);
                self
            }
            Err(e) => self.fail(e),
        }
    }

    /// How many redirects (HTTP 301/302/303/307/308 with a `Location`) of the upgrade
    /// request to follow per connection attempt; default 5, 0 turns following off (a
    /// 3xx answer is then a fatal [`Error::Http`]). A redirect from `wss` to `ws` is never
    /// followed; `Authorization`, `Cookie`, every header named like a credential
    /// (`*token*`, `*key*`, `*secret*`, `*auth*`, `*password*`), every subprotocol that
    /// may be one (see [`subprotocol`](Self::subprotocol)) and URL credentials are
    /// dropped when the origin (scheme, host, port) changes, and a loop is an
    /// [`Error::Redirect`]. Every attempt starts again from the configured URL.
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
    /// [`Error::Io`] rather than silently using another interface. An empty name or one
    /// with a NUL byte is an [`Error::InvalidConfig`] from `connect()`.
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
    ///
    /// The first error a builder method met (a bad URL, proxy URL or root certificate,
    /// `wss://` without TLS) or an invalid setting is returned before any thread starts.
    pub fn connect(self) -> Result<Client> {
        self.start(true)
    }

    /// Returns at once and connects in the background, retrying per the policy.
    /// Use [`Client::wait_connected`] or the `Connected` event.
    ///
    /// Builder errors come back here, as from [`connect`](Self::connect), before any
    /// thread starts; only connection failures are left to the background.
    pub fn connect_lazy(self) -> Result<Client> {
        self.start(false)
    }

    fn start(self, eager: bool) -> Result<Client> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Client::start(
            self.cfg,
            self.hooks,
            eager,
            &mut Vec::new(),
            &Default::default(),
        )
    }
}

/// Parses and checks an explicit proxy URL.
fn parse_proxy(proxy_url: &str) -> Result<Url> {
    let u = Url::parse(proxy_url).map_err(|e| Error::InvalidUrl {
        reason: format!("proxy URL: {e}"),
    })?;
    if !PROXY_SCHEMES.contains(&u.scheme()) || u.host_str().is_none_or(str::is_empty) {
        return Err(Error::InvalidUrl {
            reason:
                "proxy URL must be http://, socks5://, socks5h://, socks4:// or socks4a://host:port"
                    .into(),
        });
    }
    crate::config::check_proxy_credentials(&u)?;
    Ok(u)
}
