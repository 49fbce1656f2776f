//! Goal 1: Echo round-trip latency, 64 B and 16 KiB, ws and wss: send one Binary message,
//! wait for its echo. Raw: `send()` then `read()` on one thread. wsbeat: `send_binary()`
//! then `events().recv()` (the reply crosses the reader thread and the event channel).
//! Raw, wsbeat, a second raw connection (the noise floor) and, over ws,
//! tokio-tungstenite take turns in short blocks, each right after each other equally
//! often, on connections to the same server, made afresh for each set of blocks.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tungstenite::{Bytes, Message};
use wsbeat::{Client, Event};

use crate::contender::Tt;
use crate::server::ChildServer;
use crate::util::{self, RawWs, Summary, fmt_us, paired_ratio, summarize, us};
use crate::{Met, Opts, Row, fmt_ratio};

const GOAL: f64 = 1.15;

/// The median over sets of the ratio of wsbeat's percentile to the other client's in the
/// same set (`q`: "p50" or "p99"): each set has connections of its own, whose luck (see
/// `run`) the median does not follow. A goal is judged on this and on the pooled ratio:
/// this median alone would hide a tail that comes in fewer than half of the sets.
fn per_set_ratio(other: &[Summary], wsbeat: &[Summary], q: &str) -> f64 {
    let pick = |s: &Summary| if q == "p50" { s.p50 } else { s.p99 };
    let a: Vec<f64> = other.iter().map(pick).collect();
    let b: Vec<f64> = wsbeat.iter().map(pick).collect();
    paired_ratio(&a, &b)
}

fn raw_rtt(ws: &mut RawWs, payload: &Bytes) -> f64 {
    let t = Instant::now();
    ws.send(Message::Binary(payload.clone())).expect("raw send");
    loop {
        if let Message::Binary(b) = ws.read().expect("raw read") {
            black_box(b);
            break;
        }
    }
    us(t.elapsed())
}

fn wsbeat_rtt(c: &Client, rx: &wsbeat::Events, payload: &Bytes) -> f64 {
    let t = Instant::now();
    c.send_binary(payload.clone()).expect("wsbeat send");
    loop {
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("wsbeat echo")
        {
            Event::Message(Message::Binary(b)) => {
                black_box(b);
                break;
            }
            Event::Disconnected { reason, .. } => panic!("disconnected during latency: {reason}"),
            _ => {}
        }
    }
    us(t.elapsed())
}

/// Diagnostic: the cost of one hand-off to a thread blocked in a crossbeam `recv()` (what
/// every wsbeat message goes through between the reader thread and the user), measured as
/// send-to-wake-up time. The receiver is given time to park between samples, as the user
/// thread in the echo test parks while waiting for the reply.
fn handoff(n: usize) -> Vec<f64> {
    let (tx, rx) = crossbeam_channel::unbounded::<Instant>();
    let (back_tx, back) = crossbeam_channel::unbounded::<f64>();
    let t = std::thread::spawn(move || {
        for sent in rx {
            let _ = back_tx.send(us(sent.elapsed()));
        }
    });
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(Duration::from_micros(20));
        tx.send(Instant::now()).unwrap();
        v.push(back.recv().unwrap());
    }
    drop(tx);
    let _ = t.join();
    v
}

/// One client of a cell.
enum Contender {
    Raw(RawWs),
    Wsbeat(Client, wsbeat::Events),
    Tt(Tt),
}

impl Contender {
    fn rtt(&mut self, payload: &Bytes) -> f64 {
        match self {
            Contender::Raw(r) => raw_rtt(r, payload),
            Contender::Wsbeat(c, rx) => wsbeat_rtt(c, rx, payload),
            Contender::Tt(t) => t.rtt(payload),
        }
    }

    fn close(self) {
        match self {
            Contender::Raw(r) => r.close(),
            Contender::Wsbeat(c, _) => {
                let _ = c.close();
            }
            Contender::Tt(t) => t.close(),
        }
    }
}

/// The clients of a cell, by index into the sample vectors.
const RAW: usize = 0;
const WSBEAT: usize = 1;
/// A second raw tungstenite connection: its ratio to the first is the noise floor.
const RAW2: usize = 2;
/// tokio-tungstenite, over ws only (its TLS needs another feature).
const TT: usize = 3;

/// The order of the clients' blocks: a circuit through every ordered pair of distinct
/// clients of `0..n` (an Eulerian circuit of the complete directed graph, Hierholzer's
/// algorithm), n(n - 1) blocks long. Cycled through, each client runs equally often,
/// right after each other client equally often, and never twice in a row (review of
/// 18b1a77: cycling through every permutation ran one client twice in a row where one
/// permutation ended with it and the next began with it, a third of the noise-floor
/// client's blocks over wss).
fn circuit(n: usize) -> Vec<usize> {
    let mut unused: Vec<Vec<usize>> = (0..n)
        .map(|u| (0..n).filter(|&v| v != u).rev().collect())
        .collect();
    let mut path = vec![0];
    let mut out = Vec::new();
    while let Some(&u) = path.last() {
        match unused[u].pop() {
            Some(v) => path.push(v),
            None => out.extend(path.pop()),
        }
    }
    out.reverse();
    // The circuit ends where it began: the last step is the wrap to the first.
    out.pop();
    let mut pairs: Vec<(usize, usize)> = (0..out.len())
        .map(|i| (out[i], out[(i + 1) % out.len()]))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    assert!(
        out.len() == n * (n - 1) && pairs.len() == out.len() && pairs.iter().all(|(a, b)| a != b),
        "not a circuit through every ordered pair: {out:?}"
    );
    out
}

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    // Measured with a second raw tungstenite connection as the noise floor (wss 16 KiB):
    // - one connection per client for a whole run put the two identical clients up to
    //   11% apart at p50 (the later connection faster in four of four runs): the luck of
    //   a connection (buffer placement, its server thread) follows it. Fresh connections
    //   per set, each client connected first equally often, average that out (A-A p50
    //   within 3% over sets).
    // - blocks of 2500 round trips let one stall of the shared VM fall on one client:
    //   the A-A pooled p99 went to 1.21x and 1.49x. In blocks of 5 a stall (often
    //   longer than a block) falls on every client alike.
    // - the blocks follow a circuit through every ordered pair of clients (review of
    //   8741cdb: a rotation put the same client before each one, so an after-effect of
    //   one client would land on one other only; see `circuit`).
    // - each block starts with one round trip kept apart (review of 8741cdb): the
    //   first after the other clients' blocks (a pause of 0.1-2 ms) is slower for every
    //   client, against its own back-to-back ones more for wsbeat (p50 in the full run
    //   of 2026-12-02 06:29: +11-22% against raw's +6-10% over the four cells; likely
    //   its reader thread, no longer deferring to a consumer that reads, waking with the
    //   reply too; not measured). The goal is for back-to-back round trips, as with long
    //   blocks; the first ones get a diagnostic row.
    let sets_wanted: usize = o.pick(12, 2);
    let per_block = o.pick(5, 3);
    let warm = o.pick(200, 50);
    let tls = util::tls_connector();
    let mut rows = Vec::new();
    let mut counts = String::new();
    for secure in [false, true] {
        // In a process of its own, as a real server is: in-process, the server thread
        // serving wsbeat's connection spent about 10 µs more CPU per 16 KiB TLS echo than
        // the one serving raw's (per-thread schedstat), which one malloc arena for the
        // whole process (`GLIBC_TUNABLES=glibc.malloc.arena_max=1`) took away: the
        // clients' threads changed the server's allocator, not the client's own cost.
        let srv = ChildServer::spawn(secure);
        let n = if secure { 3 } else { 4 };
        // Each client connected first equally often.
        let sets = sets_wanted.div_ceil(n) * n;
        let circuit = circuit(n);
        // Blocks per client and set: whole passes through the circuit (each client is
        // in it n - 1 times).
        let blocks = o.pick(480usize, 60).div_ceil(n - 1) * (n - 1);
        counts = format!(
            "{counts}{} over {} ({sets} sets of {blocks} blocks), ",
            sets * blocks * per_block,
            if secure { "wss" } else { "ws" }
        );
        for size in [64usize, 16 << 10] {
            let payload = Bytes::from(vec![0x42u8; size]);
            // Every sample of each client, each set's summary (`per_set_ratio`), and the
            // first round trips of the blocks.
            let mut all: Vec<Vec<f64>> = vec![Vec::new(); n];
            let mut by_set: Vec<Vec<Summary>> = vec![Vec::new(); n];
            let mut firsts: Vec<Vec<f64>> = vec![Vec::new(); n];
            for set in 0..sets {
                // Connected in turn, each client first equally often.
                let mut clients: Vec<Option<Contender>> = (0..n).map(|_| None).collect();
                for turn in 0..n {
                    let k = (set + turn) % n;
                    clients[k] = Some(match k {
                        RAW | RAW2 => Contender::Raw(RawWs::connect(
                            srv.addr,
                            "/echo",
                            secure.then_some(&tls),
                        )),
                        WSBEAT => {
                            let c = util::builder(&srv.url("/echo"))
                                .connect()
                                .expect("wsbeat connect");
                            let rx = c.events();
                            Contender::Wsbeat(c, rx)
                        }
                        _ => Contender::Tt(Tt::connect(&srv.url("/echo"))),
                    });
                }
                let mut clients: Vec<Contender> = clients.into_iter().flatten().collect();
                for _ in 0..warm {
                    for c in clients.iter_mut() {
                        c.rtt(&payload);
                    }
                }
                let mut mine: Vec<Vec<f64>> = vec![Vec::with_capacity(blocks * per_block); n];
                // Each set starts elsewhere in the circuit.
                let from = set * circuit.len() / sets;
                for i in 0..blocks * n {
                    let k = circuit[(from + i) % circuit.len()];
                    firsts[k].push(clients[k].rtt(&payload));
                    for _ in 0..per_block {
                        mine[k].push(clients[k].rtt(&payload));
                    }
                }
                for c in clients {
                    c.close();
                }
                for (k, v) in mine.into_iter().enumerate() {
                    by_set[k].push(summarize(&v));
                    all[k].extend(v);
                }
            }
            let s: Vec<Summary> = all.iter().map(|v| summarize(v)).collect();
            let label = format!(
                "echo RTT {} {}",
                if secure { "wss" } else { "ws" },
                if size == 64 { "64 B" } else { "16 KiB" }
            );
            // (other, wsbeat column, row title, goal).
            let mut pairs = vec![(RAW, WSBEAT, String::new(), Some(GOAL))];
            if n > TT {
                pairs.push((
                    TT,
                    WSBEAT,
                    ": tokio-tungstenite (raw column) vs wsbeat".to_string(),
                    Some(1.05),
                ));
            }
            pairs.push((
                RAW,
                RAW2,
                ", noise floor: raw tungstenite vs a second raw tungstenite connection (wsbeat column)"
                    .to_string(),
                None,
            ));
            for (x, y, title, goal) in pairs {
                for q in ["p50", "p99"] {
                    let pick = |s: &Summary| if q == "p50" { s.p50 } else { s.p99 };
                    let paired = per_set_ratio(&by_set[x], &by_set[y], q);
                    let pooled = pick(&s[y]) / pick(&s[x]);
                    let name = format!("{label} {q}{title}");
                    rows.push(Row::new(
                        if goal.is_some() {
                            name
                        } else {
                            format!("diagnostic: {name}")
                        },
                        fmt_us(pick(&s[x])),
                        fmt_us(pick(&s[y])),
                        format!("{} (pooled {})", fmt_ratio(paired), fmt_ratio(pooled)),
                        goal.map_or("-".to_string(), |g| format!("<= {g}x")),
                        goal.map_or(Met::Info, |g| Met::from(paired.max(pooled) <= g)),
                    ));
                }
            }
            let (fa, fb) = (summarize(&firsts[RAW]), summarize(&firsts[WSBEAT]));
            rows.push(Row::new(
                format!(
                    "diagnostic: {label}, the first round trip of each block (after the other \
                     clients' blocks), p50 / p99"
                ),
                format!("{} / {}", fmt_us(fa.p50), fmt_us(fa.p99)),
                format!("{} / {}", fmt_us(fb.p50), fmt_us(fb.p99)),
                format!(
                    "{} / {}",
                    fmt_ratio(fb.p50 / fa.p50),
                    fmt_ratio(fb.p99 / fa.p99)
                ),
                "-",
                Met::Info,
            ));
            let names = ["raw", "wsbeat", "second raw", "tokio-tungstenite"];
            let line: Vec<String> = s
                .iter()
                .zip(names)
                .map(|(s, name)| {
                    format!(
                        "{name} n={} p50 {} p99 {} max {}",
                        s.n,
                        fmt_us(s.p50),
                        fmt_us(s.p99),
                        fmt_us(s.max)
                    )
                })
                .collect();
            println!("  {label}: {}", line.join(" | "));
        }
    }
    let h = summarize(&handoff(o.pick(5000, 500)));
    println!(
        "  thread hand-off (crossbeam send -> parked recv wakes): p50 {} p99 {}",
        fmt_us(h.p50),
        fmt_us(h.p99)
    );
    rows.push(Row::new(
        "diagnostic: one wake-up of a thread parked in crossbeam recv(), p50 / p99",
        "-",
        format!("{} / {}", fmt_us(h.p50), fmt_us(h.p99)),
        "-",
        "-",
        Met::Info,
    ));
    notes.push(format!(
        "Latency: one Binary message echoed by a blocking tungstenite server thread \
         (TCP_NODELAY) in a process of its own. Clients: raw tungstenite, wsbeat, a second \
         raw tungstenite connection (the noise floor: two identical clients), and \
         tokio-tungstenite over ws. Samples per client and cell: {counts}each set on \
         fresh connections (connected in turn, each client first equally often; {warm} \
         warm-up round trips each). The clients run blocks of 1 + {per_block} round trips \
         in turn, in an order where each runs right after each other equally often and \
         never twice in a row. The {per_block} back-to-back round trips count for the cells; the \
         first of each block, after the other clients' blocks, has a diagnostic row. Each \
         cell gives the median over sets of the ratio of the two clients' percentiles in \
         that set, and the ratio of the pooled percentiles (the two columns); a goal is met \
         only if both are within it (the median alone would hide tails that come in fewer \
         than half of the sets)."
    ));
    rows
}
