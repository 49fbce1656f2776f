//! Security defaults: TLS verification is on unless switched off with an explicitly
//! named `danger_` option, a `wss://` URL never talks plaintext (not on the first
//! connect, not on a reconnect), and size limits are on by default (message, frame,
//! offline queue). Credentials in logs are covered by `credentials_never_logged.rs`
//! (it installs a process-wide logger, so it lives in a binary of its own).

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::client::Fixed;

use parking_lot::Mutex;
use support::certs::{self, ServerCert};
use support::server::{Behavior, TestServer};
use support::{net, util};
use wsbeat::{
    Client, ClientBuilder, DisconnectReason, Error, Event, Limits, Message, TlsErrorKind,
};

const T: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

fn tls_server(cert: ServerCert) -> TestServer {
    TestServer::builder().tls(cert).start()
}

fn builder(url: &str) -> ClientBuilder {
    Client::builder(url)
        .connect_timeout(T)
        .close_timeout(Duration::from_secs(1))
}

fn trusting_test_ca(url: &str) -> ClientBuilder {
    builder(url).add_root_certificate(certs::CA_PEM)
}

fn assert_certificate_error(r: Result<Client, Error>, what: &str) {
    match r {
        Err(Error::Tls {
            kind: TlsErrorKind::Certificate,
            ..
        }) => {}
        Err(other) => panic!("{what}: expected a certificate error, got {other:?}"),
        Ok(_) => panic!("{what}: connected although the certificate is not trusted"),
    }
}

fn echo(client: &Client, text: &str) {
    client.send_text(text.to_string()).expect("send");
    let events = client.events();
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left).expect("echo in time") {
            Event::Message(m) if m == Message::text(text) => return,
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// TLS verification.

#[test]
fn tls_verification_is_on_by_default() {
    let _g = util::shared();
    // Signed by a CA nobody trusts.
    let unknown = tls_server(ServerCert::UnknownCa);
    assert_certificate_error(builder(&unknown.wss_url()).connect(), "unknown CA");
    // Signed by the test CA, which is not a system root: still untrusted by default.
    let test_ca = tls_server(ServerCert::Valid);
    assert_certificate_error(builder(&test_ca.wss_url()).connect(), "test CA not trusted");
    // Trusting the test CA does not make another CA's certificate acceptable.
    assert_certificate_error(
        trusting_test_ca(&unknown.wss_url()).connect(),
        "unknown CA with the test CA trusted",
    );
    // Expired and wrong-host certificates from a trusted CA are rejected too.
    let expired = tls_server(ServerCert::Expired);
    assert_certificate_error(trusting_test_ca(&expired.wss_url()).connect(), "expired");
    let wrong_host = tls_server(ServerCert::WrongHost);
    assert_certificate_error(
        trusting_test_ca(&wrong_host.wss_url()).connect(),
        "wrong host",
    );
    // Nothing reached the WebSocket layer of any of them.
    for s in [&unknown, &test_ca, &expired, &wrong_host] {
        assert!(s.handshakes().is_empty(), "an upgrade request was sent");
    }
    // And with the right trust, the same client configuration connects.
    let client = trusting_test_ca(&test_ca.wss_url())
        .connect()
        .expect("trusted CA connects");
    echo(&client, "verified");
    let _ = client.close();
}

#[test]
fn only_danger_accept_invalid_certs_lets_an_untrusted_certificate_through() {
    let _g = util::shared();
    let server = tls_server(ServerCert::UnknownCa);
    // Saying "no danger" explicitly is the default.
    assert_certificate_error(
        builder(&server.wss_url())
            .danger_accept_invalid_certs(false)
            .connect(),
        "danger_accept_invalid_certs(false)",
    );
    // The hostname opt-out alone does not accept an unknown issuer.
    assert_certificate_error(
        builder(&server.wss_url())
            .danger_accept_invalid_hostnames(true)
            .connect(),
        "danger_accept_invalid_hostnames(true) only",
    );
    let client = builder(&server.wss_url())
        .danger_accept_invalid_certs(true)
        .connect()
        .expect("danger_accept_invalid_certs(true) connects");
    echo(&client, "insecure but asked for");
    let _ = client.close();

    // The hostname opt-out accepts a trusted certificate for another name, and only that.
    let wrong_host = tls_server(ServerCert::WrongHost);
    let client = trusting_test_ca(&wrong_host.wss_url())
        .danger_accept_invalid_hostnames(true)
        .connect()
        .expect("danger_accept_invalid_hostnames(true) connects");
    echo(&client, "wrong name accepted on request");
    let _ = client.close();
}

#[test]
fn a_certificate_error_is_fatal_for_the_default_policy() {
    let _g = util::shared();
    // Retrying cannot fix an untrusted certificate: the default policy gives up at once
    // instead of hammering the server.
    let server = tls_server(ServerCert::UnknownCa);
    let client = builder(&server.wss_url()).connect_lazy().expect("lazy");
    let events = client.events();
    loop {
        match events.recv_timeout(T).expect("an event in time") {
            Event::GaveUp(e) => {
                let Error::GaveUp { last, .. } = &e else {
                    panic!("GaveUp carries Error::GaveUp, got {e:?}");
                };
                assert!(
                    matches!(
                        **last,
                        Error::Tls {
                            kind: TlsErrorKind::Certificate,
                            ..
                        }
                    ),
                    "got {last:?}"
                );
                break;
            }
            Event::Connected { .. } => panic!("connected to an untrusted server"),
            _ => {}
        }
    }
    assert!(server.accepted() <= 1, "retried a fatal certificate error");
    let _ = client.close();
}

// ---------------------------------------------------------------------------------------
// No downgrade.

#[test]
fn wss_url_to_a_plaintext_server_fails_with_a_tls_error() {
    let _g = util::shared();
    let plain = TestServer::echo();
    let err = builder(&plain.wss_url())
        .danger_accept_invalid_certs(true) // even with verification off
        .connect()
        .expect_err("wss:// must not connect in plaintext");
    assert!(matches!(err, Error::Tls { .. }), "got {err:?}");
    assert!(plain.wait_accepted(1, T));
    assert_eq!(plain.upgraded(), 0, "a plaintext upgrade happened");
    assert!(
        plain.handshakes().is_empty(),
        "an HTTP request was sent in clear"
    );
}

/// First bytes of every connection accepted on a raw listener.
struct FirstBytes {
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FirstBytes {
    fn listen(listener: std::net::TcpListener) -> FirstBytes {
        listener.set_nonblocking(true).unwrap();
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(SeqCst) {
                let Some((mut s, _)) = net::accept_tick(&listener) else {
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(T));
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                seen2.lock().push(buf[..n].to_vec());
                // Dropping `s` closes it: the client's handshake fails.
            }
        });
        FirstBytes {
            seen,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FirstBytes {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn reconnects_of_a_wss_client_never_fall_back_to_plaintext() {
    let _g = util::shared();
    let server = tls_server(ServerCert::Valid);
    let client = trusting_test_ca(&server.wss_url())
        .reconnect_policy(Fixed(Duration::from_millis(20)))
        .connect()
        .expect("connect");
    echo(&client, "over tls");
    let events = client.events();
    // The TLS server goes away; something else answers on the same port.
    let addr = server.addr();
    server.stop();
    let raw = FirstBytes::listen(net::bind_retry(addr, T).expect("rebind"));
    let mut tls_failures = 0;
    let deadline = Instant::now() + T;
    while tls_failures < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match events
            .recv_timeout(left)
            .expect("reconnect attempts in time")
        {
            Event::Connected { .. } => panic!("connected to a non-TLS listener"),
            Event::Reconnecting {
                last_error: Some(Error::Tls { .. }),
                ..
            } => tls_failures += 1,
            _ => {}
        }
    }
    let _ = client.close();
    let seen = raw.seen.lock().clone();
    assert!(seen.len() >= 3, "attempts seen: {}", seen.len());
    for first in &seen {
        // 0x16 = TLS handshake record (ClientHello); never "GET /" in clear.
        assert_eq!(first.first(), Some(&0x16), "first bytes {first:?}");
        assert!(
            !first.starts_with(b"GET"),
            "plaintext HTTP on a wss:// client"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Default limits.

#[test]
fn default_limits_are_on() {
    let l = Limits::default();
    assert_eq!(l.max_message_size, 16 * MIB);
    assert_eq!(l.max_frame_size, 16 * MIB);
    assert!(l.max_write_buffer <= 17 * MIB);
    assert_eq!(l.queue_messages, 10_000);
    assert_eq!(l.queue_bytes, 16 * MIB);
}

#[test]
fn message_over_16_mib_from_the_server_is_rejected_by_default() {
    let _g = util::exclusive();
    // Exactly 16 MiB is allowed (the boundary), one byte more is not.
    let server = TestServer::start(Behavior::Flood {
        count: 1,
        size: 16 * MIB,
    });
    let client = builder(&server.url())
        .reconnect(false)
        .connect()
        .expect("connect");
    let events = client.events();
    let got = loop {
        match events.recv_timeout(T).expect("the 16 MiB message") {
            Event::Message(m) => break m,
            Event::Disconnected { reason, .. } => panic!("16 MiB rejected: {reason}"),
            _ => {}
        }
    };
    assert_eq!(got.len(), 16 * MIB);
    let _ = client.close();
    drop(server);

    let server = TestServer::start(Behavior::Flood {
        count: 1,
        size: 16 * MIB + 1,
    });
    let client = builder(&server.url())
        .reconnect(false)
        .connect()
        .expect("connect");
    let events = client.events();
    let reason = loop {
        match events.recv_timeout(T).expect("the disconnect") {
            Event::Message(m) => panic!("a {} byte message was delivered", m.len()),
            Event::Disconnected { reason, .. } => break reason,
            _ => {}
        }
    };
    assert!(
        matches!(reason, DisconnectReason::Protocol(_)),
        "expected a protocol (limit) disconnect, got {reason:?}"
    );
    let _ = client.close();
}

#[test]
fn sending_a_message_over_the_limit_hands_it_back_unsent() {
    let _g = util::exclusive();
    let server = TestServer::echo();
    let client = builder(&server.url()).connect().expect("connect");
    let big = vec![7u8; 16 * MIB + 1];
    let err = client.send_binary(big.clone()).expect_err("over the limit");
    assert!(
        matches!(err, Error::MessageTooLarge { size, limit, .. } if size == 16 * MIB + 1 && limit == 16 * MIB),
        "got {err:?}"
    );
    assert_eq!(err.into_message(), Some(Message::binary(big)));
    echo(&client, "after the refused one");
    assert_eq!(server.received_count(), 1, "the big message went out");
    let _ = client.close();
}

/// A port nothing listens on (bound, then released).
fn dead_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    // Connecting must be refused, not hang.
    assert!(TcpStream::connect_timeout(&addr, T).is_err());
    format!("ws://{addr}/")
}

#[test]
fn the_default_offline_queue_is_bounded_in_messages_and_bytes() {
    let _g = util::exclusive();
    let client = builder(&dead_port_url())
        .reconnect_policy(Fixed(Duration::from_secs(3600)))
        .connect_lazy()
        .expect("lazy");
    for i in 0..10_000 {
        client
            .send_text(format!("q{i}"))
            .unwrap_or_else(|e| panic!("message {i} refused: {e}"));
    }
    let err = client
        .send_text("one too many")
        .expect_err("the queue is full at 10 000 messages");
    assert!(matches!(err, Error::QueueFull { .. }), "got {err:?}");
    assert_eq!(err.into_message(), Some(Message::text("one too many")));
    assert_eq!(client.stats().queued, 10_000);
    let back = client.close();
    assert_eq!(back.len(), 10_000, "close hands back every queued message");
    assert!(
        back.iter()
            .enumerate()
            .all(|(i, m)| *m == Message::text(format!("q{i}"))),
        "in order"
    );

    // Bytes: 16 MiB of payload in total.
    let client = builder(&dead_port_url())
        .reconnect_policy(Fixed(Duration::from_secs(3600)))
        .connect_lazy()
        .expect("lazy");
    client.send_binary(vec![1u8; 9 * MIB]).expect("first 9 MiB");
    let err = client
        .send_binary(vec![2u8; 9 * MIB])
        .expect_err("18 MiB exceed the 16 MiB queue");
    assert!(matches!(err, Error::QueueFull { .. }), "got {err:?}");
    assert_eq!(err.into_message().map(|m| m.len()), Some(9 * MIB));
    client
        .send_binary(vec![3u8; 7 * MIB])
        .expect("exactly 16 MiB in total");
    assert_eq!(client.close().len(), 2);
}

/// `DropOldest` with a consumer that never reads events: the dropped messages wait in
/// `Undelivered` events, and once as many as the queue holds wait there unread, new
/// messages are refused (`QueueFull`, handed back) instead of dropping more. Memory was
/// unbounded: one `Undelivered` per send while offline (3.5 GiB in 14 s in a probe).
#[test]
fn drop_oldest_with_an_unread_event_stream_stays_bounded() {
    let _g = util::shared();
    let client = builder(&dead_port_url())
        .reconnect_policy(Fixed(Duration::from_secs(3600)))
        .overflow(wsbeat::OverflowPolicy::DropOldest)
        .limits(Limits::default().queue_messages(100))
        .connect_lazy()
        .expect("lazy");
    let events = client.events();
    let mut refused = 0;
    for i in 0..1_000 {
        match client.send_text(format!("m{i}")) {
            Ok(()) => {}
            Err(Error::QueueFull { message }) => {
                assert_eq!(message, Message::text(format!("m{i}")), "handed back");
                refused += 1;
            }
            Err(e) => panic!("send {i}: {e:?}"),
        }
    }
    // 100 queued, 100 dropped into unread `Undelivered` events, the rest refused.
    assert_eq!(refused, 800, "{:?}", client.stats());
    assert_eq!(client.stats().queued, 100);
    // Once the consumer takes the handed-back messages, dropping resumes.
    let mut handed_back = 0;
    while let Ok(ev) = events.recv_timeout(Duration::from_millis(100)) {
        if let Event::Undelivered(v) = ev {
            handed_back += v.len();
        }
    }
    assert_eq!(handed_back, 100);
    client
        .send_text("later")
        .expect("dropping the oldest again");
    let back = client.close();
    assert_eq!(back.len(), 100);
    assert_eq!(back.last(), Some(&Message::text("later")));
}
