//! The lock-free transport: everything between a URL and an open WebSocket, and the
//! socket primitives the threads wait on. Nothing here takes the link lock or knows the
//! threads; it imports only the types and settings below it.
//!
//! - [`sys`]: `poll`/`WSAPoll`, the waker, raw descriptors (one file per platform);
//! - [`dial`]: DNS and Happy Eyeballs, cancellable, under one deadline;
//! - [`socks`]: SOCKS4a/5 handshakes ([`connect`] does HTTP CONNECT);
//! - [`tls`]: the TLS handshake under the connect deadline, per backend;
//! - [`stream`]: the byte stream under the WebSocket (deadline, read quota, offsets);
//! - [`connect`]: proxy, TLS and upgrade (with redirects) into a [`stream::Ws`];
//! - [`session`]: the fresh connection given to the `on_connect` hook.

pub(crate) mod connect;
pub(crate) mod dial;
pub(crate) mod session;
pub(crate) mod socks;
pub(crate) mod stream;
pub(crate) mod sys;
pub(crate) mod tls;
