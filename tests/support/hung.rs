//! [`HungListener`]: a loopback address where a TCP connect hangs, without root.
//!
//! Standalone (socket2 and libc / windows-sys only): also compiled into the crate's own unit tests
//! (`src/transport/dial.rs`, with `#[path]`), which cannot use the rest of this support code.
#![allow(dead_code)]

use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// A listener that never accepts and whose accept queue is full, so a new connect to
/// it hangs in SYN-SENT (its SYNs are dropped): a blackholed address on loopback,
/// without root or iptables. Keep it alive for as long as the hang is needed.
pub struct HungListener {
    pub addr: SocketAddr,
    _listener: Socket,
    _fillers: Vec<Socket>,
}

impl HungListener {
    /// Binds `addr` (port 0 for any; IPv6 only for an IPv6 address) with a backlog of 0
    /// and fills the queue. `None` when this kernel accepts connections beyond the
    /// backlog (the caller skips with a message).
    pub fn bind(addr: SocketAddr) -> Option<HungListener> {
        let l = Socket::new(Domain::for_address(addr), Type::STREAM, None).ok()?;
        if addr.is_ipv6() {
            l.set_only_v6(true).ok()?;
        }
        l.bind(&addr.into()).ok()?;
        l.listen(0).ok()?;
        let addr = l.local_addr().ok()?.as_socket()?;
        let mut fillers = Vec::new();
        for _ in 0..64 {
            let c = Socket::new(Domain::for_address(addr), Type::STREAM, None).ok()?;
            c.set_nonblocking(true).ok()?;
            let _ = c.connect(&addr.into());
            let connected = writable_within_300ms(&c);
            fillers.push(c);
            if !connected {
                return Some(HungListener {
                    addr,
                    _listener: l,
                    _fillers: fillers,
                });
            }
        }
        None
    }
}

#[cfg(unix)]
fn writable_within_300ms(s: &Socket) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, 300) > 0 }
}

#[cfg(windows)]
fn writable_within_300ms(s: &Socket) -> bool {
    use std::os::windows::io::AsRawSocket;
    use windows_sys::Win32::Networking::WinSock::{POLLWRNORM, WSAPOLLFD, WSAPoll};
    let mut fd = WSAPOLLFD {
        fd: s.as_raw_socket() as usize,
        events: POLLWRNORM,
        revents: 0,
    };
    // SAFETY: one valid WSAPOLLFD for the duration of the call.
    unsafe { WSAPoll(&mut fd, 1, 300) > 0 }
}
