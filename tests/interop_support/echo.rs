//! The third-party echo servers (`tests/peers/echo_server.py` on Python `websockets`,
//! `tests/peers/echo_server.js` on Node `ws`) and the test cases both suites share.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crossbeam_channel::Receiver;
use wsbeat::{Backoff, Client, ClientBuilder, DisconnectReason, Event, Heartbeat, Message};

use super::{DEADLINE, Proc, TempDir, missing_peer, next_event, peers_dir, wait_event};

/// Which library the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Python `websockets` 17.
    Python,
    /// Node `ws` 8.
    Node,
}

/// Interpreter path and library version, found once per test binary.
struct Found {
    interpreter: std::path::PathBuf,
    version: String,
}

fn probe(kind: Kind) -> &'static Result<Found, String> {
    static PY: OnceLock<Result<Found, String>> = OnceLock::new();
    static NODE: OnceLock<Result<Found, String>> = OnceLock::new();
    match kind {
        Kind::Python => PY.get_or_init(|| {
            let py = super::find_program("python3", "WSBEAT_PYTHON")?;
            let v = super::run_output(
                Command::new(&py)
                    .args(["-c", "import websockets; print(websockets.version.version)"]),
            )
            .map_err(|e| format!("the `websockets` package is not importable: {e}"))?;
            if !v.starts_with("17.") {
                return Err(format!("websockets {v} is installed; the tests want 17.x"));
            }
            Ok(Found {
                interpreter: py,
                version: v,
            })
        }),
        Kind::Node => NODE.get_or_init(|| {
            let node = super::find_program("node", "WSBEAT_NODE")?;
            let pkg = peers_dir().join("node_modules/ws/package.json");
            let v = super::run_output(
                Command::new(&node)
                    .args(["-p", "require(process.argv[1]).version"])
                    .arg(&pkg),
            )
            .map_err(|e| format!("ws is not installed in tests/peers/node_modules: {e}"))?;
            if !v.starts_with("8.") {
                return Err(format!("ws {v} is installed; the tests want 8.x"));
            }
            Ok(Found {
                interpreter: node,
                version: v,
            })
        }),
    }
}

impl Kind {
    /// What the missing-peer message calls it, and how to install it.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Kind::Python => (
                "Python 3 with the `websockets` 17.x package",
                "python3 -m pip install 'websockets==17.*'",
            ),
            Kind::Node => (
                "Node.js with the `ws` 8.x package in tests/peers/node_modules",
                "cd tests/peers && npm ci   (needs node and npm: apt-get install -y nodejs npm)",
            ),
        }
    }

    /// Whether the peer is installed (quietly).
    pub fn installed(self) -> bool {
        probe(self).is_ok()
    }

    /// Whether the peer is installed (reports it as missing when not).
    pub fn available(self) -> bool {
        match probe(self) {
            Ok(_) => true,
            Err(detail) => {
                let (what, install) = self.describe();
                missing_peer(what, detail, install);
                false
            }
        }
    }

    /// Library name and version, e.g. "websockets 17.4".
    pub fn version(self) -> String {
        match (self, probe(self)) {
            (Kind::Python, Ok(f)) => format!("websockets {}", f.version),
            (Kind::Node, Ok(f)) => format!("ws {}", f.version),
            (_, Err(e)) => e.clone(),
        }
    }
}

/// A running echo server on a free loopback port.
pub struct EchoServer {
    pub kind: Kind,
    pub port: u16,
    lines: Receiver<String>,
    proc: Proc,
    _dir: TempDir,
}

impl EchoServer {
    /// Starts the `kind` echo server with extra flags (`--close-code 4001` ...).
    /// `None` (after a loud message) when the peer is not installed.
    pub fn start(kind: Kind, args: &[&str]) -> Option<EchoServer> {
        if !kind.available() {
            return None;
        }
        let Ok(found) = probe(kind) else {
            unreachable!()
        };
        let dir = TempDir::new("echo");
        let script = match kind {
            Kind::Python => "echo_server.py",
            Kind::Node => "echo_server.js",
        };
        let mut cmd = Command::new(&found.interpreter);
        cmd.arg(peers_dir().join(script))
            .arg("--exit-on-stdin-eof")
            .args(args);
        let name = format!("{kind:?} echo server");
        let mut proc = Proc::spawn(&name, &mut cmd, &dir.join("stderr.log"));
        let lines = proc.stdout_lines();
        // The first line is the port, printed once the server listens.
        let port = match lines.recv_timeout(DEADLINE) {
            Ok(l) => l.trim().parse::<u16>().unwrap_or_else(|_| {
                panic!(
                    "{name} printed {l:?} instead of its port\n{}",
                    proc.diagnostics()
                )
            }),
            Err(_) => {
                proc.check_alive();
                panic!(
                    "{name} printed no port within {DEADLINE:?}\n{}",
                    proc.diagnostics()
                )
            }
        };
        Some(EchoServer {
            kind,
            port,
            lines,
            proc,
            _dir: dir,
        })
    }

    /// The Python echo server if installed, else the Node one; if neither is,
    /// reports Python as missing (`None`).
    pub fn start_any() -> Option<EchoServer> {
        let kind = [Kind::Python, Kind::Node]
            .into_iter()
            .find(|k| k.installed())
            .unwrap_or(Kind::Python);
        EchoServer::start(kind, &[])
    }

    /// `ws://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// Waits for a stdout line of the server starting with `prefix` (skipping others).
    pub fn expect_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!(
                    "{:?} server printed no line starting with {prefix:?} within {DEADLINE:?}; \
                     lines: {seen:?}\n{}",
                    self.kind,
                    self.proc.diagnostics()
                ),
            }
        }
    }

    /// The server's stderr (for failure messages).
    pub fn diagnostics(&self) -> String {
        self.proc.diagnostics()
    }
}

/// A quick reconnect policy for tests (first retry within 50 ms).
pub fn quick_backoff() -> Backoff {
    Backoff::default()
        .initial(Duration::from_millis(50))
        .max(Duration::from_millis(200))
}

/// Heartbeat for tests that expect the link to stay up: a ping after 300 ms idle, but
/// a generous 3 s for the reply, so a loaded machine cannot cause a false death.
pub fn short_heartbeat() -> Heartbeat {
    Heartbeat::ping(Duration::from_millis(300), Duration::from_secs(3))
}

/// Heartbeat for tests that expect a death: a ping after 300 ms idle, dead when no
/// reply came 600 ms later (detection within about a second).
pub fn fast_heartbeat() -> Heartbeat {
    Heartbeat::ping(Duration::from_millis(300), Duration::from_millis(600))
}

/// The byte pattern of the servers' `fragmented` command: byte i = i % 251.
pub fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// Waits for the next text or binary message (skipping other events).
pub fn next_message(events: &wsbeat::Events, what: &str) -> Message {
    match wait_event(events, what, |e| {
        matches!(e, Event::Message(Message::Text(_) | Message::Binary(_)))
    }) {
        Event::Message(m) => m,
        _ => unreachable!(),
    }
}

/// Waits for a text message and returns it.
pub fn next_text(events: &wsbeat::Events, what: &str) -> String {
    match next_message(events, what) {
        Message::Text(t) => t.as_str().to_string(),
        other => panic!(
            "expected a text message ({what}), got {}",
            super::shorten(&Event::Message(other))
        ),
    }
}

/// Connects (eagerly) with the given builder tweaks; waits for `Connected` gen 1.
pub fn connect(server: &EchoServer, tweak: impl FnOnce(ClientBuilder) -> ClientBuilder) -> Client {
    let builder = Client::builder(&server.url())
        .no_proxy()
        .connect_timeout(Duration::from_secs(5));
    let client = tweak(builder).connect().unwrap_or_else(|e| {
        panic!(
            "connect to {:?} server: {e}\n{}",
            server.kind,
            server.diagnostics()
        )
    });
    wait_event(&client.events(), "Connected", |e| {
        matches!(e, Event::Connected { generation: 1, .. })
    });
    client
}

// ---------------------------------------------------------------------------------
// Cases shared by tests/interop_python.rs and tests/interop_node.rs.
// ---------------------------------------------------------------------------------

/// Text (ASCII and multi-byte UTF-8), binary and an empty message come back
/// unchanged and in order; a custom upgrade header reaches the server.
pub fn case_echo(kind: Kind) {
    let Some(server) = EchoServer::start(kind, &[]) else {
        return;
    };
    let client = connect(&server, |b| b.header("X-Wsbeat-Test", "interop 1"));
    let events = client.events();
    client.send_text("hello").unwrap();
    client.send_text("héllo wörld ✓ 🦀").unwrap();
    client.send_binary(vec![0u8, 1, 2, 254, 255]).unwrap();
    client.send_text("").unwrap();
    assert_eq!(next_text(&events, "echo 1"), "hello");
    assert_eq!(next_text(&events, "echo 2"), "héllo wörld ✓ 🦀");
    assert_eq!(
        next_message(&events, "echo 3"),
        Message::Binary(vec![0u8, 1, 2, 254, 255].into())
    );
    assert_eq!(next_text(&events, "echo 4"), "");
    client.send_text("header X-Wsbeat-Test").unwrap();
    assert_eq!(
        next_text(&events, "header echo"),
        "header X-Wsbeat-Test=interop 1"
    );
    assert_eq!(client.stats().generation, 1);
    let _ = client.close();
    server.expect_line("peer-closed 1000");
}

/// The client's heartbeat pings are answered by the server: with `strict(true)` only a
/// pong with the probe's payload proves liveness, and three probes in a row are
/// answered on the same connection. The RTT shows in `stats()`.
pub fn case_heartbeat_ping_pong(kind: Kind) {
    let Some(server) = EchoServer::start(kind, &[]) else {
        return;
    };
    // A probe every 500 ms; only a 500 ms stall of the server could fake a death.
    let hb = Heartbeat::ping(Duration::from_millis(500), Duration::from_millis(500));
    let client = connect(&server, |b| {
        b.heartbeat(hb.strict(true))
            .surface_pings(true)
            .reconnect(false)
    });
    let events = client.events();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        match next_event(&events, "heartbeat pongs") {
            Event::Message(Message::Pong(p)) => {
                let seq = u64::from_be_bytes(
                    p[..]
                        .try_into()
                        .unwrap_or_else(|_| panic!("pong payload {p:?}")),
                );
                seqs.push(seq);
            }
            e @ (Event::Disconnected { .. }
            | Event::HeartbeatMissed { .. }
            | Event::GaveUp(_)
            | Event::Closed) => panic!("heartbeat failed after pongs {seqs:?}: {e:?}"),
            _ => {}
        }
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "pong sequence {seqs:?}"
    );
    let rtt = client
        .stats()
        .rtt
        .expect("an answered probe sets stats().rtt");
    assert!(rtt < DEADLINE, "rtt {rtt:?}");
    assert_eq!(client.stats().generation, 1);
    let _ = client.close();
}

/// Pings sent by the server get pongs from the client (the server waits for each).
pub fn case_server_pings(kind: Kind) {
    let Some(server) = EchoServer::start(kind, &[]) else {
        return;
    };
    let client = connect(&server, |b| b.surface_pings(true));
    let events = client.events();
    client.send_text("ping-me 3").unwrap();
    let mut pings = 0;
    loop {
        match next_event(&events, "server pings and the pongs verdict") {
            Event::Message(Message::Ping(_)) => pings += 1,
            Event::Message(Message::Text(t)) => {
                assert_eq!(t.as_str(), "pongs 3", "the server did not get its pongs");
                break;
            }
            Event::Message(Message::Pong(_)) | Event::HeartbeatMissed { .. } => {}
            e => panic!("unexpected event during server pings: {e:?}"),
        }
    }
    assert_eq!(pings, 3, "pings surfaced to the user");
    let _ = client.close();
}

/// The server closes with a custom code and reason: the client reports exactly them,
/// completes the close handshake (the server receives the echoed code), and then
/// reconnects (a peer close is not fatal) to a working connection.
pub fn case_server_close(kind: Kind) {
    let reason = format!("bye from {kind:?}");
    let Some(server) =
        EchoServer::start(kind, &["--close-code", "4001", "--close-reason", &reason])
    else {
        return;
    };
    let client = connect(&server, |b| b.reconnect_policy(quick_backoff()));
    let events = client.events();
    client.send_text("close-me").unwrap();
    let e = wait_event(&events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    });
    match e {
        Event::Disconnected {
            generation: 1,
            reason: DisconnectReason::ClosedByPeer { code, reason: r },
        } => {
            assert_eq!(code, 4001);
            assert_eq!(r, reason);
        }
        other => panic!("expected ClosedByPeer 4001, got {other:?}"),
    }
    // The server saw our close reply (same code, as RFC 6455 5.5.1 suggests).
    assert_eq!(
        server.expect_line("close-handshake-done"),
        "close-handshake-done 4001"
    );
    wait_event(&events, "Connected 2", |e| {
        matches!(e, Event::Connected { generation: 2, .. })
    });
    client.send_text("after reconnect").unwrap();
    assert_eq!(next_text(&events, "echo on gen 2"), "after reconnect");
    let _ = client.close();
}

/// Same, without reconnection: the client ends with `GaveUp` (caused by `ConnectionLost`),
/// `Closed`.
pub fn case_server_close_no_reconnect(kind: Kind) {
    let Some(server) = EchoServer::start(
        kind,
        &["--close-code", "1001", "--close-reason", "going away"],
    ) else {
        return;
    };
    let client = connect(&server, |b| b.reconnect(false));
    let events = client.events();
    client.send_text("close-me").unwrap();
    let expected = DisconnectReason::ClosedByPeer {
        code: 1001,
        reason: "going away".into(),
    };
    match wait_event(&events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    }) {
        Event::Disconnected { reason, .. } => assert_eq!(reason, expected),
        _ => unreachable!(),
    }
    match next_event(&events, "GaveUp") {
        Event::GaveUp(wsbeat::Error::GaveUp { last, .. }) => {
            assert!(
                matches!(*last, wsbeat::Error::ConnectionLost(ref r) if *r == expected),
                "{last:?}"
            )
        }
        other => panic!("expected GaveUp(GaveUp {{ last: ConnectionLost }}), got {other:?}"),
    }
    assert!(matches!(next_event(&events, "Closed"), Event::Closed));
    assert_eq!(
        server.expect_line("close-handshake-done"),
        "close-handshake-done 1001"
    );
    assert!(client.send_text("x").is_err());
}

/// Large messages both ways: a 4 MiB binary and a 1 MiB text message echo back intact,
/// and messages the server sends fragmented (48 frames of 64 KiB; 100 frames of
/// 1000 bytes) arrive reassembled as one message each.
pub fn case_large_fragmented(kind: Kind) {
    let Some(server) = EchoServer::start(kind, &[]) else {
        return;
    };
    let client = connect(&server, |b| b.heartbeat(short_heartbeat()));
    let events = client.events();

    let big = pattern(4 << 20);
    client.send_binary(big.clone()).unwrap();
    let text: String = "0123456789abcdef✓".repeat((1 << 20) / 19);
    client.send_text(text.clone()).unwrap();
    match next_message(&events, "4 MiB echo") {
        Message::Binary(b) => assert!(b[..] == big[..], "4 MiB echo differs (len {})", b.len()),
        other => panic!(
            "expected binary, got {}",
            super::shorten(&Event::Message(other))
        ),
    }
    assert!(
        next_text(&events, "1 MiB text echo") == text,
        "1 MiB text echo differs"
    );

    for (size, chunk) in [(3usize << 20, 64usize << 10), (100_000, 1000)] {
        client
            .send_text(format!("fragmented {size} {chunk}"))
            .unwrap();
        match next_message(&events, "fragmented message") {
            Message::Binary(b) => {
                assert_eq!(b.len(), size, "reassembled size");
                assert!(b[..] == pattern(size)[..], "reassembled content differs");
            }
            other => panic!(
                "expected binary, got {}",
                super::shorten(&Event::Message(other))
            ),
        }
    }
    assert_eq!(client.stats().generation, 1, "no reconnect on the way");
    let _ = client.close();
}

/// The server stops reading its socket and sends nothing: its kernel still ACKs TCP,
/// but pings go unanswered, so the heartbeat declares the link dead
/// (`HeartbeatTimeout`) and the client reconnects to a fresh, working connection.
pub fn case_stop_reading(kind: Kind) {
    let Some(server) = EchoServer::start(kind, &[]) else {
        return;
    };
    let client = connect(&server, |b| {
        b.heartbeat(fast_heartbeat())
            .reconnect_policy(quick_backoff())
    });
    let events = client.events();
    client.send_text("stop-reading").unwrap();
    server.expect_line("stop-reading");
    expect_heartbeat_death_then_reconnect(&client, &events);
}

/// The server stops reading but keeps sending ("tick N" every 50 ms). Any inbound
/// frame proves liveness by default, so only `strict(true)` (where only pong replies
/// count) detects that the server no longer answers: it does, and the client reconnects.
pub fn case_stop_reading_chatty_strict(kind: Kind) {
    let Some(server) = EchoServer::start(kind, &[]) else {
        return;
    };
    let client = connect(&server, |b| {
        b.heartbeat(fast_heartbeat().strict(true))
            .reconnect_policy(quick_backoff())
    });
    let events = client.events();
    client.send_text("stop-reading-chatty").unwrap();
    server.expect_line("stop-reading-chatty");
    assert!(next_text(&events, "tick").starts_with("tick "));
    expect_heartbeat_death_then_reconnect(&client, &events);
}

fn expect_heartbeat_death_then_reconnect(client: &Client, events: &wsbeat::Events) {
    match wait_event(events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    }) {
        Event::Disconnected {
            generation: 1,
            reason: DisconnectReason::HeartbeatTimeout { .. },
        } => {}
        other => panic!("expected a heartbeat timeout of gen 1, got {other:?}"),
    }
    wait_event(events, "Connected 2", |e| {
        matches!(e, Event::Connected { generation: 2, .. })
    });
    client.send_text("alive again").unwrap();
    let got = wait_event(
        events,
        "echo on gen 2",
        |e| matches!(e, Event::Message(Message::Text(t)) if t.as_str() == "alive again"),
    );
    drop(got);
    assert_eq!(client.stats().generation, 2);
    let _ = client.close();
}
