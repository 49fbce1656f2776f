//! [`TestServer`]: an in-process WebSocket server with scripted behaviours.
//!
//! One accept thread plus one thread per connection; every socket is non-blocking and
//! every thread notices control requests within [`net::TICK`], so `stop()`, `reset_all()`
//! and Drop are prompt and join every thread they started.

use super::certs::ServerCert;
use super::net::{self, Stream, TICK};
use super::util;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, unbounded};
use parking_lot::Mutex;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::WebSocket;
use tungstenite::protocol::frame::coding::{CloseCode, Control as OpCtl, Data as OpData, OpCode};
use tungstenite::protocol::frame::{Frame, FrameSocket};
use tungstenite::{Bytes, Error as WsError, HandshakeError, Message};

/// How long the server waits for the client's reply after sending a close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `restart()` retries binding the old port.
pub const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server does with each new connection (see [`TestServer::set_behavior`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Behavior {
    /// Upgrade; echo Text and Binary unchanged and in order; pings answered by tungstenite.
    #[default]
    Echo,
    /// Read the upgrade request (recorded), answer `status` with extra `headers`
    /// (plus `Content-Length: 0`), then close.
    Reject {
        /// HTTP status, e.g. 401 or 503 (must not be 2xx).
        status: u16,
        /// Extra response headers, e.g. `("Retry-After", "1")`.
        headers: Vec<(String, String)>,
    },
    /// Accept TCP and never answer anything (no TLS, no HTTP); hold the socket until
    /// stop / reset_all / close_all / disconnect_all.
    Hang,
    /// Upgrade, then immediately send Close(code, reason) and finish the closing handshake.
    CloseAfterUpgrade {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// Upgrade, then close TCP without a close frame.
    DropAfterUpgrade,
    /// Upgrade, then abort TCP with RST.
    ResetAfterUpgrade,
    /// Upgrade and echo data, but never answer WebSocket Ping frames (raw frame handling).
    NoPong,
    /// Like [`Behavior::NoPong`], and answer the text `{"op":"ping"}` with `{"op":"pong"}`
    /// instead of echoing it (other data is echoed).
    AppHeartbeat,
    /// Upgrade, then send `count` text messages [`flood_message`]`(i, size)` as fast as
    /// the socket allows, while still reading and echoing.
    Flood {
        /// Number of messages.
        count: usize,
        /// Size of each message in bytes.
        size: usize,
    },
    /// Upgrade, then never read from the socket again (the client's writes eventually stall;
    /// see [`ServerBuilder::recv_buffer`]). A close_all still sends a close frame.
    StopReading,
    /// Upgrade; read and record everything but answer no data (no echo: an application
    /// that hangs), while its WebSocket library still answers pings. Sends a Ping every
    /// `ping_every` and a text message `"tick-N"` every `data_every`, if set.
    Silent {
        /// Period of the server's own pings.
        ping_every: Option<Duration>,
        /// Period of unsolicited data messages.
        data_every: Option<Duration>,
    },
}

impl Behavior {
    /// `Reject` with `status` and no extra headers.
    pub fn reject(status: u16) -> Self {
        Self::reject_with(status, &[])
    }

    /// `Reject` with `status` and extra headers, e.g. `reject_with(503, &[("Retry-After", "1")])`.
    pub fn reject_with(status: u16, headers: &[(&str, &str)]) -> Self {
        Behavior::Reject {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// `CloseAfterUpgrade` with `code` and `reason`.
    pub fn close_after_upgrade(code: u16, reason: &str) -> Self {
        Behavior::CloseAfterUpgrade {
            code,
            reason: reason.to_string(),
        }
    }
}

/// Flood message number `i` (0-based) of exactly `size` bytes: `"{i:08}:"` then `'x'` padding
/// (the prefix is truncated when `size` < 9).
pub fn flood_message(i: usize, size: usize) -> String {
    let mut s = format!("{i:08}:");
    s.truncate(size);
    let pad = size - s.len();
    s.extend(std::iter::repeat_n('x', pad));
    s
}

/// A message the server received, tagged with the connection id (accept order, from 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// Connection id (0 for the first TCP connection accepted, across restarts).
    pub conn: usize,
    /// The message (Text/Binary for data, Ping/Pong/Close for controls).
    pub msg: Message,
}

impl Received {
    /// The text payload, if this is a Text message.
    pub fn text(&self) -> Option<&str> {
        match &self.msg {
            Message::Text(t) => Some(t.as_str()),
            _ => None,
        }
    }
}

/// The HTTP upgrade request of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// Connection id.
    pub conn: usize,
    /// Request target, e.g. `/` or `/feed?x=1`.
    pub path: String,
    /// All request headers in order (names lower-cased by the HTTP parser).
    pub headers: Vec<(String, String)>,
}

impl Handshake {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Subprotocols offered in `Sec-WebSocket-Protocol` (all header lines, comma-split, trimmed).
    pub fn subprotocols(&self) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
            .flat_map(|(_, v)| v.split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    }
}

#[derive(Clone, Debug)]
enum Subprotocol {
    None,
    Accept(String),
    EchoFirst,
    Force(String),
}

struct Config {
    tls: Option<native_tls::TlsAcceptor>,
    ipv6: bool,
    close_on_text: Option<(String, u16, String)>,
    subprotocol: Subprotocol,
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    record: bool,
}

/// Builder for [`TestServer`]; `TestServer::builder().behavior(..).tls(..).start()`.
pub struct ServerBuilder {
    behavior: Behavior,
    cfg: Config,
}

impl ServerBuilder {
    /// Behaviour for new connections (default [`Behavior::Echo`]).
    pub fn behavior(mut self, b: Behavior) -> Self {
        self.behavior = b;
        self
    }

    /// Serve `wss://` with the given certificate (use [`TestServer::wss_url`]).
    pub fn tls(mut self, cert: ServerCert) -> Self {
        self.cfg.tls = Some(native_tls::TlsAcceptor::new(cert.identity()).expect("tls acceptor"));
        self
    }

    /// Serve `wss://` with any identity.
    pub fn tls_identity(mut self, id: native_tls::Identity) -> Self {
        self.cfg.tls = Some(native_tls::TlsAcceptor::new(id).expect("tls acceptor"));
        self
    }

    /// Listen on `[::1]` instead of `127.0.0.1`.
    pub fn ipv6(mut self) -> Self {
        self.cfg.ipv6 = true;
        self
    }

    /// When a Text message equal to `text` arrives, record it, don't echo it, and close
    /// with `code`/`reason` (e.g. `"please-close", 4000, "bye"`). Works in every upgrading mode.
    pub fn close_on_text(mut self, text: &str, code: u16, reason: &str) -> Self {
        self.cfg.close_on_text = Some((text.to_string(), code, reason.to_string()));
        self
    }

    /// Reply `Sec-WebSocket-Protocol: name` when the client offered `name`.
    pub fn accept_subprotocol(mut self, name: &str) -> Self {
        self.cfg.subprotocol = Subprotocol::Accept(name.to_string());
        self
    }

    /// Reply with the first subprotocol the client offered, if any.
    pub fn echo_subprotocol(mut self) -> Self {
        self.cfg.subprotocol = Subprotocol::EchoFirst;
        self
    }

    /// Always reply `Sec-WebSocket-Protocol: name`, offered or not (protocol-violation tests).
    pub fn force_subprotocol(mut self, name: &str) -> Self {
        self.cfg.subprotocol = Subprotocol::Force(name.to_string());
        self
    }

    /// `SO_RCVBUF` for the listener (inherited by accepted sockets), e.g. small for StopReading.
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.cfg.recv_buffer = Some(bytes);
        self
    }

    /// `SO_SNDBUF` for the listener (inherited by accepted sockets), e.g. small for Flood.
    pub fn send_buffer(mut self, bytes: usize) -> Self {
        self.cfg.send_buffer = Some(bytes);
        self
    }

    /// Don't keep received messages (log and channels); only count them. For memory tests.
    pub fn no_record(mut self) -> Self {
        self.cfg.record = false;
        self
    }

    /// Bind `127.0.0.1:0` (or `[::1]:0`) and start accepting.
    pub fn start(self) -> TestServer {
        let ip = if self.cfg.ipv6 {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let listener = TcpListener::bind(ip).expect("bind test server");
        let addr = listener.local_addr().expect("local_addr");
        let (msg_tx, msg_rx) = unbounded();
        let (ctl_tx, ctl_rx) = unbounded();
        let sh = Arc::new(Shared {
            cfg: self.cfg,
            behavior: Mutex::new(self.behavior),
            accepted: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            received: AtomicUsize::new(0),
            handshakes: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            msg_tx,
            msg_rx,
            ctl_tx,
            ctl_rx,
            conns: Mutex::new(Vec::new()),
        });
        let server = TestServer {
            sh,
            addr,
            running: Mutex::new(None),
        };
        server.run(listener);
        server
    }
}

#[derive(Clone, Debug)]
enum Ctrl {
    Close(u16, String),
    Drop,
    Reset,
}

struct Conn {
    ctrl: Sender<Ctrl>,
    thread: JoinHandle<()>,
}

struct Shared {
    cfg: Config,
    behavior: Mutex<Behavior>,
    accepted: AtomicUsize,
    upgraded: AtomicUsize,
    live: AtomicUsize,
    received: AtomicUsize,
    handshakes: Mutex<Vec<Handshake>>,
    log: Mutex<Vec<Received>>,
    msg_tx: Sender<Received>,
    msg_rx: Receiver<Received>,
    ctl_tx: Sender<Received>,
    ctl_rx: Receiver<Received>,
    conns: Mutex<Vec<Conn>>,
}

impl Shared {
    fn record_data(&self, conn: usize, msg: Message) {
        self.received.fetch_add(1, SeqCst);
        if self.cfg.record {
            let r = Received { conn, msg };
            self.log.lock().push(r.clone());
            let _ = self.msg_tx.send(r);
        }
    }

    fn record_ctl(&self, conn: usize, msg: Message) {
        if self.cfg.record {
            let _ = self.ctl_tx.send(Received { conn, msg });
        }
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// In-process WebSocket server on loopback. All methods take `&self`; Drop = [`TestServer::stop`].
pub struct TestServer {
    sh: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl TestServer {
    /// Plain `ws://` server with `behavior` and default options.
    pub fn start(behavior: Behavior) -> TestServer {
        Self::builder().behavior(behavior).start()
    }

    /// Plain `ws://` echo server.
    pub fn echo() -> TestServer {
        Self::start(Behavior::Echo)
    }

    /// A builder with defaults (Echo, no TLS, 127.0.0.1, recording on).
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            behavior: Behavior::Echo,
            cfg: Config {
                tls: None,
                ipv6: false,
                close_on_text: None,
                subprotocol: Subprotocol::None,
                recv_buffer: None,
                send_buffer: None,
                record: true,
            },
        }
    }

    /// Listening address (stable across `restart()`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `ws://127.0.0.1:PORT/` (or `ws://[::1]:PORT/`).
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// `wss://127.0.0.1:PORT/` (or `wss://[::1]:PORT/`).
    pub fn wss_url(&self) -> String {
        format!("wss://{}/", self.addr)
    }

    /// `wss://localhost:PORT/` (hostname verification against the `DNS:localhost` SAN).
    /// Note `localhost` may resolve to `::1` first; this server listens on one family only.
    pub fn wss_localhost_url(&self) -> String {
        format!("wss://localhost:{}/", self.addr.port())
    }

    /// Change the behaviour for connections accepted from now on.
    pub fn set_behavior(&self, b: Behavior) {
        *self.sh.behavior.lock() = b;
    }

    /// TCP connections accepted so far (all behaviours, across restarts).
    pub fn accepted(&self) -> usize {
        self.sh.accepted.load(SeqCst)
    }

    /// Successful WebSocket upgrades so far.
    pub fn upgraded(&self) -> usize {
        self.sh.upgraded.load(SeqCst)
    }

    /// Connections whose thread is still running (socket still open).
    pub fn live(&self) -> usize {
        self.sh.live.load(SeqCst)
    }

    /// Data messages (Text/Binary) received so far, counted even with `no_record()`.
    pub fn received_count(&self) -> usize {
        self.sh.received.load(SeqCst)
    }

    /// Waits until `accepted() >= n`.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        util::wait_until(timeout, || self.accepted() >= n)
    }

    /// Waits until `upgraded() >= n`.
    pub fn wait_upgraded(&self, n: usize, timeout: Duration) -> bool {
        util::wait_until(timeout, || self.upgraded() >= n)
    }

    /// Waits until `live() == n`.
    pub fn wait_live(&self, n: usize, timeout: Duration) -> bool {
        util::wait_until(timeout, || self.live() == n)
    }

    /// Waits until `received_count() >= n`.
    pub fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        util::wait_until(timeout, || self.received_count() >= n)
    }

    /// Upgrade requests seen so far (including rejected ones), in arrival order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.sh.handshakes.lock().clone()
    }

    /// The most recent upgrade request, if any.
    pub fn last_handshake(&self) -> Option<Handshake> {
        self.sh.handshakes.lock().last().cloned()
    }

    /// Channel of every data message (Text/Binary) received, all connections, arrival order.
    pub fn messages(&self) -> &Receiver<Received> {
        &self.sh.msg_rx
    }

    /// Channel of every Ping / Pong / Close received (Close also when the client answers ours).
    pub fn controls(&self) -> &Receiver<Received> {
        &self.sh.ctl_rx
    }

    /// Next data message from [`TestServer::messages`], or None after `timeout`.
    pub fn next_message(&self, timeout: Duration) -> Option<Received> {
        self.sh.msg_rx.recv_timeout(timeout).ok()
    }

    /// Snapshot of all data messages received so far (not consumed by channel reads).
    pub fn received(&self) -> Vec<Received> {
        self.sh.log.lock().clone()
    }

    /// Snapshot of the data messages received on connection `conn`.
    pub fn received_on(&self, conn: usize) -> Vec<Message> {
        self.sh
            .log
            .lock()
            .iter()
            .filter(|r| r.conn == conn)
            .map(|r| r.msg.clone())
            .collect()
    }

    /// Send Close(code, reason) on every live connection and finish the closing handshake
    /// (TCP closed after the client's reply or [`CLOSE_TIMEOUT`]). Returns immediately.
    pub fn close_all(&self, code: u16, reason: &str) {
        for c in self.sh.conns.lock().iter() {
            let _ = c.ctrl.send(Ctrl::Close(code, reason.to_string()));
        }
    }

    /// Close TCP (FIN, no close frame) on every live connection; returns when all are closed.
    pub fn disconnect_all(&self) {
        self.terminate(Ctrl::Drop);
    }

    /// Abort every live connection with RST (`SO_LINGER` 0); returns when all are closed.
    pub fn reset_all(&self) {
        self.terminate(Ctrl::Reset);
    }

    /// Stop listening (the port then refuses connections) and close every connection
    /// (FIN, no close frame); joins all threads. Idempotent.
    pub fn stop(&self) {
        if let Some(r) = self.running.lock().take() {
            r.stop.store(true, SeqCst);
            let _ = r.thread.join();
        }
        self.terminate(Ctrl::Drop);
    }

    /// `stop()` if running, then listen again on the same port (retrying the bind for
    /// up to [`REBIND_TIMEOUT`]). Counters and records are kept.
    pub fn restart(&self) {
        self.stop();
        let listener = net::bind_retry(self.addr, REBIND_TIMEOUT).expect("rebind test server");
        self.run(listener);
    }

    /// Is the server listening?
    pub fn is_running(&self) -> bool {
        self.running.lock().is_some()
    }

    fn run(&self, listener: TcpListener) {
        if let Some(n) = self.sh.cfg.recv_buffer {
            net::set_recv_buffer(&listener, n).expect("SO_RCVBUF");
        }
        if let Some(n) = self.sh.cfg.send_buffer {
            net::set_send_buffer(&listener, n).expect("SO_SNDBUF");
        }
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, stop2) = (self.sh.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("test-server-accept".into())
            .spawn(move || accept_loop(listener, sh, stop2))
            .expect("spawn accept thread");
        *self.running.lock() = Some(Running { stop, thread });
    }

    fn terminate(&self, how: Ctrl) {
        let conns = std::mem::take(&mut *self.sh.conns.lock());
        for c in &conns {
            let _ = c.ctrl.send(how.clone());
        }
        for c in conns {
            drop(c.ctrl);
            let _ = c.thread.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, SeqCst);
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(SeqCst) {
        let Some((tcp, _)) = net::accept_tick(&listener) else {
            continue;
        };
        // Only this thread increments `accepted`. A connection is registered, then counted,
        // then started: after `wait_accepted(n)` the controls reach it, and nothing the
        // client can observe (upgrade, messages) happens before it is counted.
        let id = sh.accepted.load(SeqCst);
        let behavior = sh.behavior.lock().clone();
        let (tx, rx) = unbounded();
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        sh.live.fetch_add(1, SeqCst);
        let guard = LiveGuard(sh.clone());
        let thread = std::thread::Builder::new()
            .name(format!("test-server-conn-{id}"))
            .spawn(move || {
                let guard = guard;
                if go_rx.recv().is_ok() {
                    let mut ctrl = CtrlRx { rx, stash: None };
                    run_conn(id, tcp, behavior, &guard.0, &mut ctrl);
                }
            })
            .expect("spawn connection thread");
        let mut conns = sh.conns.lock();
        let (done, alive): (Vec<Conn>, Vec<Conn>) =
            conns.drain(..).partition(|c| c.thread.is_finished());
        *conns = alive;
        conns.push(Conn { ctrl: tx, thread });
        drop(conns);
        sh.accepted.fetch_add(1, SeqCst);
        let _ = go_tx.send(());
        for c in done {
            let _ = c.thread.join();
        }
    }
}

/// Control receiver that can wait without losing the request it woke up for.
struct CtrlRx {
    rx: Receiver<Ctrl>,
    stash: Option<Ctrl>,
}

impl CtrlRx {
    /// A pending request, if any (a dropped sender means Drop).
    fn poll(&mut self) -> Option<Ctrl> {
        self.stash.take().or_else(|| match self.rx.try_recv() {
            Ok(c) => Some(c),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Ctrl::Drop),
        })
    }

    /// Wait up to `t` for a request (it is kept for the next `poll`).
    fn wait(&mut self, t: Duration) {
        if self.stash.is_none() {
            self.stash = match self.rx.recv_timeout(t) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Ctrl::Drop),
            };
        }
    }

    /// Block until a request arrives.
    fn recv(&mut self) -> Ctrl {
        self.stash
            .take()
            .unwrap_or_else(|| self.rx.recv().unwrap_or(Ctrl::Drop))
    }
}

/// Send FIN now (even if unread input would make the later close an RST).
fn fin(tcp: &TcpStream) {
    let _ = tcp.shutdown(Shutdown::Write);
}

fn reset_stream(s: Stream) {
    let _ = net::set_linger_zero(s.tcp());
    drop(s);
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if net::would_block(io))
}

fn run_conn(id: usize, tcp: TcpStream, behavior: Behavior, sh: &Shared, ctrl: &mut CtrlRx) {
    let _ = tcp.set_nodelay(true);
    if tcp.set_nonblocking(true).is_err() {
        return;
    }
    if behavior == Behavior::Hang {
        match ctrl.recv() {
            Ctrl::Reset => net::reset(tcp),
            Ctrl::Close(..) | Ctrl::Drop => fin(&tcp),
        }
        return;
    }
    let stream = match &sh.cfg.tls {
        None => Stream::Plain(tcp),
        Some(acceptor) => match tls_accept(acceptor, tcp, ctrl) {
            Some(s) => Stream::Tls(Box::new(s)),
            None => return,
        },
    };
    let Some(ws) = ws_accept(id, stream, &behavior, sh, ctrl) else {
        return;
    };
    sh.upgraded.fetch_add(1, SeqCst);
    match behavior {
        Behavior::DropAfterUpgrade => fin(ws.get_ref().tcp()),
        Behavior::ResetAfterUpgrade => reset_stream(ws.into_inner()),
        Behavior::NoPong | Behavior::AppHeartbeat => {
            let app = behavior == Behavior::AppHeartbeat;
            RawConn::new(id, ws.into_inner(), app, sh).run(ctrl)
        }
        _ => ws_loop(id, ws, &behavior, sh, ctrl),
    }
}

fn tls_accept(
    acceptor: &native_tls::TlsAcceptor,
    tcp: TcpStream,
    ctrl: &mut CtrlRx,
) -> Option<native_tls::TlsStream<TcpStream>> {
    let mut res = acceptor.accept(tcp);
    loop {
        match res {
            Ok(s) => return Some(s),
            Err(native_tls::HandshakeError::Failure(_)) => return None,
            Err(native_tls::HandshakeError::WouldBlock(mid)) => {
                if let Some(c) = ctrl.poll() {
                    if let Ctrl::Reset = c {
                        let _ = net::set_linger_zero(mid.get_ref());
                    }
                    return None;
                }
                net::wait_fd(net::raw(mid.get_ref()), true, false, TICK);
                res = mid.handshake();
            }
        }
    }
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
fn ws_accept(
    id: usize,
    stream: Stream,
    behavior: &Behavior,
    sh: &Shared,
    ctrl: &mut CtrlRx,
) -> Option<WebSocket<Stream>> {
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let hs = Handshake {
            conn: id,
            path: req.uri().to_string(),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_string(), v)
                })
                .collect(),
        };
        let chosen = match &sh.cfg.subprotocol {
            Subprotocol::None => None,
            Subprotocol::Accept(p) => hs.subprotocols().contains(p).then(|| p.clone()),
            Subprotocol::EchoFirst => hs.subprotocols().into_iter().next(),
            Subprotocol::Force(p) => Some(p.clone()),
        };
        sh.handshakes.lock().push(hs);
        if let Behavior::Reject { status, headers } = behavior {
            let mut b = http::Response::builder().status(*status);
            for (k, v) in headers {
                b = b.header(k.as_str(), v.as_str());
            }
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            {
                b = b.header("Content-Length", "0");
            }
            return Err(b.body(None).expect("valid reject response"));
        }
        if let Some(p) = chosen {
            let v = http::HeaderValue::from_str(&p).expect("valid subprotocol");
            resp.headers_mut().insert("Sec-WebSocket-Protocol", v);
        }
        Ok(resp)
    };
    let mut res = tungstenite::accept_hdr_with_config(stream, callback, None);
    loop {
        match res {
            Ok(ws) => return Some(ws),
            Err(HandshakeError::Failure(_)) => return None,
            Err(HandshakeError::Interrupted(mid)) => {
                let s = mid.get_ref().get_ref();
                if let Some(c) = ctrl.poll() {
                    if let Ctrl::Reset = c {
                        let _ = net::set_linger_zero(s.tcp());
                    }
                    return None;
                }
                net::wait_fd(s.fd(), true, false, TICK);
                res = mid.handshake();
            }
        }
    }
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}

/// Queue a close frame; false if the connection is already broken.
fn start_close(ws: &mut WebSocket<Stream>, code: u16, reason: &str) -> bool {
    match ws.close(Some(close_frame(code, reason))) {
        Ok(()) => true,
        Err(e) => would_block(&e),
    }
}

/// tungstenite-driven loop for Echo, Flood, StopReading, Silent and CloseAfterUpgrade.
fn ws_loop(
    id: usize,
    mut ws: WebSocket<Stream>,
    behavior: &Behavior,
    sh: &Shared,
    ctrl: &mut CtrlRx,
) {
    let (mut flood_left, flood_size) = match behavior {
        Behavior::Flood { count, size } => (*count, *size),
        _ => (0, 0),
    };
    let flooding = flood_left > 0;
    let mut flood_i = 0usize;
    let stop_reading = *behavior == Behavior::StopReading;
    let (ping_every, data_every, silent) = match behavior {
        Behavior::Silent {
            ping_every,
            data_every,
        } => (*ping_every, *data_every, true),
        _ => (None, None, false),
    };
    let start = Instant::now();
    let (mut next_ping, mut next_data) =
        (ping_every.map(|d| start + d), data_every.map(|d| start + d));
    let mut ticks = 0usize;
    let mut closing: Option<Instant> = None;
    if let Behavior::CloseAfterUpgrade { code, reason } = behavior {
        if !start_close(&mut ws, *code, reason) {
            return;
        }
        closing = Some(Instant::now() + CLOSE_TIMEOUT);
    }
    let mut pending = false;
    loop {
        match ctrl.poll() {
            Some(Ctrl::Close(code, reason)) if closing.is_none() => {
                if !start_close(&mut ws, code, &reason) {
                    return;
                }
                closing = Some(Instant::now() + CLOSE_TIMEOUT);
            }
            Some(Ctrl::Close(..)) => {}
            Some(Ctrl::Reset) => return reset_stream(ws.into_inner()),
            Some(Ctrl::Drop) => return fin(ws.get_ref().tcp()),
            None => {}
        }
        if closing.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let mut progressed = false;

        // Silent: the server's own pings and unsolicited data, on their periods.
        let now = Instant::now();
        if closing.is_none() && !pending {
            if let (Some(at), Some(every)) = (next_ping, ping_every)
                && now >= at
            {
                next_ping = Some(at + every);
                match ws.write(Message::Ping(Bytes::from_static(b"server"))) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => pending = true,
                    Err(_) => return,
                }
                progressed = true;
            }
            if let (Some(at), Some(every)) = (next_data, data_every)
                && now >= at
            {
                next_data = Some(at + every);
                ticks += 1;
                match ws.write(Message::text(format!("tick-{ticks}"))) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => pending = true,
                    Err(_) => return,
                }
                progressed = true;
            }
        }

        // Flood: queue messages while the previous ones could be written out.
        if flood_left > 0 && closing.is_none() && !pending {
            for _ in 0..64 {
                if flood_left == 0 {
                    break;
                }
                let res = ws.write(Message::text(flood_message(flood_i, flood_size)));
                match res {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => pending = true, // queued, not yet written
                    Err(_) => return,
                }
                flood_i += 1;
                flood_left -= 1;
                progressed = true;
                if pending {
                    break;
                }
            }
        }

        // Read (a plain echo server stops reading while its replies are not written out;
        // a flooding one keeps reading so the client's writes are never blocked by it).
        let may_read = (!stop_reading || closing.is_some()) && (!pending || flooding);
        if may_read {
            for _ in 0..256 {
                match ws.read() {
                    Ok(msg) => {
                        progressed = true;
                        match msg {
                            Message::Text(_) | Message::Binary(_) => {
                                sh.record_data(id, msg.clone());
                                if closing.is_some() || silent {
                                    continue;
                                }
                                if let Some((t, code, reason)) = &sh.cfg.close_on_text
                                    && msg.to_text().is_ok_and(|m| m == t)
                                {
                                    if !start_close(&mut ws, *code, reason) {
                                        return;
                                    }
                                    closing = Some(Instant::now() + CLOSE_TIMEOUT);
                                    continue;
                                }
                                match ws.write(msg) {
                                    Ok(()) => {}
                                    Err(e) if would_block(&e) => pending = true,
                                    Err(_) => return,
                                }
                            }
                            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => {
                                sh.record_ctl(id, msg)
                            }
                            Message::Frame(_) => {}
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    // ConnectionClosed (closing handshake done), EOF, reset, protocol error.
                    Err(_) => return,
                }
                if pending && !flooding {
                    break;
                }
            }
        }

        // Write out everything queued (echoes, flood, pongs, close replies).
        match ws.flush() {
            Ok(()) => {
                if pending {
                    progressed = true;
                }
                pending = false;
            }
            Err(e) if would_block(&e) => pending = true,
            Err(_) => return,
        }

        if progressed || (flood_left > 0 && !pending && closing.is_none()) {
            continue;
        }
        let want_read = (!stop_reading || closing.is_some()) && (!pending || flooding);
        if !want_read && !pending {
            ctrl.wait(TICK);
        } else {
            net::wait_fd(ws.get_ref().fd(), want_read, pending, TICK);
        }
    }
}

/// Frame-level connection for NoPong / AppHeartbeat: pings are recorded but never answered.
struct RawConn<'a> {
    id: usize,
    fs: FrameSocket<Stream>,
    app_heartbeat: bool,
    sh: &'a Shared,
    /// Data message being reassembled: (is_text, payload).
    partial: Option<(bool, Vec<u8>)>,
    /// Deadline of the closing handshake once we sent Close.
    closing: Option<Instant>,
    /// The peer sent Close (we replied): exit once written out.
    peer_closed: bool,
    pending: bool,
}

impl<'a> RawConn<'a> {
    fn new(id: usize, stream: Stream, app_heartbeat: bool, sh: &'a Shared) -> Self {
        RawConn {
            id,
            fs: FrameSocket::new(stream),
            app_heartbeat,
            sh,
            partial: None,
            closing: None,
            peer_closed: false,
            pending: false,
        }
    }

    /// Queue a frame; false if the connection is broken.
    fn send(&mut self, frame: Frame) -> bool {
        match self.fs.write(frame) {
            Ok(()) => true,
            Err(e) if would_block(&e) => {
                self.pending = true;
                true
            }
            Err(_) => false,
        }
    }

    fn start_close(&mut self, code: u16, reason: &str) -> bool {
        if self.closing.is_some() || self.peer_closed {
            return true;
        }
        self.closing = Some(Instant::now() + CLOSE_TIMEOUT);
        self.send(Frame::close(Some(close_frame(code, reason))))
    }

    fn run(mut self, ctrl: &mut CtrlRx) {
        loop {
            let ok = match ctrl.poll() {
                Some(Ctrl::Close(code, reason)) => self.start_close(code, &reason),
                Some(Ctrl::Reset) => return reset_stream(self.fs.into_inner().0),
                Some(Ctrl::Drop) => return fin(self.fs.get_ref().tcp()),
                None => true,
            };
            if !ok {
                return;
            }
            if self.closing.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            let mut progressed = false;
            if !self.pending && !self.peer_closed {
                for _ in 0..256 {
                    match self.fs.read(None) {
                        Ok(Some(frame)) => {
                            progressed = true;
                            if !self.on_frame(frame) {
                                return;
                            }
                            if self.pending || self.peer_closed {
                                break;
                            }
                        }
                        Ok(None) => return, // EOF
                        Err(e) if would_block(&e) => break,
                        Err(_) => return,
                    }
                }
            }
            match self.fs.flush() {
                Ok(()) => {
                    if self.pending {
                        progressed = true;
                    }
                    self.pending = false;
                }
                Err(e) if would_block(&e) => self.pending = true,
                Err(_) => return,
            }
            if self.peer_closed && !self.pending {
                return;
            }
            if !progressed {
                let fd = self.fs.get_ref().fd();
                net::wait_fd(fd, !self.pending, self.pending, TICK);
            }
        }
    }

    /// Handle one client frame; false to drop the connection.
    fn on_frame(&mut self, mut frame: Frame) -> bool {
        let mask = frame.header_mut().mask.take();
        let (opcode, fin) = (frame.header().opcode, frame.header().is_final);
        let mut payload = frame.into_payload().to_vec();
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i & 3];
            }
        }
        match opcode {
            OpCode::Control(OpCtl::Ping) => {
                // Deliberately unanswered.
                self.sh.record_ctl(self.id, Message::Ping(payload.into()));
                true
            }
            OpCode::Control(OpCtl::Pong) => {
                self.sh.record_ctl(self.id, Message::Pong(payload.into()));
                true
            }
            OpCode::Control(OpCtl::Close) => {
                let cf = (payload.len() >= 2).then(|| {
                    close_frame(
                        u16::from_be_bytes([payload[0], payload[1]]),
                        &String::from_utf8_lossy(&payload[2..]),
                    )
                });
                self.sh.record_ctl(self.id, Message::Close(cf.clone()));
                if self.closing.is_some() {
                    // Reply to our close: handshake complete.
                    self.peer_closed = true;
                    return true;
                }
                self.peer_closed = true;
                let reply = cf.map(|c| CloseFrame {
                    code: c.code,
                    reason: "".into(),
                });
                self.send(Frame::close(reply))
            }
            OpCode::Control(OpCtl::Reserved(_)) => false,
            OpCode::Data(d) => {
                match d {
                    OpData::Text | OpData::Binary if self.partial.is_some() => return false,
                    OpData::Text => self.partial = Some((true, payload)),
                    OpData::Binary => self.partial = Some((false, payload)),
                    OpData::Continue => match &mut self.partial {
                        Some((_, buf)) => buf.extend_from_slice(&payload),
                        None => return false,
                    },
                    OpData::Reserved(_) => return false,
                }
                if !fin {
                    return true;
                }
                let (is_text, data) = self.partial.take().expect("message in progress");
                self.on_message(is_text, data)
            }
        }
    }

    fn on_message(&mut self, is_text: bool, data: Vec<u8>) -> bool {
        let msg = if is_text {
            Message::text(String::from_utf8_lossy(&data).into_owned())
        } else {
            Message::binary(data.clone())
        };
        self.sh.record_data(self.id, msg);
        if self.closing.is_some() {
            return true;
        }
        if is_text {
            if let Some((t, code, reason)) = self.sh.cfg.close_on_text.clone()
                && data == t.as_bytes()
            {
                return self.start_close(code, &reason);
            }
            if self.app_heartbeat && is_app_ping(&data) {
                let pong = Frame::message(
                    Bytes::from_static(br#"{"op":"pong"}"#),
                    OpCode::Data(OpData::Text),
                    true,
                );
                return self.send(pong);
            }
        }
        let op = if is_text {
            OpData::Text
        } else {
            OpData::Binary
        };
        self.send(Frame::message(data, OpCode::Data(op), true))
    }
}

/// Is `data` the app-level ping `{"op":"ping"}` (whitespace ignored)?
fn is_app_ping(data: &[u8]) -> bool {
    let compact: Vec<u8> = data
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    compact == br#"{"op":"ping"}"#
}
