//! Goal 5: Dead-peer detection with a blackholed link. The client talks to the echo server
//! through [`Proxy`]; at a random point of the heartbeat cycle the proxy starts dropping
//! every byte in both directions without closing anything.
//!
//! Zero point: detection is due at `last_inbound + interval + timeout`, where
//! `last_inbound` is the last time server bytes (a pong) reached the client. The proxy
//! stamps the moment just before it forwards server bytes, so our `last_inbound` is never
//! later than the client's own: the lateness we report can only be overestimated.
//! Detection time is when the user receives `Event::Disconnected { HeartbeatTimeout }`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use wsbeat::{DisconnectReason, Event, Heartbeat};

use crate::proxy::Proxy;
use crate::server::Server;
use crate::util::{self, Fixed, Rng, fmt_us, ns_of, summarize, us};
use crate::{Met, Opts, Row};

const GOAL_US: f64 = 5000.0;

pub fn run(o: &Opts, notes: &mut Vec<String>) -> Vec<Row> {
    let interval = Duration::from_millis(200);
    let timeout = Duration::from_millis(200);
    let samples = o.pick(20, 5);
    let srv = Server::start(false);
    let proxy = Proxy::start(srv.addr);
    let client = util::builder(&format!("ws://{}/echo", proxy.addr))
        .heartbeat(Heartbeat::ping(interval, timeout))
        .reconnect_policy(Fixed(Duration::ZERO))
        .connect()
        .expect("wsbeat connect");
    let rx = client.events();
    let mut rng = Rng::new();
    let (mut late, mut internal, mut after_bh) = (Vec::new(), Vec::new(), Vec::new());
    let mut other = Vec::new();
    for s in 0..samples {
        if s > 0 {
            util::wait_event(&rx, Duration::from_secs(5), |e| {
                matches!(e, Event::Connected { .. })
            })
            .expect("reconnected");
        }
        // Past the first heartbeat cycle, at a random phase of the next one.
        std::thread::sleep(interval.mul_f64(1.25 + rng.unit()));
        let conn = proxy.latest().expect("proxied connection");
        conn.blackhole.store(true, Ordering::SeqCst);
        let t_bh = std::time::Instant::now();
        let (ev, t_det) = util::wait_event(&rx, Duration::from_secs(5), |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .expect("dead peer detected");
        let last = conn.last_to_client_ns.load(Ordering::SeqCst);
        let due = last + (interval + timeout).as_nanos() as u64;
        late.push((ns_of(t_det) as f64 - due as f64) / 1e3);
        after_bh.push(us(t_det - t_bh));
        match ev {
            Event::Disconnected {
                reason: DisconnectReason::HeartbeatTimeout { silent_for },
                ..
            } => internal.push(us(silent_for) - us(interval + timeout)),
            Event::Disconnected { reason, .. } => other.push(reason.to_string()),
            _ => unreachable!(),
        }
    }
    let _ = client.close();
    let (l, i, b) = (summarize(&late), summarize(&internal), summarize(&after_bh));
    println!(
        "  lateness (user sees Disconnected): n={} p50 {} p99 {} max {}; timer's own silent_for - 400 ms: p50 {} max {}; blackhole -> detected: p50 {} (between 200 and 400 ms by design)",
        l.n,
        fmt_us(l.p50),
        fmt_us(l.p99),
        fmt_us(l.max),
        fmt_us(i.p50),
        fmt_us(i.max),
        fmt_us(b.p50)
    );
    if !other.is_empty() {
        notes.push(format!(
            "Dead peer: unexpected disconnect reasons: {other:?}"
        ));
    }
    notes.push(format!(
        "Dead peer: Heartbeat::ping(200 ms, 200 ms), {samples} blackholes at random phases; \
         lateness = Disconnected received - (last server bytes forwarded to the client + 400 ms). \
         Timer's own view (DisconnectReason silent_for - 400 ms): p50 {}, max {}.",
        fmt_us(i.p50),
        fmt_us(i.max)
    ));
    vec![
        Row::new(
            "dead-peer detection lateness past interval+timeout, median",
            "n/a (no heartbeat)",
            fmt_us(l.p50),
            "-",
            "< 5 ms",
            Met::from(l.p50 < GOAL_US && other.is_empty()),
        ),
        Row::new(
            format!("dead-peer detection lateness, p99 / max (n={})", l.n),
            "n/a",
            format!("{} / {}", fmt_us(l.p99), fmt_us(l.max)),
            "-",
            "-",
            Met::Info,
        ),
    ]
}
