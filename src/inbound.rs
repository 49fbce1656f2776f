//! The inbound hand-off: events from the client's threads to the user, in batches, with
//! a bound on the messages waiting for the consumer.
//!
//! # Why batches
//! One channel operation and one possible wake-up per message cost more than reading the
//! message (issue 11: ~70 ns of channel ops and up to 65 ns of wake-up per 64 B message).
//! The reader therefore sends everything one drain produced (at most `read_budget`
//! messages) as one [`Batch`]: one channel send, at most one wake-up. [`Events`] unpacks
//! batches so the user still reads events one by one. Control events (`Connected`,
//! `Disconnected`, ...) travel as batches of one through [`EventTx::send`].
//!
//! # Why bounded, and how
//! A consumer slower than the server would otherwise keep every inbound message in memory.
//! The bound counts text/binary messages and their payload bytes between the reader and
//! the consumer (`event_capacity`). When either count reaches its limit the reader stops
//! reading the socket (TCP then pushes back on the server: nothing is dropped) and waits
//! in `poll(2)` without any lock until the consumer took enough out, then reads on. The
//! reader checks before each drain, so the bound may be passed by one drain (at most
//! `read_budget` messages and 256 KiB read, or one message of any allowed size).
//! Control events are never held back: they are rare, and the supervisor and the timer
//! must never wait for the user (past `CONTROL_EVENT_CAP` unread, empty connections are
//! left out instead). To reach a connection's end (the peer hung up, or our close frame
//! is out) the reader reads on past the bound, keeping up to twice it and dropping the
//! messages past that (`reader::Take::Drop`).
//!
//! While the reader is held back the heartbeat cannot see replies; unread input proves
//! the peer alive instead (see [`Inbound::held_back`] and the heartbeat notes).
//!
//! # Consumers that read
//! A hand-off to another thread costs a wake-up, and on a small machine the reader, the
//! consumer and the server fight for the same cores (issue 11: 0.6x of raw tungstenite at
//! 64 B). So a consumer waiting in [`Events::recv`] (and `recv_timeout`, `recv_deadline`,
//! iteration) with nothing buffered reads the socket itself, on its own thread, through
//! a [`Drive`] (the read path in `reader.rs`): it takes the link lock without waiting
//! (`try_lock`), only while the bound has room (a full bound pauses reading for every
//! consumer alike), and only when the channel is empty, because the reader sends each batch
//! *before* it lets the lock go: whatever the reader read earlier is already in the
//! channel and comes first. One order, whoever reads.
//! The reader leaves ready input to such a consumer (`Inbound::consumer_reads`): while a
//! consumer waits in `recv` and has read since the reader last looked, the reader waits
//! a while (1 ms, doubling while the consumer goes on reading, at most 50 ms or a quarter
//! of the heartbeat timeout) and looks again. A consumer busy with what it got stops
//! reading, so within two such waits the reader reads again (heartbeat replies, pings and the
//! close handshake never wait for the user); a consumer that parks on the channel wakes
//! the reader at once. `try_recv` and [`Events::receiver`] never read the socket, nor does
//! any consumer of a client whose reads run user code (`reader::driver`).
//!
//! When nothing is ready (and spinning, if any, got nothing), such a consumer waits in
//! `poll` on the socket itself and on a waker of its own (`Inbound::consumer_waker`),
//! then reads: one wake-up from the kernel, as for raw tungstenite blocking in `read`,
//! where parking on the channel costs two (the reader's, then the consumer's; issue 11:
//! echo round trips over TLS with 16 KiB took 1.16-1.21x of raw that way, 1.09-1.10x
//! this way). Everything sent on the channel wakes it (`wake_consumer`, a Dekker pair of
//! fences with `begin_socket_wait`), and so do the end of the stream and input the reader
//! left above the socket with nothing sent (`wake_for_input_left`); a teardown shuts
//! the socket down, which ends the wait. One consumer waits so at a time (others of the
//! same client park on the channel), and only on a live connection with the lock free:
//! otherwise it parks on the channel as before.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{
    Receiver, RecvError, RecvTimeoutError, SendError, Sender, TryRecvError, bounded,
};
use parking_lot::{Condvar, Mutex};

use crate::config::DEFAULT_EVENT_SPIN;
use crate::transport::sys::Waker;
use crate::{Event, Message};

/// Unread control events (`Connected`, `Disconnected`, `Reconnecting`, ...) past which a
/// client leaves out of the event stream the connections that carry nothing for the
/// consumer: their `Connected` / `Disconnected` pair, and `Reconnecting` and
/// `HeartbeatMissed` (counted in [`Stats::events_elided`](crate::Stats::events_elided)).
/// A consumer that never reads would otherwise have a client flapping for days hold
/// every one of them; the grammar is kept (generation numbers then have gaps). About
/// 165 bytes each. The `Connected` of the open connection is held back, not left out:
/// it goes out with the first event of that connection, or once the consumer has
/// caught up (fewer than half the cap unread), whichever comes first.
pub const CONTROL_EVENT_CAP: usize = 4096;

/// How often a wait on the client's events made on its own supervisor thread looks whether
/// the client is closing (see `Events::wait_on_supervisor`).
const SUPERVISOR_LOOK: Duration = Duration::from_millis(10);

/// Emptied batch buffers kept for the reader (so it does not allocate one per drain).
const SPARE_BUFFERS: usize = 8;

/// Values of [`Inbound::held`].
const FREE: u8 = 0;
const HELD: u8 = 1;
const HELD_WITH_INPUT: u8 = 2;

/// Events handed over in one channel operation. Iterate it to get the events in order.
///
/// You only meet a `Batch` when you wait on [`Events::receiver`] yourself (in
/// `crossbeam_channel::select!`); [`Events::recv`] and friends unpack batches for you.
pub struct Batch {
    // Either the messages of one drain of the socket, or one control event. Messages
    // travel as `Message`s (56 bytes) and become `Event::Message` (96 bytes) only on the
    // consumer's thread: less memory crosses between the threads per message.
    messages: VecDeque<Message>,
    control: Option<Event>,
    /// Messages and payload bytes counted against the bound; released on unpack or drop.
    msgs: usize,
    bytes: usize,
    /// Messages (and payload bytes) handed back in `control` (`Undelivered`,
    /// `Unconfirmed`), counted in `Inbound::handed` until unpacked or dropped.
    handed: usize,
    handed_bytes: usize,
    /// A control event (counted in `Inbound::control` until unpacked or dropped).
    is_control: bool,
    inbound: Option<Arc<Inbound>>,
}

impl Batch {
    /// Number of events in the batch.
    pub fn len(&self) -> usize {
        self.messages.len() + usize::from(self.control.is_some())
    }

    /// Whether the batch is empty (never the case for a batch taken from the channel).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&mut self) {
        if let Some(inbound) = self.inbound.take() {
            inbound.note_progress();
            if self.is_control {
                inbound.control.fetch_sub(1, Ordering::SeqCst);
                if inbound.caught_up() {
                    // The consumer caught up with a connection's `Connected` held back:
                    // the reader lets it go (see `EventSink::release_held`).
                    inbound.wake_reader();
                }
                inbound.handed.fetch_sub(self.handed, Ordering::SeqCst);
                inbound
                    .handed_bytes
                    .fetch_sub(self.handed_bytes, Ordering::SeqCst);
            } else {
                inbound.release(self.msgs, self.bytes);
            }
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        list.entries(self.control.iter());
        for m in &self.messages {
            list.entry(&format_args!("Message({m:?})"));
        }
        list.finish()
    }
}

impl IntoIterator for Batch {
    type Item = Event;
    type IntoIter = BatchIter;
    /// The events in order; the room they took in the bound goes back to the reader now.
    fn into_iter(mut self) -> BatchIter {
        let inbound = self.inbound.clone();
        self.release();
        BatchIter {
            inbound,
            control: self.control.take(),
            messages: std::mem::take(&mut self.messages).into_iter(),
        }
    }
}

/// The events of a [`Batch`], in order (from [`Batch::into_iter`]).
pub struct BatchIter {
    inbound: Option<Arc<Inbound>>,
    control: Option<Event>,
    messages: std::collections::vec_deque::IntoIter<Message>,
}

impl Iterator for BatchIter {
    type Item = Event;
    #[inline]
    fn next(&mut self) -> Option<Event> {
        let ev = match self.control.take() {
            Some(ev) => Some(ev),
            None => self.messages.next().map(Event::Message),
        };
        if ev.is_some()
            && let Some(inbound) = &self.inbound
        {
            inbound.note_progress();
        }
        ev
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.messages.len() + usize::from(self.control.is_some());
        (n, Some(n))
    }
}

impl ExactSizeIterator for BatchIter {}

impl fmt::Debug for BatchIter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchIter")
            .field("control", &self.control)
            .field("messages", &self.messages)
            .finish()
    }
}

/// A value on a cache line of its own (128 bytes: adjacent-line prefetch pairs lines),
/// so that writes to its neighbours do not make its writer wait.
#[repr(align(128))]
struct Alone<T>(T);

/// Shared by the reader, the consumer ([`Events`]) and `stats()`: the bound, what waits,
/// and how the reader is woken when room is made.
pub(crate) struct Inbound {
    max_msgs: usize,
    max_bytes: usize,
    stall_timeout: Duration,
    msgs: AtomicUsize,
    bytes: AtomicUsize,
    /// The reader is waiting for room: the consumer wakes it once half the room is free.
    waiting: AtomicBool,
    /// The waker of the current connection's reader (its `poll` watches it).
    waker: Mutex<Option<Arc<Waker>>>,
    /// `HELD` while the reader does not read because of the bound; `HELD_WITH_INPUT` when
    /// it also left read input unprocessed in tungstenite's buffer.
    held: AtomicU8,
    /// Since when the reader is held back (for `stats()`); `None` while it reads.
    held_since: Mutex<Option<Instant>>,
    /// The consumer took an event (or a batch) since the reader last looked: its
    /// progress while the reader is held back. Set for every event taken, so on a cache
    /// line of its own: the reader touches it once per look, not per event.
    took: Alone<AtomicBool>,
    /// While held back: since when the consumer took nothing, as far as the reader's
    /// looks tell. Only the reader uses it.
    idle_since: Mutex<Instant>,
    /// This hold was reported as a stall (once per hold).
    stall_reported: AtomicBool,
    stalls: AtomicU64,
    /// Emptied batch buffers going back to the reader.
    spare_tx: Sender<VecDeque<Message>>,
    spare_rx: Receiver<VecDeque<Message>>,
    /// Longest spin of a consumer waiting for events (`ClientBuilder::event_spin`).
    spin: Duration,
    /// A consumer reads the socket for itself (see "Consumers that read"): set when it
    /// starts waiting in `recv`, cleared when it parks.
    driving: AtomicBool,
    /// Reads of the socket made by consumers, so the reader sees whether they go on.
    drives: AtomicU64,
    /// The reader holds back for a consumer that reads: a consumer that parks wakes it.
    deferring: AtomicBool,
    /// A consumer's read left output unflushed: the reader must watch for writability.
    flush_wanted: AtomicBool,
    /// A consumer's read stopped early (read budget, waiting senders) with whole messages
    /// left in tungstenite's (or the TLS layer's) buffer, which the reader's `poll` cannot
    /// see: the reader takes it as "more to read" (and defers to that consumer while it
    /// keeps reading). Set by a consumer or by the reader (a read of its that stopped
    /// early), cleared by a read that reached the socket's end; a waiting consumer looks
    /// at it before it waits (`wait_on_socket`).
    input_left: AtomicBool,
    /// A consumer waits in `poll` on the socket and `consumer_waker` (see "Consumers that
    /// read"): every event sent, the end of the stream, and input the reader left above
    /// the socket without sending anything (`wake_for_input_left`) wake it.
    socket_waiter: AtomicBool,
    /// Wakes that consumer. Made with the first `Events` that may read; `None` if it
    /// could not be made (consumers then park on the channel).
    consumer_waker: OnceLock<Option<Waker>>,
    /// Set before each write of `consumer_waker`, cleared before each drain: a consumer
    /// about to wait drains the waker only when it is set, saving a system call per wait.
    /// A clear flag does not prove the waker empty (a wake may land between a drain and
    /// the clear that preceded it): such a stale wake-up costs one spurious turn.
    consumer_woken: AtomicBool,
    /// Messages handed back in events the consumer has not taken yet, and their payload
    /// bytes (see [`Inbound::handed_back`]).
    handed: AtomicUsize,
    handed_bytes: AtomicUsize,
    /// Our close frame is out on the current connection: its reader reads on to the
    /// peer's reply whatever the bound (see [`Inbound::read_to_end`]).
    to_end: AtomicBool,
    /// Control events the consumer has not taken yet (see [`CONTROL_EVENT_CAP`]).
    control: AtomicUsize,
    /// Control events left out because that many were unread (`Stats::events_elided`).
    elided: AtomicU64,
    /// Messages dropped reading on to a connection's end (`Stats::inbound_dropped`).
    dropped: AtomicU64,
    /// The event sink holds a `Connected` back (see `EventSink::emit`): read without
    /// the grammar lock by a consumer about to read the socket, and by one that takes a
    /// control event (to have it let go once the consumer has caught up).
    holding: AtomicBool,
    /// The first elision was logged.
    elision_logged: AtomicBool,
    /// The client's supervisor thread (see [`Events::wait_on_supervisor`]).
    supervisor: OnceLock<std::thread::ThreadId>,
    /// `close()` has begun.
    closing: AtomicBool,
}

impl Inbound {
    pub(crate) fn new(max_msgs: usize, max_bytes: usize, stall_timeout: Duration) -> Inbound {
        let (spare_tx, spare_rx) = bounded(SPARE_BUFFERS);
        Inbound {
            max_msgs: max_msgs.max(1),
            max_bytes: max_bytes.max(1),
            stall_timeout,
            msgs: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            waker: Mutex::new(None),
            held: AtomicU8::new(FREE),
            held_since: Mutex::new(None),
            took: Alone(AtomicBool::new(false)),
            idle_since: Mutex::new(Instant::now()),
            stall_reported: AtomicBool::new(false),
            stalls: AtomicU64::new(0),
            spare_tx,
            spare_rx,
            spin: DEFAULT_EVENT_SPIN,
            driving: AtomicBool::new(false),
            drives: AtomicU64::new(0),
            deferring: AtomicBool::new(false),
            flush_wanted: AtomicBool::new(false),
            input_left: AtomicBool::new(false),
            socket_waiter: AtomicBool::new(false),
            consumer_waker: OnceLock::new(),
            consumer_woken: AtomicBool::new(false),
            handed: AtomicUsize::new(0),
            handed_bytes: AtomicUsize::new(0),
            to_end: AtomicBool::new(false),
            control: AtomicUsize::new(0),
            elided: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            holding: AtomicBool::new(false),
            elision_logged: AtomicBool::new(false),
            supervisor: OnceLock::new(),
            closing: AtomicBool::new(false),
        }
    }

    /// How long a consumer may spin before it parks (see [`Events`]); zero: never.
    pub(crate) fn with_spin(mut self, spin: Duration) -> Inbound {
        self.spin = spin;
        self
    }

    /// The bound is reached: the reader must not read.
    pub(crate) fn is_full(&self) -> bool {
        self.holds(1)
    }

    /// Whether `times` the bound (messages or bytes) waits for the consumer.
    fn holds(&self, times: usize) -> bool {
        self.msgs.load(Ordering::SeqCst) >= self.max_msgs.saturating_mul(times)
            || self.bytes.load(Ordering::SeqCst) >= self.max_bytes.saturating_mul(times)
    }

    /// Messages and payload bytes waiting for the consumer.
    pub(crate) fn queued(&self) -> (usize, usize) {
        (
            self.msgs.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn release(&self, msgs: usize, bytes: usize) {
        let m = self.msgs.fetch_sub(msgs, Ordering::SeqCst) - msgs;
        let b = self.bytes.fetch_sub(bytes, Ordering::SeqCst) - bytes;
        // Wake a waiting reader once half the room is free, not per batch taken.
        if self.waiting.load(Ordering::SeqCst)
            && m <= self.max_msgs / 2
            && b <= self.max_bytes / 2
            && self.waiting.swap(false, Ordering::SeqCst)
        {
            self.wake_reader();
        }
    }

    /// A buffer for the reader's next batch.
    pub(crate) fn buffer(&self, capacity: usize) -> VecDeque<Message> {
        self.spare_rx
            .try_recv()
            .unwrap_or_else(|_| VecDeque::with_capacity(capacity))
    }

    fn recycle(&self, buf: VecDeque<Message>) {
        // Small buffers are not worth keeping.
        if buf.capacity() >= 16 {
            let _ = self.spare_tx.try_send(buf);
        }
    }

    /// Set by the reader of a new connection (its `poll` watches this waker).
    pub(crate) fn attach(&self, waker: Arc<Waker>) {
        *self.waker.lock() = Some(waker);
    }

    /// A new connection is published (before its reader starts, under the link lock):
    /// the last one's `read_to_end` no longer applies. Cleared here, not by the reader:
    /// a close made before that reader started must not be forgotten.
    pub(crate) fn new_connection(&self) {
        self.to_end.store(false, Ordering::SeqCst);
    }

    /// Our close frame is out (close, `reconnect_now`, `restart`): the current reader
    /// reads on to the peer's reply, past the bound, rather than make the close wait
    /// for its timeout behind a consumer that is behind. The caller wakes the reader.
    pub(crate) fn read_to_end(&self) {
        self.to_end.store(true, Ordering::SeqCst);
    }

    /// Whether the reader reads on to the end of the connection (see `read_to_end`).
    pub(crate) fn reading_to_end(&self) -> bool {
        self.to_end.load(Ordering::SeqCst)
    }

    /// Whether twice the bound waits for the consumer: reading on to a connection's end
    /// (the peer hung up, or our close is out), the reader drops the data it reads past
    /// this, so that end costs no more memory than the bound again.
    pub(crate) fn over_twice_the_bound(&self) -> bool {
        self.holds(2)
    }

    /// The reader ended.
    pub(crate) fn detach(&self) {
        self.waiting.store(false, Ordering::SeqCst);
        self.set_free();
        *self.waker.lock() = None;
    }

    /// The reader is about to wait for room. Returns false when room was made meanwhile
    /// (then it must not wait). `input` = read input is left unprocessed.
    pub(crate) fn hold(&self, input: bool) -> bool {
        self.waiting.store(true, Ordering::SeqCst);
        if !self.is_full() {
            self.waiting.store(false, Ordering::SeqCst);
            return false;
        }
        let held = if input { HELD_WITH_INPUT } else { HELD };
        // Only when the hold begins: the input left then is counted once (see
        // `held_back`), not again at each of the reader's turns while held.
        if self
            .held
            .compare_exchange(FREE, held, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let now = Instant::now();
            *self.held_since.lock() = Some(now);
            *self.idle_since.lock() = now;
            self.stall_reported.store(false, Ordering::Relaxed);
        }
        true
    }

    /// The reader reads again.
    pub(crate) fn set_free(&self) {
        if self.held.swap(FREE, Ordering::SeqCst) != FREE {
            *self.held_since.lock() = None;
        }
    }

    /// Called by the held-back reader before each wait for room: reports the consumer as
    /// stalled once it took nothing off the channel for the stall timeout (once per
    /// hold), and returns how long the reader may wait before it must look again
    /// (`None`: no limit, the hold is reported or not held). A consumer that takes
    /// events, however slowly, is behind but not stalled: the reader looks at its
    /// progress every quarter of the timeout, so a stall is reported between the timeout
    /// and 1.25 times it after the later of the hold's start and the consumer's last
    /// take (`poll` counts whole milliseconds, so a little more for timeouts under 4 ms),
    /// never earlier. A wait that ends
    /// at the deadline comes back here and reports; so does any other wake-up past it (a
    /// flush request, a waker), whatever the timeout, zero included.
    pub(crate) fn stall_wait(&self) -> Option<Duration> {
        self.held_since.lock().as_ref()?;
        if self.stall_reported.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let mut idle = self.idle_since.lock();
        if self.took.0.swap(false, Ordering::Relaxed) {
            // It took something since the last look (at most a look ago).
            *idle = now;
        }
        let due = crate::time::deadline(*idle, self.stall_timeout);
        let left = due.saturating_duration_since(now);
        if left.is_zero() {
            self.stall_reported.store(true, Ordering::Relaxed);
            self.report_stall();
            return None;
        }
        Some(left.min(self.stall_timeout / 4))
    }

    /// The consumer took an event (see `took`). Looked at first, stored only when clear:
    /// consumers on several threads then do not pass the line between them per event.
    #[inline]
    fn note_progress(&self) {
        if !self.took.0.load(Ordering::Relaxed) {
            self.took.0.store(true, Ordering::Relaxed);
        }
    }

    /// Reports a consumer that took no event for longer than the stall timeout while the
    /// reader waited for room.
    fn report_stall(&self) {
        self.stalls.fetch_add(1, Ordering::Relaxed);
        let (m, b) = self.queued();
        log::warn!(
            "the event consumer has taken no event for {:?} or more: {m} messages ({b} \
             bytes) wait; reading from the server is paused until it takes half of them",
            self.stall_timeout
        );
    }

    /// Whether the reader is held back by the bound (`None`: it reads freely), and
    /// whether it left read input unprocessed when the hold began, not yet counted: that
    /// input proves the peer alive at the hold's start, once. Counted again and again, it
    /// would keep a peer that died meanwhile alive for as long as the hold lasts.
    pub(crate) fn held_back(&self) -> Option<bool> {
        match self.held.load(Ordering::SeqCst) {
            FREE => None,
            HELD => Some(false),
            _ => Some(
                self.held
                    .compare_exchange(HELD_WITH_INPUT, HELD, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok(),
            ),
        }
    }

    /// Whether the reader is held back by the bound now (an atomic load: no lock, so
    /// also under `link`; [`held_back`](Self::held_back) without its side effect).
    pub(crate) fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst) != FREE
    }

    /// Since when the reader is held back, if it is.
    pub(crate) fn held_since(&self) -> Option<Instant> {
        *self.held_since.lock()
    }

    /// Consumer stalls reported so far.
    pub(crate) fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// Wakes the attached reader out of `poll`, if any.
    fn wake_reader(&self) {
        if let Some(w) = self.waker.lock().as_ref() {
            w.wake();
        }
    }

    /// Whether a reader thread is attached (test hook: the reader detaches when it ends).
    #[cfg(test)]
    pub(crate) fn reader_attached(&self) -> bool {
        self.waker.lock().is_some()
    }

    /// A consumer starts waiting for events, reading the socket itself when it can.
    #[inline]
    fn begin_drive(&self) {
        if !self.driving.load(Ordering::Relaxed) {
            self.driving.store(true, Ordering::SeqCst);
        }
    }

    /// A consumer parks, or the client closes: the reader must read again, now (not
    /// after its deferral ends).
    pub(crate) fn end_drive(&self) {
        self.driving.store(false, Ordering::SeqCst);
        if self.deferring.load(Ordering::SeqCst) {
            self.wake_reader();
        }
    }

    /// A consumer read the socket (called under the link lock, by the `Drive`).
    pub(crate) fn note_drive(&self) {
        self.drives.fetch_add(1, Ordering::Relaxed);
    }

    /// Called by the reader when input is ready: whether a consumer read the socket since
    /// the reader last looked (`seen`) and still waits in `recv`. Then the reader leaves
    /// the input to it and waits (see [`reader_resumes`](Self::reader_resumes)); a consumer
    /// that parks wakes it.
    pub(crate) fn consumer_reads(&self, seen: &mut u64) -> bool {
        self.deferring.store(true, Ordering::SeqCst);
        let drives = self.drives.load(Ordering::Relaxed);
        if self.driving.load(Ordering::SeqCst) && drives != *seen {
            *seen = drives;
            return true;
        }
        self.deferring.store(false, Ordering::SeqCst);
        false
    }

    /// The reader stops deferring to the consumer.
    pub(crate) fn reader_resumes(&self) {
        self.deferring.store(false, Ordering::SeqCst);
    }

    /// A consumer's read stopped with input left in the buffers above the socket, where
    /// the reader's `poll` cannot see it. Whatever that consumer does next (reads again,
    /// parks, turns to `select!`, drops its `Events`), the reader must know: it reads it
    /// unless the consumer keeps reading (`consumer_reads`). A reader that defers looks
    /// again within `DEFER` anyway; one asleep in `poll` is woken. Never called under the
    /// link lock (the waker's lock is a leaf).
    pub(crate) fn note_input_left(&self) {
        if !self.input_left.swap(true, Ordering::SeqCst) && !self.deferring.load(Ordering::SeqCst) {
            self.wake_reader();
        }
    }

    /// Messages dropped so far reading on to a connection's end with twice the bound
    /// waiting (see `reader::Take::Drop`).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether a consumer far behind (a `Connected` held back) has caught up: fewer than
    /// half of `CONTROL_EVENT_CAP` control events unread.
    #[inline]
    pub(crate) fn caught_up(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
            && self.control.load(Ordering::SeqCst) < CONTROL_EVENT_CAP / 2
    }

    /// A held `Connected` goes out after all: it was counted as left out.
    fn unheld(&self) {
        self.elided.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts `n` more of those.
    pub(crate) fn note_dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Control events left out so far because the consumer left `CONTROL_EVENT_CAP`
    /// unread (see [`EventSink::emit`]).
    pub(crate) fn elided(&self) -> u64 {
        self.elided.load(Ordering::Relaxed)
    }

    /// Messages handed back (`Undelivered`, `Unconfirmed`) in events the consumer has
    /// not taken yet, and their payload bytes: the client's senders bound them (see
    /// `Shared::handed_back_full`), as nothing else would while nobody reads events.
    pub(crate) fn handed_back(&self) -> (usize, usize) {
        (
            self.handed.load(Ordering::SeqCst),
            self.handed_bytes.load(Ordering::SeqCst),
        )
    }

    /// Whether a consumer left input above the socket.
    pub(crate) fn input_left(&self) -> bool {
        self.input_left.load(Ordering::SeqCst)
    }

    /// What the last read of the socket (under the link lock, by the reader or a
    /// consumer) left: whole messages above the socket, or nothing there. Called under
    /// that lock, so a later read's call (or `note_input_left`) comes after this one.
    /// The reader's own record: nobody is woken here (the reader's `hand_over` wakes a
    /// waiting consumer after the lock, `wake_for_input_left`).
    pub(crate) fn set_input_left(&self, left: bool) {
        if self.input_left.load(Ordering::Relaxed) != left {
            self.input_left.store(left, Ordering::SeqCst);
        }
    }

    /// Reads made by consumers so far (the reader's starting point for `consumer_reads`).
    pub(crate) fn drives(&self) -> u64 {
        self.drives.load(Ordering::Relaxed)
    }

    /// A consumer's read left output unflushed: the reader watches for writability.
    /// Never called under the link lock (the waker's lock is a leaf).
    pub(crate) fn want_flush(&self) {
        self.flush_wanted.store(true, Ordering::SeqCst);
        self.wake_reader();
    }

    /// Whether a consumer asked the reader to flush (clears the request).
    pub(crate) fn take_flush_wanted(&self) -> bool {
        take_flag(&self.flush_wanted)
    }

    /// The waker of a consumer waiting on the socket, made on first use (two
    /// descriptors per client).
    fn consumer_waker(&self) -> Option<&Waker> {
        self.consumer_waker
            .get_or_init(|| match Waker::new() {
                Ok(w) => Some(w),
                Err(e) => {
                    log::debug!("no waker for consumers ({e}): they park on the channel");
                    None
                }
            })
            .as_ref()
    }

    /// Makes the calling consumer the one that waits on the socket; false if another
    /// does already (this one parks on the channel).
    fn begin_socket_wait(&self) -> bool {
        let mine = self
            .socket_waiter
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        // Pairs with the fence in `wake_consumer`: either that sender sees the flag, or
        // the channel look that follows sees its event.
        fence(Ordering::SeqCst);
        mine
    }

    /// Whether a consumer waits on the socket.
    #[cfg(test)]
    pub(crate) fn waits_on_socket(&self) -> bool {
        self.socket_waiter.load(Ordering::SeqCst)
    }

    fn end_socket_wait(&self) {
        self.socket_waiter.store(false, Ordering::SeqCst);
    }

    /// Called after every event sent, and when the stream ends: wakes a consumer waiting
    /// on the socket.
    fn wake_consumer(&self) {
        fence(Ordering::SeqCst);
        if self.socket_waiter.load(Ordering::SeqCst)
            && let Some(Some(w)) = self.consumer_waker.get()
        {
            self.consumer_woken.store(true, Ordering::SeqCst);
            w.wake();
        }
    }

    /// The reader left whole messages above the socket and handed nothing over (its
    /// read stopped after pings or pongs): a consumer waiting on the socket would not
    /// see them there (they would wait for the reader's next look, after one deferral
    /// to that consumer, about 1 ms), so it is woken to read them. Called after the link
    /// lock is let go, after `set_input_left(true)`; pairs with the look in
    /// `wait_on_socket`.
    pub(crate) fn wake_for_input_left(&self) {
        self.wake_consumer();
    }

    /// Empties the consumer waker of wake-ups already seen (or stale).
    fn drain_consumer_waker(&self, waker: &Waker) {
        self.consumer_woken.store(false, Ordering::SeqCst);
        waker.drain();
    }
}

/// Ends a consumer's wait on the socket however `wait_on_socket` returns.
struct SocketWait<'a>(&'a Inbound);

impl Drop for SocketWait<'_> {
    fn drop(&mut self) {
        self.0.end_socket_wait();
    }
}

/// Clears `flag` and says whether it was set (a plain load first: the reader looks at
/// these flags on every turn, and they are rarely set).
fn take_flag(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::SeqCst)
}

/// A consumer's way to read the socket itself (implemented by the read path, `reader.rs`,
/// which sits above this module). See "Consumers that read" in the module docs.
pub(crate) trait Drive: Send + Sync {
    /// Reads, without waiting, the messages ready on the current connection into `out`
    /// (empty), unless the link lock is taken or `pending` holds events: those were read
    /// earlier and come first. `None`: it did not read (lock taken, events pending, no
    /// live connection). Else whether it stopped early (read budget, a waiting sender,
    /// a nearly full read buffer) with input left above the socket, where `poll` cannot
    /// see it: `out` may then be empty although more is ready (the read got only control
    /// frames).
    fn drive(&self, pending: &Receiver<Batch>, out: &mut VecDeque<Message>) -> Option<bool>;

    /// Waits until the current connection's socket is readable (or hung up), `waker` is
    /// woken, or `deadline` passes (`None`: no time limit). `None` at once when it
    /// cannot (lock taken, no live connection): the caller parks on the channel. Else
    /// whether `waker` was woken.
    fn wait_input(&self, waker: &Waker, deadline: Option<Instant>) -> Option<bool>;
}

/// The sending side: owned by the client's shared state.
pub(crate) struct EventTx {
    tx: Sender<Batch>,
    inbound: Arc<Inbound>,
    // Dropped after `tx` (fields drop in order): a consumer waiting on the socket wakes
    // to a closed channel.
    _end: EndOfStream,
}

/// Wakes a consumer waiting on the socket when the event stream ends.
struct EndOfStream(Arc<Inbound>);

impl Drop for EndOfStream {
    fn drop(&mut self) {
        self.0.wake_consumer();
    }
}

impl EventTx {
    pub(crate) fn new(inbound: Arc<Inbound>) -> (EventTx, Receiver<Batch>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let end = EndOfStream(inbound.clone());
        (
            EventTx {
                tx,
                inbound,
                _end: end,
            },
            rx,
        )
    }

    pub(crate) fn inbound(&self) -> &Arc<Inbound> {
        &self.inbound
    }

    /// Sends one control event. Unbounded: never blocks, fine under the lock. Fails only
    /// when every receiver is gone.
    pub(crate) fn send(&self, ev: Event) -> Result<(), SendError<Event>> {
        let (handed, handed_bytes) = match &ev {
            Event::Undelivered(v) | Event::Unconfirmed { messages: v, .. } => {
                (v.len(), v.iter().map(crate::queue::payload_len).sum())
            }
            _ => (0, 0),
        };
        self.inbound.control.fetch_add(1, Ordering::SeqCst);
        if handed > 0 {
            self.inbound.handed.fetch_add(handed, Ordering::SeqCst);
            self.inbound
                .handed_bytes
                .fetch_add(handed_bytes, Ordering::SeqCst);
        }
        let batch = Batch {
            messages: VecDeque::new(),
            control: Some(ev),
            msgs: 0,
            bytes: 0,
            handed,
            handed_bytes,
            is_control: true,
            inbound: Some(self.inbound.clone()),
        };
        let sent = self
            .tx
            .send(batch)
            .map_err(|SendError(mut b)| SendError(b.control.take().expect("a control event")));
        self.inbound.wake_consumer();
        sent
    }

    /// Sends the messages of one drain (`msgs` text/binary messages of `bytes` payload
    /// bytes among `messages`), counted against the bound until the consumer takes them.
    /// Empties `messages` (its buffer may go back to the reader through the consumer).
    pub(crate) fn send_messages(
        &self,
        messages: &mut VecDeque<Message>,
        msgs: usize,
        bytes: usize,
    ) {
        self.inbound.msgs.fetch_add(msgs, Ordering::SeqCst);
        self.inbound.bytes.fetch_add(bytes, Ordering::SeqCst);
        let batch = Batch {
            messages: std::mem::replace(messages, self.inbound.buffer(messages.capacity())),
            control: None,
            msgs,
            bytes,
            handed: 0,
            handed_bytes: 0,
            is_control: false,
            inbound: Some(self.inbound.clone()),
        };
        // No receiver left: the batch is dropped, which releases its room.
        let _ = self.tx.send(batch);
        self.inbound.wake_consumer();
    }
}

/// The events of a client, in order. From [`Client::events`](crate::Client::events).
///
/// Read them one by one with [`recv`](Events::recv), [`recv_timeout`](Events::recv_timeout),
/// [`try_recv`](Events::try_recv) or by iterating. Every `Events` of a client shares one
/// stream: each event goes to one of them. Inbound messages are handed over in batches
/// (one channel operation per read of the socket, not per message); an `Events` keeps
/// the rest of a batch it took and hands it out first.
///
/// A thread waiting in `recv`, `recv_timeout`, `recv_deadline` or a blocking iterator
/// with nothing left to hand out reads the socket itself (the client's reader thread
/// then leaves it the input), and when nothing is ready it waits on the socket: a
/// consumer gets its messages with no hand-off between threads. The order is the same
/// whoever reads. A client whose reads run your code (a
/// [`Heartbeat::app`](crate::Heartbeat::app) reply matcher, the [`Acks`](crate::Acks) id
/// readers) never reads on your thread: that code could wait for a lock you hold across
/// `recv`. `try_recv` and [`receiver`](Events::receiver) never read the socket.
///
/// The stream is bounded ([`ClientBuilder::event_capacity`](crate::ClientBuilder::event_capacity)):
/// while it is full the client stops reading from the server, so read it.
///
/// A reconnect policy, request factory or `on_connect` hook (they run on the client's
/// supervisor thread) may wait on its own client's events, but `close()` joins that
/// thread before it emits `Closed`: there such a wait ends as if the stream had (`recv`
/// gives `RecvError`, iteration stops) once `close()` has begun, after what was already
/// in the stream. Waits on [`receiver`](Events::receiver) do not; use the methods here.
///
/// # Waiting on several clients and channels at once
/// [`receiver`](Events::receiver) is the crossbeam channel underneath: use it in
/// `crossbeam_channel::select!` and iterate the [`Batch`] you get:
///
/// ```
/// use std::time::Duration;
/// use crossbeam_channel::{select, tick};
/// use wsbeat::{Client, Event, Message};
///
/// # let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// # let url = format!("ws://{}/feed", listener.local_addr().unwrap());
/// # std::thread::spawn(move || {
/// #     let mut ws = tungstenite::accept(listener.accept().unwrap().0).unwrap();
/// #     while let Ok(m) = ws.read() {
/// #         if m.is_text() && ws.send(m).is_err() { break }
/// #     }
/// # });
/// let client = Client::builder(&url).connect()?;
/// client.send_text("hi")?;
/// let events = client.events();
/// let ticker = tick(Duration::from_millis(100));
/// 'outer: loop {
///     select! {
///         recv(events.receiver()) -> batch => {
///             for event in batch.expect("events end only after Closed") {
///                 if let Event::Message(Message::Text(t)) = event {
///                     assert_eq!(t.as_str(), "hi");
///                     break 'outer;
///                 }
///             }
///         }
///         recv(ticker) -> _ => { /* periodic work */ }
///     }
/// }
/// let _ = client.close();
/// # Ok::<(), wsbeat::Error>(())
/// ```
/// While events come back to back (the last wait was shorter than
/// [`ClientBuilder::event_spin`](crate::ClientBuilder::event_spin), 50 µs by default, as
/// in a request/response exchange), the `recv` calls first wait by spinning (looking at
/// the socket and the channel, yielding the CPU to any other runnable thread in between)
/// before they sleep (in `poll` on the socket, or parked on the channel): that saves the
/// wake-up of a sleeping thread (10-20 µs on a small machine) on each reply. A wait that
/// spun in vain turns this off until a wait is short again, so a sparse stream costs at
/// most one such spin per lull.
///
/// Events already taken out of a batch by `recv`-style calls on the same `Events` are
/// not in the channel any more: when you mix both styles, empty
/// [`try_recv_buffered`](Events::try_recv_buffered) before you `select!`.
pub struct Events {
    rx: Receiver<Batch>,
    inbound: Arc<Inbound>,
    /// Messages already taken out of a batch.
    buf: RefCell<VecDeque<Message>>,
    /// Whether the last wait for a batch was short: then the next wait spins first.
    spin: Cell<bool>,
    /// Reads the socket for this consumer when nothing waits (`None`: only the reader).
    driver: Option<Arc<dyn Drive>>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("buffered", &self.buf.borrow().len())
            .field("batches", &self.rx.len())
            .finish()
    }
}

impl Drop for Events {
    /// Messages this `Events` took from the stream (the rest of a batch, or what it read
    /// from the socket) but never handed out go with it: never silently.
    fn drop(&mut self) {
        let left = self.buf.get_mut().len();
        if left > 0 {
            log::warn!(
                "{left} inbound messages dropped with the `Events` that had taken them \
                 from the stream; keep one `Events` per consumer instead of a temporary \
                 `client.events()`"
            );
        }
    }
}

impl Clone for Events {
    /// Another reader of the same stream (with its own, empty, batch buffer).
    fn clone(&self) -> Self {
        Events::new(self.rx.clone(), self.inbound.clone(), self.driver.clone())
    }
}

impl Events {
    pub(crate) fn new(
        rx: Receiver<Batch>,
        inbound: Arc<Inbound>,
        driver: Option<Arc<dyn Drive>>,
    ) -> Events {
        if driver.is_some() {
            // Made once per client, here rather than in the first wait: a client's
            // descriptors stay the same from its first `events()` on.
            inbound.consumer_waker();
        }
        Events {
            rx,
            inbound,
            buf: RefCell::new(VecDeque::new()),
            spin: Cell::new(false),
            driver,
        }
    }

    /// The first event of `batch`; the rest (messages) refill the (empty) buffer.
    fn take(&self, mut batch: Batch) -> Event {
        batch.release();
        if let Some(ev) = batch.control.take() {
            return ev;
        }
        let mut messages = std::mem::take(&mut batch.messages);
        let m = messages.pop_front().expect("batches are never empty");
        let mut buf = self.buf.borrow_mut();
        // Keep the fuller buffer; the empty one goes back to the reader.
        let old = std::mem::replace(&mut *buf, messages);
        self.inbound.recycle(old);
        Event::Message(m)
    }

    /// An event already taken out of a batch, if any (never waits, never touches the channel).
    #[inline]
    pub fn try_recv_buffered(&self) -> Option<Event> {
        let m = self.buf.borrow_mut().pop_front()?;
        self.inbound.note_progress();
        Some(Event::Message(m))
    }

    /// Waits for the next event. `Err` once the client closed and every event was read
    /// (after [`Event::Closed`]).
    // The `recv` family is `#[inline]` with the channel wait out of line: most events
    // come from the buffer, and in the caller's crate that is a `pop_front` with no call
    // and no move of the event through two `Result`s (issue 11: hand-off cost per message).
    #[inline]
    pub fn recv(&self) -> Result<Event, RecvError> {
        match self.try_recv_buffered() {
            Some(ev) => Ok(ev),
            None => self.recv_batch(),
        }
    }

    fn recv_batch(&self) -> Result<Event, RecvError> {
        // With no deadline the wait cannot time out.
        self.wait_batch(None).map_err(|_| RecvError)
    }

    /// Waits up to `timeout` for the next event.
    #[inline]
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        match self.try_recv_buffered() {
            Some(ev) => Ok(ev),
            None => self.recv_batch_timeout(timeout),
        }
    }

    fn recv_batch_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        self.wait_batch(Some(crate::time::deadline_in(timeout)))
    }

    /// Waits until `deadline` for the next event.
    #[inline]
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Event, RecvTimeoutError> {
        match self.try_recv_buffered() {
            Some(ev) => Ok(ev),
            None => self.recv_batch_deadline(deadline),
        }
    }

    fn recv_batch_deadline(&self, deadline: Instant) -> Result<Event, RecvTimeoutError> {
        self.wait_batch(Some(deadline))
    }

    /// The next event once the buffer is empty, waiting until `deadline` (`None`: as long
    /// as it takes): a waiting batch, else what the socket has ready (read by this
    /// thread), else spinning when the last wait was short, then waiting on the socket
    /// (or parked on the channel).
    fn wait_batch(&self, deadline: Option<Instant>) -> Result<Event, RecvTimeoutError> {
        let mut read = if self.spin.get() || self.inbound.input_left() || self.driver.is_none() {
            self.poll_once()
        } else {
            // The last wait was long (a reply slower than the spin, a sparse stream) and
            // nothing is known to wait above the socket: the socket is most likely empty
            // too. The channel is looked at, and `poll` tells when the socket has input
            // (one read of an empty socket, and the TLS layer's error path, less per
            // request/response round trip).
            match self.rx.try_recv() {
                Ok(batch) => Read::Got(self.take(batch)),
                Err(_) => Read::Nothing,
            }
        };
        if let Read::Got(ev) = read {
            // A wait that took no time: the next one may spin.
            self.spin.set(true);
            return Ok(ev);
        }
        if self.inbound.supervisor.get() == Some(&std::thread::current().id()) {
            return self.wait_on_supervisor(deadline);
        }
        // The wait starts here: no clock read while events are ready (every drain of a
        // consumer that keeps up comes through `poll_once`).
        let start = Instant::now();
        if let Some(ev) = self.spin(start, deadline, &mut read) {
            return Ok(ev);
        }
        // The socket was just read and nothing was left above it: the wait need not read
        // it again before its first `poll`. Input that the reader (stopping early after
        // pings) leaves above the socket after this look is seen by `wait_on_socket`'s
        // second look, or the reader wakes the wait; another consumer's
        // (`note_input_left`) wakes the reader, which reads it or defers to that one.
        let read_empty = matches!(read, Read::Nothing) && !self.inbound.input_left();
        let ev = match self.wait_on_socket(deadline, read_empty) {
            Some(got) => got?,
            None => self.park(deadline)?,
        };
        self.spin.set(start.elapsed() < self.inbound.spin);
        Ok(ev)
    }

    /// A wait in a callback on the client's own supervisor thread (a reconnect policy,
    /// request factory or `on_connect` hook reading its client's events): `close()`
    /// joins that thread before it emits `Closed`, so once the client is closing such a
    /// wait ends as if the stream had (callback probe: `close()` waited for good for a
    /// policy in `recv()`). It parks on the channel for `SUPERVISOR_LOOK` at a time and
    /// looks at the flag in between.
    fn wait_on_supervisor(&self, deadline: Option<Instant>) -> Result<Event, RecvTimeoutError> {
        if self.driver.is_some() {
            // Parked, this thread reads nothing: the reader must not wait for it.
            self.inbound.end_drive();
        }
        loop {
            match self.rx.try_recv() {
                Ok(batch) => return Ok(self.take(batch)),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            if self.inbound.closing.load(Ordering::SeqCst) {
                return Err(RecvTimeoutError::Disconnected);
            }
            let look = crate::time::deadline_in(SUPERVISOR_LOOK);
            match self
                .rx
                .recv_deadline(deadline.map_or(look, |d| d.min(look)))
            {
                Ok(batch) => return Ok(self.take(batch)),
                Err(RecvTimeoutError::Timeout) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(RecvTimeoutError::Timeout);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RecvTimeoutError::Disconnected);
                }
            }
        }
    }

    /// Waits on the channel alone (the reader thread reads the socket meanwhile).
    fn park(&self, deadline: Option<Instant>) -> Result<Event, RecvTimeoutError> {
        if self.driver.is_some() {
            // Parked, this thread reads nothing: the reader must not wait for it.
            self.inbound.end_drive();
        }
        let batch = match deadline {
            Some(d) => self.rx.recv_deadline(d)?,
            None => self
                .rx
                .recv()
                .map_err(|RecvError| RecvTimeoutError::Disconnected)?,
        };
        Ok(self.take(batch))
    }

    /// Waits for the socket to become readable, then reads it on this thread, as raw
    /// tungstenite would: one wake-up from the kernel, no hand-off from the reader
    /// thread. Every event sent on the channel (and its end) wakes this wait too.
    /// `read_empty`: the caller has just read the socket and found nothing, so the first
    /// look goes to the channel only (one system call less per wait). `None`: this
    /// consumer cannot wait so (no socket to read, the link lock is taken, another
    /// consumer waits on it, no waker): it parks on the channel instead.
    fn wait_on_socket(
        &self,
        deadline: Option<Instant>,
        mut read_empty: bool,
    ) -> Option<Result<Event, RecvTimeoutError>> {
        let driver = self.driver.as_ref()?;
        let waker = self.inbound.consumer_waker()?;
        if !self.inbound.begin_socket_wait() {
            return None;
        }
        let _waiting = SocketWait(&self.inbound);
        if self.inbound.consumer_woken.load(Ordering::SeqCst) {
            // A wake-up meant for an earlier wait may be left.
            self.inbound.drain_consumer_waker(waker);
        }
        // Input left above the socket since the caller's look (the reader stopped early
        // after pings, and a consumer that was not yet waiting got no wake-up): read it
        // now. Pairs with `wake_for_input_left`: this wait is marked (and fenced) before
        // this look, so either the reader's wake-up finds it, or this look finds the input.
        if read_empty && self.inbound.input_left() {
            read_empty = false;
        }
        loop {
            match self.rx.try_recv() {
                Ok(batch) => return Some(Ok(self.take(batch))),
                Err(TryRecvError::Disconnected) => {
                    return Some(Err(RecvTimeoutError::Disconnected));
                }
                Err(TryRecvError::Empty) => {}
            }
            let read = if std::mem::take(&mut read_empty) {
                Read::Nothing
            } else {
                self.read_socket()
            };
            let more = match read {
                Read::Got(ev) => return Some(Ok(ev)),
                Read::Nothing => false,
                Read::More => true,
                Read::Busy => return None,
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // Back to the caller's other work: the reader reads from now on.
                self.inbound.end_drive();
                return Some(Err(RecvTimeoutError::Timeout));
            }
            if more {
                // Input waits above the socket, where `poll` would not see it.
                continue;
            }
            if driver.wait_input(waker, deadline)? {
                self.inbound.drain_consumer_waker(waker);
            }
        }
    }

    /// A waiting batch's first event, else what a read of the socket gave (`Nothing`: it
    /// was read empty, with nothing left above it).
    #[inline]
    fn poll_once(&self) -> Read {
        if let Ok(batch) = self.rx.try_recv() {
            return Read::Got(self.take(batch));
        }
        self.read_socket()
    }

    /// Reads what the socket has ready on this thread (see "Consumers that read" in the
    /// module docs): no hand-off from the reader thread, no wake-up. The buffer is empty
    /// here; it is moved out while the read runs, so no `RefCell` borrow spans the read.
    fn read_socket(&self) -> Read {
        let Some(driver) = self.driver.as_ref() else {
            return Read::Busy;
        };
        // The bound is full with events taken but not yet given up (a `Batch` another
        // consumer keeps): reading is paused for every consumer, as for the reader, not
        // only for those that lose the race for the lock (consumer probe: a second
        // consumer got every message, or none for 10 s, by that race).
        if self.inbound.is_full() {
            return Read::Busy;
        }
        self.inbound.begin_drive();
        let mut buf = std::mem::take(&mut *self.buf.borrow_mut());
        let drove = driver.drive(&self.rx, &mut buf);
        let first = buf.pop_front();
        let mut mine = self.buf.borrow_mut();
        if mine.is_empty() {
            *mine = buf;
        } else {
            mine.extend(buf);
        }
        match (first, drove) {
            (Some(m), _) => {
                // Taken: progress, whoever else holds the bound (a kept `Batch`).
                self.inbound.note_progress();
                Read::Got(Event::Message(m))
            }
            (None, Some(true)) => Read::More,
            (None, Some(false)) => Read::Nothing,
            (None, None) => Read::Busy,
        }
    }

    /// When the last wait was short, waits for an event by spinning (looking at the
    /// channel and the socket, yielding the CPU to anything runnable in between) for up
    /// to the configured spin from `start` (or to `deadline`); `read` becomes the result
    /// of its last read of the socket. `None`: nothing came (spinning is then off until a
    /// wait is short again), or the client is gone (the parked wait that follows reports
    /// it at once).
    fn spin(&self, start: Instant, deadline: Option<Instant>, read: &mut Read) -> Option<Event> {
        if !self.spin.get() {
            return None;
        }
        let end = crate::time::deadline(start, self.inbound.spin);
        let until = deadline.map_or(end, |d| d.min(end));
        loop {
            if Instant::now() >= until {
                self.spin.set(false);
                return None;
            }
            std::thread::yield_now();
            match self.rx.try_recv() {
                Ok(batch) => return Some(self.take(batch)),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            match self.read_socket() {
                Read::Got(ev) => return Some(ev),
                r => *read = r,
            }
        }
    }

    /// The next event if one is ready.
    #[inline]
    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        match self.try_recv_buffered() {
            Some(ev) => Ok(ev),
            None => self.try_recv_batch(),
        }
    }

    fn try_recv_batch(&self) -> Result<Event, TryRecvError> {
        Ok(self.take(self.rx.try_recv()?))
    }

    /// Blocking iterator: ends once the client closed and every event was read (after
    /// [`Event::Closed`], on every `Events` of the client).
    pub fn iter(&self) -> Iter<'_> {
        Iter { events: self }
    }

    /// Iterator over the events ready now.
    pub fn try_iter(&self) -> TryIter<'_> {
        TryIter { events: self }
    }

    /// Whether no event is ready now.
    pub fn is_empty(&self) -> bool {
        self.buf.borrow().is_empty() && self.rx.is_empty()
    }

    /// The channel underneath, for `crossbeam_channel::select!`: it yields [`Batch`]es.
    pub fn receiver(&self) -> &Receiver<Batch> {
        &self.rx
    }
}

/// What a consumer's read of the socket got.
enum Read {
    Got(Event),
    /// Nothing was ready.
    Nothing,
    /// Nothing for the user (control frames only), more input is ready.
    More,
    /// It could not read (no reading for this client, lock taken, events pending, no
    /// live connection).
    Busy,
}

/// Blocking iterator over [`Events`].
#[derive(Debug)]
pub struct Iter<'a> {
    events: &'a Events,
}

impl Iterator for Iter<'_> {
    type Item = Event;
    #[inline]
    fn next(&mut self) -> Option<Event> {
        self.events.recv().ok()
    }
}

/// Non-blocking iterator over [`Events`].
#[derive(Debug)]
pub struct TryIter<'a> {
    events: &'a Events,
}

impl Iterator for TryIter<'_> {
    type Item = Event;
    #[inline]
    fn next(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

/// Owning blocking iterator over [`Events`].
#[derive(Debug)]
pub struct IntoIter {
    events: Events,
}

impl Iterator for IntoIter {
    type Item = Event;
    #[inline]
    fn next(&mut self) -> Option<Event> {
        self.events.recv().ok()
    }
}

impl IntoIterator for Events {
    type Item = Event;
    type IntoIter = IntoIter;
    fn into_iter(self) -> IntoIter {
        IntoIter { events: self }
    }
}

impl<'a> IntoIterator for &'a Events {
    type Item = Event;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The sending end of a client's event stream. Every event goes through
/// [`EventSink::emit`], which keeps the stream in the grammar documented on [`Event`]:
/// nothing after `Closed`, `Closed` once, `GaveUp` once, no `Reconnecting` once closing
/// began. Its lock is a leaf: held only around an unbounded channel send.
pub(crate) struct EventSink {
    inbound: Arc<Inbound>,
    grammar: Mutex<Grammar>,
    /// Signalled when `Closed` is emitted.
    closed: Condvar,
}

struct Grammar {
    /// `close` has begun: no more `Reconnecting`.
    closing: bool,
    gave_up: bool,
    /// The sending end, dropped when `Closed` goes out (so `None`: closed): nothing may
    /// follow it, and every `Events` (also those that did not get `Closed`, and those
    /// taken later) must see the stream end while handles of the client live on.
    tx: Option<EventTx>,
    /// The `Connected` of a connection opened while `CONTROL_EVENT_CAP` control events
    /// were unread: it goes out before the first event of that connection for the
    /// consumer, or, if the connection ends with none, is left out with its
    /// `Disconnected` (see [`EventSink::emit`]).
    held: Option<Event>,
}

impl Grammar {
    /// Whether `ev` may go out now; records it.
    fn admit(&mut self, ev: &Event) -> bool {
        if self.tx.is_none() {
            return false;
        }
        match ev {
            Event::Reconnecting { .. } => !self.closing && !self.gave_up,
            Event::GaveUp(_) => !std::mem::replace(&mut self.gave_up, true),
            _ => true,
        }
    }
}

impl EventSink {
    pub(crate) fn new(tx: EventTx) -> Self {
        EventSink {
            inbound: tx.inbound().clone(),
            grammar: Mutex::new(Grammar {
                closing: false,
                gave_up: false,
                tx: Some(tx),
                held: None,
            }),
            closed: Condvar::new(),
        }
    }

    /// Sends `ev` unless the grammar forbids it now. Never blocks (unbounded channel), so
    /// it may be called with the link lock held.
    pub(crate) fn emit(&self, ev: Event) {
        let mut g = self.grammar.lock();
        if !g.admit(&ev) {
            log::debug!("event dropped by the grammar: {ev:?}");
            return;
        }
        let closed = matches!(ev, Event::Closed);
        let over = self.inbound.control.load(Ordering::SeqCst) >= CONTROL_EVENT_CAP;
        match &ev {
            // Nobody reads: connections that carry nothing for the consumer, and the
            // events between them, are left out.
            Event::Reconnecting { .. } | Event::HeartbeatMissed { .. } if over => {
                return self.elide(1);
            }
            Event::Connected { .. } if over => {
                g.held = Some(ev);
                self.inbound.holding.store(true, Ordering::SeqCst);
                return self.elide(1);
            }
            Event::Disconnected { generation, .. } if matches!(&g.held, Some(Event::Connected { generation: held, .. }) if held == generation) =>
            {
                g.held = None;
                self.inbound.holding.store(false, Ordering::SeqCst);
                return self.elide(1);
            }
            _ => {}
        }
        // The held `Connected` first: this event belongs to its connection, or follows it.
        self.send_held(&mut g);
        if let Some(tx) = g.tx.as_ref() {
            // Fails only when every receiver is gone: nobody to tell.
            let _ = tx.send(ev);
        }
        if closed {
            // The end of the stream: every consumer's `recv` returns `Err` once it read
            // what is left (dropping it also wakes a consumer waiting on the socket).
            g.tx = None;
            self.closed.notify_all();
        }
    }

    /// Counts `n` events left out; the first ever is logged.
    fn elide(&self, n: u64) {
        self.inbound.elided.fetch_add(n, Ordering::Relaxed);
        if !self.inbound.elision_logged.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{CONTROL_EVENT_CAP} control events wait unread: connections that carry \
                 nothing for the consumer are left out of the event stream (Stats::events_elided)"
            );
        }
    }

    /// Sends a held `Connected` (see [`EventSink::emit`]) now: a consumer is about to
    /// read that connection's socket itself, or has caught up (the reader is woken for
    /// it, see `Batch::release`). True if there was one (it is in the channel, ahead of
    /// anything the consumer reads).
    #[inline]
    pub(crate) fn release_held(&self) -> bool {
        self.inbound.holding.load(Ordering::SeqCst) && self.send_held(&mut self.grammar.lock())
    }

    /// Sends the held `Connected`, if any (true then), under the grammar lock.
    fn send_held(&self, g: &mut Grammar) -> bool {
        let Some(c) = g.held.take() else {
            return false;
        };
        if let Some(tx) = g.tx.as_ref() {
            self.inbound.unheld();
            let _ = tx.send(c);
        }
        // Cleared once it is in the channel: a consumer that sees it clear finds it there
        // (one that sees it set waits for the grammar lock).
        self.inbound.holding.store(false, Ordering::SeqCst);
        true
    }

    /// Sends the messages of one reader drain as one batch (see `inbound.rs`), unless
    /// `Closed` was emitted (never the case while a reader runs: it is joined first).
    pub(crate) fn emit_messages(&self, events: &mut VecDeque<Message>, msgs: usize, bytes: usize) {
        let mut g = self.grammar.lock();
        // That connection carries something for the consumer after all.
        self.send_held(&mut g);
        let Some(tx) = g.tx.as_ref() else {
            log::debug!(
                "{} events dropped by the grammar: after Closed",
                events.len()
            );
            events.clear();
            return;
        };
        tx.send_messages(events, msgs, bytes);
    }

    /// The bound on inbound messages and the reader's hold on it.
    pub(crate) fn inbound(&self) -> &Arc<Inbound> {
        &self.inbound
    }

    /// `close` has begun: `Reconnecting` would be a lie from now on, and a wait on the
    /// client's events on its own supervisor thread ends (see
    /// [`Events::wait_on_supervisor`]).
    pub(crate) fn begin_close(&self) {
        self.grammar.lock().closing = true;
        self.inbound.closing.store(true, Ordering::SeqCst);
    }

    /// Called on the supervisor thread as it starts.
    pub(crate) fn mark_supervisor(&self) {
        let _ = self.inbound.supervisor.set(std::thread::current().id());
    }

    /// Waits until `Closed` was emitted (by the closer that joins the supervisor, or by
    /// the supervisor itself). Bounded because that closer's join is.
    pub(crate) fn wait_closed(&self) {
        let mut g = self.grammar.lock();
        while g.tx.is_some() {
            self.closed.wait(&mut g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn the_sink_keeps_the_grammar() {
        let inbound = Arc::new(Inbound::new(10, 10, Duration::from_secs(1)));
        let (tx, rx) = EventTx::new(inbound.clone());
        let sink = EventSink::new(tx);
        let reconnecting = || Event::Reconnecting {
            attempt: 1,
            delay: Duration::ZERO,
            last_error: None,
        };
        sink.emit(reconnecting());
        sink.begin_close();
        sink.emit(reconnecting()); // dropped: closing
        sink.emit(Event::GaveUp(Error::Closed { message: None }));
        sink.emit(Event::GaveUp(Error::Closed { message: None })); // dropped: twice
        sink.emit(Event::Undelivered(vec![]));
        sink.emit(Event::Closed);
        sink.emit(Event::Closed); // dropped: once
        sink.emit(Event::Undelivered(vec![])); // dropped: after Closed
        sink.wait_closed();
        let kinds: Vec<_> = crate::inbound::Events::new(rx, inbound, None)
            .try_iter()
            .map(|e| {
                format!("{e:?}")
                    .split([' ', '('])
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(kinds, ["Reconnecting", "GaveUp", "Undelivered", "Closed"]);
    }

    /// Past `CONTROL_EVENT_CAP` unread control events, a connection that brings nothing
    /// for the consumer is left out whole; one that brings a message gets its
    /// `Connected` first.
    #[test]
    fn unread_control_events_past_the_cap_leave_out_empty_connections() {
        let inbound = Arc::new(Inbound::new(10, 1 << 20, Duration::from_secs(1)));
        let (tx, rx) = EventTx::new(inbound.clone());
        let sink = EventSink::new(tx);
        let connected = |generation| Event::Connected {
            generation,
            protocol: None,
        };
        let disconnected = |generation| Event::Disconnected {
            generation,
            reason: crate::DisconnectReason::Reset,
        };
        for g in 1..=CONTROL_EVENT_CAP as u64 / 2 {
            sink.emit(connected(g));
            sink.emit(disconnected(g));
        }
        let first = CONTROL_EVENT_CAP as u64 / 2 + 1;
        // Over the cap: left out whole.
        sink.emit(connected(first));
        sink.emit(Event::HeartbeatMissed {
            generation: first,
            missed: 1,
        });
        sink.emit(disconnected(first));
        sink.emit(Event::Reconnecting {
            attempt: 1,
            delay: Duration::ZERO,
            last_error: None,
        });
        assert_eq!(inbound.elided(), 4);
        // Brings a message: its `Connected` goes first.
        sink.emit(connected(first + 1));
        assert!(
            sink.release_held(),
            "a consumer about to read gets it first"
        );
        assert!(!sink.release_held());
        sink.emit_messages(&mut VecDeque::from([Message::text("m")]), 1, 1);
        sink.emit(disconnected(first + 1));
        assert_eq!(inbound.elided(), 4);
        let events = Events::new(rx, inbound, None);
        let tail: Vec<Event> = events.try_iter().skip(CONTROL_EVENT_CAP).collect();
        assert!(
            matches!(
                tail.as_slice(),
                [
                    Event::Connected { generation: a, .. },
                    Event::Message(_),
                    Event::Disconnected { generation: b, .. },
                ] if *a == first + 1 && *b == first + 1
            ),
            "{tail:?}"
        );
    }

    #[test]
    fn spinning_honours_the_timeout() {
        let inbound = Arc::new(Inbound::new(10, 1 << 20, Duration::from_secs(10)));
        let (_tx, rx) = EventTx::new(inbound.clone());
        let events = Events::new(rx, inbound, None);
        events.spin.set(true);
        let t = Instant::now();
        assert_eq!(
            events.recv_timeout(Duration::from_micros(10)).unwrap_err(),
            RecvTimeoutError::Timeout
        );
        assert!(
            !events.spin.get(),
            "a spin that got nothing turns spinning off"
        );
        // Zero and the largest timeout are fine too (the latter with something to take).
        assert!(events.recv_timeout(Duration::ZERO).is_err());
        _tx.send(Event::Closed).unwrap();
        assert!(matches!(
            events.recv_timeout(Duration::MAX),
            Ok(Event::Closed)
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A read of the socket that the test scripts: each `drive` gets the next step.
    struct Scripted {
        /// `(messages read, input left above the socket)`, one per `drive`.
        steps: Mutex<VecDeque<(Vec<Message>, bool)>>,
        waits: AtomicUsize,
    }

    impl Drive for Scripted {
        fn drive(&self, _: &Receiver<Batch>, out: &mut VecDeque<Message>) -> Option<bool> {
            let (msgs, more) = self.steps.lock().pop_front().unwrap_or_default();
            out.extend(msgs);
            Some(more)
        }

        fn wait_input(&self, _: &Waker, _: Option<Instant>) -> Option<bool> {
            self.waits.fetch_add(1, Ordering::SeqCst);
            Some(false)
        }
    }

    /// A consumer's read that stops on its budget after control frames only (pings)
    /// hands out nothing, but leaves whole messages in tungstenite's buffer, where `poll`
    /// does not see them: the consumer must read again, not wait on the socket (where
    /// they would wait for the next byte from the server, or the reader's deferral).
    #[test]
    fn a_consumer_whose_read_got_only_pings_reads_again_before_it_waits() {
        let inbound = Arc::new(Inbound::new(10, 1 << 20, Duration::from_secs(10)));
        let (_tx, rx) = EventTx::new(inbound.clone());
        let drive = Arc::new(Scripted {
            steps: Mutex::new(VecDeque::from([
                (vec![], true),
                (vec![], true),
                (vec![Message::text("x")], false),
            ])),
            waits: AtomicUsize::new(0),
        });
        let events = Events::new(rx, inbound.clone(), Some(drive.clone()));
        // The read before this wait stopped with input left, and said so (as
        // `reader::Driver` does): this wait reads first, and goes on reading.
        inbound.note_input_left();
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Message(Message::Text(t))) => assert_eq!(t.as_str(), "x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            drive.waits.load(Ordering::SeqCst),
            0,
            "the consumer waited on the socket with messages left above it"
        );
    }

    /// Input another consumer left above the socket (`input_left`) after this consumer's
    /// empty read: the wait reads again before its first `poll` (review of f63c3dc).
    #[test]
    fn a_wait_reads_first_when_another_consumer_left_input_above_the_socket() {
        let inbound = Arc::new(Inbound::new(10, 1 << 20, Duration::from_secs(10)));
        let (_tx, rx) = EventTx::new(inbound.clone());
        let drive = Arc::new(Scripted {
            steps: Mutex::new(VecDeque::from([
                (vec![], false),
                (vec![Message::text("x")], false),
            ])),
            waits: AtomicUsize::new(0),
        });
        let events = Events::new(rx, inbound.clone(), Some(drive.clone()));
        inbound.note_input_left();
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Message(Message::Text(t))) => assert_eq!(t.as_str(), "x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            drive.waits.load(Ordering::SeqCst),
            0,
            "waited before reading"
        );
    }

    /// The reader read the socket empty and stopped after a ping with a message left in
    /// tungstenite's buffer, after this consumer looked (nothing left then) and before it
    /// began its wait, so the reader's wake-up found nobody waiting: the wait must read
    /// before it waits on the (empty) socket, where the message would wait for the
    /// reader's next look.
    #[test]
    fn a_wait_reads_what_the_reader_left_above_the_socket_after_the_callers_look() {
        let inbound = Arc::new(Inbound::new(10, 1 << 20, Duration::from_secs(10)));
        let (_tx, rx) = EventTx::new(inbound.clone());
        let drive = Arc::new(Scripted {
            steps: Mutex::new(VecDeque::from([(vec![Message::text("x")], false)])),
            waits: AtomicUsize::new(0),
        });
        let events = Events::new(rx, inbound.clone(), Some(drive.clone()));
        // The caller's look found nothing (`read_empty`); then the reader's drain.
        inbound.set_input_left(true);
        inbound.wake_for_input_left();
        match events.wait_on_socket(Some(Instant::now() + Duration::from_secs(5)), true) {
            Some(Ok(Event::Message(Message::Text(t)))) => assert_eq!(t.as_str(), "x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            drive.waits.load(Ordering::SeqCst),
            0,
            "waited on the socket with a message left above it"
        );
    }
}
