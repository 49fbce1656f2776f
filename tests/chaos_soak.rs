//! Chaos soak: several clients send numbered messages through a fault-injecting proxy to
//! an echo server while, at random intervals, the proxy resets, closes, blackholes,
//! delays and cuts connections mid-frame, the server restarts, resets and closes, and
//! clients are told to reconnect. At the end every message is accounted for.
//!
//! Duration: `WSBEAT_SOAK_SECS` (default 20 s of chaos, plus a drain of a few seconds);
//! long runs are cut into epochs of at most 60 s, each accounted for on its own, and
//! memory must stay flat from epoch to epoch.
//! The RNG seed is printed at the start; `WSBEAT_SOAK_SEED` replays the same fault
//! schedule and sending pattern (thread timing still differs between runs).
//!
//! Accounting per client, message `c{client}-{seq}`:
//! - *accepted*: `send`/`try_send` returned `Ok`; *handed back*: returned in an `Err`
//!   (`Error::into_message`), in `Event::Undelivered`, or by `close()`.
//! - *delivered*: the server received it (`TestServer::received`); echoes are only a
//!   cross-check (an echo can be lost on its way back when the link dies).
//! - A message both delivered and handed back is a bug, as is one echoed more often
//!   than the server received it (inbound is at most once).
//! - *Re-sent* (delivered more than once) is allowed: messages in flight when a
//!   connection dies are sent again on the next one (at least once, RELIABILITY.md).
//! - *Lost in transit*: accepted, handed to the OS on a connection that then died, and
//!   never read by the server (it sat in a kernel or proxy buffer when the link was
//!   reset). The client cannot know about these without application acks; the test
//!   checks they only occur as one contiguous run per connection death of that client.
//! - Per server connection, each client's messages arrive in increasing order (FIFO,
//!   queued messages before new ones); per client connection, echoes arrive in order.
//!
//! Also: no deadlock (every wait bounded, send latency bounded), no panic in a client
//! thread, `wsbeat-*` threads and open fds back to the baseline, memory flat.
#![cfg(all(target_os = "linux", target_env = "gnu"))] // glibc's mallinfo2 for heap growth

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::client::{client_panics, watch_panics};

use support::proxy::{Dir, FaultProxy};
use support::server::TestServer;
use support::util;
use wsbeat::{
    Backoff, Client, DisconnectReason, Event, Heartbeat, Limits, Message, OverflowPolicy,
};

const CLIENTS: usize = 4;
/// Upper bound for anything that should happen "soon" (joins, drains).
const T: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest epoch of a long run (see `chaos_soak_accounts_for_every_message`).
const EPOCH_MAX_SECS: u64 = 60;

// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// Joins `t` within `limit`, or fails (a hung thread is a deadlock).
fn join_within<R: Send + 'static>(what: &str, t: JoinHandle<R>, limit: Duration) -> R {
    assert!(
        util::wait_until(limit, || t.is_finished()),
        "{what} did not finish within {limit:?} (deadlock?)"
    );
    t.join().unwrap_or_else(|_| panic!("{what} panicked"))
}

fn text(client: usize, seq: u64, pad: usize) -> String {
    let mut s = format!("c{client}-{seq}");
    if pad > 0 {
        s.push('~');
        s.extend(std::iter::repeat_n('x', pad));
    }
    s
}

/// `c{client}-{seq}[~pad]` -> (client, seq). `None` for the end markers and strangers.
fn parse(s: &str) -> Option<(usize, u64)> {
    let rest = s.strip_prefix('c')?;
    let (c, rest) = rest.split_once('-')?;
    let seq = rest.split('~').next()?;
    Some((c.parse().ok()?, seq.parse().ok()?))
}

fn msg_text(m: &Message) -> String {
    m.to_text().expect("text message").to_string()
}

// ---------------------------------------------------------------------------------------

/// What one sender thread saw.
#[derive(Default)]
struct Sent {
    /// Seqs whose send returned Ok, in order.
    accepted: Vec<u64>,
    /// Seqs handed back by an Err.
    refused: Vec<u64>,
    slowest: Duration,
}

/// What one event thread saw.
#[derive(Default)]
struct Seen {
    echoes: HashMap<u64, u32>,
    undelivered: Vec<u64>,
    connected: u32,
    disconnects: Vec<DisconnectReason>,
    /// Echoes out of order within one connection: (generation, previous, got).
    echo_order_violations: Vec<(u64, u64, u64)>,
    end_marker: bool,
}

fn collect_events(client: usize, events: wsbeat::Events, end_marker: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut generation = 0;
    let mut last_echo: Option<u64> = None;
    loop {
        let ev = events
            .recv_timeout(Duration::from_secs(120))
            .expect("client events stopped without Closed");
        match ev {
            Event::Connected { generation: g, .. } => {
                seen.connected += 1;
                generation = g;
                last_echo = None;
            }
            Event::Message(m) => {
                let t = msg_text(&m);
                if t == format!("c{client}-end") {
                    seen.end_marker = true;
                    end_marker.store(true, SeqCst);
                    continue;
                }
                let (c, seq) = parse(&t).unwrap_or_else(|| panic!("stray echo {t:?}"));
                assert_eq!(c, client, "echo of another client's message");
                *seen.echoes.entry(seq).or_default() += 1;
                if let Some(prev) = last_echo
                    && seq <= prev
                {
                    // Equal or lower on one connection: only a re-sent message may do that.
                    seen.echo_order_violations.push((generation, prev, seq));
                }
                last_echo = Some(seq);
            }
            Event::Undelivered(ms) => {
                for m in ms {
                    let t = msg_text(&m);
                    if let Some((_, seq)) = parse(&t) {
                        seen.undelivered.push(seq);
                    }
                }
            }
            Event::Disconnected { reason, .. } => seen.disconnects.push(reason),
            Event::Closed => return seen,
            _ => {}
        }
    }
}

fn sender(client: usize, c: Client, stop: Arc<AtomicBool>, mut rng: Rng) -> Sent {
    let mut sent = Sent::default();
    let mut seq = 0u64;
    while !stop.load(SeqCst) {
        let burst = if rng.below(50) == 0 {
            1 + rng.below(50)
        } else {
            1
        };
        for _ in 0..burst {
            // Now and then a bigger message (frames spanning several TCP segments).
            let pad = if rng.below(50) == 0 {
                rng.below(4096) as usize
            } else {
                0
            };
            let t = text(client, seq, pad);
            let t0 = Instant::now();
            let r = if rng.below(10) == 0 {
                c.try_send(Message::text(t.clone()))
            } else {
                c.send_text(t.clone())
            };
            sent.slowest = sent.slowest.max(t0.elapsed());
            match r {
                Ok(()) => sent.accepted.push(seq),
                Err(e) => {
                    let back = e
                        .into_message()
                        .unwrap_or_else(|| panic!("c{client}-{seq}: an Err without the message"));
                    assert_eq!(msg_text(&back), t, "handed back a different message");
                    sent.refused.push(seq);
                }
            }
            seq += 1;
        }
        // Load shaping: about 1000 messages per second per client.
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    }
    sent
}

fn client_builder(url: &str, i: usize) -> wsbeat::ClientBuilder {
    let b = Client::builder(url)
        .connect_timeout(Duration::from_secs(2))
        .write_timeout(WRITE_TIMEOUT)
        .close_timeout(Duration::from_secs(1))
        .heartbeat(Heartbeat::ping(
            Duration::from_millis(300),
            Duration::from_millis(700),
        ))
        .reconnect_policy(
            Backoff::default()
                .initial(Duration::from_millis(20))
                .max(Duration::from_millis(400))
                .min_uptime(Duration::from_millis(500)),
        );
    let small = Limits::default().queue_messages(300);
    match i % 4 {
        // Default limits and policy (Reject).
        0 | 1 => b,
        // A small queue: sends are refused (handed back) during outages.
        2 => b.limits(small),
        // A small queue and a bounded wait for room.
        _ => b
            .limits(small)
            .overflow(OverflowPolicy::Block(Duration::from_millis(100))),
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    ProxyReset,
    ProxyClose,
    Blackhole,
    Delay,
    Cut,
    ServerRestart,
    ServerReset,
    ServerClose,
    Refuse,
    ReconnectNow,
    Calm,
}

const FAULTS: [Fault; 11] = [
    Fault::ProxyReset,
    Fault::ProxyClose,
    Fault::Blackhole,
    Fault::Delay,
    Fault::Cut,
    Fault::ServerRestart,
    Fault::ServerReset,
    Fault::ServerClose,
    Fault::Refuse,
    Fault::ReconnectNow,
    Fault::Calm,
];

#[test]
fn chaos_soak_accounts_for_every_message() {
    let _g = util::exclusive();
    watch_panics();
    let secs = util::env_u64("WSBEAT_SOAK_SECS").unwrap_or(20);
    let seed = util::env_u64("WSBEAT_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    // Long runs are cut into epochs of at most a minute, each with a fresh server, proxy
    // and clients: every epoch is accounted for on its own (the test server keeps every
    // message it received), and memory must stay flat from one epoch to the next.
    let epochs = secs.div_ceil(EPOCH_MAX_SECS).max(1);
    let per_epoch = secs.div_ceil(epochs).max(1);
    eprintln!(
        "chaos soak: {secs} s in {epochs} epoch(s) of {per_epoch} s, {CLIENTS} clients, \
         seed {seed} (replay: WSBEAT_SOAK_SEED={seed} WSBEAT_SOAK_SECS={secs})"
    );
    let replay = format!("seed {seed} (replay: WSBEAT_SOAK_SEED={seed} WSBEAT_SOAK_SECS={secs})");
    let mut rng = Rng(seed);
    let mut first_heap = None;
    for index in 0..epochs {
        epoch(index, per_epoch, &mut rng, &replay);
        let heap = heap_in_use();
        let first = *first_heap.get_or_insert(heap);
        eprintln!(
            "epoch {index}: heap in use after teardown {} KiB (after epoch 0: {} KiB)",
            heap >> 10,
            first >> 10
        );
        // Everything of the epoch is gone: what is still allocated must not grow. (RSS
        // is no use here: the allocator keeps freed pages, unevenly across its arenas.)
        assert!(
            heap.saturating_sub(first) < 16 << 20,
            "{replay}: heap in use grew by {} KiB from epoch 0 to epoch {index}",
            (heap - first) >> 10
        );
    }
}

/// Bytes handed out by the allocator and not yet freed, all arenas (glibc).
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let mi = unsafe { libc::mallinfo2() };
    (mi.uordblks + mi.hblkhd) as u64
}

/// One epoch: start, `secs` of chaos, drain, account, tear down.
fn epoch(index: u64, secs: u64, rng: &mut Rng, replay: &str) {
    eprintln!("epoch {index}: {secs} s of chaos");
    let fds_before = util::fd_count();
    let threads_before = util::thread_count();
    assert!(
        util::wait_until(T, || util::threads_named("wsbeat-") == 0),
        "wsbeat threads from an earlier epoch"
    );

    let server = TestServer::echo();
    let proxy = FaultProxy::start(server.addr());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut senders = Vec::new();
    let mut collectors = Vec::new();
    let mut markers = Vec::new();
    for i in 0..CLIENTS {
        let client = client_builder(&proxy.url(), i)
            .connect_lazy()
            .expect("client");
        let marker = Arc::new(AtomicBool::new(false));
        let (ev, m) = (client.events(), marker.clone());
        collectors.push(
            std::thread::Builder::new()
                .name(format!("soak-events-{i}"))
                .spawn(move || collect_events(i, ev, m))
                .unwrap(),
        );
        let (c, st, r) = (client.clone(), stop.clone(), Rng(rng.next()));
        senders.push(
            std::thread::Builder::new()
                .name(format!("soak-sender-{i}"))
                .spawn(move || sender(i, c, st, r))
                .unwrap(),
        );
        markers.push(marker);
        clients.push(client);
    }

    // --- chaos ---
    let started = Instant::now();
    let chaos_for = Duration::from_secs(secs);
    let warmup = chaos_for / 5;
    let mut rss_base: Option<(u64, usize)> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    while started.elapsed() < chaos_for {
        if rss_base.is_none() && started.elapsed() >= warmup {
            rss_base = Some((util::rss_kib(), server.received_count()));
        }
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        *counts.entry(format!("{fault:?}")).or_default() += 1;
        // The pauses below shape the fault schedule; nothing waits on them.
        match fault {
            Fault::ProxyReset => proxy.reset_all(),
            Fault::ProxyClose => proxy.close_all(),
            Fault::Blackhole => {
                proxy.blackhole();
                std::thread::sleep(rng.ms(100, 1500));
                proxy.resume();
            }
            Fault::Delay => {
                proxy.set_delay(rng.ms(1, 150));
                std::thread::sleep(rng.ms(300, 1500));
                proxy.set_delay(Duration::ZERO);
            }
            Fault::Cut => proxy.cut_mid_frame(match rng.below(3) {
                0 => Dir::ToServer,
                1 => Dir::ToClient,
                _ => Dir::Either,
            }),
            Fault::ServerRestart => {
                server.stop();
                std::thread::sleep(rng.ms(0, 500));
                server.restart();
            }
            Fault::ServerReset => server.reset_all(),
            Fault::ServerClose => server.close_all(1012, "restart"),
            Fault::Refuse => {
                proxy.refuse(true);
                proxy.reset_all();
                std::thread::sleep(rng.ms(100, 800));
                proxy.refuse(false);
            }
            Fault::ReconnectNow => clients[rng.below(CLIENTS as u64) as usize].reconnect_now(),
            Fault::Calm => {}
        }
        std::thread::sleep(rng.ms(50, 800));
    }
    let (rss_before, received_before) =
        rss_base.unwrap_or_else(|| (util::rss_kib(), server.received_count()));

    // --- calm down and drain ---
    proxy.resume();
    proxy.set_delay(Duration::ZERO);
    proxy.refuse(false);
    stop.store(true, SeqCst);
    let sent: Vec<Sent> = senders
        .into_iter()
        .enumerate()
        .map(|(i, t)| join_within(&format!("sender {i}"), t, T))
        .collect();
    // A final marker per client: its echo proves everything queued before it went out
    // on a working connection (the queue is flushed in order before new sends).
    for (i, client) in clients.iter().enumerate() {
        let deadline = Instant::now() + T;
        loop {
            match client.send_text(format!("c{i}-end")) {
                Ok(()) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "client {i}: marker refused: {e}");
                    // The queue is still full of the backlog: give it time to drain.
                    util::wait_until(Duration::from_millis(200), || client.stats().queued == 0);
                }
            }
        }
    }
    for (i, client) in clients.iter().enumerate() {
        assert!(
            util::wait_until(T, || markers[i].load(SeqCst)),
            "client {i}: the end marker never came back: {:?}",
            client.stats()
        );
        assert!(
            util::wait_until(T, || client.stats().queued == 0),
            "client {i}: queue not drained"
        );
    }
    let drained_at = started.elapsed();
    let mut closed_back: Vec<Vec<u64>> = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let c = client.clone();
        let t = std::thread::spawn(move || c.close());
        let back = join_within(&format!("close() of client {i}"), t, T);
        closed_back.push(
            back.iter()
                .filter_map(|m| parse(&msg_text(m)).map(|(_, s)| s))
                .collect(),
        );
    }
    drop(clients);
    let seen: Vec<Seen> = collectors
        .into_iter()
        .enumerate()
        .map(|(i, t)| join_within(&format!("event collector {i}"), t, T))
        .collect();
    let received = server.received();
    let received_total = server.received_count();

    // --- accounting ---
    // Per client: receipts per seq; per (server connection, client): arrival order.
    let mut got: Vec<HashMap<u64, u32>> = vec![HashMap::new(); CLIENTS];
    let mut last_on_conn: HashMap<(usize, usize), u64> = HashMap::new();
    let mut order_violations = Vec::new();
    for r in &received {
        let Some(t) = r.text() else { continue };
        let Some((c, seq)) = parse(t) else {
            assert!(t.ends_with("-end"), "stray message at the server: {t:?}");
            continue;
        };
        *got[c].entry(seq).or_default() += 1;
        if let Some(prev) = last_on_conn.insert((r.conn, c), seq)
            && seq <= prev
        {
            order_violations.push((r.conn, c, prev, seq));
        }
    }
    let mut failures = Vec::new();
    for c in 0..CLIENTS {
        let (s, e) = (&sent[c], &seen[c]);
        let refused: std::collections::HashSet<u64> = s.refused.iter().copied().collect();
        let undelivered: std::collections::HashSet<u64> = e
            .undelivered
            .iter()
            .chain(&closed_back[c])
            .copied()
            .collect();
        let delivered = |seq: &u64| got[c].get(seq).copied().unwrap_or(0);
        let mut lost = Vec::new();
        let mut runs = 0;
        let mut in_run = false;
        for seq in &s.accepted {
            if delivered(seq) == 0 && !undelivered.contains(seq) {
                lost.push(*seq);
                if !in_run {
                    runs += 1;
                }
                in_run = true;
            } else {
                in_run = false;
            }
        }
        let both: Vec<u64> = refused
            .iter()
            .chain(&undelivered)
            .filter(|s| delivered(s) > 0 || e.echoes.contains_key(s))
            .copied()
            .collect();
        let over_echoed: Vec<u64> = e
            .echoes
            .iter()
            .filter(|(seq, n)| **n > got[c].get(seq).copied().unwrap_or(0))
            .map(|(s, _)| *s)
            .collect();
        let resent = got[c].values().filter(|&&n| n > 1).count();
        let refused_accepted: Vec<u64> = s
            .accepted
            .iter()
            .filter(|x| refused.contains(x))
            .copied()
            .collect();
        eprintln!(
            "client {c}: {} sent, {} accepted, {} delivered, {} re-sent (at least once), \
             {} refused, {} undelivered, {} lost in transit in {runs} runs, {} echoes, \
             {} connections, {} disconnects, slowest send {:?}",
            s.accepted.len() + s.refused.len(),
            s.accepted.len(),
            got[c].len(),
            resent,
            s.refused.len(),
            undelivered.len(),
            lost.len(),
            e.echoes.len(),
            e.connected,
            e.disconnects.len(),
            s.slowest,
        );
        if !both.is_empty() {
            failures.push(format!(
                "client {c}: {} messages both handed back and delivered/echoed, e.g. {:?}",
                both.len(),
                &both[..both.len().min(10)]
            ));
        }
        if !over_echoed.is_empty() {
            failures.push(format!(
                "client {c}: echoed more often than the server received: {:?}",
                &over_echoed[..over_echoed.len().min(10)]
            ));
        }
        if !refused_accepted.is_empty() {
            failures.push(format!(
                "client {c}: both Ok and Err for {refused_accepted:?}"
            ));
        }
        if runs > e.disconnects.len() {
            failures.push(format!(
                "client {c}: {} messages lost in {runs} runs, but only {} connections died: \
                 e.g. {:?}",
                lost.len(),
                e.disconnects.len(),
                &lost[..lost.len().min(20)]
            ));
        }
        if !e.echo_order_violations.is_empty() {
            // On one connection the echoes follow the server's receive order, which is
            // increasing (checked below); a violation here is a client-side reorder.
            failures.push(format!(
                "client {c}: echoes out of order within a connection: {:?}",
                &e.echo_order_violations[..e.echo_order_violations.len().min(10)]
            ));
        }
        if s.slowest > WRITE_TIMEOUT + Duration::from_secs(10) {
            failures.push(format!("client {c}: a send took {:?}", s.slowest));
        }
        if !e.end_marker {
            failures.push(format!("client {c}: no end marker"));
        }
        if e.connected < 2 {
            failures.push(format!(
                "client {c}: only {} connections: the chaos did not reach it",
                e.connected
            ));
        }
    }
    if !order_violations.is_empty() {
        failures.push(format!(
            "{} out-of-order arrivals on one server connection (conn, client, previous, got), \
             e.g. {:?}",
            order_violations.len(),
            &order_violations[..order_violations.len().min(10)]
        ));
    }
    eprintln!("faults: {counts:?}; drained at {drained_at:?}");

    // --- resources ---
    drop(proxy);
    drop(server);
    assert!(
        util::wait_until(T, || util::threads_named("wsbeat-") == 0),
        "wsbeat threads left: {:?}",
        util::thread_names()
    );
    assert!(
        util::wait_until(T, || util::thread_count() <= threads_before),
        "threads: {} before, {} after: {:?}",
        threads_before,
        util::thread_count(),
        util::thread_names()
    );
    assert!(
        util::wait_until(T, || util::fd_count() <= fds_before),
        "open fds: {fds_before} before, {} after",
        util::fd_count()
    );
    // Memory: flat apart from the test server's own record of every message it got
    // (allowance: 64 MiB, plus each message recorded since the baseline at twice its
    // size and 256 bytes of bookkeeping).
    let rss_after = util::rss_kib();
    let recorded: u64 = received
        .iter()
        .skip(received_before.min(received.len()))
        .map(|r| 2 * r.msg.len() as u64 + 256)
        .sum();
    let budget = (64 << 10) + recorded / 1024;
    eprintln!(
        "RSS {rss_before} KiB -> {rss_after} KiB ({} messages, {} KiB recorded meanwhile; \
         budget {budget} KiB)",
        received_total.saturating_sub(received_before),
        recorded / 1024
    );
    if rss_after.saturating_sub(rss_before) > budget {
        failures.push(format!(
            "RSS grew by {} KiB (budget {budget} KiB)",
            rss_after - rss_before
        ));
    }
    assert_eq!(client_panics(), 0, "a wsbeat thread panicked");
    assert!(
        failures.is_empty(),
        "{replay}, epoch {index}:\n{}",
        failures.join("\n")
    );
}
