//! Opening one connection under one deadline: DNS, TCP, proxy CONNECT, TLS, upgrade.
//!
//! The socket stays in blocking mode; every read and write sets its timeout to the time
//! left and fails past the deadline (`link::Tcp`), so every step is bounded, also against
//! a peer that trickles bytes. We do the TLS handshake ourselves (tungstenite's own
//! wrapper panics when native-tls returns `WouldBlock` with a timeout set), and drive the
//! upgrade on tungstenite's handshake machine with a request we serialise ourselves
//! (tungstenite's client handshake would log it, credentials included).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::error::{ProtocolError, SubProtocolError};
use tungstenite::handshake::client::Response;
use tungstenite::handshake::derive_accept_key;
use tungstenite::handshake::machine::{HandshakeMachine, RoundResult, StageResult};
use tungstenite::http::{HeaderName, HeaderValue, StatusCode};
use tungstenite::protocol::{Role, WebSocket};
use url::Url;

use crate::config::{Config, ProxySetting, Request, TlsSettings};
use crate::link::{Stream, Tcp, Ws};
use crate::redact::RedactedUrl;
use crate::{ConnectStage, Error, Result, TlsErrorKind};

/// A freshly opened connection, not yet shared with any thread.
pub(crate) struct Opened {
    pub ws: Ws,
    pub protocol: Option<String>,
}

struct Deadline {
    start: Instant,
    end: Instant,
}

impl Deadline {
    fn left(&self, stage: ConnectStage) -> Result<Duration> {
        let now = Instant::now();
        if now >= self.end {
            return Err(self.timeout(stage));
        }
        Ok(self.end - now)
    }
    fn timeout(&self, stage: ConnectStage) -> Error {
        Error::Timeout {
            stage,
            elapsed: self.start.elapsed(),
        }
    }
    fn arm(&self, sock: &TcpStream, stage: ConnectStage) -> Result<()> {
        let left = self.left(stage)?;
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Opens a connection for `req`. `on_socket` gets a clone of the TCP socket as soon as it
/// exists, so `close()` can abort a connect in progress by shutting it down.
pub(crate) fn open(cfg: &Config, req: &Request, on_socket: &dyn Fn(&TcpStream)) -> Result<Opened> {
    let start = Instant::now();
    let dl = Deadline {
        start,
        end: crate::time::deadline(start, cfg.connect_timeout),
    };
    let url = &req.url;
    let host = url.host_str().unwrap_or_default().to_string();
    let tls = url.scheme() == "wss";
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let proxy = pick_proxy(&cfg.proxy, url, &host);
    log::debug!(
        "connecting to {}{}",
        RedactedUrl(url),
        if proxy.is_some() { " via proxy" } else { "" }
    );
    let (dial_host, dial_port) = match &proxy {
        Some(p) => (
            p.host_str().unwrap_or_default().to_string(),
            p.port_or_known_default().unwrap_or(8080),
        ),
        None => (host.clone(), port),
    };
    let addrs = resolve(&dial_host, dial_port, &dl)?;
    let sock = dial(&addrs, &dl)?;
    on_socket(&sock);
    sock.set_nodelay(true)?;
    if let Some(p) = &proxy {
        dl.arm(&sock, ConnectStage::Proxy)?;
        proxy_connect(&sock, p, &host, port, &dl)?;
    }
    // From here on every read and write is bounded by the time left (see `link::Tcp`).
    let sock = Tcp::connecting(sock, dl.end);
    let stream = if tls {
        Stream::Tls(Box::new(tls_handshake(&cfg.tls, &host, sock, &dl)?))
    } else {
        Stream::Plain(sock)
    };
    let request = build_request(req)?;
    let (mut ws, protocol) = upgrade(stream, request, cfg, &dl)?;
    ws.get_mut().connected();
    let tcp = ws.get_ref().tcp();
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    tcp.set_nonblocking(true)?;
    log::debug!("connected to {} in {:?}", RedactedUrl(url), start.elapsed());
    Ok(Opened { ws, protocol })
}

/// The HTTP upgrade, driven on tungstenite's handshake machine (which bounds the response
/// head to 64 KiB) with a request we serialise ourselves: tungstenite's own client
/// handshake logs the whole request, credentials included, at trace level.
fn upgrade(
    stream: Stream,
    request: tungstenite::handshake::client::Request,
    cfg: &Config,
    dl: &Deadline,
) -> Result<(Ws, Option<String>)> {
    let stage = ConnectStage::Upgrade;
    let failed = |e: tungstenite::Error| match e {
        tungstenite::Error::Io(io) if is_timeout(&io) => dl.timeout(stage),
        e => Error::from_ws(e),
    };
    let offered = request
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().map(str::to_string))
        .transpose()
        .map_err(|e| header_err("Sec-WebSocket-Protocol", e))?;
    let (bytes, key) = request_bytes(&request)?;
    let mut machine = HandshakeMachine::start_write(stream, bytes);
    let stream = loop {
        machine = match machine.single_round::<Response>().map_err(failed)? {
            RoundResult::WouldBlock(m) | RoundResult::Incomplete(m) => m,
            RoundResult::StageFinished(StageResult::DoneWriting(s)) => break s,
            RoundResult::StageFinished(StageResult::DoneReading { .. }) => {
                unreachable!("a writing stage ends with DoneWriting")
            }
        };
        dl.left(stage)?;
    };
    let mut machine = HandshakeMachine::start_read(stream);
    let (response, stream, tail) = loop {
        machine = match machine.single_round::<Response>().map_err(failed)? {
            RoundResult::WouldBlock(m) | RoundResult::Incomplete(m) => m,
            RoundResult::StageFinished(StageResult::DoneReading {
                result,
                stream,
                tail,
            }) => break (result, stream, tail),
            RoundResult::StageFinished(StageResult::DoneWriting(_)) => {
                unreachable!("a reading stage ends with DoneReading")
            }
        };
        dl.left(stage)?;
    };
    let protocol = verify_response(response, tail.clone(), &key, offered.as_deref())?;
    let ws = WebSocket::from_partially_read(stream, tail, Role::Client, Some(cfg.ws_config()));
    Ok((ws, protocol))
}

/// The upgrade request on the wire (what tungstenite's `generate_request` writes, without
/// its trace log), and its `Sec-WebSocket-Key`.
fn request_bytes(request: &tungstenite::handshake::client::Request) -> Result<(Vec<u8>, String)> {
    const FIRST: [&str; 5] = [
        "Host",
        "Connection",
        "Upgrade",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Key",
    ];
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    let headers = request.headers();
    let mut key = String::new();
    for name in FIRST {
        let value = headers
            .get(name)
            .ok_or_else(|| Error::Protocol(format!("upgrade request without {name}")))?;
        if name == "Sec-WebSocket-Key" {
            key = value.to_str().map_err(|e| header_err(name, e))?.to_string();
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        if FIRST.iter().any(|f| name.as_str().eq_ignore_ascii_case(f)) {
            continue;
        }
        // Some servers match these two case-sensitively (as tungstenite writes them).
        let name = match name.as_str() {
            "sec-websocket-protocol" => "Sec-WebSocket-Protocol",
            "origin" => "Origin",
            other => other,
        };
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok((out, key))
}

/// RFC 6455 4.1 checks of the server's answer (as tungstenite's client does them).
/// Returns the selected subprotocol.
fn verify_response(
    mut response: Response,
    tail: Vec<u8>,
    key: &str,
    offered: Option<&str>,
) -> Result<Option<String>> {
    use tungstenite::Error as W;
    let protocol_err = |e: ProtocolError| Error::from_ws(W::Protocol(e));
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        *response.body_mut() = Some(tail);
        return Err(Error::from_ws(W::Http(Box::new(response))));
    }
    let headers = response.headers();
    let is = |name: &str, want: &str| {
        headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h.eq_ignore_ascii_case(want))
    };
    if !is("Upgrade", "websocket") {
        return Err(protocol_err(ProtocolError::MissingUpgradeWebSocketHeader));
    }
    if !is("Connection", "Upgrade") {
        return Err(protocol_err(ProtocolError::MissingConnectionUpgradeHeader));
    }
    let accept = derive_accept_key(key.as_bytes());
    if headers
        .get("Sec-WebSocket-Accept")
        .is_none_or(|h| h != &accept)
    {
        return Err(protocol_err(ProtocolError::SecWebSocketAcceptKeyMismatch));
    }
    let selected = headers
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().map(str::to_string))
        .transpose()
        .map_err(|_| {
            protocol_err(ProtocolError::SecWebSocketSubProtocolError(
                SubProtocolError::InvalidSubProtocol,
            ))
        })?;
    match (offered, &selected) {
        (None, None) => {}
        (Some(_), None) => {
            return Err(protocol_err(ProtocolError::SecWebSocketSubProtocolError(
                SubProtocolError::NoSubProtocol,
            )));
        }
        (None, Some(_)) => {
            return Err(protocol_err(ProtocolError::SecWebSocketSubProtocolError(
                SubProtocolError::ServerSentSubProtocolNoneRequested,
            )));
        }
        (Some(offered), Some(sel)) => {
            if !offered.split(',').any(|p| p.trim() == sel) {
                return Err(protocol_err(ProtocolError::SecWebSocketSubProtocolError(
                    SubProtocolError::InvalidSubProtocol,
                )));
            }
        }
    }
    Ok(selected)
}

fn resolve(host: &str, port: u16, dl: &Deadline) -> Result<Vec<SocketAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // getaddrinfo has no timeout: resolve on a helper thread and stop waiting at the
    // deadline (the helper ends by itself when the resolver returns).
    let (tx, rx) = crossbeam_channel::bounded(1);
    let name = host.to_string();
    std::thread::Builder::new()
        .name("wsbeat-dns".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let _ = tx.send(
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>()),
            );
        })?;
    match rx.recv_timeout(dl.left(ConnectStage::Dns)?) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(Error::Dns {
            host: host.into(),
            message: "no addresses".into(),
        }),
        Ok(Err(e)) => Err(Error::Dns {
            host: host.into(),
            message: e.to_string(),
        }),
        Err(_) => Err(dl.timeout(ConnectStage::Dns)),
    }
}

fn dial(addrs: &[SocketAddr], dl: &Deadline) -> Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        let left = dl.left(ConnectStage::Tcp)?;
        match TcpStream::connect_timeout(addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => {
                log::debug!("connect {addr}: {e}");
                last = Some(match e.kind() {
                    io::ErrorKind::ConnectionRefused => Error::Refused {
                        addr: addr.to_string(),
                    },
                    _ if is_timeout(&e) => dl.timeout(ConnectStage::Tcp),
                    _ => Error::io(e),
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| dl.timeout(ConnectStage::Tcp)))
}

fn tls_handshake(
    settings: &TlsSettings,
    host: &str,
    sock: Tcp,
    dl: &Deadline,
) -> Result<native_tls::TlsStream<Tcp>> {
    let connector = match settings.connector.as_ref().or(settings.built.get()) {
        Some(c) => c.clone(),
        None => {
            // Built once per client: it loads and parses the system CA bundle, which
            // costs tens of milliseconds, and would otherwise delay every reconnection.
            let mut b = native_tls::TlsConnector::builder();
            for r in &settings.roots {
                b.add_root_certificate(r.clone());
            }
            if let Some(id) = &settings.identity {
                b.identity(id.clone());
            }
            b.danger_accept_invalid_certs(settings.danger_accept_invalid_certs);
            b.danger_accept_invalid_hostnames(settings.danger_accept_invalid_hostnames);
            let built = b.build().map_err(|e| tls_error(&e.to_string()))?;
            settings.built.get_or_init(|| built).clone()
        }
    };
    let domain = host.trim_start_matches('[').trim_end_matches(']');
    let mut result = connector.connect(domain, sock);
    loop {
        match result {
            Ok(s) => return Ok(s),
            Err(native_tls::HandshakeError::WouldBlock(mid)) => {
                // With a socket timeout set, WouldBlock means the time ran out (or a
                // spurious wake-up): resume while time is left (`Tcp` re-arms the timeout).
                dl.left(ConnectStage::Tls)?;
                result = mid.handshake();
            }
            Err(native_tls::HandshakeError::Failure(e)) => {
                let msg = e.to_string();
                if Instant::now() >= dl.end
                    || msg.contains("timed out")
                    || msg.contains("Resource temporarily unavailable")
                {
                    return Err(dl.timeout(ConnectStage::Tls));
                }
                return Err(tls_error(&msg));
            }
        }
    }
}

fn tls_error(msg: &str) -> Error {
    let lower = msg.to_ascii_lowercase();
    let kind = if lower.contains("certificate") || lower.contains("hostname mismatch") {
        TlsErrorKind::Certificate
    } else {
        TlsErrorKind::Other
    };
    Error::Tls {
        kind,
        message: msg.to_string(),
    }
}

fn header_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidHeader {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

fn build_request(req: &Request) -> Result<tungstenite::handshake::client::Request> {
    let mut url = req.url.clone();
    let basic = if !url.username().is_empty() {
        let user = percent_decode(url.username());
        let pass = url.password().map(percent_decode).unwrap_or_default();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Some(format!(
            "Basic {}",
            base64(format!("{user}:{pass}").as_bytes())
        ))
    } else {
        None
    };
    let mut r = url.as_str().into_client_request().map_err(Error::from_ws)?;
    let headers = r.headers_mut();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| header_err(k, e))?;
        let value = HeaderValue::from_str(v).map_err(|e| header_err(k, e))?;
        headers.append(name, value);
    }
    if let Some(b) = basic
        && !headers.contains_key("authorization")
    {
        headers.insert(
            "authorization",
            HeaderValue::from_str(&b).map_err(|e| header_err("authorization", e))?,
        );
    }
    if !req.subprotocols.is_empty() {
        let v = req.subprotocols.join(", ");
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&v).map_err(|e| header_err("Sec-WebSocket-Protocol", e))?,
        );
    }
    Ok(r)
}

/// Which proxy (if any) to use for `url`.
fn pick_proxy(setting: &ProxySetting, url: &Url, host: &str) -> Option<Url> {
    match setting {
        ProxySetting::None => None,
        ProxySetting::Explicit(p) => Some(p.clone()),
        ProxySetting::Env => {
            // Like Go's net/http: loopback destinations never go through an env proxy.
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if bare.eq_ignore_ascii_case("localhost")
                || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            {
                return None;
            }
            let names: &[&str] = if url.scheme() == "wss" {
                &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
            } else {
                &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            };
            let value = names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))?;
            let no_proxy = std::env::var("NO_PROXY")
                .or_else(|_| std::env::var("no_proxy"))
                .unwrap_or_default();
            if no_proxy_matches(&no_proxy, bare) {
                return None;
            }
            let value = if value.contains("://") {
                value
            } else {
                format!("http://{value}")
            };
            match Url::parse(&value) {
                Ok(u) if u.scheme() == "http" && u.host_str().is_some() => Some(u),
                _ => {
                    log::warn!("ignoring unusable proxy setting in the environment");
                    None
                }
            }
        }
    }
}

/// `NO_PROXY` matching: `*`, exact host, or domain suffix (`example.com`, `.example.com`).
pub(crate) fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.to_ascii_lowercase();
            let entry = entry.split(':').next().unwrap_or("");
            let suffix = entry.trim_start_matches('.');
            host == suffix || host.ends_with(&format!(".{suffix}"))
        })
}

fn proxy_connect(
    sock: &TcpStream,
    proxy: &Url,
    host: &str,
    port: u16,
    dl: &Deadline,
) -> Result<()> {
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if !proxy.username().is_empty() {
        let user = percent_decode(proxy.username());
        let pass = proxy.password().map(percent_decode).unwrap_or_default();
        req.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64(format!("{user}:{pass}").as_bytes())
        ));
    }
    req.push_str("\r\n");
    let timeout = |e: io::Error| {
        if is_timeout(&e) {
            dl.timeout(ConnectStage::Proxy)
        } else {
            Error::io(e)
        }
    };
    (&*sock).write_all(req.as_bytes()).map_err(timeout)?;
    // Read the response head byte by byte so no tunnelled byte is consumed.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        // Re-armed per byte: a proxy that trickles its answer meets the deadline too.
        dl.arm(sock, ConnectStage::Proxy)?;
        match (&*sock).read(&mut byte) {
            Ok(0) => {
                return Err(Error::io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "proxy closed the connection during CONNECT",
                )));
            }
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timeout(e)),
        }
        if head.len() > 16 << 10 {
            return Err(Error::Protocol("proxy response head too large".into()));
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Error::Protocol("malformed proxy response".into()))?;
    if !(200..300).contains(&status) {
        return Err(Error::Proxy { status });
    }
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = match chunk.len() {
            3 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32,
            2 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8,
            _ => (chunk[0] as u32) << 16,
        };
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_percent() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(percent_decode("p%40ss"), "p@ss");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn no_proxy_rules() {
        assert!(no_proxy_matches("*", "x.com"));
        assert!(no_proxy_matches("example.com", "api.example.com"));
        assert!(no_proxy_matches(".example.com, other", "example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(!no_proxy_matches("", "x.com"));
    }
}
