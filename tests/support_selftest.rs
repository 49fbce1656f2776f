//! Proves the shared test support (`tests/support/`) works, using a raw tungstenite client.

mod support;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::certs::{self, ServerCert};
use support::proxy::{Dir, FaultProxy};
use support::server::{Behavior, TestServer, flood_message};
use support::util;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, HandshakeError, Message, WebSocket};

/// Upper bound for anything that should happen "now".
const T: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s
}

fn connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let url = format!("ws://{addr}/");
    tungstenite::client(url, tcp(addr)).expect("handshake").0
}

fn read_data(ws: &mut WebSocket<TcpStream>) -> Message {
    loop {
        match ws.read().expect("read") {
            m @ (Message::Text(_) | Message::Binary(_) | Message::Close(_)) => return m,
            _ => continue,
        }
    }
}

/// After a Close was read: keep reading so tungstenite sends the reply, until the end.
fn finish_close(ws: &mut WebSocket<TcpStream>) {
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(WsError::ConnectionClosed) => return,
            Err(e) => panic!("closing handshake: {e}"),
        }
    }
}

/// Reads with a short timeout: None if nothing (data or control) arrived.
fn read_quiet(ws: &mut WebSocket<TcpStream>) -> Option<Message> {
    ws.get_mut().set_read_timeout(Some(QUIET)).unwrap();
    let r = match ws.read() {
        Ok(m) => Some(m),
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("unexpected error {e}"),
    };
    ws.get_mut().set_read_timeout(Some(T)).unwrap();
    r
}

#[test]
fn echo_round_trip_and_recorded_headers() {
    let _g = util::shared();
    let server = TestServer::builder().accept_subprotocol("chat").start();
    let mut req = server.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", "Bearer s3cret".parse().unwrap());
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "other, chat".parse().unwrap());
    let (mut ws, resp) = tungstenite::client(req, tcp(server.addr())).expect("handshake");
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "chat"
    );

    ws.send(Message::text("hello")).unwrap();
    ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(read_data(&mut ws), Message::text("hello"));
    assert_eq!(read_data(&mut ws), Message::binary(vec![1u8, 2, 3]));

    let first = server.next_message(T).expect("recorded");
    assert_eq!((first.conn, first.text()), (0, Some("hello")));
    let second = server.next_message(T).expect("recorded");
    assert_eq!(second.msg, Message::binary(vec![1u8, 2, 3]));
    assert_eq!(server.received_on(0).len(), 2);

    let hs = server.last_handshake().expect("handshake recorded");
    assert_eq!(hs.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(hs.subprotocols(), vec!["other", "chat"]);
    assert_eq!(hs.path, "/");
    assert_eq!(
        (server.accepted(), server.upgraded(), server.live()),
        (1, 1, 1)
    );

    // Pings are answered in Echo mode and recorded.
    ws.send(Message::Ping(b"p".to_vec().into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"p".to_vec().into()));
    assert!(server.controls().recv_timeout(T).unwrap().msg.is_ping());

    ws.close(None).unwrap();
    finish_close(&mut ws);
    assert!(server.wait_live(0, T));
}

fn tls_client(
    server: &TestServer,
) -> Result<WebSocket<native_tls::TlsStream<TcpStream>>, native_tls::Error> {
    let tls = certs::test_connector().connect("127.0.0.1", tcp(server.addr()));
    let tls = match tls {
        Ok(s) => s,
        Err(native_tls::HandshakeError::Failure(e)) => return Err(e),
        Err(native_tls::HandshakeError::WouldBlock(_)) => panic!("blocking socket"),
    };
    Ok(tungstenite::client(server.wss_url(), tls)
        .expect("ws handshake")
        .0)
}

#[test]
fn wss_echo_and_bad_certificates() {
    let _g = util::shared();
    let server = TestServer::builder().tls(ServerCert::Valid).start();
    let mut ws = tls_client(&server).expect("trusted");
    ws.send(Message::text("over tls")).unwrap();
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => {
                assert_eq!(t.as_str(), "over tls");
                break;
            }
            _ => continue,
        }
    }
    drop(ws);

    for bad in [
        ServerCert::Expired,
        ServerCert::WrongHost,
        ServerCert::UnknownCa,
    ] {
        let server = TestServer::builder().tls(bad).start();
        let err = tls_client(&server).expect_err("must fail verification");
        assert!(
            err.to_string().contains("certificate verify failed"),
            "{bad:?}: {err}"
        );
        assert_eq!(server.upgraded(), 0);
    }
}

#[test]
fn reject_is_an_http_error() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::reject(401));
    match tungstenite::client(server.url(), tcp(server.addr())) {
        Err(HandshakeError::Failure(WsError::Http(resp))) => assert_eq!(resp.status(), 401),
        other => panic!("expected HTTP 401, got {:?}", other.map(|_| ())),
    }
    server.set_behavior(Behavior::reject_with(503, &[("Retry-After", "1")]));
    match tungstenite::client(server.url(), tcp(server.addr())) {
        Err(HandshakeError::Failure(WsError::Http(resp))) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
        }
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.handshakes().len(), 2);
    assert_eq!(server.upgraded(), 0);
}

#[test]
fn proxy_forwards_and_blackhole_holds_traffic() {
    let _g = util::shared();
    let server = TestServer::echo();
    let proxy = FaultProxy::start(server.addr());
    let mut ws = connect(proxy.addr());
    ws.send(Message::text("one")).unwrap();
    assert_eq!(read_data(&mut ws), Message::text("one"));
    assert_eq!((proxy.accepted(), proxy.connections()), (1, 1));

    proxy.blackhole();
    ws.send(Message::text("two")).unwrap();
    assert_eq!(read_quiet(&mut ws), None, "nothing passes a blackhole");
    assert_eq!(server.received_count(), 1, "server got nothing either");
    assert_eq!(proxy.connections(), 1, "link stays open");

    proxy.resume();
    assert_eq!(read_data(&mut ws), Message::text("two"));

    // Delay: a round trip crosses the proxy twice.
    proxy.set_delay(Duration::from_millis(100));
    let t0 = Instant::now();
    ws.send(Message::text("slow")).unwrap();
    assert_eq!(read_data(&mut ws), Message::text("slow"));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    proxy.set_delay(Duration::ZERO);

    proxy.reset_all();
    assert_eq!(proxy.connections(), 0);
    match ws.read() {
        Err(WsError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected reset, got {other:?}"),
    }
    assert!(server.wait_live(0, T), "server side was reset too");

    proxy.refuse(true);
    assert!(tungstenite::client(proxy.url(), tcp(proxy.addr())).is_err());
    assert_eq!(proxy.accepted(), 2);
    proxy.refuse(false);
    let mut ws = connect(proxy.addr());

    // Cut: the echo of a large message arrives only in part, then RST.
    proxy.cut_mid_frame(Dir::ToClient);
    ws.send(Message::binary(vec![7u8; 20_000])).unwrap();
    assert!(ws.read().is_err(), "partial frame then reset");
    assert!(!proxy.cut_pending());
    assert!(proxy.wait_connections(0, T));

    // FIN: the client sees the end of the stream.
    let mut ws = connect(proxy.addr());
    proxy.close_all();
    assert!(matches!(
        ws.read(),
        Err(WsError::Protocol(_)) | Err(WsError::Io(_))
    ));
}

#[test]
fn restart_rebinds_the_same_port() {
    let _g = util::shared();
    let server = TestServer::echo();
    let addr = server.addr();
    let mut ws = connect(addr);
    ws.send(Message::text("before")).unwrap();
    assert_eq!(read_data(&mut ws), Message::text("before"));

    server.stop();
    assert!(!server.is_running());
    assert!(ws.read().is_err(), "connection closed by stop");
    let refused = TcpStream::connect(addr).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

    server.restart();
    assert_eq!(server.addr(), addr);
    let mut ws = connect(addr);
    ws.send(Message::text("after")).unwrap();
    assert_eq!(read_data(&mut ws), Message::text("after"));
    assert_eq!(server.accepted(), 2);
    assert_eq!(server.received_on(1), vec![Message::text("after")]);
}

#[test]
fn server_controls_and_modes() {
    let _g = util::shared();
    // close_on_text and close_all.
    let server = TestServer::builder()
        .close_on_text("please-close", 4000, "bye")
        .start();
    let mut ws = connect(server.addr());
    ws.send(Message::text("please-close")).unwrap();
    match read_data(&mut ws) {
        Message::Close(Some(cf)) => {
            assert_eq!(cf.code, CloseCode::from(4000));
            assert_eq!(cf.reason.as_str(), "bye");
        }
        other => panic!("expected close, got {other:?}"),
    }
    finish_close(&mut ws);
    let mut ws = connect(server.addr());
    assert!(server.wait_upgraded(2, T));
    server.close_all(1001, "going away");
    match read_data(&mut ws) {
        Message::Close(Some(cf)) => assert_eq!(cf.code, CloseCode::Away),
        other => panic!("expected close, got {other:?}"),
    }
    finish_close(&mut ws);
    assert!(server.wait_live(0, T));

    // reset_all: RST.
    let mut ws = connect(server.addr());
    assert!(server.wait_upgraded(3, T));
    server.reset_all();
    assert_eq!(server.live(), 0);
    match ws.read() {
        Err(WsError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected reset, got {other:?}"),
    }

    // disconnect_all: FIN without close frame.
    let mut ws = connect(server.addr());
    assert!(server.wait_upgraded(4, T));
    server.disconnect_all();
    assert!(matches!(
        ws.read(),
        Err(WsError::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
        ))
    ));

    // After-upgrade behaviours.
    server.set_behavior(Behavior::close_after_upgrade(4001, "later"));
    let mut ws = connect(server.addr());
    assert!(
        matches!(read_data(&mut ws), Message::Close(Some(cf)) if cf.code == CloseCode::from(4001))
    );
    finish_close(&mut ws);
    assert!(server.wait_live(0, T));
    server.set_behavior(Behavior::DropAfterUpgrade);
    assert!(connect(server.addr()).read().is_err());
    server.set_behavior(Behavior::ResetAfterUpgrade);
    match connect(server.addr()).read() {
        Err(WsError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected reset, got {other:?}"),
    }

    // Hang: TCP accepted, no answer to the upgrade.
    server.set_behavior(Behavior::Hang);
    let before = server.accepted();
    let s = tcp(server.addr());
    s.set_read_timeout(Some(QUIET)).unwrap();
    match tungstenite::client(server.url(), s) {
        Err(HandshakeError::Interrupted(_)) => {}
        other => panic!("expected a timeout, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.accepted(), before + 1);
    assert_eq!(server.live(), 1, "held open");
    server.stop();
    assert_eq!(server.live(), 0);
}

#[test]
fn raw_modes_no_pong_and_app_heartbeat() {
    let _g = util::shared();
    let server = TestServer::start(Behavior::NoPong);
    let mut ws = connect(server.addr());
    ws.send(Message::Ping(b"hb".to_vec().into())).unwrap();
    ws.send(Message::text("data")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("data"), "no pong first");
    assert_eq!(read_quiet(&mut ws), None, "and no pong later");
    let ping = server.controls().recv_timeout(T).unwrap();
    assert_eq!(ping.msg, Message::Ping(b"hb".to_vec().into()));
    // Fragmented message is reassembled and echoed whole.
    let frag = tungstenite::protocol::frame::Frame::message(
        b"ab".to_vec(),
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Text,
        ),
        false,
    );
    let cont = tungstenite::protocol::frame::Frame::message(
        b"cd".to_vec(),
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Continue,
        ),
        true,
    );
    ws.send(Message::Frame(frag)).unwrap();
    ws.send(Message::Frame(cont)).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("abcd"));
    ws.close(None).unwrap();
    finish_close(&mut ws);
    assert!(server.wait_live(0, T));

    server.set_behavior(Behavior::AppHeartbeat);
    let mut ws = connect(server.addr());
    ws.send(Message::Ping(b"hb".to_vec().into())).unwrap();
    ws.send(Message::text(r#"{"op":"ping"}"#)).unwrap();
    ws.send(Message::binary(vec![9u8])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(r#"{"op":"pong"}"#));
    assert_eq!(ws.read().unwrap(), Message::binary(vec![9u8]));
    assert_eq!(read_quiet(&mut ws), None);
    server.close_all(4000, "bye");
    assert!(
        matches!(read_data(&mut ws), Message::Close(Some(cf)) if cf.code == CloseCode::from(4000))
    );
    finish_close(&mut ws);
    assert!(server.wait_live(0, T));
}

#[test]
fn flood_keeps_echoing_and_stop_reading_stalls_writes() {
    let _g = util::shared();
    let (count, size) = (2_000, 1_000);
    let server = TestServer::start(Behavior::Flood { count, size });
    let mut ws = connect(server.addr());
    ws.send(Message::text("mine")).unwrap();
    let mut floods = 0;
    let mut echoed = false;
    while floods < count || !echoed {
        match read_data(&mut ws) {
            Message::Text(t) if t.as_str() == "mine" => echoed = true,
            Message::Text(t) => {
                assert_eq!(t.as_str(), flood_message(floods, size));
                floods += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(ws);

    let server = TestServer::builder()
        .behavior(Behavior::StopReading)
        .recv_buffer(4096)
        .start();
    let mut ws = connect(server.addr());
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut stalled = false;
    for _ in 0..2_000 {
        // Bounded: at most ~128 MiB.
        match ws.send(Message::binary(chunk.clone())) {
            Ok(()) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                stalled = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(stalled, "writes to a non-reading server must stall");
    assert_eq!(server.received_count(), 0);
}

#[test]
fn ipv6_loopback() {
    let _g = util::shared();
    let server = TestServer::builder().ipv6().start();
    assert!(server.url().starts_with("ws://[::1]:"));
    let mut ws = connect(server.addr());
    ws.send(Message::text("v6")).unwrap();
    assert_eq!(read_data(&mut ws), Message::text("v6"));
}

#[test]
fn threads_and_fds_return_to_baseline() {
    let _g = util::exclusive();
    // Support threads of tests that just finished are joined already; fds are closed.
    assert_eq!(util::support_threads(), 0, "{:?}", util::thread_names());
    let fds = util::fd_count();
    {
        let server = TestServer::echo();
        let tls = TestServer::builder().tls(ServerCert::Valid).start();
        let proxy = FaultProxy::start(server.addr());
        let mut a = connect(proxy.addr());
        let mut b = connect(server.addr());
        let mut c = tls_client(&tls).unwrap();
        for ws in [&mut a, &mut b] {
            ws.send(Message::text("x")).unwrap();
            assert_eq!(read_data(ws), Message::text("x"));
        }
        c.send(Message::text("y")).unwrap();
        assert!(server.wait_received(2, T) && tls.wait_received(1, T));
        // 2 accept + 3 server connections + 1 proxy accept + 2 pumps.
        assert_eq!(util::support_threads(), 8, "{:?}", util::thread_names());
        assert!(util::fd_count() > fds);
        proxy.blackhole();
        proxy.stop();
        server.stop();
        server.restart();
        let _d = connect(server.addr());
        drop(tls);
        // `server` and `_d` dropped here.
    }
    // Joined on stop/Drop; a joined thread can still be listed in /proc for a moment.
    assert!(
        util::wait_until(T, || util::support_threads() == 0),
        "{:?}",
        util::thread_names()
    );
    assert_eq!(util::fd_count(), fds);
}
