//! The event stream past CONTROL_EVENT_CAP unread control events: connections that bring
//! nothing for the consumer are left out; the grammar holds and no message is lost.

#![allow(dead_code)]

mod support;

use std::collections::HashSet;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use support::client::{Fixed, check_grammar, events_until_closed};
use support::util;
use tungstenite::{Message as WsMessage, WebSocket};
use wsbeat::{Client, ClientBuilder, Event, Events, Message, State};

const T: Duration = Duration::from_secs(10);
const CAP: u64 = wsbeat::CONTROL_EVENT_CAP as u64;

fn builder(url: &str) -> ClientBuilder {
    Client::builder(url)
        .connect_timeout(T)
        .close_timeout(Duration::from_secs(2))
        .reconnect_policy(Fixed(Duration::ZERO))
}

/// What the server does with connection `k` (1-based, in accept order).
enum Plan {
    /// Send these texts, then drop the TCP connection.
    SendThenDrop(Vec<String>),
    /// Keep it open: wait for a text to send on `go` (or its end), then read until the
    /// client goes.
    Hold(Receiver<String>),
}

/// A tungstenite server, one connection at a time; `plan(k)` decides for connection k.
/// Records the texts it sent (flushed without error).
/// Texts the server sent, with the connection (accept order, from 1) each went on.
type Sent = Arc<Mutex<Vec<(u64, String)>>>;

fn server(plan: impl Fn(u64) -> Plan + Send + 'static) -> (String, Sent) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let rec = sent.clone();
    std::thread::spawn(move || {
        let mut k = 0u64;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(mut ws) = tungstenite::accept(stream) else {
                continue;
            };
            k += 1;
            match plan(k) {
                Plan::SendThenDrop(texts) => {
                    for t in texts {
                        if ws.send(WsMessage::text(t.clone())).is_ok() {
                            rec.lock().unwrap().push((k, t));
                        }
                    }
                }
                Plan::Hold(go) => {
                    let rec = rec.clone();
                    // Served on its own thread so the accept loop goes on.
                    std::thread::spawn(move || hold(k, ws, go, rec));
                }
            }
        }
    });
    (url, sent)
}

fn hold(k: u64, mut ws: WebSocket<TcpStream>, go: Receiver<String>, rec: Sent) {
    for t in go.iter() {
        if ws.send(WsMessage::text(t.clone())).is_ok() {
            rec.lock().unwrap().push((k, t));
        }
    }
    while ws.read().is_ok() {}
}

/// Generation of the connection each message arrived on, per the stream.
fn messages_by_generation(evs: &[Event]) -> Vec<(u64, String)> {
    let mut cur = 0;
    let mut out = Vec::new();
    for e in evs {
        match e {
            Event::Connected { generation, .. } => cur = *generation,
            Event::Disconnected { .. } => cur = 0,
            Event::Message(Message::Text(t)) => out.push((cur, t.as_str().to_string())),
            _ => {}
        }
    }
    out
}

fn kinds(evs: &[Event]) -> Vec<String> {
    evs.iter()
        .map(|e| {
            let d = format!("{e:?}");
            d.split([' ', '(', '{']).next().unwrap_or("").to_string()
        })
        .collect()
}

/// Past the cap, with a few connections that bring messages among thousands that bring
/// nothing: every message arrives, inside its own connection's pair, grammar kept.
#[test]
fn mixed_flapping_past_the_cap_keeps_every_message_in_its_connection() {
    let (url, sent) = server(|k| {
        if k % 25 == 0 && k <= 7000 {
            Plan::SendThenDrop(vec![format!("g{k}-a"), format!("g{k}-b")])
        } else {
            Plan::SendThenDrop(Vec::new())
        }
    });
    let client = builder(&url).connect_lazy().expect("lazy");
    let events = client.events();
    assert!(
        util::wait_until(Duration::from_secs(120), || client.stats().reconnects
            > 7100),
        "{:?}",
        client.stats()
    );
    let stats = client.stats();
    assert!(stats.events_elided > 0, "{stats:?}");
    assert_eq!(stats.inbound_dropped, 0, "{stats:?}");
    let _ = client.close();
    let evs = events_until_closed(&events, T);
    if let Err(e) = check_grammar(&evs, true) {
        panic!("grammar: {}", &e[..e.len().min(600)]);
    }
    let got = messages_by_generation(&evs);
    let sent = sent.lock().unwrap().clone();
    let got_texts: HashSet<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    let lost: Vec<_> = sent
        .iter()
        .filter(|(_, t)| !got_texts.contains(t.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} lost: {lost:?}",
        lost.len(),
        sent.len()
    );
    for (g, t) in &got {
        assert_eq!(
            format!("g{g}"),
            t.split('-').next().unwrap(),
            "{t} outside its pair"
        );
    }
    println!(
        "{} events, {} messages, elided {}",
        evs.len(),
        got.len(),
        client.stats().events_elided
    );
}

/// Flaps past the cap, then connection `n` stays open. Returns the client, its events,
/// the sender that makes the server send on `n`, and `n`.
fn behind_then_live(
    b: impl FnOnce(ClientBuilder) -> ClientBuilder,
) -> (Client, Events, Sender<String>, u64) {
    let n = CAP + 800;
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<String>();
    let go_rx = Mutex::new(Some(go_rx));
    let (url, _sent) = server(move |k| {
        if k == n {
            Plan::Hold(go_rx.lock().unwrap().take().unwrap())
        } else {
            Plan::SendThenDrop(Vec::new())
        }
    });
    let client = b(builder(&url)).connect_lazy().expect("lazy");
    let events = client.events();
    assert!(
        util::wait_until(Duration::from_secs(120), || {
            client.stats().reconnects >= n - 1 && client.state() == State::Open
        }),
        "{:?}",
        client.stats()
    );
    assert!(client.stats().events_elided > 0, "{:?}", client.stats());
    (client, events, go_tx, n)
}

/// A consumer that catches up with `recv_timeout` (reads the socket itself) gets the
/// live connection's `Connected`, then its message.
#[test]
fn recv_consumer_catching_up_gets_connected_then_message() {
    let (client, events, go, n) = behind_then_live(|b| b);
    let mut evs = Vec::new();
    while let Ok(ev) = events.recv_timeout(Duration::from_millis(300)) {
        evs.push(ev);
    }
    go.send("hello".into()).unwrap();
    let m = events.recv_timeout(T).expect("the message");
    evs.push(m);
    let _ = client.close();
    evs.extend(events_until_closed(&events, T));
    if let Err(e) = check_grammar(&evs, true) {
        panic!("grammar: {}", &e[e.len().saturating_sub(600)..]);
    }
    let got = messages_by_generation(&evs);
    assert_eq!(got, vec![(n, "hello".to_string())]);
}

/// A consumer that catches up with `try_recv` (or `select!` on `receiver()`): after it
/// has read everything, is it told that the client is connected (state Open)?
#[test]
fn try_recv_consumer_catching_up_is_told_of_the_live_connection() {
    let (client, events, go, n) = behind_then_live(|b| b);
    let mut evs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match events.try_recv() {
            Ok(ev) => evs.push(ev),
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(10)),
            Err(TryRecvError::Disconnected) => break,
        }
    }
    let last_connected = evs.iter().rev().find_map(|e| match e {
        Event::Connected { generation, .. } => Some(*generation),
        _ => None,
    });
    let tail: Vec<String> = kinds(&evs).into_iter().rev().take(4).collect();
    let state = client.state();
    drop(go);
    let _ = client.close();
    assert_eq!(
        last_connected,
        Some(n),
        "state {state:?}, connection {n} live for 2 s, consumer caught up (unread: 0); \
         last events (newest first): {tail:?}"
    );
}

/// Same with `recv_timeout` on a client whose consumers never read the socket
/// (acked delivery): the reader thread alone reads.
#[test]
fn driverless_recv_consumer_catching_up_is_told_of_the_live_connection() {
    let (client, events, go, n) = behind_then_live(|b| {
        fn none(_: &Message) -> Option<u64> {
            None
        }
        b.delivery(wsbeat::Delivery::Acked(wsbeat::Acks::new(none, none)))
    });
    let mut evs = Vec::new();
    while let Ok(ev) = events.recv_timeout(Duration::from_millis(500)) {
        evs.push(ev);
    }
    let last_connected = evs.iter().rev().find_map(|e| match e {
        Event::Connected { generation, .. } => Some(*generation),
        _ => None,
    });
    let state = client.state();
    drop(go);
    let _ = client.close();
    assert_eq!(last_connected, Some(n), "state {state:?}");
}

/// Consumer behind, connection `n` live and held: a message on it, then close; all read
/// after: Connected(n) before the message, grammar kept.
#[test]
fn close_during_a_held_connection_with_a_message_keeps_the_grammar() {
    let (client, events, go, n) = behind_then_live(|b| b);
    go.send("late".into()).unwrap();
    assert!(util::wait_until(T, || client.stats().received >= 1));
    let _ = client.close();
    let evs = events_until_closed(&events, T);
    if let Err(e) = check_grammar(&evs, true) {
        panic!("grammar: {}", &e[e.len().saturating_sub(600)..]);
    }
    assert_eq!(messages_by_generation(&evs), vec![(n, "late".to_string())]);
}

/// Consumer behind, connection `n` live, held, empty: close; the stream ends in order.
#[test]
fn close_during_an_empty_held_connection_keeps_the_grammar() {
    let (client, events, _go, _n) = behind_then_live(|b| b);
    let t0 = Instant::now();
    let _ = client.close();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let evs = events_until_closed(&events, T);
    if let Err(e) = check_grammar(&evs, true) {
        panic!("grammar: {}", &e[e.len().saturating_sub(600)..]);
    }
}
