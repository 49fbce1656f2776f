//! Credentials never reach the log or an error message: URL user info, query tokens,
//! the `Authorization` header (and the Basic header made from user info), other secret
//! headers, and proxy credentials. A capturing logger at trace level records every line
//! of every crate (wsbeat and its dependencies) while the client connects, fails to
//! connect, reconnects and closes; no secret may appear in any line, nor in the
//! `Display` / `Debug` of any error, event or handle.
//!
//! A binary of its own: the logger is process-wide.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};
use support::client::Fixed;

use parking_lot::Mutex;
use support::server::{Behavior, TestServer};
use wsbeat::{Client, Event};

const T: Duration = Duration::from_secs(10);

struct Capture {
    lines: Mutex<Vec<String>>,
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.lines.lock().push(format!(
            "{} {}: {}",
            record.level(),
            record.target(),
            record.args()
        ));
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
        }));
        log::set_logger(c).expect("no other logger in this binary");
        log::set_max_level(log::LevelFilter::Trace);
        c
    })
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const USER_PW: &str = "pw-userinfo-S3CRET";
const QUERY_TOKEN: &str = "tok-query-S3CRET";
const BEARER: &str = "hdr-bearer-S3CRET";
const API_KEY: &str = "hdr-apikey-S3CRET";
const PROXY_PW: &str = "pw-proxy-S3CRET";
/// A credential carried as a subprotocol name, as Kubernetes takes a bearer token.
const PROTO_TOKEN: &str = "base64url.bearer.authorization.k8s.io.cHJvdG8tUzNDUkVU";

fn secrets() -> Vec<String> {
    vec![
        USER_PW.into(),
        QUERY_TOKEN.into(),
        BEARER.into(),
        API_KEY.into(),
        PROXY_PW.into(),
        PROTO_TOKEN.into(),
        // What the user info and proxy credentials become on the wire.
        base64(format!("alice:{USER_PW}").as_bytes()),
        base64(format!("bob:{PROXY_PW}").as_bytes()),
    ]
}

fn assert_clean(what: &str, text: &str) {
    for s in secrets() {
        assert!(!text.contains(&s), "{what} leaks {s:?}: {text}");
    }
}

/// Waits for an event matching `f`, checking every event's Debug output on the way.
fn wait_for(client: &Client, what: &str, mut f: impl FnMut(&Event) -> bool) {
    let events = client.events();
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {what} in time"));
        let shown = format!("{ev:?}");
        assert_clean("an event", &shown);
        if let Event::Reconnecting {
            last_error: Some(e),
            ..
        } = &ev
        {
            assert_clean("a reconnect error (Display)", &e.to_string());
        }
        if f(&ev) {
            return;
        }
    }
}

fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn credentials_never_appear_in_logs_errors_or_debug_output() {
    let log = capture();
    let server = TestServer::builder().accept_subprotocol("v1.json").start();
    let port = server.port();
    let url = format!("ws://alice:{USER_PW}@127.0.0.1:{port}/feed?token={QUERY_TOKEN}&v=1");

    // 1. A connect with every kind of credential, a message, a reconnect and a close.
    let builder = Client::builder(&url)
        .header("Authorization", format!("Bearer {BEARER}"))
        .header("X-Api-Key", API_KEY)
        .subprotocol("v1.json")
        .subprotocol(PROTO_TOKEN)
        .connect_timeout(T)
        .reconnect_policy(Fixed(Duration::from_millis(20)));
    assert_clean("ClientBuilder Debug", &format!("{builder:?}"));
    let client = builder.connect().expect("connect");
    assert_clean("Client Debug", &format!("{client:?}"));
    client.send_text("hello").unwrap();
    wait_for(&client, "the echo", |e| matches!(e, Event::Message(_)));
    server.reset_all();
    wait_for(&client, "the reconnect", |e| {
        matches!(e, Event::Connected { generation: 2, .. })
    });
    client.reconnect_now();
    wait_for(&client, "the requested reconnect", |e| {
        matches!(e, Event::Connected { generation: 3, .. })
    });
    assert_eq!(client.close(), vec![]);

    // The secrets really were sent (so the checks below are not vacuous).
    let hs = server.last_handshake().expect("handshake");
    assert!(hs.path.contains(QUERY_TOKEN));
    assert_eq!(
        hs.header("authorization"),
        Some(format!("Bearer {BEARER}").as_str())
    );
    assert_eq!(hs.header("x-api-key"), Some(API_KEY));
    assert_eq!(hs.subprotocols(), ["v1.json", PROTO_TOKEN]);

    // 2. User info alone becomes a Basic header; a password without a user name too
    // (it was dropped).
    for userinfo in [format!("alice:{USER_PW}"), format!(":{USER_PW}")] {
        let basic_url = format!("ws://{userinfo}@127.0.0.1:{port}/basic");
        let client = Client::builder(&basic_url).connect().expect("connect");
        let hs = server.last_handshake().expect("handshake");
        assert_eq!(
            hs.header("authorization"),
            Some(format!("Basic {}", base64(userinfo.as_bytes())).as_str())
        );
        let _ = client.close();
    }

    // 3. Failing connects: rejected upgrade, refused port, refused proxy, lazy retries.
    server.set_behavior(Behavior::reject(401));
    let err = Client::builder(&url)
        .header("Authorization", format!("Bearer {BEARER}"))
        .connect()
        .expect_err("401");
    assert_clean("401 error (Display)", &err.to_string());
    assert_clean("401 error (Debug)", &format!("{err:?}"));

    let dead = dead_port();
    let refused_url = format!("ws://alice:{USER_PW}@127.0.0.1:{dead}/feed?token={QUERY_TOKEN}");
    let err = Client::builder(&refused_url)
        .header("Authorization", format!("Bearer {BEARER}"))
        .connect()
        .expect_err("refused");
    assert_clean("refused error (Display)", &err.to_string());
    assert_clean("refused error (Debug)", &format!("{err:?}"));

    let proxy = format!("http://bob:{PROXY_PW}@127.0.0.1:{}", dead_port());
    let builder = Client::builder(&url).proxy(&proxy);
    assert_clean("ClientBuilder with proxy (Debug)", &format!("{builder:?}"));
    let err = builder.connect().expect_err("proxy refused");
    assert_clean("proxy error (Display)", &err.to_string());
    assert_clean("proxy error (Debug)", &format!("{err:?}"));

    let bad = format!("ws://alice:{USER_PW}@[::1/feed?token={QUERY_TOKEN}");
    let builder = Client::builder(&bad).header("Authorization", format!("Bearer {BEARER}"));
    assert_clean(
        "ClientBuilder with a bad URL (Debug)",
        &format!("{builder:?}"),
    );
    let err = builder.connect().expect_err("unparsable URL");
    assert_clean("URL error (Display)", &err.to_string());
    assert_clean("URL error (Debug)", &format!("{err:?}"));
    // A password holding '/', '?' or '#' unescaped makes the URL unparsable too.
    for sep in ['/', '?', '#'] {
        let bad = format!("ws://alice:pw{sep}{USER_PW}@127.0.0.1:{port}/feed");
        let err = Client::builder(&bad).connect().expect_err("unparsable URL");
        assert_clean("URL error with odd password (Display)", &err.to_string());
        assert_clean("URL error with odd password (Debug)", &format!("{err:?}"));
    }

    let client = Client::builder(&refused_url)
        .header("Authorization", format!("Bearer {BEARER}"))
        .reconnect_policy(Fixed(Duration::from_millis(20)))
        .connect_lazy()
        .expect("lazy");
    let mut retries = 0;
    wait_for(&client, "three failed attempts", |e| {
        retries += matches!(e, Event::Reconnecting { .. }) as u32;
        retries >= 3
    });
    let _ = client.close();

    // 4. Nothing in the log.
    let lines = log.lines.lock().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("wsbeat") && l.contains("<redacted>")),
        "the logger saw wsbeat's connect lines (captured {} lines)",
        lines.len()
    );
    for line in &lines {
        assert_clean("a log line", line);
    }
}
