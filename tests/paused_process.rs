//! Promise 3 on a paused machine: the client process is stopped (`SIGSTOP`) for less than
//! the heartbeat timeout while a live peer's in-time reply arrives. When it resumes, the
//! timer may run before the reader has read that reply; it must not declare the link
//! dead. The peer runs in another process (this test binary run again), so it goes on
//! while the client is stopped; this binary holds only this test, since stopping the
//! process stops every test in it.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tungstenite::Message;
use wsbeat::{Client, Event, Heartbeat};

mod support;
use support::client::Fixed;

const INTERVAL: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(1);
/// The peer answers each ping this late (within the timeout)...
const PONG_DELAY: Duration = Duration::from_millis(600);
/// ...and stops the client process from this long after the ping, for this long, so
/// that the pong arrives while it is stopped and it resumes past the reply deadline.
const STOP_AT: Duration = Duration::from_millis(500);
const STOP_FOR: Duration = Duration::from_millis(600);
const CYCLES: u32 = 6;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The peer, in its own process: run by `a_paused_process_keeps_a_live_link` only.
#[test]
#[ignore = "the peer process of a_paused_process_keeps_a_live_link"]
fn peer_process() {
    let Ok(pid) = std::env::var("WSBEAT_TEST_CLIENT_PID") else {
        return;
    };
    let pid: u32 = pid.parse().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "PORT {port}").unwrap();
        out.flush().unwrap();
    }
    let (sock, _) = listener.accept().unwrap();
    sock.set_nodelay(true).unwrap();
    let mut ws = tungstenite::accept(sock).unwrap();
    // The schedule *is* the scenario (a paused client and a late pong), not a
    // synchronisation.
    while let Ok(m) = ws.read() {
        if let Message::Ping(_) = m {
            let pinged = Instant::now();
            // tungstenite queued the pong: it goes out with the flush below.
            std::thread::sleep(STOP_AT);
            signal(pid, "-STOP");
            let stopped = Instant::now();
            std::thread::sleep(PONG_DELAY.saturating_sub(pinged.elapsed()));
            let _ = ws.flush();
            std::thread::sleep(STOP_FOR.saturating_sub(stopped.elapsed()));
            signal(pid, "-CONT");
        }
    }
}

#[test]
fn a_paused_process_keeps_a_live_link() {
    let mut peer = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "peer_process", "--ignored", "--nocapture"])
        .env("WSBEAT_TEST_CLIENT_PID", std::process::id().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("the peer's port").unwrap();
        if let Some(p) = line.strip_prefix("PORT ") {
            break p.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let client = Client::builder(&format!("ws://127.0.0.1:{port}/"))
        .heartbeat(Heartbeat::ping(INTERVAL, TIMEOUT))
        .reconnect_policy(Fixed(Duration::from_millis(100)))
        .connect()
        .unwrap();
    let events = client.events();
    // Each ping cycle stops us once: about `INTERVAL + PONG_DELAY` per cycle.
    let end = Instant::now() + (INTERVAL + TIMEOUT) * CYCLES;
    let mut kills = Vec::new();
    while let Ok(ev) = events.recv_deadline(end) {
        if let Event::Disconnected { reason, .. } = ev {
            kills.push(reason);
        }
    }
    let rtt = client.stats().rtt;
    let _ = client.close();
    let _ = peer.kill();
    let _ = peer.wait();
    assert!(
        kills.is_empty(),
        "a live peer was declared dead after a pause shorter than the timeout: {kills:?}"
    );
    assert!(
        rtt.is_some_and(|r| r >= PONG_DELAY),
        "the late pongs were seen: rtt {rtt:?}"
    );
}
