//! The platform-specific part of the transport: waiting on sockets (`poll(2)` on Unix,
//! `WSAPoll` on Windows) and the waker that interrupts such a wait.
//!
//! Everything above this module sees one API: [`poll_fds`] on raw sockets ([`raw`],
//! [`pollfd`]), [`poll2`] on two, [`wait_readable`] / [`wait_writable`], [`Waker`], and
//! [`connect_in_progress`] for nonblocking connects.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix::poll_fds as poll_ms;
#[cfg(unix)]
pub(crate) use unix::{
    POLLHUP_ERR, POLLIN, POLLOUT, POLLRDHUP, Pipe, PollFd, Raw, abort, connect_in_progress, pollfd,
    raw, socket_pair,
};
#[cfg(unix)]
use unix::{unacked_bytes as os_unacked_bytes, unsent_bytes as os_unsent_bytes};

#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows::poll_fds as poll_ms;
#[cfg(windows)]
pub(crate) use windows::{
    POLLHUP_ERR, POLLIN, POLLOUT, POLLRDHUP, Pipe, PollFd, Raw, abort, connect_in_progress, pollfd,
    raw, socket_pair,
};
#[cfg(windows)]
use windows::{unacked_bytes as os_unacked_bytes, unsent_bytes as os_unsent_bytes};

/// Bytes of `sock` the kernel has not sent yet, where the OS tells (Linux); `None`
/// elsewhere, and when the environment variable `WSBEAT_NO_SEND_QUEUE_FIGURE` is set, so
/// that the accounting of the platforms without the figure (Windows, the BSDs) is tested
/// on Linux too.
pub(crate) fn unsent_bytes(sock: &TcpStream) -> Option<u64> {
    if no_send_queue_figure() {
        return None;
    }
    os_unsent_bytes(sock)
}

/// Bytes of `sock` the peer's TCP has not acknowledged, where the OS tells (Linux,
/// macOS); `None` elsewhere, and with `WSBEAT_NO_SEND_QUEUE_FIGURE` set (see
/// [`unsent_bytes`]).
pub(crate) fn unacked_bytes(sock: &TcpStream) -> Option<u64> {
    if no_send_queue_figure() {
        return None;
    }
    os_unacked_bytes(sock)
}

/// Whether `WSBEAT_NO_SEND_QUEUE_FIGURE` is set (read once).
fn no_send_queue_figure() -> bool {
    static NO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NO.get_or_init(|| std::env::var_os("WSBEAT_NO_SEND_QUEUE_FIGURE").is_some())
}

/// Whether `revents` of a socket report that the peer shut its side down (`POLLRDHUP`).
/// Always false where the OS has no such event (`POLLRDHUP` is 0: not Linux).
#[allow(clippy::bad_bit_mask)]
pub(crate) fn peer_shut_down(revents: i16) -> bool {
    revents & POLLRDHUP != 0
}

/// A poll timeout in milliseconds: `-1` waits forever; a sub-millisecond remainder is
/// rounded up so it does not spin with a 0 timeout.
fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    }
}

/// `poll(2)` / `WSAPoll` on several sockets; `None` waits without a time limit. Returns
/// how many are ready (their `revents` say how).
///
/// A signal handler interrupts `poll` (the kernel never restarts it): the wait goes on
/// for the time left, so a process with a periodic signal (a profiler's `SIGPROF`, an
/// interval timer) does not start the timeout over on each signal.
pub(crate) fn poll_fds(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let end = timeout.map(crate::time::deadline_in);
    let mut ms = timeout_ms(timeout);
    loop {
        match poll_ms(fds, ms) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if let Some(end) = end {
                    ms = timeout_ms(Some(end.saturating_duration_since(Instant::now())));
                }
            }
            done => return done,
        }
    }
}

/// [`poll_fds`] on one or two sockets; returns their revents.
pub(crate) fn poll2(
    a: (Raw, i16),
    b: Option<(Raw, i16)>,
    timeout: Option<Duration>,
) -> io::Result<(i16, i16)> {
    let mut fds = [pollfd(a.0, a.1), pollfd(a.0, 0)];
    if let Some(b) = b {
        fds[1] = pollfd(b.0, b.1);
    }
    let n = if b.is_some() { 2 } else { 1 };
    poll_fds(&mut fds[..n], timeout)?;
    Ok((fds[0].revents, fds[1].revents))
}

/// Waits until `sock` is writable (or in error/hang-up), up to `timeout`.
pub(crate) fn wait_writable(sock: &TcpStream, timeout: Duration) -> bool {
    matches!(poll2((raw(sock), POLLOUT), None, Some(timeout)), Ok((r, _)) if r != 0)
}

/// Waits until `sock` is readable (or in error/hang-up), up to `timeout`.
pub(crate) fn wait_readable(sock: &TcpStream, timeout: Duration) -> bool {
    matches!(poll2((raw(sock), POLLIN), None, Some(timeout)), Ok((r, _)) if r != 0)
}

/// Wakes a reader thread out of `poll` (a connected socket pair; the reader polls the
/// read end).
pub(crate) struct Waker {
    tx: Pipe,
    pub(crate) rx: Pipe,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let (tx, rx) = socket_pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Waker { tx, rx })
    }
    pub(crate) fn wake(&self) {
        let _ = (&self.tx).write(&[1]);
    }
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn waker_interrupts_a_poll_and_drains() {
        let w = Waker::new().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _b = l.accept().unwrap();
        // Nothing to read: times out with no event.
        let (r, w0) = poll2(
            (raw(&a), POLLIN),
            Some((raw(&w.rx), POLLIN)),
            Some(Duration::from_millis(20)),
        )
        .unwrap();
        assert_eq!((r, w0), (0, 0));
        w.wake();
        let start = Instant::now();
        let (r, w1) = poll2((raw(&a), POLLIN), Some((raw(&w.rx), POLLIN)), None).unwrap();
        assert_eq!(r, 0);
        assert!(w1 & POLLIN != 0, "waker end readable");
        assert!(start.elapsed() < Duration::from_secs(5));
        w.drain();
        let (_, w2) = poll2(
            (raw(&a), POLLIN),
            Some((raw(&w.rx), POLLIN)),
            Some(Duration::ZERO),
        )
        .unwrap();
        assert_eq!(w2, 0, "drained");
        assert!(wait_writable(&a, Duration::from_secs(5)));
        assert!(!wait_readable(&a, Duration::from_millis(10)));
    }
}
