//! Harness for the interop tests (`tests/interop_*.rs`): real third-party peers
//! (Python `websockets`, Node `ws`, nginx, tinyproxy, Dante, microsocks, the openssl
//! CLI) started as child processes on free loopback ports.
//!
//! - Peers are found on `PATH` (overrides: `WSBEAT_PYTHON`, `WSBEAT_NODE`,
//!   `WSBEAT_NGINX`, `WSBEAT_TINYPROXY`, `WSBEAT_DANTED`, `WSBEAT_MICROSOCKS`,
//!   `WSBEAT_OPENSSL`). A missing peer skips the
//!   test with a loud message on stderr, or fails it when `WSBEAT_REQUIRE_PEERS=1`.
//!   `sh .ci/install-peers.sh` (as root) installs them all.
//! - Every child is killed and reaped by a Drop guard ([`Proc`]), and also gets
//!   `PR_SET_PDEATHSIG` = SIGKILL, so nothing outlives a panicking or killed test.
//! - Readiness is a port printed by the peer, or a TCP connect polled with a deadline.
//!
//! Submodules: [`echo`] (the echo servers and the cases shared by the Python and
//! Node suites), [`tls`] (generated PKI + nginx), [`proxy`] (tinyproxy), [`socks`]
//! (Dante, microsocks).
#![allow(dead_code)]

pub mod echo;
pub mod proxy;
pub mod socks;
pub mod tls;

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use wsbeat::{Client, ClientBuilder, Event};

/// Generous deadline for anything a test waits on (events, readiness, lines).
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A client builder for `url` through the proxy at `proxy_url`, connect timeout 5 s.
pub fn via(url: &str, proxy_url: &str) -> ClientBuilder {
    Client::builder(url)
        .proxy(proxy_url)
        .connect_timeout(Duration::from_secs(5))
}

/// The directory holding the peer scripts (`tests/peers`).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

const INSTALL_HINT: &str = "sh .ci/install-peers.sh   (as root, from the repository root)";

/// True when missing peers must fail the tests (`WSBEAT_REQUIRE_PEERS=1`, set by CI).
pub fn peers_required() -> bool {
    std::env::var("WSBEAT_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Reports a missing peer: panics when peers are required, else prints a loud message
/// straight to the process's stderr (past the test harness's output capture, so it
/// shows even for a passing test) and lets the caller return early.
pub fn missing_peer(what: &str, detail: &str, install: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let text = format!(
        "\n==================== INTEROP PEER MISSING ====================\n\
         test `{test}` needs {what}, which is not available:\n  {detail}\n\
         Install it with:\n  {install}\n\
         or all interop peers with:\n  {INSTALL_HINT}\n"
    );
    if peers_required() {
        panic!("{text}WSBEAT_REQUIRE_PEERS=1 is set, so a missing peer is a failure.\n");
    }
    let _ = io::stderr().write_all(
        format!(
            "{text}SKIPPING this test (set WSBEAT_REQUIRE_PEERS=1 to make this a failure).\n\
             ==============================================================\n"
        )
        .as_bytes(),
    );
}

/// Finds an executable: the `env` override if set (must exist), else on `PATH` (so a
/// peer can be hidden by trimming `PATH`; Debian's nginx is in /usr/sbin, which root's
/// `PATH` has).
pub fn find_program(name: &str, env: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!("{env}={} is not an executable file", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(format!(
        "`{name}` not found on PATH (or set {env}=/path/to/{name})"
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "wsbeat-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: the peer binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `n` distinct free ports (all held until every one is picked).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Files whose tails are shown when something goes wrong (stderr, error logs).
    logs: Vec<PathBuf>,
}

impl Proc {
    /// Spawns `cmd` (stdin piped and held: peers that watch it exit when we vanish;
    /// stdout piped; stderr to `stderr_log`). The child also dies with its spawning
    /// thread (`PR_SET_PDEATHSIG`), which is the test's own thread.
    pub fn spawn(name: &str, cmd: &mut Command, stderr_log: &Path) -> Proc {
        let err = fs::File::create(stderr_log).expect("create stderr log");
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err);
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            logs: vec![stderr_log.to_path_buf()],
        }
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn add_log(&mut self, p: PathBuf) {
        self.logs.push(p);
    }

    /// The stdout lines of the child, as a channel (read by a helper thread).
    pub fn stdout_lines(&mut self) -> Receiver<String> {
        let out = self.child.stdout.take().expect("stdout already taken");
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name(format!("{}-stdout", self.name))
            .spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn stdout reader");
        rx
    }

    /// Panics with the logs if the child has exited.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early with {status}\n{}",
                self.name,
                self.diagnostics()
            );
        }
    }

    /// The last lines of every log of this child.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for p in &self.logs {
            let text = fs::read_to_string(p).unwrap_or_else(|e| format!("<unreadable: {e}>"));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            s.push_str(&format!(
                "--- {} (last {} lines) ---\n",
                p.display(),
                tail.len()
            ));
            for l in tail {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Polls a TCP connect to 127.0.0.1:`port` until it succeeds (deadline [`DEADLINE`]).
    pub fn wait_port(&mut self, port: u16) {
        if let Err(e) = self.try_wait_port(port) {
            panic!("{e}");
        }
    }

    /// Like [`wait_port`](Self::wait_port), but an early exit of the child is an
    /// `Err` (with the logs) rather than a panic, so the caller can retry on other
    /// ports (a port picked by [`free_ports`] can be taken again before the child binds it).
    pub fn try_wait_port(&mut self, port: u16) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited early with {status}\n{}",
                    self.name,
                    self.diagnostics()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not listen on {addr} within {DEADLINE:?}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20)); // polling interval, not a sync
        }
    }
}

/// Starts a server that binds ports picked by [`free_ports`], up to 3 times: a picked
/// port may be taken by someone else before the server binds it ("Address already in
/// use"), which makes the server exit; then new ports are picked.
pub fn start_with_retry<T>(name: &str, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let mut errors = Vec::new();
    for _ in 0..3 {
        match attempt() {
            Ok(t) => return t,
            Err(e) => errors.push(e),
        }
    }
    panic!("{name} did not start in 3 attempts:\n{}", errors.join("\n"))
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a short command to completion, returning stdout, or an error with its stderr.
pub fn run_output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The next event, whatever it is (panics after [`DEADLINE`]).
pub fn next_event(events: &wsbeat::Events, waiting_for: &str) -> Event {
    match events.recv_timeout(DEADLINE) {
        Ok(e) => e,
        Err(RecvTimeoutError::Timeout) => panic!("no event within {DEADLINE:?} ({waiting_for})"),
        Err(RecvTimeoutError::Disconnected) => panic!("event stream ended ({waiting_for})"),
    }
}

/// Skips events until one matches `pred` (panics after [`DEADLINE`] overall, listing
/// what was skipped). `Closed` never gets skipped: nothing can follow it.
pub fn wait_event(
    events: &wsbeat::Events,
    waiting_for: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + DEADLINE;
    let mut skipped = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(e) if pred(&e) => return e,
            Ok(Event::Closed) => {
                panic!("client closed while waiting for {waiting_for}; skipped: {skipped:#?}")
            }
            Ok(e) => skipped.push(shorten(&e)),
            Err(_) => {
                panic!("no {waiting_for} within {DEADLINE:?}; events seen meanwhile: {skipped:#?}")
            }
        }
    }
}

/// Debug text of an event, with big payloads cut.
pub fn shorten(e: &Event) -> String {
    let s = format!("{e:?}");
    if s.len() > 300 {
        // (`floor_char_boundary` needs Rust 1.91, above the MSRV.)
        let cut = (0..=300)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}... ({} chars)", &s[..cut], s.len())
    } else {
        s
    }
}

/// Polls `cond` until true or [`DEADLINE`]; returns whether it became true.
pub fn poll_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10)); // polling interval, not a sync
    }
}
