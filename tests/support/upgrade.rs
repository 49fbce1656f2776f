//! The server side of a WebSocket upgrade by hand, for tests that script the bytes after
//! it (frames in the same write as the response, a response that never comes, 1xx
//! answers first).
//!
//! Standalone (std and tungstenite only): also compiled into the crate's own unit tests
//! (`src/client.rs`, with `#[path]`), which cannot use the rest of this support code.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;

/// Reads an upgrade request head from `s` byte by byte (nothing past it). Returns the
/// head and the `Sec-WebSocket-Accept` value that answers its key.
pub fn read_upgrade_request(s: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).expect("request head") == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("a text head");
    let key = websocket_key(&head).expect("a Sec-WebSocket-Key");
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    (head, accept)
}

/// The `Sec-WebSocket-Key` of a request head, if it has one.
pub fn websocket_key(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    })
}
