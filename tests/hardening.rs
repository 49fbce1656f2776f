//! Paths that must end whatever the user hands us: callbacks that panic, `Duration::MAX`
//! and `Duration::ZERO` in every duration knob, two closers at once, close from inside a
//! callback, a send racing the close frame, clients captured by their own callbacks.
//!
//! Every test holds `util::exclusive()`: they count `wsbeat-*` threads, which must be
//! back to zero after each one.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::client::{
    Fixed, MATCHER_PANIC, assert_grammar, assert_no_client_threads, client_panics,
    events_until_closed, matcher_panics, watch_panics,
};
use support::proxy::FaultProxy;
use support::server::{Behavior, TestServer};
use support::util;
use support::util::bounded;
use wsbeat::{
    Acks, Backoff, Client, ClientBuilder, Delivery, DisconnectReason, Error, Event, Events,
    Failure, Heartbeat, Limits, Message, OverflowPolicy, ReconnectPolicy, State, TcpKeepalive,
};

/// Upper bound for anything that should happen "now".
const T: Duration = Duration::from_secs(10);

fn builder(url: &str) -> ClientBuilder {
    Client::builder(url)
        .connect_timeout(T)
        .close_timeout(Duration::from_secs(2))
}

fn no_client_threads_left(what: &str) {
    assert_no_client_threads(what, T);
}

fn texts(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| m.to_text().unwrap_or("<binary>").to_string())
        .collect()
}

/// The messages in `Undelivered` events.
fn undelivered(evs: &[Event]) -> Vec<String> {
    evs.iter()
        .filter_map(|e| match e {
            Event::Undelivered(ms) => Some(texts(ms)),
            _ => None,
        })
        .flatten()
        .collect()
}

fn gave_up_cause(evs: &[Event]) -> Option<&Error> {
    evs.iter().find_map(|e| match e {
        Event::GaveUp(Error::GaveUp { last, .. }) => Some(&**last),
        Event::GaveUp(other) => panic!("GaveUp must carry Error::GaveUp, got {other:?}"),
        _ => None,
    })
}

/// A client whose first attempt waits until the test released `gate` (so the test can
/// queue messages while it is `Connecting`), against a server that rejects with 503.
fn queued_then_rejected(
    server: &TestServer,
    policy: impl ReconnectPolicy,
) -> (Client, Arc<Barrier>) {
    let gate = Arc::new(Barrier::new(2));
    let g = gate.clone();
    let url = server.url();
    let client = builder(&url)
        .reconnect_policy(policy)
        .request_factory(move |a| {
            if a.number == 1 {
                g.wait();
            }
            wsbeat::Request::new(&url)
        })
        .connect_lazy()
        .expect("lazy");
    (client, gate)
}

// ---------------------------------------------------------------------------------------
// 1. Panics in callbacks
// ---------------------------------------------------------------------------------------

struct PanickingPolicy;
impl ReconnectPolicy for PanickingPolicy {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        panic!("policy bug");
    }
}

#[test]
fn a_panicking_policy_closes_the_client_and_hands_back_the_queue() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::reject(503));
    let (client, gate) = queued_then_rejected(&server, PanickingPolicy);
    let events = client.events();
    client.send_text("one").expect("queued");
    client.send_text("two").expect("queued");
    gate.wait();
    let evs = events_until_closed(&events, T);
    assert_grammar(&evs, true);
    match gave_up_cause(&evs) {
        Some(Error::Panicked { origin, message }) => {
            assert_eq!(*origin, "reconnect policy");
            assert!(message.contains("policy bug"), "{message}");
        }
        other => panic!("expected GaveUp(Panicked): {other:?} in {evs:?}"),
    }
    assert_eq!(undelivered(&evs), ["one", "two"]);
    // Every later call returns at once.
    assert_eq!(client.state(), State::Closed);
    let err = client.send_text("late").expect_err("closed");
    assert!(matches!(err, Error::Closed { message: Some(_) }), "{err:?}");
    assert!(matches!(
        client.wait_connected(Duration::MAX),
        Err(Error::Closed { .. })
    ));
    let c = client.clone();
    assert!(bounded("close() after a panic", T, move || c.close()).is_empty());
    let c = client.clone();
    assert!(bounded("second close()", T, move || c.close()).is_empty());
    bounded("drop after close()", T, move || drop(client));
    no_client_threads_left("panicking policy");
}

#[test]
fn a_panicking_request_factory_is_a_fatal_typed_error() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    // Eager: connect() returns the error.
    let err = builder(&server.url())
        .request_factory(|_| panic!("factory bug"))
        .connect()
        .expect_err("the factory panicked");
    assert!(
        matches!(&err, Error::Panicked { origin: "request factory", message } if message.contains("factory bug")),
        "{err:?}"
    );
    assert!(err.is_fatal());
    // Lazy: the default policy gives up on it; the client ends properly.
    let client = builder(&server.url())
        .request_factory(|_| panic!("factory bug"))
        .connect_lazy()
        .expect("lazy");
    let evs = events_until_closed(&client.events(), T);
    assert_grammar(&evs, true);
    assert!(
        matches!(
            gave_up_cause(&evs),
            Some(Error::Panicked {
                origin: "request factory",
                ..
            })
        ),
        "{evs:?}"
    );
    bounded("drop", T, move || drop(client));
    no_client_threads_left("panicking factory");
}

/// A hook that sends what can never be sent (here a close frame) and returns the error
/// with `?` fails every attempt alike: the error is fatal, so the default policy gives up
/// at once instead of retrying a programming mistake for good (noted by the last
/// session's callback probe).
#[test]
fn an_on_connect_hook_refused_a_message_that_can_never_be_sent_is_fatal() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let url = server.url();
    let err = bounded("connect()", T, move || {
        builder(&url)
            .on_connect(move |s| {
                c2.fetch_add(1, SeqCst);
                s.send(Message::Close(None))
            })
            .connect()
    })
    .expect_err("the hook failed");
    assert!(matches!(&err, Error::NotSendable { .. }), "{err:?}");
    assert!(err.is_fatal());
    assert_eq!(calls.load(SeqCst), 1, "one attempt");
    // A lazy client with the default policy gives up after that one attempt.
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let client = builder(&server.url())
        .on_connect(move |s| {
            c2.fetch_add(1, SeqCst);
            s.send(Message::Close(None))
        })
        .connect_lazy()
        .expect("lazy");
    let events = client.events();
    let gave_up = loop {
        match events.recv_timeout(T).expect("GaveUp") {
            Event::GaveUp(e) => break e,
            Event::Closed => panic!("closed without GaveUp"),
            _ => {}
        }
    };
    assert!(gave_up.to_string().contains("close frame"), "{gave_up}");
    assert_eq!(calls.load(SeqCst), 1, "one attempt");
    let _ = client.close();
    let too_large = Error::MessageTooLarge {
        size: 2,
        limit: 1,
        message: Message::text("xx"),
    };
    assert!(
        too_large.is_fatal(),
        "the same message is as large next time"
    );
}

#[test]
fn a_panicking_on_connect_hook_fails_the_attempt_and_is_retried_when_the_policy_says_so() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let err = builder(&server.url())
        .on_connect(|_| panic!("hook bug"))
        .connect()
        .expect_err("the hook panicked");
    assert!(
        matches!(
            &err,
            Error::Panicked {
                origin: "on_connect hook",
                ..
            }
        ),
        "{err:?}"
    );
    // A policy that retries everything keeps trying; close() still ends it at once.
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let client = builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_millis(5)))
        .on_connect(move |_| {
            if c2.fetch_add(1, SeqCst) < 2 {
                panic!("hook bug");
            }
            Ok(())
        })
        .connect_lazy()
        .expect("lazy");
    client.wait_connected(T).expect("third attempt succeeds");
    assert_eq!(calls.load(SeqCst), 3);
    let events = client.events();
    let c = client.clone();
    bounded("close()", T, move || c.close());
    let evs: Vec<Event> = events.try_iter().collect();
    assert_grammar(&evs, true);
    let failures: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { last_error, .. } => last_error.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 2, "{evs:?}");
    assert!(failures.iter().all(|e| matches!(
        e,
        Error::Panicked {
            origin: "on_connect hook",
            ..
        }
    )));
    drop(client);
    no_client_threads_left("panicking hook");
}

#[test]
fn a_panicking_reply_matcher_is_not_a_reply_and_kills_nothing() {
    let _g = util::exclusive();
    watch_panics();
    let before = client_panics();
    let matcher_before = matcher_panics();
    let server = TestServer::start(Behavior::AppHeartbeat);
    let client = builder(&server.url())
        .heartbeat(Heartbeat::app(
            Duration::from_millis(50),
            Duration::from_secs(1),
            Message::text(r#"{"op":"ping"}"#),
            |m| {
                if m.to_text().is_ok_and(|t| t.contains("boom")) {
                    panic!("{}", MATCHER_PANIC);
                }
                m.to_text().is_ok_and(|t| t == r#"{"op":"pong"}"#)
            },
        ))
        .connect()
        .expect("connect");
    let events = client.events();
    let next_text = || loop {
        match events.recv_timeout(T).expect("an event") {
            Event::Message(m) => return m.into_text().expect("text").to_string(),
            Event::Disconnected { reason, .. } => panic!("disconnected: {reason}"),
            _ => {}
        }
    };
    client.send_text("boom").expect("send");
    // The echo of "boom" made the matcher panic: it is delivered as a message, and
    // the reader, heartbeat and connection live on.
    assert_eq!(next_text(), "boom");
    client.send_text("after").expect("send");
    assert_eq!(next_text(), "after");
    assert!(
        util::wait_until(T, || client.stats().rtt.is_some()),
        "probes answered"
    );
    assert_eq!(client.stats().generation, 1, "no reconnect");
    // The matcher runs on whichever thread reads the socket: the reader, or this one
    // while it waits in `recv`.
    assert_eq!(
        matcher_panics(),
        matcher_before + 1,
        "the matcher's own panic, caught"
    );
    assert_eq!(
        client_panics(),
        before,
        "no other panic in the client's threads"
    );
    let _ = client.close();
    no_client_threads_left("panicking matcher");
}

// ---------------------------------------------------------------------------------------
// 3. Event order: `Closed` exactly once and last, on every path
// ---------------------------------------------------------------------------------------

/// Closes its own client from inside `next_delay`, tells the test, and returns only once
/// the test says so (when a second closer is waiting).
struct CloseFromPolicy {
    client: Arc<parking_lot::Mutex<Option<wsbeat::WeakClient>>>,
    closed: crossbeam_channel::Sender<()>,
    go_on: crossbeam_channel::Receiver<()>,
}
impl ReconnectPolicy for CloseFromPolicy {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        let weak = self.client.lock().clone().expect("set before the attempt");
        if let Some(c) = weak.upgrade() {
            assert!(c.close().is_empty(), "cannot join its own thread");
            let _ = self.closed.send(());
            let _ = self.go_on.recv_timeout(T);
        }
        Some(Duration::from_millis(1))
    }
}

#[test]
fn closed_stays_last_when_closing_from_a_policy_and_a_second_thread() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::reject(503));
    for i in 0..10 {
        let (tx, closed) = crossbeam_channel::bounded(1);
        let (go_on, go_rx) = crossbeam_channel::bounded(1);
        let gate = Arc::new(Barrier::new(2));
        let g = gate.clone();
        let url = server.url();
        let slot: Arc<parking_lot::Mutex<Option<wsbeat::WeakClient>>> = Default::default();
        let client = builder(&url)
            .reconnect_policy(CloseFromPolicy {
                client: slot.clone(),
                closed: tx,
                go_on: go_rx,
            })
            .request_factory(move |a| {
                if a.number == 1 {
                    g.wait();
                }
                wsbeat::Request::new(&url)
            })
            .connect_lazy()
            .expect("lazy");
        *slot.lock() = Some(client.downgrade());
        let events = client.events();
        client.send_text("queued").expect("queued");
        gate.wait();
        closed
            .recv_timeout(T)
            .expect("the policy closed the client");
        // A second closer, waiting while the supervisor has yet to finish.
        let c = client.clone();
        let second = std::thread::Builder::new()
            .name("second-closer".into())
            .spawn(move || c.close())
            .unwrap();
        assert!(
            util::wait_until(T, || util::thread_sleeping("second-closer")),
            "the second closer waits"
        );
        go_on.send(()).unwrap();
        let back = bounded("second close()", T, move || second.join()).expect("no panic");
        assert!(back.is_empty());
        let evs = events_until_closed(&events, T);
        assert_grammar(&evs, true);
        assert_eq!(undelivered(&evs), ["queued"], "iteration {i}: {evs:?}");
        assert!(
            !evs.iter().any(|e| matches!(e, Event::Reconnecting { .. })),
            "iteration {i}: Reconnecting after close began: {evs:?}"
        );
        assert!(events.try_recv().is_err(), "nothing after Closed");
        drop(client);
        no_client_threads_left("close from policy");
    }
}

// ---------------------------------------------------------------------------------------
// 2 and 6. Duration::MAX and Duration::ZERO in every knob
// ---------------------------------------------------------------------------------------

/// The next text message by `deadline`; panics if the connection dies first.
fn next_text(events: &Events, deadline: Instant, what: &str) -> String {
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::Message(m)) => return m.to_text().expect("text").to_string(),
            Ok(Event::Disconnected { reason, .. }) => panic!("{what}: disconnected: {reason}"),
            Ok(_) => {}
            Err(e) => panic!("{what}: no echo: {e:?}"),
        }
    }
}

/// Connects with `b`, checks one echo round trip, closes; all bounded.
fn works(what: &str, b: ClientBuilder) {
    let client = b.connect().unwrap_or_else(|e| panic!("{what}: {e}"));
    let events = client.events();
    client.send_text("ping?").expect("send");
    let deadline = Instant::now() + T;
    while next_text(&events, deadline, what) != "ping?" {}
    let c = client.clone();
    bounded(what, T, move || c.close());
}

fn rejected(what: &str, b: impl Fn() -> ClientBuilder, setting: &str) {
    for r in [b().connect().err(), b().connect_lazy().err()] {
        match r {
            Some(Error::InvalidConfig { setting: s, reason }) => {
                assert!(s.contains(setting), "{what}: {s}");
                assert!(!reason.is_empty());
            }
            other => panic!("{what}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn every_duration_knob_takes_max_and_rejects_a_meaningless_zero() {
    let _g = util::exclusive();
    watch_panics();
    let before = client_panics();
    let server = TestServer::echo();
    let url = server.url();
    let max = Duration::MAX;
    let zero = Duration::ZERO;
    let short = Duration::from_millis(20);
    let probe = || Message::text("probe");
    let is_probe = |m: &Message| m.to_text().is_ok_and(|t| t == "probe");

    works("connect_timeout(MAX)", builder(&url).connect_timeout(max));
    rejected(
        "connect_timeout(ZERO)",
        || builder(&url).connect_timeout(zero),
        "connect_timeout",
    );
    works("write_timeout(MAX)", builder(&url).write_timeout(max));
    rejected(
        "write_timeout(ZERO)",
        || builder(&url).write_timeout(zero),
        "write_timeout",
    );
    works("close_timeout(MAX)", builder(&url).close_timeout(max));
    works("close_timeout(ZERO)", builder(&url).close_timeout(zero));
    // A short interval so the timer computes probe deadlines with the huge timeout.
    for (name, hb) in [
        ("ping(MAX, MAX)", Heartbeat::ping(max, max)),
        ("ping(short, MAX)", Heartbeat::ping(short, max)),
        ("ping(MAX, short)", Heartbeat::ping(max, short)),
        (
            "app(short, MAX)",
            Heartbeat::app(short, max, probe(), is_probe),
        ),
        ("app(MAX, MAX)", Heartbeat::app(max, max, probe(), is_probe)),
        ("passive(MAX)", Heartbeat::passive(max)),
        (
            "ping(short, MAX).strict",
            Heartbeat::ping(short, max).strict(true),
        ),
    ] {
        works(name, builder(&url).heartbeat(hb.max_missed(u32::MAX)));
    }
    rejected(
        "ping(ZERO, _)",
        || builder(&url).heartbeat(Heartbeat::ping(zero, short)),
        "interval",
    );
    rejected(
        "ping(_, ZERO)",
        || builder(&url).heartbeat(Heartbeat::ping(short, zero)),
        "timeout",
    );
    rejected(
        "app(_, ZERO)",
        || builder(&url).heartbeat(Heartbeat::app(short, zero, probe(), is_probe)),
        "timeout",
    );
    rejected(
        "passive(ZERO)",
        || builder(&url).heartbeat(Heartbeat::passive(zero)),
        "passive",
    );
    works("off()", builder(&url).heartbeat(Heartbeat::off()));
    let acked = |t| Delivery::Acked(Acks::json_field("id", "ack").timeout(t));
    works("Acks::timeout(MAX)", builder(&url).delivery(acked(max)));
    rejected(
        "Acks::timeout(ZERO)",
        || builder(&url).delivery(acked(zero)),
        "Acks::timeout",
    );
    // The shortest ack timeout re-sends an unacked message once a millisecond at most
    // (the echo server never acks), not without pause (once 48 000 times a second).
    {
        let client = builder(&url)
            .delivery(acked(Duration::from_nanos(1)))
            .heartbeat(Heartbeat::off())
            .connect()
            .expect("connect");
        let start = Instant::now();
        client.send_text(r#"{"id":1}"#).expect("send");
        assert!(
            util::wait_until(T, || client.stats().resent >= 3),
            "re-sent after the ack timeout"
        );
        let stats = client.stats();
        let ms = start.elapsed().as_millis() as u64;
        assert!(
            stats.resent <= ms + 1,
            "Acks::timeout(1 ns): {} re-sends in {ms} ms",
            stats.resent
        );
        let c = client.clone();
        bounded("close after Acks::timeout(1 ns)", T, move || c.close());
    }
    // The first dial's next Happy Eyeballs attempt is due `delay` later.
    works(
        "happy_eyeballs_delay(MAX)",
        builder(&url).happy_eyeballs_delay(max),
    );
    works(
        "happy_eyeballs_delay(ZERO)",
        builder(&url).happy_eyeballs_delay(zero),
    );
    // A consumer's spin ends `event_spin` after it started: several round trips, so
    // a wait that was short makes the next one spin.
    for spin in [max, zero] {
        let client = builder(&url).event_spin(spin).connect().expect("connect");
        let events = client.events();
        for i in 0..5 {
            client.send_text(format!("spin {i}")).expect("send");
            let deadline = Instant::now() + T;
            loop {
                match events.recv_deadline(deadline) {
                    Ok(Event::Message(m)) if m.to_text().unwrap() == format!("spin {i}") => break,
                    Ok(_) => {}
                    Err(e) => panic!("event_spin({spin:?}): round trip {i}: {e:?}"),
                }
            }
        }
        let c = client.clone();
        bounded("close after event_spin", T, move || c.close());
    }
    // The stall deadline is computed once the reader is held back by a full channel.
    {
        let client = builder(&url)
            .event_capacity(1, 1 << 20)
            .consumer_stall_timeout(max)
            .connect()
            .expect("connect");
        let events = client.events();
        for i in 0..5 {
            client.send_text(format!("held {i}")).expect("send");
        }
        assert!(
            util::wait_until(T, || client.stats().consumer_behind_since.is_some()),
            "the reader is held back"
        );
        let mut got = Vec::new();
        while got.len() < 5 {
            match events.recv_timeout(T) {
                Ok(Event::Message(m)) => got.push(m.to_text().unwrap().to_string()),
                Ok(_) => {}
                Err(e) => panic!("consumer_stall_timeout(MAX): {e:?} after {got:?}"),
            }
        }
        assert_eq!(got, (0..5).map(|i| format!("held {i}")).collect::<Vec<_>>());
        let c = client.clone();
        bounded("close after a held-back reader", T, move || c.close());
    }
    // Huge backoff settings: the first delay is huge, close() still ends at once.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/", l.local_addr().unwrap())
    };
    for policy in [
        Backoff::default().initial(max).max(max),
        Backoff::default().initial(max).max(max).factor(f64::MAX),
        Backoff::default().initial(zero).max(zero),
        Backoff::default().max_elapsed(Some(max)).min_uptime(max),
    ] {
        let client = builder(&refused)
            .reconnect_policy(policy)
            .connect_lazy()
            .expect("lazy");
        let events = client.events();
        let e = events.recv_timeout(T).expect("an event");
        assert!(matches!(e, Event::Reconnecting { .. }), "{e:?}");
        let c = client.clone();
        bounded("close() during a huge backoff", T, move || c.close());
    }
    assert_eq!(client_panics(), before, "a wsbeat thread panicked");
    no_client_threads_left("duration knobs");
}

#[test]
fn limits_take_extreme_values() {
    let _g = util::exclusive();
    watch_panics();
    let before = client_panics();
    let server = TestServer::echo();
    let huge = Limits::default()
        .max_message_size(usize::MAX)
        .max_frame_size(usize::MAX)
        .max_write_buffer(usize::MAX)
        .queue_messages(usize::MAX)
        .queue_bytes(usize::MAX);
    works("Limits at usize::MAX", builder(&server.url()).limits(huge));
    // A zero message or frame size would close the connection on any message from the
    // peer, and reconnect for good (docs review: 87 connections in 2 s, before).
    rejected(
        "max_message_size(0)",
        || builder(&server.url()).limits(Limits::default().max_message_size(0)),
        "max_message_size",
    );
    rejected(
        "max_frame_size(0)",
        || builder(&server.url()).limits(Limits::default().max_frame_size(0)),
        "max_frame_size",
    );
    let tiny = Limits::default()
        .max_message_size(1)
        .max_frame_size(1)
        .max_write_buffer(0)
        .queue_messages(0)
        .queue_bytes(0);
    let client = builder(&server.url())
        .limits(tiny)
        .connect()
        .expect("connect");
    let err = client.send_text("xy").expect_err("over the limit");
    assert!(
        matches!(
            err,
            Error::MessageTooLarge {
                size: 2,
                limit: 1,
                ..
            }
        ),
        "{err:?}"
    );
    client.send_text("x").expect("a one-byte message fits");
    let c = client.clone();
    bounded("close()", T, move || c.close());
    assert_eq!(client_panics(), before, "a wsbeat thread panicked");
    drop(client);
    no_client_threads_left("extreme limits");
}

/// Every size and count the builder takes works at `usize::MAX` (and its smallest value):
/// no panic, on the caller's thread or the client's. `read_buffer_size(usize::MAX)` used
/// to panic in `connect()` (tungstenite allocates the whole buffer up front),
/// `read_budget(usize::MAX)` panicked the reader thread (it preallocated one batch), and
/// `thread_stack_size(usize::MAX)` failed every connect with "Invalid argument", and the
/// smallest stack it took (32 KiB) overflowed in a debug build: an abort.
#[test]
fn sizes_and_counts_take_usize_max() {
    let _g = util::exclusive();
    watch_panics();
    let before = client_panics();
    let server = TestServer::echo();
    let url = server.url();
    let max = usize::MAX;
    works("read_buffer_size(MAX)", builder(&url).read_buffer_size(max));
    works("read_buffer_size(0)", builder(&url).read_buffer_size(0));
    works("read_budget(MAX)", builder(&url).read_budget(max));
    works("read_budget(0)", builder(&url).read_budget(0));
    works(
        "thread_stack_size(MAX)",
        builder(&url).thread_stack_size(max),
    );
    works("thread_stack_size(0)", builder(&url).thread_stack_size(0));
    // The smallest stacks also carry a TLS handshake (the deepest call chain the threads
    // run; a 32 KiB minimum overflowed the supervisor's stack, an abort).
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    {
        let tls = TestServer::builder()
            .tls(support::certs::ServerCert::Valid)
            .start();
        works(
            "thread_stack_size(0) over TLS",
            builder(&tls.wss_url())
                .add_root_certificate(&support::certs::ca_pem())
                .thread_stack_size(0),
        );
    }
    works(
        "event_capacity(MAX, MAX)",
        builder(&url).event_capacity(max, max),
    );
    works("event_capacity(0, 0)", builder(&url).event_capacity(0, 0));
    works("max_redirects(MAX)", builder(&url).max_redirects(max));
    assert_eq!(client_panics(), before, "a wsbeat thread panicked");
    no_client_threads_left("extreme sizes");
}

/// The smallest stack `thread_stack_size` takes also carries the connects that the
/// client's own threads make: the first one of `connect_lazy()` and every reconnect run
/// on the supervisor thread, through TLS and the upgrade (review: "thread
/// 'wsbeat-reconnect' has overflowed its stack" in a debug build, an abort, over ws://
/// and wss:// alike; `sizes_and_counts_take_usize_max` connects on the caller's thread).
#[test]
fn the_smallest_stacks_carry_a_lazy_connect_and_a_reconnect() {
    let _g = util::exclusive();
    watch_panics();
    let before = client_panics();
    let server = TestServer::echo();
    // A wss:// target too where a TLS backend is built in.
    #[cfg_attr(
        not(any(feature = "native-tls", feature = "rustls")),
        allow(unused_mut)
    )]
    let mut targets: Vec<(String, Option<Vec<u8>>)> = vec![(server.url(), None)];
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    let tls = TestServer::builder()
        .tls(support::certs::ServerCert::Valid)
        .start();
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    targets.push((tls.wss_url(), Some(support::certs::ca_pem())));
    for (url, ca) in targets {
        let mut b = builder(&url).thread_stack_size(0);
        if let Some(ca) = &ca {
            b = b.add_root_certificate(ca);
        }
        let client = b.connect_lazy().unwrap_or_else(|e| panic!("{url}: {e}"));
        let events = client.events();
        let deadline = Instant::now() + T;
        for generation in 1..=2 {
            loop {
                match events.recv_deadline(deadline) {
                    Ok(Event::Connected { generation: g, .. }) if g == generation => break,
                    Ok(Event::Closed) => panic!("{url}: closed"),
                    Ok(_) => {}
                    Err(e) => panic!("{url}: connection {generation} not made: {e:?}"),
                }
            }
            client.send_text("ping?").expect("send");
            while next_text(&events, deadline, &url) != "ping?" {}
            if generation == 1 {
                client.reconnect_now();
            }
        }
        let c = client.clone();
        bounded(&url, T, move || c.close());
    }
    assert_eq!(client_panics(), before, "a wsbeat thread panicked");
    no_client_threads_left("smallest stacks");
}

/// TCP keepalive takes `Duration::MAX` and `u32::MAX` (as long, or as many, as the OS
/// allows: Linux refuses more than 32767 s and 127 probes with "Invalid argument", which
/// failed every connect) and sub-second times (Linux counts whole seconds: they used to
/// become 0, refused too); zero, which no OS takes, is a typed error before anything
/// starts.
#[test]
fn tcp_keepalive_takes_max_and_sub_second_values_and_rejects_zero() {
    let _g = util::exclusive();
    watch_panics();
    let before = client_panics();
    let server = TestServer::echo();
    let url = server.url();
    let max = Duration::MAX;
    let short = Duration::from_millis(300);
    works(
        "tcp_keepalive(MAX, MAX, u32::MAX)",
        builder(&url).tcp_keepalive(TcpKeepalive::new(max).interval(max).retries(u32::MAX)),
    );
    works(
        "tcp_keepalive(300 ms, 300 ms)",
        builder(&url).tcp_keepalive(TcpKeepalive::new(short).interval(short)),
    );
    let one = Duration::from_secs(1);
    for (what, ka) in [
        ("time ZERO", TcpKeepalive::new(Duration::ZERO)),
        (
            "interval ZERO",
            TcpKeepalive::new(one).interval(Duration::ZERO),
        ),
        ("retries 0", TcpKeepalive::new(one).retries(0)),
    ] {
        rejected(what, || builder(&url).tcp_keepalive(ka), "tcp_keepalive");
    }
    assert_eq!(client_panics(), before, "a wsbeat thread panicked");
    no_client_threads_left("keepalive extremes");
}

/// An interface name the OS would cut at a NUL byte ("lo\0x" bound to "lo") or read as
/// "no interface" (empty) is refused before anything starts: either used to connect
/// through another interface than the one asked for, silently.
#[test]
fn bind_device_refuses_a_name_the_os_would_cut_or_ignore() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let url = server.url();
    for name in ["", "lo\0x"] {
        rejected(
            &format!("bind_device({name:?})"),
            || builder(&url).bind_device(name),
            "bind_device",
        );
    }
}

/// A server that, once upgraded, sends `frame(i)` for i = 0, 1, ... without pause
/// (taking what the client sends back, if `drain`) until the client goes away.
fn flooding_server(
    frame: fn(u64) -> tungstenite::Message,
    drain: bool,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let mut ws = tungstenite::accept(tcp).expect("upgrade");
        ws.get_mut().set_nonblocking(drain).expect("nonblocking");
        for i in 0.. {
            // Without `drain`, flushed in large batches: the client must find the socket
            // full, not parse faster than single frames arrive.
            let r = ws.write(frame(i));
            let r = if drain || i % 65536 == 0 {
                r.and_then(|()| ws.flush())
            } else {
                r
            };
            match r {
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
                Ok(()) => {}
            }
            if drain {
                match ws.read() {
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    });
    (url, server)
}

/// `Session::read(timeout)` ends at its deadline whatever the server sends meanwhile:
/// only pings (each answered), or a message whose empty fragments never end. It went on
/// for as long as they came.
#[test]
fn session_read_ends_at_its_deadline_against_pings_or_a_message_that_never_ends() {
    let _g = util::shared();
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    fn ping(_: u64) -> tungstenite::Message {
        tungstenite::Message::Ping(vec![1].into())
    }
    fn fragment(i: u64) -> tungstenite::Message {
        let op = if i == 0 { Data::Text } else { Data::Continue };
        tungstenite::Message::Frame(Frame::message(Vec::new(), OpCode::Data(op), false))
    }
    for (what, frame, drain) in [
        ("pings", ping as fn(u64) -> tungstenite::Message, true),
        ("endless fragments", fragment, false),
    ] {
        let (url, server) = flooding_server(frame, drain);
        let (tx, took) = crossbeam_channel::bounded(1);
        let client = builder(&url)
            .reconnect(false)
            .on_connect(move |s| {
                let start = Instant::now();
                let r = s.read(Duration::from_millis(200));
                let _ = tx.send((start.elapsed(), format!("{r:?}")));
                r.map(|_| ())
            })
            .connect_lazy()
            .expect("lazy");
        let (elapsed, r) = took
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("{what}: Session::read(200 ms) still reading after {T:?}"));
        assert!(r.contains("TimedOut"), "{what}: {r}");
        assert!(elapsed >= Duration::from_millis(200), "{what}: {elapsed:?}");
        let c = client.clone();
        bounded(what, T, move || c.close());
        bounded("the flooding server ends", T, move || server.join()).expect("server thread");
    }
}

#[test]
fn wait_connected_and_session_timeouts_take_max_and_zero() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let client = builder(&server.url())
        .on_connect(|s| {
            s.send(Message::text("hello"))?;
            let m = s.read(Duration::MAX)?;
            assert_eq!(m.to_text().unwrap(), "hello");
            // Nothing more comes: a zero timeout is an immediate, typed timeout.
            match s.read(Duration::ZERO) {
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
                other => panic!("read(ZERO): {other:?}"),
            }
        })
        .write_timeout(Duration::MAX)
        .connect()
        .expect("connect");
    client.wait_connected(Duration::MAX).expect("open");
    client.wait_connected(Duration::ZERO).expect("open");
    let _ = client.close();
    // Not connected: ZERO answers at once.
    let hang = TestServer::start(Behavior::Hang);
    let client = builder(&hang.url()).connect_lazy().expect("lazy");
    assert!(matches!(
        client.wait_connected(Duration::ZERO),
        Err(Error::NotConnected(_))
    ));
    let c = client.clone();
    let waiter = std::thread::spawn(move || c.wait_connected(Duration::MAX));
    let c = client.clone();
    bounded("close()", T, move || c.close());
    let r = bounded("wait_connected(MAX) ended by close()", T, move || {
        waiter.join()
    });
    assert!(matches!(r, Ok(Err(Error::Closed { .. }))), "{r:?}");
    drop(client);
    no_client_threads_left("wait_connected");
}

#[test]
fn overflow_block_takes_max_and_zero() {
    let _g = util::exclusive();
    let hang = TestServer::start(Behavior::Hang);
    let limits = Limits::default().queue_messages(1);
    // ZERO: like Reject.
    let client = builder(&hang.url())
        .limits(limits.clone())
        .overflow(OverflowPolicy::Block(Duration::ZERO))
        .connect_lazy()
        .expect("lazy");
    client.send_text("one").expect("queued");
    let err = client.send_text("two").expect_err("full");
    assert!(matches!(err, Error::QueueFull { .. }), "{err:?}");
    assert_eq!(client.close().len(), 1);
    // MAX: waits until room or close; close hands the message back.
    let client = builder(&hang.url())
        .limits(limits)
        .overflow(OverflowPolicy::Block(Duration::MAX))
        .connect_lazy()
        .expect("lazy");
    client.send_text("one").expect("queued");
    let c = client.clone();
    let blocked = std::thread::spawn(move || c.send_text("two"));
    // Whether the sender is already waiting or not, close ends it with the message back.
    let c = client.clone();
    let back = bounded("close()", T, move || c.close());
    let r = bounded("blocked send", T, move || blocked.join()).expect("no panic");
    let err = r.expect_err("closed");
    assert_eq!(
        err.into_message()
            .and_then(|m| m.into_text().ok())
            .as_deref(),
        Some("two")
    );
    assert_eq!(texts(&back), ["one"]);
    drop(client);
    no_client_threads_left("overflow block");
}

// ---------------------------------------------------------------------------------------
// 5. Nothing written after the close frame
// ---------------------------------------------------------------------------------------

#[test]
fn a_send_waiting_for_room_is_never_written_after_the_close_frame() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let proxy = FaultProxy::start(server.addr());
    let size = 100 << 10;
    let client = builder(&proxy.url())
        .close_timeout(Duration::from_secs(20))
        .write_timeout(Duration::from_secs(60))
        .heartbeat(Heartbeat::off())
        .limits(Limits::default().max_message_size(size).max_write_buffer(0))
        .connect()
        .expect("connect");
    let events = client.events();
    proxy.blackhole();
    // Fill the kernel buffers and tungstenite's write buffer.
    let big = move || Message::binary(vec![7u8; size]);
    let mut filled = 0;
    while client.try_send(big()).is_ok() {
        filled += 1;
        assert!(filled < 10_000, "the socket never filled");
    }
    // This sender finds no room and waits (without the lock) for the socket.
    let c = client.clone();
    let sender = std::thread::spawn(move || c.send(big()));
    // Scenario shaping, not synchronisation: give the sender time to reach its wait. The
    // kernel may still find room for it meanwhile (it keeps moving bytes towards the
    // blackholed peer), and if it has not started yet it meets the close first: the
    // checks below hold in every order.
    std::thread::sleep(Duration::from_millis(300));
    let c = client.clone();
    let closer = std::thread::spawn(move || c.close());
    assert!(
        util::wait_until(T, || client.state() == State::Closing),
        "close began"
    );
    // The close frame is queued behind the buffered data. Now the peer reads again:
    // a sender still waiting wakes up with room in the buffer, after the close frame.
    proxy.resume();
    let r = bounded("the waiting send", 2 * T, move || sender.join()).expect("no panic");
    bounded("close()", 3 * T, move || closer.join()).expect("no panic");
    // Either it was written before the close frame (`Ok`: the server echoes it) or it
    // is handed back whole; never written after the close frame (the server would not
    // echo it) and never lost.
    let written = match r {
        Ok(()) => 1,
        Err(Error::Closed { message: Some(m) }) => {
            assert_eq!(m.len(), size);
            0
        }
        other => panic!("the late message must be written or handed back, got {other:?}"),
    };
    let evs = events_until_closed(&events, T);
    assert_grammar(&evs, true);
    let echoed = evs
        .iter()
        .filter(|e| matches!(e, Event::Message(Message::Binary(b)) if b.len() == size))
        .count();
    assert_eq!(
        echoed,
        filled + written,
        "every message accepted before the close frame reaches the server, none after it"
    );
    let reason = evs.iter().find_map(|e| match e {
        Event::Disconnected { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(reason, Some(DisconnectReason::ClosedByUser), "{evs:?}");
    drop(client);
    no_client_threads_left("send after close frame");
}

// ---------------------------------------------------------------------------------------
// 7. Clients captured by their own callbacks
// ---------------------------------------------------------------------------------------

#[test]
fn a_client_captured_weakly_by_its_callbacks_closes_when_the_last_handle_drops() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::AppHeartbeat);
    let slot: Arc<parking_lot::Mutex<Option<wsbeat::WeakClient>>> = Default::default();
    let used = Arc::new(AtomicUsize::new(0));
    struct Policy(
        Arc<parking_lot::Mutex<Option<wsbeat::WeakClient>>>,
        Arc<AtomicUsize>,
    );
    impl ReconnectPolicy for Policy {
        fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
            if let Some(c) = self.0.lock().as_ref().and_then(|w| w.upgrade()) {
                let _ = c.state();
                self.1.fetch_add(1, SeqCst);
            }
            Some(Duration::from_millis(1))
        }
    }
    let (s1, s2, s3) = (slot.clone(), slot.clone(), slot.clone());
    let (u1, u2) = (used.clone(), used.clone());
    let url = server.url();
    let client = builder(&url)
        .reconnect_policy(Policy(slot.clone(), used.clone()))
        .request_factory(move |_| {
            if let Some(c) = s1.lock().as_ref().and_then(|w| w.upgrade()) {
                let _ = c.stats();
                u1.fetch_add(1, SeqCst);
            }
            wsbeat::Request::new(&url)
        })
        .on_connect(move |_| {
            if let Some(c) = s2.lock().as_ref().and_then(|w| w.upgrade()) {
                let _ = c.state();
                u2.fetch_add(1, SeqCst);
            }
            Ok(())
        })
        .heartbeat(Heartbeat::app(
            Duration::from_millis(20),
            T,
            Message::text(r#"{"op":"ping"}"#),
            move |m| {
                // A matcher runs under the client's lock: it may hold the weak handle but
                // must not upgrade it (dropping the last handle there would deadlock).
                let _held = &s3;
                m.to_text().is_ok_and(|t| t == r#"{"op":"pong"}"#)
            },
        ))
        .connect_lazy()
        .expect("lazy");
    *slot.lock() = Some(client.downgrade());
    let events = client.events();
    client.wait_connected(T).expect("connected");
    client.reconnect_now(); // factory and hook run again, with the handle set
    assert!(
        util::wait_until(T, || client.stats().generation == 2
            && used.load(SeqCst) >= 2),
        "callbacks used the weak handle"
    );
    let weak = client.downgrade();
    bounded("drop of the last handle", T, move || drop(client));
    assert!(weak.upgrade().is_none());
    no_client_threads_left("weakly captured client");
    let evs = events_until_closed(&events, T);
    assert_grammar(&evs, true);
}

// ---------------------------------------------------------------------------------------
// 9. One meaning each
// ---------------------------------------------------------------------------------------

struct Counting(Arc<AtomicUsize>);
impl ReconnectPolicy for Counting {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        self.0.fetch_add(1, SeqCst);
        Some(Duration::from_millis(1))
    }
}

#[test]
fn without_reconnect_the_policy_is_not_asked_and_gave_up_carries_error_gave_up() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::close_after_upgrade(4001, "bye"));
    let asked = Arc::new(AtomicUsize::new(0));
    let client = builder(&server.url())
        .reconnect(false)
        .reconnect_policy(Counting(asked.clone()))
        .connect()
        .expect("connect");
    let evs = events_until_closed(&client.events(), T);
    assert_grammar(&evs, true);
    let want = DisconnectReason::ClosedByPeer {
        code: 4001,
        reason: "bye".into(),
    };
    assert!(
        matches!(gave_up_cause(&evs), Some(Error::ConnectionLost(r)) if *r == want),
        "{evs:?}"
    );
    // A failed attempt (lazy) too.
    let rejecting = TestServer::start(Behavior::reject(503));
    let client2 = builder(&rejecting.url())
        .reconnect(false)
        .reconnect_policy(Counting(asked.clone()))
        .connect_lazy()
        .expect("lazy");
    let evs = events_until_closed(&client2.events(), T);
    assert_grammar(&evs, true);
    assert!(
        matches!(gave_up_cause(&evs), Some(Error::Http { status: 503, .. })),
        "{evs:?}"
    );
    assert_eq!(asked.load(SeqCst), 0, "the policy was consulted");
    drop((client, client2));
    no_client_threads_left("reconnect off");
}

#[test]
fn io_errors_expose_their_source() {
    use std::error::Error as _;
    let e: Error = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow").into();
    let source = e.source().expect("a source");
    assert_eq!(source.to_string(), "slow");
    let panicked = Error::Panicked {
        origin: "request factory",
        message: "x".into(),
    };
    assert!(panicked.is_fatal());
}

// ---------------------------------------------------------------------------------------
// 10. Close code 1012: a randomised wait, not a thundering herd
// ---------------------------------------------------------------------------------------

#[test]
fn close_code_1012_waits_a_randomised_five_to_thirty_seconds_by_default() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::close_after_upgrade(1012, "restart"));
    let client = builder(&server.url()).connect().expect("connect");
    let events = client.events();
    let deadline = Instant::now() + T;
    let delay = loop {
        match events.recv_deadline(deadline) {
            Ok(Event::Reconnecting { delay, .. }) => break delay,
            Ok(_) => {}
            Err(_) => panic!("no Reconnecting"),
        }
    };
    assert!(
        delay >= Duration::from_secs(5) && delay <= Duration::from_secs(30),
        "{delay:?}"
    );
    bounded("close() during the wait", T, move || client.close());
    no_client_threads_left("1012");
}

// ---------------------------------------------------------------------------------------
// A client that gave up can be started again (issue 14, item 7)
// ---------------------------------------------------------------------------------------

#[test]
fn a_client_that_gave_up_restarts_with_its_configuration() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::reject(401));
    let client = builder(&server.url())
        .header("X-Kept", "yes")
        .connect_lazy()
        .expect("lazy");
    client.send_text("queued-before").expect("queued");
    let evs = events_until_closed(&client.events(), T);
    assert_grammar(&evs, true);
    assert!(
        matches!(gave_up_cause(&evs), Some(Error::Http { status: 401, .. })),
        "{evs:?}"
    );
    assert_eq!(
        undelivered(&evs),
        ["queued-before"],
        "handed back on give-up"
    );
    // The server is fixed; start again with the same settings.
    server.set_behavior(Behavior::Echo);
    let again = client.restart().expect("restart");
    again.wait_connected(T).expect("connected");
    assert_eq!(
        server
            .last_handshake()
            .and_then(|h| h.header("x-kept").map(str::to_string)),
        Some("yes".to_string()),
        "the configuration was kept"
    );
    assert_eq!(client.state(), State::Closed, "the old client stays closed");
    // Restarting a running client moves its unsent messages, in order. It cannot
    // connect (the proxy refuses) until it has been restarted.
    let proxy = FaultProxy::start(server.addr());
    proxy.refuse(true);
    let stuck = builder(&proxy.url())
        .reconnect_policy(Fixed(Duration::from_millis(5)))
        .connect_lazy()
        .expect("lazy");
    for t in ["a", "b", "c"] {
        stuck.send_text(t).expect("queued");
    }
    let old_events = stuck.events();
    let moved = bounded("restart of a running client", T, move || {
        let c = stuck.restart().expect("restart");
        drop(stuck);
        c
    });
    let old = events_until_closed(&old_events, T);
    assert_grammar(&old, true);
    assert!(
        undelivered(&old).is_empty(),
        "moved, not handed back: {old:?}"
    );
    assert!(!old.iter().any(|e| matches!(e, Event::Connected { .. })));
    proxy.refuse(false);
    moved.wait_connected(T).expect("connected");
    let evs = moved.events();
    let mut echoed = Vec::new();
    while echoed.len() < 3 {
        match evs.recv_timeout(T).expect("echo") {
            Event::Message(m) => echoed.push(m.into_text().unwrap().to_string()),
            Event::Disconnected { reason, .. } => panic!("{reason}"),
            _ => {}
        }
    }
    assert_eq!(echoed, ["a", "b", "c"]);
    drop((client, again, moved));
    no_client_threads_left("restart");
}

// ---------------------------------------------------------------------------------------
// close() from every state: within 100 ms plus the close timeout, every thread joined.
// (A hanging TCP dial and a silent SOCKS proxy: `connect_setup::close_during_*`.)
// ---------------------------------------------------------------------------------------

#[test]
fn close_from_every_state_returns_within_100_ms_plus_the_close_timeout() {
    let _g = util::exclusive();
    let close_timeout = Duration::from_secs(1);
    let limit = close_timeout + Duration::from_millis(100);
    let hang = TestServer::start(Behavior::Hang);
    let echo = TestServer::echo();
    let rejecting = TestServer::start(Behavior::reject(503));
    let lazy = |url: &str| {
        builder(url)
            .close_timeout(close_timeout)
            .connect_timeout(Duration::from_secs(30))
    };
    let mut report = Vec::new();
    let mut check = |state: &str, client: Client| {
        let events = client.events();
        let t0 = Instant::now();
        let c = client.clone();
        bounded(state, T, move || c.close());
        let took = t0.elapsed();
        report.push(format!("{state}: {took:?}"));
        assert!(took < limit, "close() in state {state} took {took:?}");
        drop(client);
        let evs = events_until_closed(&events, T);
        assert_grammar(&evs, true);
        no_client_threads_left(state);
    };

    // Waiting for the upgrade response (TCP accepted, nothing answered).
    let client = lazy(&hang.url()).connect_lazy().expect("lazy");
    assert!(hang.wait_accepted(1, T));
    check("upgrade", client);
    // Inside the TLS handshake (TCP accepted, no TLS answer), when there is TLS.
    if cfg!(any(feature = "native-tls", feature = "rustls")) {
        let client = lazy(&hang.wss_url())
            .danger_accept_invalid_certs(true)
            .connect_lazy()
            .expect("lazy");
        assert!(hang.wait_accepted(2, T));
        check("TLS handshake", client);
    }
    // Inside an on_connect hook waiting for an answer that never comes.
    let (entered, in_hook) = crossbeam_channel::bounded(1);
    let client = lazy(&echo.url())
        .on_connect(move |s| {
            let _ = entered.try_send(());
            s.read(Duration::MAX).map(drop)
        })
        .connect_lazy()
        .expect("lazy");
    in_hook.recv_timeout(T).expect("the hook runs");
    check("on_connect hook", client);
    // Waiting out a long backoff.
    let client = lazy(&rejecting.url())
        .reconnect_policy(Fixed(Duration::from_secs(3600)))
        .connect_lazy()
        .expect("lazy");
    let e = client.events().recv_timeout(T).expect("an event");
    assert!(matches!(e, Event::Reconnecting { .. }), "{e:?}");
    check("backoff", client);
    // Open.
    let client = lazy(&echo.url()).connect().expect("connect");
    check("open", client);
    // After a panic in the policy ended the client.
    let client = lazy(&rejecting.url())
        .reconnect_policy(PanickingPolicy)
        .connect_lazy()
        .expect("lazy");
    assert!(util::wait_until(T, || client.state() == State::Closed));
    check("after a panic", client);
    eprintln!("close() took: {}", report.join(", "));
}

/// Several consumers share one stream and only one of them gets `Closed`. The others
/// must see the stream end too once the client closed, also while a handle lives on (as
/// it does in the thread that called `close()`): `Events::recv` promises `Err` after
/// `Closed`, and a worker that iterates would otherwise never end.
#[test]
fn every_consumer_sees_the_stream_end_after_close_while_a_handle_lives() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().expect("connect");
    let events = client.events();
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let e = events.clone();
            std::thread::spawn(move || e.iter().count())
        })
        .collect();
    drop(events);
    for i in 0..10 {
        client.send_text(format!("m{i}")).expect("send");
    }
    assert!(client.close().is_empty());
    let seen = bounded("consumers after close()", T, move || {
        consumers
            .into_iter()
            .map(|h| h.join().expect("consumer"))
            .sum::<usize>()
    });
    // Connected, the ten echoes (sent before the close frame), Disconnected, Closed.
    assert_eq!(seen, 13);
    // A stream taken after close() ends at once too.
    let c = client.clone();
    let r = bounded("recv on an Events taken after close()", T, move || {
        c.events().recv().map(|e| format!("{e:?}"))
    });
    assert!(r.is_err(), "{r:?}");
    drop(client);
    no_client_threads_left("consumers after close");
}

/// Messages the WebSocket protocol does not allow a client to send: a ping or pong with
/// more than 125 bytes (RFC 6455 5.5), a raw `Message::Frame` (it bypasses every check:
/// a close frame, a fragment, a reserved opcode). Written, they made the peer drop the
/// connection (reported as a mere `Reset`) and lost what was sent behind them; `send`
/// must hand them back instead, and the connection must live on.
#[test]
fn send_refuses_what_the_protocol_forbids_and_the_connection_lives_on() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let _g = util::exclusive();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().expect("connect");
    let events = client.events();
    client
        .send(Message::Ping(vec![1; 125].into()))
        .expect("a 125-byte ping is allowed");
    for m in [
        Message::Ping(vec![1; 126].into()),
        Message::Pong(vec![1; 126].into()),
    ] {
        for r in [client.send(m.clone()), client.try_send(m.clone())] {
            match r {
                Err(
                    e @ Error::MessageTooLarge {
                        size: 126,
                        limit: 125,
                        ..
                    },
                ) => {
                    assert!(e.to_string().contains("ping"), "{e}");
                    assert_eq!(e.into_message(), Some(m.clone()));
                }
                other => panic!(
                    "126-byte {}: expected MessageTooLarge, got {other:?}",
                    if m.is_ping() { "ping" } else { "pong" }
                ),
            }
        }
    }
    let raw = [
        Frame::close(None),
        Frame::message("part", OpCode::Data(Data::Text), false),
        Frame::message("x", OpCode::Data(Data::Text), true),
    ];
    for f in raw {
        let m = Message::Frame(f);
        for r in [client.send(m.clone()), client.try_send(m.clone())] {
            // Handed back (docs review: it was an `Error::Protocol` without the message,
            // which blamed the peer).
            match r {
                Err(e @ Error::NotSendable { .. }) => {
                    assert!(e.to_string().contains("raw frame"), "{e}");
                    assert_eq!(e.into_message(), Some(m.clone()));
                }
                other => panic!("{m:?}: {other:?}"),
            }
        }
    }
    for r in [
        client.send(Message::Close(None)),
        client.try_send(Message::Close(None)),
    ] {
        match r {
            Err(e @ Error::NotSendable { .. }) => {
                assert!(e.to_string().contains("Client::close()"), "{e}");
                assert_eq!(e.into_message(), Some(Message::Close(None)));
            }
            other => panic!("a close frame: {other:?}"),
        }
    }
    let batch = vec![
        Message::text("one"),
        Message::Ping(vec![1; 200].into()),
        Message::Frame(Frame::close(None)),
        Message::text("two"),
    ];
    let failed: Vec<usize> = client
        .send_all(batch)
        .expect_err("two refused")
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert_eq!(failed, [1, 2]);
    client.send_text("three").expect("send");
    let deadline = Instant::now() + T;
    let echoed: Vec<String> = (0..3)
        .map(|_| next_text(&events, deadline, "refused messages"))
        .collect();
    assert_eq!(echoed, ["one", "two", "three"]);
    assert_eq!(client.stats().generation, 1);
    let c = client.clone();
    assert!(bounded("close", T, move || c.close()).is_empty());
    drop(client);
    no_client_threads_left("refused messages");
}

/// The same refusals in an `on_connect` hook's `Session::send`: written, a big ping got
/// the fresh connection reset (the hook's next read failing with "reset without closing
/// handshake"), a close frame left it published half-closed (the first `send` on it then
/// killed it with "Sending after closing is not allowed"), and a message over the size
/// limit failed with "Write buffer is full" or went out unchecked.
#[test]
fn session_send_in_a_hook_refuses_what_the_protocol_forbids() {
    use tungstenite::protocol::frame::Frame;
    let _g = util::exclusive();
    let server = TestServer::echo();
    let results = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let r = results.clone();
    let client = builder(&server.url())
        .limits(Limits::default().max_message_size(1000))
        .on_connect(move |s| {
            let mut r = r.lock();
            r.push(s.send(Message::Ping(vec![1; 126].into())));
            r.push(s.send(Message::Close(None)));
            r.push(s.send(Message::Frame(Frame::close(None))));
            r.push(s.send(Message::binary(vec![0; 1001])));
            s.send(Message::text("hello"))?;
            let echo = s.read(T)?;
            assert_eq!(echo.to_text().ok(), Some("hello"));
            Ok(())
        })
        .connect()
        .expect("connect");
    let got: Vec<String> = results
        .lock()
        .iter()
        .map(|r| match r {
            Err(Error::MessageTooLarge { limit, .. }) => format!("too large {limit}"),
            Err(Error::NotSendable { .. }) => "not sendable".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        [
            "too large 125",
            "not sendable",
            "not sendable",
            "too large 1000"
        ]
    );
    let events = client.events();
    client.send_text("after").expect("send");
    let deadline = Instant::now() + T;
    while next_text(&events, deadline, "after the hook") != "after" {}
    let c = client.clone();
    assert!(bounded("close", T, move || c.close()).is_empty());
    drop(client);
    no_client_threads_left("session refusals");
}

/// A `Heartbeat::app` probe the client must not send (a close frame, a raw frame, a ping
/// over 125 bytes) or over the message size limit. Sent on every connection, it got
/// each one killed, forever, with a reason that pointed elsewhere (`ClosedByPeer` 1005,
/// `Reset`, a heartbeat timeout, a size error that looked like the peer's): `connect()`
/// must refuse it up front.
#[test]
fn an_app_heartbeat_probe_that_cannot_be_sent_is_invalid_config() {
    use tungstenite::protocol::frame::Frame;
    let _g = util::exclusive();
    let server = TestServer::echo();
    let url = server.url();
    let app = |probe: Message| {
        builder(&url)
            .limits(Limits::default().max_message_size(1000))
            .heartbeat(Heartbeat::app(
                Duration::from_millis(100),
                Duration::from_secs(5),
                probe,
                |m| m.to_text().is_ok_and(|t| t == "pong"),
            ))
    };
    let bad = [
        ("close probe", Message::Close(None)),
        ("raw frame probe", Message::Frame(Frame::ping(vec![1]))),
        ("126-byte ping probe", Message::Ping(vec![1; 126].into())),
        ("probe over the size limit", Message::binary(vec![0; 1001])),
    ];
    for (what, probe) in bad {
        rejected(what, || app(probe.clone()), "Heartbeat::app probe");
    }
    works(
        "125-byte ping probe",
        app(Message::Ping(vec![1; 125].into())),
    );
    works("text probe", app(Message::text("ping")));
    no_client_threads_left("app probes");
}

// ---------------------------------------------------------------------------------------
// Builder errors come back from connect(), before anything starts
// ---------------------------------------------------------------------------------------

/// Builds with `b` and checks that both `connect()` and `connect_lazy()` return the
/// error `expected` accepts, with no `wsbeat-*` thread started and no connection made to
/// `listener` (where the builder's URL points when it is valid).
fn refused_before_start(
    what: &str,
    listener: &std::net::TcpListener,
    b: impl Fn() -> ClientBuilder,
    expected: impl Fn(&Error) -> bool,
) {
    for (how, result) in [
        ("connect", b().connect().err()),
        ("connect_lazy", b().connect_lazy().err()),
    ] {
        match &result {
            Some(e) if expected(e) => {}
            other => panic!("{what}, {how}: unexpected result {other:?}"),
        }
        // Exact under util::exclusive(): there were none before, and a client that had
        // started (connect_lazy keeps retrying) would still be running now.
        assert_eq!(
            util::threads_named("wsbeat-"),
            0,
            "{what}, {how}: threads started: {:?}",
            util::thread_names()
        );
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{what}, {how}: something connected: {other:?}"),
        }
    }
}

#[test]
fn builder_errors_come_back_from_connect_and_connect_lazy_before_any_thread_starts() {
    let _g = util::exclusive();
    no_client_threads_left("before the test");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    // The exact error Request::new gives for the same URL.
    let same_as_request = |bad: &'static str| {
        let want = format!("{:?}", wsbeat::Request::new(bad).expect_err(bad));
        move |e: &Error| format!("{e:?}") == want
    };

    for bad in [
        "http://127.0.0.1:1/",
        "ws://[::1/feed",
        "ws://",
        "not a url",
        // Credentials that cannot be sent as written: not UTF-8 once decoded, or a ':'
        // in a Basic user name (they went out altered, and the server said 401).
        "ws://u%FF%FE:pw@127.0.0.1:1/",
        "ws://us%3Aer:pw@127.0.0.1:1/",
    ] {
        refused_before_start(
            bad,
            &listener,
            || builder(bad).header("X-Later", "1").reconnect(false),
            same_as_request(bad),
        );
    }

    // A URL longer than an HTTP request line may carry (65 534 bytes): every attempt
    // failed after DNS and the dial with a retried `Protocol("uri too long")` error.
    let long: &'static str =
        Box::leak(format!("ws://127.0.0.1:1/feed?token={}", "x".repeat(70_000)).into_boxed_str());
    let long_err = wsbeat::Request::new(long).expect_err("a URL too long is refused");
    assert!(
        matches!(&long_err, Error::InvalidUrl { reason } if reason.contains("too long")
            && !reason.contains("xxxx")),
        "{long_err:?}"
    );
    refused_before_start(
        "a URL too long",
        &listener,
        || builder(long).reconnect(false),
        same_as_request(long),
    );

    // The proxy URL: a scheme wsbeat does not speak, no host, not a URL. The message
    // speaks of the proxy URL only (it used to end with "expected ws://host[:port]/path",
    // the hint for the server URL, which sent the user the wrong way).
    for (proxy, hint) in [
        ("ftp://127.0.0.1:21", "proxy URL must be"),
        ("socks5://", "proxy URL"),
        ("no proxy here", "proxy URL: relative URL"),
    ] {
        refused_before_start(
            proxy,
            &listener,
            || builder(&url).proxy(proxy),
            |e| {
                matches!(e, Error::InvalidUrl { reason } if reason.contains(hint))
                    && !e.to_string().contains("ws://")
            },
        );
    }

    // Only the first error is kept: later settings neither replace nor clear it.
    refused_before_start(
        "bad URL, then a bad proxy",
        &listener,
        || builder("http://127.0.0.1:1/").proxy("ftp://127.0.0.1:21"),
        same_as_request("http://127.0.0.1:1/"),
    );
    refused_before_start(
        "bad proxy, then a good one",
        &listener,
        || {
            builder(&url)
                .proxy("ftp://127.0.0.1:21")
                .proxy("http://127.0.0.1:1")
        },
        |e| matches!(e, Error::InvalidUrl { reason } if reason.contains("proxy URL must be")),
    );

    // A header HTTP does not allow: the error names it and never shows the value.
    for (name, value) in [
        ("Bad Name", "x"),
        ("Authorization", "Bearer s3cret\nInjected: 1"),
    ] {
        refused_before_start(
            name,
            &listener,
            || builder(&url).header(name, value),
            |e| {
                matches!(e, Error::InvalidHeader { name: n, .. } if n == name)
                    && !format!("{e} {e:?}").contains("s3cret")
            },
        );
    }

    // A subprotocol that is not an HTTP token (RFC 6455 4.1): empty, with a space, a
    // comma (it would read as two) or a line break. Each used to reach the server, and
    // fail the handshake with "Server sent no subprotocol" (or split into two names).
    for bad in ["", "chat v2", "a,b", "chat\r\nX: 1"] {
        refused_before_start(
            &format!("subprotocol {bad:?}"),
            &listener,
            || builder(&url).subprotocol(bad),
            |e| {
                matches!(e, Error::InvalidHeader { name, reason }
                    if name == "Sec-WebSocket-Protocol" && reason.contains("token"))
                    && (bad.len() < 3 || !format!("{e} {e:?}").contains(bad))
            },
        );
    }

    if cfg!(any(feature = "native-tls", feature = "rustls")) {
        // A root certificate the TLS backend cannot read: Error::Tls, even for a ws://
        // URL that would never use it.
        refused_before_start(
            "bad root certificate",
            &listener,
            || {
                builder(&url).add_root_certificate(
                    b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                )
            },
            |e| matches!(e, Error::Tls { message, .. } if message.contains("certificate")),
        );
        refused_before_start(
            "bad root certificate (DER)",
            &listener,
            || builder(&url).add_root_certificate(&[0x30, 0x03, 0x02, 0x01]),
            |e| matches!(e, Error::Tls { .. }),
        );
    } else {
        let wss = url.replacen("ws://", "wss://", 1);
        refused_before_start(
            "wss:// without a TLS backend",
            &listener,
            || builder(&wss),
            |e| matches!(e, Error::NoTls),
        );
    }

    // And the same builder without the error does connect (the check above is not
    // vacuous): the listener sees the connection.
    let client = builder(&url).reconnect(false).connect_lazy().expect("lazy");
    assert!(
        util::wait_until(T, || listener.accept().is_ok()),
        "a valid builder never connected"
    );
    let c = client.clone();
    bounded("close", T, move || c.close());
    no_client_threads_left("after close");
}

/// `send_all` reads its iterator between chunks, never under the client's lock. It
/// pulled every message under the lock, so an iterator waiting on a channel kept
/// `close()` waiting (promise 1), a slow producer locked the reader and the timer out
/// until a live link was declared dead (promise 3), and an iterator that used the client
/// (here: `state()`) deadlocked it for good.
#[test]
fn send_all_reads_its_iterator_without_the_lock() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    // 1. An iterator waiting on a channel: close() ends all the same.
    let client = builder(&server.url()).connect().expect("connect");
    let (tx, rx) = crossbeam_channel::unbounded::<Message>();
    tx.send(Message::text("first")).unwrap();
    let c = client.clone();
    let sender = std::thread::spawn(move || c.send_all(rx.iter()).map_err(|f| f.len()));
    assert!(
        util::wait_until(T, || tx.is_empty()),
        "the first message was taken"
    );
    let c = client.clone();
    bounded("close() while send_all's iterator waits", T, move || {
        c.close()
    });
    drop(tx);
    bounded("send_all once its iterator ends", T, move || sender.join())
        .expect("sender")
        .expect("the first message was sent before the close");
    // 2. A slow producer: the heartbeat goes on, the link lives.
    let interval = Duration::from_millis(200);
    let client = builder(&server.url())
        .heartbeat(Heartbeat::ping(interval, Duration::from_millis(300)))
        .connect()
        .expect("connect");
    let events = client.events();
    let c = client.clone();
    let slow = (0..3).map(move |i| {
        if i == 1 {
            // The producer's pace (the scenario): longer than interval + timeout.
            std::thread::sleep(Duration::from_millis(1500));
        }
        Message::text(format!("slow {i}"))
    });
    bounded("send_all with a slow producer", T, move || c.send_all(slow)).expect("all sent");
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(ev) = events.recv_deadline(deadline) {
        assert!(!matches!(ev, Event::Disconnected { .. }), "{ev:?}");
    }
    assert_eq!(client.state(), State::Open);
    let c = client.clone();
    bounded("close", T, move || c.close());
    // 3. An iterator that uses the client.
    let client = builder(&server.url()).connect().expect("connect");
    let (c, c2) = (client.clone(), client.clone());
    let using = (0..3).map(move |i| {
        let _ = c2.state();
        Message::text(format!("m{i}"))
    });
    bounded(
        "send_all with an iterator that reads state()",
        T,
        move || c.send_all(using),
    )
    .expect("all sent");
    let c = client.clone();
    bounded("close", T, move || c.close());
}

/// `send_all` stops reading its iterator once the client is closed: a channel's
/// iterator was drained into failures for as long as the channel lived (200 000
/// messages held as failures in the probe that found it).
#[test]
fn send_all_stops_reading_its_iterator_once_the_client_is_closed() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().expect("connect");
    let (tx, rx) = crossbeam_channel::unbounded::<Message>();
    let c = client.clone();
    let sender = std::thread::spawn(move || c.send_all(rx.iter()));
    let c = client.clone();
    bounded("close()", T, move || c.close());
    // The producer goes on (until the channel has no receiver left); the closed
    // client's send_all must not take it all.
    for i in 0..10_000 {
        if tx.send(Message::text(format!("late {i}"))).is_err() {
            break;
        }
    }
    let r = bounded("send_all after close", T, move || sender.join()).expect("sender");
    let failed = r.err().unwrap_or_default();
    assert!(
        failed.len() < 10_000,
        "{} late messages taken after the close",
        failed.len()
    );
    assert!(
        failed
            .iter()
            .all(|(_, e)| matches!(e, Error::Closed { .. })),
        "{failed:?}"
    );
    drop(tx);
}

/// But what a finite batch holds is the caller's batch: on a closed client every message
/// of a `Vec` comes back (API fuzzer: 2048 of 3000, the first chunk only, before; the
/// rest was dropped silently), and in a race with `close()` each message is written,
/// handed back by `send_all`, or returned by `close()` (before: up to 17 952 of 20 000
/// lost, once with `Ok(())`).
#[test]
fn send_all_of_a_finite_batch_accounts_for_every_message_when_the_client_closes() {
    let _g = util::exclusive();
    let server = TestServer::builder().no_record().start();
    let client = builder(&server.url()).connect().expect("connect");
    let c = client.clone();
    assert!(bounded("close()", T, move || c.close()).is_empty());
    let batch: Vec<Message> = (0..3000).map(|i| Message::text(format!("m{i}"))).collect();
    let failed = client.send_all(batch).expect_err("all refused");
    let idx: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx.len(), 3000, "handed back");
    assert!(idx.iter().copied().eq(0..3000), "in order");
    assert!(failed.into_iter().all(|(i, e)| {
        matches!(e.into_message(), Some(m) if m.to_text().ok() == Some(&format!("m{i}")))
    }));
    let big = vec![Message::binary(vec![1u8; 100_000]); 3];
    let failed = client.send_all(big).expect_err("all refused");
    assert_eq!(
        failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    drop(client);

    for round in 0..10 {
        let server = TestServer::builder().no_record().start();
        let client = builder(&server.url()).connect().expect("connect");
        let c = client.clone();
        const N: usize = 20_000;
        let sender =
            std::thread::spawn(move || c.send_all((0..N).map(|i| Message::text(format!("m{i}")))));
        // Close while the batch goes out (wherever it is by then).
        while client.stats().sent == 0 && !sender.is_finished() {
            std::thread::yield_now();
        }
        let c = client.clone();
        let back = bounded("close()", T, move || c.close());
        let failed = bounded("send_all", T, move || sender.join())
            .expect("no panic")
            .err()
            .unwrap_or_default();
        let sent = client.stats().sent as usize;
        assert_eq!(
            sent + failed.len() + back.len(),
            N,
            "round {round}: {sent} written, {} handed back by send_all, {} by close()",
            failed.len(),
            back.len()
        );
    }
}

/// Once closed, `send_all` reads what the iterator says it holds once, not while it says
/// so: an iterator whose `size_hint` never reaches 0 (review: the drain ran for good,
/// keeping every message as a failure) ends after that many.
#[test]
fn send_all_on_a_closed_client_reads_a_lying_iterator_a_bounded_number_of_times() {
    /// Says it holds one more message, for ever (it gives up after 100 000, so that a
    /// client that believes it does not run the test for good).
    struct Liar(usize);
    impl Iterator for Liar {
        type Item = Message;
        fn next(&mut self) -> Option<Message> {
            self.0 += 1;
            assert!(self.0 <= 100_000, "read without end");
            Some(Message::text("x"))
        }
        fn size_hint(&self) -> (usize, Option<usize>) {
            (1, Some(1))
        }
    }
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().expect("connect");
    let c = client.clone();
    assert!(bounded("close()", T, move || c.close()).is_empty());
    let c = client.clone();
    let failed = bounded("send_all", T, move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.send_all(Liar(0))))
    })
    .expect("send_all ended without reading for good")
    .expect_err("refused");
    // One chunk (of the one message it said it had), then the one it still said it had.
    assert_eq!(failed.len(), 2, "{failed:?}");
}

/// Restarts its client from `next_delay` once (the new client shares this policy: one
/// lock), and closes the new client from there, once that one's first attempt has failed
/// and it waits for the policy.
struct RestartFromPolicy {
    client: Arc<parking_lot::Mutex<Option<wsbeat::WeakClient>>>,
    new_started: crossbeam_channel::Receiver<()>,
    new_closed: crossbeam_channel::Sender<Duration>,
    done: bool,
}
impl ReconnectPolicy for RestartFromPolicy {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        if std::mem::replace(&mut self.done, true) {
            return Some(Duration::from_millis(1));
        }
        let weak = self.client.lock().clone().expect("set before the attempt");
        let old = weak.upgrade().expect("the old client lives");
        let new = old.restart().expect("restart");
        // The new client's first attempt began; it fails at once (503) and its supervisor
        // then waits for this policy, which we hold. Not a synchronisation: without the
        // fix, the close below deadlocked only if that wait had begun.
        let _ = self.new_started.recv_timeout(T);
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let _ = new.close();
        let _ = self.new_closed.send(t0.elapsed());
        Some(Duration::from_millis(1))
    }
}

/// `restart()` from a reconnect policy, then closing the new client there: the new
/// client's supervisor waited for the policy lock, which the old one held while joining
/// it (a deadlock: both clients' `close()` hung for good).
#[test]
fn closing_a_client_restarted_from_its_policy_inside_that_policy_does_not_deadlock() {
    let _g = util::exclusive();
    let server = TestServer::start(Behavior::reject(503));
    let url = server.url();
    let calls = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = crossbeam_channel::bounded(1);
    let (closed_tx, closed_rx) = crossbeam_channel::bounded(1);
    let slot: Arc<parking_lot::Mutex<Option<wsbeat::WeakClient>>> = Default::default();
    let (c, gate) = (calls.clone(), Arc::new(Barrier::new(2)));
    let g = gate.clone();
    let client = builder(&url)
        .reconnect_policy(RestartFromPolicy {
            client: slot.clone(),
            new_started: started_rx,
            new_closed: closed_tx,
            done: false,
        })
        .request_factory(move |_| {
            // The old client's first attempt waits for the handle; the new client's
            // first attempt (the second call) is reported.
            match c.fetch_add(1, SeqCst) {
                0 => {
                    g.wait();
                }
                1 => {
                    let _ = started_tx.try_send(());
                }
                _ => {}
            }
            wsbeat::Request::new(&url)
        })
        .connect_lazy()
        .expect("lazy");
    *slot.lock() = Some(client.downgrade());
    gate.wait();
    match closed_rx.recv_timeout(T) {
        Ok(took) => assert!(took < T, "closing the new client took {took:?}"),
        Err(_) => {
            // Deadlocked: dropping the client would join a thread that never ends.
            std::mem::forget(client);
            panic!("closing the restarted client from the old client's policy never returned");
        }
    }
    let events = client.events();
    let evs = events_until_closed(&events, T);
    assert_grammar(&evs, true);
    let _ = client.close();
    no_client_threads_left("after the restart from a policy");
}

/// `send_all` with an iterator that panics: the messages it already gave for the chunk
/// being filled come back in `Undelivered` (the caller cannot tell which it gave); they
/// were dropped with the chunk.
#[test]
fn send_all_hands_back_what_a_panicking_iterator_gave() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().expect("connect");
    let events = client.events();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = client.send_all((0..100).map(|i| {
            if i == 70 {
                panic!("the caller's iterator panics");
            }
            Message::text(format!("m{i}"))
        }));
    }));
    assert!(panicked.is_err(), "the iterator's panic reaches the caller");
    let back = loop {
        match events.recv_timeout(T).expect("Undelivered") {
            Event::Undelivered(ms) => break ms,
            _ => continue,
        }
    };
    assert_eq!(
        texts(&back),
        (0..70).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    // The client goes on.
    client.send_text("after").expect("send");
    let _ = client.close();
}

/// A consumer that never reads events while the server drops every connection at once:
/// each cycle added `Connected`, `Disconnected` and `Reconnecting` to the unread stream,
/// without bound. Past `CONTROL_EVENT_CAP` unread control events, connections that carry
/// nothing for the consumer are left out (counted), so the stream keeps its grammar and
/// its size.
#[test]
fn control_events_left_unread_stay_bounded() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::DropAfterUpgrade);
    let client = builder(&server.url())
        .reconnect_policy(Fixed(Duration::ZERO))
        .connect_lazy()
        .expect("lazy");
    let events = client.events();
    let cap = wsbeat::CONTROL_EVENT_CAP;
    assert!(
        util::wait_until(Duration::from_secs(60), || client.stats().reconnects
            > cap as u64 + 500),
        "{:?}",
        client.stats()
    );
    let stats = client.stats();
    assert!(stats.events_elided > 0, "{stats:?}");
    let unread = events.receiver().len();
    assert!(unread <= cap + 3, "{unread} control events unread");
    let _ = client.close();
    let evs = events_until_closed(&events, T);
    assert_grammar(&evs, true);
}

/// Closes `client` on another thread while a callback of its own waits on the
/// supervisor, and checks that `close()` ends quickly with one `Closed`, last.
fn close_while_a_callback_waits(client: Client, entered: crossbeam_channel::Receiver<()>) {
    let events = client.events();
    entered.recv_timeout(T).expect("the callback ran");
    let (done, closed) = crossbeam_channel::bounded(1);
    let c = client.clone();
    std::thread::spawn(move || {
        let _ = c.close();
        let _ = done.send(());
    });
    closed.recv_timeout(T).expect(
        "close() ends while a callback on the supervisor waits in the client (it hung for good)",
    );
    let evs = events_until_closed(&events, T);
    assert!(matches!(evs.last(), Some(Event::Closed)), "{evs:?}");
    drop(client);
}

/// A reconnect policy that sends through the client with `OverflowPolicy::Block(MAX)`
/// while the offline queue is full: the room it waits for is made by the supervisor,
/// which is the thread running it. `close()` hung for good (probe of 2026-12-01): only the
/// supervisor sets the state the wait looked at.
#[test]
fn close_ends_a_policy_blocked_in_a_send_on_the_supervisor() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::reject(503));
    let (give, slot) = crossbeam_channel::bounded::<wsbeat::WeakClient>(1);
    let (entered, entered_rx) = crossbeam_channel::bounded(1);
    struct SendingPolicy(
        crossbeam_channel::Receiver<wsbeat::WeakClient>,
        crossbeam_channel::Sender<()>,
    );
    impl ReconnectPolicy for SendingPolicy {
        fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
            if let Some(c) = self.0.try_recv().ok().and_then(|w| w.upgrade()) {
                let _ = self.1.send(());
                // The queue holds one: the second waits for room.
                let _ = c.send_text("status: reconnecting");
                let _ = c.send_text("status: still reconnecting");
            }
            Some(Duration::from_millis(10))
        }
    }
    let client = builder(&server.url())
        .overflow(OverflowPolicy::Block(Duration::MAX))
        .limits(Limits::default().queue_messages(1))
        .reconnect_policy(SendingPolicy(slot, entered))
        .connect_lazy()
        .unwrap();
    give.send(client.downgrade()).unwrap();
    close_while_a_callback_waits(client, entered_rx);
}

/// A reconnect policy that waits on its client's own event stream (`events().recv()`):
/// `Closed` comes only once `close()` has joined the supervisor, the thread running the
/// policy, so `close()` hung for good (callback probe, 2 of 2). Such a wait now ends, as
/// if the stream had, once the client is closing.
#[test]
fn close_ends_a_policy_waiting_on_its_clients_events() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::reject(503));
    let (give, slot) = crossbeam_channel::bounded::<wsbeat::WeakClient>(1);
    let (entered, entered_rx) = crossbeam_channel::bounded(1);
    let (ended, ended_rx) = crossbeam_channel::bounded(1);
    struct WaitingPolicy(
        crossbeam_channel::Receiver<wsbeat::WeakClient>,
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Sender<String>,
    );
    impl ReconnectPolicy for WaitingPolicy {
        fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
            if let Some(events) = self
                .0
                .try_recv()
                .ok()
                .and_then(|w| w.upgrade())
                .map(|c| c.events())
            {
                let _ = self.1.send(());
                // Everything already in the stream first, then the end.
                let got: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
                let _ = self.2.send(got.join(", "));
            }
            Some(Duration::from_millis(10))
        }
    }
    let client = builder(&server.url())
        .reconnect_policy(WaitingPolicy(slot, entered, ended))
        .connect_lazy()
        .unwrap();
    give.send(client.downgrade()).unwrap();
    close_while_a_callback_waits(client, entered_rx);
    let got = ended_rx.recv_timeout(T).expect("the policy's wait ended");
    assert!(!got.contains("Closed"), "{got}");
}

/// The same from an `on_connect` hook that waits for an event of its own client.
#[test]
fn close_ends_a_hook_waiting_on_its_clients_events() {
    let _g = util::shared();
    let server = TestServer::echo();
    let (give, slot) = crossbeam_channel::bounded::<wsbeat::WeakClient>(1);
    let (entered, entered_rx) = crossbeam_channel::bounded(1);
    let client = builder(&server.url())
        .on_connect(move |_| {
            if let Some(c) = slot.recv_timeout(T).ok().and_then(|w| w.upgrade()) {
                let events = c.events();
                drop(c);
                let _ = entered.send(());
                let _ = events.recv_timeout(Duration::from_secs(3600));
            }
            Ok(())
        })
        .connect_lazy()
        .unwrap();
    give.send(client.downgrade()).unwrap();
    close_while_a_callback_waits(client, entered_rx);
}

/// An `on_connect` hook that waits for the connection it is setting up
/// (`wait_connected(MAX)`): `close()` hung for good, as above.
#[test]
fn close_ends_a_hook_waiting_for_its_own_connection() {
    let _g = util::shared();
    let server = TestServer::echo();
    let (give, slot) = crossbeam_channel::bounded::<wsbeat::WeakClient>(1);
    let (entered, entered_rx) = crossbeam_channel::bounded(1);
    let client = builder(&server.url())
        .on_connect(move |_| {
            if let Ok(c) = slot.recv_timeout(T) {
                let _ = entered.send(());
                if let Some(c) = c.upgrade() {
                    let _ = c.wait_connected(Duration::MAX);
                }
            }
            Ok(())
        })
        .connect_lazy()
        .unwrap();
    give.send(client.downgrade()).unwrap();
    close_while_a_callback_waits(client, entered_rx);
}
