//! A hostile server: after a correct upgrade it sends garbage, oversized frames and
//! messages, invalid UTF-8, reserved opcodes, invalid close codes, ping and fragment
//! floods; before the upgrade it never finishes its response or announces a 1 GB body.
//! The client must report a typed error, recover per its reconnect policy, and never
//! panic, hang or grow memory without bound. A generative test plays random valid and
//! invalid frame sequences from a seeded RNG.
//!
//! The server here is written on a raw `TcpListener` (not `support::server`), so it can
//! break the protocol in every way. Tests that measure memory hold `util::exclusive()`.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::client::Fixed;
use support::client::{client_panics, watch_panics};
use support::upgrade::websocket_key;

use parking_lot::Mutex;
use support::{net, util};
use wsbeat::{
    Client, ClientBuilder, ConnectStage, DisconnectReason, Error, Event, Heartbeat, Limits, Message,
};

/// Upper bound for anything that should happen "now".
const T: Duration = Duration::from_secs(10);
/// Memory a single attack may add to the process, at its peak.
const RSS_BUDGET_KIB: u64 = 64 << 10;

// ---------------------------------------------------------------------------------------
// Panics in the client's threads (their JoinHandle results are ignored by the client, so
// a panic there would otherwise go unnoticed).

fn assert_no_client_panic() {
    assert_eq!(
        client_panics(),
        0,
        "a wsbeat-* thread panicked (see the output above)"
    );
}

// ---------------------------------------------------------------------------------------
// Seeded RNG (splitmix64): deterministic sequences, replayable from the printed seed.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Frame encoding (server to client: unmasked unless asked).

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Frame header for first byte `b0` announcing `len` payload bytes.
fn header(b0: u8, len: u64, masked: bool) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut out = vec![b0];
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out
}

fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = header(b0, payload.len() as u64, false);
    out.extend_from_slice(payload);
    out
}

fn masked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut out = header(b0, payload.len() as u64, true);
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    out
}

fn text(s: &str) -> Vec<u8> {
    frame(FIN | OP_TEXT, s.as_bytes())
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

// ---------------------------------------------------------------------------------------
// The hostile server.

/// One accepted connection, handed to a script after the request head was read (and,
/// in upgrade mode, after a correct `101` answer).
struct Peer {
    id: usize,
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    /// The client's request head.
    request: String,
}

impl Peer {
    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Writes all of `bytes`; false once the client is gone or the server stops.
    fn send(&mut self, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.stopped() {
                return false;
            }
            match self.stream.write(rest) {
                Ok(0) => return false,
                Ok(n) => rest = &rest[n..],
                Err(e) if net::would_block(&e) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads and discards whatever the client sends until it closes, the server stops,
    /// or `max` has passed.
    fn drain_until_closed(&mut self, max: Duration) {
        let deadline = Instant::now() + max;
        let mut buf = [0u8; 16 << 10];
        while !self.stopped() && Instant::now() < deadline {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if net::would_block(&e) => {}
                Err(_) => return,
            }
        }
    }

    /// Waits until the client closed the connection (or the server stops / `max` passes),
    /// discarding what it sends, without closing our side first.
    fn hold(&mut self, max: Duration) {
        self.drain_until_closed(max)
    }
}

type Script = Arc<dyn Fn(&mut Peer) + Send + Sync>;

/// Raw TCP server on 127.0.0.1: one thread per connection, every thread joined on drop.
struct HostileServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl HostileServer {
    /// Answers every upgrade correctly, then runs `script` on the connection. When the
    /// script returns, the server half-closes (FIN) and waits for the client to close.
    fn upgrade(script: impl Fn(&mut Peer) + Send + Sync + 'static) -> HostileServer {
        Self::start(Mode::Upgrade, Arc::new(script), None)
    }

    /// Like [`upgrade`](Self::upgrade), with `SO_RCVBUF` set on the listener.
    fn upgrade_with_recv_buffer(
        bytes: usize,
        script: impl Fn(&mut Peer) + Send + Sync + 'static,
    ) -> HostileServer {
        Self::start(Mode::Upgrade, Arc::new(script), Some(bytes))
    }

    /// Reads the request head, then runs `script`, which writes the response itself.
    fn raw(script: impl Fn(&mut Peer) + Send + Sync + 'static) -> HostileServer {
        Self::start(Mode::Raw, Arc::new(script), None)
    }

    /// Runs `script` on the bare TCP connection (nothing read first), e.g. to answer a
    /// TLS ClientHello.
    fn tcp(script: impl Fn(&mut Peer) + Send + Sync + 'static) -> HostileServer {
        Self::start(Mode::Tcp, Arc::new(script), None)
    }

    fn start(mode: Mode, script: Script, recv_buffer: Option<usize>) -> HostileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hostile server");
        if let Some(n) = recv_buffer {
            net::set_recv_buffer(&listener, n).expect("SO_RCVBUF");
        }
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (stop2, accepted2, conns2) = (stop.clone(), accepted.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("hostile-accept".into())
            .spawn(move || {
                while !stop2.load(SeqCst) {
                    let Some((stream, _)) = net::accept_tick(&listener) else {
                        continue;
                    };
                    let id = accepted2.fetch_add(1, SeqCst);
                    let (stop3, script) = (stop2.clone(), script.clone());
                    let t = std::thread::Builder::new()
                        .name(format!("hostile-conn-{id}"))
                        .spawn(move || serve(id, stream, mode, stop3, &script))
                        .expect("spawn hostile connection");
                    conns2.lock().push(t);
                }
            })
            .expect("spawn hostile accept");
        HostileServer {
            addr,
            stop,
            accepted,
            accept: Some(accept),
            conns,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for t in std::mem::take(&mut *self.conns.lock()) {
            let _ = t.join();
        }
    }
}

/// What the server does before handing the connection to the script.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Read the request head, answer a correct 101.
    Upgrade,
    /// Read the request head only.
    Raw,
    /// Nothing.
    Tcp,
}

fn serve(id: usize, stream: TcpStream, mode: Mode, stop: Arc<AtomicBool>, script: &Script) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(20)));
    let mut peer = Peer {
        id,
        stream,
        stop,
        request: String::new(),
    };
    if mode != Mode::Tcp {
        let Some(request) = read_head(&mut peer) else {
            return;
        };
        peer.request = request;
    }
    if mode == Mode::Upgrade {
        let key = websocket_key(&peer.request).unwrap_or_default();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        if !peer.send(response.as_bytes()) {
            return;
        }
    }
    script(&mut peer);
    let _ = peer.stream.shutdown(Shutdown::Write);
    peer.drain_until_closed(T);
}

/// Reads the request head (bounded in size and time).
fn read_head(peer: &mut Peer) -> Option<String> {
    let deadline = Instant::now() + T;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if peer.stopped() || Instant::now() >= deadline || head.len() > 64 << 10 {
            return None;
        }
        match peer.stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if net::would_block(&e) => {}
            Err(_) => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

// ---------------------------------------------------------------------------------------
// Client helpers.

fn builder(url: &str) -> ClientBuilder {
    Client::builder(url)
        .connect_timeout(T)
        .close_timeout(Duration::from_millis(500))
        .heartbeat(Heartbeat::ping(
            Duration::from_millis(500),
            Duration::from_secs(2),
        ))
        .reconnect_policy(Fixed(Duration::from_millis(10)))
}

/// Every event seen so far, for failure messages.
struct Events {
    rx: wsbeat::Events,
    log: Vec<String>,
}

impl Events {
    fn of(client: &Client) -> Events {
        Events {
            rx: client.events(),
            log: Vec::new(),
        }
    }

    /// The next event, or a panic (with the history) after `T`.
    fn next(&mut self, waiting_for: &str) -> Event {
        match self.rx.recv_timeout(T) {
            Ok(ev) => {
                let mut s = format!("{ev:?}");
                s.truncate(200);
                self.log.push(s);
                ev
            }
            Err(_) => panic!(
                "no event within {T:?} while waiting for {waiting_for}; seen: {:#?}",
                self.log
            ),
        }
    }

    /// Skips events until `f` returns Some.
    fn until<R>(&mut self, waiting_for: &str, mut f: impl FnMut(&Event) -> Option<R>) -> R {
        loop {
            let ev = self.next(waiting_for);
            if let Some(r) = f(&ev) {
                return r;
            }
        }
    }

    /// Waits for `Connected` of `generation`.
    fn connected(&mut self, generation: u64) {
        self.until(&format!("Connected({generation})"), |ev| match ev {
            Event::Connected { generation: g, .. } if *g == generation => Some(()),
            _ => None,
        });
    }

    /// Collects the data messages of the current connection until its `Disconnected`.
    fn messages_until_disconnected(&mut self, what: &str) -> (Vec<Message>, DisconnectReason) {
        let mut msgs = Vec::new();
        let reason = self.until(what, |ev| match ev {
            Event::Message(m) => {
                msgs.push(m.clone());
                None
            }
            Event::Disconnected { reason, .. } => Some(reason.clone()),
            _ => None,
        });
        (msgs, reason)
    }
}

/// `close()` must return in bounded time: run it with a deadline.
fn close_within(client: Client, limit: Duration) -> Vec<Message> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let t = std::thread::spawn(move || {
        let _ = tx.send(client.close());
    });
    let r = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("close() did not return within {limit:?}"));
    t.join().expect("close thread");
    r
}

fn texts(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| match m {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => format!("<binary {} bytes>", b.len()),
            other => format!("{other:?}"),
        })
        .collect()
}

fn is_protocol(r: &DisconnectReason) -> bool {
    matches!(r, DisconnectReason::Protocol(_))
}

/// Samples the process RSS every few milliseconds and keeps the peak.
struct RssWatch {
    base: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn start() -> RssWatch {
        let base = util::rss_kib();
        let peak = Arc::new(AtomicU64::new(base));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(SeqCst) {
                p.fetch_max(util::rss_kib(), SeqCst);
                // Sampling period of a measurement, not a synchronisation.
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssWatch {
            base,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; asserts the peak stayed within the budget.
    fn assert_within(mut self, what: &str) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("rss sampler");
        }
        let peak = self.peak.load(SeqCst).max(util::rss_kib());
        let growth = peak.saturating_sub(self.base);
        eprintln!("{what}: RSS {} KiB -> peak {peak} KiB", self.base);
        assert!(
            growth < RSS_BUDGET_KIB,
            "{what}: RSS grew by {growth} KiB (budget {RSS_BUDGET_KIB} KiB)"
        );
    }
}

// ---------------------------------------------------------------------------------------
// After the upgrade: protocol violations.

/// One protocol violation, sent between two valid text messages.
struct Violation {
    name: &'static str,
    bytes: Vec<u8>,
}

fn violations() -> Vec<Violation> {
    let v = |name, bytes| Violation { name, bytes };
    vec![
        v("reserved data opcode 0x3", frame(FIN | 0x3, b"x")),
        v("reserved data opcode 0x7", frame(FIN | 0x7, b"x")),
        v("reserved control opcode 0xB", frame(FIN | 0xB, b"x")),
        v("reserved control opcode 0xF", frame(FIN | 0xF, b"")),
        v(
            "RSV1 set without an extension",
            frame(FIN | RSV1 | OP_TEXT, b"hi"),
        ),
        v("RSV3 set on a ping", frame(FIN | 0x10 | OP_PING, b"")),
        v(
            "masked frame from the server",
            masked_frame(FIN | OP_TEXT, b"m"),
        ),
        v(
            "control frame of 126 bytes",
            frame(FIN | OP_PING, &[b'p'; 126]),
        ),
        v("fragmented control frame", frame(OP_PING, b"frag")),
        v("continuation without a start", frame(FIN | OP_CONT, b"c")),
        v(
            "new data frame inside a fragmented message",
            [frame(OP_TEXT, b"a"), frame(FIN | OP_TEXT, b"b")].concat(),
        ),
        v(
            "invalid UTF-8 in a text frame",
            frame(FIN | OP_TEXT, &[0xff, 0xfe, 0xfd]),
        ),
        v(
            "invalid UTF-8 across fragments",
            [
                frame(OP_TEXT, &[b'o', b'k', 0xe2, 0x82]),
                frame(FIN | OP_CONT, b"A"),
            ]
            .concat(),
        ),
        v(
            "overlong UTF-8 encoding",
            frame(FIN | OP_TEXT, &[0xc0, 0xaf]),
        ),
        v(
            "UTF-16 surrogate in UTF-8",
            frame(FIN | OP_TEXT, &[0xed, 0xa0, 0x80]),
        ),
        v("one-byte close payload", frame(FIN | OP_CLOSE, &[0x03])),
        v(
            "invalid UTF-8 in a close reason",
            frame(FIN | OP_CLOSE, &close_payload(1000, &[0xff])),
        ),
        v(
            "frame header announcing more than 16 MiB",
            header(FIN | OP_BINARY, (16 << 20) + 1, false),
        ),
        v(
            "frame header announcing 2^63 bytes",
            header(FIN | OP_BINARY, 1 << 63, false),
        ),
    ]
}

#[test]
fn every_protocol_violation_is_a_typed_disconnect_and_the_client_reconnects() {
    let _g = util::shared();
    watch_panics();
    let cases = Arc::new(violations());
    let c2 = cases.clone();
    let server = HostileServer::upgrade(move |p| {
        let Some(case) = c2.get(p.id) else {
            return p.hold(T);
        };
        let bytes = [
            text(&format!("before-{}", p.id)),
            case.bytes.clone(),
            text(&format!("after-{}", p.id)),
        ]
        .concat();
        if p.send(&bytes) {
            p.hold(T);
        }
    });
    let client = builder(&server.url()).connect().expect("connect");
    let mut ev = Events::of(&client);
    for (i, case) in cases.iter().enumerate() {
        ev.connected(i as u64 + 1);
        let (msgs, reason) = ev.messages_until_disconnected(case.name);
        assert_eq!(
            texts(&msgs),
            vec![format!("before-{i}")],
            "{}: exactly the valid message before the violation must be delivered",
            case.name
        );
        assert!(
            is_protocol(&reason),
            "{}: expected a protocol error, got {reason:?}",
            case.name
        );
    }
    // Recovered per policy: a fresh connection after the last violation.
    ev.connected(cases.len() as u64 + 1);
    assert!(close_within(client, T).is_empty());
    assert_no_client_panic();
}

#[test]
fn close_frame_with_an_invalid_code_is_reported_as_a_protocol_violation() {
    let _g = util::shared();
    watch_panics();
    // Invalid per RFC 6455 7.4: below 1000, 1004-1006, 1015, 1016-2999 and above 4999.
    let invalid: Vec<u16> = vec![0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535];
    // Valid codes pass through unchanged (so the test can tell the two apart).
    let valid: Vec<u16> = vec![1000, 1001, 1011, 3000, 4999];
    let codes: Arc<Vec<u16>> = Arc::new(invalid.iter().chain(&valid).copied().collect());
    let c2 = codes.clone();
    let server = HostileServer::upgrade(move |p| {
        let Some(&code) = c2.get(p.id) else {
            return p.hold(T);
        };
        let bytes = [
            frame(FIN | OP_CLOSE, &close_payload(code, b"bye")),
            text("after-close"),
        ]
        .concat();
        if p.send(&bytes) {
            p.hold(T);
        }
    });
    let client = builder(&server.url()).connect().expect("connect");
    let mut ev = Events::of(&client);
    for (i, &code) in codes.iter().enumerate() {
        ev.connected(i as u64 + 1);
        let (msgs, reason) = ev.messages_until_disconnected(&format!("close {code}"));
        assert!(msgs.is_empty(), "code {code}: data after close delivered");
        if invalid.contains(&code) {
            assert!(
                matches!(&reason, DisconnectReason::ClosedByPeer { code: 1002, .. })
                    || is_protocol(&reason),
                "invalid close code {code} must be reported as a protocol violation, got {reason:?}"
            );
        } else {
            assert_eq!(
                reason,
                DisconnectReason::ClosedByPeer {
                    code,
                    reason: "bye".into()
                }
            );
        }
    }
    ev.connected(codes.len() as u64 + 1);
    close_within(client, T);
    assert_no_client_panic();
}

#[test]
fn random_bytes_after_the_upgrade_end_the_connection_with_a_typed_reason() {
    let _g = util::shared();
    watch_panics();
    const SEEDS: u64 = 24;
    let base = 0x5EED_0000_u64;
    eprintln!("random bytes: seeds {base:#x}..{:#x}", base + SEEDS);
    let server = HostileServer::upgrade(move |p| {
        if p.id as u64 >= SEEDS {
            return p.hold(T);
        }
        let mut rng = Rng::new(base + p.id as u64);
        let n = 1 + rng.below(8192) as usize;
        let bytes = rng.bytes(n);
        p.send(&bytes);
        // Then FIN (after the script): a frame left incomplete ends as a reset.
    });
    let client = builder(&server.url())
        .heartbeat(Heartbeat::off())
        .connect()
        .expect("connect");
    let mut ev = Events::of(&client);
    for i in 0..SEEDS {
        ev.connected(i + 1);
        let (_, reason) = ev.messages_until_disconnected(&format!("seed {:#x}", base + i));
        assert!(
            matches!(
                reason,
                DisconnectReason::Protocol(_)
                    | DisconnectReason::Reset
                    | DisconnectReason::ClosedByPeer { .. }
            ),
            "seed {:#x}: unexpected reason {reason:?}",
            base + i
        );
    }
    ev.connected(SEEDS + 1);
    close_within(client, T);
    assert_no_client_panic();
}

// ---------------------------------------------------------------------------------------
// Size limits.

#[test]
fn frame_announcing_a_gigabyte_is_rejected_before_its_payload_arrives() {
    let _g = util::exclusive();
    watch_panics();
    let rss = RssWatch::start();
    // Announce 1 GiB, send 1 MiB of it, then keep the connection open (no FIN): the
    // client must not wait for (or allocate) the rest.
    let server = HostileServer::upgrade(|p| {
        if p.id == 0 {
            let mut bytes = header(FIN | OP_BINARY, 1 << 30, false);
            bytes.extend(std::iter::repeat_n(b'z', 1 << 20));
            if p.send(&bytes) {
                p.hold(T);
            }
        } else {
            p.hold(T);
        }
    });
    let client = builder(&server.url()).connect().expect("connect");
    let mut ev = Events::of(&client);
    ev.connected(1);
    let started = Instant::now();
    let (msgs, reason) = ev.messages_until_disconnected("the 1 GiB frame");
    assert!(msgs.is_empty());
    assert!(is_protocol(&reason), "got {reason:?}");
    assert!(
        started.elapsed() < T,
        "rejection took {:?}",
        started.elapsed()
    );
    ev.connected(2);
    close_within(client, T);
    rss.assert_within("1 GiB frame header");
    assert_no_client_panic();
}

#[test]
fn message_beyond_the_default_limit_in_small_fragments_is_rejected() {
    let _g = util::exclusive();
    watch_panics();
    let rss = RssWatch::start();
    // 17 fragments of 1 MiB: each frame is within the 16 MiB frame limit, the message is not.
    let server = HostileServer::upgrade(|p| {
        if p.id != 0 {
            return p.hold(T);
        }
        let chunk = vec![b'f'; 1 << 20];
        for i in 0..17 {
            let b0 = if i == 0 { OP_BINARY } else { OP_CONT };
            if !p.send(&frame(b0, &chunk)) {
                return;
            }
        }
        if p.send(&frame(FIN | OP_CONT, b"end")) {
            p.hold(T);
        }
    });
    let client = builder(&server.url()).connect().expect("connect");
    let mut ev = Events::of(&client);
    ev.connected(1);
    let (msgs, reason) = ev.messages_until_disconnected("the 17 MiB fragmented message");
    assert!(msgs.is_empty(), "an oversized message was delivered");
    assert!(is_protocol(&reason), "got {reason:?}");
    ev.connected(2);
    close_within(client, T);
    rss.assert_within("17 MiB in fragments");
    assert_no_client_panic();
}

#[test]
fn configured_limits_apply_at_the_exact_boundary() {
    let _g = util::shared();
    watch_panics();
    const FRAME: usize = 16 << 10;
    const MESSAGE: usize = 64 << 10;
    let server = HostileServer::upgrade(|p| {
        let chunk = vec![b'q'; FRAME];
        let bytes = match p.id {
            // Exactly at both limits: 4 fragments of exactly FRAME bytes = MESSAGE.
            0 => [
                frame(OP_TEXT, &chunk),
                frame(OP_CONT, &chunk),
                frame(OP_CONT, &chunk),
                frame(FIN | OP_CONT, &chunk),
                text("next"),
            ]
            .concat(),
            // One frame one byte over the frame limit.
            1 => frame(FIN | OP_BINARY, &vec![0u8; FRAME + 1]),
            // Frames within the limit, message one byte over.
            2 => [
                frame(OP_TEXT, &chunk),
                frame(OP_CONT, &chunk),
                frame(OP_CONT, &chunk),
                frame(OP_CONT, &chunk),
                frame(FIN | OP_CONT, b"q"),
            ]
            .concat(),
            _ => return p.hold(T),
        };
        if p.send(&bytes) {
            p.hold(T);
        }
    });
    let limits = Limits::default()
        .max_message_size(MESSAGE)
        .max_frame_size(FRAME);
    let client = builder(&server.url())
        .limits(limits)
        .connect()
        .expect("connect");
    let mut ev = Events::of(&client);
    ev.connected(1);
    let first = ev.until("the message at the limit", |e| match e {
        Event::Message(m) => Some(m.clone()),
        _ => None,
    });
    assert_eq!(
        first.len(),
        MESSAGE,
        "the message at the limit is delivered"
    );
    let next = ev.until("the message after it", |e| match e {
        Event::Message(m) => Some(m.clone()),
        _ => None,
    });
    assert_eq!(next, Message::text("next"));
    // Connection 1 still open; make it go away to reach the next case.
    client.reconnect_now();
    for (generation, what) in [(2, "frame over the limit"), (3, "message over the limit")] {
        ev.connected(generation);
        let (msgs, reason) = ev.messages_until_disconnected(what);
        assert!(msgs.is_empty(), "{what}: delivered {:?}", texts(&msgs));
        assert!(is_protocol(&reason), "{what}: got {reason:?}");
    }
    ev.connected(4);
    close_within(client, T);
    assert_no_client_panic();
}

// ---------------------------------------------------------------------------------------
// Floods.

#[test]
fn ping_flood_is_answered_with_bounded_memory_and_data_still_flows() {
    let _g = util::exclusive();
    watch_panics();
    const PINGS: usize = 200_000;
    const MARK_EVERY: usize = 20_000;
    let pongs = Arc::new(AtomicUsize::new(0));
    let pongs2 = pongs.clone();
    let rss = RssWatch::start();
    let server = HostileServer::upgrade(move |p| {
        if p.id != 0 {
            return p.hold(T);
        }
        // Count the client's pongs on a second thread while flooding.
        let mut rd = p.stream.try_clone().expect("clone");
        let (stop, pongs) = (p.stop.clone(), pongs2.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(SeqCst) {
                match rd.read(&mut buf) {
                    Ok(0) => return,
                    // Client frames start with 0x8A for a final pong (rough count:
                    // only frame starts at the beginning of a read are seen).
                    Ok(n) => {
                        if buf[..n].first() == Some(&(FIN | OP_PONG)) {
                            pongs.fetch_add(1, SeqCst);
                        }
                    }
                    Err(e) if net::would_block(&e) => {}
                    Err(_) => return,
                }
            }
        });
        let ping = frame(FIN | OP_PING, &[b'p'; 125]);
        let mut batch = Vec::with_capacity(ping.len() * 1000);
        for i in 0..PINGS {
            batch.extend_from_slice(&ping);
            if (i + 1) % MARK_EVERY == 0 {
                batch.extend_from_slice(&text(&format!("mark-{}", (i + 1) / MARK_EVERY)));
            }
            if batch.len() >= ping.len() * 1000 && !p.send(&std::mem::take(&mut batch)) {
                break;
            }
        }
        p.send(&batch);
        p.hold(T);
        let _ = p.stream.shutdown(Shutdown::Both);
        let _ = reader.join();
    });
    let client = builder(&server.url())
        .write_timeout(Duration::from_secs(2))
        .connect()
        .expect("connect");
    let mut ev = Events::of(&client);
    ev.connected(1);
    // Senders are not starved by the flood.
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t0 = Instant::now();
        client
            .send_text(format!("during-flood-{i}"))
            .expect("send during flood");
        slowest = slowest.max(t0.elapsed());
    }
    let marks = PINGS / MARK_EVERY;
    for k in 1..=marks {
        let m = ev.until(&format!("mark-{k}"), |e| match e {
            Event::Message(m) => Some(m.clone()),
            Event::Disconnected { reason, .. } => panic!("disconnected during flood: {reason}"),
            _ => None,
        });
        assert_eq!(m, Message::text(format!("mark-{k}")), "marks in order");
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a send waited {slowest:?} during the ping flood"
    );
    assert!(pongs.load(SeqCst) > 0, "the client never answered a ping");
    assert_eq!(
        client.stats().received,
        marks as u64,
        "pings are not events"
    );
    close_within(client, T);
    rss.assert_within("ping flood");
    assert_no_client_panic();
}

#[test]
fn ping_flood_from_a_peer_that_never_reads_ends_as_a_write_stall() {
    let _g = util::exclusive();
    watch_panics();
    let rss = RssWatch::start();
    // A tiny receive window on the server: the client's pongs back up quickly.
    let server = HostileServer::upgrade_with_recv_buffer(4096, |p| {
        if p.id != 0 {
            return p.hold(T);
        }
        let ping = frame(FIN | OP_PING, &[b'p'; 125]);
        let batch: Vec<u8> = ping.repeat(512);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Never read; flood until the client goes away.
        while Instant::now() < deadline && p.send(&batch) {}
    });
    let write_timeout = Duration::from_secs(1);
    let client = builder(&server.url())
        .write_timeout(write_timeout)
        .connect()
        .expect("connect");
    let mut ev = Events::of(&client);
    ev.connected(1);
    let (_, reason) = ev.messages_until_disconnected("the write stall");
    assert_eq!(reason, DisconnectReason::WriteStalled);
    close_within(client, T);
    rss.assert_within("ping flood, peer not reading");
    assert_no_client_panic();
}

#[test]
fn endless_empty_fragments_do_not_starve_senders_or_close() {
    let _g = util::shared();
    watch_panics();
    // A message that never ends: one empty non-final text frame, then empty
    // continuation frames as fast as the socket takes them. Nothing grows, so no
    // size limit trips; the reader must still let writers and close() in.
    let server = HostileServer::upgrade(|p| {
        if p.id != 0 {
            return p.hold(T);
        }
        if !p.send(&frame(OP_TEXT, b"")) {
            return;
        }
        let batch = frame(OP_CONT, b"").repeat(32 << 10);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && p.send(&batch) {}
    });
    let client = builder(&server.url())
        .write_timeout(Duration::from_secs(2))
        .connect()
        .expect("connect");
    let mut ev = Events::of(&client);
    ev.connected(1);
    for i in 0..10 {
        let c = client.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = c.send_text(format!("while-fragments-{i}"));
            let _ = tx.send((r, t0.elapsed()));
        });
        let (r, took) = rx
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("send {i} blocked for {T:?} behind the reader"));
        t.join().unwrap();
        r.expect("send");
        assert!(took < Duration::from_secs(5), "send {i} took {took:?}");
    }
    close_within(client, T);
    assert_no_client_panic();
}

// ---------------------------------------------------------------------------------------
// Before the upgrade: handshake-level attacks.

#[test]
fn never_ending_response_headers_fail_the_connect_with_a_typed_error() {
    let _g = util::exclusive();
    watch_panics();
    let rss = RssWatch::start();
    // Endless header lines, as fast as possible.
    let server = HostileServer::raw(|p| {
        if !p.send(b"HTTP/1.1 101 Switching Protocols\r\n") {
            return;
        }
        let mut i = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let line = format!("X-Pad-{i}: {}\r\n", "a".repeat(100));
            if !p.send(line.as_bytes()) {
                return;
            }
            i += 1;
        }
    });
    let t0 = Instant::now();
    let err = builder(&server.url())
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .expect_err("an endless response must fail");
    assert!(
        matches!(err, Error::Protocol(_)),
        "expected the header-size limit to stop it, got {err:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "stopped by the connect timeout, not by a size limit"
    );
    drop(server);

    // One header line that never ends (no CRLF at all).
    let server = HostileServer::raw(|p| {
        if !p.send(b"HTTP/1.1 101 Switching Protocols\r\nX-Endless: ") {
            return;
        }
        let chunk = vec![b'b'; 8192];
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && p.send(&chunk) {}
    });
    let err = builder(&server.url())
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .expect_err("an endless header line must fail");
    assert!(matches!(err, Error::Protocol(_)), "got {err:?}");
    drop(server);
    rss.assert_within("never-ending handshake response");
    assert_no_client_panic();
}

#[test]
fn slowly_dripping_response_headers_hit_the_connect_timeout() {
    let _g = util::shared();
    watch_panics();
    let server = HostileServer::raw(|p| {
        if !p.send(b"HTTP/1.1 101 Switching Protocols\r\n") {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        while Instant::now() < deadline {
            if !p.send(format!("X-Drip-{i}: x\r\n").as_bytes()) {
                return;
            }
            i += 1;
            // The attack itself: one header line every 100 ms.
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = builder(&server.url())
        .connect_timeout(timeout)
        .connect()
        .expect_err("a response that never ends must time out");
    let took = t0.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                stage: ConnectStage::Upgrade,
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(took >= timeout, "gave up before the timeout: {took:?}");
    assert!(took < timeout + Duration::from_secs(9), "took {took:?}");
    assert_no_client_panic();
}

#[test]
fn slowly_dripping_tls_handshake_hits_the_connect_timeout() {
    let _g = util::shared();
    watch_panics();
    // Announce a 16 KiB TLS handshake record, then deliver it one byte every 100 ms.
    let server = HostileServer::tcp(|p| {
        let mut hello = [0u8; 512];
        let _ = p.stream.read(&mut hello); // the ClientHello (or part of it)
        if !p.send(&[0x16, 0x03, 0x03, 0x40, 0x00]) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && p.send(&[0x02]) {
            // The attack itself: one byte every 100 ms.
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = builder(&format!("wss://{}/", server.addr))
        .danger_accept_invalid_certs(true)
        .connect_timeout(timeout)
        .connect()
        .expect_err("a TLS handshake that never ends must time out");
    let took = t0.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                stage: ConnectStage::Tls,
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(took >= timeout, "gave up before the timeout: {took:?}");
    assert!(took < timeout + Duration::from_secs(9), "took {took:?}");
    assert_no_client_panic();
}

#[test]
fn slowly_dripping_proxy_answer_hits_the_connect_timeout() {
    let _g = util::shared();
    watch_panics();
    // An HTTP proxy that reads CONNECT and answers one byte every 100 ms, forever.
    let proxy = HostileServer::raw(|p| {
        assert!(p.request.starts_with("CONNECT "), "{}", p.request);
        let deadline = Instant::now() + Duration::from_secs(60);
        let answer = b"HTTP/1.1 200 Connection established\r\nX-Pad: ";
        let mut i = 0;
        while Instant::now() < deadline && p.send(&[answer.get(i).copied().unwrap_or(b'x')]) {
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = builder("ws://example.invalid/")
        .proxy(&format!("http://{}", proxy.addr))
        .connect_timeout(timeout)
        .connect()
        .expect_err("a proxy answer that never ends must time out");
    let took = t0.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                stage: ConnectStage::Proxy,
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(took >= timeout, "gave up before the timeout: {took:?}");
    assert!(took < timeout + Duration::from_secs(9), "took {took:?}");
    assert_no_client_panic();
}

/// A non-101 response announcing a 1 GB body, then streaming it for real.
fn huge_body_response(status_line: &'static str) -> HostileServer {
    HostileServer::raw(move |p| {
        let head = format!(
            "{status_line}\r\nContent-Type: text/plain\r\nRetry-After: 0\r\n\
             Content-Length: 1000000000\r\n\r\n"
        );
        if !p.send(head.as_bytes()) {
            return;
        }
        let chunk = vec![b'A'; 64 << 10];
        let mut sent = 0usize;
        while sent < 1_000_000_000 && p.send(&chunk) {
            sent += chunk.len();
        }
    })
}

#[test]
fn gigabyte_content_length_on_a_rejection_is_neither_read_nor_buffered() {
    let _g = util::exclusive();
    watch_panics();
    let rss = RssWatch::start();
    for (status_line, status) in [("HTTP/1.1 401 Unauthorized", 401), ("HTTP/1.1 200 OK", 200)] {
        let server = huge_body_response(status_line);
        let t0 = Instant::now();
        let err = builder(&server.url())
            .connect_timeout(Duration::from_secs(30))
            .connect()
            .expect_err("a non-101 answer fails the connect");
        match &err {
            Error::Http {
                status: s, body, ..
            } => {
                assert_eq!(*s, status);
                assert!(
                    body.as_ref().is_none_or(|b| b.len() <= 512),
                    "the error keeps at most 512 bytes of the body"
                );
            }
            other => panic!("{status}: expected Error::Http, got {other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{status}: waited for the body"
        );
    }

    // With reconnection: every attempt fails the same way, the policy keeps going,
    // and memory stays flat.
    let server = huge_body_response("HTTP/1.1 503 Service Unavailable");
    let client = builder(&server.url()).connect_lazy().expect("lazy connect");
    let mut ev = Events::of(&client);
    for attempt in 1..=3 {
        let last = ev.until(&format!("Reconnecting #{attempt}"), |e| match e {
            Event::Reconnecting { last_error, .. } => Some(last_error.clone()),
            Event::Connected { .. } => panic!("connected to a 503"),
            _ => None,
        });
        assert!(
            matches!(last, Some(Error::Http { status: 503, .. })),
            "got {last:?}"
        );
    }
    close_within(client, T);
    drop(server);
    rss.assert_within("1 GB Content-Length");
    assert_no_client_panic();
}

#[test]
fn invalid_upgrade_answers_are_typed_errors() {
    let _g = util::shared();
    watch_panics();
    let answers: Vec<(&str, String)> = vec![
        (
            "wrong accept key",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
                .into(),
        ),
        (
            "no Upgrade header",
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n".into(),
        ),
        ("not HTTP at all", "\x16\x03\x01\x00garbage\r\n\r\n".into()),
        (
            "HTTP/1.0 101",
            "HTTP/1.0 101 Switching Protocols\r\n\r\n".into(),
        ),
    ];
    for (name, answer) in answers {
        let server = HostileServer::raw(move |p| {
            p.send(answer.as_bytes());
        });
        let err = builder(&server.url())
            .connect()
            .expect_err("invalid upgrade answer");
        assert!(
            matches!(err, Error::Protocol(_)),
            "{name}: expected a protocol error, got {err:?}"
        );
        assert_eq!(server.accepted(), 1, "{name}");
    }
    assert_no_client_panic();
}

// ---------------------------------------------------------------------------------------
// Generative: random valid and invalid frame sequences.

/// What the client must deliver and how the connection must end.
#[derive(Debug)]
struct Expect {
    delivered: Vec<Message>,
    end: End,
}

#[derive(Debug, PartialEq)]
enum End {
    /// A protocol violation.
    Protocol,
    /// A valid close frame with this code.
    Closed(u16),
    /// A close frame with an invalid code (reported as 1002 or a protocol error).
    BadClose,
    /// The server just closed TCP.
    Reset,
}

/// Builds the bytes of one random connection and the expected outcome.
fn scenario(seed: u64) -> (Vec<u8>, Expect, Vec<String>) {
    let mut rng = Rng::new(seed);
    let mut bytes = Vec::new();
    let mut steps = Vec::new();
    let mut delivered = Vec::new();
    let mut end = None;
    let n = 1 + rng.below(12);
    for k in 0..n {
        let tag = format!("s{seed:x}-{k}");
        let kind = rng.below(20);
        let (b, step, ok_msg, stop): (Vec<u8>, String, Option<Message>, Option<End>) = match kind {
            0..=3 => (text(&tag), "text".into(), Some(Message::text(tag)), None),
            4 => {
                let mut payload = tag.clone().into_bytes();
                let extra = rng.below(300) as usize;
                payload.extend(rng.bytes(extra));
                (
                    frame(FIN | OP_BINARY, &payload),
                    "binary".into(),
                    Some(Message::binary(payload)),
                    None,
                )
            }
            5 | 6 => {
                // Fragmented text, possibly with a ping in between (allowed).
                let parts = 2 + rng.below(3) as usize;
                let s = format!("{tag}-fragmented-é✓");
                let raw = s.as_bytes();
                let mut out = Vec::new();
                let cuts: Vec<usize> = (0..=parts).map(|i| i * raw.len() / parts).collect();
                for i in 0..parts {
                    let first = if i == 0 { OP_TEXT } else { OP_CONT };
                    let b0 = if i + 1 == parts { FIN | first } else { first };
                    out.extend(frame(b0, &raw[cuts[i]..cuts[i + 1]]));
                    if i + 1 < parts && rng.below(2) == 0 {
                        out.extend(frame(FIN | OP_PING, b"mid"));
                    }
                }
                (out, "fragmented".into(), Some(Message::text(s)), None)
            }
            7 | 8 => {
                let op = if kind == 7 { OP_PING } else { OP_PONG };
                let len = rng.below(126) as usize;
                (
                    frame(FIN | op, &rng.bytes(len)),
                    format!("control {op:#x}"),
                    None,
                    None,
                )
            }
            9 => {
                let code = [1000u16, 1001, 1011, 1012, 4000][rng.below(5) as usize];
                (
                    frame(FIN | OP_CLOSE, &close_payload(code, b"")),
                    format!("close {code}"),
                    None,
                    Some(End::Closed(code)),
                )
            }
            10 => {
                let code = [0u16, 999, 1005, 1006, 2000, 5000][rng.below(6) as usize];
                (
                    frame(FIN | OP_CLOSE, &close_payload(code, b"")),
                    format!("bad close {code}"),
                    None,
                    Some(End::BadClose),
                )
            }
            11 => {
                let op =
                    [0x3u8, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF][rng.below(10) as usize];
                (
                    frame(FIN | op, b"r"),
                    format!("reserved op {op:#x}"),
                    None,
                    Some(End::Protocol),
                )
            }
            12 => {
                let rsv = [0x40u8, 0x20, 0x10][rng.below(3) as usize];
                (
                    frame(FIN | rsv | OP_TEXT, b"r"),
                    "rsv bit".into(),
                    None,
                    Some(End::Protocol),
                )
            }
            13 => (
                frame(FIN | OP_TEXT, &[b'x', 0xc3, 0x28]),
                "invalid utf-8".into(),
                None,
                Some(End::Protocol),
            ),
            14 => (
                masked_frame(FIN | OP_TEXT, b"m"),
                "masked".into(),
                None,
                Some(End::Protocol),
            ),
            15 => (
                frame(FIN | OP_CONT, b"c"),
                "lone continuation".into(),
                None,
                Some(End::Protocol),
            ),
            16 => (
                [frame(OP_BINARY, b"a"), frame(FIN | OP_BINARY, b"b")].concat(),
                "interleaved data".into(),
                None,
                Some(End::Protocol),
            ),
            17 => (
                frame(OP_PING, b"p"),
                "fragmented ping".into(),
                None,
                Some(End::Protocol),
            ),
            18 => (
                header(FIN | OP_BINARY, (16 << 20) + 1 + rng.below(1 << 40), false),
                "oversized frame".into(),
                None,
                Some(End::Protocol),
            ),
            _ => {
                // A frame cut short, then the server closes TCP.
                let full = text(&format!("{tag}-truncated"));
                let cut = 1 + rng.below(full.len() as u64 - 1) as usize;
                (
                    full[..cut].to_vec(),
                    "truncated".into(),
                    None,
                    Some(End::Reset),
                )
            }
        };
        bytes.extend(b);
        steps.push(step);
        if let Some(m) = ok_msg {
            delivered.push(m);
        }
        if let Some(e) = stop {
            end = Some(e);
            break;
        }
    }
    (
        bytes,
        Expect {
            delivered,
            end: end.unwrap_or(End::Reset),
        },
        steps,
    )
}

#[test]
fn random_frame_sequences_never_deliver_past_a_violation_panic_or_hang() {
    let _g = util::shared();
    watch_panics();
    let seeds = util::env_u64("WSBEAT_HOSTILE_SEEDS").unwrap_or(300);
    let base = util::env_u64("WSBEAT_HOSTILE_SEED").unwrap_or(0xC0FF_EE00);
    eprintln!(
        "generative hostile server: seeds {base}..{} (WSBEAT_HOSTILE_SEED / WSBEAT_HOSTILE_SEEDS)",
        base + seeds
    );
    let server = HostileServer::upgrade(move |p| {
        let i = p.id as u64;
        if i >= seeds {
            return p.hold(T);
        }
        let (bytes, _, _) = scenario(base + i);
        p.send(&bytes);
        // Then FIN; the client's leftovers are drained so no RST can eat our bytes.
    });
    let client = builder(&server.url())
        .heartbeat(Heartbeat::off())
        .connect()
        .expect("connect");
    let mut ev = Events::of(&client);
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..seeds {
        assert!(Instant::now() < deadline, "generative run took too long");
        let seed = base + i;
        let (_, expect, steps) = scenario(seed);
        ev.connected(i + 1);
        let (msgs, reason) = ev.messages_until_disconnected(&format!("seed {seed}"));
        let ctx = || {
            format!(
                "seed {seed} (WSBEAT_HOSTILE_SEED={seed} WSBEAT_HOSTILE_SEEDS=1), steps {steps:?}"
            )
        };
        assert_eq!(
            texts(&msgs),
            texts(&expect.delivered),
            "{}: delivered messages",
            ctx()
        );
        assert_eq!(msgs, expect.delivered, "{}: payloads", ctx());
        let ok = match expect.end {
            End::Protocol => is_protocol(&reason),
            End::Closed(code) => {
                matches!(&reason, DisconnectReason::ClosedByPeer { code: c, .. } if *c == code)
            }
            End::BadClose => {
                matches!(&reason, DisconnectReason::ClosedByPeer { code: 1002, .. })
                    || is_protocol(&reason)
            }
            End::Reset => reason == DisconnectReason::Reset,
        };
        assert!(ok, "{}: expected {:?}, got {reason:?}", ctx(), expect.end);
    }
    ev.connected(seeds + 1);
    close_within(client, T);
    assert_no_client_panic();
}

/// The generator really produces every outcome (so the test above exercises them all).
#[test]
fn generator_covers_every_outcome() {
    let mut seen = [false; 4];
    for seed in 0xC0FF_EE00..0xC0FF_EE00 + 300 {
        let (_, e, _) = scenario(seed);
        let i = match e.end {
            End::Protocol => 0,
            End::Closed(_) => 1,
            End::BadClose => 2,
            End::Reset => 3,
        };
        seen[i] = true;
    }
    assert_eq!(seen, [true; 4]);
}

/// Pings and pongs surfaced as events (`surface_pings(true)`) are held to
/// `event_capacity` like data: with a consumer that reads nothing, a ping flood pauses
/// the reader at the bound. They were not counted, so the reader went on reading and
/// the waiting batches grew with the flood (118-187 MB of RSS for 400 000 pings in the
/// probe that found it), while `stats()` showed nothing queued.
#[test]
fn surfaced_pings_count_against_the_event_bound() {
    let _g = util::shared();
    let server = HostileServer::upgrade(|p| {
        let ping = frame(FIN | OP_PING, &[b'p'; 125]);
        let batch: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 1000)
            .collect();
        while p.send(&batch) {}
    });
    let client = Client::builder(&format!("ws://{}/", server.addr))
        .surface_pings(true)
        .event_capacity(16, 64 << 10)
        .heartbeat(Heartbeat::off())
        .connect()
        .expect("connect");
    let events = client.events(); // never read
    assert!(
        util::wait_until(T, || client.stats().consumer_behind_since.is_some()),
        "the reader never paused: {:?}",
        client.stats()
    );
    let stats = client.stats();
    // At most one drain past the bound (read budget, 256 KiB).
    assert!(
        stats.events_queued_bytes <= (64 << 10) + (256 << 10),
        "{stats:?}"
    );
    drop(events);
    let c = client.clone();
    util::bounded("close", T, move || c.close());
}
