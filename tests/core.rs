//! The connection core (issue 2): round trips over ws and wss, concurrent senders,
//! fairness under an inbound flood, the close handshake in both directions, resets,
//! typed connect errors, credential hygiene, headers/subprotocols, `try_send`,
//! hand-back of unsendable messages, large messages, ping answers and closing by drop.
//!
//! Thread and fd leak checks live in `tests/core_no_thread_leak.rs` (a binary of their own).

mod support;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use parking_lot::Mutex;
use support::certs::{self, ServerCert};
use support::server::{Behavior, TestServer, flood_message};
use wsbeat::{
    Client, ConnectStage, DisconnectReason, Error, Event, Limits, Message, State, TlsErrorKind,
};

/// Upper bound for anything that should happen "now" (generous: loaded 2-core machine).
const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// A short description of an event (message payloads can be megabytes).
fn brief(ev: &Event) -> String {
    match ev {
        Event::Message(m) => match m {
            Message::Text(t) if t.len() <= 40 => format!("Message(Text({:?}))", t.as_str()),
            Message::Text(t) => format!("Message(Text(<{} bytes>))", t.len()),
            Message::Binary(b) => format!("Message(Binary(<{} bytes>))", b.len()),
            other => format!("Message({other:?})"),
        },
        other => format!("{other:?}"),
    }
}

/// Waits for the first event matching `pred`; fails with everything seen meanwhile.
fn wait_event(rx: &wsbeat::Events, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(ev) if pred(&ev) => return ev,
            Ok(ev) => seen.push(brief(&ev)),
            Err(e) => panic!("no {what} within {T:?} ({e}); saw {seen:?}"),
        }
    }
}

/// Waits for `Connected` and returns the negotiated subprotocol.
fn wait_connected(rx: &wsbeat::Events) -> Option<String> {
    match wait_event(rx, "Connected", |e| matches!(e, Event::Connected { .. })) {
        Event::Connected { protocol, .. } => protocol,
        _ => unreachable!(),
    }
}

/// Waits for the next text or binary message.
fn next_message(rx: &wsbeat::Events) -> Message {
    match wait_event(rx, "a message", |e| matches!(e, Event::Message(_))) {
        Event::Message(m) => m,
        _ => unreachable!(),
    }
}

/// Every event up to and including `Closed` (which must come within `T`).
fn lifecycle_until_closed(rx: &wsbeat::Events) -> Vec<Event> {
    let deadline = Instant::now() + T;
    let mut out = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Closed) => {
                out.push(Event::Closed);
                return out;
            }
            Ok(ev) => out.push(ev),
            Err(e) => panic!(
                "no Closed within {T:?} ({e}); saw {:?}",
                out.iter().map(brief).collect::<Vec<_>>()
            ),
        }
    }
}

/// The close frame (code, reason) the server received from the client.
fn server_saw_close(server: &TestServer) -> (u16, String) {
    let deadline = Instant::now() + T;
    loop {
        match server
            .controls()
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(r) => {
                if let Message::Close(frame) = r.msg {
                    return frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                }
            }
            Err(e) => panic!("server saw no close frame within {T:?} ({e})"),
        }
    }
}

/// Text of a message.
fn text(m: &Message) -> &str {
    match m {
        Message::Text(t) => t.as_str(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn echo_round_trip_over_ws() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    assert_eq!(wait_connected(&events), None);
    assert_eq!(client.state(), State::Open);

    client.send_text("hello").unwrap();
    client.send_binary(vec![0u8, 1, 2, 255]).unwrap();
    client.send(Message::text("third")).unwrap();

    assert_eq!(next_message(&events), Message::text("hello"));
    assert_eq!(next_message(&events), Message::binary(vec![0u8, 1, 2, 255]));
    assert_eq!(next_message(&events), Message::text("third"));
    let got: Vec<Message> = server.received_on(0);
    assert_eq!(
        got,
        vec![
            Message::text("hello"),
            Message::binary(vec![0u8, 1, 2, 255]),
            Message::text("third")
        ]
    );
    let stats = client.stats();
    assert_eq!(stats.sent, 3);
    assert_eq!(stats.received, 3);
    assert_eq!(stats.generation, 1);
    let _ = client.close();
}

#[test]
#[cfg_attr(
    windows,
    ignore = "Wine 8's crypt32 cannot import the test server's PKCS#8 key (native-tls/schannel identity)"
)]
fn echo_round_trip_over_wss_with_test_ca() {
    let server = TestServer::builder().tls(ServerCert::Valid).start();
    let client = Client::builder(&server.wss_url())
        .add_root_certificate(&certs::ca_pem())
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);
    client.send_text("over tls").unwrap();
    client.send_binary(vec![7u8; 100_000]).unwrap();
    assert_eq!(next_message(&events), Message::text("over tls"));
    assert_eq!(next_message(&events), Message::binary(vec![7u8; 100_000]));
    assert_eq!(server.received_on(0)[0], Message::text("over tls"));
    let _ = client.close();
    assert_eq!(server_saw_close(&server).0, 1000);
}

#[test]
#[cfg_attr(
    windows,
    ignore = "Wine 8's crypt32 cannot import the test server's PKCS#8 key (native-tls/schannel identity)"
)]
fn wss_without_test_ca_fails_with_certificate_error() {
    let server = TestServer::builder().tls(ServerCert::Valid).start();
    let err = Client::builder(&server.wss_url())
        .connect()
        .expect_err("the test CA is not trusted by default");
    assert!(
        matches!(
            err,
            Error::Tls {
                kind: TlsErrorKind::Certificate,
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(err.is_fatal(), "a certificate error is not worth retrying");
    assert_eq!(server.upgraded(), 0);
}

// ---------------------------------------------------------------- concurrency and fairness

#[test]
fn concurrent_senders_lose_and_reorder_nothing() {
    const SENDERS: usize = 4;
    const EACH: usize = 2_000;
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    wait_connected(&events);

    let threads: Vec<_> = (0..SENDERS)
        .map(|id| {
            let c = client.clone();
            std::thread::spawn(move || {
                for seq in 0..EACH {
                    c.send_text(format!("{id}:{seq}"))
                        .unwrap_or_else(|e| panic!("sender {id} message {seq}: {e}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("sender thread panicked");
    }

    // Order per sender, as the server received it.
    assert!(
        server.wait_received(SENDERS * EACH, Duration::from_secs(30)),
        "server received {} of {}",
        server.received_count(),
        SENDERS * EACH
    );
    let check = |what: &str, msgs: Vec<String>| {
        let mut next = [0usize; SENDERS];
        for m in &msgs {
            let (id, seq) = m.split_once(':').expect("tagged message");
            let (id, seq): (usize, usize) = (id.parse().unwrap(), seq.parse().unwrap());
            assert_eq!(seq, next[id], "{what}: sender {id} out of order or lost");
            next[id] += 1;
        }
        assert_eq!(next, [EACH; SENDERS], "{what}: count per sender");
    };
    let at_server: Vec<String> = server
        .received()
        .into_iter()
        .map(|r| {
            assert_eq!(r.conn, 0, "everything on the first connection");
            r.text().expect("text").to_string()
        })
        .collect();
    check("server", at_server);

    // And the echoes, as the client's reader delivered them.
    let echoed: Vec<String> = (0..SENDERS * EACH)
        .map(|_| text(&next_message(&events)).to_string())
        .collect();
    check("client", echoed);
    assert_eq!(client.stats().sent, (SENDERS * EACH) as u64);
    assert_eq!(client.stats().reconnects, 0);
    let _ = client.close();
}

#[test]
fn writer_is_not_starved_by_inbound_flood() {
    const FLOOD: usize = 40_000;
    const SIZE: usize = 1024;
    const SENDS: usize = 300;
    let server = TestServer::start(Behavior::Flood {
        count: FLOOD,
        size: SIZE,
    });
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();

    // Consumer: checks the flood arrives complete and in order, notes when it ended.
    let (started_tx, started_rx) = unbounded();
    let consumer = std::thread::spawn(move || {
        let mut flood_next = 0usize;
        let mut echoes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut flood_done = None;
        while flood_done.is_none() || echoes.len() < SENDS {
            let ev = events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| {
                    panic!("flood {flood_next}/{FLOOD}, echoes {}: {e}", echoes.len())
                });
            let Event::Message(m) = ev else { continue };
            let t = text(&m);
            if let Some(seq) = t.strip_prefix("w:") {
                echoes.push(seq.parse::<usize>().unwrap());
            } else {
                assert_eq!(t, flood_message(flood_next, SIZE), "flood order");
                if flood_next == 0 {
                    let _ = started_tx.send(());
                }
                flood_next += 1;
                if flood_next == FLOOD {
                    flood_done = Some(Instant::now());
                }
            }
        }
        (flood_done.unwrap(), echoes)
    });

    started_rx.recv_timeout(T).expect("the flood started");
    let mut worst = Duration::ZERO;
    for seq in 0..SENDS {
        let t0 = Instant::now();
        client
            .send_text(format!("w:{seq}"))
            .unwrap_or_else(|e| panic!("send {seq} during the flood: {e}"));
        worst = worst.max(t0.elapsed());
    }
    let writer_done = Instant::now();
    let (flood_done, echoes) = consumer.join().expect("consumer");

    assert!(
        writer_done < flood_done,
        "the writer finished its {SENDS} sends only {:?} after the flood ended",
        writer_done - flood_done
    );
    // Starvation check only (a starved writer waits for the whole flood): large slack.
    assert!(
        worst < Duration::from_secs(2),
        "worst send latency {worst:?}"
    );
    assert_eq!(echoes, (0..SENDS).collect::<Vec<_>>(), "echo order");
    let at_server: Vec<String> = server
        .received_on(0)
        .iter()
        .map(|m| text(m).to_string())
        .collect();
    let expected: Vec<String> = (0..SENDS).map(|s| format!("w:{s}")).collect();
    assert_eq!(at_server, expected);
    let _ = client.close();
}

// ---------------------------------------------------------------- closing

#[test]
fn close_sends_close_1000_and_emits_closed_by_user_then_closed() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    wait_connected(&events);

    let undelivered = client.close();
    assert!(undelivered.is_empty());
    assert_eq!(client.state(), State::Closed);
    assert_eq!(server_saw_close(&server), (1000, String::new()));

    let life = lifecycle_until_closed(&events);
    assert!(
        matches!(
            life.as_slice(),
            [
                Event::Disconnected {
                    generation: 1,
                    reason: DisconnectReason::ClosedByUser
                },
                Event::Closed
            ]
        ),
        "got {life:?}"
    );
    assert!(
        server.wait_live(0, T),
        "server side of the connection ended"
    );
    // Closing again is harmless and returns nothing.
    assert!(client.close().is_empty());
    assert!(
        events.recv_timeout(Duration::from_millis(200)).is_err(),
        "Closed is the last event"
    );
}

#[test]
fn connect_returns_open_and_an_immediate_close_still_does_the_handshake() {
    // No waiting between connect() and close(): repeated, because the window is short.
    let server = TestServer::echo();
    for round in 0..20 {
        let client = Client::builder(&server.url()).connect().unwrap();
        assert_eq!(
            client.state(),
            State::Open,
            "round {round}: connect() returned before the connection was open"
        );
        let events = client.events();
        let _ = client.close();
        let (code, _) = server_saw_close(&server);
        assert_eq!(code, 1000, "round {round}");
        let life = lifecycle_until_closed(&events);
        assert!(
            matches!(
                life.as_slice(),
                [
                    Event::Connected { .. },
                    Event::Disconnected {
                        reason: DisconnectReason::ClosedByUser,
                        ..
                    },
                    Event::Closed
                ]
            ),
            "round {round}: {life:?}"
        );
    }
}

#[test]
fn peer_close_reports_code_and_reason_and_client_ends_closed_without_reconnect() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);

    server.close_all(4000, "bye");
    let life = lifecycle_until_closed(&events);
    let Some(Event::Disconnected { generation, reason }) = life.first() else {
        panic!("first event should be Disconnected, got {life:?}");
    };
    assert_eq!(*generation, 1);
    assert_eq!(
        *reason,
        DisconnectReason::ClosedByPeer {
            code: 4000,
            reason: "bye".into()
        }
    );
    assert!(
        !life
            .iter()
            .any(|e| matches!(e, Event::Reconnecting { .. } | Event::Connected { .. })),
        "no reconnect with reconnect(false): {life:?}"
    );
    assert!(matches!(life.last(), Some(Event::Closed)));
    assert_eq!(client.state(), State::Closed);
    // The client answered the close frame, completing the handshake.
    assert_eq!(server_saw_close(&server).0, 4000);
    assert_eq!(server.accepted(), 1);
    assert!(matches!(
        client.send_text("late"),
        Err(Error::Closed { message: Some(_) })
    ));
}

#[test]
fn peer_reset_is_reported_as_reset() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);
    // Traffic first, so the reset hits an established, used connection.
    client.send_text("before").unwrap();
    assert_eq!(next_message(&events), Message::text("before"));

    server.reset_all();
    let ev = wait_event(&events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    });
    assert!(
        matches!(
            ev,
            Event::Disconnected {
                generation: 1,
                reason: DisconnectReason::Reset
            }
        ),
        "got {ev:?}"
    );
    let life = lifecycle_until_closed(&events);
    assert!(matches!(life.last(), Some(Event::Closed)));
    assert_eq!(client.state(), State::Closed);
}

#[test]
fn dropping_the_last_handle_closes_but_dropping_a_clone_does_not() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    wait_connected(&events);

    let other = client.clone();
    drop(client);
    assert_eq!(other.state(), State::Open, "a clone keeps the client alive");
    other.send_text("still here").unwrap();
    assert_eq!(next_message(&events), Message::text("still here"));

    drop(other);
    assert_eq!(server_saw_close(&server), (1000, String::new()));
    let life = lifecycle_until_closed(&events);
    assert!(
        matches!(
            life.as_slice(),
            [
                Event::Disconnected {
                    reason: DisconnectReason::ClosedByUser,
                    ..
                },
                Event::Closed
            ]
        ),
        "got {life:?}"
    );
    assert!(server.wait_live(0, T));
}

// ---------------------------------------------------------------- connect errors

#[test]
fn connect_timeout_covers_an_upgrade_that_never_answers() {
    let server = TestServer::start(Behavior::Hang);
    let timeout = Duration::from_millis(500);
    let t0 = Instant::now();
    let err = Client::builder(&server.url())
        .connect_timeout(timeout)
        .connect()
        .expect_err("the server never answers the upgrade");
    let took = t0.elapsed();
    match err {
        Error::Timeout {
            stage: ConnectStage::Upgrade,
            elapsed,
        } => assert!(elapsed >= timeout, "reported elapsed {elapsed:?}"),
        other => panic!("expected an upgrade timeout, got {other:?}"),
    }
    assert!(took >= timeout, "gave up early, after {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(server.accepted(), 1);
}

#[test]
fn http_401_on_upgrade_surfaces_the_status() {
    let server = TestServer::start(Behavior::reject(401));
    let err = Client::builder(&server.url())
        .connect()
        .expect_err("rejected");
    assert!(
        matches!(err, Error::Http { status: 401, .. }),
        "got {err:?}"
    );
    assert!(err.to_string().contains("401"), "{err}");
    assert!(err.is_fatal());
    assert_eq!(server.handshakes().len(), 1);
}

#[test]
fn connection_refused_is_a_typed_error() {
    let server = TestServer::echo();
    let url = server.url();
    server.stop(); // the port now refuses connections
    let err = Client::builder(&url)
        .connect()
        .expect_err("nothing listens");
    assert!(matches!(err, Error::Refused { .. }), "got {err:?}");
    assert!(
        err.to_string().contains(&server.port().to_string()),
        "{err}"
    );
}

#[test]
fn bad_urls_are_rejected_with_a_helpful_message() {
    for (url, hint) in [
        ("http://x", "http"),
        ("https://example.com/feed", "https"),
        ("not a url", "relative URL"),
        ("ws://", "host"),
        ("", "relative URL"),
    ] {
        let err = Client::builder(url).connect().expect_err(url);
        let Error::InvalidUrl { reason } = &err else {
            panic!("{url:?}: expected InvalidUrl, got {err:?}");
        };
        let shown = err.to_string();
        assert!(
            reason.contains(hint),
            "{url:?}: reason {reason:?} should mention {hint:?}"
        );
        assert!(
            shown.contains("ws://") && shown.contains("wss://"),
            "{url:?}: {shown}"
        );
        assert!(err.is_fatal());
        assert!(matches!(
            Client::connect(url),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            wsbeat::Request::new(url),
            Err(Error::InvalidUrl { .. })
        ));
    }
}

// ---------------------------------------------------------------- credentials

/// Captures every log line of the `wsbeat` crate (all tests of this binary).
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.target().starts_with("wsbeat")
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.lock().push(format!("{}", record.args()));
        }
    }
    fn flush(&self) {}
}

static LOGS: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn credentials_never_appear_in_debug_output_errors_or_logs() {
    if log::set_logger(&LOGS).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    const SECRETS: [&str; 4] = ["s3cretpw", "tok3nvalue", "Bearer-b34rer", "alice"];
    let leaks = |what: &str, s: &str| {
        for secret in SECRETS {
            assert!(!s.contains(secret), "{what} leaks {secret:?}: {s}");
        }
    };
    let server = TestServer::echo();
    let url = format!(
        "ws://alice:s3cretpw@127.0.0.1:{}/feed?token=tok3nvalue",
        server.port()
    );
    let builder = Client::builder(&url)
        .header("Authorization", "Bearer-b34rer")
        .header("X-Api-Key", "tok3nvalue");
    leaks("ClientBuilder Debug", &format!("{builder:?}"));
    assert!(format!("{builder:?}").contains("127.0.0.1"));

    let request = wsbeat::Request::new(&url)
        .unwrap()
        .header("Authorization", "Bearer-b34rer");
    leaks("Request Debug", &format!("{request:?}"));
    leaks("Request Debug (pretty)", &format!("{request:#?}"));

    let client = builder.connect().unwrap();
    let events = client.events();
    wait_connected(&events);
    leaks("Client Debug", &format!("{client:?}"));
    leaks("Client Debug (pretty)", &format!("{client:#?}"));
    leaks("Stats Debug", &format!("{:?}", client.stats()));
    // The secrets did reach the server (so the checks above are not vacuous).
    let hs = server.last_handshake().unwrap();
    assert_eq!(hs.header("authorization"), Some("Bearer-b34rer"));
    assert_eq!(hs.path, "/feed?token=tok3nvalue");
    let _ = client.close();
    for ev in lifecycle_until_closed(&events) {
        leaks("Event Debug", &format!("{ev:?}"));
    }

    // Error messages of failed connects.
    let rejecting = TestServer::start(Behavior::reject(401));
    let stopped = TestServer::echo();
    stopped.stop();
    let hanging = TestServer::start(Behavior::Hang);
    for (port, timeout) in [
        (rejecting.port(), T),
        (stopped.port(), T),
        (hanging.port(), Duration::from_millis(300)),
    ] {
        let url = format!("ws://alice:s3cretpw@127.0.0.1:{port}/?token=tok3nvalue");
        let err = Client::builder(&url)
            .header("Authorization", "Bearer-b34rer")
            .connect_timeout(timeout)
            .connect()
            .expect_err("must fail");
        leaks("connect error Display", &err.to_string());
        leaks("connect error Debug", &format!("{err:?}"));
    }
    // A header value that is not valid HTTP: the error names the header, not the value.
    let err = Client::builder(&server.url())
        .header("Authorization", "Bearer-b34rer\r\nX-Injected: 1")
        .connect()
        .expect_err("invalid header value");
    assert!(matches!(err, Error::InvalidHeader { .. }), "got {err:?}");
    leaks("InvalidHeader", &format!("{err} {err:?}"));
    // Unparsable URLs carrying credentials.
    for bad in [
        "ws://alice:s3cretpw@exa mple.com/?token=tok3nvalue",
        "wss://alice:s3cretpw@[::1/x?token=tok3nvalue",
        "http://alice:s3cretpw@example.com/?token=tok3nvalue",
    ] {
        // The builder keeps the error until connect(): its Debug shows it, redacted.
        let builder = Client::builder(bad).header("Authorization", "Bearer-b34rer");
        leaks("builder Debug", &format!("{builder:?}"));
        let err = builder.connect().expect_err(bad);
        leaks("InvalidUrl Display", &err.to_string());
        leaks("InvalidUrl Debug", &format!("{err:?}"));
    }
    // Proxy URLs with credentials, accepted or refused.
    for proxy in [
        "socks5://alice:s3cretpw@127.0.0.1:1",
        "ftp://alice:s3cretpw@127.0.0.1:1",
        "socks5://alice:s3cretpw@exa mple.com:1",
    ] {
        let builder = Client::builder(&server.url())
            .header("Authorization", "Bearer-b34rer")
            .proxy(proxy)
            .reconnect(false)
            .connect_timeout(Duration::from_secs(5));
        leaks("builder Debug", &format!("{builder:?}"));
        if let Err(err) = builder.connect() {
            leaks("proxy error", &format!("{err} {err:?}"));
        }
    }

    let logs = LOGS.0.lock().clone();
    for line in &logs {
        leaks("wsbeat log line", line);
    }
}

// ---------------------------------------------------------------- handshake contents

#[test]
fn headers_and_subprotocols_reach_the_server_and_the_choice_is_reported() {
    let server = TestServer::builder().accept_subprotocol("v2.json").start();
    let url = format!("ws://127.0.0.1:{}/feed?room=7", server.port());
    let client = Client::builder(&url)
        .header("X-Trace-Id", "trace-42")
        .header("User-Agent", "wsbeat-test")
        .subprotocol("v1.json")
        .subprotocol("v2.json")
        .connect()
        .unwrap();
    let events = client.events();
    assert_eq!(wait_connected(&events).as_deref(), Some("v2.json"));

    let hs = server.last_handshake().expect("recorded handshake");
    assert_eq!(hs.path, "/feed?room=7");
    assert_eq!(hs.header("x-trace-id"), Some("trace-42"));
    assert_eq!(hs.header("user-agent"), Some("wsbeat-test"));
    assert_eq!(hs.subprotocols(), vec!["v1.json", "v2.json"]);
    let _ = client.close();

    // Without an offer, no protocol is reported.
    let client = Client::builder(&server.url()).connect().unwrap();
    assert_eq!(wait_connected(&client.events()), None);
    assert!(server.last_handshake().unwrap().subprotocols().is_empty());
    let _ = client.close();
}

// ---------------------------------------------------------------- send paths

#[test]
fn try_send_never_blocks_and_hands_the_message_back() {
    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .recv_buffer(4096)
        .start();
    let client = Client::builder(&server.url())
        .limits(Limits::default().max_write_buffer(256 << 10))
        // The stall detector must not end the connection while we fill it.
        .write_timeout(Duration::from_secs(60))
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);

    let mut worst = Duration::ZERO;
    let mut accepted = 0usize;
    let mut handed_back = None;
    // 64 MiB at most: far more than the socket buffers and the 256 KiB write buffer.
    for i in 0..4096u32 {
        let msg = Message::binary(vec![(i % 251) as u8; 16 << 10]);
        let t0 = Instant::now();
        let r = client.try_send(msg.clone());
        worst = worst.max(t0.elapsed());
        match r {
            Ok(()) => accepted += 1,
            Err(Error::WouldBlock { message }) => {
                assert_eq!(message, msg, "the unsent message comes back");
                handed_back = Some(message);
                break;
            }
            Err(e) => panic!("try_send {i}: unexpected {e:?}"),
        }
    }
    let Some(unsent) = handed_back else {
        panic!("try_send accepted {accepted} messages of 16 KiB without ever reporting WouldBlock");
    };
    assert!(accepted > 0, "the first messages fit");
    // A blocking call would wait for the 60 s write timeout; large slack for a loaded machine.
    assert!(
        worst < Duration::from_secs(2),
        "worst try_send took {worst:?}"
    );
    // The peer still reads nothing: the handed-back message can be tried again, and comes
    // back again. The kernel may still take a little more meanwhile (send buffer growth,
    // late acknowledgements on a loaded machine): then it is accepted, and the next try
    // comes back once the buffers are full again. Each try is quick either way.
    let mut came_back = false;
    for _ in 0..4096 {
        let t0 = Instant::now();
        let r = client.try_send(unsent.clone());
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "try_send took {:?}",
            t0.elapsed()
        );
        match r {
            Err(Error::WouldBlock { message }) => {
                assert_eq!(message, unsent);
                came_back = true;
                break;
            }
            Ok(()) => {}
            Err(e) => panic!("expected WouldBlock again, got {e:?}"),
        }
    }
    assert!(
        came_back,
        "the peer reads nothing, yet try_send never reported WouldBlock again"
    );
    assert_eq!(client.state(), State::Open);
    let _ = client.close();
}

#[test]
fn send_after_close_hands_the_message_back() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let other = client.clone();
    let _ = client.close();

    match client.send_text("too late") {
        Err(Error::Closed {
            message: Some(message),
        }) => assert_eq!(message, Message::text("too late")),
        other => panic!("expected Closed with the message, got {other:?}"),
    }
    match other.send_binary(vec![1u8, 2, 3]) {
        Err(Error::Closed {
            message: Some(message),
        }) => assert_eq!(message, Message::binary(vec![1u8, 2, 3])),
        other => panic!("expected Closed with the message, got {other:?}"),
    }
    match other.try_send(Message::text("try")) {
        Err(e @ Error::Closed { .. }) => {
            assert_eq!(e.into_message(), Some(Message::text("try")))
        }
        other => panic!("expected Closed with the message, got {other:?}"),
    }
    assert!(server.received().is_empty());
}

#[test]
fn oversized_message_is_rejected_and_handed_back() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url())
        .limits(Limits::default().max_message_size(1024))
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);

    let big = Message::binary(vec![9u8; 1025]);
    match client.send(big.clone()) {
        Err(Error::MessageTooLarge {
            size,
            limit,
            message,
        }) => {
            assert_eq!((size, limit), (1025, 1024));
            assert_eq!(message, big);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    let big_text = "x".repeat(2000);
    let err = client
        .try_send(Message::text(big_text.clone()))
        .unwrap_err();
    assert!(matches!(err, Error::MessageTooLarge { size: 2000, .. }));
    assert_eq!(err.into_message(), Some(Message::text(big_text)));

    // The limit is inclusive and the connection is unharmed.
    let edge = Message::binary(vec![5u8; 1024]);
    client.send(edge.clone()).unwrap();
    assert_eq!(next_message(&events), edge);
    assert_eq!(server.received_on(0), vec![edge]);
    let _ = client.close();
}

#[test]
fn four_mib_binary_message_round_trips() {
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    wait_connected(&events);

    let payload: Vec<u8> = (0..4usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    client.send_binary(payload.clone()).unwrap();
    client.send_text("after").unwrap();
    match next_message(&events) {
        Message::Binary(b) => {
            assert_eq!(b.len(), payload.len());
            assert!(b[..] == payload[..], "payload corrupted");
        }
        other => panic!("expected the binary echo, got {other:?}"),
    }
    assert_eq!(next_message(&events), Message::text("after"));
    let _ = client.close();
}

// ---------------------------------------------------------------- server-initiated traffic

/// A one-connection server written with plain tungstenite (the shared `TestServer` cannot
/// send pings or speak first). `script` runs on the upgraded socket (blocking, with a
/// read timeout of `T`). Returns the URL and the server thread.
fn raw_server(
    script: impl FnOnce(&mut tungstenite::WebSocket<std::net::TcpStream>) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        let mut ws = tungstenite::accept(tcp).unwrap();
        script(&mut ws);
    });
    (url, thread)
}

/// Reads until the client's close frame (answering it); forwards control frames to `tx`.
fn read_until_close(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
    tx: &crossbeam_channel::Sender<tungstenite::Message>,
) {
    loop {
        match ws.read() {
            Ok(m @ (tungstenite::Message::Pong(_) | tungstenite::Message::Close(_))) => {
                let _ = tx.send(m);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn server_ping_is_answered_with_a_matching_pong() {
    let (ctl_tx, ctl_rx) = unbounded();
    let (url, server) = raw_server(move |ws| {
        ws.send(tungstenite::Message::Ping("are-you-there".into()))
            .unwrap();
        read_until_close(ws, &ctl_tx);
    });
    let client = Client::builder(&url)
        .heartbeat(wsbeat::Heartbeat::off())
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);
    let pong = ctl_rx.recv_timeout(T).expect("a pong");
    assert_eq!(pong, tungstenite::Message::Pong("are-you-there".into()));
    let _ = client.close();
    assert!(matches!(
        ctl_rx.recv_timeout(T),
        Ok(tungstenite::Message::Close(Some(f))) if u16::from(f.code) == 1000
    ));
    server.join().unwrap();
    // Pings are not user events by default.
    let life = lifecycle_until_closed(&events);
    assert!(
        !life.iter().any(|e| matches!(e, Event::Message(_))),
        "{life:?}"
    );
}

#[test]
fn message_sent_by_the_server_right_after_the_upgrade_is_delivered() {
    // Nothing else arrives afterwards (no heartbeat either): the welcome message must not
    // wait in a buffer for more traffic.
    let (ctl_tx, ctl_rx) = unbounded();
    let (url, server) = raw_server(move |ws| {
        ws.send(tungstenite::Message::text("welcome")).unwrap();
        ws.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
            .unwrap();
        read_until_close(ws, &ctl_tx);
    });
    let client = Client::builder(&url)
        .heartbeat(wsbeat::Heartbeat::off())
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);
    assert_eq!(next_message(&events), Message::text("welcome"));
    assert_eq!(next_message(&events), Message::binary(vec![1u8, 2, 3]));
    let _ = client.close();
    assert!(matches!(
        ctl_rx.recv_timeout(T),
        Ok(tungstenite::Message::Close(_))
    ));
    server.join().unwrap();
}

// ---------------------------------------------------------------- type properties

#[test]
fn client_is_clone_send_sync() {
    fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    assert_clone_send_sync::<Client>();
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Error>();
    assert_send_sync::<Event>();
    // Usable from many threads at once through an Arc, too.
    assert_send_sync::<Arc<Client>>();
}

#[test]
fn close_from_inside_the_on_connect_hook_ends_cleanly() {
    // The hook runs on the supervisor thread, which cannot join itself: the client must
    // still close, hand back what was queued and emit `Closed` last.
    let server = TestServer::echo();
    let slot: Arc<std::sync::OnceLock<wsbeat::Client>> = Arc::default();
    let hook_slot = slot.clone();
    let client = Client::builder(&server.url())
        .no_proxy()
        .on_connect(move |s| {
            if s.generation() >= 2
                && let Some(c) = hook_slot.get()
            {
                let _ = c.send_text("queued while closing");
                let _ = c.close();
            }
            Ok(())
        })
        .connect()
        .unwrap();
    let events = client.events();
    wait_connected(&events);
    slot.set(client.clone()).unwrap();
    client.reconnect_now();
    let seen = lifecycle_until_closed(&events);
    assert!(
        seen.iter().any(|e| matches!(e, Event::Undelivered(m)
            if m.iter().any(|m| matches!(m, Message::Text(t) if t.as_str() == "queued while closing")))),
        "the message queued during the hook was not handed back: {seen:?}"
    );
    assert!(
        matches!(seen.iter().rev().nth(1), Some(Event::Undelivered(_))),
        "Closed must come after everything else: {seen:?}"
    );
    assert_eq!(client.state(), State::Closed);
    assert!(
        client.send_text("after").is_err(),
        "a closed client accepts nothing"
    );
}

/// A temporary `Events` (a new `client.events()` per event) takes messages from the
/// stream several at a time; what it still holds when dropped is dropped with it. Never
/// silently: every message is either delivered to a later `Events` or counted in a
/// warning.
#[test]
fn messages_dropped_with_an_events_handle_are_reported() {
    if log::set_logger(&LOGS).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    let n = 50usize;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut ws = tungstenite::accept(listener.accept().unwrap().0).unwrap();
        // On "go": n messages in one write, then "end".
        while let Ok(m) = ws.read() {
            if m.is_text() {
                for i in 0..n {
                    ws.write(Message::text(format!("m{i}"))).unwrap();
                }
                ws.write(Message::text("end")).unwrap();
                ws.flush().unwrap();
            }
        }
    });
    let client = Client::builder(&url).connect().unwrap();
    let events = client.events();
    wait_connected(&events);
    client.send_text("go").unwrap();
    // The reader (or this thread) read them all before the temporary handle looks.
    let t = Instant::now();
    while client.stats().received < n as u64 + 1 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the messages never came"
        );
        std::thread::yield_now();
    }
    let first = client.events().recv_timeout(Duration::from_secs(20));
    assert!(matches!(first, Ok(Event::Message(_))), "{first:?}");
    // The temporary handle is gone; the rest comes through `events` (at once: the client
    // has read it all), or was dropped.
    let mut later = 0;
    loop {
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(Event::Message(Message::Text(t))) if t.as_str() == "end" => {
                later += 1;
                break;
            }
            Ok(Event::Message(_)) => later += 1,
            _ => break,
        }
    }
    let dropped: usize = LOGS
        .0
        .lock()
        .iter()
        .filter(|l| l.contains("dropped with the `Events`"))
        .map(|l| l.split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(
        1 + later + dropped,
        n + 1,
        "every message delivered or reported ({later} later, {dropped} reported)"
    );
    assert!(
        dropped > 0,
        "the temporary handle held messages it never handed out"
    );
    let _ = client.close();
    server.join().unwrap();
}
