//! Interop with a real third-party server: Python `websockets` 17 (tests/peers/echo_server.py).
//!
//! Skipped with a loud message when the peer is not installed (`sh .ci/install-peers.sh`);
//! a failure instead when `WSBEAT_REQUIRE_PEERS=1`. The cases live in
//! `interop_support/echo.rs` and are shared with the other echo-server suite.

mod interop_support;

use interop_support::echo::{self, Kind};

const KIND: Kind = Kind::Python;

#[test]
fn echo_text_binary_and_headers() {
    echo::case_echo(KIND);
}

#[test]
fn heartbeat_pings_are_answered() {
    echo::case_heartbeat_ping_pong(KIND);
}

#[test]
fn server_pings_are_answered() {
    echo::case_server_pings(KIND);
}

#[test]
fn server_close_with_code_and_reason_then_reconnect() {
    echo::case_server_close(KIND);
}

#[test]
fn server_close_without_reconnect_gives_up() {
    echo::case_server_close_no_reconnect(KIND);
}

#[test]
fn large_and_fragmented_messages() {
    echo::case_large_fragmented(KIND);
}

#[test]
fn server_that_stops_reading_is_detected_by_heartbeat() {
    echo::case_stop_reading(KIND);
}

#[test]
fn server_that_stops_reading_but_keeps_sending_is_detected_by_strict_heartbeat() {
    echo::case_stop_reading_chatty_strict(KIND);
}
