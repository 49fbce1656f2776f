//! The checked-in test PKI from `tests/certs/` (see its README.md), embedded at compile time.

use native_tls::{Certificate, Identity, TlsConnector};

/// Test CA certificate (PEM) that signed `server`, `expired`, `wrong-host` and `client`.
pub const CA_PEM: &[u8] = include_bytes!("../certs/ca.pem");
/// Server cert for `localhost`, `127.0.0.1`, `::1`, signed by the test CA.
pub const SERVER_PEM: &[u8] = include_bytes!("../certs/server.pem");
/// PKCS#8 key of [`SERVER_PEM`].
pub const SERVER_KEY: &[u8] = include_bytes!("../certs/server.key");
/// Expired (2000..2001) server cert, same names, signed by the test CA.
pub const EXPIRED_PEM: &[u8] = include_bytes!("../certs/expired.pem");
/// PKCS#8 key of [`EXPIRED_PEM`].
pub const EXPIRED_KEY: &[u8] = include_bytes!("../certs/expired.key");
/// Server cert for `wrong.example` only, signed by the test CA.
pub const WRONG_HOST_PEM: &[u8] = include_bytes!("../certs/wrong-host.pem");
/// PKCS#8 key of [`WRONG_HOST_PEM`].
pub const WRONG_HOST_KEY: &[u8] = include_bytes!("../certs/wrong-host.key");
/// An unrelated CA certificate (PEM).
pub const OTHER_CA_PEM: &[u8] = include_bytes!("../certs/other-ca.pem");
/// Server cert for the usual names, signed by the unrelated CA ("unknown CA").
pub const OTHER_SERVER_PEM: &[u8] = include_bytes!("../certs/other-server.pem");
/// PKCS#8 key of [`OTHER_SERVER_PEM`].
pub const OTHER_SERVER_KEY: &[u8] = include_bytes!("../certs/other-server.key");
/// Client cert (clientAuth) signed by the test CA, for mutual TLS.
pub const CLIENT_PEM: &[u8] = include_bytes!("../certs/client.pem");
/// PKCS#8 key of [`CLIENT_PEM`].
pub const CLIENT_KEY: &[u8] = include_bytes!("../certs/client.key");

/// Which certificate a TLS [`crate::support::server::TestServer`] presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCert {
    /// Valid cert signed by the test CA (trust [`ca_pem`]).
    Valid,
    /// Signed by the test CA but expired.
    Expired,
    /// Signed by the test CA but only for `wrong.example`.
    WrongHost,
    /// Valid names and dates but signed by an unrelated CA.
    UnknownCa,
}

impl ServerCert {
    /// The identity (cert + key) for this choice.
    pub fn identity(self) -> Identity {
        let (pem, key) = match self {
            ServerCert::Valid => (SERVER_PEM, SERVER_KEY),
            ServerCert::Expired => (EXPIRED_PEM, EXPIRED_KEY),
            ServerCert::WrongHost => (WRONG_HOST_PEM, WRONG_HOST_KEY),
            ServerCert::UnknownCa => (OTHER_SERVER_PEM, OTHER_SERVER_KEY),
        };
        Identity::from_pkcs8(pem, key).expect("test identity")
    }
}

/// Test CA certificate as PEM bytes.
pub fn ca_pem() -> Vec<u8> {
    CA_PEM.to_vec()
}

/// Test CA certificate as a native-tls root certificate.
pub fn ca_cert() -> Certificate {
    Certificate::from_pem(CA_PEM).expect("test CA")
}

/// Unrelated CA certificate as PEM bytes.
pub fn other_ca_pem() -> Vec<u8> {
    OTHER_CA_PEM.to_vec()
}

/// Identity of the valid server cert.
pub fn server_identity() -> Identity {
    ServerCert::Valid.identity()
}

/// Identity of the expired server cert.
pub fn expired_identity() -> Identity {
    ServerCert::Expired.identity()
}

/// Identity of the `wrong.example` server cert.
pub fn wrong_host_identity() -> Identity {
    ServerCert::WrongHost.identity()
}

/// Identity of the server cert signed by the unrelated CA.
pub fn other_server_identity() -> Identity {
    ServerCert::UnknownCa.identity()
}

/// Identity of the client cert (mutual TLS).
pub fn client_identity() -> Identity {
    Identity::from_pkcs8(CLIENT_PEM, CLIENT_KEY).expect("client identity")
}

/// A native-tls connector that trusts only the test CA (built-in roots disabled).
pub fn test_connector() -> TlsConnector {
    TlsConnector::builder()
        .add_root_certificate(ca_cert())
        .disable_built_in_roots(true)
        .build()
        .expect("tls connector")
}
