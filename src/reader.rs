//! The reader thread of one connection.
//!
//! It waits for the socket with `poll(2)` without holding the lock, then takes the lock
//! and drains in nonblocking mode: `read()` until `WouldBlock` (tungstenite and OpenSSL
//! buffer whole frames, so one read per wake-up would lose messages), at most
//! `read_budget` messages and `READ_QUOTA` bytes per lock hold, then `unlock_fair` so
//! writers get in. Events are sent to the user after the lock is released.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::MutexGuard;

use crate::link::{Link, Shared, is_would_block, reason_of};
use crate::sys::{POLLIN, POLLOUT, poll2, raw};
use crate::{DisconnectReason, Event, Message};

/// Most bytes one lock hold reads from the socket (besides at most `read_budget` messages).
const READ_QUOTA: usize = 256 << 10;

/// Runs until connection `cgen` is dead or replaced.
pub(crate) fn run(shared: Arc<Shared>, cgen: u64) {
    let (sock, waker) = {
        let link = shared.link.lock();
        match link.conn.as_ref().filter(|l| l.generation == cgen) {
            Some(l) => (l.sock.clone(), l.waker.clone()),
            None => return,
        }
    };
    let fd = raw(&*sock);
    let budget = shared.cfg.read_budget;
    let surface_pings = shared.cfg.surface_pings;
    let hb = &shared.cfg.heartbeat;
    let mut want_write = false;
    // Drain once before the first poll: frames that arrived with the upgrade response (or
    // were left by an on_connect hook) already sit in tungstenite's (or OpenSSL's) buffer,
    // and poll would never report them.
    let mut more = true;
    let mut out: Vec<Event> = Vec::with_capacity(budget);
    loop {
        // Bytes arrived on the socket (perhaps only part of a large frame).
        let mut bytes_in = false;
        if !more {
            // Wait without the lock. Hang-up and errors wake us too (shutdown by teardown).
            let events = if want_write { POLLIN | POLLOUT } else { POLLIN };
            match poll2((fd, events), Some((raw(&waker.rx), POLLIN)), None) {
                Ok((r, w)) => {
                    bytes_in = r & POLLIN != 0;
                    if w != 0 {
                        waker.drain();
                    }
                }
                Err(e) => {
                    shared.report_dead(cgen, DisconnectReason::Io(e.to_string()));
                    return;
                }
            }
        }
        let mut link = shared.link.lock();
        let l: &mut Link = &mut link;
        let Some(live) = l.conn.as_mut().filter(|l| l.generation == cgen) else {
            return;
        };
        let mut outbox = l.outbox.as_mut();
        let acked_before = outbox.as_ref().map(|o| o.acked);
        if live.dead.is_some() {
            return;
        }
        let mut dead = None;
        let mut n = 0;
        more = false;
        let now = Instant::now();
        if bytes_in {
            // Liveness even while a reply is stuck behind a frame still arriving.
            live.hb.on_bytes(now);
        }
        // tungstenite's `read()` loops over frames until a whole message is in: a peer
        // that never completes one (endless empty fragments) would keep us here for
        // good. Past the quota the socket reports WouldBlock, so the lock is let go.
        live.ws.get_mut().set_read_quota(Some(READ_QUOTA));
        loop {
            // Let a waiting sender in after at least one message.
            if n >= budget || (n > 0 && shared.writers.load(Ordering::Relaxed) > 0) {
                more = true;
                break;
            }
            match live.ws.read() {
                Ok(msg) => {
                    n += 1;
                    let consumed = live.hb.on_inbound(hb, &msg, now)
                        || outbox.as_mut().is_some_and(|o| o.on_inbound(&msg));
                    match msg {
                        Message::Text(_) | Message::Binary(_) if !consumed => {
                            out.push(Event::Message(msg));
                        }
                        Message::Ping(_) | Message::Pong(_) if surface_pings => {
                            out.push(Event::Message(msg));
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
        if outbox.is_some_and(|o| Some(o.acked) != acked_before) {
            // Acks made room for senders waiting under `OverflowPolicy::Block`.
            shared.changed.notify_all();
        }
        let stop = dead.is_some();
        if let Some(reason) = dead {
            shared.mark_dead(&mut link, cgen, reason);
        }
        MutexGuard::unlock_fair(link);
        shared.wake_senders();
        let received = out.len() as u64;
        if received > 0 {
            shared
                .counters
                .received
                .fetch_add(received, Ordering::Relaxed);
            for ev in out.drain(..) {
                shared.emit(ev);
            }
        }
        if stop {
            return;
        }
        shared.wait_for_senders();
    }
}
