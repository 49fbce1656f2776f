//! The native-tls backend (OpenSSL, Schannel, Security.framework).

use std::io::{Read, Write};

use crate::tls_config::TlsSettings;
use crate::transport::dial::Deadline;
use crate::{ConnectStage, Error, Result, TlsErrorKind};

pub(super) fn build(settings: &TlsSettings) -> Result<native_tls::TlsConnector> {
    let mut b = native_tls::TlsConnector::builder();
    for r in &settings.roots {
        for c in r.native()? {
            b.add_root_certificate(c);
        }
    }
    if let Some(id) = &settings.identity {
        b.identity(id.native()?);
    }
    b.danger_accept_invalid_certs(settings.danger_accept_invalid_certs);
    b.danger_accept_invalid_hostnames(settings.danger_accept_invalid_hostnames);
    b.build().map_err(|e| error(&e.to_string()))
}

pub(super) fn handshake<S: Read + Write>(
    connector: &native_tls::TlsConnector,
    domain: &str,
    sock: S,
    dl: &Deadline,
) -> Result<native_tls::TlsStream<S>> {
    let mut result = connector.connect(domain, sock);
    loop {
        match result {
            Ok(s) => return Ok(s),
            Err(native_tls::HandshakeError::WouldBlock(mid)) => {
                // The socket waits for readiness itself while connecting (`stream::Tcp`),
                // so this is a spurious wake-up at most: resume while time is left.
                dl.left(ConnectStage::Tls)?;
                result = mid.handshake();
            }
            Err(native_tls::HandshakeError::Failure(e)) => {
                // The deadline's own end (`stream::Tcp` fails once it passed).
                dl.left(ConnectStage::Tls)?;
                let msg = e.to_string();
                if msg.contains("timed out") {
                    // The OS's (TCP keepalive or retransmissions gave up), with time
                    // left: an I/O error, not advice to raise `connect_timeout` (review
                    // of 6bd7b42: "timed out during TLS handshake" with 28 s left).
                    return Err(Error::io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        msg,
                    )));
                }
                return Err(error(&msg));
            }
        }
    }
}

/// A TLS failure on an established connection (an alert after the handshake, such as
/// TLS 1.3's "certificate required"), if `e` is one. OpenSSL names alerts "... alert
/// ..."; the other platforms' errors are not told apart here.
pub(super) fn failure(e: &std::io::Error) -> Option<Error> {
    let msg = e.to_string();
    msg.contains(" alert ").then(|| error(&msg))
}

/// native-tls reports failures as text only (its error type is opaque across platforms).
/// Certificate problems: ours, and the server's alerts about our client certificate
/// (OpenSSL's "alert bad certificate", "... certificate expired", "alert unknown ca", the
/// same set rustls's typed alerts give).
fn error(msg: &str) -> Error {
    let lower = msg.to_ascii_lowercase();
    let kind = if lower.contains("certificate")
        || lower.contains("hostname mismatch")
        || lower.contains("alert unknown ca")
    {
        TlsErrorKind::Certificate
    } else {
        TlsErrorKind::Other
    };
    Error::Tls {
        kind,
        message: msg.to_string(),
    }
}
