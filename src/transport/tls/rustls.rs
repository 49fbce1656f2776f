//! The rustls backend (pure Rust, `ring` crypto), trusting the platform's roots
//! (`rustls-native-certs`), plus Mozilla's with the `webpki-roots` feature.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    RootCertStore, SignatureScheme, StreamOwned,
};

use crate::transport::dial::Deadline;

type Dss = DigitallySignedStruct;
type Signature = std::result::Result<HandshakeSignatureValid, rustls::Error>;
use crate::tls_config::TlsSettings;
use crate::{ConnectStage, Error, Result, TlsErrorKind};

pub(super) fn build(settings: &TlsSettings) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&e))?;
    let chain = if settings.danger_accept_invalid_certs {
        None
    } else {
        let roots = Arc::new(roots(settings)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::Tls {
                kind: TlsErrorKind::Other,
                message: e.to_string(),
            })?;
        Some(webpki)
    };
    let verifier: Arc<dyn ServerCertVerifier> = match chain {
        Some(webpki) if !settings.danger_accept_invalid_hostnames => webpki,
        chain => Arc::new(Lenient { provider, chain }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &settings.identity {
        Some(id) => {
            let (chain, key) = id.rustls()?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| error(&e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The platform's roots, Mozilla's (with `webpki-roots`) and the user's extra roots.
fn roots(settings: &TlsSettings) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    #[cfg(feature = "webpki-roots")]
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let platform = rustls_native_certs::load_native_certs();
    for e in &platform.errors {
        log::debug!("platform root certificates: {e}");
    }
    let (found, unusable) = roots.add_parsable_certificates(platform.certs);
    log::debug!("{found} platform root certificates ({unusable} unusable)");
    for r in &settings.roots {
        roots.add_parsable_certificates(r.rustls()?);
    }
    if roots.is_empty() {
        return Err(Error::Tls {
            kind: TlsErrorKind::Certificate,
            message: "no trusted root certificates: the platform has none; add one with \
                      add_root_certificate or enable wsbeat's webpki-roots feature"
                .into(),
        });
    }
    Ok(roots)
}

pub(super) fn handshake<S: Read + Write>(
    config: Arc<ClientConfig>,
    domain: &str,
    mut sock: S,
    dl: &Deadline,
) -> Result<StreamOwned<ClientConnection, S>> {
    let name = ServerName::try_from(domain.to_string()).map_err(|e| Error::Tls {
        kind: TlsErrorKind::Other,
        message: format!("invalid server name {domain:?}: {e}"),
    })?;
    let mut conn = ClientConnection::new(config, name).map_err(|e| error(&e))?;
    while conn.is_handshaking() || conn.wants_write() {
        match conn.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The socket waits for readiness itself while connecting (`stream::Tcp`):
            // a spurious wake-up at most.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dl.left(ConnectStage::Tls)?;
            }
            // The deadline's own end, or else the OS's (TCP keepalive or retransmissions
            // gave up): an I/O error then (review of 6bd7b42: it was retried, and the
            // next read's end of file became "unexpected end of file").
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                dl.left(ConnectStage::Tls)?;
                return Err(Error::io(e));
            }
            Err(e) => {
                return Err(match e.get_ref().and_then(|i| i.downcast_ref()) {
                    Some(tls) => error(tls),
                    None => Error::Tls {
                        kind: TlsErrorKind::Other,
                        message: format!("during the handshake: {e}"),
                    },
                });
            }
        }
    }
    Ok(StreamOwned::new(conn, sock))
}

/// A TLS failure on an established connection (an alert after the handshake, such as
/// TLS 1.3's "certificate required"), if `e` is one.
pub(super) fn failure(e: &io::Error) -> Option<Error> {
    e.get_ref().and_then(|i| i.downcast_ref()).map(error)
}

/// Maps rustls's typed errors: every certificate problem, ours or the server's opinion of
/// our client certificate, is `TlsErrorKind::Certificate`.
fn error(e: &rustls::Error) -> Error {
    use rustls::Error as E;
    let certificate = match e {
        // A client identity whose key is not the certificate's.
        E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) | E::InconsistentKeys(_) => true,
        E::AlertReceived(a) => matches!(
            a,
            AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
        ),
        _ => false,
    };
    Error::Tls {
        kind: if certificate {
            TlsErrorKind::Certificate
        } else {
            TlsErrorKind::Other
        },
        message: e.to_string(),
    }
}

/// The `danger_` switches: with `chain: None` (`danger_accept_invalid_certs`) any
/// certificate; with a verifier (`danger_accept_invalid_hostnames` only) a valid chain for
/// any host name. Either way the handshake signatures are checked (the peer must hold the
/// key of the certificate it sent).
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    // The two signature checks differ only in the function they call.
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &Dss) -> Signature {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &Dss) -> Signature {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
