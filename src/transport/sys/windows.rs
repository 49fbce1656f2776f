//! Windows: `WSAPoll` (through `windows-sys`) and a connected loopback TCP pair (Windows
//! has no `socketpair`).

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::windows::io::{AsRawSocket, RawSocket};
use std::time::Duration;

use windows_sys::Win32::Networking::WinSock::{
    POLLERR, POLLHUP, POLLRDNORM, POLLWRNORM, SOCKET, SOCKET_ERROR, WSAGetLastError, WSAPOLLFD,
    WSAPoll,
};

/// Readable: normal data (Windows' `POLLIN` also asks for band data, which `WSAPoll`
/// rejects on some versions).
pub(crate) const POLLIN: i16 = POLLRDNORM;
pub(crate) const POLLOUT: i16 = POLLWRNORM;
/// Hang-up or error: reported whatever was asked for.
pub(crate) const POLLHUP_ERR: i16 = POLLHUP | POLLERR;
/// No such event with `WSAPoll` (a FIN shows as `POLLHUP` there): never reported.
pub(crate) const POLLRDHUP: i16 = 0;

/// A socket as `WSAPoll` sees it.
pub(crate) type Raw = RawSocket;
/// One entry of [`poll_fds`].
pub(crate) type PollFd = WSAPOLLFD;

/// The waker's socket pair ends.
pub(crate) type Pipe = TcpStream;

/// The socket to hand to [`poll_fds`].
pub(crate) fn raw(s: &impl AsRawSocket) -> Raw {
    s.as_raw_socket()
}

/// Two connected loopback sockets. The accepted end is checked to be our own connection
/// (another local process could connect to the listener in between).
///
/// Both ends close with a reset (`SO_LINGER` 0), never an orderly shutdown: the end
/// closed first would otherwise hold its port in TIME_WAIT (240 s by default on
/// Windows), one per waker (each connection's reader, each client's consumer), one per
/// client's connect cancel, and one per DNS lookup (each connect attempt to a host
/// name), and a client reconnecting in a loop would use up the ephemeral ports. Nothing is lost by it: a pair carries only wake-ups, and the
/// end left still becomes readable (a reset), which is all a wake-up is.
pub(crate) fn socket_pair() -> io::Result<(Pipe, Pipe)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let tx = TcpStream::connect(listener.local_addr()?)?;
    loop {
        let (rx, peer) = listener.accept()?;
        if peer == tx.local_addr()? {
            tx.set_nodelay(true)?;
            for end in [&tx, &rx] {
                socket2::SockRef::from(end).set_linger(Some(Duration::ZERO))?;
            }
            return Ok((tx, rx));
        }
    }
}

/// An entry of [`poll_fds`]; `events` is [`POLLIN`] and/or [`POLLOUT`].
pub(crate) fn pollfd(fd: Raw, events: i16) -> PollFd {
    WSAPOLLFD {
        fd: fd as SOCKET,
        events,
        revents: 0,
    }
}

/// A nonblocking `connect` that has started and not finished yet (`WSAEWOULDBLOCK`).
pub(crate) fn connect_in_progress(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// `WSAPoll`; `ms` -1 waits forever. Returns how many entries are ready; `Interrupted`
/// on `WSAEINTR` (the caller retries with the time left).
pub(crate) fn poll_fds(fds: &mut [PollFd], ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed slice of WSAPOLLFD structs for the
    // duration of the call, and its length is passed with it.
    let r = unsafe { WSAPoll(fds.as_mut_ptr(), fds.len() as u32, ms) };
    if r != SOCKET_ERROR {
        return Ok(r as usize);
    }
    // SAFETY: no precondition; reads this thread's last Winsock error.
    let code = unsafe { WSAGetLastError() };
    // WSAEINTR comes back as `Interrupted`: the caller retries with the time left.
    Err(io::Error::from_raw_os_error(code))
}

/// Resets the connection of `sock` at once: not done on Windows (`false`).
pub(crate) fn abort(sock: &TcpStream) -> bool {
    let _ = sock;
    false
}

/// Bytes of `sock` the kernel has not sent yet: Windows has no figure.
pub(crate) fn unsent_bytes(sock: &TcpStream) -> Option<u64> {
    let _ = sock;
    None
}

/// Bytes of `sock` the peer's TCP has not acknowledged yet: `None` on Windows, which has
/// no per-socket send-queue figure short of `SIO_TCP_INFO` (Windows 10 1703+; not used
/// yet), so at-least-once tracking keeps its fixed cap.
pub(crate) fn unacked_bytes(sock: &TcpStream) -> Option<u64> {
    let _ = sock;
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Local ports of the TCP connections in TIME_WAIT, from Linux's table (under Wine,
    /// Windows sockets are Linux sockets); `None` where there is no such table.
    fn time_wait_ports() -> Option<Vec<u16>> {
        let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
        let ports = table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.rsplit(':').next()?;
                (f.get(3) == Some(&"06"))
                    .then(|| u16::from_str_radix(port, 16).ok())
                    .flatten()
            })
            .collect();
        Some(ports)
    }

    #[test]
    fn a_dropped_socket_pair_resets_and_leaves_no_time_wait() {
        let before = time_wait_ports();
        let mut ports = Vec::new();
        for _ in 0..4 {
            let (mut tx, mut rx) = socket_pair().unwrap();
            tx.write_all(&[1]).unwrap();
            let mut byte = [0u8; 1];
            rx.read_exact(&mut byte).unwrap();
            ports.extend([
                tx.local_addr().unwrap().port(),
                rx.local_addr().unwrap().port(),
            ]);
            // One end goes: the other wakes (the DNS helper's end tells the connecting
            // thread so), reading a reset on Windows, an end of stream under Wine.
            drop(tx);
            rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let read = rx.read(&mut byte);
            assert!(
                matches!(&read, Ok(0))
                    || matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "the end left should read the end of the pair, got {read:?}"
            );
        }
        // The ports: none left in TIME_WAIT (240 s on Windows), one per waker (each
        // connection's reader) and one per DNS lookup. Under Wine, in the kernel's table
        // (before `SO_LINGER` 0: all four pairs left one).
        if let (Some(before), Some(after)) = (before, time_wait_ports()) {
            let left: Vec<u16> = ports
                .iter()
                .copied()
                .filter(|p| after.contains(p) && !before.contains(p))
                .collect();
            assert!(left.is_empty(), "ports left in TIME_WAIT: {left:?}");
        }
    }
}
