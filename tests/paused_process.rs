//! Promise 3 on a paused machine: the client process is stopped (`SIGSTOP`) for less than
//! the heartbeat timeout while a live peer's in-time reply arrives. When it resumes, the
//! timer may run before the reader has read that reply; it must not declare the link
//! dead. The peer runs in another process (this test binary run again), so it goes on
//! while the client is stopped. Stopping the process stops every test in it, so this
//! binary holds only tests of a paused or starved process, run one at a time.
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
    let _serial = serial();
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

/// Passive mode on a starved machine: the reader thread gets no CPU for longer than the
/// allowed silence while the peer keeps sending. When the deadline passes, the peer's
/// messages wait unread in the socket: the timer must wait for the reader rather than
/// declare a live link dead (promise 3). Passive mode has no reply timeout, so the wait
/// cannot be bounded by it.
#[test]
fn a_starved_reader_does_not_get_a_live_passive_link_killed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const MAX_SILENCE: Duration = Duration::from_secs(1);
    /// Longer than the allowed silence, shorter than twice it.
    const STARVE: Duration = Duration::from_millis(1600);
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_nodelay(true).unwrap();
            let mut ws = tungstenite::accept(sock).unwrap();
            // The pace *is* the scenario (a live peer), not a synchronisation.
            while !stop.load(Ordering::Relaxed) && ws.send(Message::text("tick")).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let client = Client::builder(&format!("ws://127.0.0.1:{port}/"))
        .heartbeat(Heartbeat::passive(MAX_SILENCE))
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    match events.recv_timeout(Duration::from_secs(10)) {
        Ok(Event::Connected { .. }) => {}
        other => panic!("{other:?}"),
    }
    match events.recv_timeout(Duration::from_secs(10)) {
        Ok(Event::Message(_)) => {}
        other => panic!("{other:?}"),
    }
    // The reader gets the CPU only when nothing else wants it; busy threads then take
    // every core. This thread does not wait on `events` meanwhile, so only the reader
    // reads the socket.
    // (A consumer may have read that message itself, before the reader thread started.)
    let started = Instant::now();
    while !idle_priority("wsbeat-reader-1") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no reader thread"
        );
        std::thread::yield_now();
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let until = Instant::now() + STARVE;
    let busy: Vec<_> = (0..2 * cores)
        .map(|_| {
            std::thread::spawn(move || {
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    busy.into_iter().for_each(|t| t.join().unwrap());
    // Back to normal: the reader reads what waited. One more allowed silence.
    let end = Instant::now() + MAX_SILENCE;
    let mut kills = Vec::new();
    let mut messages = 0;
    while let Ok(ev) = events.recv_deadline(end) {
        match ev {
            Event::Disconnected { reason, .. } => kills.push(reason),
            Event::Message(_) => messages += 1,
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = client.close();
    peer.join().unwrap();
    assert!(
        kills.is_empty(),
        "a live passive link was declared dead while its reader was starved: {kills:?}"
    );
    assert!(messages >= 10, "the peer's messages were read: {messages}");
}

/// Tests in this binary one at a time: one stops the process, one takes every core.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Puts this process's thread named `name` in `SCHED_IDLE`: it runs only on an
/// otherwise idle core. False if there is no such thread.
fn idle_priority(name: &str) -> bool {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    for task in tasks.filter_map(Result::ok) {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let tid: libc::pid_t = task.file_name().to_str().unwrap().parse().unwrap();
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain system call on a thread of this process; `param` outlives it.
        let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
        assert_eq!(
            rc,
            0,
            "sched_setscheduler: {}",
            std::io::Error::last_os_error()
        );
        return true;
    }
    false
}
