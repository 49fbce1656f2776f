//! # wsbeat
//!
//! A blocking, thread-based WebSocket client for synchronous Rust that keeps its
//! connection alive on its own: connect timeouts that cover TCP, TLS and the upgrade,
//! a heartbeat that detects dead and half-open links within `interval + timeout`,
//! automatic reconnection with exponential backoff and jitter, an offline queue, and
//! typed events. No async runtime.
//!
//! ```no_run
//! use std::time::Duration;
//! use wsbeat::{Client, Event, Heartbeat};
//!
//! let client = Client::builder("wss://example.com/feed")
//!     .connect_timeout(Duration::from_secs(5))
//!     .header("Authorization", "Bearer t0ken") // never logged
//!     .heartbeat(Heartbeat::ping(Duration::from_secs(15), Duration::from_secs(10)))
//!     .connect()?;                             // blocks until open or a typed error
//!
//! let sender = client.clone();                 // Client is Clone + Send + Sync
//! std::thread::spawn(move || sender.send_text("hello"));
//!
//! for event in client.events() {
//!     match event {
//!         Event::Message(m) => println!("{m}"),
//!         Event::Disconnected { reason, .. } => eprintln!("lost: {reason}"),
//!         Event::Reconnecting { delay, .. } => eprintln!("retrying in {delay:?}"),
//!         Event::Closed => break,
//!         _ => {}
//!     }
//! }
//! # Ok::<(), wsbeat::Error>(())
//! ```
//!
//! ## Threads
//! Each client runs a reader thread per connection, one timer (heartbeat) thread and
//! one supervisor (reconnect) thread. They share the socket behind one lock, and no
//! thread ever waits for the network while holding it (see `src/link.rs`). A thread
//! waiting in [`Events::recv`] with nothing buffered reads the socket itself, under the
//! same lock and rules, so a consumer that keeps up gets messages without a hand-off.
//! [`Client::close`] and dropping the last handle join them all.
//!
//! ## Layers (for readers of the source)
//! Imports point down only:
//!
//! ```text
//! user API      builder.rs (ClientBuilder), client.rs (Client, WeakClient, Stats)
//! threads       reader.rs (one per connection; also the read a waiting consumer makes),
//!               timer.rs, reconnect.rs (supervisor)
//! shared state  link.rs (the socket behind the lock, and every lock rule),
//!               inbound.rs (the bounded hand-off to the user, the event grammar)
//! transport     transport/: sys (poll, waker), dial, socks, tls, stream, connect,
//!               session (lock-free: nothing here takes a lock or knows a thread)
//! settings      config.rs, tls_config.rs
//! types         error.rs, event.rs, backoff.rs, heartbeat.rs (the pure decision),
//!               outbox.rs, queue.rs, redact.rs, time.rs
//! ```
//!
//! ## What "nothing lost" means
//! A message accepted by `send` (it returned `Ok`) is either handed to the OS on some
//! connection, or handed back: in an error, in [`Event::Undelivered`], or in the
//! return value of [`Client::close`]. What happens to messages in flight when a
//! connection dies is a choice ([`ClientBuilder::delivery`]): sent again on the next
//! connection, so a message can arrive twice ([`Delivery::AtLeastOnce`], the default;
//! what the peer's TCP never acknowledged is re-sent exactly), handed back
//! ([`Delivery::AtMostOnce`]), or kept until the server acks it ([`Delivery::Acked`]).
//! [`Client::send_all`] sends a batch with one flush. See `RELIABILITY.md`.
//!
//! ## Platforms and TLS
//! Linux, the BSDs and macOS (`poll(2)`) and Windows (`WSAPoll`). `wss://` uses the
//! platform's TLS through `native-tls` (default feature; `native-tls-vendored` builds
//! OpenSSL from source), or pure-Rust `rustls` with the platform's roots (feature
//! `rustls`, plus `webpki-roots` for Mozilla's). Built with neither, a `wss://` URL is
//! [`Error::NoTls`]. The README says what is tested where.

#![warn(missing_docs)]

// Types: errors, events, policies (import nothing above them).
mod backoff;
mod error;
mod event;
mod heartbeat;
mod outbox;
mod queue;
mod redact;
mod time;
mod tls_config;
// Settings.
mod config;
// Lock-free transport: sockets, poll, waker, dial, proxies, TLS, the upgrade.
mod transport;
// Shared state and every lock rule; the inbound hand-off and the event grammar.
mod inbound;
mod link;
// The threads: one file each.
mod reader;
mod reconnect;
mod timer;
// The user API.
mod builder;
mod client;

pub use backoff::{Backoff, Failure, ReconnectPolicy};
pub use builder::ClientBuilder;
pub use client::{Client, Stats, WeakClient};
pub use config::{
    Attempt, DEFAULT_ATTEMPT_DELAY, DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONSUMER_STALL_TIMEOUT, DEFAULT_EVENT_CAPACITY_BYTES, DEFAULT_EVENT_CAPACITY_MESSAGES,
    DEFAULT_EVENT_SPIN, DEFAULT_MAX_REDIRECTS, DEFAULT_WRITE_TIMEOUT, Limits, MAX_CLOSE_TIMEOUT,
    MAX_EVENT_SPIN, MAX_READ_BUFFER_SIZE, MAX_THREAD_STACK_SIZE, OverflowPolicy, Request,
    TcpKeepalive,
};
pub use error::{
    ConnectStage, DisconnectReason, Error, RedirectRefusal, Result, SocksFailure, TlsErrorKind,
};
pub use event::{Event, State};
pub use heartbeat::{Heartbeat, Liveness, ReplyMatcher};
pub use inbound::{Batch, BatchIter, CONTROL_EVENT_CAP, Events, IntoIter, Iter, TryIter};
/// Re-exported for [`ClientBuilder::tls_connector`] (the same version wsbeat uses).
#[cfg(feature = "native-tls")]
pub use native_tls;
pub use outbox::{Acks, Delivery, IdReader};
/// Re-exported for [`ClientBuilder::rustls_config`] (the same version wsbeat uses).
#[cfg(feature = "rustls")]
pub use rustls;
pub use tls_config::Identity;
pub use transport::session::Session;
pub use tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
pub use tungstenite::{Bytes, Message};

/// The README's code blocks, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
