//! Socket helpers shared by the server and the proxy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Granularity at which support threads notice control requests.
pub const TICK: Duration = Duration::from_millis(10);

/// Sets `SO_LINGER` to {on, 0 s}: closing the last descriptor of the socket then sends RST.
pub fn set_linger_zero(fd: &impl AsRawFd) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &l)
}

/// Aborts a connection: `SO_LINGER` 0 then close, so the peer gets RST.
pub fn reset(stream: TcpStream) {
    let _ = set_linger_zero(&stream);
    drop(stream);
}

/// Sets `SO_RCVBUF` (the kernel doubles the value and applies a minimum).
pub fn set_recv_buffer(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let v = bytes as libc::c_int;
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &v)
}

/// Sets `SO_SNDBUF` (the kernel doubles the value and applies a minimum).
pub fn set_send_buffer(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let v = bytes as libc::c_int;
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, &v)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points to a live value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Readiness reported by [`poll_fds`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Ready {
    /// Readable, or hang-up / error (a read will not block).
    pub read: bool,
    /// Writable, or error (a write will not block).
    pub write: bool,
}

/// `poll(2)` on up to a few descriptors: `(fd, want_read, want_write)`. Returns one
/// [`Ready`] per entry; all false on timeout. EINTR counts as a timeout.
pub fn poll_fds(fds: &[(RawFd, bool, bool)], timeout: Duration) -> Vec<Ready> {
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

/// Waits (at most `timeout`) until `fd` is readable (if `read`) or writable (if `write`).
pub fn wait_fd(fd: RawFd, read: bool, write: bool, timeout: Duration) -> Ready {
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
            wait_fd(listener.as_raw_fd(), true, false, TICK);
            None
        }
        // ECONNABORTED, EMFILE, ...: back off one tick and let the caller retry.
        Err(_) => {
            wait_fd(listener.as_raw_fd(), true, false, TICK);
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

    /// Raw fd of the underlying TCP socket.
    pub fn fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
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
