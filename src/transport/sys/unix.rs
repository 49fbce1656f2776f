//! Unix: `poll(2)` and a `UnixStream` pair.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

pub(crate) const POLLIN: i16 = libc::POLLIN;
pub(crate) const POLLOUT: i16 = libc::POLLOUT;
/// Hang-up or error: reported whatever was asked for.
pub(crate) const POLLHUP_ERR: i16 = libc::POLLHUP | libc::POLLERR;
/// The peer shut its side (FIN), asked for without asking for input: Linux only (0, never
/// reported, elsewhere).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) const POLLRDHUP: i16 = libc::POLLRDHUP;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) const POLLRDHUP: i16 = 0;

/// A socket as `poll` sees it.
pub(crate) type Raw = RawFd;
/// One entry of [`poll_fds`].
pub(crate) type PollFd = libc::pollfd;

/// The waker's socket pair ends.
pub(crate) type Pipe = UnixStream;

/// The descriptor to hand to [`poll_fds`].
pub(crate) fn raw(s: &impl AsRawFd) -> Raw {
    s.as_raw_fd()
}

pub(crate) fn socket_pair() -> io::Result<(Pipe, Pipe)> {
    UnixStream::pair()
}

/// An entry of [`poll_fds`]; `events` is [`POLLIN`] and/or [`POLLOUT`].
pub(crate) fn pollfd(fd: Raw, events: i16) -> PollFd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// A nonblocking `connect` that has started and not finished yet.
pub(crate) fn connect_in_progress(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock
}

/// `poll(2)`; `ms` -1 waits forever. Returns how many entries are ready; `Interrupted`
/// when a signal handler ran (the caller retries with the time left).
pub(crate) fn poll_fds(fds: &mut [PollFd], ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd structs for the
    // duration of the call, and its length is passed with it.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r >= 0 {
        Ok(r as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Resets the connection of `sock` at once, where the OS can: on Linux a `connect` to
/// `AF_UNSPEC` runs the kernel's TCP disconnect. A reset goes out, the send queue is
/// discarded, and every thread polling a descriptor of it wakes (hang-up and error),
/// whatever descriptors stay open. Elsewhere `false`: nothing was done.
pub(crate) fn abort(sock: &TcpStream) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let addr = libc::sockaddr {
            sa_family: libc::AF_UNSPEC as libc::sa_family_t,
            sa_data: [0; 14],
        };
        let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
        // SAFETY: `addr` is a valid `sockaddr` of `len` bytes.
        unsafe { libc::connect(raw(sock), &addr, len) == 0 }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = sock;
        false
    }
}

/// The byte count a Linux socket ioctl `request` reports (`SIOCOUTQ`, `SIOCOUTQNSD`:
/// one int), if it worked.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn socket_count(sock: &TcpStream, request: libc::Ioctl) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: `request` is one of the socket ioctls that write one int to the pointer.
    let r = unsafe { libc::ioctl(raw(sock), request, &mut n) };
    (r == 0 && n >= 0).then_some(n as u64)
}

/// Bytes of `sock` the kernel has not sent yet (the unsent part of its send queue).
/// Linux: the `SIOCOUTQNSD` ioctl; elsewhere `None`.
pub(crate) fn unsent_bytes(sock: &TcpStream) -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        socket_count(sock, libc::SIOCOUTQNSD as _)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = sock;
        None
    }
}

/// Bytes of `sock` the peer's TCP has not acknowledged yet (sent or not): the kernel's
/// send queue. Linux: the `SIOCOUTQ` ioctl; macOS/iOS: `SO_NWRITE`. Elsewhere `None`
/// (other Unix systems). Behind a proxy this is what the *proxy's* TCP has not acknowledged.
pub(crate) fn unacked_bytes(sock: &TcpStream) -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // TIOCOUTQ is SIOCOUTQ on sockets.
        socket_count(sock, libc::TIOCOUTQ)
    }
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        let mut n: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_NWRITE writes one int; `len` holds its size.
        let r = unsafe {
            libc::getsockopt(
                raw(sock),
                libc::SOL_SOCKET,
                libc::SO_NWRITE,
                (&mut n as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0 && n >= 0).then_some(n as u64)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios"
    )))]
    {
        let _ = sock;
        None
    }
}
