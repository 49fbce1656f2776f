//! Thousands of reconnect cycles leave no thread and no socket behind: the old socket is
//! shut down and its reader joined before the next connection starts.
//!
//! Both tests count process-wide threads and fds, so they hold `util::exclusive()`.

mod support;

use std::time::{Duration, Instant};

use support::server::{Behavior, TestServer};
use support::util;
use wsbeat::{Client, Event, Failure, Heartbeat, ReconnectPolicy, State};

const T: Duration = Duration::from_secs(10);

/// Retry at once; every connection counts as stable.
struct Immediately;

impl ReconnectPolicy for Immediately {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        Some(Duration::ZERO)
    }
    fn min_uptime(&self) -> Duration {
        Duration::ZERO
    }
}

fn client(url: &str) -> Client {
    Client::builder(url)
        .heartbeat(Heartbeat::ping(
            Duration::from_secs(5),
            Duration::from_secs(5),
        ))
        .reconnect_policy(Immediately)
        .connect()
        .unwrap()
}

/// Waits for `Connected { generation >= g }` and returns its generation.
fn wait_connected_gen(events: &wsbeat::Events, g: u64) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Connected { generation, .. }) if generation >= g => return generation,
            Ok(Event::GaveUp(e)) => panic!("gave up: {e}"),
            Ok(_) => {}
            Err(_) => panic!("no Connected {{ generation: {g} }} within {T:?}"),
        }
    }
}

/// The client's resources in a steady state: one open connection, nothing in flight.
struct Snapshot {
    wsbeat_threads: usize,
    fds: usize,
}

fn steady(server: &TestServer, client: &Client) -> Snapshot {
    // `Connected` is emitted just before the connection's reader starts, and a new thread
    // carries its parent's name until it has started: wait for the reader, the timer and
    // the supervisor. Old readers must all be gone (joined): exactly three threads.
    let settled = util::wait_until(T, || {
        server.live() == 1
            && client.state() == State::Open
            && util::threads_named("wsbeat-reader-") == 1
            && util::threads_named("wsbeat-") == 3
    });
    assert!(settled, "not settled: {:?}", util::thread_names());
    Snapshot {
        wsbeat_threads: util::threads_named("wsbeat-"),
        fds: util::fd_count(),
    }
}

fn assert_no_leak(before: &Snapshot, server: &TestServer, client: &Client, cycles: u64) {
    let after = steady(server, client);
    // reader + timer + supervisor, exactly as before.
    assert_eq!(after.wsbeat_threads, 3);
    assert_eq!(after.wsbeat_threads, before.wsbeat_threads);
    // Server-side sockets of finished connections close as their threads end.
    let fds_ok = util::wait_until(T, || util::fd_count() <= before.fds);
    assert!(
        fds_ok,
        "fds after {cycles} cycles: {} (before: {})",
        util::fd_count(),
        before.fds
    );
}

#[test]
fn two_thousand_reconnect_now_cycles_leak_no_thread_or_fd() {
    let _g = util::exclusive();
    let server = TestServer::builder().no_record().start();
    let client = client(&server.url());
    let events = client.events();
    let mut generation = wait_connected_gen(&events, 1);
    let before = steady(&server, &client);
    assert_eq!(before.wsbeat_threads, 3, "{:?}", util::thread_names());
    eprintln!("before: {} fds", before.fds);

    let cycles = 2_000;
    let t0 = Instant::now();
    for _ in 0..cycles {
        client.reconnect_now();
        let g = wait_connected_gen(&events, generation + 1);
        assert_eq!(g, generation + 1, "exactly one new connection per call");
        generation = g;
    }
    eprintln!("{cycles} reconnect_now cycles in {:?}", t0.elapsed());
    assert_eq!(client.stats().generation, 1 + cycles);
    // The server counts an upgrade just after sending the 101 response.
    util::wait_until(T, || server.upgraded() as u64 > cycles);
    assert_eq!(server.upgraded() as u64, 1 + cycles);
    assert_no_leak(&before, &server, &client, cycles);

    let _ = client.close();
    // close() joined every thread; a joined thread can linger in /proc for a moment.
    support::client::assert_no_client_threads("after close", T);
}

#[test]
fn a_thousand_server_kicks_with_zero_backoff_leak_no_thread_or_fd() {
    let _g = util::exclusive();
    let server = TestServer::builder().no_record().start();
    let client = client(&server.url());
    let events = client.events();
    let first = wait_connected_gen(&events, 1);
    let before = steady(&server, &client);
    assert_eq!(before.wsbeat_threads, 3, "{:?}", util::thread_names());
    eprintln!("before: {} fds", before.fds);

    // From now on the server closes every connection right after the upgrade, and the
    // policy retries at once: the reader reports each death, the supervisor rebuilds.
    server.set_behavior(Behavior::close_after_upgrade(1001, "kick"));
    let cycles = 1_000;
    let t0 = Instant::now();
    client.reconnect_now();
    let reached = wait_connected_gen(&events, first + cycles);
    eprintln!("{cycles} kick cycles in {:?}", t0.elapsed());

    // Let a connection stay: once a message comes back, the client is on an echo
    // connection, and an echo connection never ends. A kicking connection swallows a
    // probe without answering, so probe again after each connection change.
    server.set_behavior(Behavior::Echo);
    let deadline = Instant::now() + T;
    'probe: loop {
        client.send_text("still there?").unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(Event::Message(_)) => break 'probe,
                Ok(Event::Connected { .. }) => continue 'probe,
                Ok(_) => {}
                Err(_) => panic!("no echo within {T:?}"),
            }
        }
    }
    assert_no_leak(&before, &server, &client, reached - first);

    let _ = client.close();
    // close() joined every thread; a joined thread can linger in /proc for a moment.
    support::client::assert_no_client_threads("after close", T);
}
