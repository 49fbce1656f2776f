//! HTTP CONNECT proxies: a real tinyproxy, started by each test on a free loopback
//! port with its own generated config (`Allow 127.0.0.1`, `ConnectPort` for the
//! target, optionally `BasicAuth`), in front of a real echo server (Python
//! `websockets`, else Node `ws`) and of nginx for `wss://`.
//!
//! The proxy is set with `.proxy(url)`: loopback destinations bypass the
//! HTTPS_PROXY/HTTP_PROXY environment variables (like Go), so env proxies cannot be
//! tested on loopback. Skipped loudly when a peer is missing
//! (`sh .ci/install-peers.sh`); a failure with `WSBEAT_REQUIRE_PEERS=1`.

mod interop_support;

use interop_support::echo::{EchoServer, next_text, short_heartbeat};
use interop_support::proxy::Tinyproxy;
use interop_support::tls::{Nginx, Site};
use interop_support::{next_event, poll_until, via};
use wsbeat::{Error, Event};

/// tinyproxy logs every CONNECT it handles ("CONNECT HOST:PORT HTTP/1.1").
fn connects_logged(proxy: &Tinyproxy, host: &str, port: u16) -> usize {
    let needle = format!("CONNECT {host}:{port} ");
    proxy.log().lines().filter(|l| l.contains(&needle)).count()
}

#[test]
fn ws_through_tinyproxy() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    let Some(proxy) = Tinyproxy::start(&[server.port], None) else {
        return;
    };
    let client = via(&server.url(), &proxy.url())
        .heartbeat(short_heartbeat())
        .connect()
        .unwrap_or_else(|e| panic!("connect via tinyproxy: {e}\n{}", proxy.diagnostics()));
    let events = client.events();
    client.send_text("through the tunnel").unwrap();
    assert_eq!(next_text(&events, "echo"), "through the tunnel");
    assert!(
        poll_until(|| client.stats().rtt.is_some()),
        "no heartbeat reply through the proxy"
    );
    assert_eq!(
        connects_logged(&proxy, "127.0.0.1", server.port),
        1,
        "{}",
        proxy.log()
    );
    let _ = client.close();
}

#[test]
fn proxy_basic_auth() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    let Some(proxy) = Tinyproxy::start(&[server.port], Some(("wsuser", "s3cret-pass"))) else {
        return;
    };
    // Good credentials (percent-encoded in the URL: %2D is "-").
    let client = via(&server.url(), &proxy.url_with("wsuser", "s3cret%2Dpass"))
        .connect()
        .unwrap_or_else(|e| panic!("connect with proxy auth: {e}\n{}", proxy.diagnostics()));
    client.send_text("authenticated").unwrap();
    assert_eq!(next_text(&client.events(), "echo"), "authenticated");
    let _ = client.close();

    // No credentials: 407 Proxy Authentication Required, which is fatal.
    let no_creds = format!("http://127.0.0.1:{}", proxy.port);
    match via(&server.url(), &no_creds).connect() {
        Err(e @ Error::Proxy { status: 407 }) => {
            assert!(e.is_fatal());
            assert!(e.to_string().contains("407"), "{e}");
        }
        Err(e) => panic!("expected Error::Proxy {{ status: 407 }}, got {e:?}"),
        Ok(_) => panic!("connected through the proxy without credentials"),
    }
    // With reconnection on, the client gives up after exactly one attempt.
    let client = via(&server.url(), &no_creds).connect_lazy().unwrap();
    let events = client.events();
    match next_event(&events, "GaveUp") {
        Event::GaveUp(Error::GaveUp { attempts: 1, last }) => {
            assert!(matches!(*last, Error::Proxy { status: 407 }), "{last:?}")
        }
        other => panic!("expected GaveUp after one attempt, got {other:?}"),
    }
    assert!(matches!(next_event(&events, "Closed"), Event::Closed));

    // Wrong password: tinyproxy 1.11 answers 401 Unauthorized here (not 407, which it
    // keeps for a missing Proxy-Authorization header); either way a typed proxy error.
    match via(&server.url(), &proxy.url_with("wsuser", "wrong")).connect() {
        Err(Error::Proxy {
            status: status @ (401 | 407),
        }) => eprintln!("wrong proxy password: HTTP {status}"),
        Err(e) => panic!("expected Error::Proxy {{ status: 401 or 407 }}, got {e:?}"),
        Ok(_) => panic!("connected through the proxy with a wrong password"),
    }
}

#[test]
fn proxy_refuses_a_port_it_does_not_allow() {
    let Some(server) = EchoServer::start_any() else {
        return;
    };
    // ConnectPort allows only some other port.
    let other = interop_support::free_port();
    let Some(proxy) = Tinyproxy::start(&[other], None) else {
        return;
    };
    match via(&server.url(), &proxy.url()).connect() {
        Err(Error::Proxy { status: 403 }) => {}
        Err(e) => panic!("expected Error::Proxy {{ status: 403 }}, got {e:?}"),
        Ok(_) => panic!("the proxy tunnelled to a port it does not allow"),
    }
}

#[test]
fn wss_through_tinyproxy_to_nginx() {
    let Some(nginx) = Nginx::start() else { return };
    let port = nginx.port(Site::Good);
    let Some(proxy) = Tinyproxy::start(&[port], Some(("u", "p"))) else {
        return;
    };
    // TLS runs inside the tunnel: the certificate is checked for "localhost", not the proxy.
    let client = via(&nginx.url(Site::Good), &proxy.url())
        .add_root_certificate(&nginx.pki.read("ca.pem"))
        .connect()
        .unwrap_or_else(|e| {
            panic!(
                "wss via tinyproxy: {e}\n{}\n{}",
                proxy.diagnostics(),
                nginx.diagnostics()
            )
        });
    let events = client.events();
    client.send_text("header X-Forwarded-Proto").unwrap();
    assert_eq!(
        next_text(&events, "proto"),
        "header X-Forwarded-Proto=https"
    );
    assert_eq!(
        connects_logged(&proxy, "localhost", port),
        1,
        "{}",
        proxy.log()
    );
    let _ = client.close();
}
