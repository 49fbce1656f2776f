//! Goal 7: Scale: N concurrent clients (1,000 in full mode) in one process against one local
//! echo server, each with `Heartbeat::ping(2 s, 5 s)`, `thread_stack_size(64 KiB)` and
//! `read_buffer_size(4 KiB)`, held for 60 s.
//!
//! So that the measured RSS holds only clients, the benchmark runs in a fresh process
//! (this binary re-executed with `WSBEAT_BENCH_ROLE=scale-clients`), and the server runs in
//! another one (`WSBEAT_BENCH_ROLE=scale-server`, a thread per connection with 64 KiB
//! stacks). RSS per client = (VmRSS with all clients connected - VmRSS before the first
//! of them, after one warm-up client was opened and closed) / N, taking the larger of the
//! values right after connecting and at the end of the hold.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wsbeat::{Client, Event, Heartbeat, State};

use crate::util::{self, say};
use crate::{Met, Opts, ROLE_ENV, Row};

const GOAL_KIB: f64 = 150.0;
const STACK: usize = 64 << 10;
const READ_BUF: usize = 4096;

/// Runs the scale-clients child; its `RESULT key value` lines.
fn child(
    n: usize,
    secs: u64,
    defaults: bool,
) -> (std::process::ExitStatus, HashMap<String, String>) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(ROLE_ENV, "scale-clients")
        .env("WSBEAT_SCALE_N", n.to_string())
        .env("WSBEAT_SCALE_SECS", secs.to_string())
        .env("WSBEAT_SCALE_DEFAULTS", if defaults { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn scale-clients");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut res: HashMap<String, String> = HashMap::new();
    for line in out.lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("RESULT ") {
            if let Some((k, v)) = rest.split_once(' ') {
                res.insert(k.to_string(), v.to_string());
            }
        } else {
            println!("  {line}");
        }
    }
    (child.wait().expect("scale-clients"), res)
}

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let n: usize = o.pick(1000, 100);
    let secs: u64 = o.pick(60, 5);
    let (status, res) = child(n, secs, false);
    let get = |k: &str| -> f64 { res.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN) };
    if !status.success() || res.is_empty() {
        return vec![Row::new(
            format!("scale: {n} clients"),
            "-",
            format!("FAILED ({status})"),
            "-",
            "-",
            Met::No,
        )];
    }
    let per_kib = get("rss_per_client_kib");
    let threads = get("threads_per_client");
    let ok = get("ok") as usize;
    let healthy = ok == n && get("disconnects") == 0.0;
    notes.push(format!(
        "Scale: {n} clients, ping(2 s, 5 s), thread_stack_size(64 KiB), read_buffer_size(4 KiB), \
         held {secs} s in a process of their own (server in another process). Client process \
         RSS {:.1} MiB before, {:.1} MiB with all clients; {:.0} threads; connecting all took \
         {:.2} s; client process CPU during the hold {:.0} ms ({:.3}% of one core); server saw \
         {:.0} pings (server RSS {:.1} MiB).",
        get("rss0_kib") / 1024.0,
        get("rss_max_kib") / 1024.0,
        get("threads"),
        get("connect_s"),
        get("hold_cpu_ms"),
        get("hold_cpu_ms") / (secs as f64 * 10.0),
        get("server_pings"),
        get("server_rss_kib") / 1024.0
    ));
    let mut rows = vec![
        Row::new(
            format!("scale: RSS per client ({n} clients, 64 KiB stacks, 4 KiB read buffer)"),
            "-",
            format!("{per_kib:.1} KiB"),
            "-",
            format!("< {GOAL_KIB} KiB"),
            Met::from(per_kib < GOAL_KIB),
        ),
        Row::new(
            "scale: threads per client",
            "-",
            format!("{threads:.2}"),
            "-",
            "report",
            Met::Info,
        ),
        Row::new(
            format!("scale: connected for {secs} s, rtt Some, generation 1"),
            "-",
            format!(
                "{ok}/{n} ({:.0} disconnects, {:.0} pings)",
                get("disconnects"),
                get("server_pings")
            ),
            "-",
            format!("{n}/{n}"),
            Met::from(healthy),
        ),
    ];
    if !o.quick {
        // The same with default stack and read buffer sizes, held briefly (info only).
        println!("  again with default thread stack (256 KiB) and read buffer (128 KiB):");
        let (status, res) = child(n, 5, true);
        let per = res
            .get("rss_per_client_kib")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|_| status.success());
        rows.push(Row::new(
            format!("scale: RSS per client with default stack / read buffer ({n} clients, 5 s)"),
            "-",
            per.map_or_else(|| format!("FAILED ({status})"), |p| format!("{p:.1} KiB")),
            "-",
            "-",
            Met::Info,
        ));
    }
    rows
}

fn cpu_ms() -> f64 {
    // SAFETY: getrusage fills a zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The scale-server helper process, started by a clients process.
pub struct ScaleServer {
    pub server: std::process::Child,
    pub sin: std::process::ChildStdin,
    pub sout: BufReader<std::process::ChildStdout>,
    pub port: u16,
}

impl ScaleServer {
    /// Starts it and reads the port it listens on.
    pub fn spawn() -> ScaleServer {
        let exe = std::env::current_exe().expect("current exe");
        let mut server = Command::new(exe)
            .env(ROLE_ENV, "scale-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn scale-server");
        let sin = server.stdin.take().unwrap();
        let mut sout = BufReader::new(server.stdout.take().unwrap());
        let port = util::read_port(&mut sout);
        ScaleServer {
            server,
            sin,
            sout,
            port,
        }
    }
}

/// The scale-clients process.
pub fn clients_main() {
    let n: usize = std::env::var("WSBEAT_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let secs: u64 = std::env::var("WSBEAT_SCALE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let nofile = util::raise_nofile();
    let mut stdout = std::io::stdout();
    let ScaleServer {
        mut server,
        mut sin,
        mut sout,
        port,
    } = ScaleServer::spawn();
    let mut line = String::new();
    let url = format!("ws://127.0.0.1:{port}/echo");
    let hb = Heartbeat::ping(Duration::from_secs(2), Duration::from_secs(5));
    let defaults = std::env::var("WSBEAT_SCALE_DEFAULTS").is_ok_and(|v| v == "1");
    let make = || {
        let b = util::builder(&url).heartbeat(hb.clone());
        if defaults {
            b.connect()
        } else {
            b.thread_stack_size(STACK)
                .read_buffer_size(READ_BUF)
                .connect()
        }
    };
    // Warm-up: lazily initialised process state (allocator arenas, TLS, statics).
    let warm = make().expect("warm-up client");
    let _ = warm.close();
    drop(warm);
    std::thread::sleep(Duration::from_millis(200));
    let rss0 = util::rss_kib();
    let th0 = util::thread_count();
    say(
        &mut stdout,
        &format!("RLIMIT_NOFILE {nofile}; connecting {n} clients to {url}"),
    );
    let t = Instant::now();
    let mut clients: Vec<Client> = Vec::with_capacity(n);
    for i in 0..n {
        match make() {
            Ok(c) => clients.push(c),
            Err(e) => {
                say(&mut stdout, &format!("client {i} failed to connect: {e}"));
                std::process::exit(1);
            }
        }
    }
    let connect_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = util::rss_kib();
    let th1 = util::thread_count();
    say(
        &mut stdout,
        &format!(
            "connected in {connect_s:.2} s; RSS {} -> {} KiB; threads {th0} -> {th1}; holding {secs} s",
            rss0, rss1
        ),
    );
    let cpu0 = cpu_ms();
    let hold = Instant::now();
    let mut rss_max = rss1;
    while hold.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(
            Duration::from_secs(1).min(Duration::from_secs(secs).saturating_sub(hold.elapsed())),
        );
        rss_max = rss_max.max(util::rss_kib());
        let e = hold.elapsed().as_secs();
        if e > 0 && e.is_multiple_of(15) {
            say(
                &mut stdout,
                &format!("  {e} s: RSS {} KiB", util::rss_kib()),
            );
        }
    }
    let hold_cpu = cpu_ms() - cpu0;
    let (mut ok, mut disconnects) = (0usize, 0usize);
    for c in &clients {
        let st = c.stats();
        if st.state == State::Open && st.generation == 1 && st.rtt.is_some() {
            ok += 1;
        }
        disconnects += c
            .events()
            .try_iter()
            .filter(|e| matches!(e, Event::Disconnected { .. }))
            .count();
    }
    say(&mut sin, "stats");
    line.clear();
    let _ = sout.read_line(&mut line);
    let mut f = line.split_whitespace();
    let mut server_stat = |key: &str| -> u64 {
        while let Some(w) = f.next() {
            if w == key {
                return f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        0
    };
    let pings = server_stat("pings");
    let server_rss = server_stat("rss_kib");
    let per = (rss_max.saturating_sub(rss0)) as f64 / n as f64;
    for (k, v) in [
        ("rss0_kib", rss0 as f64),
        ("rss_max_kib", rss_max as f64),
        ("rss_per_client_kib", per),
        ("threads", th1 as f64),
        ("threads_per_client", (th1 - th0) as f64 / n as f64),
        ("connect_s", connect_s),
        ("hold_cpu_ms", hold_cpu),
        ("ok", ok as f64),
        ("disconnects", disconnects as f64),
        ("server_pings", pings as f64),
        ("server_rss_kib", server_rss as f64),
    ] {
        say(&mut stdout, &format!("RESULT {k} {v}"));
    }
    let _ = stdout.flush();
    let _ = server.kill();
    let _ = server.wait();
    // Do not close a thousand clients one by one: the process ends here.
    std::process::exit(0);
}
