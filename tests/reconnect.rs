//! Reconnection (issue 4): the supervisor rebuilds dead connections, the backoff policy
//! decides when (and whether) to try again, the request factory and the on-connect hook
//! run on every attempt, and the offline queue never loses a message silently.
//!
//! Thread/fd leak checks over thousands of cycles live in `reconnect_cycles.rs`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded};
use parking_lot::Mutex;
use support::certs::{self, ServerCert};
use support::proxy::FaultProxy;
use support::server::{Behavior, TestServer};
use support::util;
use wsbeat::{
    Attempt, Backoff, Client, ClientBuilder, ConnectStage, DisconnectReason, Error, Event, Failure,
    Heartbeat, Limits, Message, OverflowPolicy, ReconnectPolicy, Request, Session, State,
    TlsErrorKind,
};

/// Upper bound for anything that should happen "soon".
const T: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Reads a client's events and remembers them (for assertions and failure messages).
struct Watch {
    rx: wsbeat::Events,
    seen: Vec<Event>,
}

impl Watch {
    fn new(client: &Client) -> Watch {
        Watch {
            rx: client.events(),
            seen: Vec::new(),
        }
    }

    fn recent(&self) -> String {
        let skip = self.seen.len().saturating_sub(25);
        format!("{:#?}", &self.seen[skip..])
    }

    /// Waits (up to [`T`]) for the first event matching `pred`; earlier events are kept in `seen`.
    fn until(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => panic!("no {what} within {T:?}; recent events: {}", self.recent()),
            }
        }
    }

    /// Everything that arrives within `d` (used to check that something does NOT happen).
    fn during(&mut self, d: Duration) -> Vec<Event> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(e) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(e.clone());
            out.push(e);
        }
        out
    }

    /// Events up to and including `Event::Closed`.
    fn until_closed(&mut self) -> Vec<Event> {
        let start = self.seen.len();
        self.until("Closed", |e| matches!(e, Event::Closed));
        self.seen[start..].to_vec()
    }
}

fn connected(generation: u64) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Connected { generation: g, .. } if *g == generation)
}

fn disconnected(generation: u64) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Disconnected { generation: g, .. } if *g == generation)
}

fn text_message(text: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Message(Message::Text(t)) if t.as_str() == text)
}

fn text_of(m: &Message) -> String {
    match m {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

fn texts(ms: &[Message]) -> Vec<String> {
    ms.iter().map(text_of).collect()
}

/// Fast exponential backoff for tests (20 ms .. 100 ms, full jitter).
fn fast_backoff() -> Backoff {
    Backoff::default()
        .initial(Duration::from_millis(20))
        .max(Duration::from_millis(100))
}

/// A client builder with test-friendly timings.
fn builder(url: &str) -> ClientBuilder {
    Client::builder(url)
        .heartbeat(Heartbeat::ping(
            Duration::from_millis(500),
            Duration::from_millis(500),
        ))
        .connect_timeout(Duration::from_secs(5))
        .close_timeout(Duration::from_secs(2))
        .reconnect_policy(fast_backoff())
}

/// A `ws://` URL on which nothing listens (connections are refused).
fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("ws://{addr}/")
}

/// Always the same delay; a connection is "stable" at once.
struct Fixed(Duration);

impl ReconnectPolicy for Fixed {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        Some(self.0)
    }
    fn min_uptime(&self) -> Duration {
        Duration::ZERO
    }
}

/// What a policy was told, and what it answered.
#[derive(Debug, Clone)]
struct Seen {
    attempt: u32,
    error: Option<Error>,
    reason: Option<DisconnectReason>,
    delay: Option<Duration>,
}

/// Wraps a policy and records every decision.
struct Recording<P> {
    inner: P,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl<P: ReconnectPolicy> ReconnectPolicy for Recording<P> {
    fn next_delay(&mut self, f: &Failure<'_>) -> Option<Duration> {
        let delay = self.inner.next_delay(f);
        self.log.lock().push(Seen {
            attempt: f.attempt,
            error: f.error.cloned(),
            reason: f.reason.cloned(),
            delay,
        });
        delay
    }
    fn min_uptime(&self) -> Duration {
        self.inner.min_uptime()
    }
}

fn recording<P: ReconnectPolicy>(inner: P) -> (Recording<P>, Arc<Mutex<Vec<Seen>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    (
        Recording {
            inner,
            log: log.clone(),
        },
        log,
    )
}

/// In an on-connect hook: sends `text` and waits for the echo server's answer.
fn round_trip(s: &mut Session<'_>, text: &str) -> wsbeat::Result<()> {
    s.send(Message::text(text.to_string()))?;
    match s.read(T)? {
        Message::Text(t) if t.as_str() == text => Ok(()),
        other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
    }
}

fn gave_up_with(e: &Event) -> Option<&Error> {
    match e {
        Event::GaveUp(Error::GaveUp { last, .. }) => Some(last),
        Event::GaveUp(other) => panic!("GaveUp must carry Error::GaveUp, got {other:?}"),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Server restarts, blackholes, storms
// ---------------------------------------------------------------------------------------

#[test]
fn server_restart_on_the_same_port_is_survived() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().unwrap();
    let mut ev = Watch::new(&client);
    ev.until("Connected 1", connected(1));
    client.send_text("before").unwrap();
    ev.until("echo of before", text_message("before"));

    server.stop();
    let e = ev.until("Disconnected 1", disconnected(1));
    assert!(
        matches!(
            e,
            Event::Disconnected {
                reason: DisconnectReason::Reset,
                ..
            }
        ),
        "{e:?}"
    );
    // The port refuses now: attempts fail with Refused and are retried.
    ev.until("a refused attempt", |e| {
        matches!(
            e,
            Event::Reconnecting {
                last_error: Some(Error::Refused { .. }),
                ..
            }
        )
    });
    assert!(matches!(client.state(), State::Backoff | State::Connecting));

    server.restart();
    ev.until("Connected 2", connected(2));
    client.send_text("after").unwrap();
    ev.until("echo of after", text_message("after"));
    let stats = client.stats();
    assert_eq!((stats.generation, stats.reconnects), (2, 1));
    assert_eq!(server.upgraded(), 2);
    let _ = client.close();
}

#[test]
fn blackholed_link_is_detected_by_heartbeat_and_recovers_after_resume() {
    let _g = util::shared();
    let server = TestServer::echo();
    let proxy = FaultProxy::start(server.addr());
    let client = builder(&proxy.url())
        .heartbeat(Heartbeat::ping(
            Duration::from_millis(200),
            Duration::from_millis(300),
        ))
        .connect_timeout(Duration::from_millis(400))
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    client.send_text("before").unwrap();
    ev.until("echo of before", text_message("before"));

    proxy.blackhole();
    let e = ev.until("Disconnected 1", disconnected(1));
    assert!(
        matches!(
            e,
            Event::Disconnected {
                reason: DisconnectReason::HeartbeatTimeout { .. },
                ..
            }
        ),
        "{e:?}"
    );
    // While the proxy swallows everything, attempts time out in the upgrade and are retried.
    ev.until("an attempt that timed out", |e| {
        matches!(
            e,
            Event::Reconnecting {
                last_error: Some(Error::Timeout {
                    stage: ConnectStage::Upgrade,
                    ..
                }),
                ..
            }
        )
    });
    assert_ne!(client.state(), State::Open);

    proxy.resume();
    ev.until("Connected 2", connected(2));
    client.send_text("after").unwrap();
    ev.until("echo of after", text_message("after"));
    let _ = client.close();
}

#[test]
fn server_that_accepts_then_kicks_cannot_cause_a_reconnect_storm() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::close_after_upgrade(1000, "go away"));
    let policy = Backoff::default()
        .initial(Duration::from_millis(20))
        .factor(2.0)
        .max(Duration::from_millis(320))
        .min_uptime(Duration::from_secs(30));
    let client = builder(&server.url())
        .reconnect_policy(policy.clone())
        .connect_lazy()
        .unwrap();
    let mut ev = Watch::new(&client);
    let mut attempts = Vec::new();
    while attempts.len() < 8 {
        let e = ev.until("Reconnecting", |e| matches!(e, Event::Reconnecting { .. }));
        let Event::Reconnecting { attempt, delay, .. } = e else {
            unreachable!()
        };
        assert!(delay <= policy.ceiling(attempt), "{delay:?} for {attempt}");
        attempts.push(attempt);
    }
    // Every connection opened (and was kicked at once), yet the failure count kept
    // growing: a connection shorter than min_uptime does not reset the backoff.
    assert_eq!(attempts, (1..=8).collect::<Vec<u32>>());
    let opened = ev
        .seen
        .iter()
        .filter(|e| matches!(e, Event::Connected { .. }))
        .count();
    assert!(opened >= 7, "only {opened} connections opened");
    assert_eq!(policy.ceiling(8), Duration::from_millis(320));
    let _ = client.close();
}

#[test]
fn a_connection_that_outlives_min_uptime_resets_the_backoff() {
    let _g = util::shared();
    let server = TestServer::echo();
    let min_uptime = Duration::from_millis(200);
    let client = builder(&server.url())
        .reconnect_policy(fast_backoff().min_uptime(min_uptime))
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    server.stop();
    ev.until("Reconnecting 1", |e| {
        matches!(e, Event::Reconnecting { attempt: 1, .. })
    });
    ev.until("Reconnecting 3", |e| {
        matches!(e, Event::Reconnecting { attempt: 3, .. })
    });
    server.restart();
    ev.until("Connected 2", connected(2));
    // The scenario needs a connection that stays up longer than min_uptime.
    std::thread::sleep(min_uptime + Duration::from_millis(100));
    server.disconnect_all();
    ev.until("Disconnected 2", disconnected(2));
    let e = ev.until("Reconnecting", |e| matches!(e, Event::Reconnecting { .. }));
    assert!(
        matches!(e, Event::Reconnecting { attempt: 1, .. }),
        "a stable connection must reset the failure count: {e:?}"
    );
    let _ = client.close();
}

#[test]
fn a_stable_connection_resets_the_backoff_even_when_replaced_on_request() {
    let _g = util::shared();
    let server = TestServer::echo();
    let min_uptime = Duration::from_millis(200);
    let client = builder(&server.url())
        .reconnect_policy(fast_backoff().min_uptime(min_uptime))
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    server.stop();
    ev.until("Reconnecting 3", |e| {
        matches!(e, Event::Reconnecting { attempt: 3, .. })
    });
    server.restart();
    ev.until("Connected 2", connected(2));
    // The scenario needs a connection that stays up longer than min_uptime.
    std::thread::sleep(min_uptime + Duration::from_millis(100));
    client.reconnect_now();
    ev.until("Connected 3", connected(3));
    // Connection 3 dies at once: the failure count starts over, because connection 2
    // was stable, however it ended.
    server.disconnect_all();
    let e = ev.until("Reconnecting", |e| matches!(e, Event::Reconnecting { .. }));
    assert!(matches!(e, Event::Reconnecting { attempt: 1, .. }), "{e:?}");
    let _ = client.close();
}

// ---------------------------------------------------------------------------------------
// Error classification
// ---------------------------------------------------------------------------------------

#[test]
fn default_policy_classifies_errors_as_fatal_or_retryable() {
    let _g = util::shared();
    let http = |status, retry_after| Error::Http {
        status,
        retry_after,
        body: None,
    };
    let fatal = [
        http(400, None),
        http(401, None),
        http(403, None),
        http(404, None),
        Error::Tls {
            kind: TlsErrorKind::Certificate,
            message: "certificate verify failed".into(),
        },
    ];
    let retryable = [
        Error::Dns {
            host: "example.invalid".into(),
            message: "no such host".into(),
        },
        Error::Refused {
            addr: "127.0.0.1:9".into(),
        },
        Error::Timeout {
            stage: ConnectStage::Tcp,
            elapsed: Duration::from_secs(10),
        },
        Error::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))),
        Error::ConnectionLost(DisconnectReason::Reset),
        Error::Tls {
            kind: TlsErrorKind::Other,
            message: "handshake interrupted".into(),
        },
        http(500, None),
        http(502, None),
        http(503, None),
        http(429, None),
    ];
    fn failure(e: &Error) -> Failure<'_> {
        Failure {
            attempt: 1,
            error: Some(e),
            reason: None,
            elapsed: Duration::ZERO,
        }
    }
    for e in &fatal {
        assert!(e.is_fatal(), "{e}");
        let mut p = Backoff::default();
        assert_eq!(p.next_delay(&failure(e)), None, "{e} must give up");
        // Overridable.
        let mut p = Backoff::default().retry_fatal(true);
        assert!(p.next_delay(&failure(e)).is_some(), "{e} with retry_fatal");
    }
    for e in &retryable {
        assert!(!e.is_fatal(), "{e}");
        let mut p = Backoff::default();
        assert!(p.next_delay(&failure(e)).is_some(), "{e} must be retried");
    }
    // Retry-After on 429 and 503 is a floor for the delay.
    for status in [429, 503] {
        let e = http(status, Some(Duration::from_secs(7)));
        for _ in 0..20 {
            let d = Backoff::default().next_delay(&failure(&e)).unwrap();
            assert!(d >= Duration::from_secs(7), "{status}: {d:?}");
        }
    }
}

#[test]
fn client_errors_on_upgrade_are_fatal_and_never_retried() {
    let _g = util::shared();
    // Eager connect reports the rejection directly.
    let server = TestServer::start(Behavior::reject(401));
    match builder(&server.url()).connect() {
        Err(Error::Http { status: 401, .. }) => {}
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    // In the background, each of them ends in GaveUp after exactly one attempt.
    let cases: Vec<_> = [400u16, 401, 403, 404]
        .into_iter()
        .map(|status| {
            let server = TestServer::start(Behavior::reject(status));
            let client = builder(&server.url()).connect_lazy().unwrap();
            (status, server, client)
        })
        .collect();
    for (status, server, client) in &cases {
        let mut ev = Watch::new(client);
        let e = ev.until("GaveUp", |e| matches!(e, Event::GaveUp(_)));
        match gave_up_with(&e) {
            Some(Error::Http { status: s, .. }) if s == status => {}
            other => panic!("{status}: GaveUp with {other:?}"),
        }
        assert!(
            !ev.seen
                .iter()
                .any(|e| matches!(e, Event::Reconnecting { .. })),
            "{status} was retried: {:?}",
            ev.seen
        );
        ev.until_closed();
        assert_eq!(client.state(), State::Closed);
        assert!(matches!(
            client.wait_connected(Duration::from_millis(10)),
            Err(Error::Closed { .. })
        ));
        assert_eq!(server.handshakes().len(), 1, "{status} was retried");
    }
    let quiet = Instant::now() + QUIET;
    while Instant::now() < quiet {
        for (status, server, _) in &cases {
            assert_eq!(server.handshakes().len(), 1, "{status} was retried");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn token_rejected_with_401_on_reconnect_gives_up_and_hands_back_the_queue() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().unwrap();
    let mut ev = Watch::new(&client);
    server.set_behavior(Behavior::reject(401));
    server.disconnect_all();
    ev.until("Disconnected 1", disconnected(1));
    let queued: Vec<String> = (0..5).map(|i| format!("q{i}")).collect();
    let mut refused = Vec::new();
    for q in &queued {
        if let Err(e) = client.send_text(q.clone()) {
            refused.push(text_of(&e.into_message().expect("handed back")));
        }
    }
    let e = ev.until("GaveUp", |e| matches!(e, Event::GaveUp(_)));
    assert!(
        matches!(gave_up_with(&e), Some(Error::Http { status: 401, .. })),
        "{e:?}"
    );
    let rest = ev.until_closed();
    let undelivered: Vec<String> = rest
        .iter()
        .filter_map(|e| match e {
            Event::Undelivered(ms) => Some(texts(ms)),
            _ => None,
        })
        .flatten()
        .collect();
    let mut handed_back = undelivered;
    handed_back.extend(refused);
    assert_eq!(handed_back, queued);
    assert_eq!(server.handshakes().len(), 2);
    assert!(client.close().is_empty());
}

#[test]
fn http_503_with_retry_after_is_retried_after_that_delay() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().unwrap();
    let mut ev = Watch::new(&client);
    server.set_behavior(Behavior::reject_with(503, &[("Retry-After", "1")]));
    let t0 = Instant::now();
    server.disconnect_all();
    let e = ev.until("a 503 attempt", |e| {
        matches!(
            e,
            Event::Reconnecting {
                last_error: Some(Error::Http { status: 503, .. }),
                ..
            }
        )
    });
    let Event::Reconnecting {
        delay, last_error, ..
    } = e
    else {
        unreachable!()
    };
    assert!(
        matches!(
            last_error,
            Some(Error::Http {
                retry_after: Some(ra),
                ..
            }) if ra == Duration::from_secs(1)
        ),
        "{last_error:?}"
    );
    assert!(delay >= Duration::from_secs(1), "{delay:?}");
    let rejected = server.handshakes().len();
    server.set_behavior(Behavior::Echo);
    ev.until("Connected 2", connected(2));
    // Without Retry-After the fast backoff would have retried within 100 ms.
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(
        server.handshakes().len(),
        rejected + 1,
        "no attempt while waiting"
    );
    let _ = client.close();
}

#[test]
fn transient_failures_are_retried() {
    let _g = util::shared();
    let refused = refused_url();
    let hang = TestServer::start(Behavior::Hang);
    let reset = TestServer::start(Behavior::ResetAfterUpgrade);
    let e500 = TestServer::start(Behavior::reject(500));
    let e502 = TestServer::start(Behavior::reject(502));
    let e503 = TestServer::start(Behavior::reject(503));
    let lazy = |url: &str| {
        builder(url)
            .connect_timeout(Duration::from_millis(200))
            .connect_lazy()
            .unwrap()
    };
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, Client, Check)> = vec![
        ("refused", lazy(&refused), |e| {
            matches!(e, Error::Refused { .. })
        }),
        ("timeout", lazy(&hang.url()), |e| {
            matches!(e, Error::Timeout { .. })
        }),
        ("reset", lazy(&reset.url()), |e| {
            // The RST can beat the 101 response to the client.
            matches!(
                e,
                Error::ConnectionLost(DisconnectReason::Reset) | Error::Io(_)
            )
        }),
        ("500", lazy(&e500.url()), |e| {
            matches!(e, Error::Http { status: 500, .. })
        }),
        ("502", lazy(&e502.url()), |e| {
            matches!(e, Error::Http { status: 502, .. })
        }),
        ("503", lazy(&e503.url()), |e| {
            matches!(e, Error::Http { status: 503, .. })
        }),
    ];
    for (name, client, check) in &cases {
        let mut ev = Watch::new(client);
        for attempt in 1..=2u32 {
            let e = ev.until("Reconnecting", |e| matches!(e, Event::Reconnecting { .. }));
            match e {
                Event::Reconnecting {
                    attempt: a,
                    last_error: Some(err),
                    ..
                } if a == attempt && check(&err) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(!ev.seen.iter().any(|e| matches!(e, Event::GaveUp(_))));
    }
    for s in [&hang, &reset, &e500, &e502, &e503] {
        assert!(s.accepted() >= 2);
    }
}

#[test]
#[cfg_attr(
    windows,
    ignore = "Wine 8's crypt32 cannot import the test server's PKCS#8 key (native-tls/schannel identity)"
)]
fn certificate_errors_are_fatal_by_default() {
    let _g = util::shared();
    let server = TestServer::builder().tls(ServerCert::UnknownCa).start();
    let client = builder(&server.wss_url())
        .add_root_certificate(certs::CA_PEM)
        .connect_lazy()
        .unwrap();
    let mut ev = Watch::new(&client);
    let e = ev.until("GaveUp", |e| matches!(e, Event::GaveUp(_)));
    assert!(
        matches!(
            gave_up_with(&e),
            Some(Error::Tls {
                kind: TlsErrorKind::Certificate,
                ..
            })
        ),
        "{e:?}"
    );
    ev.until_closed();
    assert!(!util::wait_until(QUIET, || server.accepted() > 1));
}

#[test]
fn fatal_errors_are_retried_when_the_policy_says_so() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::reject(401));
    let client = builder(&server.url())
        .reconnect_policy(fast_backoff().retry_fatal(true))
        .connect_lazy()
        .unwrap();
    let mut ev = Watch::new(&client);
    ev.until("second 401", |e| {
        matches!(
            e,
            Event::Reconnecting {
                attempt: 2,
                last_error: Some(Error::Http { status: 401, .. }),
                ..
            }
        )
    });
    server.set_behavior(Behavior::Echo);
    client.wait_connected(T).unwrap();
    assert!(server.handshakes().len() >= 3);
    let _ = client.close();
}

#[test]
fn close_codes_1012_and_1013_reach_the_policy_and_wait_as_configured() {
    let _g = util::shared();
    let server = TestServer::echo();
    let try_later = Duration::from_millis(800);
    let restart_wait = (Duration::from_millis(300), Duration::from_millis(700));
    let (policy, log) = recording(
        Backoff::default()
            .initial(Duration::from_millis(10))
            .max(Duration::from_secs(5))
            .min_uptime(Duration::ZERO)
            .try_later(try_later)
            .service_restart(restart_wait.0, restart_wait.1),
    );
    let client = builder(&server.url())
        .reconnect_policy(policy)
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);

    // 1012: service restart. Reconnect after a random delay in `service_restart`.
    server.close_all(1012, "restart");
    let e = ev.until("Disconnected 1", disconnected(1));
    let restart = DisconnectReason::ClosedByPeer {
        code: 1012,
        reason: "restart".into(),
    };
    assert!(
        matches!(&e, Event::Disconnected { reason, .. } if *reason == restart),
        "{e:?}"
    );
    let e = ev.until("Reconnecting after 1012", |e| {
        matches!(e, Event::Reconnecting { .. })
    });
    assert!(
        matches!(e, Event::Reconnecting { delay, .. } if delay >= restart_wait.0 && delay <= restart_wait.1),
        "{e:?}"
    );
    ev.until("Connected 2", connected(2));
    {
        let log = log.lock();
        let seen = log.last().expect("the policy was asked");
        assert_eq!(seen.reason.as_ref(), Some(&restart));
        assert!(
            matches!(&seen.error, Some(Error::ConnectionLost(r)) if *r == restart),
            "{seen:?}"
        );
    }

    // 1013: try again later. Wait at least `try_later`.
    let t0 = Instant::now();
    server.close_all(1013, "overloaded");
    let e = ev.until("Reconnecting after 1013", |e| {
        matches!(e, Event::Reconnecting { .. })
    });
    assert!(
        matches!(e, Event::Reconnecting { delay, .. } if delay >= try_later),
        "{e:?}"
    );
    ev.until("Connected 3", connected(3));
    assert!(t0.elapsed() >= try_later, "{:?}", t0.elapsed());
    let log = log.lock();
    let seen = log.last().unwrap();
    assert_eq!(
        seen.reason,
        Some(DisconnectReason::ClosedByPeer {
            code: 1013,
            reason: "overloaded".into()
        })
    );
    assert!(seen.delay.unwrap() >= try_later);
    assert_eq!(seen.attempt, 1, "min_uptime 0: every connection was stable");
    drop(log);
    let _ = client.close();
}

// ---------------------------------------------------------------------------------------
// Limits: max attempts, max total time
// ---------------------------------------------------------------------------------------

#[test]
fn giving_up_after_max_attempts_hands_back_every_unsent_message() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url())
        .reconnect_policy(
            Backoff::default()
                .initial(Duration::from_millis(50))
                .max(Duration::from_millis(100))
                .max_attempts(Some(3)),
        )
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    server.stop();
    ev.until("Disconnected 1", disconnected(1));
    let sent: Vec<String> = (0..50).map(|i| format!("m{i:02}")).collect();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for m in &sent {
        match client.send_text(m.clone()) {
            Ok(()) => accepted.push(m.clone()),
            Err(e) => refused.push(text_of(&e.into_message().expect("handed back"))),
        }
    }
    let e = ev.until("GaveUp", |e| matches!(e, Event::GaveUp(_)));
    assert!(
        matches!(
            &e,
            Event::GaveUp(Error::GaveUp { last, .. }) if matches!(**last, Error::Refused { .. })
        ),
        "{e:?}"
    );
    let attempts: Vec<u32> = ev
        .seen
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let rest = ev.until_closed();
    let undelivered: Vec<String> = rest
        .iter()
        .filter_map(|e| match e {
            Event::Undelivered(ms) => Some(texts(ms)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(undelivered, accepted, "in order, all of them");
    let mut all = accepted;
    all.extend(refused);
    assert_eq!(all, sent);
    assert_eq!(client.state(), State::Closed);
    match client.send_text("late") {
        Err(Error::Closed { message: Some(m) }) => assert_eq!(text_of(&m), "late"),
        other => panic!("{other:?}"),
    }
    assert!(client.close().is_empty());
}

#[test]
fn max_total_time_bounds_the_retrying() {
    let _g = util::shared();
    let limit = Duration::from_millis(700);
    let t0 = Instant::now();
    let client = builder(&refused_url())
        .reconnect_policy(
            Backoff::default()
                .initial(Duration::from_millis(30))
                .max(Duration::from_millis(60))
                .max_elapsed(Some(limit)),
        )
        .connect_lazy()
        .unwrap();
    let mut ev = Watch::new(&client);
    ev.until("GaveUp", |e| matches!(e, Event::GaveUp(_)));
    assert!(t0.elapsed() >= limit, "gave up after {:?}", t0.elapsed());
    let retries = ev
        .seen
        .iter()
        .filter(|e| matches!(e, Event::Reconnecting { .. }))
        .count();
    assert!(retries >= 3, "{retries} retries");
    ev.until_closed();
}

// ---------------------------------------------------------------------------------------
// reconnect_now
// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_reconnect_now_calls_collapse_into_one_new_connection() {
    let _g = util::shared();
    let server = TestServer::echo();
    // The hook of every new connection waits until the test lets it go, so the rebuild is
    // still in progress while all callers return.
    let (entered_tx, entered_rx) = unbounded::<u64>();
    let (release_tx, release_rx) = unbounded::<()>();
    let client = builder(&server.url())
        .on_connect(move |s| {
            if s.generation() > 1 {
                entered_tx.send(s.generation()).unwrap();
                release_rx
                    .recv_timeout(T)
                    .map_err(|_| Error::Protocol("not released".into()))?;
            }
            Ok(())
        })
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    let rounds = 5u64;
    for round in 1..=rounds {
        let barrier = Arc::new(Barrier::new(8));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (c, b) = (client.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    c.reconnect_now();
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(entered_rx.recv_timeout(T), Ok(round + 1));
        release_tx.send(()).unwrap();
        ev.until("the new connection", connected(round + 1));
    }
    let late = ev.during(QUIET);
    assert!(
        !late
            .iter()
            .any(|e| matches!(e, Event::Connected { .. } | Event::Disconnected { .. })),
        "extra reconnects: {late:?}"
    );
    assert!(entered_rx.try_recv().is_err(), "an extra attempt started");
    assert_eq!(client.stats().generation, rounds + 1);
    util::wait_until(T, || server.upgraded() as u64 > rounds);
    assert_eq!(server.upgraded() as u64, rounds + 1);
    let reasons: Vec<_> = ev
        .seen
        .iter()
        .filter_map(|e| match e {
            Event::Disconnected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        vec![DisconnectReason::ReconnectRequested; rounds as usize]
    );
    drop(release_tx);
    let _ = client.close();
}

#[test]
fn concurrent_reconnect_now_during_backoff_makes_one_attempt() {
    let _g = util::shared();
    let url = refused_url();
    let (entered_tx, entered_rx) = unbounded::<u64>();
    let (release_tx, release_rx) = unbounded::<()>();
    let u = url.clone();
    let client = builder(&url)
        .reconnect_policy(Fixed(Duration::from_secs(30)))
        .request_factory(move |a: &Attempt<'_>| {
            if a.number > 1 {
                entered_tx.send(a.number).unwrap();
                let _ = release_rx.recv_timeout(T);
            }
            Request::new(&u)
        })
        .connect_lazy()
        .unwrap();
    let mut ev = Watch::new(&client);
    ev.until("Reconnecting 1", |e| {
        matches!(e, Event::Reconnecting { attempt: 1, .. })
    });
    let barrier = Arc::new(Barrier::new(8));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (c, b) = (client.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                c.reconnect_now();
            })
        })
        .collect();
    for c in callers {
        c.join().unwrap();
    }
    assert_eq!(entered_rx.recv_timeout(T), Ok(2));
    release_tx.send(()).unwrap();
    ev.until("Reconnecting 2", |e| {
        matches!(e, Event::Reconnecting { attempt: 2, .. })
    });
    let late = ev.during(QUIET);
    assert!(late.is_empty(), "extra attempts: {late:?}");
    assert!(entered_rx.try_recv().is_err(), "an extra attempt started");
    assert_eq!(client.state(), State::Backoff);
    drop(release_tx);
    let _ = client.close();
}

#[test]
fn reconnect_now_from_the_event_loop_skips_a_long_backoff() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_secs(30)))
        .connect()
        .unwrap();
    server.stop();
    let mut skipped_at = None;
    for event in client.events() {
        match event {
            Event::Reconnecting { delay, .. } if skipped_at.is_none() => {
                assert_eq!(delay, Duration::from_secs(30));
                server.restart();
                skipped_at = Some(Instant::now());
                client.reconnect_now(); // from inside the event loop
            }
            Event::Connected { generation: 2, .. } => break,
            Event::Closed => panic!("closed"),
            _ => {}
        }
    }
    let took = skipped_at.expect("Reconnecting seen").elapsed();
    assert!(took < T, "the 30 s wait was not skipped: {took:?}");
    let _ = client.close();
}

/// A `reconnect_now()` made while the policy decides (a consumer reacting to
/// `Disconnected` at once, or the policy itself) skips the delay the policy then gives.
/// Before, the request was taken for one served by the attempt that had just failed:
/// dropped, and the client slept the whole delay (callback probe: 10 of 10 calls made in
/// reaction to `Disconnected` were dropped with a policy taking 20 ms).
#[test]
fn reconnect_now_made_while_the_policy_decides_skips_its_delay() {
    let _g = util::shared();
    struct Slow {
        entered: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }
    impl ReconnectPolicy for Slow {
        fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(T);
            Some(Duration::from_secs(3600))
        }
    }
    let server = TestServer::echo();
    let (entered, entered_rx) = bounded(4);
    let (release_tx, release) = bounded(4);
    let client = builder(&server.url())
        .reconnect_policy(Slow { entered, release })
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    server.disconnect_all();
    entered_rx.recv_timeout(T).expect("the policy runs");
    client.reconnect_now();
    release_tx.send(()).unwrap();
    ev.until("Connected 2, without the hour's wait", connected(2));
    let _ = client.close();
}

#[test]
fn reconnect_now_drops_an_open_connection_even_without_auto_reconnect() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).reconnect(false).connect().unwrap();
    let mut ev = Watch::new(&client);
    client.reconnect_now();
    let e = ev.until("Disconnected 1", disconnected(1));
    assert!(
        matches!(
            e,
            Event::Disconnected {
                reason: DisconnectReason::ReconnectRequested,
                ..
            }
        ),
        "{e:?}"
    );
    ev.until("Connected 2", connected(2));
    client.send_text("still here").unwrap();
    ev.until("echo", text_message("still here"));
    let _ = client.close();
}

#[test]
fn events_of_an_old_connection_never_follow_the_new_connected() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::Flood {
        count: 200_000,
        size: 32,
    });
    let client = builder(&server.url()).connect().unwrap();
    let mut ev = Watch::new(&client);
    let mut flood_seen = 0;
    while flood_seen < 50 {
        ev.until("flood", |e| matches!(e, Event::Message(_)));
        flood_seen += 1;
    }
    server.set_behavior(Behavior::Echo);
    client.reconnect_now();
    ev.until("Connected 2", connected(2));
    let before: Vec<_> = ev.seen.clone();
    let d = before
        .iter()
        .position(disconnected(1))
        .expect("Disconnected 1");
    let c = before.iter().position(connected(2)).unwrap();
    assert!(d < c, "Disconnected 1 must precede Connected 2");
    client.send_text("marker").unwrap();
    let start = ev.seen.len();
    ev.until("echo of marker", text_message("marker"));
    for e in &ev.seen[start..] {
        assert!(
            !matches!(e, Event::Message(_)) || text_message("marker")(e),
            "an event of connection 1 after Connected 2: {e:?}"
        );
    }
    let _ = client.close();
}

// ---------------------------------------------------------------------------------------
// Request factory and on-connect hook
// ---------------------------------------------------------------------------------------

#[test]
fn request_factory_builds_fresh_headers_for_every_attempt() {
    let _g = util::shared();
    let server = TestServer::echo();
    let url = server.url();
    let seen = Arc::new(Mutex::new(Vec::<(u64, Option<Error>)>::new()));
    let log = seen.clone();
    let client = builder("ws://127.0.0.1:9/unused")
        .request_factory(move |a: &Attempt<'_>| {
            log.lock().push((a.number, a.last_error.cloned()));
            Ok(Request::new(&url)?
                .header("Authorization", format!("Bearer token-{}", a.number))
                .header("X-Attempt", a.number.to_string()))
        })
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    for g in 2..=3 {
        server.disconnect_all();
        ev.until("reconnected", connected(g));
    }
    let tokens: Vec<String> = server
        .handshakes()
        .iter()
        .map(|h| h.header("authorization").unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        tokens,
        ["Bearer token-1", "Bearer token-2", "Bearer token-3"]
    );
    let attempts: Vec<String> = server
        .handshakes()
        .iter()
        .map(|h| h.header("x-attempt").unwrap_or_default().to_string())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    let seen = seen.lock();
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "{seen:?}"
    );
    assert!(seen[0].1.is_none());
    for s in &seen[1..] {
        assert!(
            matches!(s.1, Some(Error::ConnectionLost(DisconnectReason::Reset))),
            "{s:?}"
        );
    }
    drop(seen);
    let _ = client.close();
}

#[test]
fn request_factory_fails_over_when_the_first_url_refuses() {
    let _g = util::shared();
    let server = TestServer::echo();
    let urls = [refused_url(), server.url()];
    let seen = Arc::new(Mutex::new(Vec::<(u64, Option<Error>)>::new()));
    let log = seen.clone();
    let list = urls.clone();
    let client = builder(&urls[0])
        .request_factory(move |a: &Attempt<'_>| {
            log.lock().push((a.number, a.last_error.cloned()));
            Request::new(&list[((a.number - 1) % 2) as usize])
        })
        .connect_lazy()
        .unwrap();
    client.wait_connected(T).unwrap();
    let mut ev = Watch::new(&client);
    let first = ev.until("Reconnecting", |e| matches!(e, Event::Reconnecting { .. }));
    assert!(
        matches!(
            first,
            Event::Reconnecting {
                attempt: 1,
                last_error: Some(Error::Refused { .. }),
                ..
            }
        ),
        "{first:?}"
    );
    ev.until("Connected 1", connected(1));
    let seen = seen.lock();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(matches!(seen[1].1, Some(Error::Refused { .. })));
    assert_eq!(server.handshakes().len(), 1);
    drop(seen);
    client.send_text("via backup").unwrap();
    ev.until("echo", text_message("via backup"));
    let _ = client.close();
}

#[test]
fn on_connect_runs_before_queued_messages_are_flushed() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url())
        .on_connect(|s| {
            let hello = format!("hello-{}", s.generation());
            // Wait for the server's answer, like an auth handshake would.
            round_trip(s, &hello)
        })
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    client.send_text("live").unwrap();
    ev.until("echo", text_message("live"));
    server.stop();
    ev.until("Disconnected 1", disconnected(1));
    let queued: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    for q in &queued {
        client.send_text(q.clone()).unwrap();
    }
    assert_eq!(client.stats().queued, 10);
    server.restart();
    ev.until("Connected 2", connected(2));
    assert!(server.wait_received(1 + 1 + 1 + queued.len(), T));
    let received = server.received();
    let first: Vec<String> = received
        .iter()
        .filter(|r| r.conn == received[0].conn)
        .map(|r| text_of(&r.msg))
        .collect();
    assert_eq!(first, ["hello-1", "live"]);
    let second_conn = received.last().unwrap().conn;
    let second: Vec<String> = received
        .iter()
        .filter(|r| r.conn == second_conn)
        .map(|r| text_of(&r.msg))
        .collect();
    let mut expected = vec!["hello-2".to_string()];
    expected.extend(queued);
    assert_eq!(second, expected);
    let _ = client.close();
}

#[test]
fn failing_on_connect_fails_the_attempt_and_is_retried() {
    let _g = util::shared();
    let server = TestServer::echo();
    let calls = Arc::new(AtomicU32::new(0));
    let n = calls.clone();
    let client = builder(&server.url())
        .on_connect(move |s| {
            let call = n.fetch_add(1, Ordering::SeqCst) + 1;
            round_trip(s, &format!("auth-{call}"))?;
            if call == 2 {
                return Err(Error::Protocol("auth rejected".into()));
            }
            Ok(())
        })
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    server.stop();
    ev.until("Disconnected 1", disconnected(1));
    for i in 0..5 {
        client.send_text(format!("q{i}")).unwrap();
    }
    server.restart();
    let e = ev.until("the hook's failure", |e| {
        matches!(
            e,
            Event::Reconnecting {
                last_error: Some(Error::Protocol(_)),
                ..
            }
        )
    });
    assert!(
        matches!(&e, Event::Reconnecting { last_error: Some(Error::Protocol(m)), .. } if m == "auth rejected"),
        "{e:?}"
    );
    // The failed attempt did not count as a connection.
    ev.until("Connected 2", connected(2));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(server.wait_received(1 + 1 + 1 + 5, T));
    let mut by_conn: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for r in server.received() {
        by_conn.entry(r.conn).or_default().push(text_of(&r.msg));
    }
    let convs: Vec<Vec<String>> = by_conn.into_values().collect();
    assert_eq!(
        convs,
        vec![
            vec!["auth-1".to_string()],
            vec!["auth-2".to_string()],
            ["auth-3", "q0", "q1", "q2", "q3", "q4"]
                .map(String::from)
                .to_vec(),
        ]
    );
    let _ = client.close();
}

// ---------------------------------------------------------------------------------------
// State, wait_connected, offline queue
// ---------------------------------------------------------------------------------------

#[test]
fn state_and_wait_connected_follow_the_connection() {
    let _g = util::shared();
    let server = TestServer::echo();
    server.stop();
    let client = builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_millis(100)))
        .close_timeout(Duration::from_secs(1))
        .connect_lazy()
        .unwrap();
    assert!(matches!(client.state(), State::Connecting | State::Backoff));
    let wait = Duration::from_millis(300);
    let t0 = Instant::now();
    assert!(matches!(
        client.wait_connected(wait),
        Err(Error::NotConnected(d)) if d == wait
    ));
    assert!(t0.elapsed() >= wait);
    assert!(util::wait_until(T, || client.state() == State::Backoff));

    server.restart();
    client.wait_connected(T).unwrap();
    assert_eq!(client.state(), State::Open);

    // A server that never reads cannot answer our close: the client stays in Closing
    // for the close timeout.
    server.set_behavior(Behavior::StopReading);
    let mut ev = Watch::new(&client);
    client.reconnect_now();
    ev.until("Connected 2", connected(2));
    let closer = {
        let c = client.clone();
        std::thread::spawn(move || c.close())
    };
    assert!(util::wait_until(T, || client.state() == State::Closing));
    assert!(matches!(
        client.wait_connected(T),
        Err(Error::Closed { .. })
    ));
    closer.join().unwrap();
    assert_eq!(client.state(), State::Closed);
}

#[test]
fn messages_sent_during_an_outage_arrive_in_order_after_recovery() {
    let _g = util::shared();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().unwrap();
    let mut ev = Watch::new(&client);
    server.stop();
    ev.until("Disconnected 1", disconnected(1));
    let queued: Vec<String> = (0..300).map(|i| format!("q{i:03}")).collect();
    for q in &queued {
        client.send_text(q.clone()).unwrap();
    }
    assert_eq!(client.stats().queued, queued.len());
    server.restart();
    ev.until("Connected 2", connected(2));
    client.send_text("after").unwrap();
    assert!(server.wait_received(queued.len() + 1, T));
    let received = server.received();
    let got: Vec<String> = received.iter().map(|r| text_of(&r.msg)).collect();
    let mut expected = queued;
    expected.push("after".into());
    assert_eq!(got, expected);
    assert!(received.iter().all(|r| r.conn == received[0].conn));
    assert_eq!(client.stats().queued, 0);
    let _ = client.close();
}

#[test]
fn overflow_block_waits_for_room_and_times_out_handing_the_message_back() {
    let _g = util::shared();
    let server = TestServer::echo();
    server.stop();
    let limits = Limits::default().queue_messages(2);
    let block = Duration::from_millis(300);
    let short = builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_secs(30)))
        .limits(limits.clone())
        .overflow(OverflowPolicy::Block(block))
        .connect_lazy()
        .unwrap();
    short.send_text("a").unwrap();
    short.send_text("b").unwrap();
    let t0 = Instant::now();
    match short.send_text("c") {
        Err(Error::QueueFull { message }) => assert_eq!(text_of(&message), "c"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() >= block);
    assert_eq!(texts(&short.close()), ["a", "b"]);

    // With a long enough block, room appears once the connection is back.
    let long = builder(&server.url())
        .reconnect_policy(Fixed(Duration::from_secs(30)))
        .limits(limits)
        .overflow(OverflowPolicy::Block(T))
        .connect_lazy()
        .unwrap();
    let mut ev = Watch::new(&long);
    ev.until("Reconnecting", |e| matches!(e, Event::Reconnecting { .. }));
    long.send_text("a").unwrap();
    long.send_text("b").unwrap();
    let (done_tx, done_rx) = bounded(1);
    let sender = {
        let c = long.clone();
        std::thread::spawn(move || done_tx.send(c.send_text("c")).unwrap())
    };
    assert!(done_rx.recv_timeout(QUIET).is_err(), "did not block");
    server.restart();
    long.reconnect_now();
    done_rx.recv_timeout(T).unwrap().unwrap();
    sender.join().unwrap();
    assert!(server.wait_received(3, T));
    let got: Vec<String> = server.received().iter().map(|r| text_of(&r.msg)).collect();
    assert_eq!(got, ["a", "b", "c"]);
    let _ = long.close();
}

// ---------------------------------------------------------------------------------------
// The count: every message accepted is delivered or handed back
// ---------------------------------------------------------------------------------------

struct Tally {
    next: u32,
    /// Numbers whose `send` returned Ok.
    accepted: Vec<u32>,
    /// Numbers handed back in the `Err` of `send`.
    err_back: Vec<u32>,
}

impl Tally {
    fn send(&mut self, client: &Client, n: u32) {
        for _ in 0..n {
            let i = self.next;
            self.next += 1;
            let text = format!("m{i:05}");
            match client.send_text(text.clone()) {
                Ok(()) => self.accepted.push(i),
                Err(e) => {
                    let back = e.into_message().expect("an Err hands the message back");
                    assert_eq!(text_of(&back), text);
                    self.err_back.push(i);
                }
            }
        }
    }
}

fn number(m: &Message) -> u32 {
    text_of(m)[1..].parse().expect("m<number>")
}

/// Sends numbered messages while the server is up, closing, down, restarting and up
/// again, then closes, and accounts for every single one.
fn every_message_is_delivered_or_handed_back(overflow: OverflowPolicy, outage_sends: u32) {
    let server = TestServer::echo();
    // The proxy keeps the client out while the server finishes its closing handshake, so
    // nothing the client wrote is left unread in a socket when the server goes down.
    let proxy = FaultProxy::start(server.addr());
    let client = builder(&proxy.url())
        .limits(Limits::default().queue_messages(16))
        .overflow(overflow)
        .connect()
        .unwrap();
    let mut ev = Watch::new(&client);
    let mut tally = Tally {
        next: 0,
        accepted: Vec::new(),
        err_back: Vec::new(),
    };
    tally.send(&client, 100); // up
    proxy.refuse(true);
    server.close_all(1012, "restart");
    tally.send(&client, 100); // racing the server's close
    ev.until("Disconnected 1", disconnected(1));
    assert!(server.wait_live(0, T));
    server.stop();
    proxy.refuse(false); // the proxy now forwards to a closed port
    tally.send(&client, outage_sends); // down: the queue overflows
    server.restart();
    tally.send(&client, 100); // racing the reconnect and the queue flush
    ev.until("Connected 2", connected(2));
    tally.send(&client, 100); // up again
    // A last outage, and close while messages wait in the queue.
    proxy.refuse(true);
    server.close_all(1001, "going away");
    ev.until("Disconnected 2", disconnected(2));
    let first_waiting = tally.next;
    tally.send(&client, 10);
    // Those of the ten that were accepted wait in the queue. (The queue may already be
    // full: messages the dead connection's TCP never acknowledged were requeued ahead of
    // them, past its bound, and then the ten come back in the `Err` of `send`.)
    let waiting: Vec<u32> = tally
        .accepted
        .iter()
        .copied()
        .filter(|&n| n >= first_waiting)
        .collect();
    let returned = client.close();
    let returned_numbers: Vec<u32> = returned.iter().map(number).collect();
    assert!(
        returned_numbers.ends_with(&waiting),
        "close() must return the queued messages {waiting:?}: {returned_numbers:?}"
    );
    ev.until_closed();

    let total = tally.next;
    let mut handed_back: Vec<u32> = returned.iter().map(number).collect();
    let mut undelivered = 0;
    for e in &ev.seen {
        if let Event::Undelivered(ms) = e {
            undelivered += ms.len();
            handed_back.extend(ms.iter().map(number));
        }
    }
    handed_back.extend(&tally.err_back);
    // The client may be done before the server: the server reads what is still in its
    // socket until the client's close reply, then its connection ends. Count after that.
    assert!(
        server.wait_live(0, T),
        "the server never finished its close"
    );
    let received: Vec<u32> = server.received().iter().map(|r| number(&r.msg)).collect();

    let received_set: BTreeSet<u32> = received.iter().copied().collect();
    let back_set: BTreeSet<u32> = handed_back.iter().copied().collect();
    let lost: Vec<u32> = (0..total)
        .filter(|i| !received_set.contains(i) && !back_set.contains(i))
        .collect();
    let received_twice = received.len() - received_set.len();
    let back_twice = handed_back.len() - back_set.len();
    let both = received_set.intersection(&back_set).count();
    eprintln!(
        "{overflow:?}: sent {total} = accepted {} + refused {}; server got {} ({} distinct, \
         {received_twice} duplicates); handed back {} (close() {}, Undelivered {undelivered}, \
         Err {}); received and also handed back: {both}",
        tally.accepted.len(),
        tally.err_back.len(),
        received.len(),
        received_set.len(),
        handed_back.len(),
        returned.len(),
        tally.err_back.len(),
    );
    assert!(lost.is_empty(), "silently dropped: {lost:?}");
    assert_eq!(back_twice, 0, "a message was handed back twice");
    assert_eq!(received_set.len() + back_set.len() - both, total as usize);
    // A refused send was never delivered.
    for i in &tally.err_back {
        assert!(!received_set.contains(i), "m{i} refused but delivered");
    }
    // Order: first arrivals are in send order (re-sent duplicates aside).
    let mut firsts = Vec::new();
    let mut seen = BTreeSet::new();
    for i in &received {
        if seen.insert(*i) {
            firsts.push(*i);
        }
    }
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "out of order: {firsts:?}"
    );
    // The outage really overflowed the queue.
    assert!(!back_set.is_empty(), "nothing was handed back");
}

#[test]
fn no_message_is_silently_dropped_with_drop_oldest() {
    let _g = util::shared();
    every_message_is_delivered_or_handed_back(OverflowPolicy::DropOldest, 100);
}

#[test]
fn no_message_is_silently_dropped_with_reject() {
    let _g = util::shared();
    every_message_is_delivered_or_handed_back(OverflowPolicy::Reject, 100);
}

#[test]
fn no_message_is_silently_dropped_with_block() {
    let _g = util::shared();
    every_message_is_delivered_or_handed_back(OverflowPolicy::Block(Duration::from_millis(10)), 40);
}

/// `reconnect_now()` while the supervisor writes the offline queue into a peer that
/// stopped reading: the flush waited for the write timeout (for good with `MAX`) before
/// the request was looked at (probe of 2026-12-01: not served within 15 s).
#[test]
fn reconnect_now_is_served_while_the_offline_queue_goes_into_a_stalled_peer() {
    let _g = util::shared();
    let server = TestServer::builder()
        .behavior(Behavior::reject(503))
        .recv_buffer(4096)
        .start();
    let client = Client::builder(&server.url())
        .no_proxy()
        .heartbeat(Heartbeat::off())
        .write_timeout(Duration::MAX)
        .close_timeout(Duration::from_millis(300))
        .limits(
            Limits::default()
                .queue_messages(100_000)
                .queue_bytes(256 << 20),
        )
        .reconnect_policy(support::client::Fixed(Duration::from_millis(100)))
        .connect_lazy()
        .unwrap();
    let events = client.events();
    // Offline: queue more than our write buffer and both kernels' buffers hold.
    loop {
        if let Event::Reconnecting { .. } = events.recv_timeout(T).expect("Reconnecting") {
            break;
        }
    }
    let payload = "x".repeat(2048);
    for _ in 0..20_000 {
        client.send(Message::text(payload.clone())).expect("queued");
    }
    server.set_behavior(Behavior::StopReading);
    let generation = loop {
        if let Event::Connected { generation, .. } = events.recv_timeout(T).expect("Connected") {
            break generation;
        }
    };
    client.reconnect_now();
    loop {
        match events.recv_timeout(T).expect("the reconnect is served") {
            Event::Disconnected {
                generation: g,
                reason,
            } if g == generation => {
                assert_eq!(reason, DisconnectReason::ReconnectRequested);
                break;
            }
            _ => {}
        }
    }
    let _ = client.close();
}

/// `reconnect_now()` with automatic reconnection off, and the connection dies (the peer
/// half-closes) before the supervisor, waiting in the offline queue's flush, serves the
/// request: the request is still served (a new connection at once), and the
/// `Disconnected` says why the connection ended. The review of 5fc26b1 found the client
/// giving up instead (`GaveUp`, `Undelivered`, `Closed`).
#[test]
#[cfg_attr(
    windows,
    ignore = "waits for the supervisor thread to sleep, read from /proc by thread name: Wine's threads carry no Linux name"
)]
fn reconnect_now_is_served_when_the_connection_dies_before_it() {
    use std::net::{Shutdown, TcpStream};
    let _g = util::shared();
    // Upgrades every connection and never reads again; hands each socket to the test.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let (give, socks) = unbounded::<TcpStream>();
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let raw = s.try_clone().unwrap();
            if let Ok(ws) = tungstenite::accept(s) {
                keep.push(ws);
                if give.send(raw).is_err() {
                    return;
                }
            }
        }
    });
    // The hook holds the first connect until the offline queue is full.
    let first_done = std::sync::atomic::AtomicBool::new(false);
    let (entered, hook_entered) = bounded::<()>(1);
    let (go, hook_go) = bounded::<()>(1);
    let client = Client::builder(&url)
        .no_proxy()
        .heartbeat(Heartbeat::off())
        .write_timeout(Duration::MAX)
        .close_timeout(Duration::from_millis(300))
        .reconnect(false)
        .limits(
            Limits::default()
                .queue_messages(100_000)
                .queue_bytes(256 << 20),
        )
        .on_connect(move |_| {
            if !first_done.swap(true, Ordering::SeqCst) {
                let _ = entered.send(());
                let _ = hook_go.recv_timeout(T);
            }
            Ok(())
        })
        .connect_lazy()
        .unwrap();
    let events = client.events();
    hook_entered.recv_timeout(T).expect("the hook runs");
    let payload = "x".repeat(2048);
    for _ in 0..20_000 {
        client.send(Message::text(payload.clone())).expect("queued");
    }
    go.send(()).unwrap();
    let generation = loop {
        if let Event::Connected { generation, .. } = events.recv_timeout(T).expect("Connected") {
            break generation;
        }
    };
    let sock = socks.recv_timeout(T).expect("the server's socket");
    // The supervisor wrote what fits and waits for the socket in the queue's flush.
    assert!(util::wait_until(T, || util::thread_sleeping(
        "wsbeat-reconnec"
    )));
    client.reconnect_now();
    // FIN: the reader sees the end and marks the connection dead.
    sock.shutdown(Shutdown::Write).unwrap();
    let mut seen = Vec::new();
    loop {
        let ev = events
            .recv_timeout(T)
            .unwrap_or_else(|e| panic!("{e} after {seen:?}"));
        match &ev {
            Event::Connected { generation: g, .. } if *g > generation => break,
            Event::GaveUp(_) | Event::Closed => panic!("the request was not served: {seen:?}"),
            _ => seen.push(format!("{ev:?}").chars().take(80).collect::<String>()),
        }
    }
    let _ = client.close();
}

/// A `reconnect_now()` made by a consumer reacting to `Disconnected` skips the backoff
/// the policy then gives. It was dropped: the supervisor read the flag before it emitted
/// `Disconnected`, and `backoff` cleared it after the call set it, so the command was
/// taken for a stale one and the client slept the whole delay (review of the event
/// paths). The policy's `min_uptime` waits for the test here, which holds the window
/// open.
#[test]
fn reconnect_now_made_right_after_disconnected_skips_the_backoff() {
    let _g = util::shared();
    struct SlowUptime {
        entered: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }
    impl ReconnectPolicy for SlowUptime {
        fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
        fn min_uptime(&self) -> Duration {
            let _ = self.entered.try_send(());
            let _ = self.release.recv_timeout(T);
            Duration::from_secs(5)
        }
    }
    let server = TestServer::echo();
    let (entered, entered_rx) = bounded(4);
    let (release_tx, release) = bounded(4);
    let client = Client::builder(&server.url())
        .heartbeat(Heartbeat::off())
        .close_timeout(Duration::from_secs(2))
        .reconnect_policy(SlowUptime { entered, release })
        .connect()
        .unwrap();
    let events = client.events();
    server.disconnect_all();
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    loop {
        let e = events.recv_deadline(deadline).expect("Disconnected 1");
        seen.push(e.clone());
        if matches!(e, Event::Disconnected { generation: 1, .. }) {
            break;
        }
    }
    entered_rx.recv_timeout(T).expect("min_uptime runs");
    // The consumer reacts to `Disconnected`.
    client.reconnect_now();
    release_tx.send(()).unwrap();
    let deadline = Instant::now() + T;
    let mut reconnected = false;
    while let Ok(e) = events.recv_deadline(deadline) {
        seen.push(e.clone());
        if matches!(e, Event::Connected { generation: 2, .. }) {
            reconnected = true;
            break;
        }
    }
    let _ = client.close();
    assert!(
        reconnected,
        "reconnect_now() after Disconnected was dropped: the client sleeps the policy's \
         hour; events: {seen:?}"
    );
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Reconnecting { .. })),
        "a requested reconnect waits for nothing: {seen:?}"
    );
}
