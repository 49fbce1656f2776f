//! The timer thread: sends heartbeat probes, judges replies and write stalls, re-sends
//! overdue acked messages. What to do and when is decided by the pure
//! [`evaluate`](crate::heartbeat::evaluate); this file only applies it under the lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, after, select};

use crate::heartbeat::{Step, evaluate};
use crate::link::{ProbeOut, Shared, TimerCmd};
use crate::time::deadline;
use crate::transport::stream::reason_of;
use crate::{DisconnectReason, Event};

/// How soon the timer tries again to write a probe that did not fit in the buffer.
const PROBE_RETRY: Duration = Duration::from_millis(20);

/// How often the timer looks again while a connection's deadline waits for its reader
/// to read the input that was waiting when it passed (see [`Grace`]).
const GRACE_STEP: Duration = Duration::from_millis(5);

/// A heartbeat deadline that passed while input waited unread in the socket: a reply
/// may be in it. The process may have been paused (a stopped process, a VM that was not
/// scheduled, swapping) while the reply arrived, and the timer then runs before the
/// reader. The verdict waits until the reader has drained once (it was woken by the
/// same input), at most the longer of the heartbeat's timeout and interval (passive mode
/// has no timeout: its grace would end at the first look again, and a reader that a busy
/// machine keeps off the CPU for a few ms would get a live link killed). A dead or
/// half-open link brings no input,
/// so this never delays its detection; a peer that keeps sending without answering is
/// judged after the reader's next drain.
struct Grace {
    generation: u64,
    drains: u64,
    until: Instant,
}

/// The timer thread: probes, deadlines, write-stall detection.
pub(crate) fn run(shared: Arc<Shared>, ctl: Receiver<TimerCmd>) {
    let hb = shared.cfg.heartbeat.clone();
    let write_timeout = shared.cfg.write_timeout;
    let mut grace: Option<Grace> = None;
    loop {
        let mut wake_at: Option<Instant> = None;
        {
            let mut event = None;
            let mut link = shared.link.lock();
            // Read after the lock: taken before, a wait for a lock held long (a slow
            // reply matcher or `Acks` reader runs under it) dated a probe written now in
            // the past, its reply deadline already gone (callback probe: a live peer
            // killed in the millisecond its probe went out).
            let now = Instant::now();
            if let Some(live) = link.conn.as_mut().filter(|l| l.takes_data()) {
                let cgen = live.generation;
                // Write stall: output pending longer than the write timeout.
                let stall = live.pending_since.map(|t| deadline(t, write_timeout));
                let mut dead = None;
                if let Some(due) = stall {
                    // Give the socket one more chance to drain before judging.
                    match live.try_flush() {
                        Ok(true) => {}
                        Ok(false) if now >= due => {
                            if shared.stall_is_ours(live) {
                                // The peer waits for our consumer (see `stall_is_ours`):
                                // looked at again later (the reader's next read restarts
                                // the clock).
                                wake_at = Some(deadline(now, write_timeout));
                            } else {
                                dead = Some(DisconnectReason::WriteStalled);
                            }
                        }
                        Ok(false) => wake_at = Some(due),
                        Err(e) => dead = Some(reason_of(&e)),
                    }
                }
                if dead.is_none()
                    && let Some(left) = shared.events.inbound().held_back()
                {
                    // The consumer is behind: the reader does not read, so replies wait
                    // unread. Unread input proves the peer alive (see `HbState::held_back`):
                    // what the reader left above the socket, at the hold's start; what
                    // waits in the socket, now.
                    let inbound = shared.events.inbound();
                    if left && let Some(since) = inbound.held_since() {
                        live.hb.held_back(since);
                    }
                    if live.input_waits() {
                        live.hb.held_back(now);
                    }
                }
                if dead.is_none() && live.output_moved() {
                    live.hb.output_moved(&hb, now);
                }
                // A probe that did not fit in our buffer: write it now if it fits, else
                // look again soon.
                if dead.is_none()
                    && live.probe_out == ProbeOut::Unwritten
                    && let Some((seq, _)) = live.hb.probe
                    && let Err(e) = live.write_probe(hb.probe_message(seq))
                {
                    dead = Some(reason_of(&e));
                }
                if dead.is_none() {
                    loop {
                        match evaluate(&hb, &mut live.hb, now) {
                            None => {
                                grace = None;
                                break;
                            }
                            Some(Step::SleepUntil(t)) => {
                                grace = None;
                                sooner(&mut wake_at, t);
                                break;
                            }
                            Some(Step::Dead(r)) => {
                                let unread = live.input_waits();
                                match grace.as_ref().filter(|g| g.generation == cgen) {
                                    None if unread => {
                                        log::debug!(
                                            "connection {cgen}: heartbeat deadline passed with \
                                             input unread; waiting for the reader"
                                        );
                                        grace = Some(Grace {
                                            generation: cgen,
                                            drains: live.drains,
                                            until: deadline(now, hb.timeout().max(hb.interval())),
                                        });
                                    }
                                    Some(g)
                                        if unread && g.drains == live.drains && now < g.until => {}
                                    _ => {
                                        dead = Some(r);
                                        break;
                                    }
                                }
                                sooner(&mut wake_at, deadline(now, GRACE_STEP));
                                break;
                            }
                            Some(step) => {
                                let (msg, seq) = match step {
                                    Step::Missed(missed, msg, seq) => {
                                        event = Some(Event::HeartbeatMissed {
                                            generation: cgen,
                                            missed,
                                        });
                                        (msg, seq)
                                    }
                                    Step::Probe(msg, seq) => (msg, seq),
                                    _ => unreachable!("handled above"),
                                };
                                live.hb.next_seq += 1;
                                live.hb.probe = Some((seq, now));
                                log::trace!("connection {cgen}: heartbeat probe {seq}");
                                if let Err(e) = live.write_probe(msg) {
                                    dead = Some(reason_of(&e));
                                    break;
                                }
                                // Loop once more to get the reply deadline.
                            }
                        }
                    }
                }
                if dead.is_none()
                    && live.probe_out == ProbeOut::Unwritten
                    && live.hb.probe.is_some()
                {
                    // Try the probe that did not fit again soon.
                    sooner(&mut wake_at, deadline(now, PROBE_RETRY));
                }
                if let Some(reason) = dead {
                    log::info!("connection {cgen}: {reason}");
                    shared.mark_dead(&mut link, cgen, reason);
                    wake_at = None;
                }
            }
            // Acked delivery: messages whose ack is overdue are written again.
            if let Some(t) = shared.resend_overdue(&mut link, now) {
                sooner(&mut wake_at, t);
            }
            // Under the lock (an unbounded channel, rule 4): were we to let go first, a
            // teardown could slip in and emit this connection's `Disconnected` (or the
            // next one's `Connected`) before it.
            if let Some(ev) = event {
                shared.emit(ev);
            }
        }
        let timeout = match wake_at {
            Some(t) => after(t.saturating_duration_since(Instant::now())),
            None => crossbeam_channel::never(),
        };
        select! {
            recv(ctl) -> cmd => match cmd {
                Ok(TimerCmd::Wake) => {}
                Ok(TimerCmd::Stop) | Err(_) => return,
            },
            recv(timeout) -> _ => {}
        }
    }
}

/// Makes `wake_at` `t` if that is sooner (or it was unset).
fn sooner(wake_at: &mut Option<Instant>, t: Instant) {
    *wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
}
