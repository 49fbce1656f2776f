//! The shared link: the socket behind the one lock, and the rules for touching it.
//!
//! # Lock discipline
//! There is one lock per client, `Shared::link` (a `parking_lot::Mutex<Link>`, with the
//! `Shared::changed` condvar). It guards the current socket, the offline queue, the
//! connection state and the heartbeat state.
//!
//! ## Every lock, and the order
//! | lock | taken by | held around |
//! |------|----------|-------------|
//! | `Shared::link` | every thread: senders, reader, timer, supervisor, `state`/`stats`/`wait_connected`, eager `connect` | socket calls in nonblocking mode, queue and state updates, `Heartbeat::app` reply matchers (user code), unbounded channel sends |
//! | `Shared::connecting` (the mutex inside `dial::Cancel`) | supervisor (`establish` / `connect::open`: attach / detach the socket of the attempt), `close()` (`Cancel::cancel`: shut it down) | a `try_clone` / `shutdown` of that socket and an atomic load |
//! | `Handle::supervisor` (client.rs) | `close()` / drop of the last handle | taking the `JoinHandle` out (the join happens after it is released) |
//! | `Config::policy` | supervisor only | the user's `ReconnectPolicy::next_delay` / `min_uptime` |
//! | `Inbound::waker`, `Inbound::held_since` (inbound.rs) | the reader (attach, hold, resume), the consumer in `Events` (wake the reader), `stats()` before it takes `link` | an `Option` read or write (leaves; never taken under `link`) |
//! | `Shared::gate` (+ `gate_cv`) | a sender that found `link` taken (`lock_for_send`), the reader after letting `link` go (`wake_senders`) | a `try_lock` of `link` (never a blocking lock) and the condvar wait / notify |
//! | `EventSink::grammar` (event.rs) | whoever emits an event (any thread, also under `link`); `close()` (`begin_close`, `wait_closed`) | the grammar check and one unbounded channel send; the condvar wait for `Closed` |
//!
//! The order is simply: **`connecting`, `supervisor` and the event grammar are leaf locks**,
//! and under **`link`** only the grammar lock is ever taken (by `emit`) — so no cycle can
//! form. The only other nestings are `policy` → `link`, when the user's policy code calls a
//! `Client` method (nothing ever takes `policy` while holding another lock), and `gate` →
//! `link` by `try_lock` only, which cannot wait and so cannot deadlock. (crossbeam's
//! internal channel locks are leaves too: an unbounded send never waits.)
//! Consequences for user code: a `Heartbeat::app` reply matcher runs under `link` and must
//! not call back into the `Client` (the mutex is not reentrant); event handlers, request
//! factories, `on_connect` hooks and reconnect policies run with no `link` held.
//!
//! ## Rules for everything done under `link`
//! 1. The socket is always in nonblocking mode once a connection is published, so no
//!    call made under the lock can block on the network.
//! 2. Waiting for readability or writability happens with `poll(2)` *without* the lock
//!    (`MutexGuard::unlocked_fair`), on a `dup` of the socket so the descriptor stays valid.
//! 3. The reader releases the lock with `unlock_fair` after at most `read_budget`
//!    messages and at most `READ_QUOTA` bytes read from the socket (`Tcp`'s read quota),
//!    so writers wait at most one bounded drain, whatever the peer sends.
//! 4. Only unbounded channels are sent to while the lock is held.
//! 5. On `WouldBlock` tungstenite keeps the frame: we retry `flush()`, never re-send.
//! 6. No thread is joined while any lock is held (the supervisor joins the reader after
//!    releasing `link`, `close()` joins the supervisor after releasing `supervisor`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tungstenite::WebSocket;

use crate::config::{Config, OverflowPolicy};
use crate::dial::Cancel;
use crate::event::EventSink;
use crate::heartbeat::HbState;
use crate::queue::{OfflineQueue, payload_len};
use crate::time::{deadline, deadline_in};
use crate::{DisconnectReason, Error, Event, Message, Result, State};

/// The TCP socket under a [`Stream`] (under TLS, if any), with two bounds:
/// - while connecting, a deadline: every read and write waits at most the time left and
///   fails with `TimedOut` past it, so a peer that trickles bytes cannot stretch the TLS
///   handshake or the upgrade response beyond the connect timeout (a socket timeout alone
///   bounds each call, not their sum);
/// - while the reader drains, a read quota: past it reads report `WouldBlock`, so a peer
///   that never completes a message (endless empty fragments) cannot keep the reader
///   inside one `read()` under the lock.
pub(crate) struct Tcp {
    pub sock: TcpStream,
    deadline: Option<Instant>,
    read_quota: Option<usize>,
    /// When the OS last accepted outgoing bytes: a write stall is judged from here.
    last_write: Instant,
}

impl Tcp {
    /// A socket whose reads and writes end at `deadline` (see [`Tcp::connected`]).
    pub(crate) fn connecting(sock: TcpStream, deadline: Instant) -> Tcp {
        Tcp {
            sock,
            deadline: Some(deadline),
            read_quota: None,
            last_write: Instant::now(),
        }
    }

    /// The connection is established: no deadline any more.
    pub(crate) fn connected(&mut self) {
        self.deadline = None;
    }

    /// Time left before the connect deadline, as the socket timeout of the next call.
    fn left(&self, read: bool) -> io::Result<()> {
        if let Some(end) = self.deadline {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect timeout reached",
                ));
            }
            if read {
                self.sock.set_read_timeout(Some(left))?;
            } else {
                self.sock.set_write_timeout(Some(left))?;
            }
        }
        Ok(())
    }
}

impl Read for Tcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.left(true)?;
        let buf = match self.read_quota {
            Some(0) => return Err(io::ErrorKind::WouldBlock.into()),
            Some(q) => {
                let n = buf.len().min(q);
                &mut buf[..n]
            }
            None => buf,
        };
        let n = (&self.sock).read(buf)?;
        if let Some(q) = self.read_quota.as_mut() {
            *q -= n;
        }
        Ok(n)
    }
}

impl Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.left(false)?;
        let n = (&self.sock).write(buf)?;
        if n > 0 {
            self.last_write = Instant::now();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&self.sock).flush()
    }
}

/// A plain or TLS byte stream under the WebSocket.
pub(crate) enum Stream {
    Plain(Tcp),
    Tls(Box<native_tls::TlsStream<Tcp>>),
}

impl Stream {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => &s.sock,
            Stream::Tls(s) => &s.get_ref().sock,
        }
    }

    /// When the OS last accepted outgoing bytes of this connection.
    pub(crate) fn last_write(&self) -> Instant {
        match self {
            Stream::Plain(s) => s.last_write,
            Stream::Tls(s) => s.get_ref().last_write,
        }
    }

    fn inner_mut(&mut self) -> &mut Tcp {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_mut(),
        }
    }

    /// The connection is established: lift the connect deadline.
    pub(crate) fn connected(&mut self) {
        self.inner_mut().connected();
    }

    /// Caps the bytes read from the socket from now on (`None`: no cap).
    pub(crate) fn set_read_quota(&mut self, bytes: Option<usize>) {
        self.inner_mut().read_quota = bytes;
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

pub(crate) type Ws = WebSocket<Stream>;

pub(crate) const POLLIN: i16 = libc::POLLIN;
pub(crate) const POLLOUT: i16 = libc::POLLOUT;

/// `poll(2)` on up to two descriptors; `None` waits forever. Returns the revents.
pub(crate) fn poll2(
    a: (i32, i16),
    b: Option<(i32, i16)>,
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
    let ms = match timeout {
        None => -1,
        // Round up so a sub-millisecond remainder does not spin with a 0 timeout.
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
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

/// Waits until `sock` is writable (or in error/hang-up), up to `timeout`.
pub(crate) fn wait_writable(sock: &TcpStream, timeout: Duration) -> bool {
    matches!(poll2((sock.as_raw_fd(), POLLOUT), None, Some(timeout)), Ok((r, _)) if r != 0)
}

/// Waits until `sock` is readable (or in error/hang-up), up to `timeout`.
pub(crate) fn wait_readable(sock: &TcpStream, timeout: Duration) -> bool {
    matches!(poll2((sock.as_raw_fd(), POLLIN), None, Some(timeout)), Ok((r, _)) if r != 0)
}

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
        other => DisconnectReason::Protocol(other.to_string()),
    }
}

/// Wakes a reader thread out of `poll` (a socket pair; the reader polls the read end).
pub(crate) struct Waker {
    tx: UnixStream,
    pub(crate) rx: UnixStream,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Waker { tx, rx })
    }
    pub(crate) fn wake(&self) {
        let _ = (&self.tx).write(&[1]);
    }
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// One open connection, owned by the link while published.
pub(crate) struct Live {
    pub ws: Ws,
    /// A `dup` of the socket: poll and shutdown without the lock.
    pub sock: Arc<TcpStream>,
    pub waker: Arc<Waker>,
    pub generation: u64,
    /// Messages written into tungstenite's buffer whose flush has not completed yet.
    /// Cleared on every successful flush; put back in the offline queue if the link dies.
    pub in_flight: VecDeque<Message>,
    /// Set once when the connection is declared dead (first reporter wins).
    pub dead: Option<DisconnectReason>,
    /// Output is pending and the OS has accepted none of it since this instant
    /// (moves forward while a slow peer still reads: only a peer that stopped reading
    /// stalls). `None` when everything was flushed.
    pub pending_since: Option<Instant>,
    pub hb: HbState,
    /// The close frame was queued by us (client-initiated close).
    pub close_sent: bool,
    /// The reader thread, unparked when the last waiting sender got the lock.
    pub reader: Option<std::thread::Thread>,
}

/// What [`Live::write_tracked`] did with a message.
pub(crate) enum Written {
    /// In tungstenite's buffer (and in `in_flight` until a flush completes).
    Buffered,
    /// The write buffer is full: not buffered, handed back.
    Full(Message),
}

impl Live {
    /// Whether data may still be written on this connection: not dead, and no close frame
    /// queued (tungstenite refuses data after it: `SendAfterClosing`).
    pub(crate) fn takes_data(&self) -> bool {
        self.dead.is_none() && !self.close_sent
    }

    /// Writes `m` into tungstenite's buffer without blocking and tracks it in `in_flight`
    /// (a `WouldBlock` here still means buffered: tungstenite kept the frame).
    pub(crate) fn write_tracked(
        &mut self,
        m: Message,
    ) -> std::result::Result<Written, tungstenite::Error> {
        self.in_flight.push_back(m.clone());
        match self.ws.write(m) {
            Ok(()) => Ok(Written::Buffered),
            Err(e) if is_would_block(&e) => Ok(Written::Buffered),
            Err(tungstenite::Error::WriteBufferFull(_)) => Ok(Written::Full(
                self.in_flight.pop_back().expect("pushed above"),
            )),
            Err(e) => Err(e),
        }
    }

    /// Output is left pending: start the stall clock, or move it to the last progress.
    pub(crate) fn note_pending(&mut self) {
        let progress = self.ws.get_ref().last_write();
        self.pending_since = Some(match self.pending_since {
            None => Instant::now(),
            Some(t) => t.max(progress),
        });
    }

    /// Flushes without blocking. `Ok(true)` when everything reached the OS.
    pub(crate) fn try_flush(&mut self) -> std::result::Result<bool, tungstenite::Error> {
        match self.ws.flush() {
            Ok(()) => {
                self.in_flight.clear();
                self.pending_since = None;
                Ok(true)
            }
            Err(e) if is_would_block(&e) => {
                self.note_pending();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Everything the lock guards.
pub(crate) struct Link {
    pub state: State,
    /// Generation of the newest connection (0 before the first).
    pub generation: u64,
    pub conn: Option<Live>,
    pub queue: OfflineQueue,
    /// The supervisor is writing the offline queue into a fresh connection; sends
    /// append to the queue so order is kept.
    pub flushing_queue: bool,
}

impl Link {
    /// Whether a send goes straight to the open connection (rather than to the queue).
    pub(crate) fn takes_direct(&self) -> bool {
        !self.flushing_queue && self.conn.as_ref().is_some_and(Live::takes_data)
    }
}

/// Counters for [`Stats`](crate::Stats).
#[derive(Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub reconnects: AtomicU64,
}

/// Commands to the supervisor (reconnect) thread. The channel is unbounded.
#[derive(Debug)]
pub(crate) enum Command {
    /// Connection `generation` is dead (reason stored in its `Live`).
    Dead(u64),
    ReconnectNow,
    Close,
}

/// Commands to the timer thread. The channel is unbounded.
#[derive(Debug)]
pub(crate) enum TimerCmd {
    /// Re-evaluate deadlines now (new connection, output pending).
    Wake,
    Stop,
}

/// State shared by the handles and the internal threads of one client.
pub(crate) struct Shared {
    pub link: Mutex<Link>,
    /// Signalled on state changes and when the offline queue makes room.
    pub changed: Condvar,
    pub cfg: Config,
    pub events: EventSink,
    pub ctl: Sender<Command>,
    pub timer: Sender<TimerCmd>,
    /// One `reconnect_now` in flight at a time: concurrent calls collapse into one.
    pub reconnect_requested: AtomicBool,
    /// `close()` was called.
    pub closing: AtomicBool,
    /// The client was closed from the supervisor thread itself (nobody joins it).
    pub orphaned: AtomicBool,
    /// Aborts a connect attempt in progress (DNS, dial, proxy, TLS, upgrade, hook) from
    /// `close()`; once cancelled, every later attempt ends at once too.
    pub connecting: Cancel,
    pub counters: Counters,
    /// Senders waiting for `link` in [`Shared::lock_for_send`]. While it is not zero the
    /// reader stops draining, lets go and waits until they had the lock.
    pub writers: AtomicUsize,
    /// Where waiting senders sleep. A leaf lock: nobody blocks on `link` while holding it.
    pub gate: Mutex<()>,
    pub gate_cv: Condvar,
}

/// How a send waits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendMode {
    /// Wait (without the lock) for the socket up to the write timeout, or for queue room.
    Blocking,
    /// Never wait for the network or for queue room.
    Try,
}

impl Shared {
    /// Emits an event, in the grammar (see [`EventSink`]). Never blocks: fine under the lock.
    pub(crate) fn emit(&self, ev: Event) {
        self.events.emit(ev);
    }

    /// Emits the final `Event::Closed` (once: the sink drops any later one).
    pub(crate) fn emit_closed(&self) {
        self.emit(Event::Closed);
    }

    pub(crate) fn set_state(&self, link: &mut Link, state: State) {
        if link.state != state {
            log::debug!("state {:?} -> {:?}", link.state, state);
            link.state = state;
            self.changed.notify_all();
        }
    }

    /// Declares connection `cgen` dead (first reporter wins; stale generations ignored).
    pub(crate) fn mark_dead(&self, link: &mut Link, cgen: u64, reason: DisconnectReason) {
        if let Some(live) = link.conn.as_mut()
            && live.generation == cgen
            && live.dead.is_none()
        {
            log::debug!("connection {cgen} dead: {reason}");
            live.dead = Some(reason);
            let _ = self.ctl.send(Command::Dead(cgen));
        }
    }

    pub(crate) fn report_dead(&self, cgen: u64, reason: DisconnectReason) {
        let mut link = self.link.lock();
        self.mark_dead(&mut link, cgen, reason);
    }

    /// The send path shared by `send` and `try_send`.
    pub(crate) fn send(&self, msg: Message, mode: SendMode) -> Result<()> {
        let limit = self.cfg.limits.max_message_size;
        let size = payload_len(&msg);
        if size > limit {
            return Err(Error::MessageTooLarge {
                size,
                limit,
                message: msg,
            });
        }
        self.dispatch(self.lock_for_send(), msg, mode)
    }

    /// Takes `link` for a send. Not with `lock()`: a contended parking_lot lock spins and
    /// then calls `sched_yield` up to 7 times before it parks, and on a busy machine each
    /// yield can cost the sender a whole scheduler slice, while `unlock_fair` only hands
    /// the lock to *parked* threads, so the reader (always runnable under inbound load)
    /// takes it straight back. A waiting sender is counted in `writers` and sleeps on
    /// `gate_cv`; the reader wakes it when it lets go.
    fn lock_for_send(&self) -> MutexGuard<'_, Link> {
        if let Some(g) = self.link.try_lock() {
            return g;
        }
        self.writers.fetch_add(1, Ordering::SeqCst);
        let link = loop {
            let mut gate = self.gate.lock();
            if let Some(g) = self.link.try_lock() {
                break g;
            }
            // Other holders (timer, supervisor, stats) do not notify: hence the bound.
            self.gate_cv.wait_for(&mut gate, Duration::from_micros(200));
        };
        if self.writers.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(r) = link.conn.as_ref().and_then(|l| l.reader.as_ref())
        {
            r.unpark();
        }
        link
    }

    /// Called by the reader right after it let go of `link`: wakes waiting senders.
    pub(crate) fn wake_senders(&self) {
        if self.writers.load(Ordering::SeqCst) > 0 {
            drop(self.gate.lock());
            self.gate_cv.notify_all();
        }
    }

    /// Called by the reader before it takes `link` again: waits (bounded) until the
    /// waiting senders had the lock, so it does not take it straight back.
    pub(crate) fn wait_for_senders(&self) {
        if self.writers.load(Ordering::SeqCst) == 0 {
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(5);
        while self.writers.load(Ordering::SeqCst) > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    /// Sends on the open connection, or queues while there is none.
    fn dispatch(&self, link: MutexGuard<'_, Link>, msg: Message, mode: SendMode) -> Result<()> {
        if matches!(link.state, State::Closed | State::Closing) {
            return Err(Error::Closed { message: Some(msg) });
        }
        if link.takes_direct() {
            self.write_direct(link, msg, mode)
        } else {
            self.enqueue(link, msg, mode)
        }
    }

    fn enqueue(&self, mut link: MutexGuard<'_, Link>, msg: Message, mode: SendMode) -> Result<()> {
        if !link.queue.could_fit(&msg) {
            return Err(Error::QueueFull { message: msg });
        }
        if link.queue.has_room(&msg) {
            link.queue.push_back(msg);
            return Ok(());
        }
        match (self.cfg.overflow, mode) {
            (OverflowPolicy::Reject, _) | (OverflowPolicy::Block(_), SendMode::Try) => {
                Err(Error::QueueFull { message: msg })
            }
            (OverflowPolicy::DropOldest, _) => {
                let mut dropped = Vec::new();
                while !link.queue.has_room(&msg) {
                    match link.queue.pop_front() {
                        Some(m) => dropped.push(m),
                        None => break,
                    }
                }
                link.queue.push_back(msg);
                drop(link);
                log::warn!(
                    "offline queue full: dropped {} oldest messages",
                    dropped.len()
                );
                self.emit(Event::Undelivered(dropped));
                Ok(())
            }
            (OverflowPolicy::Block(limit), SendMode::Blocking) => {
                let deadline = deadline_in(limit);
                loop {
                    if link.takes_direct() || matches!(link.state, State::Closed | State::Closing) {
                        return self.dispatch(link, msg, SendMode::Blocking);
                    }
                    if link.queue.has_room(&msg) {
                        link.queue.push_back(msg);
                        return Ok(());
                    }
                    if self.changed.wait_until(&mut link, deadline).timed_out() {
                        return Err(Error::QueueFull { message: msg });
                    }
                }
            }
        }
    }

    /// Writes on the open connection. Returns `Ok` once the message reached the OS, or
    /// once the connection died with it in flight (it is then requeued by the supervisor).
    fn write_direct(
        &self,
        mut link: MutexGuard<'_, Link>,
        msg: Message,
        mode: SendMode,
    ) -> Result<()> {
        let write_timeout = self.cfg.write_timeout;
        let Some(live) = link.conn.as_mut() else {
            unreachable!("write_direct without a connection")
        };
        let cgen = live.generation;
        let mut unsent = Some(msg);
        loop {
            let live = match link.conn.as_mut() {
                Some(l) if l.generation == cgen && l.takes_data() => l,
                // The connection died (or its close frame was queued) while we waited: a
                // message still unsent goes to the queue or back to the caller (never after
                // a close frame); one in flight was requeued.
                _ => {
                    return match unsent {
                        Some(m) => self.dispatch(link, m, mode),
                        None => Ok(()),
                    };
                }
            };
            if let Some(m) = unsent.take() {
                match live.write_tracked(m) {
                    Ok(Written::Buffered) => {}
                    // Not buffered: keep it and wait for room.
                    Ok(Written::Full(m)) => unsent = Some(m),
                    Err(e) => {
                        let reason = reason_of(&e);
                        self.mark_dead(&mut link, cgen, reason);
                        return Ok(());
                    }
                }
            }
            let live = link.conn.as_mut().expect("checked above");
            let was_pending = live.pending_since.is_some();
            match live.try_flush() {
                Ok(true) if unsent.is_none() => {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    let reason = reason_of(&e);
                    self.mark_dead(&mut link, cgen, reason);
                    return Ok(());
                }
            }
            // Output is pending.
            if mode == SendMode::Try {
                return match unsent {
                    Some(m) => Err(Error::WouldBlock { message: m }),
                    None => {
                        // Buffered: the reader flushes it when the socket drains, and
                        // the timer judges a stall. Tell them once per pending episode.
                        if !was_pending {
                            live.waker.wake();
                            let _ = self.timer.send(TimerCmd::Wake);
                        }
                        self.counters.sent.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                };
            }
            let Some(since) = live.pending_since else {
                // Flushed: there is room for the message that did not fit. Retry.
                continue;
            };
            let deadline = deadline(since, write_timeout);
            let now = Instant::now();
            if now >= deadline {
                log::warn!("connection {cgen}: write stalled for {write_timeout:?}");
                if let Some(m) = unsent.take() {
                    link.queue.push_front(m);
                }
                self.mark_dead(&mut link, cgen, DisconnectReason::WriteStalled);
                return Ok(());
            }
            let sock = live.sock.clone();
            MutexGuard::unlocked_fair(&mut link, || {
                wait_writable(&sock, deadline - now);
            });
        }
    }

    /// Shuts the socket of `live` down so its reader wakes; used by teardown.
    pub(crate) fn shutdown_socket(sock: &TcpStream) {
        let _ = sock.shutdown(Shutdown::Both);
    }
}
