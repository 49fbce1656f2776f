//! [`FaultProxy`]: a TCP forwarding proxy on loopback with fault injection.
//!
//! One accept thread plus two threads per connection (one per direction). Sockets are
//! non-blocking; every thread re-checks the controls at least every [`net::TICK`].

use super::net::{self, TICK};
use super::util;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Timeout for connecting to the target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes one direction holds in its delay queue before it stops reading.
const MAX_QUEUED: usize = 4 << 20;

/// A direction of forwarding, for [`FaultProxy::cut_mid_frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to target (the client's writes).
    ToServer,
    /// Target to client (what the client reads).
    ToClient,
    /// Whichever carries the next chunk.
    Either,
}

impl Dir {
    fn covers(self, d: Dir) -> bool {
        self == Dir::Either || self == d
    }
}

struct State {
    blackhole: bool,
    delay: Duration,
    cut: Option<Dir>,
}

const ALIVE: u8 = 0;
const KILL_FIN: u8 = 1;
const KILL_RST: u8 = 2;

struct Pair {
    client: TcpStream,
    server: TcpStream,
    kill: AtomicU8,
    // Declared last: dropped after both sockets are closed.
    _live: LiveCount,
}

impl Pair {
    /// RST both sides (effective when the last thread lets go of the pair).
    fn abort(&self) {
        let _ = net::set_linger_zero(&self.client);
        let _ = net::set_linger_zero(&self.server);
        self.kill.store(KILL_RST, SeqCst);
    }

    /// FIN both sides now; the sockets close when the last thread lets go.
    fn finish(&self) {
        let _ = self.client.shutdown(Shutdown::Write);
        let _ = self.server.shutdown(Shutdown::Write);
        let _ = self.kill.compare_exchange(ALIVE, KILL_FIN, SeqCst, SeqCst);
    }
}

struct LiveCount(Arc<AtomicUsize>);

impl Drop for LiveCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

struct PConn {
    pair: Weak<Pair>,
    threads: Vec<JoinHandle<()>>,
}

impl PConn {
    fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }
}

struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    refuse: AtomicBool,
    accepted: AtomicUsize,
    live: Arc<AtomicUsize>,
    conns: Mutex<Vec<PConn>>,
}

/// TCP proxy `127.0.0.1:PORT` -> target. All methods take `&self`; Drop = [`FaultProxy::stop`].
pub struct FaultProxy {
    sh: Arc<Shared>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Start forwarding from a fresh `127.0.0.1:0` to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("local_addr");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let sh = Arc::new(Shared {
            target,
            state: Mutex::new(State {
                blackhole: false,
                delay: Duration::ZERO,
                cut: None,
            }),
            refuse: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            live: Arc::new(AtomicUsize::new(0)),
            conns: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (sh2, stop2) = (sh.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fault-proxy-accept".into())
            .spawn(move || accept_loop(listener, sh2, stop2))
            .expect("spawn proxy accept thread");
        FaultProxy {
            sh,
            addr,
            stop,
            accept: Mutex::new(Some(thread)),
        }
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT/` of the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// `wss://127.0.0.1:PORT/` of the proxy (TLS passes through untouched).
    pub fn wss_url(&self) -> String {
        format!("wss://{}/", self.addr)
    }

    /// Stop forwarding in both directions on all connections (current and new) without
    /// closing anything: nothing is read, so bytes wait in kernel buffers and senders
    /// eventually stall. On return no further byte is delivered until [`FaultProxy::resume`].
    pub fn blackhole(&self) {
        self.sh.state.lock().blackhole = true;
    }

    /// Undo [`FaultProxy::blackhole`]: held bytes are delivered in order, nothing is lost.
    pub fn resume(&self) {
        self.sh.state.lock().blackhole = false;
    }

    /// Delay each chunk read from now on by `d` before forwarding it (throughput unaffected).
    pub fn set_delay(&self, d: Duration) {
        self.sh.state.lock().delay = d;
    }

    /// Arm a cut: the next chunk read in direction `dir` (any connection) is forwarded
    /// only in part (its first half, rounded down), then both sides of that connection get RST.
    pub fn cut_mid_frame(&self, dir: Dir) {
        self.sh.state.lock().cut = Some(dir);
    }

    /// Is a cut still armed (no matching chunk seen yet)?
    pub fn cut_pending(&self) -> bool {
        self.sh.state.lock().cut.is_some()
    }

    /// While true, new connections are accepted and immediately closed (not forwarded).
    pub fn refuse(&self, on: bool) {
        self.sh.refuse.store(on, SeqCst);
    }

    /// Abort every live connection with RST on both sides; returns when all are closed.
    pub fn reset_all(&self) {
        self.terminate(Pair::abort);
    }

    /// Close every live connection with FIN on both sides; returns when all are closed.
    pub fn close_all(&self) {
        self.terminate(Pair::finish);
    }

    /// Live forwarded connections (both sockets still open).
    pub fn connections(&self) -> usize {
        self.sh.live.load(SeqCst)
    }

    /// TCP connections accepted so far (including refused ones and failed upstream connects).
    pub fn accepted(&self) -> usize {
        self.sh.accepted.load(SeqCst)
    }

    /// Waits until `accepted() >= n`.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        util::wait_until(timeout, || self.accepted() >= n)
    }

    /// Waits until `connections() == n`.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> bool {
        util::wait_until(timeout, || self.connections() == n)
    }

    /// Stop accepting (the port then refuses), FIN all connections and join all threads. Idempotent.
    pub fn stop(&self) {
        if let Some(t) = self.accept.lock().take() {
            self.stop.store(true, SeqCst);
            let _ = t.join();
        }
        self.close_all();
    }

    fn terminate(&self, how: fn(&Pair)) {
        let conns = std::mem::take(&mut *self.sh.conns.lock());
        for c in &conns {
            if let Some(p) = c.pair.upgrade() {
                how(&p);
            }
        }
        for c in conns {
            for t in c.threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(SeqCst) {
        let Some((client, _)) = net::accept_tick(&listener) else {
            continue;
        };
        if !sh.refuse.load(SeqCst)
            && let Ok(server) = TcpStream::connect_timeout(&sh.target, CONNECT_TIMEOUT)
        {
            forward(&sh, client, server);
        }
        // Refused / upstream unreachable: `client` was dropped (closed) above.
        sh.accepted.fetch_add(1, SeqCst);
    }
}

fn forward(sh: &Arc<Shared>, client: TcpStream, server: TcpStream) {
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        if s.set_nonblocking(true).is_err() {
            return;
        }
    }
    sh.live.fetch_add(1, SeqCst);
    let pair = Arc::new(Pair {
        client,
        server,
        kill: AtomicU8::new(ALIVE),
        _live: LiveCount(sh.live.clone()),
    });
    let threads = [Dir::ToServer, Dir::ToClient]
        .into_iter()
        .map(|dir| {
            let (p, s) = (pair.clone(), sh.clone());
            std::thread::Builder::new()
                .name(format!("fault-proxy-{dir:?}"))
                .spawn(move || pump(p, dir, s))
                .expect("spawn proxy thread")
        })
        .collect();
    let mut conns = sh.conns.lock();
    let (done, alive): (Vec<PConn>, Vec<PConn>) = conns.drain(..).partition(PConn::is_finished);
    *conns = alive;
    conns.push(PConn {
        pair: Arc::downgrade(&pair),
        threads,
    });
    drop(conns);
    for c in done {
        for t in c.threads {
            let _ = t.join();
        }
    }
}

struct Chunk {
    due: Instant,
    data: Vec<u8>,
    /// RST the connection once this chunk is written.
    cut_after: bool,
}

/// Forward one direction until EOF (propagated as FIN), an error or a kill.
fn pump(pair: Arc<Pair>, dir: Dir, sh: Arc<Shared>) {
    let (src, dst) = match dir {
        Dir::ToServer => (&pair.client, &pair.server),
        _ => (&pair.server, &pair.client),
    };
    let mut queue: VecDeque<Chunk> = VecDeque::new();
    let mut queued = 0usize;
    let mut eof = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if pair.kill.load(SeqCst) != ALIVE {
            return;
        }
        let mut progressed = false;
        let mut want_write = false;
        let open;
        {
            // Reads and writes happen under the lock, so once `blackhole()` returns no
            // byte moves any more.
            let mut st = sh.state.lock();
            open = !st.blackhole;
            let now = Instant::now();
            if open && !eof && queued < MAX_QUEUED {
                match (&*src).read(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        progressed = true;
                    }
                    Ok(n) => {
                        let cut = st.cut.is_some_and(|c| c.covers(dir));
                        let keep = if cut { n / 2 } else { n };
                        if cut {
                            st.cut = None;
                        }
                        queue.push_back(Chunk {
                            due: now + st.delay,
                            data: buf[..keep].to_vec(),
                            cut_after: cut,
                        });
                        queued += keep;
                        progressed = true;
                    }
                    Err(e) if net::would_block(&e) => {}
                    Err(_) => return pair.abort(),
                }
            }
            if open {
                while let Some(c) = queue.front_mut() {
                    if c.due > now {
                        break;
                    }
                    if !c.data.is_empty() {
                        match (&*dst).write(&c.data) {
                            Ok(n) => {
                                c.data.drain(..n);
                                queued -= n;
                                progressed = true;
                            }
                            Err(e) if net::would_block(&e) => {
                                want_write = true;
                                break;
                            }
                            Err(_) => return pair.abort(),
                        }
                    }
                    if c.data.is_empty() {
                        let cut = c.cut_after;
                        queue.pop_front();
                        if cut {
                            return pair.abort();
                        }
                    }
                }
            }
        }
        if eof && queue.is_empty() {
            let _ = dst.shutdown(Shutdown::Write);
            return;
        }
        if progressed {
            continue;
        }
        let mut timeout = TICK;
        if let Some(c) = queue.front()
            && !want_write
        {
            timeout = timeout.min(c.due.saturating_duration_since(Instant::now()));
        }
        let want_read = open && !eof && queued < MAX_QUEUED;
        net::poll_fds(
            &[
                (net::raw(src), want_read, false),
                (net::raw(dst), false, open && want_write),
            ],
            timeout,
        );
    }
}

/// Reads with a deadline from a blocking stream; returns what arrived (empty on timeout).
/// Handy for asserting that nothing gets through a blackholed proxy.
pub fn read_for(stream: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 64 * 1024];
    match stream.read(&mut buf) {
        Ok(n) => Ok(buf[..n].to_vec()),
        Err(e) if net::would_block(&e) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
