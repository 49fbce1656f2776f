//! Goal 4: Idle cost: one connected client with `Heartbeat::ping(1 s, 1 s)` and no traffic.
//! Over the measured wall time we add up, for the client's own threads only (names
//! `wsbeat-*`: timer, supervisor, reader), the CPU time from
//! `/proc/self/task/TID/schedstat` (ns the scheduler charged to the thread) and the
//! voluntary context switches from `/proc/self/task/TID/status` (each one is the thread
//! blocking and later being woken: a wake-up). The server threads are not counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wsbeat::Heartbeat;

use crate::server::Server;
use crate::util::{self, TaskStat, task_stats};
use crate::{Met, Opts, Row};

const GOAL_MS: f64 = 10.0;
/// Thread names wsbeat gives its threads (comm is cut at 15 bytes).
const CLIENT_THREADS: [&str; 4] = [
    "wsbeat-timer",
    "wsbeat-reconnec",
    "wsbeat-reader-",
    "wsbeat-dns",
];

fn client_threads() -> Vec<TaskStat> {
    task_stats()
        .into_iter()
        .filter(|t| CLIENT_THREADS.iter().any(|p| t.name.starts_with(p)))
        .collect()
}

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let secs = o.pick(10.0, 3.0);
    let srv = Server::start(false);
    let client = util::builder(&srv.url("/echo"))
        .heartbeat(Heartbeat::ping(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ))
        .connect()
        .expect("wsbeat connect");
    std::thread::sleep(Duration::from_millis(300));
    let before = client_threads();
    let pings0 = srv.pings();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after = client_threads();
    let wall = t.elapsed().as_secs_f64();
    let pings = srv.pings() - pings0;
    let st = client.stats();
    let _ = client.close();
    let mut per: BTreeMap<String, (f64, u64, u64)> = BTreeMap::new();
    for a in &after {
        let Some(b) = before.iter().find(|b| b.tid == a.tid) else {
            continue;
        };
        let e = per.entry(a.name.clone()).or_default();
        e.0 += (a.cpu_ns - b.cpu_ns) as f64 / 1e6;
        e.1 += a.vol - b.vol;
        e.2 += a.nonvol - b.nonvol;
    }
    let cpu_ms: f64 = per.values().map(|v| v.0).sum();
    let wakes: u64 = per.values().map(|v| v.1).sum();
    let preempt: u64 = per.values().map(|v| v.2).sum();
    let detail: Vec<String> = per
        .iter()
        .map(|(k, v)| format!("{k}: {:.2} ms, {} wake-ups", v.0, v.1))
        .collect();
    println!(
        "  {wall:.1} s idle: {} pings answered, rtt {:?}, per thread: {}",
        pings,
        st.rtt,
        detail.join("; ")
    );
    notes.push(format!(
        "Idle: {} threads ({}), {pings} heartbeat pings in {wall:.1} s; CPU from schedstat, \
         wake-ups = voluntary context switches ({preempt} involuntary).",
        per.len(),
        detail.join("; ")
    ));
    vec![
        Row::new(
            format!("idle CPU, ping(1 s, 1 s), {wall:.0} s wall, client threads"),
            "0 (no heartbeat, no threads)",
            format!("{cpu_ms:.2} ms"),
            "-",
            format!("< {GOAL_MS} ms"),
            Met::from(cpu_ms < GOAL_MS && st.rtt.is_some()),
        ),
        Row::new(
            format!("idle wake-ups in {wall:.0} s ({pings} pings)"),
            "0",
            format!("{wakes} ({:.1}/s)", wakes as f64 / wall),
            "-",
            "report (no polling)",
            Met::Info,
        ),
    ]
}
