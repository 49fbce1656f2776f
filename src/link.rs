//! The shared link: the socket behind the one lock, and the rules for touching it.
//!
//! # Lock discipline
//! There is one lock per client, `Shared::link` (a `parking_lot::Mutex<Link>`, with the
//! `Shared::changed` condvar). It guards the current socket, the offline queue, the
//! connection state, the heartbeat state and the outbox of acked delivery.
//!
//! ## Every lock, and the order
//! | lock | taken by | held around |
//! |------|----------|-------------|
//! | `Shared::link` | every thread: senders, reader, timer, supervisor, `state`/`stats`/`wait_connected`, eager `connect`, and a consumer waiting in `Events::recv` (by `try_lock` only: it reads the socket itself, and takes a clone of it to wait on, see `inbound.rs`) | socket calls in nonblocking mode, queue, outbox and state updates, `Heartbeat::app` reply matchers and `Acks` id readers (user code), one `SIOCOUTQ` ioctl per 1024 flushed messages, unbounded channel sends |
//! | `Shared::connecting` (the mutex inside `dial::Cancel`) | supervisor (`establish` / `connect::open`: attach / detach the socket of the attempt), `close()` (`Cancel::cancel`: shut it down) | a `try_clone` / `shutdown` of that socket and an atomic load |
//! | `Handle::supervisor` (client.rs) | `close()` / drop of the last handle | taking the `JoinHandle` out (the join happens after it is released) |
//! | `Config::policy` | supervisor only | the user's `ReconnectPolicy::next_delay` / `min_uptime` |
//! | `Inbound::waker`, `Inbound::held_since` (inbound.rs) | the reader (attach, hold, resume), the consumer in `Events` (wake the reader), `stats()` before it takes `link`; `held_since` also under `link` (the timer) | an `Option` read or write (leaves: nothing is taken under them) |
//! | `Inbound::idle_since` (inbound.rs) | the reader alone (hold, its look at the consumer's progress) | a read or write (a leaf) |
//! | `SendGate::lock` (+ its condvar) | a sender that found `link` taken (`lock_for_send`), the reader after letting `link` go (`SendGate::wake`) | a `try_lock` of `link` (never a blocking lock) and the condvar wait / notify |
//! | `EventSink::grammar` (inbound.rs) | whoever emits an event (any thread, also under `link`); `close()` (`begin_close`, `wait_closed`) | the grammar check and one unbounded channel send (after `Closed`, dropping the sender); the condvar wait for `Closed` |
//!
//! The order is simply: **`connecting`, `supervisor` and the event grammar are leaf locks**,
//! and under **`link`** only the grammar lock is ever taken (by `emit`) — so no cycle can
//! form. The only other nestings are `policy` → `link`, when the user's policy code calls a
//! `Client` method (nothing ever takes `policy` while holding another lock), and `gate` →
//! `link` by `try_lock` only, which cannot wait and so cannot deadlock. (crossbeam's
//! internal channel locks are leaves too: an unbounded send never waits.)
//! Consequences for user code: a `Heartbeat::app` reply matcher and the `Acks` id readers
//! (`id_of`, `ack_of`) run under `link` (on the reader thread or a sender's; never on a
//! consumer's thread in `Events::recv`: a client with such code has consumers that do not
//! read, see `reader::driver`) and must not call back into the `Client` (the
//! mutex is not reentrant); event handlers, request
//! factories, `on_connect` hooks and reconnect policies run with no `link` held.
//!
//! ## Rules for everything done under `link`
//! 1. The socket is always in nonblocking mode once a connection is published, so no
//!    call made under the lock can block on the network.
//! 2. Waiting for readability or writability happens with `sys::poll2` *without* the lock
//!    (`MutexGuard::unlocked_fair`), on a `dup` or an `Arc` clone of the socket so the
//!    descriptor stays valid (the reader's and a waiting consumer's clones: a teardown
//!    shuts the socket down, which ends their waits).
//! 3. The reader (or a consumer reading for itself) releases the lock with `unlock_fair`
//!    after at most `read_budget` messages and at most `READ_QUOTA` bytes read from the
//!    socket (`Tcp`'s read quota), so writers wait at most one bounded drain, whatever
//!    the peer sends.
//! 4. Only unbounded channels are sent to while the lock is held. The reader sends each
//!    drain's batch before it lets the lock go, so a consumer that takes the lock and
//!    finds the channel empty may read the socket itself without overtaking it.
//! 5. On `WouldBlock` tungstenite keeps the frame: we retry `flush()`, never re-send.
//! 6. No thread is joined while any lock is held (the supervisor joins the reader after
//!    releasing `link`, `close()` joins the supervisor after releasing `supervisor`).
//! 7. A batch (`send_all`) keeps `link` across its messages, but like a single send it lets
//!    go whenever it waits: for the socket (`unlocked_fair` around `poll`), or for queue /
//!    outbox room under `OverflowPolicy::Block` (the `changed` condvar).

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::config::{Config, OverflowPolicy};
use crate::heartbeat::HbState;
use crate::inbound::EventSink;
use crate::outbox::{Admit, Outbox};
use crate::queue::{OfflineQueue, Ticket, outgoing_refusal, payload_len};
use crate::time::{deadline, deadline_in};
use crate::transport::dial::Cancel;
use crate::transport::stream::{Stream, Ws, is_would_block, reason_of};
use crate::transport::sys::{Waker, abort, unacked_bytes, unsent_bytes, wait_writable};
use crate::{DisconnectReason, Error, Event, Message, Result, State};

/// Messages flushed to the OS but perhaps not yet acknowledged by the peer's TCP, with
/// the socket byte offset at which each ended (at-least-once and acked delivery),
/// followed by the messages still in tungstenite's buffer (end `UNFLUSHED`: this mode's `in_flight`,
/// kept in the same deque so a send costs one push, not a push, a pop and a push). Pruned
/// against the kernel's send queue (one ioctl) every `PRUNE_EVERY` messages or
/// `PRUNE_EVERY_BYTES` bytes, so memory stays within about what the kernel itself
/// holds, plus `TRACK_CAP`.
#[derive(Default)]
pub(crate) struct Tracked {
    /// End offset, message, and who owns it (see [`Owner`]).
    msgs: VecDeque<(u64, Message, Owner)>,
    /// The last this many of `msgs` are not flushed yet.
    unflushed: usize,
    /// The memory of `msgs`, as [`tracked_len`] counts it.
    bytes: usize,
    since_prune: usize,
    bytes_since_prune: usize,
    /// End offsets of messages no longer kept that came after the peer's last sign of
    /// life (its TCP acknowledged them; or, with no kernel figure, past `TRACK_CAP`), the
    /// last `ACKED_CAP` of them.
    acked_ends: VecDeque<u64>,
    /// How many older ones no longer fit in `acked_ends`, and the end of the last of them:
    /// counted possibly lost unless the peer shows a sign of life past that end.
    acked_older: u64,
    acked_older_end: u64,
    /// Where the first message of `msgs` starts, at the earliest: the end offset of the
    /// last one pruned, or, when the first kept one shares its batch (flushed together),
    /// that batch's start plus the frames pruned from it.
    floor: u64,
}

impl Tracked {
    /// Tracks the messages written from socket byte offset `start` on.
    pub(crate) fn starting_at(start: u64) -> Tracked {
        Tracked {
            floor: start,
            ..Tracked::default()
        }
    }
}

/// Who owns a tracked message: this list, or (acked delivery, a message with an id) the
/// outbox, which sends it again until acked, so it is never possibly lost here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// No outbox entry: at least once, by this list.
    Plain,
    /// The first write on this connection of outbox entry `seq`: where it stands in the
    /// write order.
    First(u64),
    /// A later write of an outbox entry (re-sent after its ack timeout): its place is
    /// its first write's.
    Again,
}

/// End offset of a message whose flush has not completed: after any real offset.
const UNFLUSHED: u64 = u64::MAX;
const PRUNE_EVERY: usize = 1024;
const PRUNE_EVERY_BYTES: usize = 1 << 20;
/// With no kernel figure (no `SIOCOUTQ` equivalent), at most this many bytes of
/// messages sent after the peer's last sign of life are kept for a re-send, each counted
/// with its entry (see [`tracked_len`]).
const TRACK_CAP: usize = 4 << 20;

/// A record of messages (`Live::in_flight`, `Tracked::msgs`) grown past this many
/// entries gives its room back once mostly empty: a burst of small sends to a slow peer
/// kept 13 MiB per idle connection. Above one batch's worth (128 KiB of 64 B messages),
/// so that a steady flood does not shrink and grow it per flush.
const RECORD_KEEP: usize = 4096;

/// Gives back most of the room of a record that is mostly empty (see [`RECORD_KEEP`]).
fn shrink_record<T>(record: &mut VecDeque<T>) {
    if record.capacity() > RECORD_KEEP && record.len() < record.capacity() / 4 {
        record.shrink_to(RECORD_KEEP.max(record.len() * 2));
    }
}

/// The memory a tracked message holds: its payload and its entry in `Tracked::msgs`.
/// Payloads alone let a million empty messages through the cap, never dropped (76 MiB).
fn tracked_len(m: &Message) -> usize {
    payload_len(m) + std::mem::size_of::<(u64, Message, Owner)>()
}
/// At most this many messages acknowledged by TCP after the peer's last sign of life
/// are remembered one by one (8 bytes each) for the possibly-lost count; older ones are
/// only counted (see `Tracked::acked_older`).
const ACKED_CAP: usize = 1 << 16;

/// What a dead connection leaves to send again.
pub(crate) struct Leftover {
    /// In order: to be sent again on the next connection (or, closing, handed back),
    /// each with the outbox entry it is the first write of on this connection, if any.
    pub resend: Vec<(Message, Option<u64>)>,
    /// Acknowledged by the peer's TCP after the peer's last sign of life, not resent
    /// (closing: also those sent whole but not acknowledged).
    pub possibly_lost: u64,
}

/// Where the last heartbeat probe is on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeOut {
    /// None sent yet.
    None,
    /// Handed to tungstenite; it ends at or before this socket byte offset (see
    /// [`Live::handed`]).
    Sent(u64),
    /// Not written: our buffer was full (of user data). Written again as soon as it
    /// fits (the timer tries until then).
    Unwritten,
}

/// One open connection, owned by the link while published.
pub(crate) struct Live {
    pub ws: Ws,
    /// A `dup` of the socket: poll and shutdown without the lock.
    pub sock: Arc<TcpStream>,
    pub waker: Arc<Waker>,
    pub generation: u64,
    /// Messages written into tungstenite's buffer whose flush has not completed yet
    /// (when not tracking: tracked messages wait at the back of `tracked`). Cleared on
    /// every successful flush; handed back if the link dies.
    pub in_flight: VecDeque<Message>,
    /// The memory of the messages whose flush has not completed, in `in_flight` or at
    /// the back of `tracked` (as [`tracked_len`] counts it): bounded with the write
    /// buffer (see [`Live::write_tracked`]).
    pub unflushed_mem: usize,
    /// Flushed messages the peer's TCP may not have acknowledged (`None`: not tracked).
    pub tracked: Option<Tracked>,
    /// Set once when the connection is declared dead (first reporter wins).
    pub dead: Option<DisconnectReason>,
    /// Output is pending and the OS has accepted none of it since this instant
    /// (moves forward while a slow peer still reads: only a peer that stopped reading
    /// stalls). `None` when everything was flushed.
    pub pending_since: Option<Instant>,
    /// Bytes written on the socket when `pending_since` was last set: more means progress.
    pub pending_written: u64,
    /// Output the peer's TCP had acknowledged (where the kernel says; else what the OS
    /// took) when the timer last looked: see [`Live::output_moved`].
    pub output_seen: u64,
    /// Where the last heartbeat probe is on its way out (see [`Live::output_moved`]).
    pub probe_out: ProbeOut,
    /// Where what was handed to tungstenite so far ends on the socket, at the most:
    /// the socket offset when a flush last emptied our buffer, plus each frame handed
    /// over since (and each pong tungstenite queued), with room for TLS records (see
    /// [`hand_over`](Self::hand_over)). Only where a probe ends comes from it (an
    /// estimate past the real end starts the probe's reply clock a little late, never
    /// early).
    pub handed: u64,
    /// Drains of this connection so far (by the reader or a consumer): whether input
    /// waiting at a heartbeat deadline has been read since (see `timer.rs`).
    pub drains: u64,
    /// Bytes read into tungstenite's buffer that no ping, pong or whole data message read
    /// so far accounts for: part of a data message still arriving (see `reader::drain`).
    pub unaccounted: u64,
    /// Bytes read into tungstenite's buffer that the messages read so far do not account
    /// for, each message counted with the fewest header bytes it can have
    /// (`reader::frame_len`): 0 when that buffer is empty (see `reader::drain`). A
    /// message with more header bytes than that (fragments, a longer header than needed,
    /// an unfragmented one over 64 KiB) leaves it above 0 for good, which only costs the
    /// consumer's early stop; it never falls below the truth.
    pub buffered: i64,
    /// `buffered` started from an empty buffer: nothing was in tungstenite's buffer when
    /// the connection was published (see `Opened::settled`). Then a consumer's read that
    /// brings it to 0 knows nothing is left in tungstenite's buffer; else 0 is a hint (a
    /// stop it causes says "more").
    pub exact: bool,
    /// The largest payload past `read_buffer_size` read on this connection (0: none):
    /// tungstenite's read buffer grew to hold it (see `reader::Payloads`).
    pub grown_to: usize,
    pub hb: HbState,
    /// The close frame was queued by us (client-initiated close).
    pub close_sent: bool,
    /// The reader thread, unparked when the last waiting sender got the lock.
    pub reader: Option<std::thread::Thread>,
    /// `Counters::sent`: messages whose write completed, counted when a flush completes
    /// (whoever flushes: a sender, the reader, the timer, the supervisor).
    pub sent: Arc<AtomicU64>,
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

    /// Writes `m` into tungstenite's buffer without blocking and tracks it as in flight
    /// (a `WouldBlock` here still means buffered: tungstenite kept the frame).
    pub(crate) fn write_tracked(
        &mut self,
        m: Message,
    ) -> std::result::Result<Written, tungstenite::Error> {
        self.write_tracked_as(m, Owner::Plain)
    }

    /// [`write_tracked`](Self::write_tracked), tracked as owned by `owner`.
    fn write_tracked_as(
        &mut self,
        m: Message,
        owner: Owner,
    ) -> std::result::Result<Written, tungstenite::Error> {
        // What waits in tungstenite's buffer is also held here until its flush
        // completes: that memory counts against the buffer's bound as the frames do. An
        // empty message is a 6-byte frame but an ~80-byte entry: a 16 MiB buffer took
        // 2.8 M of them, and the client held 268 MiB (review of the send paths).
        let mem = tracked_len(&m);
        if self.unflushed_mem > 0
            && self.unflushed_mem.saturating_add(mem) > self.ws.get_config().max_write_buffer_size
        {
            return Ok(Written::Full(m));
        }
        self.unflushed_mem = self.unflushed_mem.saturating_add(mem);
        match self.tracked.as_mut() {
            Some(t) => {
                t.msgs.push_back((UNFLUSHED, m.clone(), owner));
                t.unflushed += 1;
            }
            None => self.in_flight.push_back(m.clone()),
        }
        if self.buffer(m)? {
            return Ok(Written::Buffered);
        }
        self.unflushed_mem -= mem;
        let m = match self.tracked.as_mut() {
            Some(t) => {
                t.unflushed -= 1;
                t.msgs.pop_back().map(|(_, m, _)| m)
            }
            None => self.in_flight.pop_back(),
        };
        Ok(Written::Full(m.expect("pushed above")))
    }

    /// Hands `m` to tungstenite: `Ok(true)` once in its buffer (a write that would block
    /// leaves it there too), counted in [`handed`](Self::handed); `Ok(false)` when the
    /// buffer is full and did not take it.
    fn buffer(&mut self, m: Message) -> std::result::Result<bool, tungstenite::Error> {
        let len = frame_len(&m);
        match self.ws.write(m) {
            Ok(()) => {}
            Err(e) if is_would_block(&e) => {}
            Err(tungstenite::Error::WriteBufferFull(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        self.hand_over(len);
        Ok(true)
    }

    /// [`write_tracked`](Self::write_tracked), and under acked delivery the outbox
    /// notes the message of `ticket` as written (also when the write failed: it is in
    /// flight on a dead connection and is sent again with the outbox).
    #[inline]
    pub(crate) fn write_noted(
        &mut self,
        outbox: Option<&mut Outbox>,
        m: Message,
        ticket: Ticket,
    ) -> std::result::Result<Written, tungstenite::Error> {
        let Some(outbox) = outbox else {
            return self.write_tracked(m);
        };
        let owner = if ticket.is_some() {
            Owner::Again
        } else {
            Owner::Plain
        };
        let written = self.write_tracked_as(m, owner);
        if let Some(seq) = ticket
            && !matches!(written, Ok(Written::Full(_)))
            && let Some(seq) = outbox.written(seq, Instant::now())
            && let Some(last) = self.tracked.as_mut().and_then(|t| t.msgs.back_mut())
        {
            // Its first write on this connection: the one just tracked.
            last.2 = Owner::First(seq);
        }
        written
    }

    /// Output is left pending: start the stall clock, or restart it if the OS accepted
    /// bytes since the last look. Called right after each flush attempt, so "now" is
    /// when that progress was made (within the call), without a clock read per write.
    pub(crate) fn note_pending(&mut self) {
        let written = self.ws.get_ref().offsets().0;
        if self.pending_since.is_none() || written != self.pending_written {
            self.pending_since = Some(Instant::now());
            self.pending_written = written;
        }
    }

    /// Whether the last heartbeat probe is still on its way to the peer behind other
    /// output that moved since the last call: the probe is in our buffer, or the peer's
    /// TCP has not acknowledged all bytes up to its end (where the kernel says), and the
    /// peer's TCP acknowledged more (else: the OS took more). A probe queued behind a long
    /// upload cannot be answered before the upload reaches the peer. Once the peer's TCP
    /// has the probe, this is false: a peer whose application stopped answering is
    /// judged by the reply deadline, however much we stream to it.
    pub(crate) fn output_moved(&mut self) -> bool {
        let written = self.ws.get_ref().offsets().0;
        let acked = unacked_bytes(&self.sock).map_or(written, |q| written.saturating_sub(q));
        let moved = acked != std::mem::replace(&mut self.output_seen, acked);
        let on_its_way = match self.probe_out {
            ProbeOut::None => false,
            ProbeOut::Unwritten => true,
            ProbeOut::Sent(end) => acked < end,
        };
        moved && on_its_way
    }

    /// Writes a heartbeat probe and flushes without blocking. A probe that does not fit
    /// in our buffer (full of user data) is left `Unwritten`, not lost: the caller writes
    /// it again once it fits, and its reply clock waits meanwhile (see `output_moved`;
    /// a peer that takes none of that data is a write stall after the write timeout).
    pub(crate) fn write_probe(
        &mut self,
        msg: Message,
    ) -> std::result::Result<(), tungstenite::Error> {
        if !self.buffer(msg)? {
            self.probe_out = ProbeOut::Unwritten;
            return Ok(());
        }
        // Where it ends from the start, not once a flush empties our buffer: a stream of
        // `try_send`s may never let it empty, and the probe's reply clock restarted at
        // every look while the peer's TCP took more, for as long as we streamed
        // (review of the heartbeat: still open 4 s after the peer read the probe).
        // Under TLS, also room for the probe's own record, should it go alone.
        let own_record = if self.is_tls() {
            TLS_RECORD_OVERHEAD
        } else {
            0
        };
        self.probe_out = ProbeOut::Sent(self.handed.saturating_add(own_record));
        if !self.try_flush()? {
            // The reader flushes it when the socket drains.
            self.waker.wake();
        }
        Ok(())
    }

    /// Whether bytes from the peer wait unread in the socket (not its end: a peer that
    /// shut its side is no sign of life). Never waits: the socket is nonblocking.
    pub(crate) fn input_waits(&self) -> bool {
        matches!(self.sock.peek(&mut [0u8; 1]), Ok(n) if n > 0)
    }

    /// Counts a frame of `len` bytes handed to tungstenite in [`handed`](Self::handed):
    /// its own bytes on a plain socket, where the count is exact; under TLS, with 1/64
    /// more for the records (a few bytes per 16 KiB record: far more than needed, so
    /// the estimate runs late by 1/64 of what was handed over since our buffer was last
    /// empty, never early).
    pub(crate) fn hand_over(&mut self, len: u64) {
        let wire = if self.is_tls() { len + len / 64 } else { len };
        self.handed = self.handed.saturating_add(wire);
    }

    fn is_tls(&self) -> bool {
        matches!(self.ws.get_ref(), Stream::Tls(_))
    }

    /// Flushes without blocking. `Ok(true)` when everything reached the OS.
    pub(crate) fn try_flush(&mut self) -> std::result::Result<bool, tungstenite::Error> {
        match self.ws.flush() {
            Ok(()) => {
                self.flushed();
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

    /// Everything in flight reached the OS: it ends at or before the current offset.
    fn flushed(&mut self) {
        // Everything handed over is out: the estimate starts again from the truth.
        let written = self.ws.get_ref().offsets().0;
        self.handed = written;
        if let ProbeOut::Sent(end) = self.probe_out
            && end > written
        {
            self.probe_out = ProbeOut::Sent(written);
        }
        self.unflushed_mem = 0;
        let Some(t) = self.tracked.as_mut() else {
            let n = self.in_flight.len() as u64;
            if n > 0 {
                self.sent.fetch_add(n, Ordering::Relaxed);
                self.in_flight.clear();
                shrink_record(&mut self.in_flight);
            }
            return;
        };
        if t.unflushed == 0 {
            return;
        }
        self.sent.fetch_add(t.unflushed as u64, Ordering::Relaxed);
        let end = self.ws.get_ref().offsets().0;
        if t.unflushed == 1 {
            // The usual case (one `send`): no range walk.
            let (e, m, _) = t.msgs.back_mut().expect("an unflushed message");
            *e = end;
            t.bytes_since_prune += tracked_len(m);
        } else {
            let from = t.msgs.len() - t.unflushed;
            for (e, m, _) in t.msgs.range_mut(from..) {
                *e = end;
                t.bytes_since_prune += tracked_len(m);
            }
        }
        t.since_prune += t.unflushed;
        t.unflushed = 0;
        if t.since_prune >= PRUNE_EVERY || t.bytes_since_prune >= PRUNE_EVERY_BYTES {
            t.bytes += t.bytes_since_prune;
            t.since_prune = 0;
            t.bytes_since_prune = 0;
            let (written, mark) = self.ws.get_ref().offsets();
            let acked = unacked_bytes(&self.sock).map(|q| written.saturating_sub(q));
            // Keep the messages the peer's TCP has not acknowledged (bounded by the
            // kernel's send buffer); of those it acknowledged after its last sign of
            // life only the end offsets (possibly lost if the link dies now), at most
            // `ACKED_CAP`. With no kernel figure, keep what came after the last sign of
            // life, the newest `TRACK_CAP` bytes of it: the older ones are forgotten the
            // same way, end offsets only (they were all dropped, and counted nowhere:
            // 640 of 1024 messages lost silently under Wine).
            // End offsets only grow along `msgs`: drop a prefix, in one go.
            let gone = match acked {
                Some(a) => t.msgs.partition_point(|(e, _, _)| *e <= a),
                None => {
                    let mut left = t.bytes;
                    t.msgs
                        .iter()
                        .take_while(|(e, m, _)| {
                            let go = *e <= mark || left > TRACK_CAP;
                            if go {
                                left -= tracked_len(m);
                            }
                            go
                        })
                        .count()
                }
            };
            // The peer showed a sign of life after these: taken as delivered. Before the
            // pushes, so that they never join `acked_older`.
            while t.acked_ends.front().is_some_and(|e| *e <= mark) {
                t.acked_ends.pop_front();
            }
            if t.acked_older_end <= mark {
                t.acked_older = 0;
            }
            let before_mark = t.msgs.partition_point(|(e, _, _)| *e <= mark).min(gone);
            // The outbox's own messages are sent again until acked: never lost.
            for (e, _, _) in t
                .msgs
                .range(before_mark..gone)
                .filter(|x| x.2 == Owner::Plain)
            {
                if t.acked_ends.len() >= ACKED_CAP
                    && let Some(older) = t.acked_ends.pop_front()
                {
                    t.acked_older += 1;
                    t.acked_older_end = older;
                }
                t.acked_ends.push_back(*e);
            }
            // The cut may fall inside a batch (flushed together, one end offset) when it is
            // made by size: the first message kept then starts after the frames pruned
            // from its batch, not at the batch's end (review: taken for the batch's end,
            // the start was no lower bound, and `close()` handed back 511 messages the
            // peer had read).
            let mut starts = Starts::from(t.floor);
            for (e, m, _) in t.msgs.drain(..gone) {
                starts.start_of(e, &m);
                t.bytes -= tracked_len(&m);
            }
            shrink_record(&mut t.msgs);
            t.floor = starts.peek(t.msgs.front().map(|x| x.0));
        }
    }

    /// The connection is dead: what to send again on the next one (at-least-once).
    /// Reads the kernel's send queue, so call it before the socket is shut down.
    ///
    /// `closing`: there is no next connection, and what is left is handed back. If the
    /// kernel still holds unsent bytes, the connection is reset at once (Linux), which
    /// discards them: a message is then handed back only if some of its bytes had not
    /// left this host (`SIOCOUTQNSD`), as it can never arrive whole. One sent whole but
    /// not acknowledged may have arrived: possibly lost, never both delivered and
    /// handed back. Where there is no such figure or reset, only a message whose bytes
    /// never reached the OS is handed back.
    pub(crate) fn leftover(&mut self, closing: bool) -> Leftover {
        let mut resend = Vec::new();
        let mut possibly_lost = 0;
        if let Some(t) = self.tracked.as_mut() {
            let (written, mark) = self.ws.get_ref().offsets();
            // Unknown: everything after the peer's last sign of life is sent again.
            let acked = unacked_bytes(&self.sock).map_or(mark, |q| written.saturating_sub(q));
            // Bytes that left this host (unknown: all the OS took).
            let mut sent = unsent_bytes(&self.sock).map_or(written, |u| written.saturating_sub(u));
            // Reset now, right after reading the figure: the kernel must not send more of
            // what is handed back (a slow peer may still be reading). Every thread waiting
            // on the socket wakes. Not reset: the kernel may still send all it holds.
            if closing && sent < written && !abort(&self.sock) {
                sent = written;
            }
            // Each message starts at or after `start` (see `Starts`), and ends at or
            // before its own end offset. Messages never flushed (`UNFLUSHED`) are after
            // every offset: sent again; closing, handed back unless their bytes may have
            // reached the OS (with no kernel figure, every message still in the write
            // buffer was taken for sent once a byte of the first one was: none was
            // handed back).
            let mut starts = Starts::from(t.floor);
            for (end, m, owner) in t.msgs.drain(..) {
                let start = starts.start_of(end, &m);
                match owner {
                    // The outbox decides (it sends again or hands back what is unacked):
                    // here only where the first write on this connection stood in the
                    // write order, if the peer's TCP did not take it.
                    Owner::First(seq) => {
                        if end > acked {
                            resend.push((m, Some(seq)));
                        }
                        continue;
                    }
                    Owner::Again => continue,
                    Owner::Plain => {}
                }
                if end <= acked {
                    if end > mark {
                        possibly_lost += 1;
                    }
                } else if !closing || start >= sent {
                    // Sent again; or, closing, handed back: not a byte of it left this
                    // host (the reset discarded what the kernel held of it).
                    resend.push((m, None));
                } else {
                    possibly_lost += 1;
                }
            }
            possibly_lost += t.acked_ends.drain(..).filter(|e| *e > mark).count() as u64;
            // Those no longer remembered one by one: all of them, unless the peer showed a
            // sign of life past the last (then none). An upper bound when that sign of
            // life came amid them, so never an undercount.
            if t.acked_older_end > mark {
                possibly_lost += t.acked_older;
            }
            t.acked_older = 0;
            t.bytes = 0;
            t.unflushed = 0;
        }
        resend.extend(self.in_flight.drain(..).map(|m| (m, None)));
        Leftover {
            resend,
            possibly_lost,
        }
    }
}

/// Where tracked messages start, at the earliest, walked in order from
/// `Tracked::floor`. Messages flushed together share their batch's end offset: each
/// starts after the end of the batch before plus the frames before it in its batch. A
/// lower bound: other frames written between them, and TLS, only push it later.
struct Starts {
    next: u64,
    batch_end: u64,
}

impl Starts {
    fn from(floor: u64) -> Starts {
        Starts {
            next: floor,
            batch_end: floor,
        }
    }

    /// The earliest start of the next message, `m`, which ends at `end`.
    fn start_of(&mut self, end: u64, m: &Message) -> u64 {
        if end != self.batch_end {
            (self.next, self.batch_end) = (self.batch_end, end);
        }
        let start = self.next;
        self.next = self.next.saturating_add(frame_len(m));
        start
    }

    /// The earliest start of a message after the ones walked, ending at `end` (`None`:
    /// none yet): a new `Tracked::floor` when the ones walked are pruned.
    fn peek(&self, end: Option<u64>) -> u64 {
        match end {
            Some(e) if e == self.batch_end => self.next.min(self.batch_end),
            _ => self.batch_end,
        }
    }
}

/// The most a TLS record adds to its data (TLS 1.2 AES-GCM: header 5, explicit nonce 8,
/// tag 16; TLS 1.3 adds 22).
const TLS_RECORD_OVERHEAD: u64 = 29;

/// The bytes a client frame carrying `m` takes on the wire at the least (one frame:
/// header, mask, payload; TLS adds to it).
fn frame_len(m: &Message) -> u64 {
    let n = payload_len(m);
    let extended = match n {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    (2 + extended + 4 + n) as u64
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
    /// Acked delivery: the unacked messages.
    pub outbox: Option<Outbox>,
    /// How publishing the connection `connect()` opened went (set once by the
    /// supervisor; `connect()` waits for it, so `Ok` means the connection is open).
    pub first: Option<Result<()>>,
}

impl Link {
    /// Connection `cgen` while it is the current one. Every thread works for one
    /// generation; once its connection was replaced it finds nothing here and stops.
    pub(crate) fn live(&self, cgen: u64) -> Option<&Live> {
        self.conn.as_ref().filter(|l| l.generation == cgen)
    }

    /// [`Link::live`], mutable.
    pub(crate) fn live_mut(&mut self, cgen: u64) -> Option<&mut Live> {
        current_mut(&mut self.conn, cgen)
    }

    /// Connection `cgen` while it is the current one and nobody declared it dead.
    pub(crate) fn alive_mut(&mut self, cgen: u64) -> Option<&mut Live> {
        self.live_mut(cgen).filter(|l| l.dead.is_none())
    }

    /// Takes connection `cgen` out if it is still the current one.
    pub(crate) fn take_live(&mut self, cgen: u64) -> Option<Live> {
        self.conn.take_if(|l| l.generation == cgen)
    }

    /// Whether a send goes straight to the open connection (rather than to the queue).
    pub(crate) fn takes_direct(&self) -> bool {
        !self.flushing_queue && self.conn.as_ref().is_some_and(Live::takes_data)
    }
}

/// [`Link::live_mut`] on the field alone, for code that also borrows the queue or the
/// outbox.
pub(crate) fn current_mut(conn: &mut Option<Live>, cgen: u64) -> Option<&mut Live> {
    conn.as_mut().filter(|l| l.generation == cgen)
}

/// Counters for [`Stats`](crate::Stats).
#[derive(Default)]
pub(crate) struct Counters {
    /// Shared with each connection's [`Live`], which counts as its flushes complete.
    pub sent: Arc<AtomicU64>,
    pub received: AtomicU64,
    pub reconnects: AtomicU64,
    /// At-least-once: messages written on a connection that died, and the kernel's
    /// send queue still held (or the write never completed): sent again.
    pub resent: AtomicU64,
    /// At-least-once: messages the peer's TCP acknowledged after its last sign of life
    /// on a connection that then died: perhaps never processed, not sent again.
    pub possibly_lost: AtomicU64,
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

/// The hand-off of `link` from the reader to senders: parking_lot's fair unlock hands
/// the lock only to *parked* threads, and a sender spinning in `try_lock` is not one.
/// Senders that found `link` taken count themselves here and sleep on `cv`
/// ([`Shared::lock_for_send`]); the reader stops its drain early when it sees them
/// ([`SendGate::has_waiting`]), wakes them after letting go ([`SendGate::wake`]) and
/// waits, bounded, until they had the lock ([`SendGate::let_senders_in`]).
#[derive(Default)]
pub(crate) struct SendGate {
    /// Senders waiting for `link`.
    waiting: AtomicUsize,
    /// Where waiting senders sleep. A leaf lock: nobody blocks on `link` while holding it.
    lock: Mutex<()>,
    cv: Condvar,
}

impl SendGate {
    /// Whether senders wait for `link` (the reader then ends its drain).
    pub(crate) fn has_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Called by the reader right after it let go of `link`: wakes waiting senders.
    pub(crate) fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            drop(self.lock.lock());
            self.cv.notify_all();
        }
    }

    /// Called by the reader before it takes `link` again: waits (bounded) until the
    /// waiting senders had the lock, so it does not take it straight back.
    pub(crate) fn let_senders_in(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(5);
        while self.waiting.load(Ordering::SeqCst) > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
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
    /// How senders that found `link` taken get it from the reader.
    pub gate: SendGate,
}

fn outbox_timeout(link: &Link) -> Duration {
    link.outbox
        .as_ref()
        .map_or(Duration::MAX, |o| o.ack_timeout())
}

/// Messages a batch buffered on connection `cgen` (0: none yet) since its last flush.
#[derive(Default)]
struct Batch {
    cgen: u64,
    buffered: u64,
    /// Frame bytes buffered since the last flush attempt (payload + at most 14 header).
    bytes: usize,
}

/// The messages `send_many` took from the caller's iterator for the chunk it fills. If
/// that iterator panics, they are handed back (`Event::Undelivered`) as the panic goes
/// by, not dropped with the chunk: the caller cannot tell which messages it gave.
struct Taken<'a> {
    shared: &'a Shared,
    chunk: Vec<Message>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.chunk.is_empty() {
            self.shared
                .emit(Event::Undelivered(std::mem::take(&mut self.chunk)));
        }
    }
}

/// A batch hands its buffer to the OS every this many bytes (tungstenite's own write
/// buffer size), so memory and `in_flight` stay small in long batches.
const BATCH_FLUSH_BYTES: usize = 128 << 10;
/// Bytes a batch counts for a message besides its payload: its largest frame header.
const FRAME_HEADER: usize = 14;
/// Most messages of a batch taken from the caller's iterator per lock hold.
const BATCH_CHUNK: usize = 2048;
/// Most messages `send_all` reads from a finite iterator to hand them back once the
/// client is closing.
pub(crate) const CLOSED_DRAIN_MAX: usize = 1 << 20;
/// Most overdue messages an ack-timeout round copies and writes again (the rest: the
/// next round, at once), so its copies under the lock stay bounded. A round with fewer
/// due still walks the whole outbox (at most `Acks::max_messages`) for the next deadline.
const RESEND_CHUNK: usize = 256;
/// How soon an ack-timeout round that found our buffer full looks again: what did not
/// fit goes as soon as the socket drains (each look walks the outbox under the lock,
/// so not more often).
const RESEND_RETRY: Duration = Duration::from_millis(20);

/// How a send waits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendMode {
    /// Wait (without the lock) for the socket up to the write timeout, or for queue room.
    Blocking,
    /// Never wait for the network or for queue room.
    Try,
}

impl Shared {
    /// The client is ending: closed, closing, or `close()` called. A wait for room or for
    /// a connection ends then, also while the supervisor, which sets the state, is busy
    /// in a callback that is itself waiting (a hook or policy sending with
    /// `OverflowPolicy::Block`, or in `wait_connected`): `close()` sets `closing` and
    /// notifies `changed` under the lock.
    pub(crate) fn ending(&self, link: &Link) -> bool {
        matches!(link.state, State::Closed | State::Closing) || self.closing.load(Ordering::SeqCst)
    }

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

    /// Whether output pending on `live` may wait for our own consumer rather than for the
    /// peer: the reader is held back by the event bound (`event_capacity`: the consumer
    /// is behind) and the peer's data waits unread in the socket. A peer that reads and
    /// writes on one thread (a plain echo server) then blocks writing to us and stops
    /// reading us: it is alive, and only our consumer can let it go on. No write stall is
    /// judged then, by anyone (timer, sender, supervisor), as the heartbeat judges no
    /// silence then (`timer.rs`); a blocking send waits no more than the write timeout
    /// (its message stays in flight, or comes back in `WouldBlock` when the buffer is
    /// full), and when the reader reads again the write timeout starts over
    /// (`reader::run`). Review of 37d87b0: such a link was killed after the write
    /// timeout, the echoes in our socket thrown away with it. From our side a peer that
    /// never reads looks the same while we do not read it either: it is judged once the
    /// consumer caught up (reviews of 20cb2ad and 66a18a6: narrower rules got an echo
    /// server whose consumer paused again and again killed, or a peer that never reads
    /// spared for good).
    pub(crate) fn stall_is_ours(&self, live: &Live) -> bool {
        self.events.inbound().is_held() && live.input_waits()
    }

    /// Declares connection `cgen` dead (first reporter wins; stale generations ignored).
    pub(crate) fn mark_dead(&self, link: &mut Link, cgen: u64, reason: DisconnectReason) {
        if let Some(live) = link.alive_mut(cgen) {
            log::debug!("connection {cgen} dead: {reason}");
            live.dead = Some(reason);
            let _ = self.ctl.send(Command::Dead(cgen));
        }
    }

    pub(crate) fn report_dead(&self, cgen: u64, reason: DisconnectReason) {
        let mut link = self.link.lock();
        self.mark_dead(&mut link, cgen, reason);
    }

    /// The send path of `send` and `try_send`: a batch of one.
    pub(crate) fn send(&self, msg: Message, mode: SendMode) -> Result<()> {
        if let Some(refusal) = outgoing_refusal(&msg, self.cfg.limits.max_message_size) {
            return Err(refusal.error(msg));
        }
        let mut link = self.lock_for_send();
        let mut batch = Batch::default();
        let r = self.accept(&mut link, msg, mode, &mut batch);
        if batch.cgen != 0 {
            self.flush_batch(&mut link, &mut batch, mode);
        }
        r
    }

    /// Sends a batch in chunks, each under one lock hold: each message is written into
    /// tungstenite's buffer (or queued, or handed back to `fail` with its index), and the
    /// buffer is flushed at the end of each chunk. The caller's iterator runs between
    /// chunks, without the lock: it may wait (a channel), be slow, or use the client, and
    /// nobody waits for it under the lock (the reader, the timer, `close()`). A chunk is
    /// as many messages as the iterator says it has left (its `size_hint`), at most
    /// `BATCH_CHUNK` and `BATCH_FLUSH_BYTES`, and at least one: an iterator that cannot
    /// say (a channel's) has each message sent as it comes. The lock is let go only to
    /// wait for the socket (`unlocked_fair`), never across a network wait.
    pub(crate) fn send_many(
        &self,
        mut msgs: impl Iterator<Item = Message>,
        mode: SendMode,
        fail: &mut dyn FnMut(usize, Error),
    ) {
        let mut batch = Batch::default();
        // Messages only (their index is `first` plus their place): one 56-byte move per
        // message into the chunk and one out (issue 11: moving `(index, Message)` pairs
        // through `Result`s cost store-forwarding stalls, 14% of `send_all`'s CPU).
        let mut taken = Taken {
            shared: self,
            chunk: Vec::new(),
        };
        let chunk = &mut taken.chunk;
        let mut first = 0;
        loop {
            let want = msgs.size_hint().0.clamp(1, BATCH_CHUNK);
            let mut bytes = 0;
            let mut done = true;
            for msg in msgs.by_ref() {
                // Counted as `accept` counts a batch, so a chunk ends where that flush
                // falls, and costs one flush.
                bytes += payload_len(&msg) + FRAME_HEADER;
                chunk.push(msg);
                if chunk.len() >= want || bytes >= BATCH_FLUSH_BYTES {
                    done = false;
                    break;
                }
            }
            if !chunk.is_empty() {
                let mut link = self.lock_for_send();
                let limit = self.cfg.limits.max_message_size;
                let n = chunk.len();
                for (i, msg) in (first..).zip(chunk.drain(..)) {
                    let r = match outgoing_refusal(&msg, limit) {
                        None => self.accept(&mut link, msg, mode, &mut batch),
                        Some(refusal) => Err(refusal.error(msg)),
                    };
                    if let Err(e) = r {
                        fail(i, e);
                    }
                }
                first += n;
                // Flushed before the iterator is asked for more (it may wait for long).
                if batch.cgen != 0 {
                    self.flush_batch(&mut link, &mut batch, mode);
                }
                if self.ending(&link) {
                    // Every later message would be refused. What the iterator says it
                    // still holds (its lower bound, read once, with an upper one: a
                    // `Vec`'s, a range's) is already the caller's batch, and dropping it
                    // with the iterator would lose it silently (API fuzzer: 952 of 3000 a
                    // closed client was given, and `Ok(())` with 17 952 lost in a race
                    // with `close()`): each is handed back, at most `CLOSED_DRAIN_MAX` (a
                    // lying or huge lazy iterator must not keep this call going for good).
                    // A filter's or a channel's rest (lower bound 0) is not read: a
                    // channel's would be drained into failures for as long as it lives.
                    drop(link);
                    let (holds, upper) = msgs.size_hint();
                    let n = if upper.is_some() {
                        holds.min(CLOSED_DRAIN_MAX)
                    } else {
                        0
                    };
                    for msg in msgs.by_ref().take(n) {
                        fail(first, Error::Closed { message: Some(msg) });
                        first += 1;
                    }
                    return;
                }
            }
            if done {
                return;
            }
        }
    }

    /// One message of a batch: admitted to the outbox (acked delivery), then written into
    /// the connection's buffer (not flushed), or queued, or handed back.
    #[inline]
    fn accept(
        &self,
        link: &mut MutexGuard<'_, Link>,
        mut msg: Message,
        mode: SendMode,
        batch: &mut Batch,
    ) -> Result<()> {
        // The message's outbox entry from here on (acked delivery, with an id).
        let mut ticket = None;
        if link.outbox.is_some() {
            match self.admit(link, &msg, mode, batch) {
                Admit::Ok(t) => ticket = t,
                // Full because the client is closing (a `Block` wait ends then): the
                // message comes back as any other refused by a close.
                Admit::Full if self.ending(link) => {
                    return Err(Error::Closed { message: Some(msg) });
                }
                Admit::Full => return Err(Error::QueueFull { message: msg }),
                Admit::Duplicate(id) => return Err(Error::DuplicateId { id, message: msg }),
            }
        }
        let size = payload_len(&msg);
        loop {
            if self.ending(link) {
                self.unadmit(link, ticket);
                return Err(Error::Closed { message: Some(msg) });
            }
            let takes = link.takes_direct() || self.cfg.offline_queue || link.flushing_queue;
            if takes
                && matches!(self.cfg.delivery, crate::Delivery::AtMostOnce)
                && self.handed_back_full()
            {
                // A connection that dies hands back what it had in flight, in
                // `Unconfirmed`: while as many wait unread, take no more (direct or
                // queued: the queue goes in flight on the next connection).
                if batch.buffered > 0 {
                    // This batch's own messages first (they may be what fills it).
                    self.flush_batch(link, batch, mode);
                }
                if self.wait_handed_back(link, mode).is_err() {
                    return Err(Error::QueueFull { message: msg });
                }
                continue;
            }
            if !link.takes_direct() {
                if !self.cfg.offline_queue && !link.flushing_queue {
                    self.unadmit(link, ticket);
                    return Err(Error::Offline { message: msg });
                }
                match self.enqueue(link, msg, ticket, mode) {
                    Ok(None) => return Ok(()),
                    // A connection opened while we waited for queue room: write on it.
                    Ok(Some(m)) => {
                        msg = m;
                        continue;
                    }
                    Err(e) => {
                        if matches!(e, Error::QueueFull { .. }) {
                            self.unadmit(link, ticket);
                        }
                        return Err(e);
                    }
                }
            }
            let l: &mut Link = link;
            let live = l.conn.as_mut().expect("direct: a live connection");
            if batch.cgen != live.generation {
                // A new connection (the previous one died under this batch).
                *batch = Batch {
                    cgen: live.generation,
                    ..Batch::default()
                };
            }
            match live.write_noted(l.outbox.as_mut(), msg, ticket) {
                Ok(Written::Buffered) => {
                    batch.buffered += 1;
                    batch.bytes += size + FRAME_HEADER;
                    if batch.bytes >= BATCH_FLUSH_BYTES {
                        // Hand a full buffer to the OS without waiting (as tungstenite
                        // itself would), so `in_flight` stays small in a long batch.
                        batch.bytes = 0;
                        match live.try_flush() {
                            Ok(true) => batch.buffered = 0,
                            Ok(false) => {}
                            Err(e) => {
                                let reason = reason_of(&e);
                                self.mark_dead(link, batch.cgen, reason);
                            }
                        }
                        // A long batch lets the reader, the timer and other senders in
                        // between chunks (handed over if one is parked on the lock). Each
                        // later message checks the connection again.
                        MutexGuard::unlocked_fair(link, || {});
                    }
                    return Ok(());
                }
                Ok(Written::Full(m)) => {
                    msg = m;
                    // Make room: flush what is buffered (waiting, unless `Try`).
                    let ours = self.flush_batch(link, batch, mode);
                    let still_full = link
                        .live(batch.cgen)
                        .is_some_and(|l| l.pending_since.is_some());
                    // No room after the write timeout, the peer waiting for our consumer
                    // (`stall_is_ours`): handed back, as `try_send` would, rather than
                    // waiting for as long as the consumer is behind.
                    if (mode == SendMode::Try || ours) && still_full {
                        self.unadmit(link, ticket);
                        return Err(Error::WouldBlock { message: msg });
                    }
                }
                Err(e) => {
                    // In `in_flight`: requeued or handed back with the connection.
                    let reason = reason_of(&e);
                    self.mark_dead(link, batch.cgen, reason);
                    return Ok(());
                }
            }
        }
    }

    /// Acked delivery: makes room in the outbox per the overflow policy and tracks `msg`.
    fn admit(
        &self,
        link: &mut MutexGuard<'_, Link>,
        msg: &Message,
        mode: SendMode,
        batch: &mut Batch,
    ) -> Admit {
        let until = match self.cfg.overflow {
            OverflowPolicy::Block(limit) => deadline_in(limit),
            _ => Instant::now(),
        };
        // Asked once, however many turns making room takes (fuzzer: a `Block` send
        // asked the user's reader up to 29 times for one message).
        let id = link.outbox.as_ref().expect("acked delivery").id_of(msg);
        loop {
            let outbox = link.outbox.as_mut().expect("acked delivery");
            let was_empty = outbox.len() == 0;
            match outbox.admit_as(id, msg) {
                Admit::Ok(ticket) => {
                    if was_empty {
                        // The timer computes the first ack deadline.
                        let _ = self.timer.send(TimerCmd::Wake);
                    }
                    return Admit::Ok(ticket);
                }
                // No room to make: the user's mistake, said at once.
                dup @ Admit::Duplicate(_) => return dup,
                Admit::Full => {}
            }
            if batch.buffered > 0 {
                // This batch's own messages wait unflushed: the peer cannot ack them
                // (making room) before they go out, and dropping the oldest "written"
                // one would hand back one that goes out after all.
                self.flush_batch(link, batch, mode);
                continue;
            }
            let outbox = link.outbox.as_mut().expect("acked delivery");
            match (self.cfg.overflow, mode) {
                // As many handed back wait unread: drop no more (see `handed_back_full`).
                (OverflowPolicy::DropOldest, _) if self.handed_back_full() => {
                    return Admit::Full;
                }
                (OverflowPolicy::DropOldest, _) => match outbox.drop_oldest_written() {
                    Some(old) => self.emit(Event::Undelivered(vec![old])),
                    None => return Admit::Full,
                },
                (OverflowPolicy::Block(_), SendMode::Blocking) => {
                    if self.ending(link) {
                        return Admit::Full;
                    }
                    // The reader notifies `changed` when acks made room.
                    if self.changed.wait_until(link, until).timed_out() {
                        return Admit::Full;
                    }
                }
                _ => return Admit::Full,
            }
        }
    }

    /// Acked delivery: the message of `ticket` was handed back after all, stop tracking it.
    fn unadmit(&self, link: &mut Link, ticket: Ticket) {
        if let (Some(o), Some(seq)) = (link.outbox.as_mut(), ticket) {
            let _ = o.forget(seq);
        }
    }

    /// Takes `link` for a send. Not with `lock()`: a contended parking_lot lock spins and
    /// then calls `sched_yield` up to 7 times before it parks, and on a busy machine each
    /// yield can cost the sender a whole scheduler slice, while `unlock_fair` only hands
    /// the lock to *parked* threads, so the reader (always runnable under inbound load)
    /// takes it straight back. A waiting sender is counted in the [`SendGate`] and sleeps
    /// there; the reader wakes it when it lets go.
    #[inline]
    fn lock_for_send(&self) -> MutexGuard<'_, Link> {
        match self.link.try_lock() {
            Some(g) => g,
            None => self.lock_for_send_contended(),
        }
    }

    /// [`lock_for_send`](Self::lock_for_send) when `link` is taken: out of line, so
    /// the uncontended send stays small.
    #[cold]
    fn lock_for_send_contended(&self) -> MutexGuard<'_, Link> {
        let gate = &self.gate;
        gate.waiting.fetch_add(1, Ordering::SeqCst);
        let link = loop {
            let mut g = gate.lock.lock();
            if let Some(link) = self.link.try_lock() {
                break link;
            }
            // Other holders (timer, supervisor, stats) do not notify: hence the bound.
            gate.cv.wait_for(&mut g, Duration::from_micros(200));
        };
        if gate.waiting.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(r) = link.conn.as_ref().and_then(|l| l.reader.as_ref())
        {
            r.unpark();
        }
        link
    }

    /// Whether as many messages as the offline queue may hold (`Limits::queue_messages`,
    /// `queue_bytes`) wait unread in `Undelivered` / `Unconfirmed` events. Nothing else
    /// bounds them while nobody reads events: `DropOldest` would drop one into an event
    /// per send, and at-most-once delivery hands back a connection's in-flight messages
    /// each time one dies. So, until the consumer takes them, `DropOldest` drops no more
    /// (the new message is refused, `QueueFull`) and at-most-once sends wait for room as
    /// the overflow policy says: the queue plus this many, and one connection's in-flight
    /// messages, is as much as the client holds for the consumer.
    fn handed_back_full(&self) -> bool {
        let (msgs, bytes) = self.events.inbound().handed_back();
        // At least one waits: a queue bound of 0 must not refuse everything.
        msgs > 0 && (msgs >= self.cfg.limits.queue_messages || bytes >= self.cfg.limits.queue_bytes)
    }

    /// An at-most-once send waiting for [`handed_back_full`](Self::handed_back_full) to
    /// clear: as `OverflowPolicy::Block` says (looking every 10 ms: the consumer taking
    /// events does not notify), else not at all. `Err`: no room (the caller refuses the
    /// message); `Ok`: room, or the client is closing (the caller sees it).
    fn wait_handed_back(
        &self,
        link: &mut MutexGuard<'_, Link>,
        mode: SendMode,
    ) -> std::result::Result<(), ()> {
        let OverflowPolicy::Block(limit) = self.cfg.overflow else {
            return Err(());
        };
        if mode == SendMode::Try {
            return Err(());
        }
        let end = deadline_in(limit);
        while self.handed_back_full() && !self.ending(link) {
            let now = Instant::now();
            if now >= end {
                return Err(());
            }
            let step = deadline(now, Duration::from_millis(10)).min(end);
            let _ = self.changed.wait_until(link, step);
        }
        Ok(())
    }

    /// Queues `msg` while no connection takes direct sends. `Ok(Some(msg))`: a
    /// connection opened while we waited for room (`Block`), write on it instead.
    fn enqueue(
        &self,
        link: &mut MutexGuard<'_, Link>,
        msg: Message,
        ticket: Ticket,
        mode: SendMode,
    ) -> Result<Option<Message>> {
        if !link.queue.could_fit(&msg) {
            return Err(Error::QueueFull { message: msg });
        }
        if link.queue.has_room(&msg) {
            link.queue.push_back(msg, ticket);
            return Ok(None);
        }
        match (self.cfg.overflow, mode) {
            (OverflowPolicy::Reject, _) | (OverflowPolicy::Block(_), SendMode::Try) => {
                Err(Error::QueueFull { message: msg })
            }
            // As many handed back wait unread: drop no more (see `handed_back_full`).
            (OverflowPolicy::DropOldest, _) if self.handed_back_full() => {
                Err(Error::QueueFull { message: msg })
            }
            (OverflowPolicy::DropOldest, _) => {
                let mut dropped = Vec::new();
                while !link.queue.has_room(&msg) {
                    let Some((m, t)) = link.queue.pop_front() else {
                        break;
                    };
                    // One the server acked while it waited here is delivered.
                    if !link.outbox.as_ref().is_some_and(|o| o.acked_already(t)) {
                        self.unadmit(link, t);
                        dropped.push(m);
                    }
                }
                link.queue.push_back(msg, ticket);
                // Those acked while they waited were delivered: no event for them (an
                // empty `Undelivered` went out when all were).
                if !dropped.is_empty() {
                    log::warn!(
                        "offline queue full: dropped {} oldest messages",
                        dropped.len()
                    );
                    // Unbounded channel: fine under the lock (rule 4).
                    self.emit(Event::Undelivered(dropped));
                }
                Ok(None)
            }
            (OverflowPolicy::Block(limit), SendMode::Blocking) => {
                let deadline = deadline_in(limit);
                loop {
                    if link.takes_direct() || self.ending(link) {
                        return Ok(Some(msg));
                    }
                    if link.queue.has_room(&msg) {
                        link.queue.push_back(msg, ticket);
                        return Ok(None);
                    }
                    if self.changed.wait_until(link, deadline).timed_out() {
                        return Err(Error::QueueFull { message: msg });
                    }
                }
            }
        }
    }

    /// Flushes what the batch buffered on its connection. Blocking: waits (without the
    /// lock) until it all reached the OS, the connection died, or the write stalled past
    /// the write timeout (then declares it dead; what was in flight is requeued or handed
    /// back with the connection). A stall that is our consumer's (`stall_is_ours`) kills
    /// nothing: past the write timeout the wait ends with the output still pending (in
    /// flight; the reader flushes it once it reads again), and this returns true.
    /// `Try`: one nonblocking flush, the rest is left to the reader (woken) and judged by
    /// the timer.
    fn flush_batch(
        &self,
        link: &mut MutexGuard<'_, Link>,
        batch: &mut Batch,
        mode: SendMode,
    ) -> bool {
        // However it ends, the next 128 KiB count from here.
        batch.bytes = 0;
        let write_timeout = self.cfg.write_timeout;
        let cgen = batch.cgen;
        let started = Instant::now();
        let mut waited = false;
        loop {
            let Some(live) = link.live_mut(cgen).filter(|l| l.takes_data()) else {
                // Died (or its close frame was queued) meanwhile: the batch's messages
                // went with the connection.
                batch.buffered = 0;
                return false;
            };
            let was_pending = live.pending_since.is_some();
            match live.try_flush() {
                Ok(true) => {
                    batch.buffered = 0;
                    return false;
                }
                Ok(false) => {}
                Err(e) => {
                    batch.buffered = 0;
                    let reason = reason_of(&e);
                    self.mark_dead(link, cgen, reason);
                    return false;
                }
            }
            if mode == SendMode::Try {
                // Buffered: the reader flushes it when the socket drains, and the timer
                // judges a stall. Tell them once per pending episode.
                if !was_pending {
                    live.waker.wake();
                    let _ = self.timer.send(TimerCmd::Wake);
                }
                // Counted in `sent` once that flush completes.
                batch.buffered = 0;
                return false;
            }
            let since = live.pending_since.unwrap_or_else(Instant::now);
            let now = Instant::now();
            let left = deadline(since, write_timeout).saturating_duration_since(now);
            // This send's own wait, bounded by the write timeout while the peer waits for
            // our consumer (the hold moves the stall clock on: `reader::run`).
            let own_left = deadline(started, write_timeout).saturating_duration_since(now);
            if (left.is_zero() || own_left.is_zero()) && self.stall_is_ours(live) {
                // The peer waits for our consumer: no stall, and no more waiting either.
                // The output stays in flight; the reader flushes it once it reads again,
                // and the timer judges it then: told by the send that waited (review of
                // 20cb2ad: with the heartbeat off nobody told it, and a peer that then
                // took nothing was never declared stalled), not by every send that
                // returns at once after it (review of 66a18a6: the timer then spun).
                if waited {
                    let _ = self.timer.send(TimerCmd::Wake);
                }
                batch.buffered = 0;
                return true;
            }
            if left.is_zero() {
                log::warn!("connection {cgen}: write stalled for {write_timeout:?}");
                batch.buffered = 0;
                self.mark_dead(link, cgen, DisconnectReason::WriteStalled);
                return false;
            }
            let wait = if own_left.is_zero() {
                left
            } else {
                left.min(own_left)
            };
            let sock = live.sock.clone();
            MutexGuard::unlocked_fair(link, || {
                wait_writable(&sock, wait);
            });
            waited = true;
        }
    }

    /// Acked delivery, called by the timer under the lock: writes again the messages
    /// whose ack is overdue (in order, without waiting: what does not fit waits for the
    /// next round). Returns when to look again.
    pub(crate) fn resend_overdue(&self, link: &mut Link, now: Instant) -> Option<Instant> {
        let outbox = link.outbox.as_mut()?;
        let live = link.conn.as_mut().filter(|l| l.takes_data())?;
        if link.flushing_queue {
            // The supervisor is writing the queue; look again shortly.
            return Some(deadline(now, Duration::from_millis(10)));
        }
        let (due, next) = outbox.overdue(now, RESEND_CHUNK);
        if due.is_empty() {
            return next;
        }
        let cgen = live.generation;
        log::debug!(
            "connection {cgen}: {} acks overdue, sending again",
            due.len()
        );
        let mut failed = None;
        // Due messages left unwritten (our buffer full): they go as soon as it drains,
        // not a whole ack timeout later.
        let mut left = false;
        for (seq, m) in due {
            match live.write_noted(Some(&mut *outbox), m, Some(seq)) {
                Ok(Written::Buffered) => {}
                Ok(Written::Full(_)) => {
                    left = true;
                    break;
                }
                Err(e) => {
                    failed = Some(reason_of(&e));
                    break;
                }
            }
        }
        if failed.is_none() {
            match live.try_flush() {
                Ok(true) => {}
                Ok(false) => live.waker.wake(),
                Err(e) => failed = Some(reason_of(&e)),
            }
        }
        if let Some(reason) = failed {
            self.mark_dead(link, cgen, reason);
            return None;
        }
        if left {
            // What is due waits for room anyway (also past the chunk: `next == now`).
            return Some(deadline(now, RESEND_RETRY));
        }
        let again = deadline(now, outbox_timeout(link));
        Some(next.map_or(again, |n| n.min(again)))
    }

    /// Shuts the socket of `live` down so its reader wakes; used by teardown.
    pub(crate) fn shutdown_socket(sock: &TcpStream) {
        let _ = sock.shutdown(Shutdown::Both);
    }
}
