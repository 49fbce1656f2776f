//! The supervisor (reconnect) thread: opens connections, publishes them, tears dead ones
//! down, waits out the backoff, and closes the client.
//!
//! It is the only thread that creates or destroys connections, so rebuilds are serialised
//! by construction: every death report carries the generation of its connection, the
//! first report for the current generation wins (`Shared::mark_dead`), and reports of
//! older generations are ignored. `reconnect_now` from many threads collapses into one
//! command through an atomic flag.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, after, select};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::backoff::Failure;
use crate::config::Attempt;
use crate::heartbeat::HbState;
use crate::link::{Command, Link, Live, ProbeOut, Shared, TimerCmd, Tracked, Written, current_mut};
use crate::outbox::Delivery;
use crate::queue::Ticket;
use crate::transport::connect::{self, Opened};
use crate::transport::session::{Hooks, Session};
use crate::transport::stream::{is_would_block, reason_of};
use crate::transport::sys::{Waker, wait_writable};
use crate::{DisconnectReason, Error, Event, Message, Result, State};

/// How a connection ended, from the supervisor's point of view.
enum End {
    Died,
    Close,
    /// `reconnect_now` on this connection.
    Reconnect,
}

pub(crate) struct Supervisor {
    pub shared: Arc<Shared>,
    hooks: Hooks,
    pub ctl: Receiver<Command>,
    pub timer: Option<JoinHandle<()>>,
    /// The reader of the current connection, with its generation.
    reader: Option<(u64, JoinHandle<()>)>,
    /// Attempts made in total (numbers given to the request factory).
    attempts: u64,
    /// Failures in a row since the last stable connection.
    failures: u32,
    first_failure: Option<Instant>,
    last_error: Option<Error>,
}

/// Opens a connection and runs the user's on-connect hook on it.
pub(crate) fn establish(
    shared: &Shared,
    hooks: &Hooks,
    number: u64,
    last_error: Option<&Error>,
) -> Result<Opened> {
    let cfg = &shared.cfg;
    let req = match &hooks.factory {
        Some(f) => Error::catch("request factory", || f(&Attempt { number, last_error }))??,
        None => cfg.request.clone(),
    };
    // `close()` aborts the attempt at any stage, and the hook below by shutting the
    // socket down.
    let opened = connect::open(cfg, &req, &shared.connecting);
    let result = opened.and_then(|o| run_hook(shared, hooks, o));
    shared.connecting.detach();
    let opened = result?;
    if shared.closing.load(Ordering::SeqCst) {
        return Err(Error::Closed { message: None });
    }
    Ok(opened)
}

fn run_hook(shared: &Shared, hooks: &Hooks, mut opened: Opened) -> Result<Opened> {
    let cfg = &shared.cfg;
    if shared.closing.load(Ordering::SeqCst) {
        return Err(Error::Closed { message: None });
    }
    if let Some(hook) = &hooks.on_connect {
        let generation = shared.link.lock().generation + 1;
        let mut s = Session {
            ws: &mut opened.ws,
            generation,
            protocol: opened.protocol.as_deref(),
            write_timeout: cfg.write_timeout,
            max_message_size: cfg.limits.max_message_size,
        };
        let read_before = s.ws.get_ref().bytes_read();
        Error::catch("on_connect hook", || hook(&mut s))??;
        // What the hook read may have left part of a frame, or whole ones, in
        // tungstenite's buffer.
        opened.settled &= opened.ws.get_ref().bytes_read() == read_before;
    }
    Ok(opened)
}

impl Supervisor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        hooks: Hooks,
        ctl: Receiver<Command>,
        timer: JoinHandle<()>,
    ) -> Self {
        Supervisor {
            shared,
            hooks,
            ctl,
            timer: Some(timer),
            reader: None,
            attempts: 0,
            failures: 0,
            first_failure: None,
            last_error: None,
        }
    }

    /// The thread body. Returns the messages still queued when the user closed.
    ///
    /// Whatever happens inside, the client ends properly: user callbacks run under
    /// `Error::catch`, and any other panic (a bug) is caught here, the current connection
    /// torn down, and the client closed as if the policy had given up.
    pub(crate) fn run(mut self, first: Option<Opened>) -> Vec<Message> {
        // Before any user callback runs here (see `Events::wait_on_supervisor`).
        self.shared.events.mark_supervisor();
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve(first)));
        let give_up = match served {
            Ok(give_up) => give_up,
            Err(payload) => {
                let e = Error::panicked("wsbeat supervisor", payload.as_ref());
                log::error!("{e}; closing the client");
                let current = self.shared.link.lock().conn.as_ref().map(|l| l.generation);
                if let Some(cgen) = current {
                    self.shared
                        .report_dead(cgen, DisconnectReason::Io(e.to_string()));
                    let reason = self.teardown(cgen);
                    self.shared.emit(Event::Disconnected {
                        generation: cgen,
                        reason,
                    });
                }
                self.failures = self.failures.saturating_add(1);
                Some(e)
            }
        };
        self.finish(give_up)
    }

    /// Connects, serves connections and reconnects until closed or given up. Returns the
    /// last error when it gave up, `None` when the user closed.
    fn serve(&mut self, first: Option<Opened>) -> Option<Error> {
        let mut pending = first;
        if pending.is_some() {
            self.attempts = 1;
        }
        let give_up: Option<Error> = loop {
            if self.shared.closing.load(Ordering::SeqCst) {
                break None;
            }
            let first = pending.is_some();
            let opened = match pending.take() {
                Some(o) => o,
                None => {
                    self.set_state(State::Connecting);
                    self.attempts += 1;
                    match establish(
                        &self.shared,
                        &self.hooks,
                        self.attempts,
                        self.last_error.as_ref(),
                    ) {
                        Ok(o) => o,
                        Err(e) => {
                            if self.shared.closing.load(Ordering::SeqCst) {
                                break None;
                            }
                            log::info!("connect attempt {} failed: {e}", self.attempts);
                            match self.backoff(Some(e), None) {
                                Ok(()) => continue,
                                Err(stop) => break stop,
                            }
                        }
                    }
                }
            };
            let published = self.publish(opened);
            if first {
                // `connect()` waits for this: `Ok` means open. On an error it returns it
                // and closes this client, so there is nothing to retry.
                let failed = published.is_err();
                {
                    let mut link = self.shared.link.lock();
                    link.first = Some(published.as_ref().map(|_| ()).map_err(Clone::clone));
                    self.shared.changed.notify_all();
                }
                if failed {
                    self.wait_for_close();
                    break None;
                }
            }
            let cgen = match published {
                Ok(x) => x,
                Err(e) => match self.backoff(Some(e), None) {
                    Ok(()) => continue,
                    Err(stop) => break stop,
                },
            };
            let opened_at = Instant::now();
            self.flush_queue(cgen);
            let end = self.wait_end(cgen);
            // A `reconnect_now()` made while this connection was up is served however it
            // ends: at once, no failure counted, also when automatic reconnection is off
            // (the flag is cleared when the next connection is published).
            let requested = matches!(end, End::Reconnect)
                || (matches!(end, End::Died)
                    && self.shared.reconnect_requested.load(Ordering::SeqCst));
            // If the connection died before the request was served (a write stall while
            // the offline queue went out, say), that is why it ended.
            let died_first = matches!(end, End::Died) || (requested && self.is_dead(cgen));
            match end {
                End::Close => self.close_handshake(cgen, true),
                // The link is presumably healthy: close it in order, so what was handed to
                // the OS before is read by the peer, not destroyed by our reset.
                End::Reconnect if !died_first => self.close_handshake(cgen, false),
                End::Reconnect | End::Died => {}
            }
            let mut reason = self.teardown(cgen);
            if requested && !died_first {
                reason = DisconnectReason::ReconnectRequested;
            }
            self.shared.emit(Event::Disconnected {
                generation: cgen,
                reason: reason.clone(),
            });
            if let End::Close = end {
                break None;
            }
            let min_uptime =
                Error::catch("reconnect policy", || self.policy().map(|p| p.min_uptime()));
            match min_uptime {
                Ok(Some(t)) if opened_at.elapsed() >= t => {
                    self.failures = 0;
                    self.first_failure = None;
                }
                Ok(Some(_)) => {}
                // Closed while waiting for the policy.
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
            // Also one asked for after the look above: in reaction to `Disconnected`, or
            // while the policy's `min_uptime` ran (review of the event paths: dropped,
            // and the client slept the whole delay).
            if requested || self.shared.reconnect_requested.load(Ordering::SeqCst) {
                // The user asked for a fresh connection (also when automatic reconnection
                // is off): no failure, no wait.
                continue;
            }
            let err = Error::ConnectionLost(reason.clone());
            match self.backoff(Some(err), Some(reason)) {
                Ok(()) => {}
                Err(stop) => break stop,
            }
        };
        give_up
    }

    /// The reconnect policy, locked; `None` once this client is closing. The policy is
    /// shared with the clients `restart()` makes from this one, and one of them may hold
    /// it for long, running user code (which may even close this client and join this
    /// thread): the wait looks at `closing` every 10 ms, so a close always ends it.
    fn policy(&self) -> Option<parking_lot::MutexGuard<'_, Box<dyn crate::ReconnectPolicy>>> {
        loop {
            if let Some(p) = self
                .shared
                .cfg
                .policy
                .try_lock_for(Duration::from_millis(10))
            {
                return Some(p);
            }
            if self.shared.closing.load(Ordering::SeqCst) {
                return None;
            }
        }
    }

    fn set_state(&self, state: State) {
        let mut link = self.shared.link.lock();
        if link.state != State::Closing && link.state != State::Closed {
            self.shared.set_state(&mut link, state);
        }
    }

    /// Records a failure and waits out the policy's delay. `Err(Some(e))`: gave up
    /// (`e` is the last failure); `Err(None)`: closed by the user meanwhile.
    fn backoff(
        &mut self,
        error: Option<Error>,
        reason: Option<DisconnectReason>,
    ) -> std::result::Result<(), Option<Error>> {
        self.failures = self.failures.saturating_add(1);
        // A `reconnect_now` made while the attempt that just failed was under way was
        // served by it. Cleared before the policy runs, so a call made while it decides
        // (from the policy itself, or from a consumer reacting to `Reconnecting`) skips
        // the wait it gives (callback probe: such calls were dropped, and the client
        // slept the whole delay). After a lost connection (`reason`) the flag was
        // cleared when it was published and a call made while it lived was served: one
        // set now came after its end (reacting to `Disconnected`), and is kept.
        if reason.is_none() {
            self.shared
                .reconnect_requested
                .store(false, Ordering::SeqCst);
        }
        let first = *self.first_failure.get_or_insert_with(Instant::now);
        let last = error.unwrap_or(Error::Closed { message: None });
        self.last_error = Some(last.clone());
        if !self.shared.cfg.reconnect {
            // Automatic reconnection is off: the policy has nothing to decide.
            return Err(Some(last));
        }
        let delay = Error::catch("reconnect policy", || {
            let f = Failure {
                attempt: self.failures,
                error: Some(&last),
                reason: reason.as_ref(),
                elapsed: first.elapsed(),
            };
            self.policy().map(|mut p| p.next_delay(&f))
        });
        let delay = match delay {
            Ok(Some(Some(delay))) => delay,
            Ok(Some(None)) => return Err(Some(last)),
            // Closed while waiting for the policy.
            Ok(None) => return Err(None),
            // The policy cannot be asked any more: give up with the panic as the cause.
            Err(panicked) => return Err(Some(panicked)),
        };
        self.set_state(State::Backoff);
        self.shared.emit(Event::Reconnecting {
            attempt: self.failures,
            delay,
            last_error: Some(last),
        });
        log::info!("reconnecting in {delay:?} (attempt {})", self.failures);
        let wake = after(delay);
        loop {
            select! {
                recv(self.ctl) -> cmd => match cmd {
                    Ok(Command::Close) | Err(_) => return Err(None),
                    // The flag stays set until the attempt ends, so calls made meanwhile
                    // join this attempt instead of starting another. A command that finds
                    // it clear was already served (stale).
                    Ok(Command::ReconnectNow) => {
                        if self.shared.reconnect_requested.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                    }
                    Ok(Command::Dead(_)) => {} // stale
                },
                recv(wake) -> _ => return Ok(()),
            }
        }
    }

    /// Waits for `close()` (the `connect()` whose first connection could not start
    /// closes at once).
    fn wait_for_close(&self) {
        while !self.shared.closing.load(Ordering::SeqCst) {
            match self.ctl.recv() {
                Ok(Command::Close) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Makes a fresh connection the current one and starts its reader.
    fn publish(&mut self, opened: Opened) -> Result<u64> {
        let sock = Arc::new(opened.ws.get_ref().tcp().try_clone()?);
        // Tracked messages start after what the handshake and the hook wrote.
        let start = opened.ws.get_ref().offsets().0;
        let waker = Arc::new(Waker::new()?);
        let now = Instant::now();
        let cgen = {
            let mut guard = self.shared.link.lock();
            let link: &mut Link = &mut guard;
            let cgen = link.generation + 1;
            link.generation = cgen;
            link.flushing_queue = !link.queue.is_empty();
            let inbound = self.shared.events.inbound();
            inbound.new_connection();
            // Frames that came with the upgrade response, or that a hook's reads left,
            // wait in tungstenite's buffer where `poll` does not see them: a consumer's
            // first wait reads before it polls (it need not wait for the reader's first
            // drain). Else what the last connection's reads left says nothing of this one.
            inbound.set_input_left(!opened.settled);
            link.conn = Some(Live {
                ws: opened.ws,
                sock,
                waker,
                generation: cgen,
                in_flight: Default::default(),
                unflushed_mem: 0,
                // At-least-once: remember flushed messages until the peer's TCP acked them.
                // acked: the messages without an id the same way, and those with one for
                // their place in the write order.
                tracked: matches!(
                    self.shared.cfg.delivery,
                    Delivery::AtLeastOnce | Delivery::Acked(_)
                )
                .then(|| Tracked::starting_at(start)),
                dead: None,
                pending_since: None,
                pending_written: 0,
                output_seen: 0,
                probe_out: ProbeOut::None,
                handed: start,
                drains: 0,
                unaccounted: 0,
                buffered: 0,
                exact: opened.settled,
                grown_to: 0,
                hb: HbState::new(now),
                close_sent: false,
                reader: None,
                sent: self.shared.counters.sent.clone(),
            });
            self.shared.set_state(link, State::Open);
            // This connection serves every `reconnect_now` made while it was being built
            // (they collapse into one rebuild). Cleared before `Connected` is emitted, so a
            // call made in reaction to that event replaces this connection.
            self.shared
                .reconnect_requested
                .store(false, Ordering::SeqCst);
            // Emitted before the reader starts, so it precedes this connection's messages.
            self.shared.emit(Event::Connected {
                generation: cgen,
                protocol: opened.protocol,
            });
            cgen
        };
        if cgen > 1 {
            self.shared
                .counters
                .reconnects
                .fetch_add(1, Ordering::Relaxed);
        }
        self.last_error = None;
        let shared = self.shared.clone();
        let reader = std::thread::Builder::new()
            .name(format!("wsbeat-reader-{cgen}"))
            .stack_size(self.shared.cfg.stack_size)
            .spawn(move || crate::reader::run(shared, cgen));
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let e = crate::error::spawn_failure("wsbeat reader", e);
                self.shared
                    .report_dead(cgen, DisconnectReason::Io(e.to_string()));
                let reason = self.teardown(cgen);
                log::warn!("{reason}");
                // `Connected` went out: this connection ends in `Disconnected`, as any.
                self.shared.emit(Event::Disconnected {
                    generation: cgen,
                    reason,
                });
                return Err(Error::io(e));
            }
        };
        if let Some(l) = self.shared.link.lock().live_mut(cgen) {
            l.reader = Some(reader.thread().clone());
        }
        self.reader = Some((cgen, reader));
        let _ = self.shared.timer.send(TimerCmd::Wake);
        Ok(cgen)
    }

    /// Writes the offline queue into connection `cgen`, in order, before direct sends resume.
    fn flush_queue(&self, cgen: u64) {
        let write_timeout = self.shared.cfg.write_timeout;
        loop {
            let mut guard = self.shared.link.lock();
            let link: &mut Link = &mut guard;
            let Some(live) = current_mut(&mut link.conn, cgen).filter(|l| l.dead.is_none()) else {
                return;
            };
            let mut moved = false;
            let mut failed = None;
            loop {
                let again = link.queue.front_is_again();
                let Some((m, ticket)) = link.queue.pop_front() else {
                    break;
                };
                moved = true;
                // Acked delivery: acked while it waited here (the reader runs from the
                // publish on): delivered, not written again (acked probe: 358 of 1000
                // written again, uncounted in `resent`).
                if link
                    .outbox
                    .as_ref()
                    .is_some_and(|o| o.acked_already(ticket))
                {
                    continue;
                }
                match live.write_noted(link.outbox.as_mut(), m, ticket) {
                    // Written again: counted now (an outbox entry counts itself, in
                    // `Outbox::written`).
                    Ok(Written::Buffered) if again && ticket.is_none() => {
                        self.shared.counters.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Written::Buffered) => {}
                    Ok(Written::Full(m)) => {
                        link.queue.push_front(m, ticket, again);
                        break;
                    }
                    Err(e) => {
                        failed = Some(reason_of(&e));
                        break;
                    }
                }
            }
            if moved {
                self.shared.changed.notify_all();
            }
            let flushed = match live.try_flush() {
                Ok(done) => done,
                Err(e) => {
                    failed.get_or_insert(reason_of(&e));
                    false
                }
            };
            if failed.is_none()
                && !flushed
                && live
                    .pending_since
                    .is_some_and(|t| t.elapsed() >= write_timeout)
            {
                // Unless the peer waits for our consumer (`Shared::stall_is_ours`): then
                // this waits on (`close()` and `reconnect_now()` end the wait below).
                if !self.shared.stall_is_ours(live) {
                    failed = Some(DisconnectReason::WriteStalled);
                }
            }
            if let Some(reason) = failed {
                self.shared.mark_dead(link, cgen, reason);
                return;
            }
            if flushed && link.queue.is_empty() {
                link.flushing_queue = false;
                return;
            }
            if flushed {
                continue;
            }
            let sock = live.sock.clone();
            drop(guard);
            // `close()` and `reconnect_now()` are served by `wait_end`, now: a peer that
            // stopped reading must not hold them up for the write timeout (or for good).
            if self.shared.closing.load(Ordering::SeqCst)
                || self.shared.reconnect_requested.load(Ordering::SeqCst)
            {
                return;
            }
            wait_writable(&sock, Duration::from_millis(100));
        }
    }

    /// Waits until connection `cgen` dies, or a close / reconnect-now command.
    fn wait_end(&self, cgen: u64) -> End {
        loop {
            match self.ctl.recv() {
                Ok(Command::Dead(g)) if g == cgen => return End::Died,
                Ok(Command::Dead(_)) => {}
                // The flag stays set until the next connection is published (or the next
                // attempt fails), so concurrent calls collapse into this one rebuild. A
                // command that finds it clear was served by `cgen` itself (stale).
                Ok(Command::ReconnectNow) => {
                    if self.shared.reconnect_requested.load(Ordering::SeqCst) {
                        return End::Reconnect;
                    }
                }
                Ok(Command::Close) | Err(_) => return End::Close,
            }
        }
    }

    /// Client-initiated close: queue a close frame, wait (bounded) for the peer's reply.
    /// With `for_good` false (`reconnect_now`) the state stays `Open` and new sends wait in
    /// the offline queue for the next connection.
    fn close_handshake(&self, cgen: u64, for_good: bool) {
        {
            let mut guard = self.shared.link.lock();
            let link: &mut Link = &mut guard;
            if for_good {
                self.shared.set_state(link, State::Closing);
            } else {
                // Cleared by the teardown; keeps direct sends off the closing connection.
                link.flushing_queue = true;
            }
            let Some(live) = link.alive_mut(cgen) else {
                return;
            };
            live.close_sent = true;
            let frame = CloseFrame {
                code: if for_good {
                    CloseCode::Normal
                } else {
                    CloseCode::Away
                },
                reason: "".into(),
            };
            // The reader reads on to the reply even if the consumer is behind (else the
            // close would wait for its timeout), and is woken to do so.
            self.shared.events.inbound().read_to_end();
            match live.ws.close(Some(frame)) {
                Ok(()) => live.waker.wake(),
                Err(e) if is_would_block(&e) => {
                    live.note_pending();
                    live.waker.wake();
                }
                Err(_) => {
                    self.shared
                        .mark_dead(link, cgen, DisconnectReason::ClosedByUser);
                    return;
                }
            }
        }
        // The reader reports the end (close reply + TCP close) as a death of `cgen`.
        let deadline = after(self.shared.cfg.close_timeout);
        loop {
            select! {
                recv(self.ctl) -> cmd => match cmd {
                    Ok(Command::Dead(g)) if g == cgen => return,
                    Ok(_) => {}
                    Err(_) => return,
                },
                recv(deadline) -> _ => {
                    log::debug!("connection {cgen}: no close reply in time");
                    self.shared.report_dead(cgen, DisconnectReason::ClosedByUser);
                    return;
                }
            }
        }
    }

    /// What was in flight on dead connection `live`, per the delivery mode: back at the
    /// front of the queue (at-least-once: what the peer's TCP did not acknowledge;
    /// acked: every written, unacked message, and the others as at least once), or
    /// handed back (at-most-once).
    fn requeue(&self, link: &mut Link, live: &mut Live) {
        let cgen = live.generation;
        // The user closes: what is left is handed back, not sent again.
        let closing = self.shared.closing.load(Ordering::SeqCst);
        let resend: Vec<(Message, Ticket)> = match &self.shared.cfg.delivery {
            Delivery::AtLeastOnce => {
                let left = live.leftover(closing);
                self.count_possibly_lost(cgen, left.possibly_lost, closing);
                left.resend.into_iter().map(|(m, _)| (m, None)).collect()
            }
            Delivery::AtMostOnce => {
                let messages: Vec<Message> = live.in_flight.drain(..).collect();
                if !messages.is_empty() {
                    self.shared.emit(Event::Unconfirmed {
                        generation: cgen,
                        messages,
                    });
                }
                Vec::new()
            }
            Delivery::Acked(_) => {
                let outbox = link.outbox.as_mut().expect("acked delivery");
                // Every written, unacked message with an id: the outbox sends it again.
                let unacked = outbox.take_written();
                // Without an id, like at least once: what the peer's TCP did not take.
                let left = live.leftover(closing);
                self.count_possibly_lost(cgen, left.possibly_lost, closing);
                // One write order: the unacked ones whose first write here the peer's
                // TCP took (written before everything it did not take), then what it did
                // not take, each once. An outbox entry counts by its first write, and
                // only while unacked (ids may be reused once acked or dropped).
                let waiting: HashSet<u64> = unacked.iter().map(|(seq, _)| *seq).collect();
                let mut later = HashSet::new();
                let mut tail = Vec::with_capacity(left.resend.len());
                for (m, seq) in left.resend {
                    match seq {
                        None => tail.push((m, None)),
                        Some(seq) if waiting.contains(&seq) && later.insert(seq) => {
                            tail.push((m, Some(seq)));
                        }
                        Some(_) => {}
                    }
                }
                let mut resend: Vec<(Message, Ticket)> = unacked
                    .into_iter()
                    .filter(|(seq, _)| !later.contains(seq))
                    .map(|(seq, m)| (m, Some(seq)))
                    .collect();
                resend.extend(tail);
                resend
            }
        };
        if !resend.is_empty() {
            log::debug!(
                "connection {cgen}: {} messages back to the queue",
                resend.len()
            );
            link.queue.requeue_front(resend.into_iter(), true);
        }
    }

    /// Counts (and logs) `n` messages of connection `cgen` that may be lost: the peer's
    /// TCP acknowledged them after its last sign of life (or, `closing`, they were sent
    /// whole but not acknowledged).
    fn count_possibly_lost(&self, cgen: u64, n: u64, closing: bool) {
        if n == 0 {
            return;
        }
        log::warn!(
            "connection {cgen}: {n} messages acknowledged by the peer's TCP after its last \
             sign of life{}: possibly lost",
            if closing {
                ", or sent but not acknowledged when the client closed"
            } else {
                ""
            }
        );
        self.shared
            .counters
            .possibly_lost
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Whether connection `cgen` was marked dead (it may still be published).
    fn is_dead(&self, cgen: u64) -> bool {
        let link = self.shared.link.lock();
        link.live(cgen).is_some_and(|l| l.dead.is_some())
    }

    /// Takes connection `cgen` out of the link, puts its in-flight messages back at the
    /// front of the queue (per the delivery mode), shuts the socket and joins the reader.
    fn teardown(&mut self, cgen: u64) -> DisconnectReason {
        let reader = self
            .reader
            .take_if(|(g, _)| *g == cgen)
            .map(|(_, reader)| reader);
        let live = {
            let mut guard = self.shared.link.lock();
            let link: &mut Link = &mut guard;
            link.flushing_queue = false;
            match link.take_live(cgen) {
                Some(mut live) => {
                    self.requeue(link, &mut live);
                    if matches!(link.state, State::Open) {
                        self.shared.set_state(link, State::Connecting);
                    }
                    Some(live)
                }
                None => None,
            }
        };
        let mut reason = DisconnectReason::ClosedByUser;
        if let Some(mut live) = live {
            reason = live.dead.take().unwrap_or(DisconnectReason::ClosedByUser);
            // Not while closing: that would flush what `requeue` just handed back.
            if !self.shared.closing.load(Ordering::SeqCst)
                && matches!(
                    reason,
                    DisconnectReason::HeartbeatTimeout { .. }
                        | DisconnectReason::WriteStalled
                        | DisconnectReason::ReconnectRequested
                )
            {
                // Best effort, never waits: the peer is probably gone.
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "".into(),
                };
                let _ = live.ws.close(Some(frame));
            }
            Shared::shutdown_socket(&live.sock);
            live.waker.wake();
            if let Some(r) = reader {
                let _ = r.join();
            }
        } else if let Some(r) = reader {
            let _ = r.join();
        }
        reason
    }

    /// Final state: closed. Stops the timer, then hands back what was never sent: to the
    /// `close()` that joins this thread (it returns them, then emits `Closed`), or, when
    /// nobody will (gave up on its own, or closed from a callback on this thread), as
    /// `Undelivered` followed by `Closed`. `give_up` is the last failure, if it gave up.
    fn finish(mut self, give_up: Option<Error>) -> Vec<Message> {
        let undelivered = {
            let mut guard = self.shared.link.lock();
            let link: &mut Link = &mut guard;
            self.shared.set_state(link, State::Closed);
            // Every unacked message is in the queue by now (teardown put them back); one
            // acked while it waited there is delivered, not handed back.
            let queued = link.queue.drain_all();
            match link.outbox.as_mut() {
                Some(o) => o.hand_back(queued),
                None => queued.into_iter().map(|(m, _)| m).collect(),
            }
        };
        if let Some(last) = give_up {
            let e = Error::GaveUp {
                attempts: self.failures.max(1),
                last: Box::new(last),
            };
            log::warn!("{e}");
            self.shared.emit(Event::GaveUp(e));
        }
        let _ = self.shared.timer.send(TimerCmd::Stop);
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        // `close()` sets `closing` before it joins us (or, on this very thread, sets
        // `orphaned` before we get here), so this cannot miss a closer that will join.
        if self.shared.closing.load(Ordering::SeqCst)
            && !self.shared.orphaned.load(Ordering::SeqCst)
        {
            undelivered
        } else {
            if !undelivered.is_empty() {
                self.shared.emit(Event::Undelivered(undelivered));
            }
            self.shared.emit_closed();
            Vec::new()
        }
    }
}
