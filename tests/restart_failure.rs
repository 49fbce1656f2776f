//! A `restart()` whose new client cannot start (resource exhaustion). Own binary: it
//! uses up every file descriptor for a moment, which would fail other tests too.
#![cfg(target_os = "linux")]

mod support;

use std::time::Duration;

use wsbeat::{Client, Event, Failure, Message, ReconnectPolicy};

fn set_nofile(soft: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let old = lim.rlim_cur;
    lim.rlim_cur = soft;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    old
}

/// Waits an hour between attempts: the client stays offline, its messages queued.
struct Hour;
impl ReconnectPolicy for Hour {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}

/// The messages `restart()` takes from the client it closes are accepted messages: if
/// the new client cannot start, they must come back, not vanish with it.
#[test]
fn a_restart_that_cannot_start_hands_back_the_messages_it_took() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", dead.local_addr().unwrap());
    drop(dead);
    let client = Client::builder(&url)
        .reconnect_policy(Hour)
        .connect_lazy()
        .unwrap();
    let events = client.events();
    for t in ["a", "b", "c"] {
        client.send_text(t).expect("queued while offline");
    }
    // No descriptor left for the new client (the old one keeps its own until dropped).
    let old = set_nofile(512);
    let mut hold = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hold.push(f);
    }
    let restarted = client.restart();
    drop(hold);
    set_nofile(old);
    let err = match restarted {
        Ok(_) => panic!("the new client started: this proves nothing"),
        Err(e) => e,
    };
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Ok(ev) = events.recv_deadline(deadline) {
        seen.push(ev);
    }
    let back: Vec<Message> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Undelivered(m) => Some(m.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        back,
        ["a", "b", "c"].map(Message::text),
        "restart failed ({err}) and the messages it took were lost: {seen:?}"
    );
    support::client::assert_grammar(&seen, false);
    assert!(matches!(seen.last(), Some(Event::Closed)), "{seen:?}");
}
