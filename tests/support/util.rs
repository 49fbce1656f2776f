//! Process introspection (Linux `/proc`) and condition polling.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Interval between two evaluations of the condition in [`wait_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Number of threads of this process (entries in `/proc/self/task`). Includes the
/// harness's threads of other tests (even ones blocked in [`shared`]): exact only in a
/// binary with a single test; otherwise prefer [`threads_named`].
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .count()
}

/// Names (`comm`, at most 15 bytes) of this process's threads.
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect()
}

/// Number of threads whose name starts with `prefix` (e.g. `"wsbeat-"`). Unlike
/// [`thread_count`] this ignores the test harness's own threads (one per running or
/// waiting test), so it is exact even with other tests in the same binary.
pub fn threads_named(prefix: &str) -> usize {
    thread_names()
        .iter()
        .filter(|n| n.starts_with(prefix))
        .count()
}

/// Number of threads started by the support code (`test-server*`, `fault-proxy*`).
pub fn support_threads() -> usize {
    threads_named("test-server") + threads_named("fault-proxy")
}

/// Number of open file descriptors of this process (`/proc/self/fd`, minus the one used to list it).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
        .saturating_sub(1)
}

/// Resident set size of this process in KiB (`VmRSS` in `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Evaluates `cond` every [`POLL_INTERVAL`] until it is true or `timeout` has passed; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until the process has at most `n` threads (threads that just finished may linger briefly).
pub fn wait_threads_at_most(n: usize, timeout: Duration) -> bool {
    wait_until(timeout, || thread_count() <= n)
}

static PROCESS_WIDE: RwLock<()> = RwLock::new(());

/// Shared hold on the process: take it in every test of a binary that also has
/// [`exclusive`] tests, so that those measure threads / fds / RSS without interference.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    PROCESS_WIDE.read()
}

/// Exclusive hold on the process for tests that count threads, fds or memory:
/// no test holding [`shared`] runs meanwhile.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    PROCESS_WIDE.write()
}

/// A number from the environment (to lengthen or replay a test), if set and valid.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// CPU time (utime + stime, ms) of this process's threads named `name` so far.
pub fn thread_cpu_ms(name: &str) -> u64 {
    let tick_ms = 10; // USER_HZ = 100 on every Linux ABI this runs on
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime): 12 and 13 after "pid (comm)".
        total += (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * tick_ms;
    }
    total
}

/// Whether a thread of this process named `name` exists and is asleep (state `S` in
/// `/proc/self/task/*/stat`): blocked in a wait, for tests that must act only once another
/// thread is waiting.
pub fn thread_sleeping(name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
        comm.trim_end() == name && state.is_some_and(|s| s.starts_with('S'))
    })
}

/// Runs `f` on a helper thread and fails if it does not finish within `limit`: for calls
/// that must end (close, drop, a send racing a close), so a deadlock fails the test
/// instead of hanging it.
pub fn bounded<R: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let r = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?} (deadlock?)"));
    t.join().expect("helper thread");
    r
}
