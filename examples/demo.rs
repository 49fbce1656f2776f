//! wsbeat demo: an echo exchange, a half-open link detected by the heartbeat, and a
//! server restart the client rides through. Everything runs in this process on
//! 127.0.0.1: an echo server (tungstenite) and a small TCP proxy that can "blackhole"
//! the link (stop forwarding without closing anything: what a dead NAT or a frozen
//! peer looks like).
//!
//! Run: `cargo run --release --example demo`

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wsbeat::{Backoff, Client, Event, Heartbeat, Message};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let say = |s: String| println!("[{:>6.2}s] {s}", t0.elapsed().as_secs_f64());

    let server = EchoServer::start("127.0.0.1:0".parse()?)?;
    let proxy = Proxy::start(server.addr)?;
    say(format!(
        "echo server on {}, proxy on {}",
        server.addr, proxy.addr
    ));

    let interval = Duration::from_millis(1000);
    let timeout = Duration::from_millis(1000);
    let client = Client::builder(&format!("ws://{}/demo", proxy.addr))
        .connect_timeout(Duration::from_secs(2))
        .heartbeat(Heartbeat::ping(interval, timeout))
        .reconnect_policy(
            Backoff::default()
                .initial(Duration::from_millis(200))
                .max(Duration::from_secs(1))
                .min_uptime(Duration::from_millis(500)),
        )
        .connect()?;
    let events = client.events();
    say("connected".into());

    // A printer thread shows every event as it happens.
    let printer = {
        thread::spawn(move || {
            let mut echoed = Vec::new();
            for ev in events {
                let line = match &ev {
                    Event::Message(Message::Text(t)) => {
                        echoed.push(t.to_string());
                        format!("echo <- {t}")
                    }
                    Event::Connected { generation, .. } => {
                        format!("Connected (connection #{generation})")
                    }
                    Event::Disconnected { generation, reason } => {
                        format!("Disconnected (connection #{generation}): {reason}")
                    }
                    Event::Reconnecting {
                        attempt,
                        delay,
                        last_error,
                    } => format!(
                        "Reconnecting: attempt {attempt} in {delay:.0?} (last error: {})",
                        last_error.as_ref().map_or("-".into(), |e| e.to_string())
                    ),
                    Event::Closed => {
                        println!(
                            "[{:>6.2}s] Closed: all client threads joined",
                            t0.elapsed().as_secs_f64()
                        );
                        break;
                    }
                    other => format!("{other:?}"),
                };
                println!("[{:>6.2}s] {line}", t0.elapsed().as_secs_f64());
            }
            echoed
        })
    };

    say("--- 1. echo ---".into());
    for i in 1..=3 {
        client.send_text(format!("hello #{i}"))?;
    }
    wait_until(Duration::from_secs(5), || client.stats().received >= 3);
    if let Some(rtt) = client.stats().rtt {
        say(format!("heartbeat RTT {rtt:?}"));
    }

    say("--- 2. half-open link: the proxy silently stops forwarding ---".into());
    let cut = Instant::now();
    proxy.blackhole();
    say(format!(
        "blackholed; expect detection within interval + timeout = {:?}",
        interval + timeout
    ));
    wait_until(Duration::from_secs(10), || client.stats().generation >= 2);
    say(format!(
        "new connection after {:.2?} (detect + reconnect)",
        cut.elapsed()
    ));

    say("--- 3. server restart: messages sent during the outage are queued ---".into());
    server.stop();
    wait_until(Duration::from_secs(5), || {
        client.state() != wsbeat::State::Open
    });
    for i in 1..=3 {
        client.send_text(format!("queued #{i}"))?;
    }
    say(format!(
        "queued {} messages while offline",
        client.stats().queued
    ));
    thread::sleep(Duration::from_millis(1500)); // let the demo show a few retries
    server.restart()?;
    say("server restarted".into());
    client.wait_connected(Duration::from_secs(10))?;
    wait_until(Duration::from_secs(5), || client.stats().received >= 6);

    say("--- 4. close ---".into());
    let undelivered = client.close();
    let echoed = printer.join().expect("printer thread");
    say(format!(
        "done: {} messages echoed, {} undelivered",
        echoed.len(),
        undelivered.len()
    ));
    Ok(())
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() && Instant::now() < end {
        thread::sleep(Duration::from_millis(10));
    }
}

/// A tiny echo server that can be stopped and restarted on the same port.
struct EchoServer {
    addr: SocketAddr,
    running: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl EchoServer {
    fn start(addr: SocketAddr) -> io::Result<EchoServer> {
        let listener = TcpListener::bind(addr)?;
        let s = EchoServer {
            addr: listener.local_addr()?,
            running: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
        };
        s.serve(listener);
        Ok(s)
    }

    fn serve(&self, listener: TcpListener) {
        let running = self.running.clone();
        let conns = self.conns.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if !running.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(c) = stream.try_clone() {
                    conns.lock().push(c);
                }
                thread::spawn(move || {
                    let _ = stream.set_nodelay(true);
                    let Ok(mut ws) = tungstenite::accept(stream) else {
                        return;
                    };
                    while let Ok(msg) = ws.read() {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).is_err() {
                            break;
                        }
                    }
                    let _ = ws.get_ref().shutdown(Shutdown::Both);
                });
            }
        });
    }

    fn stop(&self) {
        self.running.store(false, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop so it drops the listener
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restart(&self) -> io::Result<()> {
        let listener = TcpListener::bind(self.addr)?;
        self.running.store(true, Ordering::SeqCst);
        self.serve(listener);
        Ok(())
    }
}

/// A TCP proxy; `blackhole` makes the current connections silently stop forwarding.
struct Proxy {
    addr: SocketAddr,
    holes: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let holes: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let h = holes.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let hole = Arc::new(AtomicBool::new(false));
                h.lock().push(hole.clone());
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let hole = hole.clone();
                    thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if hole.load(Ordering::SeqCst) {
                                        continue; // swallow: no FIN, no RST
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        if !hole.load(Ordering::SeqCst) {
                            let _ = to.shutdown(Shutdown::Write);
                        }
                    });
                }
            }
        });
        Ok(Proxy { addr, holes })
    }

    fn blackhole(&self) {
        for h in self.holes.lock().drain(..) {
            h.store(true, Ordering::SeqCst);
        }
    }
}
