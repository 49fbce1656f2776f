//! Acked delivery soak against a real peer (issue 12): Node `ws` answering `{"ack": id}`
//! (tests/peers/ack_server.js), killed with SIGKILL and restarted on the same port every
//! second while two threads send numbered messages. Promise checked: 0 lost — every
//! message is acked exactly once or handed back, and the server's duplicates are no more
//! than the counted re-sends.
//!
//! Skipped with a loud message when Node `ws` is missing (a failure with
//! `WSBEAT_REQUIRE_PEERS=1`). Length: `WSBEAT_ACK_SOAK_SECS` (default 12).

mod interop_support;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use interop_support::{Proc, TempDir, find_program, free_port, missing_peer, peers_dir};
use wsbeat::{Acks, Client, Delivery, Error, Event, Heartbeat, Message, OverflowPolicy};

struct Fixed(Duration);
impl wsbeat::ReconnectPolicy for Fixed {
    fn next_delay(&mut self, _: &wsbeat::Failure<'_>) -> Option<Duration> {
        Some(self.0)
    }
}

fn start(node: &std::path::Path, port: u16, dir: &TempDir, n: usize) -> (Proc, Receiver<String>) {
    let script = peers_dir().join("ack_server.js");
    let log = dir.join(&format!("ack-{n}.log"));
    let mut p = Proc::spawn(
        "ack_server.js",
        Command::new(node)
            .arg(&script)
            .args(["--port", &port.to_string()]),
        &log,
    );
    let lines = p.stdout_lines();
    p.wait_port(port);
    (p, lines)
}

#[test]
fn acked_delivery_loses_nothing_while_the_server_is_killed_every_second() {
    let Ok(node) = find_program("node", "WSBEAT_NODE") else {
        missing_peer("node", "node is not on PATH", "sh .ci/install-peers.sh");
        return;
    };
    if !peers_dir().join("node_modules/ws/package.json").exists() {
        missing_peer(
            "Node ws",
            "tests/peers/node_modules/ws is missing",
            "sh .ci/install-peers.sh",
        );
        return;
    }
    let secs: u64 = std::env::var("WSBEAT_ACK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let dir = TempDir::new("ack-soak");
    let port = free_port();
    let mut outputs = Vec::new();
    let (mut server, lines) = start(&node, port, &dir, 0);
    outputs.push(lines);

    let client = Client::builder(&format!("ws://127.0.0.1:{port}/"))
        .delivery(Delivery::Acked(
            Acks::json_field("id", "ack").timeout(Duration::from_secs(3)),
        ))
        .overflow(OverflowPolicy::Block(Duration::from_secs(30)))
        .heartbeat(Heartbeat::ping(
            Duration::from_millis(500),
            Duration::from_millis(500),
        ))
        .reconnect_policy(Fixed(Duration::from_millis(50)))
        .connect()
        .unwrap();
    let events = client.events();

    // Two senders, ids interleaved (odd / even), paced at ~1 message per ms each.
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2u64)
        .map(|t| {
            let c = client.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut handed_back = Vec::new();
                let mut id = t + 1;
                let mut sent = 0u64;
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let m = Message::text(format!("{{\"id\":{id},\"from\":{t}}}"));
                    if let Err(e) = c.send(m) {
                        assert!(matches!(e, Error::QueueFull { .. }), "send: {e}");
                        handed_back.push(id);
                    }
                    sent += 1;
                    id += 2;
                    // Pacing, not synchronisation: ~1000 messages per second per thread.
                    let due = start + Duration::from_millis(sent);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                (sent, handed_back)
            })
        })
        .collect();

    let t0 = Instant::now();
    let mut restarts = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1)); // the fault schedule, not a sync
        drop(server); // SIGKILL and reap
        restarts += 1;
        let (s, lines) = start(&node, port, &dir, restarts);
        server = s;
        outputs.push(lines);
    }
    stop.store(true, Ordering::Relaxed);
    let mut handed_back: Vec<u64> = Vec::new();
    let mut offered = Vec::new();
    for (t, s) in senders.into_iter().enumerate() {
        let (sent, back) = s.join().unwrap();
        // Thread t offered ids t+1, t+3, ... (`sent` of them).
        offered.extend((0..sent).map(|k| t as u64 + 1 + 2 * k));
        handed_back.extend(back);
    }
    let total = offered.len() as u64;
    // Let the last server ack what is outstanding.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.stats().outbox > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20)); // polling a counter with a deadline
    }
    let back = client.close();
    let st = client.stats();
    drop(server);
    for m in back {
        let Message::Text(t) = m else {
            panic!("unexpected {m:?}")
        };
        let id = t
            .split(['\"', ':', ','])
            .find_map(|p| p.parse::<u64>().ok())
            .unwrap();
        handed_back.push(id);
    }
    let mut undelivered_events = 0;
    for ev in events.try_iter() {
        if let Event::Undelivered(v) = ev {
            undelivered_events += v.len();
        }
    }
    assert_eq!(undelivered_events, 0, "nothing dropped");

    // Everything the servers recorded.
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for rx in &outputs {
        for line in rx.try_iter() {
            if let Some(id) = line.strip_prefix("rx ").and_then(|s| s.parse().ok()) {
                *counts.entry(id).or_default() += 1;
            }
        }
    }
    let back: HashSet<u64> = handed_back.iter().copied().collect();
    let lost: Vec<u64> = offered
        .iter()
        .copied()
        .filter(|id| !counts.contains_key(id) && !back.contains(id))
        .collect();
    let received: u64 = counts.values().map(|c| *c as u64).sum();
    let duplicates = received - counts.len() as u64;
    eprintln!(
        "ack soak: {secs} s, {restarts} restarts, {total} messages, {} acked, {} handed back, \
         {received} received by the servers ({duplicates} duplicates), {} re-sends, {} reconnects",
        st.acked,
        handed_back.len(),
        st.resent,
        st.reconnects
    );
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        st.acked + handed_back.len() as u64,
        total,
        "every message acked exactly once or handed back"
    );
    assert!(
        duplicates <= st.resent,
        "duplicates only as counted re-sends"
    );
    assert!(st.reconnects >= restarts as u64 / 2, "the faults happened");
}
