//! Goal 6: Reconnect latency: the server goes down (every connection shut), the client backs
//! off, the server comes back on the same port, and we time from "listening again" to
//! the user receiving `Event::Connected`.
//!
//! * Main rows: a policy with a 1 h delay and `client.reconnect_now()` right after the
//!   server listens again, so no backoff is involved (nothing to subtract).
//! * Info row (ws): a fixed 50 ms backoff; latency = Connected - max(server up,
//!   Reconnecting event received + 50 ms).
//!
//! The raw column is a fresh raw tungstenite connect (TCP + [TLS with a connector built
//! once] + upgrade), also timed from "server listening again": the floor for opening a
//! connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tungstenite::protocol::WebSocketConfig;
use wsbeat::Event;

use crate::server::Server;
use crate::util::{self, Fixed, RawWs, fmt_us, summarize, us};
use crate::{Met, Opts, Row, ratio};

const GOAL_US: f64 = 5000.0;

fn restart(addr: SocketAddr, tls: bool) -> Server {
    let mut tries = 0;
    loop {
        match Server::start_on(addr, tls, 256 << 10, WebSocketConfig::default()) {
            Ok(s) => return s,
            Err(e) if tries < 100 => {
                tries += 1;
                if tries == 1 {
                    eprintln!("  rebind {addr}: {e}; retrying");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("rebind {addr}: {e}"),
        }
    }
}

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let samples = o.pick(30, 5);
    let tls = util::tls_connector();
    let mut rows = Vec::new();
    for secure in [false, true] {
        let mut srv = Server::start(secure);
        let addr = srv.addr;
        let client = util::builder(&srv.url("/echo"))
            .reconnect_policy(Fixed(Duration::from_secs(3600)))
            .connect()
            .expect("wsbeat connect");
        let rx = client.events();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for s in 0..=samples {
            srv.stop();
            util::wait_event(&rx, Duration::from_secs(5), |e| {
                matches!(e, Event::Reconnecting { .. })
            })
            .expect("client noticed the server going down");
            // Raw: also timed against a server that has just started listening.
            srv = restart(addr, secure);
            let t = Instant::now();
            let raw = RawWs::connect(addr, "/echo", secure.then_some(&tls));
            let raw_us = us(t.elapsed());
            raw.close();
            srv.stop();
            std::thread::sleep(Duration::from_millis(2));
            srv = restart(addr, secure);
            let t0 = Instant::now();
            client.reconnect_now();
            let (_, t1) = util::wait_event(&rx, Duration::from_secs(5), |e| {
                matches!(e, Event::Connected { .. })
            })
            .expect("reconnected");
            if s > 0 {
                // Sample 0 is a warm-up.
                a.push(raw_us);
                b.push(us(t1 - t0));
            }
        }
        let _ = client.close();
        let (ra, rb) = (summarize(&a), summarize(&b));
        let scheme = if secure { "wss" } else { "ws" };
        println!(
            "  {scheme}: raw connect n={} p50 {} p99 {} | wsbeat server-up -> Connected p50 {} p99 {} max {}",
            ra.n,
            fmt_us(ra.p50),
            fmt_us(ra.p99),
            fmt_us(rb.p50),
            fmt_us(rb.p99),
            fmt_us(rb.max)
        );
        rows.push(Row::new(
            format!("reconnect {scheme}: server up -> Connected (reconnect_now), median"),
            format!("{} (connect)", fmt_us(ra.p50)),
            fmt_us(rb.p50),
            ratio(rb.p50, ra.p50),
            "< 5 ms",
            Met::from(rb.p50 < GOAL_US),
        ));
        rows.push(Row::new(
            format!("reconnect {scheme}, p99 (n={})", rb.n),
            fmt_us(ra.p99),
            fmt_us(rb.p99),
            ratio(rb.p99, ra.p99),
            "-",
            Met::Info,
        ));
    }

    // Fixed 50 ms backoff, ws.
    let delay = Duration::from_millis(50);
    let mut srv = Server::start(false);
    let addr = srv.addr;
    let client = util::builder(&srv.url("/echo"))
        .reconnect_policy(Fixed(delay))
        .connect()
        .expect("wsbeat connect");
    let rx = client.events();
    util::wait_event(&rx, Duration::from_secs(5), |e| {
        matches!(e, Event::Connected { .. })
    })
    .expect("first Connected");
    let mut c = Vec::new();
    let mut retried = 0;
    for _ in 0..samples {
        srv.stop();
        srv = restart(addr, false);
        let t_up = Instant::now();
        let mut last_rec = None;
        loop {
            let ev = rx.recv_timeout(Duration::from_secs(5)).expect("events");
            let t = Instant::now();
            match ev {
                Event::Reconnecting { delay: d, .. } => {
                    if last_rec.is_some() {
                        retried += 1;
                    }
                    last_rec = Some(t + d);
                }
                Event::Connected { .. } => {
                    let due = last_rec.expect("Reconnecting before Connected").max(t_up);
                    c.push(us(t.saturating_duration_since(due)));
                    break;
                }
                _ => {}
            }
        }
    }
    let _ = client.close();
    let rc = summarize(&c);
    println!(
        "  ws, fixed 50 ms backoff: Connected - max(server up, backoff end) p50 {} p99 {} ({retried} attempts retried)",
        fmt_us(rc.p50),
        fmt_us(rc.p99)
    );
    rows.push(Row::new(
        "reconnect ws, fixed 50 ms backoff, delay subtracted, median",
        "-",
        fmt_us(rc.p50),
        "-",
        "< 5 ms",
        Met::from(rc.p50 < GOAL_US),
    ));
    notes.push(format!(
        "Reconnect: {samples} server restarts per row on the same port; raw = one fresh raw \
         tungstenite connect to the same server, also right after it started listening \
         again (TLS connector built once, outside timing)."
    ));
    rows
}
