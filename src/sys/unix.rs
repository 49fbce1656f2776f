//! Unix: `poll(2)` and a `UnixStream` pair.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub(crate) const POLLIN: i16 = libc::POLLIN;
pub(crate) const POLLOUT: i16 = libc::POLLOUT;

/// The waker's socket pair ends.
pub(crate) type Pipe = UnixStream;

/// The descriptor to hand to [`poll2`].
pub(crate) fn raw(s: &impl AsRawFd) -> RawFd {
    s.as_raw_fd()
}

pub(crate) fn socket_pair() -> io::Result<(Pipe, Pipe)> {
    UnixStream::pair()
}

/// `poll(2)` on up to two descriptors; `None` waits forever. Returns the revents.
pub(crate) fn poll2(
    a: (RawFd, i16),
    b: Option<(RawFd, i16)>,
    timeout: Option<Duration>,
) -> io::Result<(i16, i16)> {
    let mut fds = [
        libc::pollfd {
            fd: a.0,
            events: a.1,
            revents: 0,
        },
        libc::pollfd {
            fd: b.map_or(-1, |b| b.0),
            events: b.map_or(0, |b| b.1),
            revents: 0,
        },
    ];
    let n = if b.is_some() { 2 } else { 1 };
    let ms = super::timeout_ms(timeout);
    loop {
        // SAFETY: `fds` is a valid array of `n` pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok((fds[0].revents, fds[1].revents));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
