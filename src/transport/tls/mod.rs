//! TLS on a connecting socket, bounded by the connect deadline, with the backend chosen
//! by the crate features (`native-tls`, `rustls`).
//!
//! We drive the handshake ourselves under both backends: tungstenite's own TLS wrapper
//! panics when native-tls returns `WouldBlock` with a socket timeout set, and it could
//! not be bounded by our deadline. Transport layer: no locks, no threads; generic over
//! the socket so it does not depend on the shared link.

use std::io::{self, Read, Write};

#[cfg(any(feature = "native-tls", feature = "rustls"))]
use crate::tls_config::Connector;
use crate::tls_config::TlsSettings;
use crate::transport::dial::Deadline;
use crate::{Error, Result};

#[cfg(feature = "native-tls")]
mod native;
#[cfg(feature = "rustls")]
mod rustls;

/// A TLS stream over `S`, from whichever backend made the handshake.
// Sizes differ with both backends compiled; `link::Stream` boxes it as a whole already.
#[allow(clippy::large_enum_variant)]
pub(crate) enum TlsStream<S: Read + Write> {
    #[cfg(feature = "native-tls")]
    Native(native_tls::TlsStream<S>),
    #[cfg(feature = "rustls")]
    Rustls(::rustls::StreamOwned<::rustls::ClientConnection, S>),
    /// Built without TLS: no value of this type can exist.
    #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
    #[allow(dead_code)]
    None(std::convert::Infallible, std::marker::PhantomData<S>),
}

impl<S: Read + Write> TlsStream<S> {
    /// The socket under the TLS layer.
    pub(crate) fn get_ref(&self) -> &S {
        match self {
            #[cfg(feature = "native-tls")]
            TlsStream::Native(s) => s.get_ref(),
            #[cfg(feature = "rustls")]
            TlsStream::Rustls(s) => s.get_ref(),
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            TlsStream::None(never, _) => match *never {},
        }
    }

    /// The socket under the TLS layer (to tune it; never read or write it directly).
    pub(crate) fn get_mut(&mut self) -> &mut S {
        match self {
            #[cfg(feature = "native-tls")]
            TlsStream::Native(s) => s.get_mut(),
            #[cfg(feature = "rustls")]
            TlsStream::Rustls(s) => s.get_mut(),
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            TlsStream::None(never, _) => match *never {},
        }
    }
}

impl<S: Read + Write> TlsStream<S> {
    /// Whether input read from the socket may wait in the TLS layer, where `poll` on the
    /// socket does not see it: decrypted bytes not yet read, or whole records not yet
    /// decrypted. `true` when the backend cannot tell.
    pub(crate) fn holds_input(&self) -> bool {
        match self {
            // OpenSSL reads one record at a time (no read-ahead): what it holds is the
            // rest of the current record, which `SSL_pending` counts.
            #[cfg(all(feature = "native-tls", not(any(windows, target_vendor = "apple"))))]
            TlsStream::Native(s) => s.buffered_read_size().map_or(true, |n| n > 0),
            // Schannel and Secure Transport read ahead into buffers they do not count.
            #[cfg(all(feature = "native-tls", any(windows, target_vendor = "apple")))]
            TlsStream::Native(_) => true,
            // Each read decrypts every whole record read so far (`process_new_packets`
            // after `read_tls`): what rustls holds beyond a partial record is plaintext,
            // and then it does not want to read.
            #[cfg(feature = "rustls")]
            TlsStream::Rustls(s) => !s.conn.wants_read(),
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            TlsStream::None(never, _) => match *never {},
        }
    }
}

impl<S: Read + Write> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            #[cfg(feature = "native-tls")]
            TlsStream::Native(s) => s.read(buf),
            #[cfg(feature = "rustls")]
            TlsStream::Rustls(s) => s.read(buf),
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            TlsStream::None(never, _) => {
                let _ = buf;
                match *never {}
            }
        }
    }
}

impl<S: Read + Write> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            #[cfg(feature = "native-tls")]
            TlsStream::Native(s) => s.write(buf),
            #[cfg(feature = "rustls")]
            TlsStream::Rustls(s) => s.write(buf),
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            TlsStream::None(never, _) => {
                let _ = buf;
                match *never {}
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            #[cfg(feature = "native-tls")]
            TlsStream::Native(s) => s.flush(),
            #[cfg(feature = "rustls")]
            TlsStream::Rustls(s) => s.flush(),
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            TlsStream::None(never, _) => match *never {},
        }
    }
}

/// The TLS handshake for `host` on `sock`, which must bound each read and write by the
/// time left before the connect deadline `dl`.
pub(crate) fn handshake<S: Read + Write>(
    settings: &TlsSettings,
    host: &str,
    sock: S,
    dl: &Deadline,
) -> Result<TlsStream<S>> {
    #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
    {
        // `Request` already refuses `wss://` in such a build; this is the backstop.
        let _ = (settings, host, sock, dl);
        Err(Error::NoTls)
    }
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    {
        let domain = host.trim_start_matches('[').trim_end_matches(']');
        match connector(settings)? {
            #[cfg(feature = "native-tls")]
            Connector::Native(c) => native::handshake(&c, domain, sock, dl).map(TlsStream::Native),
            #[cfg(feature = "rustls")]
            Connector::Rustls(c) => rustls::handshake(c, domain, sock, dl).map(TlsStream::Rustls),
        }
    }
}

/// A TLS failure (such as an alert the server sent after the handshake: TLS 1.3 sends
/// "certificate required" only then) in what a read or write of a TLS stream returned,
/// as [`Error::Tls`], classified like the handshake's errors; `None` for other I/O
/// errors.
pub(crate) fn failure(e: &io::Error) -> Option<Error> {
    #[cfg(feature = "rustls")]
    if let Some(tls) = rustls::failure(e) {
        return Some(tls);
    }
    #[cfg(feature = "native-tls")]
    if let Some(tls) = native::failure(e) {
        return Some(tls);
    }
    let _ = e;
    None
}

/// The user's connector, or the one built from the settings (once per client: it loads
/// and parses the system CA bundle, tens of milliseconds, which would otherwise delay
/// every reconnection).
#[cfg(any(feature = "native-tls", feature = "rustls"))]
fn connector(settings: &TlsSettings) -> Result<Connector> {
    if let Some(c) = settings.connector.as_ref().or(settings.built.get()) {
        return Ok(c.clone());
    }
    // With both backends compiled, native-tls is the default (`use_rustls` or
    // `rustls_config` pick rustls).
    #[cfg(all(feature = "native-tls", feature = "rustls"))]
    let built = if settings.use_rustls {
        Connector::Rustls(rustls::build(settings)?)
    } else {
        Connector::Native(native::build(settings)?)
    };
    #[cfg(all(feature = "native-tls", not(feature = "rustls")))]
    let built = Connector::Native(native::build(settings)?);
    #[cfg(not(feature = "native-tls"))]
    let built = Connector::Rustls(rustls::build(settings)?);
    Ok(settings.built.get_or_init(|| built).clone())
}

#[cfg(test)]
mod tests {
    use crate::tls_config::IdentityInner;
    use crate::{Client, Error, Identity, Request};

    /// A peer that takes what is written and whose reads fail as the OS's do when TCP
    /// keepalive or retransmissions give up.
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    struct GoneDark;

    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    impl std::io::Read for GoneDark {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "Connection timed out (os error 110)",
            ))
        }
    }

    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    impl std::io::Write for GoneDark {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The OS's `ETIMEDOUT` during the handshake, with time left, is an I/O error; only
    /// the deadline's end is `Timeout` (review of 6bd7b42: native-tls said "timed out
    /// during TLS handshake; raise connect_timeout" with 28 s left, rustls retried and
    /// reported the next read's end of file).
    #[test]
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    fn an_os_timeout_in_the_handshake_is_an_io_error() {
        use crate::transport::dial::Deadline;
        use std::time::Duration;
        let settings = super::TlsSettings::default();
        let dl = Deadline::after(Duration::from_secs(30));
        let r = super::handshake(&settings, "localhost", GoneDark, &dl);
        assert!(
            matches!(&r, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut),
            "{:?}",
            r.err()
        );
        let dl = Deadline::after(Duration::ZERO);
        let r = super::handshake(&settings, "localhost", GoneDark, &dl);
        assert!(
            matches!(
                r,
                Err(Error::Timeout {
                    stage: crate::ConnectStage::Tls,
                    ..
                })
            ),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn wss_without_a_backend_is_a_typed_error_and_ws_still_works() {
        let tls = cfg!(any(feature = "native-tls", feature = "rustls"));
        assert_eq!(Request::new("wss://127.0.0.1:9/").is_ok(), tls);
        if !tls {
            assert!(matches!(
                Request::new("wss://127.0.0.1:9/"),
                Err(Error::NoTls)
            ));
            // The builder keeps the error for connect() and connect_lazy(), which
            // return it before starting anything (nothing listens on port 9 anyway).
            let b = || Client::builder("wss://127.0.0.1:9/").reconnect(false);
            assert!(matches!(b().connect(), Err(Error::NoTls)));
            assert!(matches!(b().connect_lazy(), Err(Error::NoTls)));
            let e = Error::NoTls;
            assert!(e.is_fatal());
            assert!(e.to_string().contains("rustls"), "{e}");
        }
        assert!(Request::new("ws://127.0.0.1:9/").is_ok());
    }

    #[test]
    fn identity_debug_never_shows_the_key() {
        let id = Identity(IdentityInner::Pem {
            chain: b"-----BEGIN CERTIFICATE-----".to_vec(),
            key: b"s3cret key".to_vec(),
        });
        assert_eq!(format!("{id:?}"), "Identity { .. }");
    }

    #[test]
    #[cfg_attr(
        windows,
        ignore = "Wine 8's crypt32 cannot import a PKCS#8 key (native-tls/schannel identity)"
    )]
    fn identity_from_pem_is_checked_by_the_backend() {
        let cert = include_bytes!("../../../tests/certs/client.pem");
        let key = include_bytes!("../../../tests/certs/client.key");
        Identity::from_pem(cert, key).expect("test identity");
        if cfg!(any(feature = "native-tls", feature = "rustls")) {
            assert!(Identity::from_pem(cert, b"not a key").is_err());
        }
    }
}
