//! A reader thread that cannot be started (resource exhaustion) after `Connected` was
//! emitted. Own binary: it lowers `RLIMIT_AS` for a moment, which would fail other tests'
//! threads too.
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

#[test]
fn connected_is_always_paired_with_disconnected_when_the_reader_cannot_start() {
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
