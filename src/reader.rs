//! The reader thread of one connection.
//!
//! It waits for the socket with `poll(2)` without holding the lock, then takes the lock
//! and drains in nonblocking mode: `read()` until `WouldBlock` (tungstenite and OpenSSL
//! buffer whole frames, so one read per wake-up would lose messages), at most
//! `read_budget` messages and `READ_QUOTA` bytes per lock hold, then `unlock_fair` so
//! writers get in. The messages of one drain go to the user as one batch, after the lock
//! is released (one channel send and at most one wake-up per drain, not per message).
//!
//! While the event channel is full (`event_capacity`) the reader does not read: it waits
//! in `poll` for the consumer to make room (the consumer writes to this connection's
//! waker), for a hang-up of the socket, or for a flush request, holding no lock. TCP
//! then pushes back on the server. The heartbeat knows (`Inbound::held_back`): unread
//! input counts as traffic, so a slow consumer never gets a live peer declared dead.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::MutexGuard;

use crate::link::{POLLIN, POLLOUT, Shared, is_would_block, poll2, reason_of};
use crate::{DisconnectReason, Event, Message};

/// Most bytes one lock hold reads from the socket (besides at most `read_budget` messages).
const READ_QUOTA: usize = 256 << 10;

/// Detaches the reader from the inbound hand-off however it ends.
struct Attached<'a>(&'a crate::inbound::Inbound);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// Runs until connection `cgen` is dead or replaced.
pub(crate) fn run(shared: Arc<Shared>, cgen: u64) {
    let (sock, waker) = {
        let link = shared.link.lock();
        match link.conn.as_ref().filter(|l| l.generation == cgen) {
            Some(l) => (l.sock.clone(), l.waker.clone()),
            None => return,
        }
    };
    let fd = sock.as_raw_fd();
    let inbound = shared.events.inbound().clone();
    inbound.attach(waker.clone());
    let _attached = Attached(&inbound);
    let budget = shared.cfg.read_budget;
    let surface_pings = shared.cfg.surface_pings;
    let hb = &shared.cfg.heartbeat;
    let mut want_write = false;
    // Drain once before the first poll: frames that arrived with the upgrade response (or
    // were left by an on_connect hook) already sit in tungstenite's (or OpenSSL's) buffer,
    // and poll would never report them.
    let mut more = true;
    let mut out: VecDeque<Event> = VecDeque::with_capacity(budget);
    loop {
        // Bytes arrived on the socket (perhaps only part of a large frame).
        let mut bytes_in = false;
        // Read this time (false: held back by a full event channel).
        let mut read = true;
        let held = inbound.is_full() && inbound.hold(more);
        if held || !more {
            // Wait without the lock. Hang-up and errors wake us too (shutdown by teardown),
            // also while held back: `poll` reports them whatever was asked for.
            let mut events = if want_write { POLLOUT } else { 0 };
            if !held {
                events |= POLLIN;
            }
            let stall = if held { inbound.stall_deadline() } else { None };
            let timeout = stall.map(|t| t.saturating_duration_since(Instant::now()));
            match poll2((fd, events), Some((waker.rx.as_raw_fd(), POLLIN)), timeout) {
                Ok((r, w)) => {
                    bytes_in = r & POLLIN != 0;
                    if w != 0 {
                        waker.drain();
                    }
                    if held {
                        if r == 0 && w == 0 {
                            inbound.report_stall();
                        }
                        let hang_up = r & (libc::POLLHUP | libc::POLLERR) != 0;
                        read = hang_up || !inbound.is_full();
                        if read {
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
        let mut link = shared.link.lock();
        let Some(live) = link.conn.as_mut().filter(|l| l.generation == cgen) else {
            return;
        };
        if live.dead.is_some() {
            return;
        }
        let mut dead = None;
        let mut n = 0;
        // Messages for the user in this drain, and their payload bytes.
        let (mut msgs, mut bytes) = (0, 0);
        if read {
            more = false;
        }
        let now = Instant::now();
        if bytes_in {
            // Liveness even while a reply is stuck behind a frame still arriving.
            live.hb.on_bytes(now);
        }
        // tungstenite's `read()` loops over frames until a whole message is in: a peer
        // that never completes one (endless empty fragments) would keep us here for
        // good. Past the quota the socket reports WouldBlock, so the lock is let go.
        live.ws.get_mut().set_read_quota(Some(READ_QUOTA));
        while read {
            // Let a waiting sender in after at least one message.
            if n >= budget || (n > 0 && shared.writers.load(Ordering::Relaxed) > 0) {
                more = true;
                break;
            }
            match live.ws.read() {
                Ok(msg) => {
                    n += 1;
                    let consumed = live.hb.on_inbound(hb, &msg, now);
                    match msg {
                        Message::Text(_) | Message::Binary(_) if !consumed => {
                            msgs += 1;
                            bytes += msg.len();
                            out.push_back(Event::Message(msg));
                        }
                        Message::Ping(_) | Message::Pong(_) if surface_pings => {
                            out.push_back(Event::Message(msg));
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
        // Send queued pongs, close replies and output left by `try_send`.
        match live.try_flush() {
            Ok(done) => want_write = !done,
            Err(e) => {
                if dead.is_none() {
                    dead = Some(reason_of(&e));
                }
            }
        }
        let stop = dead.is_some();
        if let Some(reason) = dead {
            shared.mark_dead(&mut link, cgen, reason);
        }
        MutexGuard::unlock_fair(link);
        shared.wake_senders();
        if !out.is_empty() {
            shared
                .counters
                .received
                .fetch_add(msgs as u64, Ordering::Relaxed);
            // One channel send for the whole drain.
            shared.events.emit_messages(&mut out, msgs, bytes);
        }
        if stop {
            return;
        }
        shared.wait_for_senders();
    }
}
