//! Closing a client leaves nothing behind: every `wsbeat-*` thread is joined and every
//! descriptor is closed, whether the user calls `close()` or just drops the last handle,
//! and whatever the client was doing at the time (open, in backoff, mid-connect).
//!
//! These tests count process-wide resources, so each holds `util::exclusive()`.

mod support;

use std::time::{Duration, Instant};

use support::certs::{self, ServerCert};
use support::server::{Behavior, TestServer};
use support::util;
use wsbeat::{Client, Event, Message, State};

/// Upper bound for anything that should happen "now" (generous: loaded 2-core machine).
const T: Duration = Duration::from_secs(10);

fn wsbeat_threads() -> Vec<String> {
    let mut names: Vec<String> = util::thread_names()
        .into_iter()
        .filter(|n| n.starts_with("wsbeat-"))
        .collect();
    names.sort();
    names
}

/// Waits until no `wsbeat-*` thread is left (a joined thread may linger in /proc briefly).
fn assert_no_wsbeat_threads(after: &str) {
    assert!(
        util::wait_until(T, || util::threads_named("wsbeat-") == 0),
        "threads left after {after}: {:?}",
        wsbeat_threads()
    );
}

/// Waits for `Event::Closed`.
fn wait_closed(events: &wsbeat::Events) {
    let deadline = Instant::now() + T;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Closed) => return,
            Ok(_) => {}
            Err(e) => panic!("no Closed event: {e}"),
        }
    }
}

fn echo_once(client: &Client) {
    let events = client.events();
    client.send_text("ping?").unwrap();
    let deadline = Instant::now() + T;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Message(m)) => {
                assert_eq!(m, Message::text("ping?"));
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("no echo: {e}"),
        }
    }
}

#[test]
fn close_joins_every_internal_thread() {
    let _g = util::exclusive();
    assert_no_wsbeat_threads("the previous test");
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    echo_once(&client);
    // Thread names read back from /proc are cut to 15 bytes; a thread names itself once it
    // first runs, so wait for that.
    let expected = ["wsbeat-reader-1", "wsbeat-reconnec", "wsbeat-timer"];
    assert!(
        util::wait_until(T, || wsbeat_threads() == expected),
        "while open: {:?}",
        wsbeat_threads()
    );

    let _ = client.close();
    assert_eq!(client.state(), State::Closed);
    assert_no_wsbeat_threads("close()");
    wait_closed(&events);
    // The handle outlives close(); dropping it later changes nothing.
    drop(client);
    assert_no_wsbeat_threads("dropping a closed client");
}

#[test]
fn dropping_the_last_handle_without_close_joins_every_internal_thread() {
    let _g = util::exclusive();
    assert_no_wsbeat_threads("the previous test");
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    let clones: Vec<Client> = (0..3).map(|_| client.clone()).collect();
    echo_once(&client);
    assert!(util::wait_until(T, || util::threads_named("wsbeat-") == 3));

    drop(clones);
    assert!(
        util::threads_named("wsbeat-") >= 3,
        "dropping clones must not close"
    );
    assert_eq!(client.state(), State::Open);
    drop(client);
    assert_no_wsbeat_threads("dropping the last handle");
    wait_closed(&events);
    assert!(server.wait_live(0, T), "the server saw the connection end");
}

#[test]
fn dropping_a_client_in_backoff_joins_every_internal_thread() {
    let _g = util::exclusive();
    assert_no_wsbeat_threads("the previous test");
    let server = TestServer::echo();
    let client = Client::builder(&server.url()).connect().unwrap();
    let events = client.events();
    echo_once(&client);
    server.stop(); // the connection ends and reconnects are refused: the client backs off
    let deadline = Instant::now() + T;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Reconnecting { .. }) => break,
            Ok(_) => {}
            Err(e) => panic!("no Reconnecting event: {e}"),
        }
    }
    drop(client);
    assert_no_wsbeat_threads("dropping a client in backoff");
    wait_closed(&events);
}

#[test]
fn dropping_a_client_mid_connect_aborts_the_attempt_and_joins_every_thread() {
    let _g = util::exclusive();
    assert_no_wsbeat_threads("the previous test");
    let server = TestServer::start(Behavior::Hang);
    let client = Client::builder(&server.url())
        .connect_timeout(Duration::from_secs(60))
        .connect_lazy()
        .unwrap();
    let events = client.events();
    assert!(server.wait_accepted(1, T), "the attempt reached the server");
    let t0 = Instant::now();
    drop(client);
    let took = t0.elapsed();
    // Waiting out the 60 s connect timeout would be the bug; large slack for a loaded machine.
    assert!(took < Duration::from_secs(10), "drop took {took:?}");
    assert_no_wsbeat_threads("dropping a client mid-connect");
    wait_closed(&events);
}

#[test]
fn connect_close_cycles_leave_no_threads_or_descriptors() {
    let _g = util::exclusive();
    assert_no_wsbeat_threads("the previous test");
    let server = TestServer::echo();
    let tls_server = TestServer::builder().tls(ServerCert::Valid).start();
    let plain = || Client::builder(&server.url()).connect().unwrap();
    let tls = || {
        Client::builder(&tls_server.wss_url())
            .add_root_certificate(&certs::ca_pem())
            .connect()
            .unwrap()
    };
    // By host name too, so the resolver thread (wsbeat-dns) is part of the cycles.
    let by_name = || {
        let url = format!("ws://localhost:{}/", server.port());
        Client::builder(&url).connect().unwrap()
    };
    // Warm up once so lazily opened, process-lifetime descriptors are in the baseline.
    for c in [plain(), tls(), by_name()] {
        echo_once(&c);
        let _ = c.close();
    }
    assert!(server.wait_live(0, T) && tls_server.wait_live(0, T));
    let baseline = util::fd_count();

    for round in 0..6 {
        let c = match round % 3 {
            0 => plain(),
            1 => tls(),
            _ => by_name(),
        };
        echo_once(&c);
        assert!(
            util::fd_count() > baseline,
            "an open client holds descriptors"
        );
        if round < 3 {
            let _ = c.close();
        } else {
            drop(c);
        }
    }
    assert_no_wsbeat_threads("connect/close cycles");
    assert!(server.wait_live(0, T) && tls_server.wait_live(0, T));
    assert!(
        util::wait_until(T, || util::fd_count() <= baseline),
        "descriptors: {} now, {baseline} before the cycles",
        util::fd_count()
    );
}
