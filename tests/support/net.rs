//! Socket helpers shared by the server and the proxy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
#[cfg(unix)]
pub use std::os::fd::{AsFd as AsSock, AsRawFd as AsRawSock, RawFd as RawSock};
#[cfg(windows)]
pub use std::os::windows::io::{
    AsRawSocket as AsRawSock, AsSocket as AsSock, RawSocket as RawSock,
};
use std::time::{Duration, Instant};

use socket2::SockRef;

/// Granularity at which support threads notice control requests.
pub const TICK: Duration = Duration::from_millis(10);

/// The raw descriptor (Unix) or socket (Windows) of `s`, for [`poll_fds`].
pub fn raw(s: &impl AsRawSock) -> RawSock {
    #[cfg(unix)]
    return s.as_raw_fd();
    #[cfg(windows)]
    return s.as_raw_socket();
}

/// Sets `SO_LINGER` to {on, 0 s}: closing the last descriptor of the socket then sends RST.
pub fn set_linger_zero(s: &impl AsSock) -> io::Result<()> {
    SockRef::from(s).set_linger(Some(Duration::ZERO))
}

/// Aborts a connection: `SO_LINGER` 0 then close, so the peer gets RST.
pub fn reset(stream: TcpStream) {
    let _ = set_linger_zero(&stream);
    drop(stream);
}

/// A TCP stream that reads at most `per_read` bytes at a time, each read after `gap`:
/// the pace of a slow but steady reader (a scenario, not synchronisation). Writes go
/// straight through.
pub struct Paced {
    pub stream: TcpStream,
    pub per_read: usize,
    pub gap: Duration,
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(self.gap);
        let n = buf.len().min(self.per_read);
        self.stream.read(&mut buf[..n])
    }
}

impl Write for Paced {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Sets `SO_RCVBUF` (Linux doubles the value and applies a minimum).
pub fn set_recv_buffer(s: &impl AsSock, bytes: usize) -> io::Result<()> {
    SockRef::from(s).set_recv_buffer_size(bytes)
}

/// Sets `SO_SNDBUF` (Linux doubles the value and applies a minimum).
pub fn set_send_buffer(s: &impl AsSock, bytes: usize) -> io::Result<()> {
    SockRef::from(s).set_send_buffer_size(bytes)
}

/// Readiness reported by [`poll_fds`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Ready {
    /// Readable, or hang-up / error (a read will not block).
    pub read: bool,
    /// Writable, or error (a write will not block).
    pub write: bool,
}

/// `poll(2)` (`WSAPoll` on Windows) on up to a few sockets: `(fd, want_read, want_write)`.
/// Returns one [`Ready`] per entry; all false on timeout. EINTR counts as a timeout.
#[cfg(unix)]
pub fn poll_fds(fds: &[(RawSock, bool, bool)], timeout: Duration) -> Vec<Ready> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, r, w)| libc::pollfd {
            fd: if r || w { fd } else { -1 },
            events: (if r { libc::POLLIN } else { 0 }) | (if w { libc::POLLOUT } else { 0 }),
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc <= 0 {
        return vec![Ready::default(); fds.len()];
    }
    let err = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    pfds.iter()
        .map(|p| Ready {
            read: p.revents & (libc::POLLIN | err) != 0,
            write: p.revents & (libc::POLLOUT | err) != 0,
        })
        .collect()
}

/// `poll(2)` (`WSAPoll` on Windows) on up to a few sockets: `(fd, want_read, want_write)`.
/// Returns one [`Ready`] per entry; all false on timeout.
#[cfg(windows)]
pub fn poll_fds(fds: &[(RawSock, bool, bool)], timeout: Duration) -> Vec<Ready> {
    use windows_sys::Win32::Networking::WinSock::{
        POLLERR, POLLHUP, POLLNVAL, POLLRDNORM, POLLWRNORM, SOCKET, WSAPOLLFD, WSAPoll,
    };
    // WSAPoll rejects an entry with no events; those are left out and reported not ready.
    let wanted: Vec<usize> = (0..fds.len()).filter(|&i| fds[i].1 || fds[i].2).collect();
    let mut pfds: Vec<WSAPOLLFD> = wanted
        .iter()
        .map(|&i| {
            let (fd, r, w) = fds[i];
            WSAPOLLFD {
                fd: fd as SOCKET,
                events: (if r { POLLRDNORM } else { 0 }) | (if w { POLLWRNORM } else { 0 }),
                revents: 0,
            }
        })
        .collect();
    let mut out = vec![Ready::default(); fds.len()];
    if pfds.is_empty() {
        std::thread::sleep(timeout);
        return out;
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` WSAPOLLFD structs.
    let rc = unsafe { WSAPoll(pfds.as_mut_ptr(), pfds.len() as u32, ms) };
    if rc <= 0 {
        return out;
    }
    let err = POLLERR | POLLHUP | POLLNVAL;
    for (p, &i) in pfds.iter().zip(&wanted) {
        out[i] = Ready {
            read: p.revents & (POLLRDNORM | err) != 0,
            write: p.revents & (POLLWRNORM | err) != 0,
        };
    }
    out
}

/// Waits (at most `timeout`) until `fd` is readable (if `read`) or writable (if `write`).
pub fn wait_fd(fd: RawSock, read: bool, write: bool, timeout: Duration) -> Ready {
    poll_fds(&[(fd, read, write)], timeout)[0]
}

/// Binds `addr`, retrying on `EADDRINUSE` until `timeout` (for rebinding a just-freed port).
pub fn bind_retry(addr: SocketAddr, timeout: Duration) -> io::Result<TcpListener> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                // Polling for the port to become free; nothing to wait on.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts one connection from a non-blocking `listener`, waiting at most [`TICK`].
pub fn accept_tick(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept() {
        Ok(c) => Some(c),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            wait_fd(raw(listener), true, false, TICK);
            None
        }
        // ECONNABORTED, EMFILE, ...: back off one tick and let the caller retry.
        Err(_) => {
            wait_fd(raw(listener), true, false, TICK);
            None
        }
    }
}

/// Is this error a "try again later" (non-blocking socket, or a read/write timeout)?
pub fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A server-side connection: plain TCP or TLS over TCP.
pub enum Stream {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

impl Stream {
    /// The underlying TCP socket.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// Raw fd (socket on Windows) of the underlying TCP socket.
    pub fn fd(&self) -> RawSock {
        raw(self.tcp())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One frame of a text message sent in `total` fragments of `payload` (fragment `i`: the
/// first has opcode 1, the last FIN), unmasked as a server sends it, optionally followed
/// by an empty ping in the same write: a large message trickling in while the peer's
/// library pings.
pub fn text_fragment(i: usize, total: usize, payload: &[u8], ping_after: bool) -> Vec<u8> {
    let op = if i == 0 { 0x01 } else { 0x00 };
    let fin = if i + 1 == total { 0x80 } else { 0 };
    let mut buf = vec![fin | op];
    match payload.len() {
        n if n < 126 => buf.push(n as u8),
        n => {
            buf.push(126);
            buf.extend_from_slice(&u16::try_from(n).expect("at most 64 KiB").to_be_bytes());
        }
    }
    buf.extend_from_slice(payload);
    if ping_after {
        buf.extend([0x89, 0x00]);
    }
    buf
}

/// Sends `SIGUSR2` to the calling thread every `period` (a handler that does nothing is
/// installed, with `SA_RESTART` if `restart`) until the returned guard is dropped, for at
/// most 5 s.
#[cfg(unix)]
pub fn signal_me_every(period: Duration, restart: bool) -> Signaller {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing (async-signal-safe) for SIGUSR2, which
    // nothing else in the tests uses; `act` is fully initialised.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
        if restart {
            act.sa_flags = libc::SA_RESTART;
        }
        libc::sigemptyset(&mut act.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR2, &act, std::ptr::null_mut()),
            0
        );
    }
    // SAFETY: no precondition.
    let me = unsafe { libc::pthread_self() } as usize;
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::spawn(move || {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            // SAFETY: `me` is the thread that made the guard, alive until the guard is
            // dropped, which joins this thread.
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR2) };
            if stopped.recv_timeout(period).is_ok() {
                break;
            }
        }
    });
    Signaller {
        stop,
        thread: Some(thread),
    }
}

/// Stops the signals of [`signal_me_every`] when dropped.
#[cfg(unix)]
pub struct Signaller {
    stop: crossbeam_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(unix)]
impl Drop for Signaller {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
