//! wsbeat benchmark suite (issue 7): wsbeat against raw blocking tungstenite (one thread,
//! no locks: the floor for this stack), in the same run, on the same loopback server.
//!
//! ```sh
//! cargo bench                                  # everything (~2.5 minutes)
//! WSBEAT_BENCH_QUICK=1 cargo bench             # short smoke run (~30 s)
//! cargo bench --bench wsbeat -- --quick        # same (plain `cargo bench -- --quick` would
//!                                              # also hand --quick to the lib's libtest)
//! cargo bench --bench wsbeat -- latency reconnect   # only some sections
//! ```
//!
//! Sections: `latency`, `throughput`, `inbound` (slow consumer, idle RSS against
//! tokio-tungstenite), `mixed`, `idle`, `deadpeer`, `reconnect`, `scale`.
//! The final markdown table is printed and written to `target/wsbeat-bench/latest.md`
//! (or `$WSBEAT_BENCH_OUT`). Goals are checked here, never in timed unit tests: a missed
//! goal is reported in the table as "NO", the run itself still succeeds.
//!
//! The binary also serves as its own helper processes (selected by `WSBEAT_BENCH_ROLE`):
//! `scale-clients` runs the scale benchmark in a fresh process so its RSS holds only the
//! clients, and `scale-server` is the echo server that process talks to.

mod contender;
mod deadpeer;
mod idle;
mod inbound;
mod latency;
mod mixed;
mod proxy;
mod reconnect;
mod scale;
mod server;
mod throughput;
mod util;

use std::fmt::Write as _;
use std::time::Instant;

pub const ROLE_ENV: &str = "WSBEAT_BENCH_ROLE";

pub struct Opts {
    pub quick: bool,
}

impl Opts {
    /// `full` normally, `quick` in quick mode.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// Whether a goal was met.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    /// Informational row without a goal.
    Info,
}

impl Met {
    pub fn from(ok: bool) -> Met {
        if ok { Met::Yes } else { Met::No }
    }
    fn as_str(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "**NO**",
            Met::Info => "-",
        }
    }
}

pub struct Row {
    pub metric: String,
    pub raw: String,
    pub wsbeat: String,
    pub ratio: String,
    pub goal: String,
    pub met: Met,
}

impl Row {
    pub fn new(
        metric: impl Into<String>,
        raw: impl Into<String>,
        wsbeat: impl Into<String>,
        ratio: impl Into<String>,
        goal: impl Into<String>,
        met: Met,
    ) -> Row {
        Row {
            metric: metric.into(),
            raw: raw.into(),
            wsbeat: wsbeat.into(),
            ratio: ratio.into(),
            goal: goal.into(),
            met,
        }
    }
}

/// A ratio as the table shows it.
pub fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".into()
    }
}

pub fn ratio(wsbeat: f64, raw: f64) -> String {
    if raw > 0.0 && wsbeat.is_finite() {
        format!("{:.2}x", wsbeat / raw)
    } else {
        "-".into()
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| metric | raw tungstenite | wsbeat | ratio | goal | met? |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.metric,
            r.raw,
            r.wsbeat,
            r.ratio,
            r.goal,
            r.met.as_str()
        );
    }
    s
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{} UTC, nproc {n}, CPU {cpu}, Linux {}, load average at start {}",
        utc_now(),
        kernel.trim(),
        load.join(" ")
    )
}

/// "YYYY-MM-DD HH:MM" (UTC) without a date crate.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

const SECTIONS: [&str; 8] = [
    "latency",
    "throughput",
    "inbound",
    "mixed",
    "idle",
    "deadpeer",
    "reconnect",
    "scale",
];

fn main() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("scale-server") => return server::scale_server_main(),
        Ok("echo-server") => return server::echo_server_main(),
        Ok("scale-clients") => return scale::clients_main(),
        Ok("idle-clients") => return inbound::idle_clients_main(),
        _ => {}
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --benches` / `--all-targets` runs harness=false benches without `--bench`:
    // do not turn a test run into a multi-minute benchmark.
    if !args.iter().any(|a| a == "--bench") && std::env::var_os("WSBEAT_BENCH_FORCE").is_none() {
        println!("wsbeat bench: skipped (run it with `cargo bench`)");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("WSBEAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    for w in &wanted {
        if !SECTIONS.contains(w) {
            eprintln!("unknown section {w:?}; known: {}", SECTIONS.join(" "));
            std::process::exit(2);
        }
    }
    let on = |s: &str| wanted.is_empty() || wanted.contains(&s);
    let opts = Opts { quick };
    let header = machine();
    println!(
        "# wsbeat benchmarks{}",
        if quick { " (quick mode)" } else { "" }
    );
    println!("{header}\n");
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    type Section = fn(&Opts, &mut Vec<String>) -> Vec<Row>;
    let runs: [(&str, Section); 8] = [
        ("latency", latency::run),
        ("throughput", throughput::run),
        ("inbound", inbound::run),
        ("mixed", mixed::run),
        ("idle", idle::run),
        ("deadpeer", deadpeer::run),
        ("reconnect", reconnect::run),
        ("scale", scale::run),
    ];
    for (name, f) in runs {
        if !on(name) {
            continue;
        }
        let t = Instant::now();
        println!("## {name}");
        let r = f(&opts, &mut notes);
        println!("{}", table(&r));
        println!("({name} took {:.1} s)\n", t.elapsed().as_secs_f64());
        rows.extend(r);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## wsbeat vs raw tungstenite{}\n",
        if quick { " (quick mode)" } else { "" }
    );
    let _ = writeln!(
        out,
        "Measured {header}; run took {:.0} s.\n",
        started.elapsed().as_secs_f64()
    );
    out.push_str(&table(&rows));
    if !notes.is_empty() {
        out.push('\n');
        for n in &notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    println!("# Summary\n\n{out}");
    let path = std::env::var("WSBEAT_BENCH_OUT").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
        format!("{target}/wsbeat-bench/latest.md")
    });
    if let Some(dir) = std::path::Path::new(&path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, &out) {
        Ok(()) => println!("(written to {path})"),
        Err(e) => eprintln!("could not write {path}: {e}"),
    }
}
