//! Promise 4 for daemons with many clients: an idle connection gives back what a burst of
//! large messages took, and a message kept after its connection ended holds only its own
//! bytes. The scale probe measured 1-5 MiB per idle client after a burst (its buffer
//! pool never shrank), and ~1.3 MiB per kept 16 KiB message (it held the whole pool).
//! What waits to be written is bounded too: the client's record of it counts against the
//! write buffer's bound. Own binary: the tests measure this process's resident memory,
//! one at a time.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod support;

use std::time::Duration;

use support::server::{Behavior, TestServer};
use support::util;
use tungstenite::Message;
use wsbeat::{Client, Delivery, Error, Event, Events, Limits};

const T: Duration = Duration::from_secs(10);
/// The burst: 16 messages of 256 KiB, 4 MiB (the pool keeps up to 4 MiB).
const BURST: usize = 16;
const SIZE: usize = 256 << 10;
/// What may stay after the burst: tungstenite's read and write buffers, grown to one
/// frame, on both sides of the loopback (the server is in this process too).
const LEFT: u64 = 2 << 10;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resident KiB once freed memory went back to the OS.
fn rss_trimmed() -> u64 {
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    util::rss_kib()
}

/// Sends the burst to the echo server one message at a time (so that tungstenite's
/// buffers on either side grow to one frame only) and waits until the reader thread (not
/// this thread, which would read the socket itself in `recv`) read each echo.
fn burst(client: &Client, events: &Events) -> Vec<Event> {
    for i in 0..BURST {
        client.send_binary(vec![i as u8; SIZE]).unwrap();
        assert!(
            util::wait_until(T, || client.stats().events_queued > i),
            "echo {i} arrived: {:?}",
            client.stats()
        );
    }
    (0..BURST)
        .map(|_| {
            loop {
                if let ev @ Event::Message(_) = events.recv_timeout(T).expect("an echo") {
                    break ev;
                }
            }
        })
        .collect()
}

fn connected(server: &TestServer) -> (Client, Events) {
    let client = Client::builder(&server.url())
        .no_proxy()
        .connect()
        .expect("connect");
    let events = client.events();
    // One small round trip, so the baseline has every thread and buffer of a connection.
    client.send_text("warm").unwrap();
    loop {
        if let Event::Message(_) = events.recv_timeout(T).expect("the warm-up echo") {
            break;
        }
    }
    (client, events)
}

#[test]
fn an_idle_connection_gives_back_the_memory_of_a_burst() {
    let _serial = serial();
    let server = TestServer::builder().no_record().start();
    let (client, events) = connected(&server);
    let base = rss_trimmed();
    drop(burst(&client, &events));
    // Idle now: within a few seconds the burst's buffers are freed.
    let freed = rss_down_to(base + LEFT);
    let _ = client.close();
    if let Err(now) = freed {
        panic!("idle after a burst: {now} KiB resident against {base} KiB before it");
    }
}

/// Waits until the resident memory is at most `limit` KiB; else what it was at the end.
fn rss_down_to(limit: u64) -> Result<(), u64> {
    let mut now = rss_trimmed();
    if util::wait_until(T, || {
        now = rss_trimmed();
        now <= limit
    }) {
        Ok(())
    } else {
        Err(now)
    }
}

#[test]
fn a_message_kept_after_its_connection_ended_holds_only_its_bytes() {
    let _serial = serial();
    let server = TestServer::builder().no_record().start();
    let (client, events) = connected(&server);
    let base = rss_trimmed();
    let mut echoes = burst(&client, &events);
    // Keep one message, drop the rest (their buffers go back to the pool), and end the
    // connection.
    let kept = echoes.pop().unwrap();
    drop(echoes);
    let _ = client.close();
    if let Err(now) = rss_down_to(base + LEFT + (SIZE as u64 >> 10)) {
        panic!("one kept message: {now} KiB resident against {base} KiB before the burst");
    }
    match kept {
        Event::Message(m) => assert_eq!(m.len(), SIZE),
        other => panic!("{other:?}"),
    }
}

/// Small messages do not use the buffer pool, so they do not keep it: a connection that
/// gets one every 200 ms (a tick, a heartbeat reply) frees the burst's buffers too
/// (review: the pool was freed only after a whole second without any input, so a
/// ticking feed kept its 4 MiB for good).
#[test]
fn small_messages_after_a_burst_do_not_keep_its_memory() {
    let _serial = serial();
    let server = TestServer::builder().no_record().start();
    let (client, events) = connected(&server);
    let base = rss_trimmed();
    drop(burst(&client, &events));
    let mut now = rss_trimmed();
    let end = std::time::Instant::now() + T;
    let mut freed = false;
    while std::time::Instant::now() < end {
        client.send_text("tick").unwrap();
        // Taken as a `select!` consumer does, so the reader thread reads each tick.
        let batch = events.receiver().recv_timeout(T).expect("the echo");
        assert!(
            batch.into_iter().any(|e| matches!(e, Event::Message(_))),
            "the echo"
        );
        // The pace is the scenario, not a synchronisation.
        std::thread::sleep(Duration::from_millis(200));
        now = rss_trimmed();
        if now <= base + LEFT {
            freed = true;
            break;
        }
    }
    let _ = client.close();
    assert!(
        freed,
        "ticking after a burst: {now} KiB resident against {base} KiB before it"
    );
}

/// What the heap may keep after megabyte messages on top of `LEFT`, in KiB: a fresh
/// clone's CI saw 3 MiB left after 32 of them with every kept text copied (the defects
/// below kept 12 and 36 MiB).
const KEPT_SLACK: u64 = 4 << 10;

/// Review of d696f9d: a small payload is a slice of tungstenite's read buffer, so a
/// kept small message kept that whole buffer; after a message larger than the read
/// buffer, that buffer had grown to the large message's size: 32 kept texts of 10 bytes,
/// each read after a 1 MiB message, held 36 MiB after their connection ended. Small
/// payloads read from a grown buffer are copied out now, whoever reads them: the reader
/// thread (`select!` consumer) or the consumer itself (`recv`).
#[test]
fn small_messages_kept_after_large_ones_hold_only_their_bytes() {
    for select in [true, false] {
        let _serial = serial();
        let server = TestServer::builder().no_record().start();
        let (client, events) = connected(&server);
        let base = rss_trimmed();
        const ROUNDS: usize = 32;
        let mut kept = Vec::new();
        for i in 0..ROUNDS {
            client.send_binary(vec![7u8; 1 << 20]).unwrap();
            client.send_text(format!("keep-{i:05}")).unwrap();
            let mut got = Vec::new();
            while got.len() < 2 {
                if select {
                    let batch = events.receiver().recv_timeout(T).expect("the echoes");
                    got.extend(batch.into_iter().filter(|e| matches!(e, Event::Message(_))));
                } else if let ev @ Event::Message(_) = events.recv_timeout(T).expect("an echo") {
                    got.push(ev);
                }
            }
            for ev in got {
                if let Event::Message(m @ Message::Text(_)) = ev {
                    kept.push(m);
                }
            }
        }
        let _ = client.close();
        drop(events);
        // The server's buffers grew to 1 MiB too: gone with it.
        drop(server);
        let bytes: usize = kept.iter().map(|m| m.len()).sum();
        assert_eq!(kept.len(), ROUNDS);
        if let Err(now) = rss_down_to(base + LEFT + KEPT_SLACK) {
            panic!(
                "{ROUNDS} kept messages of {bytes} bytes in all (select: {select}): {now} KiB \
                 resident against {base} KiB before"
            );
        }
        drop(kept);
    }
}

/// Review of 66a18a6: a message in fragments larger than the read buffer grows it as
/// much as one in a single frame, but was not counted (its payload is put together
/// apart): 32 kept 10-byte texts, each after a 1 MiB message in 4 frames, held 12 MiB.
#[test]
fn small_messages_kept_after_large_fragmented_ones_hold_only_their_bytes() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let _serial = serial();
    const ROUNDS: usize = 32;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(sock).unwrap();
        while go_rx.recv().is_ok() {
            for f in 0..4 {
                let op = OpCode::Data(if f == 0 { Data::Binary } else { Data::Continue });
                ws.write(Message::Frame(Frame::message(
                    vec![9u8; 256 << 10],
                    op,
                    f == 3,
                )))
                .unwrap();
            }
            ws.send(Message::text("keep-0000")).unwrap();
        }
        while ws.read().is_ok() {}
    });
    let client = Client::builder(&url).no_proxy().connect().unwrap();
    let events = client.events();
    let rx = events.receiver().clone();
    let base = rss_trimmed();
    let mut kept = Vec::new();
    for _ in 0..ROUNDS {
        go_tx.send(()).unwrap();
        let mut got = 0;
        while got < 2 {
            // Taken as a `select!` consumer does: the reader thread reads.
            for ev in rx.recv_timeout(T).expect("the messages") {
                match ev {
                    Event::Message(m @ Message::Text(_)) => {
                        kept.push(m);
                        got += 1;
                    }
                    Event::Message(Message::Binary(b)) => {
                        assert_eq!(b.len(), 1 << 20);
                        got += 1;
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = client.close();
    drop(rx);
    drop(events);
    drop(go_tx);
    server.join().unwrap();
    if let Err(now) = rss_down_to(base + LEFT + KEPT_SLACK) {
        panic!(
            "{ROUNDS} kept 10-byte texts after fragmented 1 MiB messages: {now} KiB resident \
             against {base} KiB before"
        );
    }
    drop(kept);
}

/// The client's own record of what waits in its write buffer is bounded with it. A peer
/// that stops reading, and empty messages: each is a 6-byte frame in the buffer but a
/// 56-byte entry in `in_flight` (80 in at-least-once tracking), so a 16 MiB buffer took
/// 2.8 M of them and the client held 268 MiB (review of the send paths). Each entry now
/// counts against the bound. At most once here: at least once also keeps what the
/// kernel holds and its peer has not acknowledged (~4 MiB of frames on loopback), for a
/// re-send, which no bound of ours can refuse after the fact.
#[test]
fn in_flight_messages_of_a_full_write_buffer_are_bounded_with_it() {
    let _serial = serial();
    // A server that stops reading after the upgrade, with a small receive buffer.
    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .recv_buffer(4096)
        .start();
    let write_buffer = 4 << 20;
    let client = Client::builder(&server.url())
        .delivery(Delivery::AtMostOnce)
        .limits(
            Limits::default()
                .max_message_size(64 << 10)
                .max_write_buffer(write_buffer),
        )
        .write_timeout(Duration::from_secs(60))
        .connect()
        .unwrap();
    let events = client.events();
    loop {
        match events.recv_timeout(T).expect("Connected in time") {
            Event::Connected { .. } => break,
            Event::Closed => panic!("closed while waiting for Connected"),
            _ => {}
        }
    }
    let before = util::rss_kib();
    let mut accepted = 0u64;
    loop {
        match client.try_send(Message::binary(Vec::<u8>::new())) {
            Ok(()) => accepted += 1,
            Err(Error::WouldBlock { .. }) => break,
            Err(e) => panic!("try_send: {e}"),
        }
        assert!(accepted < 10_000_000, "the write buffer never filled");
    }
    let grown_kib = util::rss_kib().saturating_sub(before);
    eprintln!("{accepted} empty messages taken, memory grew by {grown_kib} KiB");
    drop(client.close());
    // 4 MiB of 6-byte frames in the buffer were 700 k entries: 56 MiB in `in_flight`.
    assert!(
        grown_kib < 3 * (write_buffer as u64 >> 10),
        "memory grew by {} MiB for {accepted} empty messages under a {} MiB write buffer",
        grown_kib >> 10,
        write_buffer >> 20
    );
}

/// A burst of small sends that waited for a slow peer is given back once the peer took
/// it: the client's record of what waits to be written (`in_flight`, at-least-once
/// tracking) kept its grown capacity for the connection's life, megabytes per idle
/// client.
#[test]
fn an_idle_connection_gives_back_the_record_of_a_send_burst() {
    for delivery in [Delivery::AtLeastOnce, Delivery::AtMostOnce] {
        let _serial = serial();
        // A peer that reads nothing until `go`, then everything.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Small, so that the burst waits in the client (64 KiB: with less than twice the
        // loopback's segment size the reader's TCP sends no window update, and the
        // sender waits for its zero-window probes, seconds apart).
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(64 << 10)
            .unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut tcp = tungstenite::accept(tcp).unwrap().into_inner();
            let _ = go_rx.recv();
            // Reads and drops the bytes (faster than a debug build's frame parsing).
            let mut buf = vec![0u8; 256 << 10];
            while std::io::Read::read(&mut tcp, &mut buf).is_ok_and(|n| n > 0) {}
        });
        let client = Client::builder(&url)
            .no_proxy()
            .delivery(delivery.clone())
            .write_timeout(Duration::from_secs(60))
            .close_timeout(Duration::from_millis(100))
            .connect()
            .unwrap();
        let base = rss_trimmed();
        let mut accepted = 0u64;
        loop {
            match client.try_send(Message::binary(vec![7u8; 8])) {
                Ok(()) => accepted += 1,
                Err(Error::WouldBlock { .. }) => break,
                Err(e) => panic!("try_send: {e}"),
            }
            assert!(accepted < 10_000_000, "the write buffer never filled");
        }
        let peak = rss_trimmed();
        go_tx.send(()).unwrap();
        assert!(
            util::wait_until(T, || client.stats().sent >= accepted),
            "{delivery:?}: the peer took {} of {accepted}",
            client.stats().sent
        );
        // One more message, so that at least once also looks at what the peer's TCP
        // acknowledged after the burst (it looks when a flush completes).
        client.send_binary(vec![1u8; 8]).unwrap();
        let after = rss_trimmed();
        eprintln!(
            "{delivery:?}: {accepted} messages; RSS {base} KiB, {peak} KiB with the burst \
             waiting, {after} KiB once the peer took it"
        );
        drop(client.close());
        server.join().unwrap();
        // Left: tungstenite's write buffer, grown to what waited in it (up to 3 MiB of
        // 14-byte frames here), and what `LEFT` says.
        assert!(
            after.saturating_sub(base) < LEFT + (4 << 10),
            "{delivery:?}: {} KiB kept after the peer took the burst ({} KiB at its peak)",
            after.saturating_sub(base),
            peak.saturating_sub(base)
        );
    }
}
