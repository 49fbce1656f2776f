//! Outbound delivery (issue 12): batched sends, the three delivery modes (at least once,
//! at most once, acked), and the offline queue turned off. Each scenario names the
//! promise of RELIABILITY.md it checks.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::client::Fixed;
use support::server::{Behavior, TestServer};
use support::util::wait_until;
use wsbeat::{Acks, Client, ClientBuilder, Delivery, Error, Event, Heartbeat, Limits, Message};

/// Upper bound for anything that should happen "now" (generous: loaded 2-core machine).
const T: Duration = Duration::from_secs(10);

fn next_connected(events: &wsbeat::Events) -> u64 {
    loop {
        match events.recv_timeout(T).expect("Connected in time") {
            Event::Connected { generation, .. } => return generation,
            Event::Closed => panic!("closed while waiting for Connected"),
            _ => {}
        }
    }
}

fn texts(server: &TestServer, conn: usize) -> Vec<String> {
    server
        .received_on(conn)
        .into_iter()
        .filter_map(|m| match m {
            Message::Text(t) => Some(t.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn send_all_writes_a_batch_in_order_and_hands_back_failures_by_index() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .limits(Limits::default().max_message_size(1024))
        .connect()
        .unwrap();
    let mut batch: Vec<Message> = (0..5000).map(|i| Message::text(format!("m{i}"))).collect();
    batch[7] = Message::binary(vec![0u8; 4096]); // too large
    batch[9] = Message::Close(None); // not through send_all
    batch[4321] = Message::binary(vec![0u8; 4096]); // in a later chunk
    let failed = client.send_all(batch).unwrap_err();
    let idx: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx, vec![7, 9, 4321]);
    assert!(matches!(
        &failed[0].1,
        Error::MessageTooLarge { size: 4096, .. }
    ));
    assert_eq!(client.stats().sent, 4997, "counted once flushed");
    assert!(server.wait_received(4997, T));
    let want: Vec<String> = (0..5000)
        .filter(|i| ![7, 9, 4321].contains(i))
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(texts(&server, 0), want);
    // Offline, the batch goes to the queue in order and follows the queue's bounds.
    let _ = client.close();
    let closed = client.send_all(["a", "b"]).unwrap_err();
    assert!(matches!(&closed[1].1, Error::Closed { message: Some(m) } if *m == Message::text("b")));
}

/// Fills the socket and tungstenite's buffer of a server that stopped reading, so
/// messages are in flight (buffered, not yet handed to the OS) when the connection dies.
fn fill_in_flight(client: &Client) -> Vec<Message> {
    fill_in_flight_with(client, |i| format!("{i:06}:{}", "x".repeat(4000)))
}

/// [`fill_in_flight`] with the text of message `i` made by `text`.
fn fill_in_flight_with(client: &Client, text: impl Fn(u32) -> String) -> Vec<Message> {
    let mut accepted = Vec::new();
    for i in 0..20_000u32 {
        let m = Message::text(text(i));
        match client.try_send(m.clone()) {
            Ok(()) => accepted.push(m),
            Err(Error::WouldBlock { .. }) => return accepted,
            Err(e) => panic!("try_send: {e}"),
        }
    }
    panic!("the write buffer never filled");
}

/// Resets the connection of a server that stopped reading and lets it echo again; once
/// the client reconnected, returns what came again on the new connection before a
/// message sent after the reconnect.
fn reset_and_take_what_comes_again(
    server: &TestServer,
    client: &Client,
    events: &wsbeat::Events,
) -> Vec<String> {
    server.set_behavior(Behavior::Echo);
    server.reset_all();
    assert_eq!(next_connected(events), 2);
    client.send_text("after").unwrap();
    assert!(wait_until(T, || texts(server, 1).contains(&"after".into())));
    let mut got = texts(server, 1);
    got.pop();
    got
}

fn in_flight_client(server: &TestServer, delivery: Delivery) -> Client {
    in_flight_builder(server, delivery, 256 << 10)
        .connect()
        .unwrap()
}

/// A client of `server` with `delivery`, a write buffer of `write_buffer` bytes, and
/// quick reconnects.
fn in_flight_builder(
    server: &TestServer,
    delivery: Delivery,
    write_buffer: usize,
) -> wsbeat::ClientBuilder {
    Client::builder(&server.url())
        .delivery(delivery)
        .limits(
            Limits::default()
                .max_write_buffer(write_buffer)
                // Room behind the requeued messages (which bypass the bound) for the
                // sends of the test, whatever the kernel's send buffer held.
                .queue_bytes(1 << 30),
        )
        .write_timeout(Duration::from_secs(60))
        .reconnect_policy(Fixed(Duration::from_millis(20)))
}

/// A server that stops reading after the upgrade, with a small receive buffer: what the
/// client sends soon waits in its own buffers.
fn stopped_server() -> TestServer {
    TestServer::builder()
        .behavior(Behavior::StopReading)
        .recv_buffer(4096)
        .start()
}

/// `Stats::resent` counts messages written again. Messages in flight on a connection
/// that died were counted as soon as they were put back in the queue, before any later
/// connection: when the client then gave up (here: reconnection off) they were handed
/// back in `Undelivered`, never written again, yet counted (review: 4939 of 4939).
#[test]
fn resent_counts_only_messages_written_again() {
    let server = stopped_server();
    let client = Client::builder(&server.url())
        .delivery(Delivery::AtLeastOnce)
        .limits(
            Limits::default()
                .max_write_buffer(256 << 10)
                .queue_bytes(1 << 30),
        )
        .write_timeout(Duration::from_secs(60))
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    assert_eq!(next_connected(&events), 1);
    let accepted = fill_in_flight(&client);
    server.reset_all();
    // No reconnection: the client gives up and hands back what it holds.
    let evs = support::client::events_until_closed(&events, T);
    let handed_back: usize = evs
        .iter()
        .map(|e| match e {
            Event::Undelivered(v) => v.len(),
            _ => 0,
        })
        .sum();
    let st = client.stats();
    eprintln!(
        "accepted {}, handed back {handed_back}, resent {}, possibly lost {}",
        accepted.len(),
        st.resent,
        st.possibly_lost,
    );
    assert!(handed_back > 0, "in-flight messages come back on give-up");
    assert_eq!(server.accepted(), 1, "no second connection was made");
    assert_eq!(
        st.resent, 0,
        "no message was written again, but resent = {} ({handed_back} were handed back)",
        st.resent
    );
}

#[test]
fn at_most_once_hands_in_flight_messages_back_and_never_resends_them() {
    let server = stopped_server();
    let client = in_flight_client(&server, Delivery::AtMostOnce);
    let events = client.events();
    let mut seen = vec![events.recv_timeout(T).expect("Connected")];
    assert!(matches!(seen[0], Event::Connected { generation: 1, .. }));
    let accepted = fill_in_flight(&client);
    server.set_behavior(Behavior::Echo);
    server.reset_all();
    let mut unconfirmed = None;
    loop {
        let ev = events.recv_timeout(T).expect("events after the reset");
        match &ev {
            Event::Unconfirmed {
                generation,
                messages,
            } => {
                assert_eq!(*generation, 1);
                unconfirmed = Some(messages.clone());
            }
            Event::Connected { generation, .. } => {
                assert_eq!(*generation, 2);
                seen.push(ev);
                break;
            }
            _ => {}
        }
        seen.push(ev);
    }
    // Unconfirmed comes between its connection's Connected and Disconnected.
    support::client::assert_grammar(&seen, false);
    let unconfirmed = unconfirmed.expect("Unconfirmed before the reconnect");
    assert!(!unconfirmed.is_empty(), "messages were in flight");
    // In order, and a tail of what was accepted.
    assert_eq!(
        &accepted[accepted.len() - unconfirmed.len()..],
        &unconfirmed[..]
    );
    client.send_text("after").unwrap();
    assert!(wait_until(T, || texts(&server, 1).contains(&"after".into())));
    assert_eq!(
        texts(&server, 1),
        vec!["after".to_string()],
        "nothing resent"
    );
    assert_eq!(client.stats().resent, 0);
    let _ = client.close();
}

#[test]
fn at_least_once_resends_in_flight_messages_on_the_next_connection() {
    let server = stopped_server();
    let client = in_flight_client(&server, Delivery::AtLeastOnce);
    let events = client.events();
    assert_eq!(next_connected(&events), 1);
    let accepted = fill_in_flight(&client);
    let again = reset_and_take_what_comes_again(&server, &client, &events);
    let resent = &again[..];
    assert!(!resent.is_empty(), "in-flight messages are sent again");
    // What comes again is a tail of what was accepted, in order.
    let tail: Vec<Message> = resent.iter().map(|s| Message::text(s.clone())).collect();
    assert_eq!(&accepted[accepted.len() - resent.len()..], &tail[..]);
    let st = client.stats();
    eprintln!(
        "accepted {}, resent {}, possibly lost {}",
        accepted.len(),
        st.resent,
        st.possibly_lost
    );
    assert_eq!(st.resent, resent.len() as u64);
    // The server never read: a reset purges our kernel's send queue, so what the peer's
    // TCP took is counted as possibly lost (never silent), the rest was resent.
    assert_eq!(
        st.resent + st.possibly_lost,
        accepted.len() as u64,
        "every accepted message is resent or counted ({st:?})"
    );
    let _ = client.close();
}

#[test]
fn offline_queue_off_fails_sends_at_once_with_the_message() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .offline_queue(false)
        .reconnect_policy(Fixed(Duration::from_secs(60)))
        .connect()
        .unwrap();
    let events = client.events();
    next_connected(&events);
    server.stop();
    loop {
        if let Event::Disconnected { .. } = events.recv_timeout(T).expect("Disconnected") {
            break;
        }
    }
    match client.send_text("offline") {
        Err(Error::Offline { message }) => assert_eq!(message, Message::text("offline")),
        other => panic!("expected Offline, got {other:?}"),
    }
    assert_eq!(client.stats().queued, 0);
    assert!(client.close().is_empty());
}

fn id_msg(i: u64) -> Message {
    Message::text(format!("{{\"id\":{i}}}"))
}

#[test]
fn acked_outbox_resends_unacked_after_reconnect_and_hands_them_back_on_close() {
    // The echo server sends every message back: `{"id":N}` is not an ack, so we make
    // the ack matcher read the id field of the echo itself when `acking` (the server
    // "acks" by echoing). Stopping the server leaves the outbox full.
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(
            Acks::json_field("id", "id").timeout(Duration::from_secs(60)),
        ))
        .reconnect_policy(Fixed(Duration::from_millis(20)))
        .connect()
        .unwrap();
    let events = client.events();
    next_connected(&events);
    client.send_all((1..=100).map(id_msg)).unwrap();
    assert!(wait_until(T, || client.stats().acked == 100));
    assert_eq!(client.stats().outbox, 0);
    // Acks are consumed, not delivered.
    while let Ok(ev) = events.try_recv() {
        assert!(!matches!(ev, Event::Message(_)), "ack delivered: {ev:?}");
    }
    // Now a server that reads but never acks (stops reading: nothing comes back).
    server.set_behavior(Behavior::StopReading);
    server.reset_all();
    assert_eq!(next_connected(&events), 2);
    client.send_all((101..=110).map(id_msg)).unwrap();
    assert_eq!(client.stats().outbox, 10);
    // Reconnect to an acking server: the 10 unacked ones are sent again, in order.
    server.set_behavior(Behavior::Echo);
    server.reset_all();
    assert_eq!(next_connected(&events), 3);
    assert!(wait_until(T, || client.stats().acked == 110));
    let st = client.stats();
    assert_eq!((st.outbox, st.resent), (0, 10), "{st:?}");
    let conn = server.received().last().unwrap().conn;
    let want: Vec<String> = (101..=110).map(|i| format!("{{\"id\":{i}}}")).collect();
    assert_eq!(texts(&server, conn), want);
    // Unacked at close: handed back, in order.
    server.set_behavior(Behavior::StopReading);
    server.reset_all();
    assert_eq!(next_connected(&events), 4);
    client.send_all((111..=113).map(id_msg)).unwrap();
    let back = client.close();
    assert_eq!(back, (111..=113).map(id_msg).collect::<Vec<_>>());
}

#[test]
fn acked_outbox_resends_after_the_ack_timeout_on_the_same_connection() {
    let server = TestServer::builder().behavior(Behavior::Echo).start();
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(HashSet::new()));
    let s = seen.clone();
    // Acks only the second copy of each message: the first one "gets lost".
    let acks = Acks::new(
        |m| match m {
            Message::Text(t) => t.strip_prefix("id:")?.parse().ok(),
            _ => None,
        },
        move |m| match m {
            Message::Text(t) => {
                let id: u64 = t.strip_prefix("id:")?.parse().ok()?;
                if s.lock().insert(id) { None } else { Some(id) }
            }
            _ => None,
        },
    )
    .timeout(Duration::from_millis(300))
    .deliver_acks(false);
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(acks))
        .heartbeat(Heartbeat::off())
        .connect()
        .unwrap();
    client.send_text("id:1").unwrap();
    client.send_text("id:2").unwrap();
    assert!(wait_until(T, || client.stats().acked == 2));
    let st = client.stats();
    assert_eq!((st.outbox, st.resent, st.reconnects), (0, 2, 0), "{st:?}");
    assert_eq!(texts(&server, 0), vec!["id:1", "id:2", "id:1", "id:2"]);
    let _ = client.close();
}

#[test]
fn acked_outbox_is_bounded_with_the_overflow_policy() {
    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .start();
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(
            Acks::json_field("id", "ack").max_messages(3),
        ))
        .connect()
        .unwrap();
    client.send_all((1..=3).map(id_msg)).unwrap();
    match client.send(id_msg(4)) {
        Err(Error::QueueFull { message }) => assert_eq!(message, id_msg(4)),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(client.stats().outbox, 3);
    let _ = client.close();
}

/// A server that reads but never acks holds the outbox to `Acks::max_bytes` of payload:
/// before, only the count bounded it (10 000 messages of any size).
#[test]
fn acked_outbox_is_bounded_by_bytes_too() {
    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .start();
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(
            Acks::json_field("id", "ack").max_bytes(64 << 10),
        ))
        .connect()
        .unwrap();
    let pad = "x".repeat(1000);
    let msg = |i: u64| Message::text(format!("{{\"id\":{i},\"pad\":\"{pad}\"}}"));
    let size = msg(1).len();
    let mut taken = 0;
    let refused = loop {
        match client.send(msg(taken + 1)) {
            Ok(()) => taken += 1,
            Err(Error::QueueFull { message }) => break message,
            Err(e) => panic!("after {taken}: {e}"),
        }
        assert!(taken <= 1000, "no bound met after {taken} messages");
    };
    assert_eq!(refused, msg(taken + 1));
    assert_eq!(taken as usize, (64 << 10) / size, "{size}-byte messages");
    assert_eq!(client.stats().outbox, taken as usize);
    let _ = client.close();
}

/// An `Acks` id reader that panics once (it counts as "no id") or gives another id on
/// another call, with `n` the call that panics.
fn hiccuping_acks(n: usize) -> Acks {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let id = |m: &Message| -> Option<u64> { m.to_text().ok()?.strip_prefix("id:")?.parse().ok() };
    Acks::new(
        move |m| {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
                panic!("id reader hiccup");
            }
            id(m)
        },
        id,
    )
}

/// A message accepted while offline with no id (its reader panicked) and given one later
/// was taken for one acked while it waited in the queue: never written, and not handed
/// back by `close()` either (callback probe, 4 of 4). It is sent or handed back now.
#[test]
fn a_queued_message_whose_id_reader_hiccuped_is_handed_back() {
    let server = TestServer::start(Behavior::reject(503));
    let client = Client::builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_secs(3600)))
        .delivery(Delivery::Acked(hiccuping_acks(1)))
        .connect_lazy()
        .unwrap();
    client.send_text("id:1").unwrap();
    client.send_text("id:2").unwrap();
    assert_eq!(texts_of(&client.close()), ["id:1", "id:2"]);
}

/// A message whose id reader panicked when it was written (after giving its id when the
/// message was accepted) was never marked written: not sent again, and not handed back
/// by `close()` (callback probe: lost silently). `close()` hands it back now.
#[test]
fn a_written_message_whose_id_reader_hiccuped_is_handed_back() {
    let server = TestServer::start(Behavior::Silent {
        ping_every: None,
        data_every: None,
    });
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(hiccuping_acks(2).timeout(Duration::MAX)))
        .connect()
        .unwrap();
    client.send_text("id:1").unwrap();
    assert!(wait_until(T, || texts(&server, 0) == ["id:1"]));
    assert_eq!(client.stats().outbox, 1);
    assert_eq!(texts_of(&client.close()), ["id:1"]);
}

/// The id reader is asked once per message, when it is accepted; the message goes by
/// its outbox entry from then on. The review of the last fix found two more ways a
/// hiccup later made a message come back twice: `close()` handed a queued message back
/// twice when the reader failed on a later call (5 of 5), and a send refused with the
/// message (`Offline`) was handed back again by `close()`, its entry left behind
/// blocking the id (`DuplicateId` on a second try).
#[test]
fn a_hiccup_of_the_id_reader_after_acceptance_changes_nothing() {
    let server = TestServer::start(Behavior::reject(503));
    for n in 2..=5 {
        let client = Client::builder(&server.url())
            .reconnect_policy(Fixed(Duration::from_secs(3600)))
            .delivery(Delivery::Acked(hiccuping_acks(n)))
            .connect_lazy()
            .unwrap();
        client.send_text("id:1").unwrap();
        assert_eq!(texts_of(&client.close()), ["id:1"], "hiccup at call {n}");
    }
    let client = Client::builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_secs(3600)))
        .offline_queue(false)
        .delivery(Delivery::Acked(hiccuping_acks(2)))
        .connect_lazy()
        .unwrap();
    let m = match client.send_text("id:1") {
        Err(Error::Offline { message }) => message,
        other => panic!("expected Offline, got {other:?}"),
    };
    match client.send(m) {
        Err(Error::Offline { message }) => assert_eq!(texts_of(&[message]), ["id:1"]),
        other => panic!("expected Offline again, got {other:?}"),
    }
    assert_eq!(client.stats().outbox, 0);
    assert!(
        client.close().is_empty(),
        "handed back by the sends already"
    );
}

/// Messages acked while they wait in the offline queue (a server resuming a session
/// acks, on the new connection, what the last one got; this one then stops reading, so
/// the queue does not drain) leave the queue with their acks. Review of the ticket
/// change: they stayed there (counted in `queued`, up to 100 ms here, or for good with
/// the connection stalled), and a `DropOldest` send then popped them and emitted an
/// empty `Undelivered` (10 of 10).
#[test]
fn messages_acked_while_queued_leave_the_queue_and_are_never_undelivered() {
    let (client, read_on, server) = resuming_server_and_client_with(|b| {
        b.overflow(wsbeat::OverflowPolicy::DropOldest)
            .limits(Limits::default().queue_messages(1))
    });
    let events = client.events();
    // The connection stopped taking data, but every queued message is acked.
    assert_eq!(client.stats().queued, 0, "{:?}", client.stats());
    client
        .send(Message::text(format!("{{\"id\":{}}}", RESUMED + 1)))
        .unwrap();
    read_on.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = client.close();
    server.join().unwrap();
    let mut evs = Vec::new();
    while let Ok(ev) = events.recv_timeout(T) {
        let end = matches!(ev, Event::Closed);
        evs.push(ev);
        if end {
            break;
        }
    }
    let empty = evs
        .iter()
        .filter(|e| matches!(e, Event::Undelivered(ms) if ms.is_empty()))
        .count();
    assert_eq!(empty, 0, "{evs:?}");
}

/// The id reader is asked once per message also when the send has to make room first:
/// each turn of that loop asked it again (API fuzzer: up to 29 times under `Block`;
/// `{id:2: 2}` here under `DropOldest`, 5 of 5).
#[test]
fn the_id_reader_is_asked_once_while_a_send_makes_room() {
    let server = TestServer::start(Behavior::Silent {
        ping_every: None,
        data_every: None,
    });
    let calls = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let (c2, asked_twice) = (calls.clone(), std::sync::Arc::new(std::sync::Mutex::new(0)));
    let twice = asked_twice.clone();
    let id = |m: &Message| -> Option<u64> { m.to_text().ok()?.strip_prefix("id:")?.parse().ok() };
    let acks = Acks::new(
        move |m| {
            let n = id(m)?;
            if !c2.lock().unwrap().insert(n) {
                *twice.lock().unwrap() += 1;
            }
            Some(n)
        },
        |_| None,
    )
    .max_messages(1)
    .timeout(Duration::MAX);
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(acks))
        .overflow(wsbeat::OverflowPolicy::DropOldest)
        .connect()
        .unwrap();
    client.send_text("id:1").unwrap();
    assert!(wait_until(T, || texts(&server, 0) == ["id:1"]));
    // The outbox is full: id:1 (written, unacked) makes room for id:2.
    client.send_text("id:2").unwrap();
    let _ = client.close();
    assert_eq!(*asked_twice.lock().unwrap(), 0);
    assert_eq!(calls.lock().unwrap().len(), 2);
}

/// A message whose id is already waiting for its ack is handed back (ids must be unique
/// among the unacked messages). It used to be accepted and to take over the id: the
/// first copy could then never be acked, was re-sent every ack timeout for as long as
/// the client ran, `stats().outbox` did not count it, and every message acked after it
/// stayed in the outbox behind it (memory grew with the traffic).
#[test]
fn a_second_message_with_an_unacked_id_is_handed_back() {
    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .start();
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(Acks::json_field("id", "ack")))
        .connect()
        .unwrap();
    client.send(id_msg(1)).unwrap();
    let again = id_msg(1);
    for r in [client.send(again.clone()), client.try_send(again.clone())] {
        match r {
            Err(e @ Error::DuplicateId { id: 1, .. }) => {
                assert!(e.to_string().contains("unique"), "{e}");
                assert_eq!(e.into_message(), Some(again.clone()));
            }
            other => panic!("expected DuplicateId, got {other:?}"),
        }
    }
    match client.send_all([id_msg(2), id_msg(2), id_msg(1)]) {
        Err(failed) => {
            let ids: Vec<_> = failed
                .iter()
                .map(|(i, e)| (*i, matches!(e, Error::DuplicateId { .. })))
                .collect();
            assert_eq!(ids, [(1, true), (2, true)]);
        }
        Ok(()) => panic!("duplicates accepted"),
    }
    assert_eq!(client.stats().outbox, 2);
    let _ = client.close();
}

/// User code that runs under the link lock when a message arrives (`Acks` id readers,
/// `Heartbeat::app` matchers) never runs on the consumer's thread inside `recv`: a
/// consumer that holds one of its own locks across `recv_timeout`, which that code also
/// takes (shared metrics, say), would wait on itself, and with a blocking `lock()`
/// deadlock while holding the link lock (then `close()` hangs too). On the reader thread
/// such code waits at most until the consumer's `recv_timeout` returns.
#[test]
fn recv_timeout_stays_bounded_when_the_consumer_holds_a_lock_the_ack_reader_takes() {
    use parking_lot::Mutex;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Instant;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let ws = tungstenite::accept(listener.accept().unwrap().0).unwrap();
        let mut out = ws.get_ref().try_clone().unwrap();
        // 2000 small text frames ("x"), as fast as TCP takes them.
        let frame = [0x81u8, 1, b'x'];
        for _ in 0..2000 {
            if out.write_all(&frame).is_err() {
                break;
            }
        }
        let mut ws = ws;
        while ws.read().is_ok() {}
    });
    // The application's own state, shared by the consumer loop and the ack reader.
    let metrics = Arc::new(Mutex::new(0u64));
    let m2 = metrics.clone();
    let acks = Acks::new(
        |_| None,
        move |_m: &Message| {
            // Bounded here so the test ends; a real `lock()` would never return.
            let _g = m2.try_lock_for(Duration::from_secs(3));
            None
        },
    );
    let client = Client::builder(&url)
        .delivery(Delivery::Acked(acks))
        .read_budget(1)
        .heartbeat(Heartbeat::off())
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    let mut got = 0;
    let mut worst = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < 2000 && Instant::now() < deadline {
        // The consumer updates its metrics while it waits for the next event.
        let mut m = metrics.lock();
        let t = Instant::now();
        let r = events.recv_timeout(Duration::from_millis(10));
        worst = worst.max(t.elapsed());
        if let Ok(Event::Message(_)) = r {
            got += 1;
            *m += 1;
        }
        drop(m);
        if worst >= Duration::from_secs(2) {
            break;
        }
    }
    let _ = client.close();
    server.join().unwrap();
    assert!(
        worst < Duration::from_secs(2),
        "recv_timeout(10 ms) took {worst:?}: the ack reader ran on the consumer's thread \
         and waited for the lock that very thread holds ({got} messages read)"
    );
}

/// `restart()` carries the unacked messages of acked delivery over to the new client,
/// which tracks them as the old one did: once written again they wait for their acks,
/// and `close()` hands them back. They were untracked there: written, then forgotten.
/// Those the old client wrote count as re-sent when the new one writes them again.
#[test]
fn restart_keeps_acked_messages_tracked() {
    // The echo server never acks: {"id":N} has no "ack" field.
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .delivery(Delivery::Acked(Acks::json_field("id", "ack")))
        .heartbeat(Heartbeat::off())
        .reconnect_policy(Fixed(Duration::from_millis(20)))
        .connect()
        .unwrap();
    for i in 1..=3 {
        client.send_text(format!("{{\"id\":{i}}}")).unwrap();
    }
    assert!(server.wait_received(3, T));
    assert_eq!(client.stats().outbox, 3);
    // Closes (the 3 unacked come back) and carries them to the new client.
    let client2 = client.restart().unwrap();
    let events = client2.events();
    next_connected(&events);
    assert!(server.wait_received(6, T), "carried messages written again");
    assert_eq!(client2.stats().outbox, 3, "tracked by the new client");
    // The server got each of them twice: duplicates come only from `resent` (RELIABILITY
    // 3c). They were not counted: the new client took them for new messages.
    assert_eq!(client2.stats().resent, 3, "{:?}", client2.stats());
    let back = client2.close();
    let back: Vec<&str> = back.iter().map(|m| m.to_text().unwrap()).collect();
    assert_eq!(back, [r#"{"id":1}"#, r#"{"id":2}"#, r#"{"id":3}"#]);
}

/// RELIABILITY 1: a message `close()` hands back never arrives. Here the peer reads
/// nothing while `close()` waits for its close reply, so the kernel's send queue is full
/// of accepted messages when `close()` gives up; the peer then reads everything the
/// connection still brings. Before, `close()` handed those messages back and the kernel
/// went on to deliver them after the close (1 043 of 5 238 in the probe that found it).
/// Now the socket is reset: what the kernel had not sent is discarded, and a message
/// sent whole but not acknowledged (it may have arrived) is counted as possibly lost.
#[test]
fn a_message_close_hands_back_is_never_delivered() {
    let server = HeldServer::start();
    let client = server.client();
    let accepted = texts_of(&fill_in_flight(&client));
    let back = texts_of(&client.close());
    let possibly_lost = client.stats().possibly_lost;
    assert!(
        !back.is_empty(),
        "the kernel's queue was full: something is handed back"
    );
    let got = server.release();
    assert_accounted(&accepted, &got, &back, possibly_lost);
}

/// A server that reads nothing (busy) until released, then records every text message
/// until the connection ends.
struct HeldServer {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    go: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl HeldServer {
    fn start() -> HeldServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::<String>::new()));
        let go = Arc::new(AtomicBool::new(false));
        let (g, go2) = (got.clone(), go.clone());
        let thread = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            support::net::set_recv_buffer(&tcp, 128 << 10).unwrap();
            tcp.set_read_timeout(Some(T)).unwrap();
            let mut ws = tungstenite::accept(tcp).unwrap();
            assert!(wait_until(T, || go2.load(Ordering::SeqCst)));
            while let Ok(m) = ws.read() {
                if let Message::Text(t) = m {
                    g.lock().unwrap().push(t.to_string());
                }
            }
        });
        HeldServer {
            url,
            got,
            go,
            thread,
        }
    }

    /// A client whose buffers fill soon and whose `close()` waits 200 ms for a reply.
    fn client(&self) -> Client {
        Client::builder(&self.url)
            .limits(Limits::default().max_write_buffer(256 << 10))
            .close_timeout(Duration::from_millis(200))
            .write_timeout(Duration::from_secs(60))
            .connect()
            .unwrap()
    }

    /// Lets the server read, and returns what arrived once the connection ended.
    fn release(self) -> Vec<String> {
        self.go.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap();
        self.got.lock().unwrap().clone()
    }
}

fn texts_of(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| m.to_text().unwrap().to_string())
        .collect()
}

/// After a close: nothing handed back arrived; what arrived is a prefix of what was
/// accepted, what was handed back a suffix, and at most `possibly_lost` lie between.
fn assert_accounted(accepted: &[String], got: &[String], back: &[String], possibly_lost: u64) {
    let delivered: HashSet<&String> = got.iter().collect();
    let both = back.iter().filter(|m| delivered.contains(m)).count();
    assert_eq!(
        both,
        0,
        "handed back and delivered (of {} handed back)",
        back.len()
    );
    assert_eq!(got[..], accepted[..got.len()]);
    assert_eq!(back[..], accepted[accepted.len() - back.len()..]);
    let unaccounted = accepted.len() - got.len() - back.len();
    assert!(
        unaccounted as u64 <= possibly_lost,
        "{unaccounted} neither delivered nor handed back, {possibly_lost} counted possibly lost"
    );
}

/// Acked delivery with messages with and without an id: those without follow at least
/// once (3a: what the peer's TCP did not take is written again, what it took after the
/// peer's last sign of life is counted as possibly lost), those with one are written
/// again until acked, all in one write order. Before, messages without an id that had
/// reached the OS were dropped with no trace (699 of 4 940 in the probe that found it),
/// their re-sends were not counted, and every message with an id went ahead of them.
#[test]
fn acked_mode_resends_messages_without_an_id_at_least_once_in_write_order() {
    let server = stopped_server();
    let client = in_flight_client(&server, Delivery::Acked(Acks::json_field("id", "ack")));
    let events = client.events();
    assert_eq!(next_connected(&events), 1);
    // Even messages carry an id (the server never acks), odd ones do not.
    let pad = "x".repeat(4000);
    let accepted: Vec<String> = fill_in_flight_with(&client, |i| {
        if i % 2 == 0 {
            format!(r#"{{"id":{i},"pad":"{pad}"}}"#)
        } else {
            format!(r#"{{"n":{i},"pad":"{pad}"}}"#)
        }
    })
    .iter()
    .map(|m| m.to_text().unwrap().to_string())
    .collect();
    let has_id = |t: &String| t.starts_with(r#"{"id""#);
    let again = reset_and_take_what_comes_again(&server, &client, &events);
    let again = &again[..];
    // What the peer's TCP had not taken comes again whole (a tail of what was accepted,
    // in order), after the messages with an id that it had taken (they are unacked).
    let taken = accepted.len()
        - (0..=again.len())
            .rev()
            .find(|n| again[again.len() - n..] == accepted[accepted.len() - n..])
            .expect("a tail");
    let tail_len = accepted.len() - taken;
    assert!(tail_len > 0, "messages the peer's TCP had not taken");
    let before: Vec<&String> = accepted[..taken].iter().filter(|t| has_id(t)).collect();
    assert_eq!(
        again[..again.len() - tail_len].iter().collect::<Vec<_>>(),
        before,
        "the unacked messages with an id, in order, then the tail"
    );
    let st = client.stats();
    assert_eq!(
        st.resent,
        again.len() as u64,
        "every re-send counted: {st:?}"
    );
    // The server never read: what its TCP took without an id may be lost, and is counted.
    let plain_taken = accepted[..taken].iter().filter(|t| !has_id(t)).count();
    assert_eq!(st.possibly_lost, plain_taken as u64, "{st:?}");
    let _ = client.close();
}

/// A peer that reads slowly but steadily while `close()` gives up on its close reply:
/// the kernel would go on sending between the look at its queue and the socket's last
/// close, so "handed back" messages arrived (275-599 per run in the review that found
/// it). The connection is now reset right after the look.
#[test]
fn close_with_a_slow_reading_peer_hands_back_nothing_that_arrives() {
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::<String>::new()));
    let g = got.clone();
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        support::net::set_recv_buffer(&tcp, 64 << 10).unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        let paced = support::net::Paced {
            stream: tcp,
            per_read: 4096,
            gap: Duration::from_micros(200),
        };
        let mut ws = tungstenite::accept(paced).unwrap();
        while let Ok(m) = ws.read() {
            if let Message::Text(t) = m {
                g.lock().unwrap().push(t.to_string());
            }
        }
    });
    let client = Client::builder(&url)
        .limits(Limits::default().max_write_buffer(1 << 20))
        .close_timeout(Duration::from_millis(100))
        .write_timeout(Duration::from_secs(60))
        .connect()
        .unwrap();
    let mut accepted = Vec::new();
    let start = std::time::Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_millis(500) {
        let m = format!("{i:06}:{}", "x".repeat(200));
        i += 1;
        match client.try_send(Message::text(m.clone())) {
            Ok(()) => accepted.push(m),
            // Back-pressure: the pace of this sender (the scenario).
            Err(Error::WouldBlock { .. }) => std::thread::sleep(Duration::from_micros(100)),
            Err(e) => panic!("{e}"),
        }
    }
    let back = texts_of(&client.close());
    let possibly_lost = client.stats().possibly_lost;
    server.join().unwrap();
    let got = got.lock().unwrap().clone();
    assert_accounted(&accepted, &got, &back, possibly_lost);
}

/// A sender blocked in `send` (waiting, without the lock, for the socket to take more)
/// when `close()` gives up: it returns at once, and what it and `close()` hand back
/// never arrives. It waited for the write timeout, or for the peer to read (the socket
/// was only shut for reading, which does not wake a writer), and kept the socket open.
#[test]
fn a_sender_blocked_when_close_gives_up_returns_at_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = HeldServer::start();
    let client = server.client();
    let accepted = texts_of(&fill_in_flight(&client));
    let sending = Arc::new(AtomicBool::new(false));
    let (c, s) = (client.clone(), sending.clone());
    let sender = std::thread::spawn(move || {
        s.store(true, Ordering::SeqCst);
        c.send(Message::text("blocked"))
            .map_err(|e| e.into_message())
    });
    // It blocks at once (the buffer is full); close() waits 200 ms for a reply first.
    assert!(wait_until(T, || sending.load(Ordering::SeqCst)));
    let back = texts_of(&client.close());
    let closed = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || sender.is_finished()),
        "send() still blocked 5 s after close() returned"
    );
    let returned_after = closed.elapsed();
    let blocked = sender.join().unwrap();
    let got = server.release();
    let mut accepted = accepted;
    if blocked.is_ok() {
        // Accepted before the close: close() hands it back (or it arrived).
        accepted.push("blocked".into());
    } else {
        // Refused: its send() handed it back.
        assert!(matches!(blocked, Err(Some(_))), "{blocked:?}");
    }
    assert_accounted(&accepted, &got, &back, client.stats().possibly_lost);
    assert!(
        !got.contains(&"blocked".to_string()),
        "handed back and delivered"
    );
    assert!(
        returned_after < Duration::from_secs(2),
        "{returned_after:?}"
    );
}

/// Acked delivery, `DropOldest`: a message dropped from a full outbox is handed back
/// and its id is free again. A new message with that id is a different message: after
/// a reconnect it is the one sent again (the dropped one stays handed back). The
/// connection's write order knew ids only, so the old message went out in its place,
/// and its ack then acked the new one, which was lost.
#[test]
fn acked_mode_never_resends_a_dropped_message_in_place_of_a_new_one_with_its_id() {
    let server = stopped_server();
    let acks = Acks::json_field("id", "ack")
        .max_messages(1)
        .timeout(Duration::from_secs(60));
    let client = in_flight_builder(&server, Delivery::Acked(acks), 4 << 20)
        .overflow(wsbeat::OverflowPolicy::DropOldest)
        .connect()
        .unwrap();
    let events = client.events();
    assert_eq!(next_connected(&events), 1);
    let pad = "x".repeat(4000);
    for i in 0..50 {
        client
            .try_send(Message::text(format!(r#"{{"n":{i},"p":"{pad}"}}"#)))
            .unwrap();
    }
    let a = Message::text(r#"{"id":1,"v":"old"}"#);
    let b = Message::text(r#"{"id":2,"v":"b"}"#);
    let c = Message::text(r#"{"id":1,"v":"new"}"#);
    client.send(a.clone()).unwrap();
    client.send(b.clone()).unwrap(); // the outbox is full: A is dropped
    client.send(c.clone()).unwrap(); // B is dropped; id 1 is free again
    let mut back = Vec::new();
    while back.len() < 2 {
        if let Event::Undelivered(ms) = events.recv_timeout(T).expect("Undelivered") {
            back.extend(ms);
        }
    }
    assert_eq!(back, [a.clone(), b]);
    let again = reset_and_take_what_comes_again(&server, &client, &events);
    let with_id: Vec<&String> = again.iter().filter(|t| t.contains(r#""id""#)).collect();
    assert_eq!(with_id, [c.to_text().unwrap()], "only C comes again");
    let _ = client.close();
}

/// Acked delivery: a message re-sent after its ack timeout keeps its place. Its first
/// write reached the peer's TCP; the re-send went out behind later messages the peer
/// never took. After the reconnect it goes first (it was written first), not after
/// them, as when its place was taken from the re-send.
#[test]
fn acked_mode_keeps_the_first_write_order_of_a_message_re_sent_after_its_ack_timeout() {
    use std::sync::mpsc;
    // Connection 1 reads the first message only, then nothing, until reset. Connection 2
    // records what it gets until "after".
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let (reset_tx, reset_rx) = mpsc::channel::<()>();
    let (got_tx, got_rx) = mpsc::channel::<Vec<String>>();
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        support::net::set_recv_buffer(&tcp, 4096).unwrap();
        let mut ws = tungstenite::accept(tcp.try_clone().unwrap()).unwrap();
        let first = ws.read().unwrap();
        assert_eq!(first.to_text().unwrap(), r#"{"id":1}"#);
        reset_rx.recv_timeout(T).unwrap();
        support::net::reset(tcp);
        drop(ws);
        let (tcp, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(tcp).unwrap();
        let mut got = Vec::new();
        while let Ok(m) = ws.read() {
            if let Message::Text(t) = m {
                if t.as_str() == "after" {
                    break;
                }
                got.push(t.to_string());
            }
        }
        got_tx.send(got).unwrap();
    });
    let client = Client::builder(&url)
        .delivery(Delivery::Acked(
            Acks::json_field("id", "ack").timeout(Duration::from_millis(300)),
        ))
        .limits(
            Limits::default()
                .max_write_buffer(4 << 20)
                .queue_bytes(1 << 30),
        )
        .write_timeout(Duration::from_secs(60))
        .reconnect_policy(Fixed(Duration::from_millis(20)))
        .connect()
        .unwrap();
    let events = client.events();
    assert_eq!(next_connected(&events), 1);
    client.send_text(r#"{"id":1}"#).unwrap();
    let pad = "x".repeat(4000);
    let later: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"n":{i},"p":"{pad}"}}"#))
        .chain([r#"{"id":2}"#.to_string()])
        .collect();
    for t in &later {
        client.try_send(Message::text(t.clone())).unwrap();
    }
    // Id 1 is re-sent (never acked) behind what the server does not read.
    assert!(wait_until(T, || client.stats().resent >= 1));
    reset_tx.send(()).unwrap();
    assert_eq!(next_connected(&events), 2);
    client.send_text("after").unwrap();
    let got = got_rx.recv_timeout(T).expect("connection 2");
    server.join().unwrap();
    assert_eq!(
        got.first().map(String::as_str),
        Some(r#"{"id":1}"#),
        "{:?}",
        &got[..3.min(got.len())]
    );
    let _ = client.close();
}

/// Acked delivery with a full outbox under `Block`: `send_all` flushes its own messages
/// before it waits for room. It waited for acks of messages it had not flushed yet (20
/// of 40 refused after 6 s where a `send` loop took 2 ms). (`DropOldest` now also drops
/// only flushed messages: the same flush comes first.)
#[test]
fn send_all_flushes_its_own_messages_before_waiting_for_outbox_room() {
    fn id_of(m: &Message) -> Option<u64> {
        m.to_text().ok()?.strip_prefix("id:")?.parse().ok()
    }
    let server = TestServer::echo(); // the echo is the ack
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .delivery(Delivery::Acked(Acks::new(id_of, id_of).max_messages(10)))
        .overflow(wsbeat::OverflowPolicy::Block(Duration::from_secs(5)))
        .connect()
        .unwrap();
    let batch: Vec<Message> = (0..40u64)
        .map(|i| Message::text(format!("id:{i}")))
        .collect();
    let start = std::time::Instant::now();
    let failed = client.send_all(batch).err().unwrap_or_default();
    assert!(failed.is_empty(), "{} refused", failed.len());
    // Each wait for room ends with the acks of flushed messages: well within one Block.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(wait_until(T, || client.stats().acked == 40));
    let _ = client.close();
}

/// Acked delivery, `Block` with a full outbox: a send waiting for room when the client
/// closes gets its message back as `Closed`, like every send a close refuses. It came
/// back as `QueueFull`, which says "try again later".
#[test]
fn a_send_waiting_for_outbox_room_gets_closed_when_the_client_closes() {
    let server = TestServer::echo(); // never acks: {"id":N} has no "ack" field
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .delivery(Delivery::Acked(
            Acks::json_field("id", "ack").max_messages(1),
        ))
        .overflow(wsbeat::OverflowPolicy::Block(Duration::from_secs(60)))
        .connect()
        .unwrap();
    client.send_text(r#"{"id":1}"#).unwrap();
    let c = client.clone();
    let waiting = std::thread::spawn(move || c.send_text(r#"{"id":2}"#));
    let back = client.close();
    let r = waiting.join().unwrap();
    assert!(
        matches!(&r, Err(Error::Closed { message: Some(m) }) if m.to_text().unwrap() == r#"{"id":2}"#),
        "{r:?}"
    );
    assert_eq!(back, [Message::text(r#"{"id":1}"#)]);
}

/// `Stats::sent` counts every message handed to the OS, also those written from the
/// offline queue once a connection opens. The queue's were not counted.
#[test]
fn messages_sent_from_the_offline_queue_count_as_sent() {
    let server = TestServer::echo();
    let (go, wait) = crossbeam_channel::bounded::<()>(1);
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .on_connect(move |_| {
            // Holds the connection back until the messages are queued.
            let _ = wait.recv_timeout(T);
            Ok(())
        })
        .connect_lazy()
        .unwrap();
    for i in 0..3 {
        client.send_text(format!("q{i}")).unwrap();
    }
    assert_eq!(client.stats().queued, 3);
    go.send(()).unwrap();
    assert!(server.wait_received(3, T));
    assert!(
        wait_until(T, || client.stats().queued == 0),
        "{:?}",
        client.stats()
    );
    assert_eq!(client.stats().sent, 3, "{:?}", client.stats());
    let _ = client.close();
}

/// `Stats::sent` counts messages handed to the OS: one `try_send` left in the client's
/// buffer (the peer reads nothing) is not counted until its write completes.
#[test]
fn try_send_counts_as_sent_only_once_written() {
    let server = stopped_server();
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .limits(Limits::default().max_write_buffer(256 << 10))
        .write_timeout(Duration::from_secs(60))
        .connect()
        .unwrap();
    let mut accepted = 0u64;
    let mut full = false;
    for i in 0..4096u32 {
        match client.try_send(Message::binary(vec![(i % 251) as u8; 16 << 10])) {
            Ok(()) => accepted += 1,
            Err(Error::WouldBlock { .. }) => {
                full = true;
                break;
            }
            Err(e) => panic!("try_send {i}: unexpected {e:?}"),
        }
    }
    assert!(full, "the peer reads nothing: try_send must fill up");
    // The client's buffer is full (256 KiB, about 15 of these messages) and the peer
    // takes nothing: those messages have not reached the OS.
    let stats = client.stats();
    assert!(
        stats.sent + 10 <= accepted,
        "{accepted} accepted, but sent counts {} with the client's buffer full: {stats:?}",
        stats.sent
    );
    let _ = client.close();
}

/// Acked delivery, `DropOldest`, a consumer that never reads events: each message dropped
/// from the full outbox waited in its own unread `Undelivered` (368 MiB on one connection
/// in a probe). Once as many as the queue holds wait unread, new messages are refused
/// (`QueueFull`, handed back) instead of dropping more.
#[test]
fn acked_drop_oldest_with_an_unread_event_stream_stays_bounded() {
    let server = TestServer::echo();
    // The echo carries no "ack" field: nothing is ever acked.
    let acks = Acks::json_field("id", "ack").max_messages(10);
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .delivery(Delivery::Acked(acks))
        .overflow(wsbeat::OverflowPolicy::DropOldest)
        .limits(Limits::default().queue_messages(20))
        .connect()
        .unwrap();
    let mut refused = 0;
    for i in 0..100 {
        let m = Message::text(format!(r#"{{"id":{i}}}"#));
        match client.send(m.clone()) {
            Ok(()) => {}
            Err(Error::QueueFull { message }) => {
                assert_eq!(message, m, "handed back");
                refused += 1;
            }
            Err(e) => panic!("send {i}: {e:?}"),
        }
    }
    // 10 in the outbox, 20 dropped into unread `Undelivered` events, the rest refused.
    assert_eq!(refused, 70, "{:?}", client.stats());
    let _ = client.close();
}

/// Acked delivery: messages whose ack is overdue while the client's buffer is full (the
/// peer reads nothing for a while) are written as soon as it drains, not a whole ack
/// timeout later.
#[test]
fn overdue_messages_that_found_the_buffer_full_go_out_once_it_drains() {
    use std::io::ErrorKind;
    use std::net::TcpListener;
    use std::time::Instant;

    const ACK_TIMEOUT: Duration = Duration::from_secs(3);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // A small receive window: the peer's kernel holds little of what it does not read.
    socket2::SockRef::from(&listener)
        .set_recv_buffer_size(4096)
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (resume_tx, resume_rx) = crossbeam_channel::bounded::<()>(1);
    let (seen_tx, seen_rx) = crossbeam_channel::unbounded::<(u64, Instant)>();
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(sock).unwrap();
        // Reads nothing (and acks nothing, ever) until told.
        let _ = resume_rx.recv();
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let quiet_until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < quiet_until {
            match ws.read() {
                Ok(Message::Binary(b)) => {
                    let id = u64::from_be_bytes(b[..8].try_into().unwrap());
                    if seen_tx.send((id, Instant::now())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    });
    let id_of = |m: &Message| match m {
        Message::Binary(b) if b.len() >= 8 => Some(u64::from_be_bytes(b[..8].try_into().unwrap())),
        _ => None,
    };
    let client = Client::builder(&format!("ws://{addr}/"))
        .heartbeat(Heartbeat::off())
        .limits(Limits::default().max_write_buffer(1 << 20))
        .write_timeout(Duration::from_secs(60))
        .delivery(Delivery::Acked(
            Acks::new(id_of, |_| None).timeout(ACK_TIMEOUT),
        ))
        .connect()
        .unwrap();
    // Fill every buffer between us and the peer.
    let mut accepted = 0u64;
    for id in 0..4096u64 {
        let mut payload = vec![0u8; 256 << 10];
        payload[..8].copy_from_slice(&id.to_be_bytes());
        match client.try_send(Message::binary(payload)) {
            Ok(()) => accepted += 1,
            Err(Error::WouldBlock { .. }) => break,
            Err(e) => panic!("try_send {id}: {e:?}"),
        }
    }
    assert!(accepted > 0 && accepted < 4096, "accepted {accepted}");
    // Every ack falls due after ACK_TIMEOUT, while the client's buffer is still full (the
    // peer reads nothing): none of them can be written again yet. Not a synchronisation:
    // the behaviour under test is what happens after that deadline passed. Without the
    // fix the next try came a whole ack timeout later (2.3 s after the peer read again
    // here; 0.2-0.3 s with it).
    std::thread::sleep(ACK_TIMEOUT + Duration::from_millis(700));
    let resumed = Instant::now();
    resume_tx.send(()).unwrap();
    // The first message comes again once the backlog ahead of it is read: well before
    // the next ack timeout would send it.
    let mut copies = HashSet::new();
    let again = loop {
        let (id, at) = seen_rx
            .recv_timeout(Duration::from_secs(15))
            .expect("the server saw no second copy of any message");
        if !copies.insert(id) {
            break at;
        }
    };
    let after = again - resumed;
    assert!(
        after < Duration::from_millis(1500),
        "the first overdue message went out again {after:?} after the peer read again \
         ({accepted} messages in flight)"
    );
    let _ = client.close();
    drop(seen_rx);
    let _ = server.join();
}

/// At-most-once with a consumer that never reads events: each connection that dies hands
/// back its in-flight messages in `Unconfirmed`, and those waited unread without bound
/// (2 GiB after 98 connections in a probe). Once as many as the queue holds wait, sends
/// are refused (`QueueFull`, handed back) until the consumer takes them.
#[test]
fn at_most_once_hand_backs_left_unread_stay_bounded() {
    let server = stopped_server();
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .delivery(Delivery::AtMostOnce)
        .reconnect_policy(Fixed(Duration::from_millis(1)))
        // Small frames and buffer: a few hundred messages in flight per connection.
        .limits(
            Limits::default()
                .max_message_size(1024)
                .max_write_buffer(64 << 10)
                .queue_messages(100),
        )
        .write_timeout(Duration::from_secs(60))
        .connect()
        .unwrap();
    let events = client.events();
    let mut refused = 0;
    for cycle in 0..12u64 {
        assert!(
            wait_until(T, || client.stats().generation == cycle + 1
                && client.state() == wsbeat::State::Open),
            "connection {}: {:?}",
            cycle + 1,
            client.stats()
        );
        // Fill the connection (the peer reads nothing), then reset it.
        for _ in 0..100_000 {
            match client.try_send(Message::binary(vec![7u8; 1000])) {
                Ok(()) => {}
                Err(Error::WouldBlock { .. }) => break,
                Err(Error::QueueFull { message }) => {
                    assert_eq!(message.len(), 1000, "handed back");
                    refused += 1;
                    break;
                }
                Err(e) => panic!("cycle {cycle}: {e:?}"),
            }
        }
        server.reset_all();
    }
    assert!(
        refused > 0,
        "sends were never refused: {:?}",
        client.stats()
    );
    let _ = client.close();
    let mut unconfirmed = 0;
    for ev in events.iter() {
        if let Event::Unconfirmed { messages, .. } = ev {
            unconfirmed += messages.len();
        }
    }
    // The queue bound, plus what the last connection let in before it was reached, plus
    // that connection's in flight: 130 KiB of tungstenite buffer at most.
    assert!(
        unconfirmed <= 100 + 2 * 132,
        "{unconfirmed} messages handed back unread"
    );
}

/// Acked delivery: more than `RESEND_CHUNK` (256) acks overdue while the client's buffer
/// stays full (the peer reads nothing). The timer must look again in 20 ms, not spin:
/// `overdue` said "next = now" (more are due) and the round took that over the 20 ms
/// (found by review: 1700 ms of the timer's CPU in 2 s).
#[test]
#[cfg(target_os = "linux")]
fn overdue_rounds_do_not_spin_while_the_buffer_stays_full() {
    let server = stopped_server();
    let id_of = |m: &Message| match m {
        Message::Binary(b) if b.len() >= 8 => Some(u64::from_be_bytes(b[..8].try_into().unwrap())),
        _ => None,
    };
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .limits(Limits::default().max_write_buffer(64 << 10))
        .write_timeout(Duration::from_secs(60))
        .delivery(Delivery::Acked(
            Acks::new(id_of, |_| None)
                .timeout(Duration::from_millis(300))
                .max_messages(1 << 20),
        ))
        .connect()
        .unwrap();
    let mut accepted = 0u64;
    for id in 0..1_000_000u64 {
        let mut payload = vec![0u8; 1024];
        payload[..8].copy_from_slice(&id.to_be_bytes());
        match client.try_send(Message::binary(payload)) {
            Ok(()) => accepted += 1,
            Err(Error::WouldBlock { .. }) => break,
            Err(e) => panic!("try_send {id}: {e:?}"),
        }
    }
    assert!(accepted > 600, "accepted {accepted}");
    // Every ack is overdue by now, and nothing can be written again.
    std::thread::sleep(Duration::from_millis(800));
    let (cpu0, t0) = (
        support::util::thread_cpu_ms("wsbeat-timer"),
        std::time::Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (cpu, wall) = (
        support::util::thread_cpu_ms("wsbeat-timer") - cpu0,
        t0.elapsed().as_millis() as u64,
    );
    let stats = client.stats();
    let _ = client.close();
    assert!(
        cpu * 4 < wall,
        "the timer thread used {cpu} ms of CPU in {wall} ms with {accepted} messages \
         overdue and the buffer full: {stats:?}"
    );
}

/// At most once with a queue bound of 0 (natural with `offline_queue(false)`): sends on a
/// live connection go out. The handed-back bound counted "0 >= 0" as full and refused
/// every one (found by review).
#[test]
fn at_most_once_with_a_zero_queue_bound_sends_on_a_live_connection() {
    for (what, limits) in [
        ("queue_messages(0)", Limits::default().queue_messages(0)),
        ("queue_bytes(0)", Limits::default().queue_bytes(0)),
    ] {
        let server = TestServer::echo();
        let client = Client::builder(&server.url())
            .heartbeat(Heartbeat::off())
            .delivery(Delivery::AtMostOnce)
            .offline_queue(false)
            .limits(limits)
            .connect()
            .unwrap();
        let events = client.events();
        let r = client.send_text("hello");
        assert!(r.is_ok(), "{what}: send on a live connection: {r:?}");
        loop {
            match events.recv_timeout(T) {
                Ok(Event::Message(Message::Text(t))) => {
                    assert_eq!(t.as_str(), "hello");
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("{what}: no echo: {e}"),
            }
        }
        let _ = client.close();
    }
}

/// At-least-once: a peer whose TCP takes everything (a large receive buffer) while its
/// application reads nothing, then the close: every message is counted possibly lost
/// or handed back, however many. Only the last 65 536 such messages were remembered (the
/// oldest forgotten), so past that they were lost uncounted (the probe that found it: 619 182
/// missing, `possibly_lost` 65 536).
#[test]
fn every_message_the_peers_tcp_took_unread_is_counted_however_many() {
    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .recv_buffer(4 << 20)
        .start();
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .close_timeout(Duration::from_millis(200))
        .connect()
        .unwrap();
    let n = 100_000u64;
    client
        .send_all((0..n).map(|i| Message::text(i.to_string())))
        .expect("all accepted");
    assert!(
        wait_until(T, || client.stats().sent == n),
        "{:?}",
        client.stats()
    );
    let back = client.close();
    let st = client.stats();
    assert_eq!(
        st.possibly_lost + back.len() as u64,
        n,
        "each message is counted or handed back: {st:?}, {} handed back",
        back.len()
    );
}

/// At-least-once: messages the peer's TCP took before its last sign of life are taken as
/// delivered, however many are acknowledged after it at once. Here the peer reads nothing
/// until both kernels' buffers are full of small messages, then shows a sign of life and
/// reads everything: the first look after that found more than 65 536 messages newly
/// acknowledged, and pushed the older ones out of the remembered list before dropping
/// those the sign of life covered, so they were counted possibly lost (483 585 counted
/// where about 270 000 came after the sign of life; review of 9190541).
#[test]
fn messages_the_peer_took_before_its_last_sign_of_life_are_not_counted_possibly_lost() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    support::net::set_recv_buffer(&listener, 4 << 20).unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let read_bytes = Arc::new(AtomicU64::new(0));
    let (go_alive, alive_rx) = crossbeam_channel::bounded::<()>(1);
    let counted = read_bytes.clone();
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(sock).unwrap();
        // Reads nothing until told: its TCP takes what fits in its receive buffer.
        alive_rx.recv().unwrap();
        // A sign of life, then it reads (raw, discarding) everything, never writing again.
        ws.send(Message::text("alive")).unwrap();
        let sock = ws.get_mut();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = sock.read(&mut buf) {
            if n == 0 {
                break;
            }
            counted.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    let client = Client::builder(&url)
        .heartbeat(Heartbeat::off())
        .write_timeout(Duration::from_secs(120))
        .close_timeout(Duration::from_millis(200))
        .connect()
        .unwrap();
    let events = client.events();
    next_connected(&events);
    // 30-byte texts, 36 bytes on the wire, until our write buffer is full: the kernels'
    // buffers are full then (tungstenite buffers only what the socket refused).
    let mut accepted = 0u64;
    while client
        .try_send(Message::text(format!("{accepted:030}")))
        .is_ok()
    {
        accepted += 1;
        assert!(accepted < 2_000_000, "the write buffer never filled");
    }
    let sent_before = client.stats().sent;
    go_alive.send(()).unwrap();
    loop {
        match events.recv_timeout(T).expect("the sign of life") {
            Event::Message(Message::Text(t)) if t.as_str() == "alive" => break,
            _ => {}
        }
    }
    let long = Duration::from_secs(60);
    assert!(
        wait_until(long, || client.stats().sent == accepted),
        "{:?}",
        client.stats()
    );
    assert!(
        wait_until(long, || read_bytes.load(Ordering::SeqCst) >= accepted * 36),
        "the server read everything"
    );
    let back = client.close();
    let st = client.stats();
    server.join().unwrap();
    // At most the messages flushed after `sent_before` end after the sign of life.
    let after = accepted - sent_before;
    assert!(
        after > 1 << 16,
        "more newly acknowledged at once than the remembered list holds ({after})"
    );
    assert!(
        st.possibly_lost + back.len() as u64 <= after,
        "{} counted possibly lost (+{} handed back), but only {after} of {accepted} \
         messages were acknowledged after the peer's last sign of life: {st:?}",
        st.possibly_lost,
        back.len()
    );
}

/// A server that resumes a session (see below): connection 1 takes `N` messages
/// `{"id":i,...}` and acks none, then goes away; connection 2 acks all of them first, and
/// reads only once `read_on` is set, returning the ids it gets again (up to "end").
/// Returns the connected client (acked delivery, 32 KiB messages all sent, `more`
/// settings on top), `read_on` and the server thread.
fn resuming_server_and_client_with(
    more: impl FnOnce(ClientBuilder) -> ClientBuilder,
) -> (
    Client,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Vec<u64>>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let read_on = Arc::new(AtomicBool::new(false));
    let r = read_on.clone();
    let id_of = |t: &str| -> Option<u64> {
        t.strip_prefix("{\"id\":")?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(s).unwrap();
        let mut got = 0;
        while got < RESUMED {
            if let Ok(tungstenite::Message::Text(_)) = ws.read() {
                got += 1;
            }
        }
        drop(ws);
        let (s, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(s).unwrap();
        for i in 1..=RESUMED {
            ws.write(tungstenite::Message::text(format!("{{\"ack\":{i}}}")))
                .unwrap();
        }
        ws.flush().unwrap();
        // Waiting for the test's go (a condition, looked at every 5 ms).
        while !r.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut again = Vec::new();
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) if t.as_str() == "end" => return again,
                Ok(tungstenite::Message::Text(t)) => again.extend(id_of(t.as_str())),
                Ok(_) => {}
                Err(_) => return again,
            }
        }
    });
    let client = more(
        Client::builder(&url)
            .delivery(Delivery::Acked(
                Acks::json_field("id", "ack").timeout(Duration::MAX),
            ))
            .heartbeat(Heartbeat::off())
            .write_timeout(Duration::from_secs(60))
            .close_timeout(Duration::from_millis(200))
            .reconnect_policy(Fixed(Duration::from_millis(20))),
    )
    .connect()
    .unwrap();
    let pad = "x".repeat(32 << 10);
    for i in 1..=RESUMED {
        client
            .send(Message::text(format!("{{\"id\":{i},\"p\":\"{pad}\"}}")))
            .unwrap();
    }
    assert!(
        wait_until(T, || client.stats().acked == RESUMED),
        "{:?}",
        client.stats()
    );
    (client, read_on, server)
}

/// Messages in [`resuming_server_and_client`].
const RESUMED: u64 = 1000;

/// Acked delivery against a server that resumes a session: on the new connection it first
/// acks everything the last one delivered, then reads. The unacked messages requeued for
/// the new connection that get their ack while they wait in the queue are not written
/// again; every one the server does get twice is counted in `resent`. Before, the
/// queue's acked messages went out again uncounted (acked probe: 358 of 1000 duplicates
/// that `resent` did not count, 5 of 5 runs).
#[test]
fn messages_acked_while_queued_for_a_new_connection_are_not_written_again() {
    let (client, read_on, server) = resuming_server_and_client_with(|b| b);
    read_on.store(true, std::sync::atomic::Ordering::SeqCst);
    client.send_text("end").unwrap();
    let again = server.join().unwrap();
    let stats = client.stats();
    let _ = client.close();
    assert!(
        again.len() as u64 <= stats.resent,
        "{} acked messages written again, {} counted in resent",
        again.len(),
        stats.resent
    );
    assert_eq!(stats.outbox, 0);
}

/// The same, closed while the acked messages still wait in the queue: `close()` hands
/// back only unacked messages (an acked one handed back would be sent twice by a caller
/// that re-sends what it gets back).
#[test]
fn close_hands_back_no_message_acked_while_queued() {
    let (client, read_on, server) = resuming_server_and_client_with(|b| b);
    let back = client.close();
    read_on.store(true, std::sync::atomic::Ordering::SeqCst);
    server.join().unwrap();
    assert!(back.is_empty(), "{} acked messages handed back", back.len());
}
