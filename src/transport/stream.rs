//! The byte stream under a WebSocket: a TCP socket with the connect deadline and the
//! reader's quota, plain or under TLS. No locks here; the rules for using it under the
//! link lock are in `link.rs`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use tungstenite::WebSocket;

use crate::DisconnectReason;
use crate::transport::dial::{is_retry, wait_ready};
use crate::transport::sys::Raw;

/// Most bytes one `read()` of a message may take from the socket: the reader's per lock
/// hold (besides at most `read_budget` messages), and an `on_connect` hook's per look at
/// its deadline.
pub(crate) const READ_QUOTA: usize = 256 << 10;

/// The TCP socket under a [`Stream`] (under TLS, if any), with two bounds:
/// - while connecting, a deadline and the client's cancel descriptor: every read and
///   write of the (nonblocking) socket first waits in `poll` for it, the time left at
///   most (`dial::wait_ready`), and fails with `TimedOut` past it, so a peer that
///   trickles bytes cannot stretch the TLS handshake or the upgrade response beyond the
///   connect timeout, and `close()` ends the wait at once on every platform;
/// - while the reader drains, a read quota: past it reads report `WouldBlock`, so a peer
///   that never completes a message (endless empty fragments) cannot keep the reader
///   inside one `read()` under the lock.
pub(crate) struct Tcp {
    pub sock: TcpStream,
    /// While connecting: the deadline, and the read end of the client's `Cancel` (see
    /// `dial::wait_ready`). The `Cancel` lives in the client's shared state, which
    /// outlives every connect attempt; [`Tcp::connected`] forgets it.
    setup: Option<(Instant, Raw)>,
    read_quota: Option<usize>,
    /// Bytes the OS accepted on this socket so far (TLS records included): the offset
    /// at which each flushed message ends, to match against the kernel's send queue.
    written: u64,
    /// `written` when bytes last arrived from the peer (its last sign of life).
    written_at_read: u64,
    /// What is read now may have waited in the socket for long (the reader was held back
    /// by the event bound): it says nothing of when the peer sent it, so it does not move
    /// `written_at_read`, until a read finds the socket empty (see [`Stream::input_stale`]).
    stale: bool,
    /// The widest read tungstenite asked for since the connection opened: its read
    /// buffer size (see [`Stream::take_nearly_full`]).
    widest_read: usize,
    /// A read left tungstenite's read buffer nearly full.
    nearly_full: bool,
    /// Bytes tungstenite read so far (after TLS): what a drain read, against what its
    /// frames account for.
    taken: u64,
    /// Bytes read past an informational HTTP answer during the upgrade, read again first
    /// (after TLS: they are the plaintext the upgrade had read).
    replay: Vec<u8>,
}

impl Tcp {
    /// A socket whose reads and writes end at `deadline`, or as soon as `cancel` (a
    /// `Cancel::fd`) is readable (see [`Tcp::connected`]).
    pub(crate) fn connecting(sock: TcpStream, deadline: Instant, cancel: Raw) -> Tcp {
        Tcp {
            sock,
            setup: Some((deadline, cancel)),
            read_quota: None,
            written: 0,
            written_at_read: 0,
            stale: false,
            widest_read: 0,
            nearly_full: false,
            taken: 0,
            replay: Vec::new(),
        }
    }

    /// The connection is established: no deadline any more, and reads from now on are
    /// tungstenite's (not the handshake's).
    pub(crate) fn connected(&mut self) {
        self.setup = None;
        self.widest_read = 0;
        self.nearly_full = false;
    }

    /// While connecting: waits until the next call can go on (or the set-up is
    /// cancelled, or the deadline passed). Whether connecting.
    fn ready(&self, read: bool) -> io::Result<bool> {
        match self.setup {
            Some((end, cancel)) => wait_ready(&self.sock, !read, cancel, end).map(|()| true),
            None => Ok(false),
        }
    }
}

impl Read for Tcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let buf = match self.read_quota {
            Some(0) => return Err(io::ErrorKind::WouldBlock.into()),
            Some(q) => {
                let n = buf.len().min(q);
                &mut buf[..n]
            }
            None => buf,
        };
        // While connecting, a readiness that went away, or a signal: wait again (the TLS
        // library and tungstenite's handshake would take either for a failure). On the
        // open connection `WouldBlock` goes up: the reader drains until it.
        let n = loop {
            let connecting = self.ready(true)?;
            match (&self.sock).read(buf) {
                Err(e) if connecting && is_retry(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Read to the socket's end: what comes from now on is fresh.
                    self.stale = false;
                    return Err(e);
                }
                r => break r?,
            }
        };
        if let Some(q) = self.read_quota.as_mut() {
            *q -= n;
        }
        if n > 0 && !self.stale {
            self.written_at_read = self.written;
        }
        Ok(n)
    }
}

impl Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // While connecting, as `read`: a part at a time, each once the socket takes it.
        let n = loop {
            let connecting = self.ready(false)?;
            match (&self.sock).write(buf) {
                Err(e) if connecting && is_retry(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        // No clock read here (one per send, 30-80 ns on a VM): a write stall is judged
        // from this count (see `Live::note_pending` in link.rs).
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&self.sock).flush()
    }
}

/// A plain or TLS byte stream under the WebSocket.
pub(crate) enum Stream {
    Plain(Tcp),
    Tls(Box<crate::transport::tls::TlsStream<Tcp>>),
}

impl Stream {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => &s.sock,
            Stream::Tls(s) => &s.get_ref().sock,
        }
    }

    fn inner(&self) -> &Tcp {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut Tcp {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_mut(),
        }
    }

    /// Bytes the OS accepted on this socket so far, and that count when bytes last
    /// arrived from the peer: matched against the kernel's send queue (`link.rs`).
    pub(crate) fn offsets(&self) -> (u64, u64) {
        let tcp = self.inner();
        (tcp.written, tcp.written_at_read)
    }

    /// The input waiting in the socket may have waited there for long (the reader was
    /// held back): until a read finds the socket empty, reading it is no sign of life
    /// after the output written meanwhile (review of 3bc9e13: messages a hung server's
    /// kernel acknowledged after its last message were taken for delivered, because that
    /// message was read after them).
    pub(crate) fn input_stale(&mut self) {
        self.inner_mut().stale = true;
    }

    /// Has `bytes` read again before anything else (they come before what is left of an
    /// earlier `unread`: read after it).
    pub(crate) fn unread(&mut self, mut bytes: Vec<u8>) {
        let tcp = self.inner_mut();
        bytes.append(&mut tcp.replay);
        tcp.replay = bytes;
    }

    /// Bytes tungstenite read from this stream so far (after TLS).
    pub(crate) fn bytes_read(&self) -> u64 {
        self.inner().taken
    }

    /// Whether input read from the socket may wait below tungstenite and above the
    /// socket (bytes to read again, or in the TLS layer), where `poll` does not see it.
    pub(crate) fn holds_input(&self) -> bool {
        !self.inner().replay.is_empty()
            || match self {
                Stream::Plain(_) => false,
                Stream::Tls(s) => s.holds_input(),
            }
    }

    /// The connection is established: lift the connect deadline.
    pub(crate) fn connected(&mut self) {
        self.inner_mut().connected();
    }

    /// Whether a read left less than a quarter of tungstenite's read buffer free since
    /// the last call (clears it).
    ///
    /// tungstenite reads into the free end of one buffer and hands out messages that
    /// share it. When a frame no longer fits in the free part, it reserves room: in place
    /// (shifting the unread rest to the front) if no message still points into the
    /// buffer, else by allocating a new one and copying everything unread into it. The
    /// reader therefore ends its drain here (issue 11: that copy was 2% of the client's
    /// CPU on 64-byte messages), so a consumer that handled and dropped the messages
    /// read so far lets the next drain reuse the buffer.
    #[inline]
    pub(crate) fn take_nearly_full(&mut self) -> bool {
        std::mem::take(&mut self.inner_mut().nearly_full)
    }

    /// Caps the bytes read from the socket from now on (`None`: no cap). Returns what
    /// was left of the previous cap.
    pub(crate) fn set_read_quota(&mut self, bytes: Option<usize>) -> Option<usize> {
        std::mem::replace(&mut self.inner_mut().read_quota, bytes)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let replay = &mut self.inner_mut().replay;
        if !replay.is_empty() && !buf.is_empty() {
            let n = buf.len().min(replay.len());
            buf[..n].copy_from_slice(&replay[..n]);
            replay.drain(..n);
            self.inner_mut().taken += n as u64;
            return Ok(n);
        }
        let n = match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }?;
        // tungstenite offers the free part of its read buffer, at most its size.
        let tcp = self.inner_mut();
        tcp.taken += n as u64;
        tcp.widest_read = tcp.widest_read.max(buf.len());
        if buf.len().saturating_sub(n) < tcp.widest_read / 4 {
            tcp.nearly_full = true;
        }
        Ok(n)
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

pub(crate) type Ws = WebSocket<Stream>;

pub(crate) fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// Maps a tungstenite failure on an open connection to why it ended.
pub(crate) fn reason_of(e: &tungstenite::Error) -> DisconnectReason {
    use tungstenite::Error as W;
    match e {
        W::Io(io) => match io.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected => DisconnectReason::Reset,
            _ => DisconnectReason::Io(io.to_string()),
        },
        W::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)
        | W::ConnectionClosed
        | W::AlreadyClosed => DisconnectReason::Reset,
        W::Tls(t) => DisconnectReason::Io(format!("TLS: {t}")),
        // Without tungstenite's "WebSocket protocol error: " (the reason says it).
        W::Protocol(p) => DisconnectReason::Protocol(p.to_string()),
        other => DisconnectReason::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::dial::{Cancel, Deadline};
    use crate::{ConnectStage, Error};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Duration;

    /// A TLS handshake or an upgrade reading from a server that never answers: a cancel
    /// ends the read at once, with no socket shutdown to wake it (Windows).
    #[test]
    fn a_set_up_read_ends_at_a_cancel_without_a_shutdown() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _silent = l.accept().unwrap();
        let cancel = Arc::new(Cancel::new().unwrap());
        let mut tcp = Tcp::connecting(sock, Instant::now() + Duration::from_secs(30), cancel.fd());
        let c = cancel.clone();
        let canceller = std::thread::spawn(move || {
            // Not a synchronisation: the read below ends promptly whether it has begun
            // waiting by then or not.
            std::thread::sleep(Duration::from_millis(100));
            let at = Instant::now();
            c.cancel();
            at
        });
        let e = tcp.read(&mut [0u8; 16]).unwrap_err();
        let lag = Instant::now() - canceller.join().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(
            lag < Duration::from_millis(500),
            "read ended {lag:?} after the cancel"
        );
        // Once connected, the cancel of the set-up no longer applies.
        tcp.connected();
        tcp.sock.set_nonblocking(true).unwrap();
        let e = tcp.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    }

    /// A proxy's handshake reads and writes the connecting socket too: a cancel ends its
    /// wait at once even when nothing shuts the socket down (under Windows a shutdown does
    /// not wake a blocked read, so `close()` waited for the connect timeout there), as
    /// `Error::Closed`; and it stays cancelled.
    #[test]
    fn a_proxy_wait_ends_at_a_cancel_as_closed() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _silent = l.accept().unwrap();
        // Never attached: the cancel cannot shut this socket down.
        let cancel = Arc::new(Cancel::new().unwrap());
        let dl = Deadline::after(Duration::from_secs(30));
        let mut tcp = Tcp::connecting(sock, dl.end, cancel.fd());
        let c = cancel.clone();
        let canceller = std::thread::spawn(move || {
            // Not a synchronisation: the read below ends promptly either way.
            std::thread::sleep(Duration::from_millis(100));
            let at = Instant::now();
            c.cancel();
            at
        });
        let proxy = ConnectStage::Proxy;
        let r = tcp
            .read(&mut [0u8; 16])
            .map_err(|e| dl.failed(e, &cancel, proxy));
        let lag = Instant::now() - canceller.join().unwrap();
        assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
        assert!(
            lag < Duration::from_millis(500),
            "returned {lag:?} after cancel"
        );
        // Cancelled stays cancelled: the next wait returns at once, writes too.
        let r = tcp.write(b"x").map_err(|e| dl.failed(e, &cancel, proxy));
        assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
    }

    #[test]
    fn a_proxy_wait_on_a_silent_socket_ends_at_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _silent = l.accept().unwrap();
        let cancel = Cancel::new().unwrap();
        let proxy = ConnectStage::Proxy;
        let dl = Deadline::after(Duration::from_millis(200));
        let mut tcp = Tcp::connecting(sock.try_clone().unwrap(), dl.end, cancel.fd());
        let r = tcp
            .read(&mut [0u8; 16])
            .map_err(|e| dl.failed(e, &cancel, proxy));
        assert!(
            matches!(
                r,
                Err(Error::Timeout {
                    stage: ConnectStage::Proxy,
                    ..
                })
            ),
            "{r:?}"
        );
        // A writable socket is written at once.
        let dl = Deadline::after(Duration::from_secs(30));
        let mut tcp = Tcp::connecting(sock, dl.end, cancel.fd());
        assert_eq!(tcp.write(b"x").unwrap(), 1);
    }
}
