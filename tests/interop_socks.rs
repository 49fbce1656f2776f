//! SOCKS5 proxies: a real Dante (`danted`) and a real `microsocks`, started by each test
//! on a free loopback port with their own config, in front of a real echo server
//! (Python `websockets`, else Node `ws`) and of nginx for `wss://`.
//!
//! Skipped loudly when a peer is missing (`sh .ci/install-peers.sh`); a failure with
//! `WSBEAT_REQUIRE_PEERS=1`.

mod interop_support;

use interop_support::echo::{EchoServer, next_text, short_heartbeat};
use interop_support::socks::Socks;
use interop_support::tls::{Nginx, Site};
use interop_support::{next_event, poll_until, via};
use wsbeat::{Client, Error, Event, SocksFailure};

fn echo_once(client: &Client, text: &str) {
    client.send_text(text).unwrap();
    assert_eq!(next_text(&client.events(), "echo"), text);
}

#[test]
fn ws_through_dante_socks5_and_socks5h() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    let Some(proxy) = Socks::dante(interop_support::free_port()) else {
        return;
    };
    eprintln!("peer: {}", proxy.version);
    // socks5: resolved here, sent as an address; socks5h: the name goes to the proxy.
    for (scheme, url) in [
        ("socks5", server.url()),
        ("socks5h", server.url().replace("127.0.0.1", "localhost")),
    ] {
        let client = via(&url, &proxy.url(scheme))
            .heartbeat(short_heartbeat())
            .connect()
            .unwrap_or_else(|e| panic!("{scheme} via Dante: {e}\n{}", proxy.diagnostics()));
        echo_once(&client, &format!("through {scheme}"));
        assert!(
            poll_until(|| client.stats().rtt.is_some()),
            "no heartbeat reply through the proxy"
        );
        let _ = client.close();
    }
    // Dante logged both tunnels (it logs the address it connected to, also for the
    // name; the bytes socks5h sends are checked in src/transport/socks.rs's unit tests).
    let log = proxy.log();
    let to_server = format!(" 127.0.0.1.{}", server.port);
    let tunnels = log
        .lines()
        .filter(|l| l.contains("tcp/connect") && l.trim_end().ends_with(&to_server))
        .count();
    assert_eq!(tunnels, 2, "{log}");
}

#[test]
fn wss_through_dante_to_nginx() {
    let Some(nginx) = Nginx::start() else { return };
    let Some(proxy) = Socks::dante(interop_support::free_port()) else {
        return;
    };
    // TLS runs inside the tunnel: the certificate is checked for "localhost".
    let client = via(&nginx.url(Site::Good), &proxy.url("socks5h"))
        .add_root_certificate(&nginx.pki.read("ca.pem"))
        .connect()
        .unwrap_or_else(|e| {
            panic!(
                "wss via Dante: {e}\n{}\n{}",
                proxy.diagnostics(),
                nginx.diagnostics()
            )
        });
    client.send_text("header X-Forwarded-Proto").unwrap();
    assert_eq!(
        next_text(&client.events(), "proto"),
        "header X-Forwarded-Proto=https"
    );
    let _ = client.close();
}

#[test]
fn dante_refuses_a_destination_its_rules_block() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    let Some(proxy) = Socks::dante(server.port) else {
        return;
    };
    match via(&server.url(), &proxy.url("socks5")).connect() {
        Err(e @ Error::Socks(SocksFailure::Reply(2))) => {
            assert!(e.is_fatal());
            assert!(e.to_string().contains("not allowed"), "{e}");
        }
        Err(e) => panic!("expected Error::Socks(Reply(2)), got {e:?}"),
        Ok(_) => panic!("Dante tunnelled to a destination its rules block"),
    }
    // Fatal: with reconnection on, one attempt, then GaveUp and Closed.
    let client = via(&server.url(), &proxy.url("socks5h"))
        .connect_lazy()
        .unwrap();
    let events = client.events();
    match next_event(&events, "GaveUp") {
        Event::GaveUp(Error::GaveUp { attempts: 1, last }) => {
            assert!(
                matches!(*last, Error::Socks(SocksFailure::Reply(2))),
                "{last:?}"
            )
        }
        other => panic!("expected GaveUp after one attempt, got {other:?}"),
    }
    assert!(matches!(next_event(&events, "Closed"), Event::Closed));
}

#[test]
fn microsocks_user_password_ok_bad_and_missing() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    let Some(proxy) = Socks::microsocks(Some(("wsuser", "s3cret-pass"))) else {
        return;
    };
    eprintln!("peer: {}", proxy.version);
    // Good credentials (percent-encoded in the URL: %2D is "-").
    let client = via(
        &server.url(),
        &proxy.url_with("socks5h", "wsuser", "s3cret%2Dpass"),
    )
    .connect()
    .unwrap_or_else(|e| panic!("microsocks with auth: {e}\n{}", proxy.diagnostics()));
    echo_once(&client, "authenticated");
    let _ = client.close();

    // Missing: the proxy accepts no method we offer.
    match via(&server.url(), &proxy.url("socks5")).connect() {
        Err(e @ Error::Socks(SocksFailure::AuthRequired)) => {
            assert!(e.is_fatal());
            assert!(e.to_string().contains("user:password"), "{e}");
        }
        Err(e) => panic!("expected Error::Socks(AuthRequired), got {e:?}"),
        Ok(_) => panic!("connected through the proxy without credentials"),
    }
    // Wrong password: rejected, and the password never shows in the error.
    match via(
        &server.url(),
        &proxy.url_with("socks5", "wsuser", "wrong-pw"),
    )
    .connect()
    {
        Err(e @ Error::Socks(SocksFailure::AuthRejected)) => {
            assert!(e.is_fatal());
            assert!(!format!("{e} {e:?}").contains("wrong-pw"));
        }
        Err(e) => panic!("expected Error::Socks(AuthRejected), got {e:?}"),
        Ok(_) => panic!("connected through the proxy with a wrong password"),
    }
}

#[test]
fn microsocks_reports_a_refused_destination() {
    let Some(proxy) = Socks::microsocks(None) else {
        return;
    };
    // Nothing listens there: the proxy's connect is refused, reply 5; not fatal (the
    // server may come back).
    let closed = interop_support::free_port();
    match via(&format!("ws://127.0.0.1:{closed}/"), &proxy.url("socks5")).connect() {
        Err(e @ Error::Socks(SocksFailure::Reply(5))) => assert!(!e.is_fatal()),
        Err(e) => panic!("expected Error::Socks(Reply(5)), got {e:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}

#[test]
fn socks4_through_dante() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    let Some(proxy) = Socks::dante(interop_support::free_port()) else {
        return;
    };
    // SOCKS4: the name is resolved here, the proxy gets an IPv4 address and a user id.
    let url = server.url().replace("127.0.0.1", "localhost");
    let client = via(&url, &format!("socks4://wsuser@127.0.0.1:{}", proxy.port))
        .connect()
        .unwrap_or_else(|e| panic!("socks4 via Dante: {e}\n{}", proxy.diagnostics()));
    echo_once(&client, "through socks4");
    let _ = client.close();
    // Dante 1.4 does not do SOCKS4a (names): it answers 91, a typed error whose message
    // points to the alternatives.
    match via(&url, &proxy.url("socks4a")).connect() {
        Err(e @ Error::Socks(SocksFailure::Reply(91))) => {
            assert!(e.to_string().contains("socks5h://"), "{e}")
        }
        Err(e) => panic!("expected Error::Socks(Reply(91)) from Dante, got {e:?}"),
        Ok(_) => eprintln!("this Dante build resolved a SOCKS4a name"),
    }
}
