//! TLS settings: extra roots, a client identity and "bring your own" connectors, in
//! wsbeat's own types so the public API does not depend on one TLS library.
//!
//! Settings only: the handshake itself lives in the `tls` module (transport layer).

use std::fmt;
use std::sync::OnceLock;

use crate::Result;
#[cfg(any(feature = "native-tls", feature = "rustls"))]
use crate::{Error, TlsErrorKind};

/// A certificate as the user gave it: PEM (one or more) or DER bytes.
#[derive(Clone)]
#[cfg_attr(not(any(feature = "native-tls", feature = "rustls")), allow(dead_code))]
pub(crate) enum CertBytes {
    Pem(Vec<u8>),
    Der(Vec<u8>),
}

impl CertBytes {
    /// The certificates for native-tls.
    #[cfg(feature = "native-tls")]
    pub(crate) fn native(&self) -> Result<Vec<native_tls::Certificate>> {
        let certs = match self {
            CertBytes::Pem(b) => native_tls::Certificate::stack_from_pem(b),
            CertBytes::Der(b) => native_tls::Certificate::from_der(b).map(|c| vec![c]),
        }
        .map_err(|e| bad_input("root certificate", e))?;
        if certs.is_empty() {
            return Err(bad_input("root certificate", "no PEM certificate found"));
        }
        Ok(certs)
    }

    /// The certificates for rustls (DER, not yet checked).
    #[cfg(feature = "rustls")]
    pub(crate) fn rustls(&self) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let certs = match self {
            CertBytes::Pem(b) => CertificateDer::pem_slice_iter(b)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad_input("root certificate", e))?,
            CertBytes::Der(b) => vec![CertificateDer::from(b.clone())],
        };
        if certs.is_empty() {
            return Err(bad_input("root certificate", "no PEM certificate found"));
        }
        Ok(certs)
    }

    fn parse(bytes: &[u8]) -> CertBytes {
        if bytes.windows(10).any(|w| w == b"-----BEGIN") {
            CertBytes::Pem(bytes.to_vec())
        } else {
            CertBytes::Der(bytes.to_vec())
        }
    }
}

/// A client certificate and its private key, presented for mutual TLS
/// ([`ClientBuilder::identity`](crate::ClientBuilder::identity)).
///
/// Works with every TLS backend when built with [`Identity::from_pem`]. Its `Debug`
/// output never shows the key.
///
/// ```no_run
/// let cert = std::fs::read("client.pem")?;
/// let key = std::fs::read("client.key")?;
/// let id = wsbeat::Identity::from_pem(&cert, &key)?;
/// let client = wsbeat::Client::builder("wss://example.com/feed")
///     .identity(id)
///     .connect()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
#[cfg_attr(not(any(feature = "native-tls", feature = "rustls")), allow(dead_code))]
pub struct Identity(pub(crate) IdentityInner);

#[derive(Clone)]
#[cfg_attr(not(any(feature = "native-tls", feature = "rustls")), allow(dead_code))]
pub(crate) enum IdentityInner {
    /// A PEM certificate chain (leaf first) and a PEM private key (PKCS#8; under rustls
    /// also PKCS#1 RSA or SEC1 EC).
    Pem { chain: Vec<u8>, key: Vec<u8> },
    /// A PKCS#12 archive and its password (native-tls only).
    #[cfg(feature = "native-tls")]
    Pkcs12 { der: Vec<u8>, password: String },
}

impl Identity {
    /// A client identity from a PEM certificate chain (leaf first) and its PEM private
    /// key. native-tls needs the key as PKCS#8 (`-----BEGIN PRIVATE KEY-----`); rustls
    /// also takes PKCS#1 RSA and SEC1 EC keys.
    ///
    /// Fails with [`Error::Tls`] (kind [`TlsErrorKind::Certificate`]) when the certificate
    /// or the key cannot be read by a compiled TLS backend. A key that is not the
    /// certificate's is the same fatal error from the first connection attempt.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Identity> {
        let id = Identity(IdentityInner::Pem {
            chain: cert_chain.to_vec(),
            key: key.to_vec(),
        });
        id.check()?;
        Ok(id)
    }

    /// A client identity from a PKCS#12 (`.p12` / `.pfx`) archive (native-tls only).
    #[cfg(feature = "native-tls")]
    pub fn from_pkcs12(der: &[u8], password: &str) -> Result<Identity> {
        let id = Identity(IdentityInner::Pkcs12 {
            der: der.to_vec(),
            password: password.to_string(),
        });
        id.check()?;
        Ok(id)
    }

    /// Parses it with every compiled backend, so a bad file fails at build time. A key
    /// that is not the certificate's is found when the client builds its TLS connector,
    /// with the backend it uses (a fatal certificate error from the first attempt):
    /// loading the identity into every compiled backend here refused identities that
    /// only one of them can use (a P-521 key for rustls's ring, a 1024-bit RSA key for
    /// OpenSSL's security level) and cost ~100 ms (review).
    fn check(&self) -> Result<()> {
        #[cfg(feature = "native-tls")]
        self.native()?;
        #[cfg(feature = "rustls")]
        if matches!(self.0, IdentityInner::Pem { .. }) {
            self.rustls()?;
        }
        Ok(())
    }

    #[cfg(feature = "native-tls")]
    pub(crate) fn native(&self) -> Result<native_tls::Identity> {
        match &self.0 {
            IdentityInner::Pem { chain, key } => native_tls::Identity::from_pkcs8(chain, key),
            IdentityInner::Pkcs12 { der, password } => {
                native_tls::Identity::from_pkcs12(der, password)
            }
        }
        .map_err(|e| bad_input("client identity", e))
    }

    /// The certificate chain and the key for rustls.
    #[cfg(feature = "rustls")]
    pub(crate) fn rustls(
        &self,
    ) -> Result<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        match &self.0 {
            IdentityInner::Pem { chain, key } => {
                let chain = CertificateDer::pem_slice_iter(chain)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| bad_input("client certificate", e))?;
                if chain.is_empty() {
                    return Err(bad_input("client certificate", "no PEM certificate found"));
                }
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|e| bad_input("client key", e))?;
                Ok((chain, key))
            }
            #[cfg(feature = "native-tls")]
            IdentityInner::Pkcs12 { .. } => Err(bad_input(
                "client identity",
                "PKCS#12 identities need the native-tls backend",
            )),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key (and a PKCS#12 password) are secrets: never shown.
        f.write_str("Identity { .. }")
    }
}

/// A complete TLS client configuration supplied by the user, per backend.
#[derive(Clone)]
pub(crate) enum Connector {
    #[cfg(feature = "native-tls")]
    Native(native_tls::TlsConnector),
    #[cfg(feature = "rustls")]
    Rustls(std::sync::Arc<rustls::ClientConfig>),
}

#[derive(Clone, Default)]
#[cfg_attr(not(any(feature = "native-tls", feature = "rustls")), allow(dead_code))]
pub(crate) struct TlsSettings {
    pub roots: Vec<CertBytes>,
    pub identity: Option<Identity>,
    pub connector: Option<Connector>,
    pub danger_accept_invalid_certs: bool,
    pub danger_accept_invalid_hostnames: bool,
    /// Build a rustls configuration even when native-tls is compiled in too.
    #[cfg(feature = "rustls")]
    pub use_rustls: bool,
    /// The connector built from the settings above on the first TLS attempt, reused by
    /// every later attempt: building one loads the system CA bundle (tens of ms).
    pub built: OnceLock<Connector>,
}

impl TlsSettings {
    /// Adds an extra root (PEM, possibly several, or DER), checked by the backend now so
    /// a bad file is an error at build time, not at the first connect.
    pub(crate) fn add_root(&mut self, cert: &[u8]) -> Result<()> {
        let c = CertBytes::parse(cert);
        #[cfg(feature = "native-tls")]
        c.native()?;
        #[cfg(feature = "rustls")]
        {
            let (_, bad) = rustls::RootCertStore::empty().add_parsable_certificates(c.rustls()?);
            if bad > 0 {
                return Err(bad_input(
                    "root certificate",
                    "not a valid X.509 certificate",
                ));
            }
        }
        self.roots.push(c);
        Ok(())
    }
}

/// The error for bytes the TLS backend could not read.
#[cfg(any(feature = "native-tls", feature = "rustls"))]
/// A certificate, key or identity that cannot be used: `Certificate`, as retrying with
/// the same file cannot help.
pub(crate) fn bad_input(what: &str, e: impl fmt::Display) -> Error {
    Error::Tls {
        kind: TlsErrorKind::Certificate,
        message: format!("bad {what}: {e}"),
    }
}
