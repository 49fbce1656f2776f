//! The offline queue: messages accepted while no connection is open.

use std::collections::VecDeque;

use crate::Message;

/// Payload size of a message, as counted against the byte bound.
pub(crate) fn payload_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) => 0,
        Message::Frame(f) => f.payload().len(),
    }
}

/// Largest payload of a ping or pong: control frames carry at most 125 bytes (RFC 6455
/// 5.5); a peer drops a connection that sends a bigger one.
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// Hands back what a client must not write as a message, before it is accepted: a close
/// frame (closing is `Client::close()`'s job), a raw frame (it would bypass every check
/// here and the protocol state: a close, a fragment, a reserved opcode), a ping or pong
/// over 125 bytes, anything over `limit` bytes. The peer would drop the connection on
/// the first three, and lose what was sent behind them.
pub(crate) fn check_outgoing(msg: Message, limit: usize) -> crate::Result<Message> {
    match outgoing_refusal(&msg, limit) {
        None => Ok(msg),
        Some(refusal) => Err(refusal.error(msg)),
    }
}

/// Why [`check_outgoing`] refuses a message, found without moving it (`send_all` checks
/// each message in place: moving it through a `Result` costs more than the check).
pub(crate) enum Refusal {
    Close,
    Frame,
    TooLarge { size: usize, limit: usize },
}

impl Refusal {
    /// The error that hands `msg` back.
    pub(crate) fn error(self, msg: Message) -> crate::Error {
        match self {
            Refusal::Close => crate::Error::NotSendable {
                reason: "a close frame: use Client::close() to close",
                message: msg,
            },
            Refusal::Frame => crate::Error::NotSendable {
                reason: "a raw frame (Message::Frame): send Message::Text, Binary, Ping or Pong",
                message: msg,
            },
            Refusal::TooLarge { size, limit } => crate::Error::MessageTooLarge {
                size,
                limit,
                message: msg,
            },
        }
    }
}

/// [`check_outgoing`] by reference: `None` if `msg` may be sent.
#[inline]
pub(crate) fn outgoing_refusal(msg: &Message, limit: usize) -> Option<Refusal> {
    let limit = match msg {
        Message::Close(_) => return Some(Refusal::Close),
        Message::Frame(_) => return Some(Refusal::Frame),
        Message::Ping(_) | Message::Pong(_) => limit.min(MAX_CONTROL_PAYLOAD),
        Message::Text(_) | Message::Binary(_) => limit,
    };
    let size = payload_len(msg);
    (size > limit).then_some(Refusal::TooLarge { size, limit })
}

/// A queued message's entry in the acked outbox (its sequence number), if it has one.
/// Kept with the message so the outbox never asks the user's id reader again: an id
/// reader that panics or changes its answer once cannot make a message look acked,
/// unwritten or untracked later (callback probe and its review: such messages were lost,
/// or handed back twice).
pub(crate) type Ticket = Option<u64>;

/// A FIFO bounded by message count and payload bytes (the byte count saturates: with no
/// byte limit, `usize::MAX`, messages that share one buffer may sum past it).
#[derive(Debug)]
pub(crate) struct OfflineQueue {
    /// Each message with its ticket and whether it was in flight on a connection that
    /// died (put back by [`requeue_front`](Self::requeue_front)): written again, it
    /// counts in `Stats::resent` (counted when put back, it also counted messages then
    /// handed back, never written again).
    msgs: VecDeque<(Message, Ticket, bool)>,
    bytes: usize,
    max_msgs: usize,
    max_bytes: usize,
}

impl OfflineQueue {
    pub(crate) fn new(max_msgs: usize, max_bytes: usize) -> Self {
        OfflineQueue {
            msgs: VecDeque::new(),
            bytes: 0,
            max_msgs: max_msgs.max(1),
            max_bytes,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.msgs.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Would `m` fit without dropping anything?
    pub(crate) fn has_room(&self, m: &Message) -> bool {
        self.msgs.len() < self.max_msgs
            && (self.msgs.is_empty() || self.bytes.saturating_add(payload_len(m)) <= self.max_bytes)
    }

    /// Could `m` ever fit (even in an empty queue)?
    pub(crate) fn could_fit(&self, m: &Message) -> bool {
        payload_len(m) <= self.max_bytes || self.max_bytes == 0
    }

    /// Appends without checking the bounds (caller checked `has_room` or chose to drop).
    pub(crate) fn push_back(&mut self, m: Message, ticket: Ticket) {
        self.bytes = self.bytes.saturating_add(payload_len(&m));
        self.msgs.push_back((m, ticket, false));
    }

    /// Puts already-accepted messages back at the front, in their order. They bypass the
    /// bounds: they were accepted before. `again`: they were in flight on a connection
    /// that died (see `msgs`), not merely carried over.
    pub(crate) fn requeue_front(
        &mut self,
        ms: impl DoubleEndedIterator<Item = (Message, Ticket)>,
        again: bool,
    ) {
        for (m, t) in ms.rev() {
            self.push_front(m, t, again);
        }
    }

    /// Whether the first message was in flight on a connection that died.
    pub(crate) fn front_is_again(&self) -> bool {
        self.msgs.front().is_some_and(|e| e.2)
    }

    pub(crate) fn pop_front(&mut self) -> Option<(Message, Ticket)> {
        let (m, t, _) = self.msgs.pop_front()?;
        self.bytes = self.bytes.saturating_sub(payload_len(&m));
        Some((m, t))
    }

    /// Puts a message taken with [`pop_front`](Self::pop_front) back; `again` as
    /// [`front_is_again`](Self::front_is_again) said of it then.
    pub(crate) fn push_front(&mut self, m: Message, ticket: Ticket, again: bool) {
        self.bytes = self.bytes.saturating_add(payload_len(&m));
        self.msgs.push_front((m, ticket, again));
    }

    pub(crate) fn drain_all(&mut self) -> Vec<(Message, Ticket)> {
        self.bytes = 0;
        self.msgs.drain(..).map(|(m, t, _)| (m, t)).collect()
    }

    /// Keeps the messages whose ticket `keep` accepts, in order.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Ticket) -> bool) {
        let mut bytes = self.bytes;
        self.msgs.retain(|(m, t, _)| {
            let kept = keep(t);
            if !kept {
                bytes = bytes.saturating_sub(payload_len(m));
            }
            kept
        });
        self.bytes = bytes;
    }

    /// [`drain_all`](Self::drain_all) without the tickets.
    pub(crate) fn drain_messages(&mut self) -> Vec<Message> {
        self.bytes = 0;
        self.msgs.drain(..).map(|(m, _, _)| m).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of 4c2e498: with `queue_bytes(usize::MAX)` ("no limit"), payload bytes
    /// past 2^64 (messages that share one mapping cost no memory each) overflowed the
    /// count: a panic in `send` (debug) or a wrapped count (release). It saturates now.
    #[test]
    fn the_byte_count_saturates_with_no_byte_limit() {
        let mut q = OfflineQueue::new(usize::MAX, usize::MAX);
        q.push_back(Message::text("first"), None);
        q.bytes = usize::MAX - 2;
        let m = Message::text("more than two bytes");
        assert!(q.has_room(&m), "no byte limit: always room");
        q.push_back(m.clone(), None);
        q.push_front(m.clone(), None, false);
        q.requeue_front(vec![(m, None)].into_iter(), true);
        assert_eq!(q.bytes, usize::MAX);
        while q.pop_front().is_some() {}
        q.retain(|_| true);
        assert!(q.is_empty());
    }

    #[test]
    fn bounds_and_order() {
        let mut q = OfflineQueue::new(3, 10);
        for s in ["a", "bb", "ccc"] {
            assert!(q.has_room(&Message::text(s)));
            q.push_back(Message::text(s), None);
        }
        assert!(!q.has_room(&Message::text("d")));
        q.requeue_front(vec![(Message::text("0"), Some(7))].into_iter(), true);
        assert_eq!(q.pop_front(), Some((Message::text("0"), Some(7))));
        assert_eq!(q.pop_front(), Some((Message::text("a"), None)));
        assert!(!q.has_room(&Message::text("0123456789")));
        assert_eq!(q.drain_all().len(), 2);
        assert!(q.is_empty());
    }

    /// Messages put back after a connection died stay marked through `pop_front`,
    /// `push_front` and `retain`: what `flush_queue` counts as resent.
    #[test]
    fn requeued_messages_stay_marked() {
        let mut q = OfflineQueue::new(100, 1000);
        q.push_back(Message::text("new"), None);
        q.requeue_front(
            vec![(Message::text("a"), Some(1)), (Message::text("b"), Some(2))].into_iter(),
            true,
        );
        q.requeue_front(vec![(Message::text("carried"), None)].into_iter(), false);
        assert!(!q.front_is_again(), "carried over, never in flight");
        let (m, t) = q.pop_front().unwrap();
        assert_eq!(m, Message::text("carried"));
        q.push_front(m, t, false);
        assert!(!q.front_is_again());
        q.pop_front();
        // Drops "a" (inside the prefix) and nothing else.
        q.retain(|t| *t != Some(1));
        assert!(q.front_is_again());
        let (m, t) = q.pop_front().unwrap();
        assert_eq!(m, Message::text("b"));
        assert!(!q.front_is_again(), "\"new\" was never in flight");
        q.push_front(m, t, true);
        assert!(q.front_is_again());
        q.pop_front();
        assert!(!q.front_is_again());
        assert_eq!(q.pop_front().map(|x| x.0), Some(Message::text("new")));
    }
}
