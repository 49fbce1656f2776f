//! Shared helpers: statistics, clocks, raw tungstenite clients, wsbeat builders, /proc readers.

use std::fs;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use native_tls::{Certificate, Identity, TlsConnector, TlsStream};
use tungstenite::{Message, WebSocket};
use wsbeat::{Client, ClientBuilder, Event, Failure, ReconnectPolicy};

/// The checked-in test PKI (see tests/certs/README.md).
pub const CA_PEM: &[u8] = include_bytes!("../../tests/certs/ca.pem");
pub const SERVER_PEM: &[u8] = include_bytes!("../../tests/certs/server.pem");
pub const SERVER_KEY: &[u8] = include_bytes!("../../tests/certs/server.key");

pub fn server_identity() -> Identity {
    Identity::from_pkcs8(SERVER_PEM, SERVER_KEY).expect("test server identity")
}

/// A client-side connector that trusts the test CA (built once, outside any timing).
pub fn tls_connector() -> TlsConnector {
    let ca = Certificate::from_pem(CA_PEM).expect("test CA");
    TlsConnector::builder()
        .add_root_certificate(ca)
        .build()
        .expect("tls connector")
}

// ---------------------------------------------------------------- clocks

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since an arbitrary process-wide origin (for atomics).
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// `t` on the [`now_ns`] scale.
pub fn ns_of(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_nanos() as u64
}

/// Tiny xorshift PRNG (jitter for sample start times).
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        Rng((now_ns() ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------- statistics

/// Percentiles of a sample set (any unit; nearest-rank).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn summarize(v: &[f64]) -> Summary {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Summary {
        n: s.len(),
        p50: pct(&s, 50.0),
        p99: pct(&s, 99.0),
        max: s.last().copied().unwrap_or(f64::NAN),
    }
}

/// Nearest-rank percentile of sorted data.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The middle value; with an even count, the mean of the two middle ones (the lower
/// alone would favour a lower-is-better goal).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Median of the per-round ratios `b[i] / a[i]`, where round `i` ran `a` and `b` back to
/// back: the machine's speed drifts between rounds on a shared VM (whole rounds run
/// 20-30% faster or slower for every client alike), and a ratio of two medians then
/// depends on which rounds of each happened to be fast.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(a, b)| b / a).collect();
    median(&r)
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Formats microseconds as µs or ms.
pub fn fmt_us(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x.abs() >= 10_000.0 {
        format!("{:.1} ms", x / 1000.0)
    } else if x.abs() >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else {
        format!("{x:.1} µs")
    }
}

/// Formats a rate with k/M suffix.
pub fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

// ---------------------------------------------------------------- raw tungstenite

/// The raw baseline: blocking tungstenite on a TcpStream (ws) or a native-tls stream (wss),
/// one thread, no locks. An enum only so both can be stored in one variable (the plain
/// one stays unboxed: it is the floor).
#[allow(clippy::large_enum_variant)]
pub enum RawWs {
    Plain(WebSocket<TcpStream>),
    Tls(Box<WebSocket<TlsStream<TcpStream>>>),
}

macro_rules! with_ws {
    ($self:ident, $ws:ident => $e:expr) => {
        match $self {
            RawWs::Plain($ws) => $e,
            RawWs::Tls($ws) => $e,
        }
    };
}

impl RawWs {
    pub fn connect(addr: SocketAddr, path: &str, tls: Option<&TlsConnector>) -> RawWs {
        let tcp = TcpStream::connect(addr).expect("raw connect");
        tcp.set_nodelay(true).expect("nodelay");
        match tls {
            None => {
                let url = format!("ws://{addr}{path}");
                let (ws, _) = tungstenite::client(url.as_str(), tcp).expect("raw handshake");
                RawWs::Plain(ws)
            }
            Some(c) => {
                let s = c
                    .connect(&addr.ip().to_string(), tcp)
                    .expect("raw tls handshake");
                let url = format!("wss://{addr}{path}");
                let (ws, _) = tungstenite::client(url.as_str(), s).expect("raw handshake");
                RawWs::Tls(Box::new(ws))
            }
        }
    }
    pub fn send(&mut self, m: Message) -> tungstenite::Result<()> {
        with_ws!(self, ws => ws.send(m))
    }
    pub fn read(&mut self) -> tungstenite::Result<Message> {
        with_ws!(self, ws => ws.read())
    }
    /// Buffers a message (tungstenite writes out whenever its 128 KiB buffer is full).
    pub fn write(&mut self, m: Message) -> tungstenite::Result<()> {
        with_ws!(self, ws => ws.write(m))
    }
    pub fn flush(&mut self) -> tungstenite::Result<()> {
        with_ws!(self, ws => ws.flush())
    }
    pub fn close(mut self) {
        let this = &mut self;
        let _ = with_ws!(this, ws => ws.close(None));
        // Wait (briefly) for the close reply so the server thread ends cleanly.
        for _ in 0..16 {
            if self.read().is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- wsbeat

/// A wsbeat builder that trusts the test CA and never uses a proxy.
pub fn builder(url: &str) -> ClientBuilder {
    Client::builder(url).no_proxy().add_root_certificate(CA_PEM)
}

/// A reconnect policy with one fixed delay.
pub struct Fixed(pub Duration);

impl ReconnectPolicy for Fixed {
    fn next_delay(&mut self, _f: &Failure<'_>) -> Option<Duration> {
        Some(self.0)
    }
}

/// Waits for the first event matching `pred` (others are dropped). Returns it and its
/// arrival time.
pub fn wait_event(
    rx: &wsbeat::Events,
    timeout: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Option<(Event, Instant)> {
    let deadline = Instant::now() + timeout;
    loop {
        let ev = rx.recv_deadline(deadline).ok()?;
        let t = Instant::now();
        if pred(&ev) {
            return Some((ev, t));
        }
    }
}

// ---------------------------------------------------------------- /proc

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib_of(pid: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&s, "VmRSS:").unwrap_or(0)
}

pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Threads of this process.
pub fn thread_count() -> usize {
    fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// CPU time and context switches of one thread of this process.
#[derive(Clone, Debug)]
pub struct TaskStat {
    pub tid: u32,
    pub name: String,
    /// Time on CPU, from /proc/self/task/TID/schedstat (ns, scheduler accounting).
    pub cpu_ns: u64,
    /// voluntary_ctxt_switches: the thread blocked (and was later woken).
    pub vol: u64,
    /// nonvoluntary_ctxt_switches: the thread was preempted.
    pub nonvol: u64,
}

/// CPU time (ns) of this process's client threads so far, by thread: every thread but the
/// in-process bench server's (`bench-srv-*`).
pub fn client_cpu() -> std::collections::HashMap<u32, u64> {
    task_stats()
        .into_iter()
        .filter(|t| !t.name.starts_with("bench-srv"))
        .map(|t| (t.tid, t.cpu_ns))
        .collect()
}

/// Client CPU (ns) spent since `before` (see [`client_cpu`]), threads started since
/// included.
pub fn client_cpu_since(before: &std::collections::HashMap<u32, u64>) -> u64 {
    client_cpu()
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

pub fn task_stats() -> Vec<TaskStat> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let tid: u32 = match e.file_name().to_string_lossy().parse() {
            Ok(t) => t,
            Err(_) => continue,
        };
        let p = e.path();
        let name = fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu_ns = fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        let st = fs::read_to_string(p.join("status")).unwrap_or_default();
        out.push(TaskStat {
            tid,
            name,
            cpu_ns,
            vol: status_field(&st, "voluntary_ctxt_switches:").unwrap_or(0),
            nonvol: status_field(&st, "nonvoluntary_ctxt_switches:").unwrap_or(0),
        });
    }
    out
}

/// Raises RLIMIT_NOFILE to the hard limit. Returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// Writes a line and flushes (child protocol).
pub fn say(w: &mut impl Write, line: &str) {
    let _ = writeln!(w, "{line}");
    let _ = w.flush();
}

/// Reads the `PORT n` line a server child says first (child protocol).
pub fn read_port(r: &mut impl BufRead) -> u16 {
    let mut line = String::new();
    r.read_line(&mut line).expect("server port");
    line.trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .expect("PORT line")
}
