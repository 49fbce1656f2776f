//! Promise 3 at its edges, from the review of a8cb025 / cd662fd / 07251c4: a dead peer
//! is judged in time while the consumer is behind (whatever ended the reader's last
//! drain, and also when the peer only sent FIN), and a live one is not killed while a
//! large message trickles in with its pings, whoever reads it.

mod support;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::{Bytes, Message};
use wsbeat::{Client, Event, Heartbeat, Liveness, State};

use support::util::wait_until;

static SERIAL: Mutex<()> = Mutex::new(());

/// A raw server: accepts one client, upgrades, runs `script` on the websocket.
/// Returns the url and a sender that ends the server when dropped/sent.
fn raw_server(
    script: impl FnOnce(&mut tungstenite::WebSocket<TcpStream>, &mpsc::Receiver<()>) + Send + 'static,
) -> (String, mpsc::Sender<()>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_nodelay(true).unwrap();
        let mut ws = tungstenite::accept(sock).unwrap();
        script(&mut ws, &rx);
    });
    (url, tx, t)
}

/// Waits until the client's state leaves Open (declared dead), up to `limit`; returns
/// how long it took.
/// A client of `url` pinging every 200 ms with a 200 ms timeout, holding at most
/// `messages` for its consumer, not reconnecting.
fn pinging(url: &str, messages: usize) -> wsbeat::ClientBuilder {
    Client::builder(url)
        .heartbeat(Heartbeat::ping(
            Duration::from_millis(200),
            Duration::from_millis(200),
        ))
        .event_capacity(messages, 1 << 30)
        .reconnect(false)
}

/// Waits until the client reports its consumer behind (the reader held back).
fn wait_behind(client: &Client) {
    assert!(wait_until(Duration::from_secs(10), || client
        .stats()
        .consumer_behind_since
        .is_some()));
}

/// Ends a run: the consumer, the client, the server's script (told to stop), its thread.
fn end_run(
    client: Client,
    events: wsbeat::Events,
    stop: mpsc::Sender<()>,
    server: thread::JoinHandle<()>,
) {
    drop(events);
    let _ = client.close();
    drop(stop);
    server.join().unwrap();
}

fn time_to_death(client: &Client, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    if wait_until(limit, || {
        let s = client.stats();
        s.state != State::Open
    }) {
        Some(start.elapsed())
    } else {
        None
    }
}

/// After a8cb025, `left` was still a guess when the drain stopped on the read budget
/// (or a waiting sender, or a nearly full read buffer). A peer that sent exactly one
/// message and then went silent (answers no ping), with the consumer stalled: the reader
/// reads that one message (budget 1), fills the channel (capacity 1), and holds back
/// "with input left" although nothing is left anywhere. The timer then took the dead
/// peer for alive on every tick. Now that input counts once, at the hold's start.
fn budget_guess(read_budget: Option<usize>) -> Option<Duration> {
    budget_guess_sized(read_budget, 4)
}

fn budget_guess_sized(read_budget: Option<usize>, size: usize) -> Option<Duration> {
    let (url, stop, server) = raw_server(move |ws, stop| {
        ws.send(Message::binary(vec![b'x'; size])).unwrap();
        // Silent from now on: never reads (no pong), never writes.
        let _ = stop.recv();
    });
    let mut b = pinging(&url, 1);
    if let Some(n) = read_budget {
        b = b.read_budget(n);
    }
    let client = b.connect().unwrap();
    let events = client.events(); // never read: a stalled consumer
    wait_behind(&client);
    let died = time_to_death(&client, Duration::from_secs(8));
    eprintln!(
        "read_budget {read_budget:?} size {size}: declared dead after {died:?} (expected ~0.4 s); stats {:?}",
        client.stats()
    );
    end_run(client, events, stop, server);
    died
}

#[test]
fn a_silent_peer_behind_an_early_stopped_drain_is_judged() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Control: the default budget (the drain ends at WouldBlock): judged in time.
    let control = budget_guess(None);
    assert!(control.is_some(), "control: default budget never judged");
    // Default budget, one 60 KiB message (64 KiB read buffer): the drain ends on
    // `take_nearly_full`, also a guess.
    let nearly_full = budget_guess_sized(None, 60 << 10);
    eprintln!("default budget, 60 KiB message: {nearly_full:?}");
    let with_budget = budget_guess(Some(1));
    assert!(
        nearly_full.is_some(),
        "default settings, one 60 KiB message then silence: never declared dead"
    );
    assert!(
        with_budget.is_some(),
        "a silent peer whose only message ended a drain on the budget is never declared dead"
    );
}

/// After cd662fd, data in progress read along with a ping by a consumer reading the
/// socket itself (`Events::recv_timeout`) was never credited: that fix covered drains of
/// the reader thread after a `poll` only (killed in 2-3 of 3 runs in the review). Now any
/// drain credits the bytes it read besides pings and pongs. A live peer that sends a
/// 16 KiB fragment every 200 ms against a 300 ms silence limit.
fn trickle(with_ping: bool) -> Result<(), String> {
    let chunks = 15;
    let period = Duration::from_millis(200);
    let (url, _stop, server) = raw_server(move |ws, _| {
        let s = ws.get_mut();
        let chunk = vec![b'a'; 16 << 10];
        for i in 0..chunks {
            let buf = support::net::text_fragment(i, chunks, &chunk, with_ping && i + 1 < chunks);
            if s.write_all(&buf).is_err() {
                return;
            }
            thread::sleep(period);
        }
        while ws.read().is_ok() {}
    });
    let client = Client::builder(&url)
        .heartbeat(Heartbeat::passive(Duration::from_millis(300)).liveness(Liveness::Data))
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    let r = loop {
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Message(Message::Text(t))) => {
                assert_eq!(t.len(), chunks * (16 << 10));
                break Ok(());
            }
            Ok(Event::Disconnected { reason, .. }) => break Err(format!("{reason}")),
            Ok(_) => {}
            Err(e) => break Err(format!("{e}")),
        }
    };
    let _ = client.close();
    let _ = server.join();
    r
}

#[test]
fn a_trickle_with_pings_read_by_a_consumer_is_data_in_progress() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runs = 3;
    let (mut plain_fail, mut ping_fail) = (0, 0);
    for _ in 0..runs {
        if let Err(e) = trickle(false) {
            eprintln!("fragments only: killed: {e}");
            plain_fail += 1;
        }
        if let Err(e) = trickle(true) {
            eprintln!("fragments + pings: killed: {e}");
            ping_fail += 1;
        }
    }
    eprintln!("killed: fragments only {plain_fail}/{runs}, fragments + pings {ping_fail}/{runs}");
    assert_eq!(plain_fail, 0, "control");
    assert_eq!(ping_fail, 0, "a live trickle with pings was declared dead");
}

/// The peer dies (FIN) while the consumer is stalled. The held-back reader polled without
/// POLLIN (FIN gives no POLLHUP), and the timer took the socket, readable at EOF, for
/// unread input: alive, for good. Now the held-back reader watches for the FIN
/// (`POLLRDHUP`, Linux) and reads on to the end, and the timer does not count an end of
/// stream as input.
#[test]
fn a_fin_while_the_consumer_is_behind_is_judged() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (url, stop, server) = raw_server(|ws, stop| {
        for i in 0..4 {
            ws.send(Message::Binary(Bytes::from(vec![i as u8; 100])))
                .unwrap();
        }
        // Wait until the client is behind, then the peer "dies": FIN (shutdown write),
        // and keeps its socket (no RST).
        let _ = stop.recv();
        ws.get_ref().shutdown(Shutdown::Write).unwrap();
        let _ = stop.recv();
    });
    let client = pinging(&url, 2).connect().unwrap();
    let events = client.events();
    wait_behind(&client);
    stop.send(()).unwrap();
    let died = time_to_death(&client, Duration::from_secs(8));
    eprintln!(
        "FIN while held back: dead after {died:?}; {:?}",
        client.stats()
    );
    end_run(client, events, stop, server);
    assert!(
        died.is_some(),
        "a peer that sent FIN is never declared dead"
    );
}

/// Strict mode, a peer that floods data and never answers (never reads, so
/// tungstenite's auto-pong never goes out). The socket is readable at every deadline;
/// the grace must end at the next drain. Consumer keeps up (reads itself).
#[test]
fn a_strict_flood_without_replies_is_judged_in_time() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (url, stop, server) = raw_server(|ws, stop| {
        ws.get_mut().set_nonblocking(false).unwrap();
        let payload = vec![7u8; 512];
        loop {
            if stop.try_recv().is_ok() {
                return;
            }
            // Written without reading: pings are never answered.
            if ws
                .write(Message::Binary(Bytes::copy_from_slice(&payload)))
                .is_err()
            {
                return;
            }
            if ws.flush().is_err() {
                return;
            }
            thread::sleep(Duration::from_micros(200));
        }
    });
    let client = Client::builder(&url)
        .heartbeat(
            Heartbeat::ping(Duration::from_millis(300), Duration::from_millis(300)).strict(true),
        )
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    let start = Instant::now();
    let mut n = 0u64;
    let died = loop {
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Message(_)) => n += 1,
            Ok(Event::Disconnected { reason, .. }) => break Some((start.elapsed(), reason)),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    eprintln!("strict flood: {n} messages, dead after {died:?}");
    let _ = client.close();
    let _ = stop.send(());
    drop(stop);
    let _ = server.join();
    let (t, _) = died.expect("never declared dead");
    assert!(t < Duration::from_millis(600 + 1500), "late: {t:?}");
}

/// FIN with the consumer keeping up, and RST while held back: seen at once.
fn peer_end(held: bool, rst: bool) -> Option<Duration> {
    let (url, stop, server) = raw_server(move |ws, stop| {
        for i in 0..4 {
            ws.send(Message::Binary(Bytes::from(vec![i as u8; 100])))
                .unwrap();
        }
        let _ = stop.recv();
        if rst {
            support::net::set_linger_zero(ws.get_ref()).unwrap();
            // Dropping the socket with linger 0: RST.
            return;
        }
        ws.get_ref().shutdown(Shutdown::Write).unwrap();
        let _ = stop.recv();
    });
    let client = pinging(&url, if held { 2 } else { 1000 })
        .connect()
        .unwrap();
    let events = client.events();
    if held {
        wait_behind(&client);
    } else {
        // Keep up: take the 4 messages.
        for _ in 0..5 {
            let _ = events.recv_timeout(Duration::from_secs(5));
        }
    }
    stop.send(()).unwrap();
    let died = time_to_death(&client, Duration::from_secs(5));
    end_run(client, events, stop, server);
    died
}

#[test]
fn the_peers_end_is_seen_whether_or_not_the_consumer_is_behind() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fin_reading = peer_end(false, false);
    let rst_held = peer_end(true, true);
    eprintln!("FIN, consumer keeping up: {fin_reading:?}; RST while held: {rst_held:?}");
    assert!(fin_reading.is_some() && rst_held.is_some());
}

/// A peer whose application is dead (no data ever) but whose library pings: under
/// Liveness::Data it must be judged after ~300 ms of no data. `burst` pings per write.
fn pings_only(burst: usize, budget: Option<usize>) -> Option<Duration> {
    let (url, stop, server) = raw_server(move |ws, stop| {
        let s = ws.get_mut();
        let mut buf = Vec::new();
        for _ in 0..burst {
            buf.extend([0x89, 0x00]);
        }
        loop {
            if s.write_all(&buf).is_err() {
                return;
            }
            if stop.recv_timeout(Duration::from_millis(100)).is_ok() {
                return;
            }
        }
    });
    let mut b = Client::builder(&url)
        .heartbeat(Heartbeat::passive(Duration::from_millis(300)).liveness(Liveness::Data))
        .reconnect(false);
    if let Some(n) = budget {
        b = b.read_budget(n);
    }
    let client = b.connect().unwrap();
    let events = client.events();
    let start = Instant::now();
    let mut died = None;
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Event::Disconnected { reason, .. }) =
            events.recv_timeout(Duration::from_millis(100))
        {
            eprintln!("disconnected: {reason}");
            died = Some(start.elapsed());
            break;
        }
    }
    eprintln!("burst {burst} budget {budget:?}: died {died:?}");
    let _ = client.close();
    let _ = stop.send(());
    let _ = server.join();
    died
}

#[test]
fn a_peer_sending_only_pings_is_judged_under_the_data_rule() {
    assert!(pings_only(1, None).is_some());
}

/// The same with bursts of pings and a drain that stops on its budget: the pings left in
/// tungstenite's buffer were counted as data in progress (review of d4686bb: still Open
/// after 5 s).
#[test]
fn pings_left_behind_an_early_stopped_drain_are_not_data() {
    let r = pings_only(4, Some(1));
    assert!(
        r.is_some(),
        "a peer sending only pings was credited as data in progress"
    );
}

/// A server that sends a final burst, then its Close frame and FIN (does not wait for
/// our close reply), while the consumer is a little behind: every message before the
/// Close reaches the consumer. Reading on after the FIN first dropped what went past
/// twice the bound (review of d4686bb: 64 of 200 delivered).
#[test]
fn a_final_burst_then_close_and_fin_is_delivered() {
    let total = 200;
    let (url, _stop, server) = raw_server(move |ws, _| {
        for i in 0..total {
            ws.send(Message::text(format!("m{i}"))).unwrap();
        }
        let _ = ws.close(None);
        let _ = ws.flush();
        let _ = ws.get_mut().shutdown(std::net::Shutdown::Write);
        thread::sleep(Duration::from_secs(3));
    });
    let client = Client::builder(&url)
        .event_capacity(8, 1 << 30)
        .reconnect(false)
        .connect()
        .unwrap();
    let events = client.events();
    // The consumer is busy for a second: that *is* the scenario, not a synchronisation.
    thread::sleep(Duration::from_millis(1000));
    let mut got = 0;
    let mut end = None;
    loop {
        match events.recv_timeout(Duration::from_secs(3)) {
            Ok(Event::Message(_)) => got += 1,
            Ok(Event::Disconnected { reason, .. }) => {
                end = Some(format!("{reason}"));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    eprintln!(
        "received {got} of {total}; end {end:?}; stats {:?}",
        client.stats()
    );
    let _ = client.close();
    let _ = server.join();
    assert_eq!(
        got, total,
        "messages sent before the peer's Close were dropped"
    );
}
