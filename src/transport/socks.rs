//! The SOCKS5 client handshake (RFC 1928), with user name / password authentication
//! (RFC 1929), and SOCKS4 / SOCKS4a, on an already connected socket, bounded by the
//! connect deadline.
//!
//! Written here rather than taken from a crate: the blocking SOCKS crates (`socks`)
//! open the TCP connection themselves, with no deadline covering the handshake and no
//! way to cancel it, while this one runs on the socket our cancellable Happy Eyeballs
//! dial opened, with every read and write bounded by the one connect deadline. The
//! protocol is four small messages.

use std::io::{self, Read, Write};
use std::net::IpAddr;

use crate::transport::dial::{Cancel, Deadline};
use crate::transport::stream::Tcp;
use crate::{ConnectStage, Error, Result, SocksFailure};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const USER_PASS: u8 = 2;
const NO_ACCEPTABLE: u8 = 0xff;
const CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_NAME: u8 = 3;
const ATYP_V6: u8 = 4;

/// Where the tunnel goes: a name the proxy resolves (`socks5h`) or an address.
pub(crate) enum Target<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

/// Opens a tunnel to `target:port` through the SOCKS5 proxy at the other end of `sock`
/// (connecting: every read and write waits within the deadline, and a cancel ends it).
pub(crate) fn connect(
    sock: &mut Tcp,
    credentials: Option<(&str, &str)>,
    target: Target<'_>,
    port: u16,
    dl: &Deadline,
    cancel: &Cancel,
) -> Result<()> {
    if credentials.is_some_and(|(user, _)| user.is_empty()) {
        // RFC 1929: a user name is 1 to 255 bytes.
        return Err(Error::InvalidUrl {
            reason: "SOCKS5 authentication needs a user name with the password \
                     (socks5://user:password@host)"
                .into(),
        });
    }
    let mut io = Io { sock, dl, cancel };
    let methods: &[u8] = if credentials.is_some() {
        &[NO_AUTH, USER_PASS]
    } else {
        &[NO_AUTH]
    };
    let mut hello = vec![VERSION, methods.len() as u8];
    hello.extend_from_slice(methods);
    io.write(&hello)?;
    let [version, method] = io.read::<2>()?;
    if version != VERSION {
        return Err(malformed("not a SOCKS5 proxy"));
    }
    match (method, credentials) {
        (NO_AUTH, _) => {}
        (USER_PASS, Some((user, pass))) => authenticate(&mut io, user, pass)?,
        (NO_ACCEPTABLE, _) => {
            return Err(Error::Socks(if credentials.is_some() {
                SocksFailure::AuthRejected
            } else {
                SocksFailure::AuthRequired
            }));
        }
        _ => {
            return Err(malformed(
                "the proxy chose an authentication method not offered",
            ));
        }
    }
    let mut req = vec![VERSION, CONNECT, 0];
    match target {
        Target::Ip(IpAddr::V4(ip)) => {
            req.push(ATYP_V4);
            req.extend_from_slice(&ip.octets());
        }
        Target::Ip(IpAddr::V6(ip)) => {
            req.push(ATYP_V6);
            req.extend_from_slice(&ip.octets());
        }
        Target::Name(name) => {
            let len = u8::try_from(name.len()).map_err(|_| Error::InvalidUrl {
                reason: "host name longer than 255 bytes cannot go through SOCKS5".into(),
            })?;
            req.push(ATYP_NAME);
            req.push(len);
            req.extend_from_slice(name.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    io.write(&req)?;
    let [version, reply, _reserved, atyp] = io.read::<4>()?;
    if version != VERSION {
        return Err(malformed("bad reply version"));
    }
    if reply != 0 {
        return Err(Error::Socks(SocksFailure::Reply(reply)));
    }
    // The bound address: read and drop it, so no tunnelled byte is consumed with it.
    let rest = match atyp {
        ATYP_V4 => 4 + 2,
        ATYP_V6 => 16 + 2,
        ATYP_NAME => io.read::<1>()?[0] as usize + 2,
        _ => return Err(malformed("bad address type in the reply")),
    };
    let mut skip = [0u8; 257];
    io.read_exact(&mut skip[..rest])?;
    Ok(())
}

/// SOCKS4 (an IPv4 address) or SOCKS4a (a name the proxy resolves) `CONNECT`, with
/// `user` as the user id. The reply is 8 bytes; code 90 is success.
pub(crate) fn connect4(
    sock: &mut Tcp,
    user: &str,
    target: Target<'_>,
    port: u16,
    dl: &Deadline,
    cancel: &Cancel,
) -> Result<()> {
    let mut io = Io { sock, dl, cancel };
    let mut req = vec![4, CONNECT];
    req.extend_from_slice(&port.to_be_bytes());
    let name = match target {
        Target::Ip(IpAddr::V4(ip)) => {
            req.extend_from_slice(&ip.octets());
            None
        }
        Target::Ip(IpAddr::V6(_)) => {
            return Err(Error::InvalidUrl {
                reason: "SOCKS4 reaches IPv4 addresses only: use socks4a:// or socks5h://".into(),
            });
        }
        // 0.0.0.x with x != 0 tells a SOCKS4a proxy that a name follows.
        Target::Name(name) => {
            req.extend_from_slice(&[0, 0, 0, 1]);
            Some(name)
        }
    };
    if user.contains('\0') || name.is_some_and(|n| n.contains('\0')) {
        return Err(Error::InvalidUrl {
            reason: "NUL byte in a SOCKS4 user id or host name".into(),
        });
    }
    req.extend_from_slice(user.as_bytes());
    req.push(0);
    if let Some(name) = name {
        req.extend_from_slice(name.as_bytes());
        req.push(0);
    }
    io.write(&req)?;
    let reply = io.read::<8>()?;
    if reply[0] != 0 {
        return Err(malformed("not a SOCKS4 reply"));
    }
    if reply[1] != 90 {
        return Err(Error::Socks(SocksFailure::Reply(reply[1])));
    }
    Ok(())
}

/// RFC 1929: version 1, user name, password; a status of 0 is success.
fn authenticate(io: &mut Io<'_>, user: &str, pass: &str) -> Result<()> {
    let too_long = || Error::InvalidUrl {
        reason: "SOCKS5 user name and password are limited to 255 bytes each".into(),
    };
    let ulen = u8::try_from(user.len()).map_err(|_| too_long())?;
    let plen = u8::try_from(pass.len()).map_err(|_| too_long())?;
    let mut msg = vec![1, ulen];
    msg.extend_from_slice(user.as_bytes());
    msg.push(plen);
    msg.extend_from_slice(pass.as_bytes());
    io.write(&msg)?;
    let [_version, status] = io.read::<2>()?;
    if status != 0 {
        return Err(Error::Socks(SocksFailure::AuthRejected));
    }
    Ok(())
}

fn malformed(what: &str) -> Error {
    Error::ProxyProtocol(format!("SOCKS proxy: {what}"))
}

/// The handshake's reads and writes on the connecting socket (see `stream::Tcp`), with
/// its failures as the proxy stage's errors.
struct Io<'a> {
    sock: &'a mut Tcp,
    dl: &'a Deadline,
    cancel: &'a Cancel,
}

impl Io<'_> {
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.sock
            .write_all(buf)
            .map_err(|e| self.dl.failed(e, self.cancel, ConnectStage::Proxy))
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            // One wait per read: a proxy that trickles its answer meets the deadline too.
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(Error::io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the SOCKS proxy closed the connection during its handshake",
                    )));
                }
                Ok(n) => got += n,
                Err(e) => return Err(self.dl.failed(e, self.cancel, ConnectStage::Proxy)),
            }
        }
        Ok(())
    }
    fn read<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_exact(&mut buf)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    /// Runs `client` against a scripted proxy that answers each read with the next of
    /// `answers`; returns the client's result and every byte it sent.
    fn exchange(
        answers: &'static [&'static [u8]],
        client: impl FnOnce(&mut Tcp, &Deadline, &Cancel) -> Result<()>,
    ) -> (Result<()>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let proxy = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut got = Vec::new();
            for a in answers {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).unwrap_or(0);
                got.extend_from_slice(&buf[..n]);
                s.write_all(a).unwrap();
            }
            got
        });
        let sock = std::net::TcpStream::connect(addr).unwrap();
        // As the dial leaves it.
        sock.set_nonblocking(true).unwrap();
        let dl = Deadline::after(Duration::from_secs(10));
        let cancel = Cancel::new().unwrap();
        let mut tcp = Tcp::connecting(sock, dl.end, cancel.fd());
        let r = client(&mut tcp, &dl, &cancel);
        drop(tcp);
        (r, proxy.join().unwrap())
    }

    #[test]
    fn socks5h_sends_the_name_and_skips_the_bound_address() {
        let (r, sent) = exchange(
            &[&[5, 0], &[5, 0, 0, 3, 4, b'b', b'n', b'd', b'x', 0, 80]],
            |s, dl, c| connect(s, None, Target::Name("example.com"), 443, dl, c),
        );
        r.unwrap();
        let mut want = vec![5, 1, 0, 5, 1, 0, 3, 11];
        want.extend_from_slice(b"example.com");
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(sent, want);
    }

    #[test]
    fn a_password_without_a_user_name_is_a_typed_error_not_dropped() {
        let (r, sent) = exchange(&[], |s, dl, c| {
            connect(s, Some(("", "pw")), Target::Name("example.com"), 443, dl, c)
        });
        assert!(matches!(r, Err(Error::InvalidUrl { .. })), "{r:?}");
        assert!(sent.is_empty(), "nothing offered: {sent:?}");
    }

    #[test]
    fn user_password_then_ipv6_and_reply_codes() {
        let (r, sent) = exchange(
            &[&[5, 2], &[1, 0], &[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]],
            |s, dl, c| {
                connect(
                    s,
                    Some(("u", "pw")),
                    Target::Ip("::1".parse().unwrap()),
                    443,
                    dl,
                    c,
                )
            },
        );
        assert!(
            matches!(r, Err(Error::Socks(SocksFailure::Reply(4)))),
            "{r:?}"
        );
        let mut want = vec![5, 2, 0, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 4];
        want.extend_from_slice(&[0; 15]);
        want.push(1);
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(sent, want);
    }

    #[test]
    fn socks4a_sends_the_name_and_reads_the_reply() {
        let (r, sent) = exchange(&[&[0, 91, 0, 0, 0, 0, 0, 0]], |s, dl, c| {
            connect4(s, "me", Target::Name("a.example"), 443, dl, c)
        });
        assert!(
            matches!(r, Err(Error::Socks(SocksFailure::Reply(91)))),
            "{r:?}"
        );
        let mut want = vec![4, 1, 1, 187, 0, 0, 0, 1, b'm', b'e', 0];
        want.extend_from_slice(b"a.example\0");
        assert_eq!(sent, want);
        let (r, sent) = exchange(&[&[0, 90, 0, 0, 0, 0, 0, 0]], |s, dl, c| {
            connect4(s, "", Target::Ip("10.1.2.3".parse().unwrap()), 443, dl, c)
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(sent, [4, 1, 1, 187, 10, 1, 2, 3, 0]);
    }

    #[test]
    fn not_a_socks_server() {
        let (r, _) = exchange(&[b"HTTP/1.1 400 Bad Request\r\n\r\n"], |s, dl, c| {
            connect(s, None, Target::Name("x"), 443, dl, c)
        });
        assert!(matches!(r, Err(Error::ProxyProtocol(_))), "{r:?}");
    }
}
