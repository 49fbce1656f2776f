//! Windows: `WSAPoll` (through `windows-sys`) and a connected loopback TCP pair (Windows
//! has no `socketpair`; an `AF_UNIX` pair would need Windows 10 1803 and cannot be
//! polled reliably with `WSAPoll`).

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::windows::io::{AsRawSocket, RawSocket};
use std::time::Duration;

use windows_sys::Win32::Networking::WinSock::{
    POLLRDNORM, POLLWRNORM, SOCKET, SOCKET_ERROR, WSAEINTR, WSAGetLastError, WSAPOLLFD, WSAPoll,
};

/// Readable: normal data (`POLLIN` on Windows also asks for band data, which `WSAPoll`
/// rejects on some versions).
pub(crate) const POLLIN: i16 = POLLRDNORM;
pub(crate) const POLLOUT: i16 = POLLWRNORM;

/// The waker's socket pair ends.
pub(crate) type Pipe = TcpStream;

/// The socket to hand to [`poll2`].
pub(crate) fn raw(s: &impl AsRawSocket) -> RawSocket {
    s.as_raw_socket()
}

/// Two connected loopback sockets. The accepted end is checked to be our own connection
/// (another local process could connect to the listener in between).
pub(crate) fn socket_pair() -> io::Result<(Pipe, Pipe)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let tx = TcpStream::connect(listener.local_addr()?)?;
    loop {
        let (rx, peer) = listener.accept()?;
        if peer == tx.local_addr()? {
            tx.set_nodelay(true)?;
            return Ok((tx, rx));
        }
    }
}

/// `WSAPoll` on up to two sockets; `None` waits forever. Returns the revents.
pub(crate) fn poll2(
    a: (RawSocket, i16),
    b: Option<(RawSocket, i16)>,
    timeout: Option<Duration>,
) -> io::Result<(i16, i16)> {
    let mut fds = [
        WSAPOLLFD {
            fd: a.0 as SOCKET,
            events: a.1,
            revents: 0,
        },
        WSAPOLLFD {
            fd: b.map_or(0, |b| b.0 as SOCKET),
            events: b.map_or(0, |b| b.1),
            revents: 0,
        },
    ];
    let n = if b.is_some() { 2 } else { 1 };
    let ms = super::timeout_ms(timeout);
    loop {
        // SAFETY: `fds` is a valid array of `n` WSAPOLLFD structs for the duration of the
        // call.
        let r = unsafe { WSAPoll(fds.as_mut_ptr(), n, ms) };
        if r != SOCKET_ERROR {
            return Ok((fds[0].revents, fds[1].revents));
        }
        // SAFETY: no precondition; reads this thread's last Winsock error.
        let code = unsafe { WSAGetLastError() };
        if code != WSAEINTR {
            return Err(io::Error::from_raw_os_error(code));
        }
    }
}
