//! Issue 11: the inbound side beyond raw speed.
//! * Slow consumer: a server floods 1 KiB messages, the consumer takes each one 20x longer
//!   than raw tungstenite needs to read it (measured first, in the same run). Default
//!   `event_capacity` (10 000 messages / 32 MiB), `Heartbeat::ping(1 s, 1 s)`. Reported:
//!   growth of the process RSS over the run (goal: under the 32 MiB byte bound + 16 MiB),
//!   messages lost (goal 0), disconnects / `HeartbeatTimeout` (goal 0). The run lasts
//!   20 s in full mode, not the 60 s, to keep `cargo bench` short; the bound is
//!   reached within the first second, so a longer run measures the same steady state.
//! * Idle memory: RSS per idle connected client with default settings, 500 clients in a
//!   fresh process (this binary with `WSBEAT_BENCH_ROLE=idle-clients`) against the scale
//!   server process, wsbeat against tokio-tungstenite (one current_thread runtime, one
//!   task per connection waiting in `next()`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tungstenite::Message;
use wsbeat::{Event, Heartbeat};

use crate::server::Server;
use crate::util::{self, RawWs, say};
use crate::{Met, Opts, ROLE_ENV, Row};

const SIZE: usize = 1024;
const SLOWER: f64 = 20.0;

fn raw_rate(srv: &Server, n: usize) -> f64 {
    let mut raw = RawWs::connect(srv.addr, "/flood", None);
    let t = Instant::now();
    raw.send(Message::text(format!("go {n} {SIZE}"))).unwrap();
    let mut got = 0;
    loop {
        match raw.read().expect("raw read") {
            Message::Binary(_) => got += 1,
            Message::Text(_) => break,
            _ => {}
        }
    }
    assert_eq!(got, n);
    let r = n as f64 / t.elapsed().as_secs_f64();
    raw.close();
    r
}

fn slow_consumer(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let secs = o.pick(20.0, 5.0);
    let srv = Server::start(false);
    raw_rate(&srv, 20_000);
    let rate = raw_rate(&srv, 200_000);
    let per_msg = SLOWER / rate;
    let n = (secs / per_msg) as usize;
    let client = util::builder(&srv.url("/flood"))
        .heartbeat(Heartbeat::ping(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ))
        .connect()
        .expect("wsbeat connect");
    let events = client.events();
    let rss0 = util::rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(util::rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t = Instant::now();
    client
        .send_text(format!("go {n} {SIZE}"))
        .expect("wsbeat send");
    let (mut got, mut disconnects, mut queued_peak) = (0usize, Vec::new(), 0usize);
    let chunk = 256;
    loop {
        match events.recv_timeout(Duration::from_secs(30)) {
            Ok(Event::Message(Message::Binary(_))) => {
                got += 1;
                if got.is_multiple_of(chunk) {
                    queued_peak = queued_peak.max(client.stats().events_queued);
                    // The consumer's "work" for the last `chunk` messages.
                    std::thread::sleep(Duration::from_secs_f64(per_msg * chunk as f64));
                }
            }
            Ok(Event::Message(Message::Text(_))) => break,
            Ok(Event::Disconnected { reason, .. }) => disconnects.push(reason.to_string()),
            Ok(_) => {}
            Err(e) => {
                disconnects.push(format!("no event for 30 s ({e})"));
                break;
            }
        }
    }
    let wall = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let st = client.stats();
    let _ = client.close();
    let growth_mib = (peak.load(Ordering::Relaxed).saturating_sub(rss0)) as f64 / 1024.0;
    let bound_mib = (wsbeat::DEFAULT_EVENT_CAPACITY_BYTES >> 20) as f64 + 16.0;
    println!(
        "  slow consumer: raw rate {:.0} k msg/s, consumer {:.1} µs/msg, {got}/{n} in {wall:.1} s, \
         RSS +{growth_mib:.1} MiB, queue peak {queued_peak} msgs, stalls reported {}, \
         disconnects {disconnects:?}",
        rate / 1e3,
        per_msg * 1e6,
        st.consumer_stalls
    );
    notes.push(format!(
        "Slow consumer: server floods {n} x {SIZE} B; the consumer sleeps {:.1} µs per message \
         ({SLOWER}x raw tungstenite's {:.0} k msg/s measured just before), {wall:.1} s; default \
         event_capacity ({} messages / {} MiB), ping(1 s, 1 s). Queue peak {queued_peak} messages.",
        per_msg * 1e6,
        rate / 1e3,
        wsbeat::DEFAULT_EVENT_CAPACITY_MESSAGES,
        wsbeat::DEFAULT_EVENT_CAPACITY_BYTES >> 20
    ));
    vec![
        Row::new(
            format!("slow consumer (20x slower, {wall:.0} s): client RSS growth"),
            "-",
            format!("{growth_mib:.1} MiB"),
            "-",
            format!("< {bound_mib:.0} MiB (bound + 16 MiB)"),
            Met::from(growth_mib < bound_mib),
        ),
        Row::new(
            "slow consumer: messages delivered / lost (order: tests/inbound.rs)",
            "-",
            format!("{got}/{n} / {}", n - got.min(n)),
            "-",
            "0 lost",
            Met::from(got == n),
        ),
        Row::new(
            "slow consumer: disconnects (HeartbeatTimeout or other)",
            "-",
            disconnects.len().to_string(),
            "-",
            "0",
            Met::from(disconnects.is_empty()),
        ),
    ]
}

/// Runs the idle-clients child for one kind; RSS per client in KiB.
fn idle_child(kind: &str, n: usize) -> Option<f64> {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(ROLE_ENV, "idle-clients")
        .env("WSBEAT_IDLE_KIND", kind)
        .env("WSBEAT_IDLE_N", n.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn idle-clients");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut per = None;
    for line in out.lines().map_while(Result::ok) {
        match line.strip_prefix("RESULT rss_per_client_kib ") {
            Some(v) => per = v.parse().ok(),
            None => println!("  {line}"),
        }
    }
    let ok = child.wait().is_ok_and(|s| s.success());
    per.filter(|_| ok)
}

fn idle_rss(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let n = o.pick(500, 100);
    // Interleaved: tt, wsbeat, tt, wsbeat; the smaller value of each is kept.
    let mut tt = f64::INFINITY;
    let mut ws = f64::INFINITY;
    for _ in 0..o.pick(2, 1) {
        tt = tt.min(idle_child("tokio-tungstenite", n).unwrap_or(f64::NAN));
        ws = ws.min(idle_child("wsbeat", n).unwrap_or(f64::NAN));
    }
    notes.push(format!(
        "Idle memory: {n} idle connected clients with default settings in a fresh process, \
         RSS growth / {n} two seconds after the last connected (best of the interleaved runs)."
    ));
    vec![Row::new(
        format!(
            "RSS per idle connected client, defaults ({n} clients): tokio-tungstenite (raw column) vs wsbeat"
        ),
        format!("{tt:.1} KiB"),
        format!("{ws:.1} KiB"),
        crate::ratio(ws, tt),
        "<= 1.0x",
        Met::from(ws <= tt),
    )]
}

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let mut rows = slow_consumer(o, notes);
    rows.extend(idle_rss(o, notes));
    rows
}

/// The idle-clients process: `n` clients of one kind, then its RSS per client.
pub fn idle_clients_main() {
    let kind = std::env::var("WSBEAT_IDLE_KIND").unwrap_or_default();
    let n: usize = std::env::var("WSBEAT_IDLE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    util::raise_nofile();
    let mut stdout = std::io::stdout();
    // Keep its stdin open: the server ends at EOF.
    let crate::scale::ScaleServer {
        mut server,
        sin: _sin,
        sout: _sout,
        port,
    } = crate::scale::ScaleServer::spawn();
    let url = format!("ws://127.0.0.1:{port}/echo");
    let settle = Duration::from_secs(2);
    let (rss0, rss1) = if kind == "wsbeat" {
        let make = || util::builder(&url).connect().expect("wsbeat connect");
        // Warm-up: lazily initialised process state (allocator arenas, statics).
        let _ = make().close();
        std::thread::sleep(Duration::from_millis(200));
        let rss0 = util::rss_kib();
        let clients: Vec<_> = (0..n).map(|_| make()).collect();
        std::thread::sleep(settle);
        let rss1 = util::rss_kib();
        std::mem::forget(clients);
        (rss0, rss1)
    } else {
        let rt = crate::contender::runtime();
        let connect = |url: String| async move {
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
                .await
                .expect("tokio-tungstenite connect");
            ws
        };
        let warm = rt.block_on(connect(url.clone()));
        drop(warm);
        std::thread::sleep(Duration::from_millis(200));
        let rss0 = util::rss_kib();
        rt.block_on(async {
            for _ in 0..n {
                let mut ws = connect(url.clone()).await;
                // An idle client still waits for messages (and answers pings).
                tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
            }
            tokio::time::sleep(settle).await;
        });
        (rss0, util::rss_kib())
    };
    let per = rss1.saturating_sub(rss0) as f64 / n as f64;
    say(
        &mut stdout,
        &format!("{kind}: {n} idle clients, RSS {rss0} -> {rss1} KiB, {per:.1} KiB per client"),
    );
    say(&mut stdout, &format!("RESULT rss_per_client_kib {per}"));
    let _ = stdout.flush();
    let _ = server.kill();
    let _ = server.wait();
    std::process::exit(0);
}
