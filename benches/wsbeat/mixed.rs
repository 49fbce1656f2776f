//! Goal 3: Mixed load: the server floods the wsbeat client with Binary messages as fast as it
//! can (`/stream/SIZE`), a consumer thread drains `events()`, and a second thread calls
//! `client.send()` (64 B) every ~100 µs and times each call: that time includes waiting
//! for the client's one lock while the reader drains the flood.
//!
//! The raw column is the same sender thread timing a raw tungstenite `send()` of the
//! same message on its own connection, interleaved with the wsbeat sends, under the same
//! flood: it shows what the syscall costs on this busy 2-core box without any lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tungstenite::{Bytes, Message};
use wsbeat::Event;

use crate::server::Server;
use crate::util::{self, RawWs, fmt_rate, fmt_us, summarize, us};
use crate::{Met, Opts, Row, ratio};

const GOAL_US: f64 = 2000.0;

/// (label, server path)
const SCENARIOS: [(&str, &str); 5] = [
    ("no flood (reference)", "/sink"),
    ("64 B flood, unpaced", "/stream/64"),
    ("16 KiB flood, unpaced", "/stream/16384"),
    ("64 B flood paced at 200k msg/s", "/stream/64/200000"),
    ("16 KiB flood paced at 20k msg/s", "/stream/16384/20000"),
];

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let secs = o.pick(4.0, 1.0);
    let srv = Server::start(false);
    let mut rows = Vec::new();
    let payload = Bytes::from(vec![0x11u8; 64]);
    let mut received = Vec::new();
    for (what, path) in SCENARIOS {
        let client = util::builder(&srv.url(path))
            .connect()
            .expect("wsbeat connect");
        let rx = client.events();
        let consumer = std::thread::spawn(move || {
            let (mut n, mut bytes) = (0u64, 0u64);
            let t = Instant::now();
            loop {
                match rx.recv() {
                    Ok(Event::Message(m)) => {
                        n += 1;
                        bytes += m.len() as u64;
                    }
                    Ok(Event::Closed) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            (n, bytes, t.elapsed())
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, p2, s2, addr) = (client.clone(), payload.clone(), stop.clone(), srv.addr);
        let sender = std::thread::Builder::new()
            .name("bench-sender".into())
            .spawn(move || {
                let mut raw = RawWs::connect(addr, "/sink", None);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let mut i = 0u64;
                while !s2.load(Ordering::Relaxed) {
                    i += 1;
                    if i.is_multiple_of(2) {
                        let t = Instant::now();
                        c2.send_binary(p2.clone()).expect("wsbeat send");
                        b.push(us(t.elapsed()));
                    } else {
                        let t = Instant::now();
                        raw.send(Message::Binary(p2.clone())).expect("raw send");
                        a.push(us(t.elapsed()));
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                raw.close();
                (a, b)
            })
            .unwrap();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let (a, b) = sender.join().unwrap();
        let _ = client.close();
        drop(client);
        let (n, bytes, took) = consumer.join().unwrap();
        let (ra, rb) = (summarize(&a), summarize(&b));
        let rate = fmt_rate(n as f64 / took.as_secs_f64());
        received.push(format!("{what}: {rate} msg/s in, {} wsbeat sends", rb.n));
        println!(
            "  {what}: {rate} msg/s, {:.0} MB/s received; raw send n={} p50 {} p99 {} max {} | wsbeat send n={} p50 {} p99 {} max {}",
            bytes as f64 / took.as_secs_f64() / 1e6,
            ra.n,
            fmt_us(ra.p50),
            fmt_us(ra.p99),
            fmt_us(ra.max),
            rb.n,
            fmt_us(rb.p50),
            fmt_us(rb.p99),
            fmt_us(rb.max)
        );
        if path == "/sink" {
            rows.push(Row::new(
                format!("send() latency, {what}, p50 / p99 / max"),
                format!(
                    "{} / {} / {}",
                    fmt_us(ra.p50),
                    fmt_us(ra.p99),
                    fmt_us(ra.max)
                ),
                format!(
                    "{} / {} / {}",
                    fmt_us(rb.p50),
                    fmt_us(rb.p99),
                    fmt_us(rb.max)
                ),
                ratio(rb.p99, ra.p99),
                "-",
                Met::Info,
            ));
            continue;
        }
        rows.push(Row::new(
            format!("send() latency, {what}, p99"),
            fmt_us(ra.p99),
            fmt_us(rb.p99),
            ratio(rb.p99, ra.p99),
            "< 2 ms",
            Met::from(rb.p99 < GOAL_US),
        ));
        rows.push(Row::new(
            format!("send() latency, {what}, max"),
            fmt_us(ra.max),
            fmt_us(rb.max),
            ratio(rb.max, ra.max),
            "< 2 ms",
            Met::from(rb.max < GOAL_US),
        ));
    }
    notes.push(format!(
        "Mixed load: {secs:.0} s per scenario; one 64 B send every ~100 µs, alternating \
         between wsbeat and a raw tungstenite connection from the same thread (raw column: \
         same thread, same moment, no lock); a wsbeat send call includes waiting for the \
         client's lock. Unpaced floods saturate both cores (server, reader, consumer)."
    ));
    notes.push(format!("Mixed load measured: {}.", received.join("; ")));
    rows
}
