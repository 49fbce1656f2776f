//! Connection set-up against real sockets: close during a hanging dial, Happy Eyeballs
//! on loopback, redirects of the upgrade, `Retry-After` dates, extensions the client
//! never offered, socket options.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant, SystemTime};

use support::client::Fixed;
use support::hung::HungListener;
use support::server::{Behavior, TestServer};
use support::upgrade::{read_upgrade_request, websocket_key};
use support::util;
use wsbeat::{Client, Error, Event, RedirectRefusal};

const T: Duration = Duration::from_secs(10);

/// SYN-SENT sockets towards `port` (from /proc/net/tcp and tcp6).
fn syn_sent_to(port: u16) -> usize {
    let needle = format!(":{port:04X} 02 ");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.lines().filter(|l| l.contains(&needle)).count())
        .sum()
}

fn hung_v4() -> Option<HungListener> {
    let hung = HungListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)));
    if hung.is_none() {
        eprintln!(
            "SKIPPING: this kernel completes connects beyond a full accept queue, so no \
             loopback address hangs a dial here"
        );
    }
    hung
}

/// Starts a lazy client towards a hung address and waits until its dial is in
/// progress (one more SYN-SENT socket towards the port than before).
fn client_dialling(hung: &HungListener, connect_timeout: Duration) -> Client {
    let before = syn_sent_to(hung.addr.port());
    let client = Client::builder(&format!("ws://{}/", hung.addr))
        .connect_timeout(connect_timeout)
        .reconnect_policy(Fixed(Duration::from_millis(10)))
        .connect_lazy()
        .unwrap();
    assert!(
        util::wait_until(T, || syn_sent_to(hung.addr.port()) > before),
        "the client's dial never started"
    );
    client
}

/// `close()` while the TCP connect hangs (SYNs dropped) returns at once, not after the
/// connect timeout (before the cancellable dial it took the whole 8 s).
#[test]
fn close_during_a_hanging_tcp_dial_returns_at_once() {
    let Some(hung) = hung_v4() else { return };
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let client = client_dialling(&hung, Duration::from_secs(8));
        let events = client.events();
        let t0 = Instant::now();
        let _ = client.close();
        let took = t0.elapsed();
        worst = worst.max(took);
        assert!(
            took < Duration::from_millis(1000),
            "close() during a dial took {took:?}"
        );
        // Nothing connected, and Closed is the end.
        let evs: Vec<Event> = events.try_iter().collect();
        assert!(matches!(evs.last(), Some(Event::Closed)), "{evs:?}");
    }
    eprintln!("close() during a hanging dial: worst {worst:?}");
    assert!(
        util::wait_until(T, || util::threads_named("wsbeat-") == 0),
        "threads left: {:?}",
        util::thread_names()
    );
}

/// Dropping the last handle during a hanging dial is as quick.
#[test]
fn drop_during_a_hanging_tcp_dial_returns_at_once() {
    let Some(hung) = hung_v4() else { return };
    let client = client_dialling(&hung, Duration::from_secs(8));
    let events = client.events();
    let t0 = Instant::now();
    drop(client);
    let took = t0.elapsed();
    eprintln!("drop during a hanging dial: {took:?}");
    assert!(took < Duration::from_millis(1000), "drop took {took:?}");
    assert!(matches!(events.try_iter().last(), Some(Event::Closed)));
}

/// Happy Eyeballs end to end: `localhost` resolving to ::1 and 127.0.0.1, the first
/// family hanging and the server on the other. Where `localhost` has one family only
/// (this machine's /etc/hosts), the dial-level test in src/transport/dial.rs covers it.
#[test]
fn happy_eyeballs_through_localhost_when_the_first_family_hangs() {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = ("localhost", 0).to_socket_addrs().unwrap().collect();
    let (Some(first), true) = (
        addrs.first(),
        addrs.iter().any(|a| a.is_ipv4()) && addrs.iter().any(|a| a.is_ipv6()),
    ) else {
        eprintln!("SKIPPING: localhost resolves to {addrs:?} here, not to both ::1 and 127.0.0.1");
        return;
    };
    let server = if first.is_ipv6() {
        TestServer::echo()
    } else {
        TestServer::builder().ipv6().start()
    };
    let dead = SocketAddr::new(first.ip(), server.port());
    let Some(_hung) = HungListener::bind(dead) else {
        eprintln!("SKIPPING: cannot hang {dead}");
        return;
    };
    let t0 = Instant::now();
    let client = Client::builder(&format!("ws://localhost:{}/", server.port()))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .expect("Happy Eyeballs should reach the live family");
    eprintln!(
        "connected past a hanging {} in {:?}",
        first.ip(),
        t0.elapsed()
    );
    let _ = client.close();
}

fn redirect_to(url: &str, status: u16) -> TestServer {
    TestServer::start(Behavior::reject_with(status, &[("Location", url)]))
}

#[test]
fn redirects_are_followed_and_credentials_stay_at_their_origin() {
    let target = TestServer::builder().accept_subprotocol("v1.json").start();
    // A relative Location on the same server keeps everything; another port is another
    // origin and drops the credentials.
    let token_protocol = "base64url.bearer.authorization.k8s.io.c2VjcmV0";
    let hop2 = redirect_to(&format!("{}final?x=1", target.url()), 307);
    let hop1 = redirect_to("/second", 301);
    hop1.set_behavior(Behavior::reject_with(302, &[("Location", &hop2.url())]));
    let client = Client::builder(&hop1.url().replace("ws://", "ws://user:pw@"))
        .header("Authorization", "Bearer secret")
        .header("Cookie", "session=1")
        .header("X-Api-Key", "k")
        .header("X-Kept", "yes")
        .subprotocol("v1.json")
        .subprotocol(token_protocol)
        .connect_timeout(T)
        .connect()
        .expect("redirects followed");
    client.send_text("after two redirects").unwrap();
    let got = client
        .events()
        .recv_timeout(T)
        .expect("an event after connecting");
    let got = match got {
        Event::Connected { .. } => client.events().recv_timeout(T).unwrap(),
        e => e,
    };
    assert!(
        matches!(&got, Event::Message(m) if m.to_text().unwrap() == "after two redirects"),
        "{got:?}"
    );
    let hs = &target.handshakes()[0];
    assert_eq!(hs.path, "/final?x=1");
    assert_eq!(hs.header("x-kept"), Some("yes"));
    assert_eq!(
        hs.header("authorization"),
        None,
        "credentials crossed origins"
    );
    assert_eq!(hs.header("cookie"), None, "cookie crossed origins");
    assert_eq!(hs.header("x-api-key"), None, "api key crossed origins");
    assert_eq!(
        hs.subprotocols(),
        ["v1.json"],
        "a credential subprotocol crossed origins"
    );
    assert_eq!(
        hop1.handshakes()[0].subprotocols(),
        ["v1.json", token_protocol]
    );
    // The first hop got the credentials (header and URL user info as Basic: the header
    // given explicitly wins).
    assert_eq!(
        hop1.handshakes()[0].header("authorization"),
        Some("Bearer secret")
    );
    let _ = client.close();
}

#[test]
fn redirect_loop_is_a_fatal_typed_error() {
    let a = TestServer::start(Behavior::reject(302));
    let b = redirect_to(&a.url(), 302);
    a.set_behavior(Behavior::reject_with(302, &[("Location", &b.url())]));
    match Client::builder(&a.url()).connect_timeout(T).connect() {
        Err(
            e @ Error::Redirect {
                reason: RedirectRefusal::Loop,
                ..
            },
        ) => assert!(e.is_fatal()),
        Err(e) => panic!("expected a redirect loop, got {e:?}"),
        Ok(_) => panic!("connected through a redirect loop"),
    }
    // With reconnection on (default policy): one attempt, then GaveUp, not retried forever.
    let client = Client::builder(&a.url())
        .connect_timeout(T)
        .connect_lazy()
        .unwrap();
    let events = client.events();
    loop {
        match events.recv_timeout(T).expect("GaveUp") {
            Event::GaveUp(_) => break,
            Event::Reconnecting { .. } => panic!("a redirect loop was retried"),
            _ => {}
        }
    }
    // Too many: a chain longer than the limit.
    let c = redirect_to(&a.url(), 308);
    let d = redirect_to(&c.url(), 308);
    match Client::builder(&d.url()).max_redirects(1).connect() {
        Err(Error::Redirect {
            reason: RedirectRefusal::TooMany(1),
            ..
        }) => {}
        other => panic!("expected TooMany(1), got {:?}", other.map(|_| ())),
    }
}

#[test]
fn redirect_with_following_off_is_a_fatal_http_error() {
    let target = TestServer::echo();
    let r = redirect_to(&target.url(), 302);
    match Client::builder(&r.url()).max_redirects(0).connect() {
        Err(e @ Error::Http { status: 302, .. }) => assert!(e.is_fatal()),
        other => panic!("expected Error::Http 302, got {:?}", other.map(|_| ())),
    }
    assert_eq!(target.accepted(), 0);
}

#[test]
fn redirect_from_wss_to_ws_is_refused() {
    let plain = TestServer::echo();
    let tls = TestServer::builder()
        .tls(support::certs::ServerCert::Valid)
        .behavior(Behavior::reject_with(302, &[("Location", &plain.url())]))
        .start();
    match Client::builder(&tls.wss_localhost_url())
        .add_root_certificate(&support::certs::ca_pem())
        .connect()
    {
        Err(
            e @ Error::Redirect {
                reason: RedirectRefusal::Downgrade,
                ..
            },
        ) => {
            assert!(e.is_fatal())
        }
        other => panic!("expected a refused downgrade, got {:?}", other.map(|_| ())),
    }
    assert_eq!(plain.accepted(), 0);
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let at = SystemTime::now() + Duration::from_secs(120);
    let date = httpdate::fmt_http_date(at);
    let server = TestServer::start(Behavior::reject_with(503, &[("Retry-After", &date)]));
    match Client::builder(&server.url()).connect() {
        Err(Error::Http {
            status: 503,
            retry_after: Some(d),
            ..
        }) => {
            // Whole seconds in the date: 119-120 s from now, minus the time spent.
            assert!(
                d > Duration::from_secs(100) && d <= Duration::from_secs(120),
                "{d:?}"
            );
        }
        other => panic!("expected 503 with Retry-After, got {:?}", other.map(|_| ())),
    }
}

/// A server that answers the upgrade with an extension nobody offered.
#[test]
fn an_extension_that_was_not_offered_fails_the_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let (head, accept) = read_upgrade_request(&mut s);
        write!(
            s,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
        )
        .unwrap();
        head
    });
    match Client::builder(&format!("ws://{addr}/")).connect() {
        Err(e @ Error::UnexpectedExtension { .. }) => {
            assert!(e.is_fatal());
            assert!(e.to_string().contains("permessage-deflate"), "{e}");
        }
        other => panic!("expected UnexpectedExtension, got {:?}", other.map(|_| ())),
    }
    let head = server.join().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions")
    );
}

/// A server whose subprotocol answer does not fit the request: it chose one nobody asked
/// for, or none of those asked for. Each answer is the same on the next attempt: the
/// error says so at once and is fatal (it used to be a generic protocol error, retried
/// until the connect deadline).
#[test]
fn a_subprotocol_answer_that_does_not_fit_the_request_is_fatal() {
    for (asked, answer) in [
        (None, Some("chat.v9")),
        (Some("v1.json"), Some("v9.json")),
        (Some("v1.json"), None),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            // Every attempt gets the same answer, as a real server would give it.
            listener.set_nonblocking(false).unwrap();
            let mut attempts = 0;
            while let Ok((mut s, _)) = listener.accept() {
                attempts += 1;
                s.set_read_timeout(Some(T)).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let Some(key) = websocket_key(&head) else {
                    // The test's "stop" connection.
                    return attempts - 1;
                };
                let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
                let chosen = answer
                    .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
                    .unwrap_or_default();
                let _ = write!(
                    s,
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{chosen}\r\n"
                );
            }
            attempts
        });
        let mut builder = Client::builder(&format!("ws://{addr}/")).connect_timeout(T);
        if let Some(p) = asked {
            builder = builder.subprotocol(p);
        }
        let t0 = Instant::now();
        let result = builder.connect();
        let took = t0.elapsed();
        let mut stop = std::net::TcpStream::connect(addr).unwrap();
        stop.write_all(b"STOP\r\n\r\n").unwrap();
        let attempts = server.join().unwrap();
        match result {
            Err(e @ Error::UnexpectedSubprotocol { .. }) => {
                assert!(e.is_fatal(), "{e}");
                let shown = e.to_string();
                match answer {
                    Some(p) => assert!(shown.contains(p), "{shown}"),
                    None => assert!(shown.contains("none of"), "{shown}"),
                }
            }
            other => panic!(
                "asked {asked:?}, answer {answer:?}: expected UnexpectedSubprotocol, got {:?}",
                other.map(|_| ())
            ),
        }
        assert_eq!(attempts, 1, "asked {asked:?}, answer {answer:?}: retried");
        assert!(took < T / 2, "took {took:?}");
    }
}

/// Socket options reach the socket: the server sees the local address asked for.
/// (Keepalive is set on the same socket before connecting; an error there would fail
/// the connect. Its probes cannot be observed on loopback in test time.)
#[test]
fn local_address_and_keepalive() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let local: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let client = Client::builder(&format!("ws://{}/", listener.local_addr().unwrap()))
        .local_address(local)
        .tcp_keepalive(
            wsbeat::TcpKeepalive::new(Duration::from_secs(30))
                .interval(Duration::from_secs(5))
                .retries(3),
        )
        .connect_timeout(T)
        .connect_lazy()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut peer = None;
    let events = client.events();
    assert!(util::wait_until(T, || {
        // Kept open: a connection dropped here fails the client's upgrade, and its
        // `Reconnecting` could reach the look below in the same turn (review: 1 of 6).
        if let Ok(accepted) = listener.accept() {
            peer = Some(accepted);
            return true;
        }
        if let Ok(Event::Reconnecting { last_error, .. }) = events.try_recv() {
            panic!("connect from {local} failed: {last_error:?}");
        }
        false
    }));
    assert_eq!(peer.as_ref().unwrap().1.ip(), local);
    let _ = client.close();
}

/// `close()` while a SOCKS proxy has taken the greeting and never answers: the proxy
/// stage is aborted at once too (its socket is shut down), not after the connect timeout.
#[test]
fn close_while_a_socks_proxy_never_answers_returns_at_once() {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::builder("ws://wsbeat.test/")
        .proxy(&format!("socks5h://{}", proxy.local_addr().unwrap()))
        .connect_timeout(Duration::from_secs(8))
        .connect_lazy()
        .unwrap();
    let (mut conn, _) = proxy.accept().unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut greeting = [0u8; 3];
    conn.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, [5, 1, 0], "SOCKS5, one method: no authentication");
    // The client now waits for the proxy's answer.
    let t0 = Instant::now();
    let _ = client.close();
    let took = t0.elapsed();
    eprintln!("close() during the SOCKS handshake: {took:?}");
    assert!(took < Duration::from_millis(1000), "close() took {took:?}");
    // The proxy sees the connection end.
    let mut rest = Vec::new();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0);
}

/// An HTTP proxy URL with a large password (a long token) and a proxy that reads slowly:
/// the CONNECT request went out in one blocking `write_all` whose socket timeout was set
/// once, so each partial write could block for the whole time left again (set-up probe:
/// 22 s with a 1 s connect timeout, 4 of 4). The set-up socket is nonblocking now and
/// each part waits for the time left only.
#[test]
fn a_huge_proxy_request_to_a_slow_proxy_ends_at_the_connect_timeout() {
    let _g = util::shared();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
    let proxy = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16 << 10];
        // A slow proxy: 16 KiB every 50 ms, until the client goes or the test ends.
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
            stop.recv_timeout(Duration::from_millis(50))
        {
            if matches!(conn.read(&mut buf), Ok(0) | Err(_)) {
                return;
            }
        }
    });
    let password = "p".repeat(6 << 20);
    let timeout = Duration::from_secs(1);
    // Built first: a debug build takes seconds to parse a URL that long.
    let builder = Client::builder("ws://wsbeat.test/")
        .proxy(&format!("http://user:{password}@{proxy_addr}"))
        .connect_timeout(timeout)
        .reconnect(false);
    let t0 = Instant::now();
    let err = builder
        .connect()
        .expect_err("the request cannot go out in time");
    let took = t0.elapsed();
    drop(stop_tx);
    proxy.join().unwrap();
    assert!(
        matches!(
            err,
            Error::Timeout {
                stage: wsbeat::ConnectStage::Proxy,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        !format!("{err:?}").contains("ppppp"),
        "the password in the error"
    );
    assert!(took < timeout * 3, "connect() took {took:?}");
}

/// `bind_device`: the loopback interface works for a loopback server; an interface that
/// does not exist fails the attempt with an I/O error instead of using another one.
#[cfg(target_os = "linux")]
#[test]
fn bind_device_is_applied() {
    let server = TestServer::echo();
    let missing = Client::builder(&server.url())
        .bind_device("wsbeat-none0")
        .connect();
    match missing {
        Err(e @ Error::Io(_)) => {
            assert!(e.to_string().contains("wsbeat-none0"), "{e}");
            eprintln!("{e}");
        }
        other => panic!("expected an I/O error, got {:?}", other.map(|_| ())),
    }
    match Client::builder(&server.url()).bind_device("lo").connect() {
        Ok(client) => {
            assert!(server.wait_upgraded(1, T));
            let _ = client.close();
        }
        // SO_BINDTODEVICE needs CAP_NET_RAW on kernels before 5.7.
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("SKIPPING the positive half: {e}")
        }
        Err(e) => panic!("bind_device(\"lo\"): {e}"),
    }
}

/// A `Location` that is not valid text: the refusal says so (it said "(none)", as if the
/// header were missing).
#[test]
fn a_location_that_is_not_text_is_named_as_such() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&b[..n]),
            }
        }
        let _ =
            s.write_all(b"HTTP/1.1 302 Found\r\nLocation: /\xff\xfe\r\nContent-Length: 0\r\n\r\n");
    });
    match Client::builder(&url).reconnect(false).connect() {
        Err(Error::Redirect {
            reason: RedirectRefusal::BadLocation,
            location,
        }) => assert_eq!(location, "(not valid text)"),
        other => panic!("expected a refused redirect, got {other:?}"),
    }
    let _ = server.join();
}

/// Signals to the connecting thread while the server takes 300 ms to answer the upgrade:
/// the connect succeeds. A read with a socket timeout is interrupted by a signal even
/// under `SA_RESTART`, and the upgrade took `Interrupted` for a failure: `connect()`
/// failed after the first signal (connect probe of 2026-12-01). A daemon with a timer
/// signal, or a profiler's `SIGPROF`, would see that on every connect.
#[cfg(target_os = "linux")]
#[test]
fn signals_during_the_upgrade_do_not_fail_the_connect() {
    let _g = util::shared();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        // The slow answer *is* the scenario: time for the signals to land.
        #[allow(clippy::result_large_err)] // tungstenite's callback type
        let slow = |_: &tungstenite::handshake::server::Request, r| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(r)
        };
        let mut ws = tungstenite::accept_hdr(sock, slow).unwrap();
        while ws.read().is_ok() {}
    });
    // A signal to this thread (which connects: `connect()` runs the first attempt on
    // the caller's thread) every 5 ms until it is done.
    let signals = support::net::signal_me_every(Duration::from_millis(5), true);
    let got = Client::builder(&url).no_proxy().reconnect(false).connect();
    drop(signals);
    let client = got.expect("connect() goes through signals");
    let _ = client.close();
    server.join().unwrap();
}

/// Informational answers before the 101 (RFC 9110 15.2: a client must skip them): a
/// `100 Continue` and a `103 Early Hints`, then the 101 and a first message, all in one
/// write. The connect succeeds and the message arrives; the 100 was refused as
/// `Error::Http { status: 100 }` and retried for good, before (connect probe of
/// 2026-12-01).
#[test]
fn informational_answers_before_the_101_are_skipped() {
    let _g = util::shared();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let (_, accept) = read_upgrade_request(&mut sock);
        let mut out = Vec::new();
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        out.extend_from_slice(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        );
        out.extend_from_slice(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        );
        // A text frame "hi" right behind the 101 (unmasked, from the server).
        out.extend_from_slice(&[0x81, 2, b'h', b'i']);
        sock.write_all(&out).unwrap();
        // Hold the connection until the client goes.
        let _ = sock.read(&mut [0u8; 64]);
    });
    let client = Client::builder(&url)
        .no_proxy()
        .reconnect(false)
        .connect()
        .expect("the 101 after informational answers opens the connection");
    let events = client.events();
    loop {
        match events.recv_timeout(T).expect("the first message") {
            Event::Message(m) => {
                assert_eq!(m.to_text().unwrap(), "hi");
                break;
            }
            Event::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let _ = client.close();
    server.join().unwrap();
}

/// A one-connection HTTP proxy: reads the CONNECT request head, writes `answer`, then
/// (with a `target`) relays the tunnel both ways until either side ends.
fn http_proxy(
    answer: &'static [u8],
    target: Option<SocketAddr>,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let proxy = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            if client.read_exact(&mut byte).is_err() {
                return;
            }
            request.push(byte[0]);
        }
        assert!(request.starts_with(b"CONNECT "));
        if client.write_all(answer).is_err() {
            return;
        }
        let Some(target) = target else {
            // Hold the connection until the client goes.
            let _ = client.read(&mut [0u8; 64]);
            return;
        };
        let server = std::net::TcpStream::connect(target).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut s2);
            let _ = s2.shutdown(std::net::Shutdown::Write);
        });
        let (mut client, mut server) = (client, server);
        let _ = std::io::copy(&mut server, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
        up.join().unwrap();
    });
    (url, proxy)
}

/// RFC 9110 15.2: a client must parse 1xx answers before the final one, from a proxy
/// too (before, a `100 Continue` failed every attempt as `Error::Proxy { status: 100 }`).
/// The final answer's lines end in bare LFs, which RFC 9112 2.2 allows a client to take.
#[test]
fn an_http_proxys_interim_answers_before_its_200_are_skipped() {
    let _g = util::shared();
    let server = TestServer::echo();
    let (proxy, relay) = http_proxy(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n\
          HTTP/1.1 200 Connection established\nVia: test\n\n",
        Some(server.addr()),
    );
    let client = Client::builder(&server.url())
        .proxy(&proxy)
        .reconnect(false)
        .connect()
        .expect("the 200 after interim answers opens the tunnel");
    let events = client.events();
    client.send_text("through").unwrap();
    loop {
        match events.recv_timeout(T).expect("the echo") {
            Event::Message(m) => {
                assert_eq!(m.to_text().unwrap(), "through");
                break;
            }
            Event::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let _ = client.close();
    relay.join().unwrap();
}

/// `101 Switching Protocols` to a CONNECT (which asks for no upgrade) is no interim
/// answer: nothing final follows it. Before, it was skipped as one, and the attempt
/// waited for the connect timeout.
#[test]
fn an_http_proxy_switching_protocols_on_connect_is_a_proxy_error_at_once() {
    let _g = util::shared();
    let (proxy, relay) = http_proxy(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", None);
    let connect_timeout = Duration::from_secs(30);
    let t0 = Instant::now();
    let err = Client::builder("ws://example.invalid/")
        .proxy(&proxy)
        .connect_timeout(connect_timeout)
        .reconnect(false)
        .connect()
        .expect_err("a 101 opens no tunnel");
    let took = t0.elapsed();
    assert!(matches!(err, Error::ProxyProtocol(_)), "{err:?}");
    assert!(err.to_string().contains("101"), "{err}");
    assert!(took < connect_timeout / 2, "failed after {took:?}");
    relay.join().unwrap();
}

/// An answer that is not HTTP (here an SSH banner, whose second word happens to be
/// "200") is no tunnel: before, it was taken for one and the connect failed later, as
/// the server closing during the upgrade. A SOCKS proxy's garbage was "WebSocket
/// protocol error". Both are now proxy errors that point at the proxy URL.
#[test]
fn a_proxy_answer_in_another_protocol_is_a_proxy_error() {
    let _g = util::shared();
    let (proxy, relay) = http_proxy(b"SSH-2.0 200 OpenSSH\r\n\r\n", None);
    let err = Client::builder("ws://example.invalid/")
        .proxy(&proxy)
        .connect_timeout(T)
        .reconnect(false)
        .connect()
        .expect_err("an SSH banner is no tunnel");
    assert!(matches!(err, Error::ProxyProtocol(_)), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("SSH-2.0"), "{shown}");
    assert!(shown.contains("proxy URL's scheme"), "{shown}");
    assert!(!err.is_fatal());
    relay.join().unwrap();

    // An HTTP proxy given as a SOCKS5 one: it answers the SOCKS greeting in HTTP.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let garbage = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut hello = [0u8; 3];
        sock.read_exact(&mut hello).unwrap();
        let _ = sock.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let _ = sock.read(&mut [0u8; 64]);
    });
    let err = Client::builder("ws://example.invalid/")
        .proxy(&format!("socks5h://{proxy_addr}"))
        .connect_timeout(T)
        .reconnect(false)
        .connect()
        .expect_err("an HTTP answer is no SOCKS reply");
    assert!(matches!(err, Error::ProxyProtocol(_)), "{err:?}");
    let shown = err.to_string();
    assert!(!shown.contains("WebSocket"), "{shown}");
    assert!(shown.contains("SOCKS"), "{shown}");
    garbage.join().unwrap();
}

/// SOCKS5 credentials that cannot be sent (a password without a user name, a user name
/// over 255 bytes) are refused before any attempt. Before, they were found only once the
/// proxy answered: with the proxy down, every attempt failed as "connection refused",
/// retried for good, and the mistake never showed.
#[test]
fn socks5_credentials_that_cannot_be_sent_are_refused_up_front() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let long = "u".repeat(256);
    for proxy in [
        format!("socks5://:secret@{addr}"),
        format!("socks5h://{long}:pw@{addr}"),
    ] {
        for r in [
            Client::builder("ws://example.invalid/")
                .proxy(&proxy)
                .connect_lazy()
                .err(),
            Client::builder("ws://example.invalid/")
                .proxy(&proxy)
                .connect()
                .err(),
        ] {
            match r {
                Some(e @ Error::InvalidUrl { .. }) => {
                    assert!(e.is_fatal());
                    assert!(!e.to_string().contains("secret"), "{e}");
                }
                other => panic!("{proxy}: {other:?}"),
            }
        }
    }
}
