//! The loopback server every benchmark uses: plain tungstenite, one thread per connection,
//! TCP_NODELAY on, optional TLS (native-tls with the test certificate). The request path
//! selects what a connection does:
//!
//! * `/echo`: echo Text/Binary back (pings answered by tungstenite, and counted).
//! * `/sink`: read and count Binary; on Text `done` answer Text with the count.
//! * `/flood`: on Text `go N SIZE` write N Binary messages of SIZE bytes as fast as
//!   possible (buffered writes), then Text `end`.
//! * `/stream/SIZE[/RATE]`: flood Binary messages of SIZE bytes without end (at most RATE
//!   messages/s when given, released every millisecond) while draining (and discarding)
//!   whatever the client sends (nonblocking socket + poll).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use native_tls::TlsAcceptor;
use parking_lot::Mutex;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Bytes, Message, WebSocket};

use crate::util;

struct Shared {
    acceptor: Option<TlsAcceptor>,
    stack: usize,
    cfg: WebSocketConfig,
    stop: AtomicBool,
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
    pings: Arc<AtomicU64>,
    live: AtomicU64,
}

pub struct Server {
    pub addr: SocketAddr,
    pub tls: bool,
    accept: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Server {
    /// A server on a free loopback port.
    pub fn start(tls: bool) -> Server {
        Self::start_on(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            256 << 10,
            WebSocketConfig::default(),
        )
        .expect("bench server")
    }

    /// A server on `addr` (std sets SO_REUSEADDR, so a just-stopped port can be reused).
    pub fn start_on(
        addr: SocketAddr,
        tls: bool,
        stack: usize,
        cfg: WebSocketConfig,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let acceptor = if tls {
            Some(TlsAcceptor::new(util::server_identity()).map_err(io::Error::other)?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            acceptor,
            stack,
            cfg,
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            pings: Arc::new(AtomicU64::new(0)),
            live: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("bench-srv-accept".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(Server {
            addr,
            tls,
            accept: Some(accept),
            shared,
        })
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// WebSocket pings received so far (all connections).
    pub fn pings(&self) -> u64 {
        self.shared.pings.load(Ordering::Relaxed)
    }

    /// Connections currently being served.
    pub fn live(&self) -> u64 {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Stops accepting, shuts every connection down (the clients see a reset / EOF) and
    /// joins every thread.
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread; it sees the flag and returns (dropping the listener).
        let _ = TcpStream::connect(self.addr);
        let _ = accept.join();
        let conns = std::mem::take(&mut *self.shared.conns.lock());
        for (s, _) in &conns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    loop {
        let tcp = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => continue,
        };
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = tcp.set_nodelay(true);
        let Ok(ctl) = tcp.try_clone() else { continue };
        let s2 = sh.clone();
        let h = std::thread::Builder::new()
            .name("bench-srv-conn".into())
            .stack_size(sh.stack)
            .spawn(move || conn_main(tcp, s2));
        if let Ok(h) = h {
            let mut conns = sh.conns.lock();
            // Forget finished connections so a long run does not pile them up.
            conns.retain(|(_, h)| !h.is_finished());
            conns.push((ctl, h));
        }
    }
}

fn conn_main(tcp: TcpStream, sh: Arc<Shared>) {
    let Ok(ctl) = tcp.try_clone() else { return };
    sh.live.fetch_add(1, Ordering::Relaxed);
    match &sh.acceptor {
        None => serve(tcp, &ctl, &sh),
        Some(acc) => {
            if let Ok(s) = acc.accept(tcp) {
                serve(s, &ctl, &sh);
            }
        }
    }
    // The registry holds a dup of the socket: shut it so the client sees the end.
    let _ = ctl.shutdown(Shutdown::Both);
    sh.live.fetch_sub(1, Ordering::Relaxed);
}

// The handshake callback's `Result` type is tungstenite's.
#[allow(clippy::result_large_err)]
fn serve<S: Read + Write>(stream: S, ctl: &TcpStream, sh: &Shared) {
    let mut path = String::new();
    let cb = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(ws) = tungstenite::accept_hdr_with_config(stream, cb, Some(sh.cfg)) else {
        return;
    };
    if path == "/sink" {
        sink(ws, sh);
    } else if path == "/flood" {
        flood(ws, sh);
    } else if let Some(spec) = path.strip_prefix("/stream/") {
        let mut it = spec.split('/').map(|v| v.parse().unwrap_or(0));
        let size = it.next().unwrap_or(64);
        let rate = it.next().unwrap_or(0);
        stream_forever(ws, ctl, size, rate as u64, sh);
    } else {
        echo(ws, sh);
    }
}

fn echo<S: Read + Write>(mut ws: WebSocket<S>, sh: &Shared) {
    loop {
        match ws.read() {
            Ok(m @ (Message::Binary(_) | Message::Text(_))) => {
                if ws.send(m).is_err() {
                    return;
                }
            }
            // tungstenite queued the pong; the next read() flushes it.
            Ok(Message::Ping(_)) => {
                sh.pings.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn sink<S: Read + Write>(mut ws: WebSocket<S>, sh: &Shared) {
    let mut n = 0u64;
    loop {
        match ws.read() {
            Ok(Message::Binary(_)) => n += 1,
            Ok(Message::Text(t)) if t.as_str() == "done" => {
                if ws.send(Message::text(n.to_string())).is_err() {
                    return;
                }
                n = 0;
            }
            Ok(Message::Ping(_)) => {
                sh.pings.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn flood<S: Read + Write>(mut ws: WebSocket<S>, sh: &Shared) {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let mut it = t.as_str().split_whitespace().skip(1);
                let n: usize = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let size: usize = it.next().and_then(|v| v.parse().ok()).unwrap_or(64);
                let payload = Bytes::from(vec![0xA5u8; size]);
                for _ in 0..n {
                    // Buffered; tungstenite writes out whenever 128 KiB are pending.
                    if ws.write(Message::Binary(payload.clone())).is_err() {
                        return;
                    }
                }
                if ws.send(Message::text("end")).is_err() {
                    return;
                }
            }
            Ok(Message::Ping(_)) => {
                sh.pings.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

fn stream_forever<S: Read + Write>(
    mut ws: WebSocket<S>,
    ctl: &TcpStream,
    size: usize,
    rate: u64,
    sh: &Shared,
) {
    if ctl.set_nonblocking(true).is_err() {
        return;
    }
    let payload = Bytes::from(vec![0x5Au8; size]);
    let fd = ctl.as_raw_fd();
    let mut pending = false;
    let start = std::time::Instant::now();
    let mut written = 0u64;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        loop {
            match ws.read() {
                Ok(Message::Ping(_)) => {
                    sh.pings.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(_) => return,
            }
        }
        if pending {
            match ws.flush() {
                Ok(()) => pending = false,
                Err(e) if would_block(&e) => {}
                Err(_) => return,
            }
        }
        // Messages allowed now (token bucket for a paced flood).
        let allowed = if rate == 0 {
            32
        } else {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            // A client that cannot keep up does not build an ever larger backlog.
            written = written.max(due.saturating_sub(1024));
            due.saturating_sub(written).min(256)
        };
        if !pending && allowed > 0 {
            for _ in 0..allowed {
                written += 1;
                match ws.write(Message::Binary(payload.clone())) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {
                        pending = true;
                        break;
                    }
                    Err(_) => return,
                }
            }
            if !pending {
                match ws.flush() {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => pending = true,
                    Err(_) => return,
                }
            }
        }
        if pending || allowed == 0 {
            let mut p = libc::pollfd {
                fd,
                events: if pending {
                    libc::POLLIN | libc::POLLOUT
                } else {
                    libc::POLLIN
                },
                revents: 0,
            };
            let ms = if pending { 50 } else { 1 };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, ms) };
        }
    }
}

/// Entry point of the child process that serves the scale benchmark (echo, 64 KiB stacks,
/// 4 KiB read buffers). Prints `PORT n`, then answers `stats` lines on stdin with
/// `STATS pings P live L rss_kib R`; exits when stdin closes.
pub fn scale_server_main() {
    util::raise_nofile();
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let srv = Server::start_on("127.0.0.1:0".parse().unwrap(), false, 64 << 10, cfg)
        .expect("scale server");
    let mut out = io::stdout();
    util::say(&mut out, &format!("PORT {}", srv.addr.port()));
    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if line.trim() == "stats" {
                    let msg = format!(
                        "STATS pings {} live {} rss_kib {}",
                        srv.pings(),
                        srv.live(),
                        util::rss_kib()
                    );
                    util::say(&mut out, &msg);
                }
            }
        }
    }
    // Exit without joining a thousand connection threads.
    std::process::exit(0);
}

/// Entry point of the child process that serves the echo latency benchmark (`/echo`,
/// default settings; TLS when `WSBEAT_BENCH_TLS` is set). Prints `PORT n`; exits when
/// stdin closes.
pub fn echo_server_main() {
    let srv = Server::start(std::env::var_os("WSBEAT_BENCH_TLS").is_some());
    util::say(&mut io::stdout(), &format!("PORT {}", srv.addr.port()));
    let mut line = String::new();
    while matches!(io::stdin().read_line(&mut line), Ok(n) if n > 0) {
        line.clear();
    }
    std::process::exit(0);
}

/// An echo server in a process of its own (see [`echo_server_main`]): the clients'
/// threads and allocations do not share a process with it, as with a real server.
pub struct ChildServer {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub tls: bool,
}

impl ChildServer {
    pub fn spawn(tls: bool) -> ChildServer {
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.env(crate::ROLE_ENV, "echo-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if tls {
            cmd.env("WSBEAT_BENCH_TLS", "1");
        } else {
            cmd.env_remove("WSBEAT_BENCH_TLS");
        }
        let mut child = cmd.spawn().expect("spawn echo-server");
        let port = util::read_port(&mut io::BufReader::new(child.stdout.take().unwrap()));
        ChildServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls,
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{path}", self.addr)
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
