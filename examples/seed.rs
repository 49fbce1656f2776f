//! The browser pattern wsbeat grew out of, expressed with wsbeat's public API.
//!
//! The original (JavaScript in a page):
//!
//! ```text
//! heartCheck = { timeout: 10000, serverTimeout: 11000, ... }  // send 检测 after 10 s idle,
//! onmessage: heartCheck.reset().start()                        // close if no reply in 11 s
//! onclose:   reconnect()  // if (isReconnect) return; isReconnect = true;
//!                         // setTimeout(createWebSocket, 3000)
//! ```
//!
//! The same with wsbeat:
//!
//! - `Heartbeat::app(10 s, 11 s, "检测", matcher)`: probe after 10 s without a message,
//!   dead when no reply within 11 s. Its default liveness rule is the page's rule: any
//!   data message resets the timers, control frames (which a browser never sees) do not.
//! - `Backoff::fixed(3 s)`: reconnect 3 s later, no jitter.
//! - `isReconnect`: nothing to write; the supervisor thread makes one attempt at a time.
//!
//! It runs against its own local server, which answers `检测` three times and then stops
//! answering (its TCP connection stays open: an application that hung). The client
//! detects it within `10 s + 11 s`, closes, waits 3 s and reconnects; the server answers
//! on the new connection again. Timings are scaled down 10x so the demo takes seconds;
//! `cargo run --example seed -- --real` uses the original 10 s / 11 s / 3 s.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wsbeat::{Backoff, Client, Event, Heartbeat, Message};

const PROBE: &str = "检测";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scale = if std::env::args().any(|a| a == "--real") {
        1
    } else {
        10
    };
    let probe_after = Duration::from_secs(10) / scale;
    let reply_within = Duration::from_secs(11) / scale;
    let reconnect_after = Duration::from_secs(3) / scale;
    let url = start_server()?;
    println!(
        "seed: probe {PROBE:?} after {probe_after:?} idle, dead without a reply within \
         {reply_within:?}, reconnect after {reconnect_after:?} (scale 1/{scale})"
    );

    let client = Client::builder(&url)
        .heartbeat(Heartbeat::app(
            probe_after,
            reply_within,
            Message::text(PROBE),
            |m| m.to_text().is_ok_and(|t| t == PROBE),
        ))
        .reconnect_policy(Backoff::fixed(reconnect_after))
        .connect()?;

    let start = Instant::now();
    let events = client.events();
    let mut last_rtt = None;
    loop {
        let Ok(event) = events.recv_timeout(reply_within) else {
            // No event: show that the heartbeat is at work.
            let rtt = client.stats().rtt;
            if let Some(r) = rtt
                && rtt != last_rtt
            {
                println!("{:>6.2?}  probe answered, rtt {r:?}", start.elapsed());
                last_rtt = rtt;
            }
            continue;
        };
        let t = start.elapsed();
        match event {
            Event::Connected { generation, .. } => {
                println!("{t:>6.2?}  connected (connection {generation})");
                if generation == 2 {
                    // Wait for one answered probe on the new connection, then stop.
                    let deadline = Instant::now() + 2 * (probe_after + reply_within);
                    while client.stats().rtt.is_none() && Instant::now() < deadline {
                        std::thread::sleep(probe_after / 10);
                    }
                    match client.stats().rtt {
                        Some(rtt) => println!(
                            "{:>6.2?}  probe answered on connection 2, rtt {rtt:?}",
                            start.elapsed()
                        ),
                        None => println!("no answer on connection 2"),
                    }
                    break;
                }
            }
            Event::Disconnected { reason, .. } => println!("{t:>6.2?}  disconnected: {reason}"),
            Event::Reconnecting { delay, .. } => println!("{t:>6.2?}  reconnecting in {delay:?}"),
            Event::Message(m) => println!("{t:>6.2?}  message: {m}"),
            Event::GaveUp(e) => return Err(e.into()),
            Event::Closed => break,
            _ => {}
        }
    }
    let unsent = client.close();
    println!(
        "{:>6.2?}  closed ({} unsent)",
        start.elapsed(),
        unsent.len()
    );
    Ok(())
}

/// A local server that answers `检测` with `检测`: three times on its first connection
/// (then it hangs: reads, never answers), always on later connections.
fn start_server() -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("ws://{}/", listener.local_addr()?);
    static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let n = CONNECTIONS.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(tcp) else {
                    return;
                };
                let mut answered = 0;
                while let Ok(m) = ws.read() {
                    if m.to_text().is_ok_and(|t| t == PROBE) {
                        if n > 1 || answered < 3 {
                            answered += 1;
                            if ws.send(Message::text(PROBE)).is_err() {
                                return;
                            }
                        } else if answered == 3 {
                            answered += 1;
                            println!("        (server: connection {n} stops answering)");
                        }
                    }
                }
            });
        }
    });
    Ok(url)
}
