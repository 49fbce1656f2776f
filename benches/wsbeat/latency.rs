//! Goal 1: Echo round-trip latency, 64 B and 16 KiB, ws and wss: send one Binary message,
//! wait for its echo. Raw: `send()` then `read()` on one thread. wsbeat: `send_binary()`
//! then `events().recv()` (the reply crosses the reader thread and the event channel).
//! Raw, wsbeat (and tokio-tungstenite over ws) take turns in blocks, each going first equally
//! often, on connections to the same server.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tungstenite::{Bytes, Message};
use wsbeat::{Client, Event};

use crate::contender::Tt;
use crate::server::ChildServer;
use crate::util::{self, RawWs, Summary, fmt_us, paired_ratio, summarize, us};
use crate::{Met, Opts, Row, fmt_ratio, ratio};

const GOAL: f64 = 1.15;

/// The median over rounds of the ratio of wsbeat's block to the other client's block of
/// the same round (`q`: "p50" or "p99" of each block): the shared VM's speed drifts
/// between rounds for every client alike, and the ratio of the pooled percentiles moves
/// with which blocks were fast (wss 16 KiB p50, pooled: 1.04-1.15x in five runs of the
/// same code). A goal is judged on both: this median alone would hide a tail that comes
/// in fewer than half of the rounds.
fn per_round_ratio(other: &[Summary], wsbeat: &[Summary], q: &str) -> f64 {
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

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let rounds = o.pick(10, 4);
    let per_round = o.pick(2500, 300);
    let warm = o.pick(500, 100);
    let tls = util::tls_connector();
    let mut rows = Vec::new();
    for secure in [false, true] {
        // In a process of its own, as a real server is: in-process, the server thread
        // serving wsbeat's connection spent about 10 µs more CPU per 16 KiB TLS echo than
        // the one serving raw's (per-thread schedstat), which one malloc arena for the
        // whole process (`GLIBC_TUNABLES=glibc.malloc.arena_max=1`) took away: the
        // clients' threads changed the server's allocator, not the client's own cost.
        let srv = ChildServer::spawn(secure);
        for size in [64usize, 16 << 10] {
            let payload = Bytes::from(vec![0x42u8; size]);
            let mut raw = RawWs::connect(srv.addr, "/echo", secure.then_some(&tls));
            let client = util::builder(&srv.url("/echo"))
                .connect()
                .expect("wsbeat connect");
            let rx = client.events();
            // tokio-tungstenite only over ws (the goal is for ws; its TLS needs another feature).
            let mut tt = (!secure).then(|| Tt::connect(&srv.url("/echo")));
            for _ in 0..warm {
                raw_rtt(&mut raw, &payload);
                wsbeat_rtt(&client, &rx, &payload);
                if let Some(t) = tt.as_mut() {
                    t.rtt(&payload);
                }
            }
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            // Each round's blocks, summarised, for the per-round ratios (`per_round_ratio`).
            let (mut ab, mut bb, mut cb) = (Vec::new(), Vec::new(), Vec::new());
            let block =
                |v: &mut Vec<f64>, blocks: &mut Vec<Summary>, rtt: &mut dyn FnMut() -> f64| {
                    let one: Vec<f64> = (0..per_round).map(|_| rtt()).collect();
                    blocks.push(summarize(&one));
                    v.extend(one);
                };
            // Each client goes first, second (and third) equally often.
            let clients = if tt.is_some() { 3 } else { 2 };
            for r in 0..rounds {
                for turn in 0..clients {
                    match (r + turn) % clients {
                        0 => block(&mut a, &mut ab, &mut || raw_rtt(&mut raw, &payload)),
                        1 => block(&mut b, &mut bb, &mut || wsbeat_rtt(&client, &rx, &payload)),
                        _ => {
                            if let Some(t) = tt.as_mut() {
                                block(&mut c, &mut cb, &mut || t.rtt(&payload));
                            }
                        }
                    }
                }
            }
            raw.close();
            if let Some(t) = tt {
                t.close();
            }
            let _ = client.close();
            let (ra, rb) = (summarize(&a), summarize(&b));
            let label = format!(
                "echo RTT {} {}",
                if secure { "wss" } else { "ws" },
                if size == 64 { "64 B" } else { "16 KiB" }
            );
            for (q, x, y) in [("p50", ra.p50, rb.p50), ("p99", ra.p99, rb.p99)] {
                let paired = per_round_ratio(&ab, &bb, q);
                rows.push(Row::new(
                    format!("{label} {q}"),
                    fmt_us(x),
                    fmt_us(y),
                    format!("{} (pooled {})", fmt_ratio(paired), ratio(y, x)),
                    format!("<= {GOAL}x"),
                    Met::from(paired.max(y / x) <= GOAL),
                ));
            }
            if !c.is_empty() {
                let rc = summarize(&c);
                for (q, x, y) in [("p50", rc.p50, rb.p50), ("p99", rc.p99, rb.p99)] {
                    let paired = per_round_ratio(&cb, &bb, q);
                    rows.push(Row::new(
                        format!("{label} {q}: tokio-tungstenite (raw column) vs wsbeat"),
                        fmt_us(x),
                        fmt_us(y),
                        format!("{} (pooled {})", fmt_ratio(paired), ratio(y, x)),
                        "<= 1.05x",
                        Met::from(paired.max(y / x) <= 1.05),
                    ));
                }
                println!(
                    "  {label}: tokio-tungstenite n={} p50 {} p99 {} max {}",
                    rc.n,
                    fmt_us(rc.p50),
                    fmt_us(rc.p99),
                    fmt_us(rc.max)
                );
            }
            println!(
                "  {label}: raw n={} p50 {} p99 {} max {} | wsbeat n={} p50 {} p99 {} max {}",
                ra.n,
                fmt_us(ra.p50),
                fmt_us(ra.p99),
                fmt_us(ra.max),
                rb.n,
                fmt_us(rb.p50),
                fmt_us(rb.p99),
                fmt_us(rb.max)
            );
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
        "Latency: {} samples per cell ({rounds} rotating blocks of {per_round}: raw, wsbeat, tokio-tungstenite), one Binary \
         message echoed by a blocking tungstenite server thread (TCP_NODELAY) in a process of its own. \
         Each cell gives the median over rounds of the ratio of the two clients' blocks in \
         that round (the VM's speed drifts between rounds for every client alike) and the \
         ratio of the pooled percentiles (the two columns); a goal is met only if both are \
         within it (the per-round median alone would hide tails that come in fewer than half \
         of the rounds).",
        rounds * per_round
    ));
    rows
}
