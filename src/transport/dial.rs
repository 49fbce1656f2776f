//! Dialling under one deadline, cancellable at any moment: DNS raced against
//! cancellation, Happy Eyeballs (RFC 8305) over nonblocking sockets, socket options.
//!
//! Nothing here blocks without also watching the client's [`Cancel`]: `close()` ends a
//! dial in progress within a poll wake-up, whatever the network does. Transport layer:
//! no imports from the shared link or the threads.

use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::config::SocketOptions;
use crate::transport::sys::{self, POLLIN, POLLOUT, Pipe, Raw, poll_fds, pollfd};
use crate::{ConnectStage, Error, Result};

/// The one deadline of a connect attempt (every stage checks the time left against it).
pub(crate) struct Deadline {
    pub start: Instant,
    pub end: Instant,
}

impl Deadline {
    /// `timeout` from now; `Duration::MAX` means no deadline (see `time::deadline`).
    pub(crate) fn after(timeout: Duration) -> Deadline {
        let start = Instant::now();
        let end = crate::time::deadline(start, timeout);
        Deadline { start, end }
    }
    pub(crate) fn left(&self, stage: ConnectStage) -> Result<Duration> {
        let now = Instant::now();
        if now >= self.end {
            return Err(self.timeout(stage));
        }
        Ok(self.end - now)
    }
    pub(crate) fn timeout(&self, stage: ConnectStage) -> Error {
        Error::Timeout {
            stage,
            elapsed: self.start.elapsed(),
        }
    }
    /// Whether the deadline has passed.
    pub(crate) fn passed(&self) -> bool {
        Instant::now() >= self.end
    }
    /// A failed read or write of the set-up socket (see `stream::Tcp`, which waits in
    /// [`wait_ready`]) as the error of `stage`: `Closed` once `cancel` fired, `Timeout`
    /// once the deadline passed. A `TimedOut` before it is the OS's (TCP keepalive or
    /// retransmissions gave up): an I/O error, not advice to raise `connect_timeout`
    /// (review of 8960377).
    pub(crate) fn failed(&self, e: io::Error, cancel: &Cancel, stage: ConnectStage) -> Error {
        if cancel.is_cancelled() {
            Error::Closed { message: None }
        } else if e.kind() == io::ErrorKind::TimedOut && self.passed() {
            self.timeout(stage)
        } else {
            Error::io(e)
        }
    }
}

/// A nonblocking call to make again after the next wait: `WouldBlock` (a readiness
/// that went away, or a partial one), or a signal.
pub(crate) fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The one wait of every read and write of the connection set-up (proxy, TLS, upgrade),
/// whose socket is nonblocking from the dial until the connection opens: until `sock` is
/// readable (`write`: writable), in error or hung up, or `cancel` (a [`Cancel::fd`]) is
/// readable, until `end` at most. Errors: `ConnectionAborted` once cancelled, `TimedOut`
/// at `end`.
///
/// No set-up call blocks in the OS, so `close()` ends these stages on every platform: a
/// socket shutdown from another thread wakes a blocked `read` on Linux, but not under
/// Windows (seen under Wine: `close()` waited for the connect timeout).
pub(crate) fn wait_ready(
    sock: &TcpStream,
    write: bool,
    cancel: Raw,
    end: Instant,
) -> io::Result<()> {
    let events = if write { POLLOUT } else { POLLIN };
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timeout reached",
            ));
        }
        // One wait is at most about 24 days (poll's limit): a longer deadline
        // (`Duration::MAX`, no limit) waits again.
        let (ready, cancelled) =
            sys::poll2((sys::raw(sock), events), Some((cancel, POLLIN)), Some(left))?;
        if cancelled != 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connect cancelled: the client is closing",
            ));
        }
        if ready != 0 {
            return Ok(());
        }
    }
}

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Aborts a connect attempt from another thread (`close()`, drop of the last handle).
///
/// Once cancelled it stays cancelled: its wake-up descriptor stays readable, so every
/// later wait of the attempt returns at once. Every stage waits in `poll` on
/// [`Cancel::fd`] too: DNS and the TCP dial, and the reads and writes of the proxy, TLS
/// and upgrade stages (through [`wait_ready`]: the set-up socket is nonblocking, so no
/// call blocks in the OS). `cancel` also shuts down the socket
/// [`attach`](Cancel::attach)ed for those stages, so the peer sees the attempt end.
pub(crate) struct Cancel {
    cancelled: AtomicBool,
    tx: Pipe,
    rx: Pipe,
    /// A clone of the socket of the attempt in progress. A leaf lock held only around a
    /// `try_clone`, a `shutdown` and an atomic load.
    sock: Mutex<Option<TcpStream>>,
}

impl Cancel {
    pub(crate) fn new() -> io::Result<Cancel> {
        let (tx, rx) = sys::socket_pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Cancel {
            cancelled: AtomicBool::new(false),
            tx,
            rx,
            sock: Mutex::new(None),
        })
    }

    /// Cancels the attempt in progress and every later one.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        // The pair's buffer holds far more than the few bytes repeated calls may write.
        let _ = (&self.tx).write(&[1]);
        if let Some(s) = self.lock().as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// `Err(Closed)` once cancelled.
    pub(crate) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Closed { message: None });
        }
        Ok(())
    }

    /// Readable once cancelled.
    pub(crate) fn fd(&self) -> Raw {
        sys::raw(&self.rx)
    }

    /// Registers the connected socket of the attempt: `cancel` shuts it down.
    pub(crate) fn attach(&self, sock: &TcpStream) {
        *self.lock() = sock.try_clone().ok();
        // `cancel` sets the flag before it looks at the socket: one of us sees the other.
        if self.is_cancelled() {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }

    /// The attempt is over (connected or failed): forget its socket.
    pub(crate) fn detach(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TcpStream>> {
        self.sock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Lookup = fn(&str, u16) -> io::Result<Vec<SocketAddr>>;

fn system_lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Iterator::collect)
}

/// Resolves `host` (an IP literal needs no lookup) within the deadline, cancellable.
///
/// `getaddrinfo` has no timeout and cannot be interrupted, so it runs on a helper thread
/// (`wsbeat-dns`) while this thread polls for its end, the deadline and the cancel
/// descriptor together. When the lookup ends first, the helper is joined. When the
/// deadline or a cancel comes first, the helper is left to finish on its own
/// (detached): it holds nothing of the client and ends when the resolver returns, which
/// the system resolver bounds (glibc: `timeout` x `attempts` of resolv.conf, 5 s x 2 by
/// default, per name server).
pub(crate) fn resolve(
    host: &str,
    port: u16,
    dl: &Deadline,
    cancel: &Cancel,
) -> Result<Vec<SocketAddr>> {
    resolve_with(host, port, dl, cancel, system_lookup)
}

fn resolve_with(
    host: &str,
    port: u16,
    dl: &Deadline,
    cancel: &Cancel,
    lookup: Lookup,
) -> Result<Vec<SocketAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    cancel.check()?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    // The helper holds `done_tx`: when it ends (or unwinds) `done_rx` reads end-of-file,
    // which wakes the poll below.
    let (done_tx, done_rx) = sys::socket_pair()?;
    let name = bare.to_string();
    let helper = std::thread::Builder::new()
        .name("wsbeat-dns".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let _done = done_tx;
            let _ = tx.send(lookup(&name, port));
        })
        .map_err(|e| Error::spawn("wsbeat DNS lookup", e))?;
    loop {
        let left = dl.left(ConnectStage::Dns)?;
        let mut fds = [
            pollfd(cancel.fd(), POLLIN),
            pollfd(sys::raw(&done_rx), POLLIN),
        ];
        poll_fds(&mut fds, Some(left))?;
        cancel.check()?;
        if fds[1].revents != 0 {
            break;
        }
    }
    let _ = helper.join();
    match rx.try_recv() {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(Error::dns(host, "no addresses")),
        Ok(Err(e)) => Err(Error::dns(host, e.to_string())),
        Err(_) => Err(Error::dns(host, "the resolver thread failed")),
    }
}

/// RFC 8305 section 4: alternate the address families, starting with the family of the
/// first address the resolver returned, keeping the resolver's order within a family.
fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let (mut same, mut other): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.iter().partition(|a| a.is_ipv6() == first.is_ipv6());
    same.reverse();
    other.reverse();
    let mut out = Vec::with_capacity(addrs.len());
    while !same.is_empty() || !other.is_empty() {
        out.extend(same.pop());
        out.extend(other.pop());
    }
    out
}

/// Opens a TCP connection to one of `addrs`, Happy Eyeballs style (RFC 8305): attempts
/// start `opts.attempt_delay` apart (at once when the previous one failed), alternating
/// address families; the first to connect wins and the others are closed. Everything is
/// bounded by `dl` and ends early on `cancel`. The returned socket is in blocking mode.
pub(crate) fn dial(
    addrs: &[SocketAddr],
    opts: &SocketOptions,
    dl: &Deadline,
    cancel: &Cancel,
) -> Result<TcpStream> {
    let candidates: Vec<SocketAddr> = match opts.local_address {
        Some(local) => addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == local.is_ipv6())
            .collect(),
        None => addrs.to_vec(),
    };
    if candidates.is_empty() {
        return Err(Error::io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no resolved address has the family of the configured local address",
        )));
    }
    let order = interleave(&candidates);
    let mut pending: Vec<(Socket, SocketAddr)> = Vec::new();
    let mut next = 0;
    let mut next_at = Instant::now();
    let mut last = None;
    loop {
        cancel.check()?;
        let now = Instant::now();
        if next < order.len() && (pending.is_empty() || now >= next_at) {
            let addr = order[next];
            next += 1;
            next_at = crate::time::deadline(now, opts.attempt_delay);
            match start(addr, opts) {
                Ok((sock, true)) => return finish(sock),
                Ok((sock, false)) => pending.push((sock, addr)),
                Err(e) => last = Some(dial_error(e, addr, dl)),
            }
            continue;
        }
        if pending.is_empty() {
            return Err(last.unwrap_or_else(|| dl.timeout(ConnectStage::Tcp)));
        }
        let left = dl.left(ConnectStage::Tcp)?;
        let wait = if next < order.len() {
            left.min(next_at.saturating_duration_since(now))
        } else {
            left
        };
        let mut fds = Vec::with_capacity(pending.len() + 1);
        fds.push(pollfd(cancel.fd(), POLLIN));
        fds.extend(pending.iter().map(|(s, _)| pollfd(sys::raw(s), POLLOUT)));
        poll_fds(&mut fds, Some(wait))?;
        cancel.check()?;
        // Walk backwards so removing an entry keeps the indices of the others.
        for i in (0..pending.len()).rev() {
            if fds[i + 1].revents == 0 {
                continue;
            }
            let (sock, addr) = pending.swap_remove(i);
            match sock.take_error() {
                Ok(None) => {
                    log::debug!("connected to {addr}");
                    // Dropping `pending` closes the losers.
                    return finish(sock);
                }
                Ok(Some(e)) | Err(e) => {
                    log::debug!("connect {addr}: {e}");
                    last = Some(dial_error(e, addr, dl));
                    // A failed attempt starts the next one at once (RFC 8305 5).
                    next_at = Instant::now();
                }
            }
        }
    }
}

/// Starts a nonblocking connect to `addr` with the socket options applied. `true` when
/// it connected at once.
///
/// socket2 rather than `TcpStream::connect_timeout`: std cannot start a connect without
/// waiting for it, bind before connecting, or set keepalive interval and count.
fn start(addr: SocketAddr, opts: &SocketOptions) -> io::Result<(Socket, bool)> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    apply(&sock, opts)?;
    if let Some(ip) = opts.local_address {
        sock.bind(&SocketAddr::new(ip, 0).into())
            .map_err(|e| context(e, &format!("binding to local address {ip}")))?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => Ok((sock, true)),
        Err(e) if sys::connect_in_progress(&e) => Ok((sock, false)),
        Err(e) => Err(e),
    }
}

/// A keepalive time or interval as the OS takes it: Unix counts whole seconds (socket2
/// truncates, and the 0 a sub-second value became is refused), so a fraction rounds up;
/// Linux refuses more than 32767 s (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`) with
/// `EINVAL`, so a longer value (`Duration::MAX`: "as long as allowed") is capped there.
/// (Windows counts milliseconds; socket2 rounds up and saturates there.)
fn keepalive_time(d: Duration) -> Duration {
    #[cfg(unix)]
    let d = Duration::from_secs(d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)));
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let d = d.min(Duration::from_secs(32767));
    d
}

/// Keepalive probes as the OS takes them: at most 127 on Linux (`MAX_TCP_KEEPCNT`), 255
/// on Windows (`TCP_KEEPCNT` refuses more).
fn keepalive_probes(n: u32) -> u32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let n = n.min(127);
    #[cfg(windows)]
    let n = n.min(255);
    n
}

/// The OS has no such socket option (`TCP_KEEPCNT` before Windows 10 1703, and Wine).
fn no_such_option(e: &io::Error) -> bool {
    #[cfg(windows)]
    let code = windows_sys::Win32::Networking::WinSock::WSAENOPROTOOPT;
    #[cfg(unix)]
    let code = libc::ENOPROTOOPT;
    e.raw_os_error() == Some(code)
}

/// Keepalive and the bound device, set before connecting.
fn apply(sock: &Socket, opts: &SocketOptions) -> io::Result<()> {
    if let Some(ka) = &opts.keepalive {
        let mut k = TcpKeepalive::new().with_time(keepalive_time(ka.time));
        if let Some(i) = ka.interval {
            k = k.with_interval(keepalive_time(i));
        }
        let with_retries = match ka.retries {
            Some(n) => k.clone().with_retries(keepalive_probes(n)),
            None => k.clone(),
        };
        match sock.set_tcp_keepalive(&with_retries) {
            // The probe count cannot be set here: the OS's own count, rather than no
            // connection at all.
            Err(e) if ka.retries.is_some() && no_such_option(&e) => {
                log::warn!("this OS cannot set the TCP keepalive probe count; using its own");
                sock.set_tcp_keepalive(&k)
            }
            r => r,
        }
        .map_err(|e| context(e, "setting TCP keepalive"))?;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(dev) = &opts.device {
        sock.bind_device(Some(dev.as_bytes()))
            .map_err(|e| context(e, &format!("binding to network interface {dev:?}")))?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    if opts.device.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "bind_device is only supported on Linux",
        ));
    }
    Ok(())
}

/// The same error kind, with what was being done in front of the OS message.
fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The dialled socket stays nonblocking: every set-up stage waits in `poll` (see
/// [`wait_ready`]), and the open connection is nonblocking too.
fn finish(sock: Socket) -> Result<TcpStream> {
    let sock: TcpStream = sock.into();
    sock.set_nodelay(true)?;
    Ok(sock)
}

fn dial_error(e: io::Error, addr: SocketAddr, dl: &Deadline) -> Error {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Error::Refused {
            addr: addr.to_string(),
        },
        _ if is_timeout(&e) && dl.passed() => dl.timeout(ConnectStage::Tcp),
        _ => Error::io(e),
    }
}

/// The integration tests' hung listener, shared with the unit tests below.
#[cfg(test)]
#[path = "../../tests/support/hung.rs"]
mod hung;

#[cfg(test)]
mod tests {
    use super::hung::HungListener;
    use super::*;
    use crate::config::DEFAULT_ATTEMPT_DELAY;
    use std::net::TcpListener;

    fn v4(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }
    fn v6(p: u16) -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p))
    }

    /// What the OS keeps of the keepalive settings: sub-second values rounded up to a
    /// second (they were truncated to 0, which Linux refuses), values past Linux's limits
    /// capped there (they were refused), values within them unchanged.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn keepalive_values_are_brought_within_what_the_os_takes() {
        use crate::config::TcpKeepalive as Ka;
        let applied = |ka: Ka| {
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            let opts = SocketOptions {
                keepalive: Some(ka),
                ..SocketOptions::default()
            };
            apply(&sock, &opts).unwrap();
            (
                sock.tcp_keepalive_time().unwrap(),
                sock.tcp_keepalive_interval().unwrap(),
                sock.tcp_keepalive_retries().unwrap(),
            )
        };
        let secs = Duration::from_secs;
        assert_eq!(
            applied(Ka::new(secs(60)).interval(secs(10)).retries(3)),
            (secs(60), secs(10), 3)
        );
        assert_eq!(
            applied(
                Ka::new(Duration::from_millis(300))
                    .interval(Duration::from_millis(1500))
                    .retries(1)
            ),
            (secs(1), secs(2), 1)
        );
        assert_eq!(
            applied(
                Ka::new(Duration::MAX)
                    .interval(Duration::MAX)
                    .retries(u32::MAX)
            ),
            (secs(32767), secs(32767), 127)
        );
    }

    #[test]
    fn interleaves_families_starting_with_the_first() {
        assert_eq!(
            interleave(&[v6(1), v6(2), v4(3), v4(4), v4(5)]),
            vec![v6(1), v4(3), v6(2), v4(4), v4(5)]
        );
        assert_eq!(interleave(&[v4(1), v6(2)]), vec![v4(1), v6(2)]);
        assert!(interleave(&[]).is_empty());
    }

    /// Cancels `cancel` from another thread 100 ms from now; the thread returns when.
    fn cancel_soon(cancel: &std::sync::Arc<Cancel>) -> std::thread::JoinHandle<Instant> {
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let at = Instant::now();
            c.cancel();
            at
        })
    }

    fn slow_lookup(_: &str, _: u16) -> io::Result<Vec<SocketAddr>> {
        std::thread::sleep(Duration::from_secs(3));
        Ok(vec![v4(1)])
    }

    fn quick_lookup(_: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(vec![v4(port)])
    }

    /// A resolver that never answers in time: a cancel ends the wait at once (the helper
    /// thread is left to finish its sleep). A private hook: there is no portable way to
    /// make the system resolver hang on loopback only.
    #[test]
    fn cancel_ends_a_slow_lookup_at_once() {
        let cancel = std::sync::Arc::new(Cancel::new().unwrap());
        let canceller = cancel_soon(&cancel);
        let dl = Deadline::after(Duration::from_secs(30));
        let r = resolve_with("slow.example", 80, &dl, &cancel, slow_lookup);
        let returned = Instant::now();
        let cancelled_at = canceller.join().unwrap();
        assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
        let lag = returned - cancelled_at;
        assert!(
            lag < Duration::from_millis(500),
            "returned {lag:?} after cancel"
        );
    }

    #[test]
    fn lookup_that_ends_is_joined_and_used() {
        let cancel = Cancel::new().unwrap();
        let dl = Deadline::after(Duration::from_secs(30));
        let r = resolve_with("quick.example", 81, &dl, &cancel, quick_lookup).unwrap();
        assert_eq!(r, vec![v4(81)]);
        let dl = Deadline::after(Duration::from_millis(50));
        let r = resolve_with("slow.example", 80, &dl, &cancel, slow_lookup);
        assert!(
            matches!(
                r,
                Err(Error::Timeout {
                    stage: ConnectStage::Dns,
                    ..
                })
            ),
            "{r:?}"
        );
    }

    /// The OS's `ETIMEDOUT` (keepalive, retransmissions) during a set-up stage is an I/O
    /// error; only the deadline's own is `Timeout` (which tells the user to raise
    /// `connect_timeout`).
    #[test]
    fn only_the_deadline_makes_a_set_up_timeout() {
        let cancel = Cancel::new().unwrap();
        let os = || io::Error::from(io::ErrorKind::TimedOut);
        let dl = Deadline::after(Duration::from_secs(30));
        let e = dl.failed(os(), &cancel, ConnectStage::Proxy);
        assert!(
            matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::TimedOut),
            "{e:?}"
        );
        let dl = Deadline::after(Duration::ZERO);
        let e = dl.failed(os(), &cancel, ConnectStage::Proxy);
        assert!(
            matches!(
                e,
                Error::Timeout {
                    stage: ConnectStage::Proxy,
                    ..
                }
            ),
            "{e:?}"
        );
        cancel.cancel();
        let e = dl.failed(os(), &cancel, ConnectStage::Proxy);
        assert!(matches!(e, Error::Closed { .. }), "{e:?}");
    }

    #[test]
    fn huge_timeouts_do_not_overflow() {
        let dl = Deadline::after(Duration::MAX);
        assert!(dl.left(ConnectStage::Tcp).unwrap() > Duration::from_secs(86_400));
    }

    #[test]
    fn first_family_dead_falls_back_to_the_other() {
        // Nothing listens on the v6 port (refused), the v4 listener answers.
        let l4 = TcpListener::bind(v4(0)).unwrap();
        let dead = TcpListener::bind(v6(0)).unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let cancel = Cancel::new().unwrap();
        let dl = Deadline::after(Duration::from_secs(10));
        let s = dial(
            &[v6(dead_port), l4.local_addr().unwrap()],
            &SocketOptions::default(),
            &dl,
            &cancel,
        )
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), l4.local_addr().unwrap());
    }

    /// RFC 8305 on loopback: the first family hangs (SYNs dropped), the other answers
    /// on the same port; the dial wins on the second family after about one attempt
    /// delay instead of spending the whole deadline on the first address.
    #[test]
    fn happy_eyeballs_when_the_first_family_hangs() {
        for v6_first in [true, false] {
            let live = TcpListener::bind(if v6_first { v4(0) } else { v6(0) }).unwrap();
            let port = live.local_addr().unwrap().port();
            let dead = if v6_first { v6(port) } else { v4(port) };
            let Some(_hung) = HungListener::bind(dead) else {
                eprintln!("SKIPPING: cannot make {dead} hang on this kernel");
                return;
            };
            let cancel = Cancel::new().unwrap();
            let dl = Deadline::after(Duration::from_secs(5));
            let t0 = Instant::now();
            let s = dial(
                &[dead, live.local_addr().unwrap()],
                &SocketOptions::default(),
                &dl,
                &cancel,
            )
            .unwrap_or_else(|e| panic!("dial with {dead} hanging: {e}"));
            let took = t0.elapsed();
            eprintln!("{dead} hanging: connected to the other family in {took:?}");
            assert_eq!(s.peer_addr().unwrap(), live.local_addr().unwrap());
            assert!(took >= DEFAULT_ATTEMPT_DELAY, "{took:?}");
            assert!(took < Duration::from_secs(3), "{took:?}");
        }
    }

    #[test]
    fn cancel_ends_a_hanging_dial_at_once() {
        let Some(hung) = HungListener::bind(v4(0)) else {
            eprintln!("SKIPPING: cannot make a loopback address hang on this kernel");
            return;
        };
        let dead = hung.addr;
        let cancel = std::sync::Arc::new(Cancel::new().unwrap());
        let canceller = cancel_soon(&cancel);
        let dl = Deadline::after(Duration::from_secs(30));
        let r = dial(&[dead], &SocketOptions::default(), &dl, &cancel);
        let lag = Instant::now() - canceller.join().unwrap();
        assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
        assert!(
            lag < Duration::from_millis(500),
            "returned {lag:?} after cancel"
        );
    }

    #[test]
    fn a_hanging_dial_ends_at_the_deadline() {
        let Some(hung) = HungListener::bind(v4(0)) else {
            return;
        };
        let dead = hung.addr;
        let cancel = Cancel::new().unwrap();
        let dl = Deadline::after(Duration::from_millis(300));
        let r = dial(&[dead], &SocketOptions::default(), &dl, &cancel);
        assert!(
            matches!(
                r,
                Err(Error::Timeout {
                    stage: ConnectStage::Tcp,
                    ..
                })
            ),
            "{r:?}"
        );
    }
}
