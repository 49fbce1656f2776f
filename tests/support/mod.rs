//! Shared integration-test support. Each `tests/*.rs` includes it with `mod support;`.
//!
//! - [`certs`]: the checked-in test PKI (`tests/certs/`) as bytes / native-tls types.
//! - [`server`]: [`server::TestServer`], an in-process WebSocket server with scripted behaviours.
//! - [`proxy`]: [`proxy::FaultProxy`], a TCP proxy that can blackhole, delay, cut and reset.
//! - [`util`]: process counters (threads, fds, RSS) and [`util::wait_until`].
//! - [`net`]: small socket helpers (RST via `SO_LINGER` 0, `poll`).
//! - [`hung`]: [`hung::HungListener`], a loopback address where a TCP connect hangs.
//! - [`client`]: a fixed-delay reconnect policy and a panic counter for `wsbeat-*` threads.
//! - [`upgrade`]: the server side of an upgrade by hand, for scripted bytes after it.
//!
//! ```ignore
//! let server = TestServer::echo();                  // ws://127.0.0.1:PORT/
//! let proxy = FaultProxy::start(server.addr());     // client -> proxy -> server
//! /* connect the client to proxy.url() */
//! assert!(server.wait_upgraded(1, Duration::from_secs(10)));
//! proxy.blackhole();                                // half-open link
//! server.restart();                                 // same port
//! ```
//!
//! Everything binds loopback only, every wait has a deadline, and every thread started
//! here is joined by `stop()` / Drop. Support threads are named `test-server*` and
//! `fault-proxy*` ([`util::support_threads`]). Tests that measure process-wide numbers
//! take [`util::exclusive`]; the other tests of that binary take [`util::shared`].
#![allow(dead_code)]

pub mod certs;
pub mod client;
pub mod hung;
pub mod net;
pub mod proxy;
pub mod server;
pub mod upgrade;
pub mod util;
