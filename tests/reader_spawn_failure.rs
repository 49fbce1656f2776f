//! A connection that cannot be started (resource exhaustion) once it is open: its reader
//! thread after `Connected` was emitted, or the descriptors it needs. Own binary: the
//! tests lower `RLIMIT_AS` or `RLIMIT_NOFILE` for a moment, which would fail other
//! tests' threads and sockets too (and they run one at a time here).
#![cfg(target_os = "linux")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::server::TestServer;
use wsbeat::{Client, Event, Failure, ReconnectPolicy};

fn vm_size() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

fn set_as_limit(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: libc::RLIM_INFINITY,
    };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
}

/// Restores the limit when the client reports the failure.
struct Restore;
impl ReconnectPolicy for Restore {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        set_as_limit(u64::MAX);
        Some(Duration::from_millis(20))
    }
}

/// The tests of this binary one at a time: each lowers a process-wide limit.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn connected_is_always_paired_with_disconnected_when_the_reader_cannot_start() {
    let _serial = serial();
    let server = TestServer::echo();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let client = Client::builder(&server.url())
        .thread_stack_size(256 << 20)
        .reconnect_policy(Restore)
        .on_connect(move |_| {
            // Runs on the supervisor right before it publishes the connection and
            // starts its reader: leave too little address space for a 256 MiB stack.
            if a.swap(false, Ordering::SeqCst) {
                set_as_limit(vm_size() + (64 << 20));
            }
            Ok(())
        })
        .connect_lazy()
        .unwrap();
    let events = client.events();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Ok(ev) = events.recv_deadline(deadline) {
        let done = matches!(ev, Event::Connected { generation: 2, .. });
        seen.push(ev);
        if done {
            break;
        }
    }
    let _ = client.close();
    // The first connection's reader really failed to start (else this proves nothing):
    // the client went on to a second connection.
    assert!(
        matches!(seen.last(), Some(Event::Connected { generation: 2, .. })),
        "no second connection: {seen:?}"
    );
    // `Connected { 1 }` is followed by its `Disconnected { 1 }` before anything else of
    // the next attempt. It was missing: Connected, Reconnecting, Connected.
    support::client::assert_grammar(&seen, false);
}

fn set_nofile_limit(n: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = n.min(lim.rlim_max);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

fn nofile_limit() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur
}

/// The lowest descriptor number not in use: a limit of that many leaves none free.
fn lowest_free_fd() -> libc::rlim_t {
    let used: std::collections::HashSet<libc::rlim_t> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// `connect()` returns `Ok` only with the connection open. The first connection was
/// opened, but the descriptors its reader and waker need were not to be had: before,
/// `connect()` returned `Ok` with the client in `Backoff` and no `Connected` (scale
/// probe, 3 of 3 runs), so the caller never saw the error.
#[test]
fn connect_returns_the_error_of_a_first_connection_that_cannot_start() {
    let _serial = serial();
    let server = TestServer::echo();
    let before = nofile_limit();
    let r = Client::builder(&server.url())
        .on_connect(|_| {
            // Runs on this thread once the upgrade is done: from here on, no descriptor
            // can be opened (the client's threads need none to start).
            set_nofile_limit(lowest_free_fd());
            Ok(())
        })
        .connect();
    set_nofile_limit(before);
    match r {
        Err(e @ wsbeat::Error::Io(_)) => {
            assert!(!e.is_fatal(), "{e}");
        }
        Err(e) => panic!("expected an I/O error, got {e:?}"),
        Ok(c) => panic!("connect() returned Ok with the client {:?}", c.state()),
    }
    support::client::assert_no_client_threads("a failed connect()", Duration::from_secs(10));
}
