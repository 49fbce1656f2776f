//! Delivery modes and the outbox of acked delivery: every message stays here, under the
//! link lock, until the server's ack for its id arrives.
//!
//! The outbox costs no lock round trip of its own: a send admits its message while it
//! holds `link` anyway, and the reader matches acks while it holds `link` to drain the
//! socket (like the heartbeat's reply matcher).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Message;
use crate::queue::{Ticket, payload_len};

/// Reads the id of an outgoing message, or of the message a server's ack acknowledges.
pub type IdReader = Arc<dyn Fn(&Message) -> Option<u64> + Send + Sync>;

/// What wsbeat promises about a message accepted by `send` (returned `Ok`).
/// Chosen with [`ClientBuilder::delivery`](crate::ClientBuilder::delivery); see
/// RELIABILITY.md for the exact promise of each mode and the test that checks it.
///
/// ```
/// use wsbeat::{Acks, Client, Delivery};
///
/// // Orders must never be replayed after a reconnect:
/// let b = Client::builder("ws://127.0.0.1:9/").delivery(Delivery::AtMostOnce);
/// // Telemetry must all arrive; the server answers {"ack": N} for {"id": N, ...}:
/// let b = Client::builder("ws://127.0.0.1:9/").delivery(Delivery::Acked(Acks::json_field("id", "ack")));
/// # let _ = b;
/// # Ok::<(), wsbeat::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Delivery {
    /// Default. A message in flight when its connection dies is sent again on the next
    /// one: the ones the peer's TCP never acknowledged exactly (Linux, macOS), the others
    /// counted in [`Stats::possibly_lost`](crate::Stats::possibly_lost). Duplicates are
    /// possible, silent loss only of what the peer's TCP stack (or a proxy) acknowledged.
    #[default]
    AtLeastOnce,
    /// A message in flight when its connection dies is never sent again: it is handed
    /// back in [`Event::Unconfirmed`](crate::Event::Unconfirmed) (the peer may or may
    /// not have it). Messages queued while offline are sent later (turn that off with
    /// [`ClientBuilder::offline_queue`](crate::ClientBuilder::offline_queue)). While
    /// as many handed-back messages as the queue holds (`Limits::queue_messages`,
    /// `queue_bytes`) wait unread in the event stream, sends get no room (as the
    /// [`OverflowPolicy`](crate::OverflowPolicy) says) until the consumer takes them.
    AtMostOnce,
    /// End-to-end acks: each message stays in an outbox until the server acknowledges its
    /// id; unacked messages are sent again, in order, after a reconnect and after the
    /// ack timeout; on close or give-up they are handed back.
    Acked(Acks),
}

/// Shortest ack timeout (see [`Acks::timeout`]): a shorter one would keep the timer
/// thread re-sending without pause.
const MIN_ACK_TIMEOUT: Duration = Duration::from_millis(1);

/// How acked delivery reads ids and recognises the server's acks. For
/// [`Delivery::Acked`].
#[derive(Clone)]
#[must_use = "Acks do nothing until given to ClientBuilder::delivery as Delivery::Acked"]
pub struct Acks {
    pub(crate) id_of: IdReader,
    pub(crate) ack_of: IdReader,
    pub(crate) timeout: Duration,
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) deliver_acks: bool,
}

impl fmt::Debug for Acks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acks")
            .field("timeout", &self.timeout)
            .field("max_messages", &self.max_messages)
            .field("max_bytes", &self.max_bytes)
            .field("deliver_acks", &self.deliver_acks)
            .finish_non_exhaustive()
    }
}

impl Acks {
    /// `id_of` reads the id of an outgoing message (`None`: not tracked by the outbox,
    /// delivered at least once, see `RELIABILITY.md` 3c); `ack_of` recognises an inbound
    /// ack and returns the id it acknowledges. Both run under the client's lock (like a
    /// heartbeat reply matcher: a slow one holds sends, `state()`, `stats()` and
    /// `close()` on every thread): keep them short, do not call back into the `Client`, and
    /// do not capture a `Client` or upgrade a captured
    /// [`WeakClient`](crate::WeakClient) in them (dropping the last handle there would
    /// close the client under its own lock); a panic in them is logged and counts as
    /// `None`. Ids must be unique among the unacked messages: a message whose id still
    /// waits for its ack is handed back ([`Error::DuplicateId`](crate::Error::DuplicateId)).
    /// `id_of` is asked once per message, when it is accepted; the message keeps that id
    /// (or its lack of one) until it is acked or handed back (a message `restart()`
    /// carries into the new client is accepted there again).
    ///
    /// Defaults: ack timeout 10 s, at most 10 000 unacked messages and 64 MiB of them (the
    /// overflow policy of [`ClientBuilder::overflow`](crate::ClientBuilder::overflow)
    /// applies when full), acks consumed (not delivered as events).
    ///
    /// ```
    /// use wsbeat::{Acks, Message};
    /// // Binary frames that start with a big-endian u64 id; the ack is the 8-byte id.
    /// let id = |m: &Message| match m {
    ///     Message::Binary(b) if b.len() >= 8 => Some(u64::from_be_bytes(b[..8].try_into().unwrap())),
    ///     _ => None,
    /// };
    /// let acks = Acks::new(id, id).timeout(std::time::Duration::from_secs(3));
    /// # let _ = acks;
    /// ```
    pub fn new(
        id_of: impl Fn(&Message) -> Option<u64> + Send + Sync + 'static,
        ack_of: impl Fn(&Message) -> Option<u64> + Send + Sync + 'static,
    ) -> Acks {
        Acks {
            id_of: Arc::new(id_of),
            ack_of: Arc::new(ack_of),
            timeout: Duration::from_secs(10),
            max_messages: 10_000,
            max_bytes: 64 << 20,
            deliver_acks: false,
        }
    }

    /// Text messages that are JSON objects with an unsigned integer field `id_field`
    /// (e.g. `{"id": 7, ...}`), acked by text messages with the field `ack_field`
    /// (e.g. `{"ack": 7}`). A small scanner, not a JSON parser: the field is the first
    /// `"name":` in the text (a `"name"` not followed by a colon, such as the value in
    /// `{"type":"ack","ack":7}`, is skipped), and its value must be digits. A nested
    /// object with the same field name before it would be taken instead: use
    /// [`Acks::new`] for such messages.
    ///
    /// ```
    /// use wsbeat::{Acks, Message};
    /// let acks = Acks::json_field("id", "ack");
    /// # let _ = acks;
    /// ```
    pub fn json_field(id_field: &str, ack_field: &str) -> Acks {
        let id_key = format!("\"{id_field}\"");
        let ack_key = format!("\"{ack_field}\"");
        Acks::new(
            move |m| json_u64(m, &id_key),
            move |m| json_u64(m, &ack_key),
        )
    }

    /// An unacked message is sent again after this long without its ack (default 10 s;
    /// `Duration::MAX`: only after a reconnect). A time under 1 ms is taken as 1 ms, and
    /// zero, which would re-send every unacked message without pause, is an
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) from `connect()`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = if timeout.is_zero() {
            timeout
        } else {
            timeout.max(MIN_ACK_TIMEOUT)
        };
        self
    }

    /// Most unacked messages kept (default 10 000, at least 1). Past this bound (or
    /// [`max_bytes`](Self::max_bytes)) a send finds no room and the
    /// [`OverflowPolicy`](crate::OverflowPolicy) decides (`Reject`: `Error::QueueFull`,
    /// message handed back).
    pub fn max_messages(mut self, n: usize) -> Self {
        self.max_messages = n.max(1);
        self
    }

    /// Most payload bytes of unacked messages kept (default 64 MiB), so that a server that
    /// stops acking holds the client's memory to this whatever the message sizes. A
    /// message larger than this on its own is still taken into an empty outbox.
    ///
    /// ```
    /// use wsbeat::Acks;
    /// // Large uploads: at most 8 of them, and at most 256 MiB, wait for their acks.
    /// let acks = Acks::json_field("id", "ack").max_messages(8).max_bytes(256 << 20);
    /// # let _ = acks;
    /// ```
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Also deliver acks as [`Event::Message`](crate::Event::Message) (default: consumed).
    pub fn deliver_acks(mut self, yes: bool) -> Self {
        self.deliver_acks = yes;
        self
    }
}

/// The unsigned integer after the first `"key":` in a text message that has one. The
/// key may come earlier as a string value (`{"type":"ack","ack":7}`): only a `"key"`
/// followed by a colon is a field name (a quote inside a JSON string is escaped, so a
/// string's content never matches).
fn json_u64(m: &Message, key: &str) -> Option<u64> {
    let Message::Text(t) = m else { return None };
    let mut s = t.as_str();
    loop {
        s = &s[s.find(key)? + key.len()..];
        let Some(rest) = s.trim_start().strip_prefix(':') else {
            continue;
        };
        let rest = rest.trim_start();
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        return rest[..end].parse().ok();
    }
}

/// Runs a user's id reader. It runs under the lock on a wsbeat thread or in a sender:
/// a panic is logged and counts as "no id" (not tracked / not an ack).
fn read_id(f: &IdReader, msg: &Message, origin: &'static str) -> Option<u64> {
    crate::Error::catch(origin, || f(msg)).ok().flatten()
}

struct Entry {
    id: u64,
    msg: Message,
    /// When it was last written to a connection; `None` while it waits in the queue.
    sent: Option<Instant>,
    writes: u32,
}

/// Whether [`Outbox::admit`] took a message, and why not.
pub(crate) enum Admit {
    /// Taken; with its entry's sequence number when it has an id (is tracked).
    Ok(Ticket),
    Full,
    /// A message with this id waits for its ack already.
    Duplicate(u64),
}

/// The unacked messages, in the order they were accepted.
pub(crate) struct Outbox {
    acks: Acks,
    /// By sequence number (the order they were accepted). An acked entry goes at once:
    /// one message that is never acked does not keep every later one here.
    entries: BTreeMap<u64, Entry>,
    /// Sequence number of the next entry (never reused).
    next: u64,
    /// id -> sequence number of its entry.
    index: HashMap<u64, u64>,
    /// Payload bytes of the entries.
    bytes: usize,
    pub acked: u64,
    pub resent: u64,
    /// Ids of written messages at the last [`clear`](Self::clear).
    written_before: HashSet<u64>,
    /// An ack came for a message not written (yet) on this connection: it may wait in
    /// the offline queue (see [`take_queued_acked`](Self::take_queued_acked)).
    queued_acked: bool,
}

impl Outbox {
    pub(crate) fn new(acks: Acks) -> Outbox {
        Outbox {
            acks,
            entries: BTreeMap::new(),
            next: 0,
            index: HashMap::new(),
            bytes: 0,
            acked: 0,
            resent: 0,
            written_before: HashSet::new(),
            queued_acked: false,
        }
    }

    /// Unacked messages.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn ack_timeout(&self) -> Duration {
        self.acks.timeout
    }

    /// Tracks `msg` (if it has an id): the one call of the id reader for it. `Full` when
    /// the bound is reached; `Duplicate` when its id waits for an ack already (taking it
    /// over would leave the first message unackable: re-sent forever, and holding every
    /// later entry behind it). From then on the message goes by its [`Ticket`].
    pub(crate) fn admit(&mut self, msg: &Message) -> Admit {
        let id = self.id_of(msg);
        self.admit_as(id, msg)
    }

    /// The id of `msg` by the user's reader (`None`: untracked): ask it once per message
    /// and give the answer to [`admit_as`](Self::admit_as), also when a send waits for
    /// room and tries again.
    pub(crate) fn id_of(&self, msg: &Message) -> Option<u64> {
        read_id(&self.acks.id_of, msg, "Acks id_of")
    }

    /// [`admit`](Self::admit) with the id already read.
    pub(crate) fn admit_as(&mut self, id: Option<u64>, msg: &Message) -> Admit {
        let Some(id) = id else {
            return Admit::Ok(None);
        };
        if self.index.contains_key(&id) {
            return Admit::Duplicate(id);
        }
        let size = payload_len(msg);
        if self.index.len() >= self.acks.max_messages
            || (!self.index.is_empty() && self.bytes.saturating_add(size) > self.acks.max_bytes)
        {
            return Admit::Full;
        }
        self.bytes = self.bytes.saturating_add(size);
        let seq = self.next;
        self.next += 1;
        self.index.insert(id, seq);
        self.entries.insert(
            seq,
            Entry {
                id,
                msg: msg.clone(),
                sent: None,
                writes: 0,
            },
        );
        Admit::Ok(Some(seq))
    }

    /// Stops tracking the entry `seq` (its id is out of the index already).
    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let e = self.entries.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(payload_len(&e.msg));
        Some(e)
    }

    /// The message of entry `seq` was written to a connection (buffered in tungstenite,
    /// or in flight on a connection that died while writing it). Returns `seq` if this
    /// was its first write on this connection (since the last
    /// [`take_written`](Self::take_written)); `None` also when it was acked meanwhile.
    pub(crate) fn written(&mut self, seq: u64, now: Instant) -> Option<u64> {
        let e = self.entries.get_mut(&seq)?;
        let first = e.sent.is_none();
        e.sent = Some(now);
        // Saturating: a message re-sent every millisecond would wrap a `u32` after 49
        // days, and count as never written.
        e.writes = e.writes.saturating_add(1);
        if e.writes > 1 {
            self.resent += 1;
        }
        first.then_some(seq)
    }

    /// Whether the server acked the message of `ticket` while it waited in the offline
    /// queue (a server resuming a session acks, on the new connection, what the last one
    /// delivered): then it is delivered, neither written again nor handed back. Entries
    /// go only when acked or when their message is handed back, which takes it out of
    /// the queue. An untracked message (no ticket) never is.
    pub(crate) fn acked_already(&self, ticket: Ticket) -> bool {
        ticket.is_some_and(|seq| !self.entries.contains_key(&seq))
    }

    /// Called by the reader for each inbound text/binary message under the lock.
    /// Returns true when it is an ack to consume (not deliver).
    pub(crate) fn on_inbound(&mut self, msg: &Message) -> bool {
        let Some(id) = read_id(&self.acks.ack_of, msg, "Acks ack_of") else {
            return false;
        };
        if let Some(seq) = self.index.remove(&id) {
            if self.remove(seq).is_some_and(|e| e.sent.is_none()) {
                self.queued_acked = true;
            }
            self.acked += 1;
        }
        !self.acks.deliver_acks
    }

    /// Whether an ack came, since the last call, for a message not written on this
    /// connection (it may wait in the offline queue, which should drop it). Clears it.
    pub(crate) fn take_queued_acked(&mut self) -> bool {
        std::mem::take(&mut self.queued_acked)
    }

    /// Stops tracking the oldest message that was written (for `DropOldest`) and hands
    /// it back. `None` when every unacked message still waits in the queue.
    pub(crate) fn drop_oldest_written(&mut self) -> Option<Message> {
        let seq = *self.entries.iter().find(|(_, e)| e.sent.is_some())?.0;
        self.forget(seq)
    }

    /// The connection died: the written, unacked messages in order, each with its
    /// entry's sequence number, marked as waiting again (the caller puts them back at
    /// the front of the queue).
    pub(crate) fn take_written(&mut self) -> Vec<(u64, Message)> {
        let mut out = Vec::new();
        for (seq, e) in self.entries.iter_mut() {
            if e.sent.take().is_some() {
                out.push((*seq, e.msg.clone()));
            }
        }
        out
    }

    /// Stops tracking entry `seq` (its message is handed back to the caller after all);
    /// its message, if it was tracked.
    pub(crate) fn forget(&mut self, seq: u64) -> Option<Message> {
        let e = self.remove(seq)?;
        self.index.remove(&e.id);
        Some(e.msg)
    }

    /// Written messages whose ack is overdue at `now`, in order, at most `limit` of them;
    /// and when the next one falls due (`now` if more than `limit` are due). Each stays
    /// due until it is written again ([`written`](Self::written)).
    pub(crate) fn overdue(
        &self,
        now: Instant,
        limit: usize,
    ) -> (Vec<(u64, Message)>, Option<Instant>) {
        let t = self.acks.timeout;
        let mut out = Vec::new();
        let mut next: Option<Instant> = None;
        for (seq, e) in &self.entries {
            let (m, Some(sent)) = (&e.msg, e.sent) else {
                continue;
            };
            let due = sent.checked_add(t);
            match due {
                Some(d) if d <= now && out.len() >= limit => return (out, Some(now)),
                Some(d) if d <= now => out.push((*seq, m.clone())),
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        (out, next)
    }

    /// The final hand-back (close, give-up): of `queued` (the whole offline queue, which
    /// holds every unacked message by now), those not acked while they waited there.
    /// Clears the outbox.
    pub(crate) fn hand_back(&mut self, queued: Vec<(Message, Ticket)>) -> Vec<Message> {
        let unacked = queued
            .into_iter()
            .filter(|(_, t)| !self.acked_already(*t))
            .map(|(m, _)| m)
            .collect();
        self.clear();
        unacked
    }

    /// Forgets everything (close / give-up: the queue already holds every unacked one),
    /// but the ids of the ones it wrote (see [`take_written_ids`](Self::take_written_ids)).
    pub(crate) fn clear(&mut self) {
        self.written_before = self
            .entries
            .values()
            .filter(|e| e.writes > 0)
            .map(|e| e.id)
            .collect();
        self.entries.clear();
        self.index.clear();
        self.bytes = 0;
    }

    /// The ids of the messages this outbox had written when it was cleared: a client
    /// that `restart()` carries them to writes them again, and counts that a re-send.
    pub(crate) fn take_written_ids(&mut self) -> HashSet<u64> {
        std::mem::take(&mut self.written_before)
    }

    /// Admits `msg` (carried over by `restart()`) as written before when its id is in
    /// `written`: its next write counts as a re-send (the server may have it already).
    /// Its ticket in this outbox.
    pub(crate) fn admit_carried(&mut self, msg: &Message, written: &HashSet<u64>) -> Ticket {
        let Admit::Ok(Some(seq)) = self.admit(msg) else {
            return None;
        };
        if let Some(e) = self.entries.get_mut(&seq)
            && written.contains(&e.id)
        {
            e.writes = 1;
        }
        Some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_reads_ids() {
        let m = Message::text(r#"{"op":"x", "id" : 42,"v":1}"#);
        assert_eq!(json_u64(&m, "\"id\""), Some(42));
        assert_eq!(json_u64(&Message::text(r#"{"ack":7}"#), "\"ack\""), Some(7));
        assert_eq!(json_u64(&Message::text(r#"{"ack":"x"}"#), "\"ack\""), None);
        assert_eq!(json_u64(&Message::binary(vec![1]), "\"id\""), None);
        // The name as a value first (docs review: such acks were never recognised, so
        // every message was re-sent forever and the outbox filled up).
        let typed = Message::text(r#"{"type":"ack", "ack" : 9}"#);
        assert_eq!(json_u64(&typed, "\"ack\""), Some(9));
        let kind = Message::text(r#"{"note":"\"id\":1","kind":"id","id":7}"#);
        assert_eq!(json_u64(&kind, "\"id\""), Some(7));
        assert_eq!(
            json_u64(&Message::text(r#"{"type":"ack"}"#), "\"ack\""),
            None
        );
    }

    /// The ticket of a message `admit` takes.
    fn take(o: &mut Outbox, m: &Message) -> u64 {
        match o.admit(m) {
            Admit::Ok(Some(seq)) => seq,
            _ => panic!("{m:?} not taken"),
        }
    }

    /// Review of 4c2e498: with `max_bytes(usize::MAX)`, payload bytes past 2^64
    /// overflowed the count (a panic in `send` in debug builds); it saturates now.
    #[test]
    fn the_byte_count_saturates_with_no_byte_limit() {
        let mut o = Outbox::new(
            Acks::json_field("id", "ack")
                .max_messages(usize::MAX)
                .max_bytes(usize::MAX),
        );
        let m = |i: u64| Message::text(format!(r#"{{"id":{i},"pad":"0123456789"}}"#));
        let first = take(&mut o, &m(1));
        o.bytes = usize::MAX - 2;
        let second = take(&mut o, &m(2));
        assert_eq!(o.bytes, usize::MAX);
        assert!(o.remove(second).is_some() && o.remove(first).is_some());
    }

    /// A server that stops acking holds the outbox to `max_bytes` of payload, not only
    /// to `max_messages` messages (10 000 of 16 MiB each before).
    #[test]
    fn the_outbox_is_bounded_by_bytes_too() {
        let mut o = Outbox::new(Acks::json_field("id", "ack").max_bytes(100));
        let m = |i: u64, pad: usize| {
            Message::text(format!("{{\"id\":{i},\"p\":\"{}\"}}", "x".repeat(pad)))
        };
        let big = m(1, 50);
        assert!(payload_len(&big) > 50 && payload_len(&big) <= 100);
        let first = take(&mut o, &big);
        assert!(matches!(o.admit(&m(2, 50)), Admit::Full), "past 100 bytes");
        take(&mut o, &m(3, 0)); // a small one still fits
        // An ack makes room.
        o.written(first, Instant::now());
        assert!(o.on_inbound(&Message::text(r#"{"ack":1}"#)));
        let second = take(&mut o, &m(2, 50));
        // Forgetting and clearing give the bytes back; a message larger than the bound
        // alone goes into an empty outbox.
        o.forget(second);
        o.clear();
        assert_eq!(o.bytes, 0);
        let huge = take(&mut o, &m(4, 500));
        assert!(matches!(o.admit(&m(5, 0)), Admit::Full));
        o.written(huge, Instant::now());
        assert!(o.drop_oldest_written().is_some());
        assert_eq!((o.bytes, o.len()), (0, 0));
    }

    #[test]
    fn a_message_written_without_end_stays_counted_as_written() {
        let mut o = Outbox::new(Acks::json_field("id", "ack"));
        let now = Instant::now();
        let seq = take(&mut o, &Message::text(r#"{"id":1}"#));
        o.written(seq, now);
        o.entries.get_mut(&seq).unwrap().writes = u32::MAX;
        let resent = o.resent;
        o.written(seq, now);
        assert_eq!(o.entries[&seq].writes, u32::MAX);
        assert_eq!(o.resent, resent + 1);
    }

    /// The id reader is asked once per message, when it is admitted: later it goes by
    /// its ticket, so a reader that fails or changes its answer afterwards cannot make
    /// it look acked, untracked or unwritten (callback probe and review: such messages
    /// were lost, or handed back twice).
    #[test]
    fn the_id_reader_is_asked_once_per_message() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let mut o = Outbox::new(Acks::new(
            move |m| {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                json_u64(m, "\"id\"")
            },
            |m| json_u64(m, "\"ack\""),
        ));
        let m = |i: u64| Message::text(format!("{{\"id\":{i}}}"));
        let (a, b) = (take(&mut o, &m(1)), take(&mut o, &m(2)));
        o.written(a, Instant::now());
        assert!(o.on_inbound(&Message::text(r#"{"ack":1}"#)));
        assert!(o.acked_already(Some(a)) && !o.acked_already(Some(b)));
        assert!(!o.acked_already(None));
        o.forget(b);
        let back = o.hand_back(vec![(m(1), Some(a)), (m(3), None)]);
        assert_eq!(back, vec![m(3)]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn ack_out_of_order_and_requeue_in_order() {
        let mut o = Outbox::new(Acks::json_field("id", "ack").max_messages(3));
        let m = |i: u64| Message::text(format!("{{\"id\":{i}}}"));
        let now = Instant::now();
        for i in 1..=3 {
            let seq = take(&mut o, &m(i));
            assert_eq!(seq, i - 1);
            // The first write on a connection says which entry it is.
            assert_eq!(o.written(seq, now), Some(seq));
        }
        assert_eq!(o.written(2, now), None, "not a first write");
        assert_eq!(o.resent, 1);
        assert!(matches!(o.admit(&m(4)), Admit::Full));
        assert!(o.on_inbound(&Message::text(r#"{"ack":2}"#)));
        assert_eq!(o.len(), 2);
        assert_eq!(o.take_written(), vec![(0, m(1)), (2, m(3))]);
        assert_eq!(o.written(0, now), Some(0), "first on the next connection");
        assert_eq!(o.resent, 2);
        assert!(o.on_inbound(&Message::text(r#"{"ack":1}"#)));
        // A late duplicate ack changes nothing.
        assert!(o.on_inbound(&Message::text(r#"{"ack":1}"#)));
        assert_eq!((o.len(), o.acked), (1, 2));
        assert_eq!(o.entries.len(), 1, "acked entries are gone");
    }

    #[test]
    fn overdue_hands_out_at_most_the_limit_in_order() {
        let timeout = Duration::from_secs(1);
        let mut o = Outbox::new(Acks::json_field("id", "ack").timeout(timeout));
        let m = |i: u64| Message::text(format!("{{\"id\":{i}}}"));
        let t0 = Instant::now();
        for i in 1..=5 {
            let seq = take(&mut o, &m(i));
            o.written(seq, t0 + Duration::from_millis(i));
        }
        let now = t0 + timeout + Duration::from_millis(3);
        // 1, 2 and 3 are due; 4 and 5 fall due later.
        let (due, next) = o.overdue(now, 2);
        assert_eq!(due, vec![(0, m(1)), (1, m(2))]);
        assert_eq!(next, Some(now), "more are due at once");
        let (due, next) = o.overdue(now, 10);
        assert_eq!(due, vec![(0, m(1)), (1, m(2)), (2, m(3))]);
        assert_eq!(next, Some(t0 + timeout + Duration::from_millis(4)));
    }

    /// One message never acked (the server rejected it, say) does not keep the later,
    /// acked ones: they used to stay as empty slots behind it, popped only from the
    /// front, so memory grew with the traffic (36 MB for 400 000 messages in a helper's
    /// probe) while `len()` said 1.
    #[test]
    fn acked_entries_behind_an_unacked_one_are_gone() {
        let mut o = Outbox::new(Acks::json_field("id", "ack"));
        let now = Instant::now();
        for i in 0..5000u64 {
            let m = Message::text(format!("{{\"id\":{i}}}"));
            let seq = take(&mut o, &m);
            o.written(seq, now);
            if i > 0 {
                assert!(o.on_inbound(&Message::text(format!("{{\"ack\":{i}}}"))));
            }
        }
        assert_eq!((o.len(), o.acked), (1, 4999));
        assert_eq!(o.entries.len(), 1);
    }

    #[test]
    fn a_panicking_id_reader_means_no_id() {
        let mut o = Outbox::new(Acks::new(|_| panic!("boom"), |_| panic!("boom")));
        assert!(matches!(o.admit(&Message::text("x")), Admit::Ok(None)));
        assert_eq!(o.len(), 0, "not tracked");
        assert!(!o.on_inbound(&Message::text("y")), "not an ack: delivered");
    }
}
