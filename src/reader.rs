//! The read path: the reader thread of one connection, and the same read made by a
//! consumer waiting in `Events::recv` (`Driver`).
//!
//! The reader waits for the socket with `poll(2)` without holding the lock, then takes
//! the lock and drains in nonblocking mode (`drain`): `read()` until `WouldBlock`
//! (tungstenite and OpenSSL buffer whole frames, so one read per wake-up would lose
//! messages), at most `read_budget` messages and `READ_QUOTA` bytes per lock hold, then
//! `unlock_fair` so writers get in. The messages of one drain go to the user as one batch
//! (one channel send and at most one wake-up per drain, not per message), sent just
//! before the lock is released, so a consumer that reads for itself never overtakes it.
//!
//! A consumer waiting in `recv` with nothing buffered reads the socket itself through
//! the same `drain` (lock taken with `try_lock`, only when the channel is empty); the
//! reader then leaves ready input to it, looking again after a deferral that doubles from
//! `DEFER` to `MAX_DEFER`, and reads itself once that consumer stopped reading (see
//! "Consumers that read" in `inbound.rs`).
//!
//! While the event channel is full (`event_capacity`) the reader does not read: it waits
//! in `poll` for the consumer to make room (the consumer writes to this connection's
//! waker), for a hang-up of the socket, or for a flush request, holding no lock. TCP
//! then pushes back on the server. The heartbeat knows (`Inbound::held_back`): unread
//! input counts as traffic, so a slow consumer never gets a live peer declared dead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::MutexGuard;
use tungstenite::Bytes;
use tungstenite::protocol::frame::Utf8Bytes;

use crate::inbound::{Batch, Drive};
use crate::link::{Link, Shared, TimerCmd, current_mut};
use crate::time::deadline;
use crate::transport::stream::{READ_QUOTA, is_would_block, reason_of};
use crate::transport::sys::{
    POLLHUP_ERR, POLLIN, POLLOUT, POLLRDHUP, Waker, peer_shut_down, poll2, raw,
};
use crate::{DisconnectReason, Message};

/// Payloads at least this large are copied out of tungstenite's read buffer into recycled
/// buffers (see [`Recycler`]).
const COPY_MIN: usize = 8 << 10;
/// Most bytes of emptied payload buffers kept for reuse, and the largest buffer kept.
const RECYCLE_BYTES: usize = 4 << 20;
const RECYCLE_MAX_BUF: usize = 1 << 20;
/// Most recycled buffers one copy looks at (it runs under the link lock).
const RECYCLE_SKIP: usize = 8;
/// A pool that took no buffer for this long is idle: it frees what it holds, and the
/// buffers the user gives back from then on are freed too, until the next large message.
/// The pool serves floods of large messages; a connection that has none should hold no
/// more than its read buffer (scale probe: 1-5 MiB per idle client after a burst).
const RECYCLE_IDLE: Duration = Duration::from_secs(1);

/// Payload buffers that come back to the reader when the user drops a message.
///
/// tungstenite hands out payloads that share its read buffer. While the user holds them
/// (they wait in the event channel), the next large frame cannot reuse that buffer, so
/// tungstenite allocates a fresh one per frame; the user's thread frees it, and glibc
/// then trims the reader's arena, so the next allocation page-faults its memory in again
/// (issue 11: 20-108 k page faults per 20 k 64 KiB messages, against ~280 for raw
/// tungstenite, which drops each payload before it reads the next). Copying a large
/// payload into a recycled buffer costs one `memcpy` and lets tungstenite reuse its own
/// buffer in place; the copy's buffer returns here when the user drops the message.
struct Recycler {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    /// Capacity of the buffers waiting in `rx`.
    kept: AtomicUsize,
    /// Buffers handed out in messages and not given back yet.
    out: AtomicUsize,
    /// Copies made so far (the reader's measure of use).
    taken: AtomicUsize,
    /// Unused for `RECYCLE_IDLE`: buffers given back are freed, not pooled.
    idle: AtomicBool,
}

/// A payload buffer on its way back to its [`Recycler`] (the owner of a `Bytes`). Only
/// the reader owns the pool: a message the user keeps after its connection ended holds
/// its own buffer, not the pool (it held every pooled buffer, ~1.3 MiB per kept 16 KiB
/// message, in the scale probe).
struct Recycled {
    buf: Vec<u8>,
    home: Weak<Recycler>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        // The connection ended (its reader dropped the pool): the buffer is freed.
        let Some(home) = self.home.upgrade() else {
            return;
        };
        home.out.fetch_sub(1, Ordering::Relaxed);
        let cap = self.buf.capacity();
        if cap > RECYCLE_MAX_BUF || home.idle.load(Ordering::Relaxed) {
            return;
        }
        if home.kept.fetch_add(cap, Ordering::Relaxed) < RECYCLE_BYTES
            && home.tx.try_send(std::mem::take(&mut self.buf)).is_ok()
        {
            // Pairs with the fence in `Recycler::go_idle`: either the reader's trim there
            // sees this buffer, or this sees the pool idle and frees it.
            fence(Ordering::SeqCst);
            if home.idle.load(Ordering::Relaxed) {
                home.trim();
            }
            return;
        }
        home.kept.fetch_sub(cap, Ordering::Relaxed);
    }
}

impl Recycler {
    fn new() -> Arc<Recycler> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Recycler {
            tx,
            rx,
            kept: AtomicUsize::new(0),
            out: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            idle: AtomicBool::new(false),
        })
    }

    /// Whether the pool holds buffers or waits for some: then the reader watches its use.
    fn in_use(&self) -> bool {
        !self.idle.load(Ordering::Relaxed) && (self.holds() || self.out.load(Ordering::Relaxed) > 0)
    }

    /// Copies made so far.
    fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    /// Unused for `RECYCLE_IDLE`: frees what the pool holds, and what comes back from
    /// now on, until the next copy.
    fn go_idle(&self) {
        self.idle.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.trim();
    }

    /// A copy of `data` in a recycled buffer when one fits: at least as large, and at
    /// most twice as large, so that a small message the user keeps does not pin a large
    /// buffer (an 8 KiB message in a 1 MiB one). Smaller buffers are freed, larger ones
    /// kept for larger messages while the pool is less than half full (else freed too),
    /// and at most `RECYCLE_SKIP` are looked at.
    fn copy(self: &Arc<Self>, data: &[u8]) -> Bytes {
        if self.idle.load(Ordering::Relaxed) {
            self.idle.store(false, Ordering::Relaxed);
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        self.out.fetch_add(1, Ordering::Relaxed);
        let mut buf = Vec::new();
        for _ in 0..self.rx.len().min(RECYCLE_SKIP) {
            let Ok(b) = self.rx.try_recv() else {
                break;
            };
            let cap = b.capacity();
            let too_large = cap > data.len().saturating_mul(2);
            if too_large && self.kept.load(Ordering::Relaxed) < RECYCLE_BYTES / 2 {
                // Kept for a larger message while the pool has room to spare; else freed
                // below, so that buffers of this size can come back instead.
                let _ = self.tx.try_send(b);
                continue;
            }
            self.kept.fetch_sub(cap, Ordering::Relaxed);
            if !too_large && cap >= data.len() {
                buf = b;
                break;
            }
        }
        buf.clear();
        buf.extend_from_slice(data);
        Bytes::from_owner(Recycled {
            buf,
            home: Arc::downgrade(self),
        })
    }

    /// Whether buffers wait in the pool.
    fn holds(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Frees every pooled buffer.
    fn trim(&self) {
        while let Ok(b) = self.rx.try_recv() {
            self.kept.fetch_sub(b.capacity(), Ordering::Relaxed);
        }
    }
}

/// Detaches the reader from the inbound hand-off however it ends.
struct Attached<'a>(&'a crate::inbound::Inbound);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// What a drain does with the socket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Held back by a full event channel: only flush.
    Nothing,
    /// Read, keeping the messages for the consumer.
    Keep,
    /// Read on to the connection's end (the peer hung up, or our close frame is out)
    /// with twice the bound waiting: the data messages read are dropped.
    Drop,
}

/// What one drain of the socket did.
struct Drained {
    /// Messages for the user (text, binary, surfaced pings and pongs), and their payload
    /// bytes.
    msgs: usize,
    bytes: usize,
    /// The budget ended the drain: input may be left.
    more: bool,
    /// Output is left to flush.
    want_write: bool,
    /// The connection died (marked dead): stop.
    stop: bool,
    /// Data messages dropped (`Take::Drop`).
    dropped: usize,
}

/// Reads the ready messages of connection `cgen` under the lock (at most `read_budget`,
/// at most `READ_QUOTA` bytes, never waiting) into `out`, feeds the heartbeat and the
/// outbox, and flushes pending output (pongs, close replies, output left by `try_send`).
/// `take` says whether to read, and what to do with the data messages read. `None`: the
/// connection is gone or already dead.
/// Shared by the reader thread (with its `recycler`) and a consumer that reads for
/// itself ([`Driver`], no recycler). The consumer stops after the messages that leave
/// tungstenite's buffer empty (`Live::buffered`), before it reads the socket again:
/// that read would most often find nothing (a request/response exchange), and the
/// message waits for it (wss 16 KiB echo: one `recv` and the TLS layer's error path,
/// 2-5% of a round trip). A flood still drains in long runs: a read seldom ends exactly
/// at a frame's end.
fn drain(
    shared: &Shared,
    link: &mut Link,
    cgen: u64,
    take: Take,
    out: &mut VecDeque<Message>,
    recycler: Option<&Arc<Recycler>>,
) -> Option<Drained> {
    let budget = shared.cfg.read_budget;
    let consumer = recycler.is_none();
    let surface_pings = shared.cfg.surface_pings;
    let hb = &shared.cfg.heartbeat;
    let live = current_mut(&mut link.conn, cgen).filter(|l| l.dead.is_none())?;
    live.drains = live.drains.wrapping_add(1);
    let mut outbox = link.outbox.as_mut();
    let acked_before = outbox.as_ref().map(|o| o.acked);
    let mut dead = None;
    let mut n = 0;
    let (mut msgs, mut bytes) = (0, 0);
    let mut more = false;
    let now = Instant::now();
    // tungstenite's `read()` loops over frames until a whole message is in: a peer
    // that never completes one (endless empty fragments) would keep us here for
    // good. Past the quota the socket reports WouldBlock, so the lock is let go.
    live.ws.get_mut().set_read_quota(Some(READ_QUOTA));
    let read_before = live.ws.get_ref().bytes_read();
    // Bytes of the control frames read (server frames: a 2-byte header, unmasked).
    let mut control_bytes = 0;
    // Bytes of all frames read, with the shortest headers (see `Live::buffered`).
    let mut frames = 0u64;
    // Data messages that neither a reply matcher nor the outbox looks at take the short
    // way (most of them): one heartbeat mark per drain instead of one per message.
    let plain = !hb.matches_replies() && outbox.is_none() && take == Take::Keep;
    let mut payloads = Payloads {
        recycler,
        buffer: shared.cfg.read_buffer_size,
        grown_to: live.grown_to,
    };
    let mut data = false;
    let mut dropped = 0;
    loop {
        if take == Take::Nothing {
            break;
        }
        if consumer
            && msgs > 0
            && live.buffered + (live.ws.get_ref().bytes_read() - read_before) as i64
                == frames as i64
        {
            // Tungstenite's buffer is empty, if the count is exact (`Live::exact`; else
            // it only looks so). "More" if the TLS layer holds input (rustls reads
            // ahead), or the count is not exact: the next wait reads before it polls.
            // Else the next wait goes straight to `poll` (a request/response exchange
            // reads no empty socket).
            more = !live.exact || live.ws.get_ref().holds_input();
            // Handed over now: a nearly full read buffer is of no concern any more.
            live.ws.get_mut().take_nearly_full();
            break;
        }
        // After at least one message: let a waiting sender in, or hand over what points
        // into tungstenite's nearly full read buffer before it needs room (see
        // `Stream::take_nearly_full`).
        if n >= budget
            || (n > 0 && (shared.gate.has_waiting() || live.ws.get_mut().take_nearly_full()))
        {
            more = true;
            break;
        }
        match live.ws.read() {
            // The payload taken out and put back in a new `Message`: moving the whole
            // `Message` cost store-forwarding stalls (issue 11: 16% of the client's CPU
            // in this loop, 6% after).
            Ok(Message::Binary(b)) if plain => {
                (n, msgs, bytes, data) = (n + 1, msgs + 1, bytes + b.len(), true);
                frames += frame_len(b.len());
                out.push_back(Message::Binary(payloads.bytes(b)));
            }
            Ok(Message::Text(t)) if plain => {
                (n, msgs, bytes, data) = (n + 1, msgs + 1, bytes + t.len(), true);
                frames += frame_len(t.len());
                out.push_back(Message::Text(payloads.text(t)));
            }
            Ok(msg) => {
                n += 1;
                frames += frame_len(msg.len());
                match &msg {
                    Message::Ping(p) => {
                        control_bytes += 2 + p.len() as u64;
                        // tungstenite queued its pong (a masked frame: 6 bytes more).
                        live.hand_over(6 + p.len() as u64);
                    }
                    Message::Pong(p) => control_bytes += 2 + p.len() as u64,
                    Message::Text(_) | Message::Binary(_) => data = true,
                    _ => {}
                }
                let consumed = live.hb.on_inbound(hb, &msg, now)
                    || outbox.as_mut().is_some_and(|o| o.on_inbound(&msg));
                match msg {
                    Message::Binary(_) | Message::Text(_) if take == Take::Drop && !consumed => {
                        data = true;
                        dropped += 1;
                    }
                    // Surfaced pings and pongs count as messages: dropped alike (the
                    // pong a ping asks for is already queued by tungstenite).
                    Message::Ping(_) | Message::Pong(_)
                        if surface_pings && take == Take::Drop && !consumed =>
                    {
                        dropped += 1;
                    }
                    Message::Binary(b) if !consumed => {
                        (msgs, bytes) = (msgs + 1, bytes + b.len());
                        out.push_back(Message::Binary(payloads.bytes(b)));
                    }
                    Message::Text(t) if !consumed => {
                        (msgs, bytes) = (msgs + 1, bytes + t.len());
                        out.push_back(Message::Text(payloads.text(t)));
                    }
                    Message::Ping(ref p) | Message::Pong(ref p) if surface_pings && !consumed => {
                        // Handed to the user like data: within the same bound.
                        (msgs, bytes) = (msgs + 1, bytes + p.len());
                        out.push_back(payloads.message(msg));
                    }
                    Message::Close(frame) if !live.close_sent => {
                        dead = Some(DisconnectReason::closed_by_peer(frame));
                        // Let the queued close reply go out below, then stop.
                        break;
                    }
                    _ => {}
                }
            }
            Err(e) if is_would_block(&e) => break,
            Err(tungstenite::Error::ConnectionClosed) if live.close_sent => {
                dead = Some(DisconnectReason::ClosedByUser);
                break;
            }
            Err(e) => {
                dead = Some(reason_of(&e));
                break;
            }
        }
    }
    live.ws.get_mut().set_read_quota(None);
    live.grown_to = payloads.grown_to;
    // Bytes read that the pings and pongs read do not account for: part of a data
    // message still arriving (liveness even while a reply is stuck behind a large frame),
    // whoever read them, the reader or a consumer. Carried over drains: one that stops
    // early leaves frames in tungstenite's buffer that the next one reads without new
    // bytes; only a drain that read on to the socket's end knows the rest is no ping. A
    // whole data message accounts for everything before it.
    let read = live.ws.get_ref().bytes_read() - read_before;
    live.buffered += read as i64 - frames as i64;
    live.unaccounted = if data {
        0
    } else {
        (live.unaccounted + read).saturating_sub(control_bytes)
    };
    if data || (!more && live.unaccounted > 0) {
        live.hb.on_data(now);
    }
    let mut want_write = false;
    match live.try_flush() {
        Ok(done) => want_write = !done,
        Err(e) => {
            if dead.is_none() {
                dead = Some(reason_of(&e));
            }
        }
    }
    if let Some(o) = outbox
        && Some(o.acked) != acked_before
    {
        // Messages acked while they waited in the offline queue (a server resuming a
        // session acks what the last connection delivered) leave it now: delivered,
        // they must not hold its room, count in `queued`, or be dropped (`DropOldest`)
        // as undelivered.
        if o.take_queued_acked() {
            link.queue.retain(|t| !o.acked_already(*t));
        }
        // Acks made room for senders waiting under `OverflowPolicy::Block`.
        shared.changed.notify_all();
    }
    let stop = dead.is_some();
    if let Some(reason) = dead {
        shared.mark_dead(link, cgen, reason);
    }
    Some(Drained {
        msgs,
        bytes,
        more,
        want_write,
        stop,
        dropped,
    })
}

/// The fewest bytes a server message of `payload` bytes takes on the wire (RFC 6455 5.2;
/// server frames are not masked): one frame with the shortest header, except over 64 KiB,
/// where two fragments (4 + 2 header bytes) are shorter than one frame (10). Never more
/// than the truth, so the count of tungstenite's buffer (`Live::buffered`) only errs
/// high (review of 6ad06f5: with 10, a message sent as 32 KiB + 32 KiB left the count 2
/// below the truth for good, and a later empty message waited above the socket while
/// the consumer polled). An unfragmented message over 64 KiB leaves it 4 high: no
/// early stop on that connection any more.
#[inline]
fn frame_len(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 6,
    };
    (header + payload) as u64
}

/// How a drain takes payloads out of tungstenite's read buffer. A payload there is a
/// slice of that buffer, and keeps all of it while the user keeps the message.
/// - A large one read by the reader thread moves into a recycled buffer (see
///   [`Recycler`]).
/// - Once a message larger than `read_buffer_size` arrived, the buffer may have grown to
///   its size (its frames did, unless it came in fragments no larger than the buffer,
///   which the reader cannot see), and may stay that large: payloads much smaller than
///   that are copied out from then on, so that a small message kept does not keep the
///   grown buffer (review of d696f9d: 32 kept texts of 10 bytes, each read after a 1 MiB
///   message, held 36 MiB after their connection ended). Connections that never get
///   such a message copy nothing; after one made of small fragments the copies are
///   needless (review of 20cb2ad), the price of never keeping a grown buffer.
struct Payloads<'a> {
    recycler: Option<&'a Arc<Recycler>>,
    /// `read_buffer_size`.
    buffer: usize,
    /// The largest payload past `buffer` read on this connection (`Live::grown_to`).
    grown_to: usize,
}

impl Payloads<'_> {
    /// Whether a payload of `len` bytes stays as it is without a look further: the usual
    /// case, kept small and inline so that the per-message path moves nothing more
    /// (the 64 B flood: one compare more than before these copies).
    #[inline(always)]
    fn keeps(&self, len: usize) -> bool {
        self.grown_to == 0 && len < COPY_MIN && len <= self.buffer
    }

    /// A copy of payload `b` to hand out instead of it, if it is not to stay in the read
    /// buffer.
    fn copy_of(&mut self, b: &Bytes) -> Option<Bytes> {
        let len = b.len();
        // Also a fragmented message, put together apart: its frames may have been
        // larger than the buffer too (review of 66a18a6: 4 frames of 256 KiB grew it,
        // and kept small messages held 12 MiB), and only the frames' sizes tell.
        if len > self.buffer {
            self.grown_to = self.grown_to.max(len);
        }
        match self.recycler {
            Some(r) if len >= COPY_MIN => Some(r.copy(b)),
            // It would keep a buffer at least 4 times its size.
            _ if self.grown_to > 0 && len.saturating_mul(4) < self.grown_to => {
                Some(Bytes::copy_from_slice(b))
            }
            _ => None,
        }
    }

    #[inline(always)]
    fn bytes(&mut self, b: Bytes) -> Bytes {
        if self.keeps(b.len()) {
            return b;
        }
        self.bytes_slow(b)
    }

    #[inline(never)]
    fn bytes_slow(&mut self, b: Bytes) -> Bytes {
        self.copy_of(&b).unwrap_or(b)
    }

    #[inline(always)]
    fn text(&mut self, t: Utf8Bytes) -> Utf8Bytes {
        if self.keeps(t.len()) {
            return t;
        }
        self.text_slow(t)
    }

    #[inline(never)]
    fn text_slow(&mut self, t: Utf8Bytes) -> Utf8Bytes {
        match self.copy_of(AsRef::<Bytes>::as_ref(&t)) {
            // SAFETY: `bytes` is a copy of `t`, which is valid UTF-8.
            Some(bytes) => unsafe { Utf8Bytes::from_bytes_unchecked(bytes) },
            None => t,
        }
    }

    /// A surfaced ping or pong (or any other message) with its payload taken out alike.
    fn message(&mut self, m: Message) -> Message {
        match m {
            Message::Ping(p) => Message::Ping(self.bytes(p)),
            Message::Pong(p) => Message::Pong(self.bytes(p)),
            Message::Binary(b) => Message::Binary(self.bytes(b)),
            Message::Text(t) => Message::Text(self.text(t)),
            other => other,
        }
    }
}

/// How long the reader leaves ready input to a consumer that reads for itself before it
/// looks again whether that consumer still does (and reads itself if not): `DEFER` at
/// first, doubled each time the consumer still read, up to `MAX_DEFER` (and a quarter of
/// the heartbeat timeout). Each look wakes the reader thread, which on two cores delays
/// the consumer or the server now and then (echo round trips: p99 1.26x of raw with a
/// fixed 5 ms, 0.96x with 50 ms); a consumer that turns to other work still gets its
/// socket read within two deferrals (the look that follows its last read still sees
/// that read, and defers once more), and one that parks wakes the reader at once. Two
/// deferrals are at most half the heartbeat timeout: before the consumer stopped, its
/// reads fed the heartbeat, so the reader takes over well before a deadline.
const DEFER: Duration = Duration::from_millis(1);
const MAX_DEFER: Duration = Duration::from_millis(50);

/// Runs until connection `cgen` is dead or replaced.
pub(crate) fn run(shared: Arc<Shared>, cgen: u64) {
    let (sock, waker) = {
        let link = shared.link.lock();
        match link.live(cgen) {
            Some(l) => (l.sock.clone(), l.waker.clone()),
            None => return,
        }
    };
    let fd = raw(&*sock);
    let inbound = shared.events.inbound().clone();
    inbound.attach(waker.clone());
    let _attached = Attached(&inbound);
    let mut want_write = false;
    // Drain once before the first poll: frames that arrived with the upgrade response (or
    // were left by an on_connect hook) already sit in tungstenite's (or OpenSSL's) buffer,
    // and poll would never report them.
    let mut more = true;
    // A read stopped early with whole messages left above the socket (in tungstenite's
    // or the TLS layer's buffer): known, unlike `more`, which is also set to look again.
    // Held back with it, the timer takes the peer for alive (see `Inbound::hold`); a
    // guess there would keep a dead link from being judged.
    let mut left = false;
    // The messages of this drain for the user (text, binary, and pings and pongs when
    // surfaced): as `Message`s, the consumer's `Events` makes them `Event::Message`.
    // Room for a usual drain; a larger budget (up to `usize::MAX`: no message limit) grows
    // it on demand.
    let mut out: VecDeque<Message> = VecDeque::with_capacity(shared.cfg.read_budget.min(1024));
    let recycler = Recycler::new();
    // When the buffer pool was last used (a copy made), and its count of copies then.
    let mut pool_used = Instant::now();
    let mut pool_taken = 0;
    // Consumer reads of the socket seen so far (see `Inbound::consumer_reads`).
    let mut seen = inbound.drives();
    let max_defer = MAX_DEFER.min(shared.cfg.heartbeat.timeout() / 4).max(DEFER);
    let mut defer = DEFER;
    // The peer hung up while we were held back: read on to the end (see `Take::Drop`).
    let mut hung_up = false;
    let mut dropped = 0;
    // The socket's input is marked stale for this hold (see `Stream::input_stale`).
    let mut stale_marked = false;
    loop {
        if inbound.take_flush_wanted() {
            want_write = true;
        }
        // A `Connected` held back while the consumer was far behind goes out once it
        // caught up (it woke us).
        if inbound.caught_up() {
            shared.events.release_held();
        }
        // Bytes arrived on the socket (perhaps only part of a large frame).
        let mut bytes_in = false;
        // Read this time (false: held back by a full event channel).
        let mut read = true;
        // Reads again after a hold (see `Shared::stall_is_ours`).
        let mut resumed = false;
        // Our close frame is out: read on to the peer's reply, whatever the bound.
        let to_end = inbound.reading_to_end();
        if to_end {
            resumed = inbound.is_held();
            inbound.set_free();
        }
        let held = !to_end && inbound.is_full() && inbound.hold(left);
        if held && !stale_marked {
            // From now on input waits in the socket, for as long as the consumer is
            // behind: whoever reads it later (this thread, or a consumer reading for
            // itself) must not take it for a sign of life at that time.
            let mut link = shared.link.lock();
            if let Some(live) = link.live_mut(cgen) {
                live.ws.get_mut().input_stale();
            }
            MutexGuard::unlock_fair(link);
        }
        stale_marked = held;
        // The buffer pool is idle once unused for `RECYCLE_IDLE`: small messages do not
        // use it, so neither they nor a consumer reading them keep it.
        let pool_idle_in = if recycler.in_use() {
            let rest = deadline(pool_used, RECYCLE_IDLE).saturating_duration_since(Instant::now());
            if rest.is_zero() {
                recycler.go_idle();
                None
            } else {
                Some(rest)
            }
        } else {
            None
        };
        if held || !more {
            // Wait without the lock. Hang-up and errors wake us too (shutdown by teardown),
            // also while held back: `poll` reports them whatever was asked for.
            let mut events = if want_write { POLLOUT } else { 0 };
            // Held back: the peer's FIN too (Linux), which `poll` reports only as input
            // otherwise; the connection's end is read on to whatever the bound.
            events |= if held { POLLRDHUP } else { POLLIN };
            // Held back: wait at most until the consumer is to be reported stalled (the
            // next turn reports it). Else, with buffers pooled, until the pool is idle.
            // Else, with the buffer pool in use, until it is idle.
            let timeout = if held {
                inbound.stall_wait()
            } else {
                pool_idle_in
            };
            match poll2((fd, events), Some((raw(&waker.rx), POLLIN)), timeout) {
                Ok((r, w)) => {
                    if !held && r == 0 && w == 0 {
                        // The pool's time ran out (it goes idle in the next turn).
                        continue;
                    }
                    bytes_in = r & POLLIN != 0;
                    if w != 0 {
                        waker.drain();
                    }
                    if held {
                        let hang_up = r & POLLHUP_ERR != 0;
                        hung_up |= hang_up;
                        // The peer's FIN: read on to its end, keeping everything (what
                        // is left is what the kernel holds: bounded). Its last messages
                        // and its close frame come before it (a graceful close looks
                        // just like this); only a broken link drops past twice the bound.
                        let peer_done = peer_shut_down(r);
                        read = hang_up || peer_done || !inbound.is_full();
                        if read {
                            resumed = true;
                            inbound.set_free();
                        }
                    }
                }
                Err(e) => {
                    shared.report_dead(cgen, DisconnectReason::Io(e.to_string()));
                    return;
                }
            }
        }
        if inbound.input_left() {
            // A read left messages above the socket (a consumer's woke us if we slept
            // in `poll`): read them, unless a consumer goes on reading (then defer to
            // it, as for any ready input). The flag stays until a read reaches the
            // socket's end: a consumer's next wait reads before it polls.
            more = true;
            left = true;
        }
        if read && (bytes_in || more) && inbound.consumer_reads(&mut seen) {
            // A consumer waiting in `recv` reads the socket itself (no hand-off, no
            // wake-up): leave the input to it, watching only our own pending output, a
            // hang-up and the waker (the consumer writes to it when it parks). Read
            // again once it stopped reading for a while (busy with what it got).
            let events = if want_write { POLLOUT } else { 0 };
            let polled = poll2((fd, events), Some((raw(&waker.rx), POLLIN)), Some(defer));
            defer = (defer * 2).min(max_defer);
            inbound.reader_resumes();
            match polled {
                Ok((r, w)) => {
                    if w != 0 {
                        // Woken (a consumer parked, a flush request, `close()`): read
                        // and flush now.
                        waker.drain();
                    } else if r == 0 {
                        more = true;
                        continue;
                    }
                }
                Err(e) => {
                    shared.report_dead(cgen, DisconnectReason::Io(e.to_string()));
                    return;
                }
            }
        }
        // Reading ourselves: the next consumer that reads is looked at again soon.
        defer = DEFER;
        let mut link = shared.link.lock();
        if resumed
            && let Some(live) = link.live_mut(cgen)
            && live.pending_since.is_some()
        {
            // Output waited during the hold: the peer may have waited for our consumer
            // (see `Shared::stall_is_ours`). It gets the whole write timeout from now,
            // reading again, to take it; the timer judges.
            live.pending_since = Some(Instant::now());
            let _ = shared.timer.send(TimerCmd::Wake);
        }
        // Held back (`read` false): only flush, read nothing. Past the bound only to reach
        // the connection's end, and past twice the bound dropping the data.
        let take = if !read {
            Take::Nothing
        } else if (to_end || hung_up) && inbound.over_twice_the_bound() {
            Take::Drop
        } else {
            Take::Keep
        };
        let drained = drain(&shared, &mut link, cgen, take, &mut out, Some(&recycler));
        if recycler.taken() != pool_taken {
            pool_taken = recycler.taken();
            pool_used = Instant::now();
        }
        let Some(d) = drained else {
            return;
        };
        if d.dropped > 0 {
            inbound.note_dropped(d.dropped);
            if dropped == 0 {
                log::warn!(
                    "connection {cgen}: the consumer is behind by twice event_capacity; \
                     dropping the data read on to the end of the connection"
                );
            }
            dropped += d.dropped;
        }
        want_write = d.want_write;
        if read {
            (more, left) = (d.more, d.more);
        }
        hand_over(
            &shared,
            link,
            &mut out,
            d.msgs,
            d.bytes,
            read.then_some(d.more),
        );
        if d.stop {
            if dropped > 0 {
                log::warn!("connection {cgen}: {dropped} messages dropped at its end");
            }
            return;
        }
        shared.gate.let_senders_in();
    }
}

/// The end of a drain of the reader thread, under the link lock: records whether it left
/// whole messages above the socket (`left`; `None`: it read nothing), hands over what it
/// read (`out`: `msgs` messages of `bytes` payload bytes), lets the lock go, and wakes a
/// consumer waiting on the socket if it left input there and handed nothing over.
pub(crate) fn hand_over(
    shared: &Shared,
    link: MutexGuard<'_, Link>,
    out: &mut VecDeque<Message>,
    msgs: usize,
    bytes: usize,
    left: Option<bool>,
) {
    let inbound = shared.events.inbound();
    if let Some(left) = left {
        // Still under the lock: a consumer whose next wait begins after this sees it
        // (review of 6ad06f5: set only when deferring, a wait that began in between
        // polled with the input above the socket).
        inbound.set_input_left(left);
    }
    let emitted = !out.is_empty();
    if emitted {
        shared
            .counters
            .received
            .fetch_add(msgs as u64, Ordering::Relaxed);
        // One channel send for the whole drain, before the lock is let go: a consumer
        // that reads the socket itself takes the lock and then looks at the channel
        // first, so it never overtakes these messages.
        shared.events.emit_messages(out, msgs, bytes);
    }
    MutexGuard::unlock_fair(link);
    shared.gate.wake();
    if left == Some(true) && !emitted {
        // Left above the socket with nothing handed over (a read that stopped after
        // pings): a consumer waiting on the socket is woken to read them, else it would
        // wait for our next look, which defers to it first (`DEFER`).
        inbound.wake_for_input_left();
    }
}

/// Reads the socket for a consumer waiting in `Events::recv` (on its thread), when
/// nothing is waiting in the channel: messages go straight to it, with no hand-off to or
/// from the reader thread. Holds no reference that keeps the client alive (its event
/// channel must close once the client is gone).
struct Driver {
    shared: Weak<Shared>,
}

/// The [`Drive`] of a client's `Events`, if its consumers may read the socket: not when
/// reading runs user code (a `Heartbeat::app` reply matcher, the `Acks` id readers). That
/// code would run on the consumer's thread, where it may wait for a lock the consumer
/// holds across `recv_timeout`: the wait would no longer be bounded, and with a blocking
/// lock the consumer deadlocks holding the link lock (and `close()` hangs). On the reader
/// thread it only waits until the consumer's `recv_timeout` returns.
pub(crate) fn driver(shared: &Arc<Shared>) -> Option<Arc<dyn Drive>> {
    let cfg = &shared.cfg;
    if cfg.heartbeat.matches_replies() || matches!(cfg.delivery, crate::Delivery::Acked(_)) {
        return None;
    }
    Some(Arc::new(Driver {
        shared: Arc::downgrade(shared),
    }))
}

impl Drive for Driver {
    fn drive(&self, pending: &Receiver<Batch>, out: &mut VecDeque<Message>) -> Option<bool> {
        let shared = self.shared.upgrade()?;
        // Never wait for the lock: whoever holds it (the reader, a sender, the timer)
        // does not keep it long, and the reader hands over what it read anyway.
        let mut link = shared.link.try_lock()?;
        let inbound = shared.events.inbound();
        // The reader sends what it read before it lets the lock go: anything it read
        // before us is in the channel now, and comes first.
        let drained = match link.conn.as_ref() {
            // A `Connected` held back (nobody read for long) goes to the channel first:
            // the consumer takes it there, before what this connection brings.
            Some(_) if shared.events.release_held() => None,
            Some(live) if pending.is_empty() => {
                let cgen = live.generation;
                inbound.note_drive();
                drain(&shared, &mut link, cgen, Take::Keep, out, None)
            }
            _ => None,
        };
        if drained.as_ref().is_some_and(|d| !d.more) {
            // Read to the socket's end: nothing is left above it, whoever left it there.
            // The next wait may go straight to `poll` (one read of an empty socket less
            // per request/response round trip).
            inbound.set_input_left(false);
        }
        // Like the reader (lock rule 3): fair, and waiting senders are told.
        MutexGuard::unlock_fair(link);
        shared.gate.wake();
        let d = drained?;
        if d.msgs > 0 {
            shared
                .counters
                .received
                .fetch_add(d.msgs as u64, Ordering::Relaxed);
        }
        if d.want_write {
            inbound.want_flush();
        }
        if d.more {
            // Whole messages wait above the socket, invisible to the reader's `poll`.
            inbound.note_input_left();
        }
        Some(d.more)
    }

    fn wait_input(&self, waker: &Waker, deadline: Option<Instant>) -> Option<bool> {
        let sock = {
            let shared = self.shared.upgrade()?;
            let link = shared.link.try_lock()?;
            let sock = match link.conn.as_ref() {
                Some(live) if live.dead.is_none() => Some(live.sock.clone()),
                _ => None,
            };
            MutexGuard::unlock_fair(link);
            shared.gate.wake();
            sock?
            // `shared` goes here: a client dropped while this thread waits ends, and its
            // event channel closes (which wakes this wait).
        };
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // The socket stays open while this clone lives; a teardown shuts it down, which
        // ends the wait (hang-up).
        let (_, woken) = poll2(
            (raw(&*sock), POLLIN),
            Some((raw(&waker.rx), POLLIN)),
            timeout,
        )
        .ok()?;
        Some(woken != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_payload_never_takes_a_much_larger_recycled_buffer() {
        let r = Recycler::new();
        // A 1 MiB payload's buffer comes back when the message is dropped.
        drop(r.copy(&vec![1u8; 1 << 20]));
        let kept = || r.kept.load(Ordering::Relaxed);
        assert!(kept() >= 1 << 20);
        // An 8 KiB payload kept by the user must not pin that buffer.
        let small = r.copy(&[2u8; 8 << 10]);
        assert_eq!(&small[..], &[2u8; 8 << 10][..]);
        assert!(
            kept() >= 1 << 20,
            "the large buffer waits for a large payload"
        );
        // A large payload takes it.
        let large = r.copy(&vec![3u8; 1 << 20]);
        assert_eq!(kept(), 0);
        assert!(large.iter().all(|b| *b == 3));
    }

    /// A message kept after its connection ended holds its own buffer only (scale probe:
    /// each kept 16 KiB message held its connection's whole pool, ~1.3 MiB).
    #[test]
    fn a_kept_message_does_not_keep_its_connections_pool() {
        let r = Recycler::new();
        drop(
            (0..4)
                .map(|_| r.copy(&[1u8; 256 << 10]))
                .collect::<Vec<_>>(),
        );
        assert!(r.holds());
        let kept = r.copy(&[2u8; 16 << 10]);
        let pool = Arc::downgrade(&r);
        // The connection ends: its reader drops the pool.
        drop(r);
        assert!(pool.upgrade().is_none(), "the kept message holds the pool");
        assert!(kept.iter().all(|b| *b == 2));
        drop(kept);
    }

    #[test]
    fn an_idle_pool_frees_what_it_holds_and_what_comes_back() {
        let r = Recycler::new();
        let lent: Vec<_> = (0..4).map(|_| r.copy(&[1u8; 256 << 10])).collect();
        assert!(r.in_use(), "buffers are out");
        drop(r.copy(&[1u8; 256 << 10]));
        assert!(r.holds());
        r.go_idle();
        assert!(!r.holds());
        assert_eq!(r.kept.load(Ordering::Relaxed), 0);
        assert!(!r.in_use(), "an idle pool is not watched");
        // Given back while idle: freed, not pooled (review: a buffer returned after the
        // trim stayed pooled, or cost the reader a wake-up per message).
        drop(lent);
        assert!(!r.holds());
        assert_eq!(r.out.load(Ordering::Relaxed), 0);
        // The next large message makes it a pool again.
        drop(r.copy(&[1u8; 256 << 10]));
        assert!(r.holds());
        assert!(r.in_use());
    }

    /// A pool full of buffers too large for the payloads that now come neither makes
    /// every copy walk all of them (under the link lock) nor keeps smaller buffers out
    /// for good: past half the budget, a too-large buffer is freed.
    #[test]
    fn a_pool_of_too_large_buffers_makes_way() {
        let r = Recycler::new();
        drop(
            (0..250)
                .map(|_| r.copy(&[1u8; 17 << 10]))
                .collect::<Vec<_>>(),
        );
        let full = r.rx.len();
        assert!(full > 200, "{full} buffers of 17 KiB kept");
        for _ in 0..40 {
            drop(r.copy(&[2u8; 8 << 10]));
        }
        assert!(r.rx.len() < full, "the 17 KiB buffers stay: {}", r.rx.len());
        // And 8 KiB buffers are recycled now.
        let before = r.kept.load(Ordering::Relaxed);
        let m = r.copy(&[3u8; 8 << 10]);
        assert!(
            r.kept.load(Ordering::Relaxed) < before,
            "a recycled buffer was taken"
        );
        drop(m);
    }
}
