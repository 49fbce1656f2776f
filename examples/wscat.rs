//! wscat: an interactive command-line WebSocket client built on wsbeat.
//!
//! Each line typed on stdin is sent as a text message; whatever arrives is printed.
//! Connection events (connected, lost, reconnecting, heartbeat round-trip time) are
//! shown as `*` lines on stderr, so stdout carries only the received messages.
//!
//! ```text
//! cargo run --example wscat -- ws://127.0.0.1:8765/
//! cargo run --example wscat -- --ca ca.pem --ping-interval 2 -H 'Authorization: Bearer x' wss://localhost:8443/
//! python3 tests/peers/echo_server.py     # prints a port: a server to try it against
//! ```
//!
//! Run with `--help` for the options and the `/commands`.

use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select, tick, unbounded};
use wsbeat::{Backoff, Client, Error, Event, Heartbeat, Message};

const USAGE: &str = "\
wscat: an interactive WebSocket client (wsbeat example)

USAGE:
    wscat [OPTIONS] URL                 URL is ws://host[:port]/path or wss://...

OPTIONS:
    -H, --header 'Name: value'   add a header to the upgrade request (repeatable)
        --ca FILE                trust this root certificate (PEM or DER), besides
                                 the system roots
        --cert FILE --key FILE   present a client certificate (mutual TLS); the key
                                 must be PKCS#8 PEM (\"BEGIN PRIVATE KEY\")
        --ping-interval SECS     heartbeat: send a ping after SECS without traffic
                                 (default 15; 0 turns the heartbeat off)
        --ping-timeout SECS      heartbeat: declare the link dead when no reply
                                 arrives within SECS (default: 10, or the interval
                                 if shorter)
        --proxy URL              connect through a proxy: http://, socks5://,
                                 socks5h://, socks4:// or socks4a://[user:pass@]host:port
                                 (default: https_proxy / http_proxy / all_proxy /
                                 no_proxy from the environment, like curl)
        --no-proxy               ignore the proxy environment variables
        --connect-timeout SECS   deadline for one connect (default 10)
        --no-reconnect           exit when the connection ends instead of reconnecting
        --wait SECS              at end of input, keep printing for SECS before closing
                                 (for piped input: `echo hi | wscat --wait 1 URL`)
        --insecure               DANGER: accept any server certificate
    -h, --help                   show this help

COMMANDS (typed on stdin):
    /stats        state, heartbeat round-trip time and counters
    /reconnect    drop the connection and connect again now
    /quit         close the connection (close handshake) and exit; so does end of input
    //text        send the text \"/text\"
Any other line is sent as a text message.
";

#[derive(Debug)]
struct Args {
    url: String,
    headers: Vec<(String, String)>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ping_interval: Duration,
    ping_timeout: Option<Duration>,
    proxy: Option<String>,
    no_proxy: bool,
    connect_timeout: Duration,
    reconnect: bool,
    wait: Duration,
    insecure: bool,
}

fn secs(flag: &str, v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag} wants a number of seconds, not {v:?}"))
}

/// Hand-rolled argument parsing: `--flag value`, `--flag=value`, `-H value`.
fn parse_args(argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        url: String::new(),
        headers: Vec::new(),
        ca: None,
        cert: None,
        key: None,
        ping_interval: Duration::from_secs(15),
        ping_timeout: None,
        proxy: None,
        no_proxy: false,
        connect_timeout: Duration::from_secs(10),
        reconnect: true,
        wait: Duration::ZERO,
        insecure: false,
    };
    let mut url = None;
    let mut it = argv.peekable();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "-H" | "--header" => {
                let v = value(&flag)?;
                let (k, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--header wants 'Name: value', not {v:?}"))?;
                args.headers
                    .push((k.trim().to_string(), val.trim().to_string()));
            }
            "--ca" => args.ca = Some(value(&flag)?),
            "--cert" => args.cert = Some(value(&flag)?),
            "--key" => args.key = Some(value(&flag)?),
            "--ping-interval" => args.ping_interval = secs(&flag, &value(&flag)?)?,
            "--ping-timeout" => args.ping_timeout = Some(secs(&flag, &value(&flag)?)?),
            "--proxy" => args.proxy = Some(value(&flag)?),
            "--no-proxy" => args.no_proxy = true,
            "--connect-timeout" => args.connect_timeout = secs(&flag, &value(&flag)?)?,
            "--no-reconnect" => args.reconnect = false,
            "--wait" => args.wait = secs(&flag, &value(&flag)?)?,
            "--insecure" => args.insecure = true,
            f if f.starts_with('-') && f.len() > 1 => return Err(format!("unknown option {f}")),
            _ if url.is_none() => url = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?} (only one URL)")),
        }
    }
    args.url = url.ok_or("missing URL")?;
    if args.cert.is_some() != args.key.is_some() {
        return Err("--cert and --key go together".into());
    }
    Ok(Some(args))
}

/// The builder for `args`. A bad URL, proxy URL or CA file comes back from `connect()`.
fn build(args: &Args) -> Result<wsbeat::ClientBuilder, String> {
    let mut b = Client::builder(&args.url)
        .connect_timeout(args.connect_timeout)
        .reconnect(args.reconnect)
        .reconnect_policy(
            Backoff::default()
                .initial(Duration::from_millis(500))
                .max(Duration::from_secs(10)),
        );
    for (k, v) in &args.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b = if args.ping_interval.is_zero() {
        b.heartbeat(Heartbeat::off())
    } else {
        let timeout = args
            .ping_timeout
            .unwrap_or_else(|| args.ping_interval.min(Duration::from_secs(10)));
        b.heartbeat(Heartbeat::ping(args.ping_interval, timeout))
    };
    if let Some(ca) = &args.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("--ca {ca}: {e}"))?;
        b = b.add_root_certificate(&pem);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let c = std::fs::read(cert).map_err(|e| format!("--cert {cert}: {e}"))?;
        let k = std::fs::read(key).map_err(|e| format!("--key {key}: {e}"))?;
        let id = wsbeat::Identity::from_pem(&c, &k)
            .map_err(|e| format!("--cert/--key: {e} (the key must be PKCS#8 PEM)"))?;
        b = b.identity(id);
    }
    if let Some(p) = &args.proxy {
        b = b.proxy(p);
    } else if args.no_proxy {
        b = b.no_proxy();
    }
    if args.insecure {
        b = b.danger_accept_invalid_certs(true);
    }
    Ok(b)
}

/// Status lines go to stderr, received messages to stdout.
fn status(line: &str) {
    let _ = writeln!(io::stderr(), "* {line}");
}

fn show_message(m: &Message) {
    let mut out = io::stdout().lock();
    let _ = match m {
        Message::Text(t) => writeln!(out, "< {}", t.as_str()),
        Message::Binary(b) => {
            let hex: Vec<String> = b.iter().take(32).map(|x| format!("{x:02x}")).collect();
            let more = if b.len() > 32 { " ..." } else { "" };
            writeln!(out, "< [binary, {} bytes] {}{more}", b.len(), hex.join(" "))
        }
        other => writeln!(out, "< [{other:?}]"),
    };
    let _ = out.flush();
}

fn show_stats(client: &Client) {
    let s = client.stats();
    let rtt = s.rtt.map_or("none yet".to_string(), |r| format!("{r:.2?}"));
    let idle = s
        .last_inbound
        .map_or("-".to_string(), |t| format!("{:.1?} ago", t.elapsed()));
    status(&format!(
        "state {:?}, connection #{}, heartbeat rtt {rtt}, last inbound {idle}, \
         sent {}, received {}, reconnects {}, queued {}",
        s.state, s.generation, s.sent, s.received, s.reconnects, s.queued
    ));
}

/// Reads stdin lines on a helper thread (blocking reads cannot be selected on).
fn stdin_lines() -> Receiver<String> {
    let (tx, rx) = unbounded();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        // Dropping tx tells the main loop: end of input.
    });
    rx
}

/// Prints one event; returns false once the client is closed for good. Notes in
/// `failed` whether it gave up on an error (not just a connection that ended while
/// reconnection is off).
fn show_event(ev: Event, failed: &mut bool) -> bool {
    match ev {
        Event::Message(m) => show_message(&m),
        Event::Connected {
            generation,
            protocol,
        } => {
            let p = protocol
                .map(|p| format!(", subprotocol {p}"))
                .unwrap_or_default();
            status(&format!("connected (connection #{generation}{p})"));
        }
        Event::Disconnected { generation, reason } => status(&format!(
            "disconnected (connection #{generation}): {reason}"
        )),
        Event::Reconnecting {
            attempt,
            delay,
            last_error,
        } => {
            let why = last_error
                .map(|e| format!(" after: {e}"))
                .unwrap_or_default();
            status(&format!(
                "reconnecting in {delay:.1?} (attempt {attempt}){why}"
            ));
        }
        Event::HeartbeatMissed { missed, .. } => {
            status(&format!("heartbeat: {missed} probe(s) unanswered"))
        }
        Event::Undelivered(msgs) => status(&format!("{} message(s) were never sent", msgs.len())),
        Event::GaveUp(e) => {
            *failed = !matches!(e, Error::ConnectionLost(_));
            status(&format!("gave up: {e}"));
        }
        Event::Closed => {
            status("closed");
            return false;
        }
        other => status(&format!("{other:?}")),
    }
    true
}

fn run(args: Args) -> Result<(), String> {
    status(&format!("connecting to {} ...", args.url));
    let client = build(&args)?
        .connect()
        .map_err(|e| format!("connect failed: {e}"))?;
    let events = client.events();
    let lines = stdin_lines();
    let ticker = tick(Duration::from_millis(250));
    let mut last_rtt = None;
    let mut input_done: Option<Instant> = None;
    let mut failed = false;
    loop {
        let lines_rx = if input_done.is_some() {
            crossbeam_channel::never()
        } else {
            lines.clone()
        };
        select! {
            // Events come in batches (one per read of the socket); show them in order.
            recv(events.receiver()) -> batch => match batch {
                Ok(batch) => {
                    for ev in batch {
                        if !show_event(ev, &mut failed) {
                            return if failed { Err("closed".into()) } else { Ok(()) };
                        }
                    }
                }
                Err(_) => return Ok(()),
            },
            recv(lines_rx) -> line => match line {
                Ok(line) => match line.trim_end() {
                    "/quit" | "/close" | "/exit" => break,
                    "/stats" => show_stats(&client),
                    "/reconnect" => client.reconnect_now(),
                    l if l.starts_with("//") => send(&client, &l[1..]),
                    l if l.starts_with('/') => status(&format!("unknown command {l} (try /stats, /reconnect, /quit)")),
                    l => send(&client, l),
                },
                Err(_) => input_done = Some(Instant::now()),
            },
            recv(ticker) -> _ => {
                // Show the heartbeat round-trip time whenever a new probe was answered.
                let rtt = client.stats().rtt;
                if rtt.is_some() && rtt != last_rtt {
                    status(&format!("heartbeat rtt {:.2?}", rtt.unwrap_or_default()));
                }
                last_rtt = rtt;
                if input_done.is_some_and(|t| t.elapsed() >= args.wait) {
                    break;
                }
            },
        }
    }
    let unsent = client.close();
    for ev in events.try_iter() {
        show_event(ev, &mut failed);
    }
    if !unsent.is_empty() {
        status(&format!(
            "{} queued message(s) were never sent",
            unsent.len()
        ));
    }
    Ok(())
}

fn send(client: &Client, text: &str) {
    if let Err(e) = client.send_text(text.to_string()) {
        status(&format!("not sent: {e}"));
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wscat: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            status(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Option<Args>, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_flags() {
        let a = parse(&[
            "-H",
            "X-A: 1",
            "--header=Authorization: Bearer t",
            "--ping-interval",
            "0.5",
            "--ca",
            "ca.pem",
            "wss://h/",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.url, "wss://h/");
        assert_eq!(
            a.headers,
            vec![
                ("X-A".to_string(), "1".to_string()),
                ("Authorization".to_string(), "Bearer t".to_string())
            ]
        );
        assert_eq!(a.ping_interval, Duration::from_millis(500));
        assert_eq!(a.ca.as_deref(), Some("ca.pem"));
        assert!(parse(&["--help"]).unwrap().is_none());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--bogus", "ws://h/"]).is_err());
        assert!(parse(&["--ping-interval", "x", "ws://h/"]).is_err());
        assert!(parse(&["--cert", "c.pem", "ws://h/"]).is_err());
    }
}
