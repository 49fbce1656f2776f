//! Opening one connection under one deadline: DNS, TCP (Happy Eyeballs), proxy (HTTP
//! CONNECT or SOCKS5), TLS, upgrade, redirects; cancellable at every stage.
//!
//! DNS and the TCP dial wait in `poll` together with the client's [`Cancel`] (see
//! `dial.rs`). Once connected the socket stays in blocking mode; every read and write
//! sets its timeout to the time left and fails past the deadline (`link::Tcp`), so every
//! step is bounded, also against a peer that trickles bytes, and `Cancel` aborts those
//! steps by shutting the socket down. We do the TLS handshake ourselves (tungstenite's
//! own wrapper panics when native-tls returns `WouldBlock` with a timeout set), and drive
//! the upgrade on tungstenite's handshake machine with a request we serialise ourselves
//! (tungstenite's client handshake would log it, credentials included).

use std::io::{self, Read, Write};
use std::net::IpAddr;

use tungstenite::client::IntoClientRequest;
use tungstenite::error::ProtocolError;
use tungstenite::handshake::client::Response;
use tungstenite::handshake::derive_accept_key;
use tungstenite::handshake::machine::{HandshakeMachine, RoundResult, StageResult};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::{Role, WebSocket};
use url::Url;

use crate::config::{
    Config, PROXY_SCHEMES, ProxySetting, Request, header_err, parse_header, user_info,
    without_credentials,
};
use crate::redact::{RedactedUrl, is_secret_header, is_secret_subprotocol, shown_subprotocol};
use crate::transport::dial::{self, Cancel, Deadline, is_timeout};
use crate::transport::socks;
use crate::transport::stream::{Stream, Tcp, Ws};
use crate::transport::tls;
use crate::{ConnectStage, Error, RedirectRefusal, Result};

/// A freshly opened connection, not yet shared with any thread.
pub(crate) struct Opened {
    pub ws: Ws,
    pub protocol: Option<String>,
    /// Nothing waits in tungstenite's read buffer: no bytes came past the upgrade
    /// response, and no hook has read yet (see `Live::exact`).
    pub settled: bool,
}

/// How one hop of a connect ended. Returned once per hop and moved out at once, so the
/// size difference of the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Hop {
    Open(Opened),
    /// A 3xx answer to the upgrade, with its `Location` (if any).
    Redirect(Option<String>),
}

/// Opens a connection for `req`, following redirects, all under one deadline. `cancel`
/// aborts it from another thread at any stage; the socket of the attempt stays attached
/// to `cancel` (the caller detaches it when it is done with the connection set-up).
pub(crate) fn open(cfg: &Config, req: &Request, cancel: &Cancel) -> Result<Opened> {
    let dl = Deadline::after(cfg.connect_timeout);
    let mut req = req.clone();
    let mut visited = vec![req.url.clone()];
    loop {
        match hop(cfg, &req, &dl, cancel)? {
            Hop::Open(opened) => {
                log::debug!(
                    "connected to {} in {:?}",
                    RedactedUrl(&req.url),
                    dl.start.elapsed()
                );
                return Ok(opened);
            }
            Hop::Redirect(location) => {
                req = follow(&req, location.as_deref(), &mut visited, cfg.max_redirects)?;
                log::debug!("redirected to {}", RedactedUrl(&req.url));
            }
        }
    }
}

/// One connection: dial, proxy, TLS, upgrade.
fn hop(cfg: &Config, req: &Request, dl: &Deadline, cancel: &Cancel) -> Result<Hop> {
    let url = &req.url;
    let host = url.host_str().unwrap_or_default().to_string();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tls = url.scheme() == "wss";
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let proxy = pick_proxy(&cfg.proxy, url, &host, port)?;
    log::debug!(
        "connecting to {}{}",
        RedactedUrl(url),
        if proxy.is_some() { " via proxy" } else { "" }
    );
    let (dial_host, dial_port) = match &proxy {
        Some(p) => (
            p.host_str().unwrap_or_default().to_string(),
            p.port_or_known_default()
                .unwrap_or(if p.scheme() == "http" { 8080 } else { 1080 }),
        ),
        None => (host.clone(), port),
    };
    let addrs = dial::resolve(&dial_host, dial_port, dl, cancel)?;
    let sock = dial::dial(&addrs, &cfg.socket, dl, cancel)?;
    // From here `cancel` aborts any wait of the set-up by shutting the socket down.
    cancel.attach(&sock);
    // From here on every read and write is bounded by the time left, and cancellable
    // (see `stream::Tcp`): the proxy's handshake, TLS, the upgrade.
    let mut sock = Tcp::connecting(sock, dl.end, cancel.fd());
    if let Some(p) = &proxy {
        let userinfo = user_info(p, "proxy", p.scheme() == "http")?;
        let credentials = userinfo.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        match p.scheme() {
            "http" => {
                proxy_connect(&mut sock, credentials, &host, port, dl, cancel)?;
            }
            "socks5" | "socks5h" => {
                let target = match bare.parse::<IpAddr>() {
                    Ok(ip) => socks::Target::Ip(ip),
                    Err(_) if p.scheme() == "socks5h" => socks::Target::Name(bare),
                    Err(_) => {
                        let addrs = dial::resolve(bare, port, dl, cancel)?;
                        socks::Target::Ip(addrs[0].ip())
                    }
                };
                socks::connect(&mut sock, credentials, target, port, dl, cancel)?;
            }
            "socks4" | "socks4a" => {
                let target = match bare.parse::<IpAddr>() {
                    Ok(ip) => socks::Target::Ip(ip),
                    Err(_) if p.scheme() == "socks4a" => socks::Target::Name(bare),
                    Err(_) => {
                        let addrs = dial::resolve(bare, port, dl, cancel)?;
                        let v4 = addrs.iter().find(|a| a.is_ipv4()).ok_or_else(|| {
                            Error::dns(
                                bare,
                                "no IPv4 address, which SOCKS4 needs (use socks4a:// or socks5h://)",
                            )
                        })?;
                        socks::Target::Ip(v4.ip())
                    }
                };
                // SOCKS4 has a user id only (no password).
                let user = credentials.map_or("", |(u, _)| u);
                socks::connect4(&mut sock, user, target, port, dl, cancel)?;
            }
            other => {
                return Err(Error::UnsupportedProxy {
                    scheme: other.into(),
                });
            }
        }
    }
    let stream = if tls {
        Stream::Tls(Box::new(tls::handshake(&cfg.tls, &host, sock, dl)?))
    } else {
        Stream::Plain(sock)
    };
    let request = build_request(req)?;
    let mut opened = match upgrade(stream, request, cfg, dl)? {
        Hop::Open(opened) => opened,
        redirect => return Ok(redirect),
    };
    opened.ws.get_mut().connected();
    // The socket is nonblocking since the dial (see `dial::wait_ready`).
    Ok(Hop::Open(opened))
}

/// The request for the redirect target `location` of `req`, or why it is not followed.
/// `visited` holds every URL of this attempt, the first one included.
fn follow(
    req: &Request,
    location: Option<&str>,
    visited: &mut Vec<Url>,
    limit: usize,
) -> Result<Request> {
    let refuse = |reason, location: String| Error::redirect(reason, &location);
    let Some(location) = location else {
        return Err(refuse(RedirectRefusal::BadLocation, "(none)".into()));
    };
    let bad = || refuse(RedirectRefusal::BadLocation, RedactedUrl::raw(location));
    let mut next = req.url.join(location).map_err(|_| bad())?;
    let scheme = match next.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err(bad()),
    };
    next.set_scheme(scheme).map_err(|()| bad())?;
    next.set_fragment(None);
    if next.host_str().is_none_or(str::is_empty) {
        return Err(bad());
    }
    let shown = RedactedUrl(&next).to_string();
    if req.url.scheme() == "wss" && scheme == "ws" {
        return Err(refuse(RedirectRefusal::Downgrade, shown));
    }
    let origin = |u: &Url| {
        (
            u.scheme().to_string(),
            u.host_str().map(str::to_ascii_lowercase),
            u.port_or_known_default(),
        )
    };
    let mut out = req.clone();
    if origin(&next) == origin(&req.url) {
        // Same origin: the credentials in the URL go along, unless the target has its own.
        if next.username().is_empty() && next.password().is_none() {
            let _ = next.set_username(req.url.username());
            let _ = next.set_password(req.url.password());
        }
    } else {
        // Authorization, Cookie, and every header that looks like a credential (the
        // ones never logged: *token*, *key*, *secret*, *auth*, *password*).
        out.headers.retain(|(name, _)| !is_secret_header(name));
        // Likewise a subprotocol that may be a credential (Kubernetes takes a bearer
        // token as one).
        out.subprotocols.retain(|p| !is_secret_subprotocol(p));
        next = without_credentials(&next);
    }
    if visited.contains(&next) {
        return Err(refuse(RedirectRefusal::Loop, shown));
    }
    if visited.len() > limit {
        return Err(refuse(RedirectRefusal::TooMany(limit), shown));
    }
    visited.push(next.clone());
    out.url = next;
    Ok(out)
}

/// The HTTP upgrade, driven on tungstenite's handshake machine (which bounds the response
/// head to 64 KiB) with a request we serialise ourselves: tungstenite's own client
/// handshake logs the whole request, credentials included, at trace level.
fn upgrade(
    stream: Stream,
    request: tungstenite::handshake::client::Request,
    cfg: &Config,
    dl: &Deadline,
) -> Result<Hop> {
    let stage = ConnectStage::Upgrade;
    let tls = matches!(stream, Stream::Tls(_));
    let failed = |e: tungstenite::Error| match e {
        // The deadline's own (see `Deadline::failed`); an OS `ETIMEDOUT` is an I/O error.
        tungstenite::Error::Io(io) if is_timeout(&io) && dl.passed() => dl.timeout(stage),
        // A TLS alert after the handshake (TLS 1.3 servers that require a client
        // certificate say so only now): a TLS error, fatal if about certificates.
        tungstenite::Error::Io(io) => match tls.then(|| tls::failure(&io)).flatten() {
            Some(e) => e,
            None => Error::from_ws(tungstenite::Error::Io(io)),
        },
        e => Error::from_ws(e),
    };
    let offered = request
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().map(str::to_string))
        .transpose()
        .map_err(|e| header_err("Sec-WebSocket-Protocol", e))?;
    let extensions: Vec<String> = request
        .headers()
        .get_all("sec-websocket-extensions")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(extension_names)
        .collect();
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
    let mut stream = stream;
    let (response, stream, tail) = loop {
        let mut machine = HandshakeMachine::start_read(stream);
        let (response, mut next, tail) = loop {
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
        // RFC 9110 15.2: an informational answer (100 Continue, 103 Early Hints) comes
        // before the final one: skip it, and read what followed it again. A server that
        // sends them without end meets the connect deadline.
        if response.status().is_informational()
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            next.unread(tail);
            dl.left(stage)?;
            stream = next;
            continue;
        }
        break (response, next, tail);
    };
    if cfg.max_redirects > 0 && matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        let location = match response.headers().get("location") {
            None => None,
            Some(v) => match v.to_str() {
                Ok(v) => Some(v.to_string()),
                Err(_) => {
                    return Err(Error::Redirect {
                        reason: RedirectRefusal::BadLocation,
                        location: "(not valid text)".into(),
                    });
                }
            },
        };
        return Ok(Hop::Redirect(location));
    }
    let protocol = verify_response(
        response,
        tail.clone(),
        &key,
        offered.as_deref(),
        &extensions,
    )?;
    // Not `from_partially_read` with an empty tail: its buffer starts with capacity 0, and
    // since delivered messages share it, every later allocation is sized for one frame
    // (a `recv` and a zero-filled allocation per message). `from_raw_socket` keeps the
    // configured read buffer size.
    let settled = tail.is_empty();
    let ws = if settled {
        WebSocket::from_raw_socket(stream, Role::Client, Some(cfg.ws_config()))
    } else {
        WebSocket::from_partially_read(stream, tail, Role::Client, Some(cfg.ws_config()))
    };
    Ok(Hop::Open(Opened {
        ws,
        protocol,
        settled,
    }))
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
    extensions: &[String],
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
    // RFC 6455 4.1: `Connection` must hold the token `Upgrade` (`keep-alive, Upgrade`
    // too); `Upgrade` must be `websocket`.
    let upgrade_token = headers
        .get_all("Connection")
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("Upgrade"));
    if !upgrade_token {
        return Err(protocol_err(ProtocolError::MissingConnectionUpgradeHeader));
    }
    let accept = derive_accept_key(key.as_bytes());
    if headers
        .get("Sec-WebSocket-Accept")
        .is_none_or(|h| h != &accept)
    {
        return Err(protocol_err(ProtocolError::SecWebSocketAcceptKeyMismatch));
    }
    // RFC 6455 4.1: an extension the client did not ask for fails the connection.
    for name in headers
        .get_all("Sec-WebSocket-Extensions")
        .iter()
        .flat_map(|v| extension_names(&String::from_utf8_lossy(v.as_bytes())))
    {
        if !extensions.iter().any(|o| o.eq_ignore_ascii_case(&name)) {
            return Err(Error::UnexpectedExtension { name });
        }
    }
    // Each answer below would be the same on the next attempt: fatal (see `is_fatal`).
    // Bytes that are not UTF-8 become U+FFFD, which no name asked for contains.
    let selected = headers
        .get("Sec-WebSocket-Protocol")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let fits = match (offered, &selected) {
        (None, None) => true,
        (Some(_), None) | (None, Some(_)) => false,
        (Some(offered), Some(sel)) => offered.split(',').any(|p| p.trim() == sel),
    };
    if !fits {
        return Err(Error::UnexpectedSubprotocol {
            chosen: selected.map(|p| shown_subprotocol(&p).to_string()),
        });
    }
    Ok(selected)
}

/// The extension names of a `Sec-WebSocket-Extensions` value
/// (`permessage-deflate; client_max_window_bits, x-foo` gives both names).
fn extension_names(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|e| e.split(';').next())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

fn build_request(req: &Request) -> Result<tungstenite::handshake::client::Request> {
    let url = without_credentials(&req.url);
    let basic = user_info(&req.url, "server", true)?
        .map(|(user, pass)| format!("Basic {}", base64(format!("{user}:{pass}").as_bytes())));
    let mut r = url.as_str().into_client_request().map_err(Error::from_ws)?;
    let headers = r.headers_mut();
    for (k, v) in &req.headers {
        let (name, value) = parse_header(k, v)?;
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
        // A request factory's `Request` was not checked by the builder.
        for p in &req.subprotocols {
            crate::config::check_subprotocol(p)?;
        }
        let v = req.subprotocols.join(", ");
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&v).map_err(|e| header_err("Sec-WebSocket-Protocol", e))?,
        );
    }
    Ok(r)
}

/// Which proxy (if any) to use for `url`.
fn pick_proxy(setting: &ProxySetting, url: &Url, host: &str, port: u16) -> Result<Option<Url>> {
    match setting {
        ProxySetting::None => Ok(None),
        ProxySetting::Explicit(p) => Ok(Some(p.clone())),
        ProxySetting::Env => proxy_from_env(url, host, port, |name| std::env::var(name).ok()),
    }
}

/// The proxy the environment asks for, the way curl reads it: `https_proxy` (or
/// `HTTPS_PROXY`) for `wss`, `http_proxy` for `ws` (never `HTTP_PROXY`: in a CGI program
/// a request header `Proxy:` becomes that variable, "httpoxy"), then `all_proxy` /
/// `ALL_PROXY`; `no_proxy` before `NO_PROXY`. A proxy whose scheme wsbeat does not speak
/// is an error, never a direct connection.
fn proxy_from_env(
    url: &Url,
    host: &str,
    port: u16,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<Url>> {
    // Like curl and Go's net/http: loopback destinations never go through an env proxy.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    {
        return Ok(None);
    }
    let names: &[&str] = if url.scheme() == "wss" {
        &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        &["http_proxy", "all_proxy", "ALL_PROXY"]
    };
    let Some((name, value)) = names
        .iter()
        .find_map(|n| var(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
    else {
        return Ok(None);
    };
    let no_proxy = var("no_proxy")
        .or_else(|| var("NO_PROXY"))
        .unwrap_or_default();
    if no_proxy_matches(&no_proxy, bare, port) {
        return Ok(None);
    }
    let value = value.trim();
    let value = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let proxy = Url::parse(&value).map_err(|e| Error::InvalidUrl {
        reason: format!("proxy in ${name}: {e}"),
    })?;
    if !PROXY_SCHEMES.contains(&proxy.scheme()) {
        return Err(Error::UnsupportedProxy {
            scheme: proxy.scheme().into(),
        });
    }
    if proxy.host_str().is_none_or(str::is_empty) {
        return Err(Error::InvalidUrl {
            reason: format!("proxy in ${name} has no host"),
        });
    }
    crate::config::check_proxy_credentials(&proxy)?;
    Ok(Some(proxy))
}

/// `NO_PROXY` matching, as curl and Go do it. Entries are separated by commas (or
/// spaces); each is one of:
/// - `*`: every destination;
/// - a domain, with or without a leading `.` or `*.`: that host and every subdomain
///   (`example.com` matches `api.example.com`, not `badexample.com`);
/// - an IP address (IPv6 with or without brackets) or a CIDR range (`10.0.0.0/8`,
///   `fd00::/8`): destinations given as an address in it (names are not resolved);
/// - any of the above with `:port` (`[::1]:8080`, `example.com:443`): only that port.
pub(crate) fn no_proxy_matches(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let host_ip = host.parse::<IpAddr>().ok();
    list.split([',', ' ', '\t'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (pattern, entry_port) = split_port(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let pattern = pattern.to_ascii_lowercase();
            if let Some((net, bits)) = pattern.split_once('/') {
                return match (net.parse::<IpAddr>(), bits.parse::<u8>(), host_ip) {
                    (Ok(net), Ok(bits), Some(ip)) => in_cidr(ip, net, bits),
                    _ => false,
                };
            }
            if let Ok(ip) = pattern.parse::<IpAddr>() {
                return host_ip == Some(ip);
            }
            let domain = pattern
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .trim_end_matches('.');
            !domain.is_empty()
                && (host == domain
                    || host
                        .strip_suffix(domain)
                        .is_some_and(|rest| rest.ends_with('.')))
        })
}

/// `host:port`, `[v6]:port`, `[v6]`, a bare IPv6 address or CIDR (no port), or a name.
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (entry, None),
        };
    }
    if entry.matches(':').count() > 1 {
        return (entry, None); // IPv6 without brackets cannot carry a port
    }
    match entry.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (entry, None),
        },
        None => (entry, None),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

fn proxy_connect(
    sock: &mut Tcp,
    credentials: Option<(&str, &str)>,
    host: &str,
    port: u16,
    dl: &Deadline,
    cancel: &Cancel,
) -> Result<()> {
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some((user, pass)) = credentials {
        req.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64(format!("{user}:{pass}").as_bytes())
        ));
    }
    req.push_str("\r\n");
    sock.write_all(req.as_bytes())
        .map_err(|e| dl.failed(e, cancel, ConnectStage::Proxy))?;
    // Interim 1xx answers come before the final one and are skipped (RFC 9110 15.2); the
    // deadline bounds a proxy that sends them without end.
    loop {
        let head = proxy_head(sock, dl, cancel)?;
        let status = proxy_status(&head)?;
        if status == 101 {
            // No upgrade was asked for: a proxy that switches protocols will never send
            // the final answer (waiting for one ran into the connect timeout).
            return Err(Error::ProxyProtocol(
                "HTTP proxy answered CONNECT with 101 Switching Protocols, which only an \
                 upgrade request allows: check that the proxy URL points at an HTTP proxy"
                    .into(),
            ));
        }
        if (100..200).contains(&status) {
            log::debug!("HTTP proxy sent an interim {status} before its answer to CONNECT");
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(Error::Proxy { status });
        }
        return Ok(());
    }
}

/// Reads one response head of an HTTP proxy, byte by byte so that no tunnelled byte is
/// consumed. Lines may end in CRLF or in a bare LF (RFC 9112 2.2).
fn proxy_head(sock: &mut Tcp, dl: &Deadline, cancel: &Cancel) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !(head.ends_with(b"\n\r\n") || head.ends_with(b"\n\n")) {
        // One wait per byte: a proxy that trickles its answer meets the deadline too.
        let n = sock
            .read(&mut byte)
            .map_err(|e| dl.failed(e, cancel, ConnectStage::Proxy))?;
        if n == 0 {
            return Err(Error::io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed the connection during CONNECT",
            )));
        }
        head.push(byte[0]);
        if head.len() > PROXY_HEAD_MAX {
            return Err(Error::ProxyProtocol(format!(
                "HTTP proxy: response head over {} KiB",
                PROXY_HEAD_MAX >> 10
            )));
        }
    }
    Ok(head)
}

/// Longest response head accepted from an HTTP proxy.
const PROXY_HEAD_MAX: usize = 16 << 10;

/// The status code of an HTTP proxy's response head: its first line must be
/// `HTTP/1.x SP 3DIGIT ...` (RFC 9112 4); anything else is no HTTP proxy.
fn proxy_status(head: &[u8]) -> Result<u16> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if version.starts_with("HTTP/1.")
        && code.len() == 3
        && code.bytes().all(|b| b.is_ascii_digit())
        && let Ok(status) = code.parse()
    {
        return Ok(status);
    }
    Err(Error::ProxyProtocol(format!(
        "HTTP proxy: not an HTTP response: {:?}",
        crate::error::shortened(line, 64)
    )))
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
    fn connection_upgrade_is_a_token_of_the_header() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let answer = |connection: &str| {
            let response = tungstenite::http::Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("Upgrade", "websocket")
                .header("Connection", connection)
                .header("Sec-WebSocket-Accept", derive_accept_key(key.as_bytes()))
                .body(None)
                .unwrap();
            verify_response(response, Vec::new(), key, None, &[])
        };
        for ok in [
            "Upgrade",
            "upgrade",
            "keep-alive, Upgrade",
            "Upgrade ,keep-alive",
        ] {
            assert!(answer(ok).is_ok(), "{ok}");
        }
        for bad in ["keep-alive", "Upgraded", "close"] {
            assert!(answer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_encodes() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }

    #[test]
    fn no_proxy_rules() {
        let m = |list, host| no_proxy_matches(list, host, 443);
        assert!(m("*", "x.com"));
        assert!(m("example.com", "api.example.com"));
        assert!(m(".example.com, other", "example.com"));
        assert!(m("*.example.com", "a.b.example.com"));
        assert!(m("EXAMPLE.com", "Api.Example.COM."));
        assert!(!m("example.com", "badexample.com"));
        assert!(!m("", "x.com"));
        assert!(!m("*.", "x.com"));
        // Ports.
        assert!(m("example.com:443", "example.com"));
        assert!(!m("example.com:8443", "example.com"));
        assert!(m("[2001:db8::1]:443", "[2001:db8::1]"));
        assert!(!m("[2001:db8::1]:80", "2001:db8::1"));
        // IP literals and CIDR ranges (IPv4 and IPv6).
        assert!(m("10.1.2.3", "10.1.2.3"));
        assert!(!m("10.1.2.3", "10.1.2.4"));
        assert!(m("10.0.0.0/8", "10.200.1.1"));
        assert!(!m("10.0.0.0/8", "11.0.0.1"));
        assert!(m("192.168.1.0/24 172.16.0.0/12", "172.31.255.255"));
        assert!(m("0.0.0.0/0", "8.8.8.8"));
        assert!(m("2001:db8::1", "[2001:db8::1]"));
        assert!(m("[2001:db8::1]", "2001:db8::1"));
        assert!(m("2001:db8::/32", "[2001:db8:ffff::5]"));
        assert!(!m("2001:db8::/32", "[2001:db9::5]"));
        assert!(!m("10.0.0.0/8", "fd00::1"));
        assert!(!m("10.0.0.0/99", "10.0.0.1"));
        // A CIDR never matches a name (no resolution).
        assert!(!m("10.0.0.0/8", "ten.example"));
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn env_proxy(url: &str, vars: &[(&str, &str)]) -> Result<Option<String>> {
        let u = Url::parse(url).unwrap();
        let host = u.host_str().unwrap().to_string();
        let port = u.port_or_known_default().unwrap();
        proxy_from_env(&u, &host, port, env(vars)).map(|p| p.map(|p| p.to_string()))
    }

    #[test]
    fn env_proxy_like_curl() {
        // Lowercase wins; uppercase HTTP_PROXY is never read (httpoxy).
        let got = env_proxy("ws://a.example/", &[("HTTP_PROXY", "http://up:1")]).unwrap();
        assert_eq!(got, None);
        let got = env_proxy(
            "ws://a.example/",
            &[("http_proxy", "low:2"), ("ALL_PROXY", "http://all:3")],
        )
        .unwrap();
        assert_eq!(got.as_deref(), Some("http://low:2/"));
        let got = env_proxy(
            "wss://a.example/",
            &[
                ("HTTPS_PROXY", "http://up:1"),
                ("https_proxy", "http://low:2"),
            ],
        )
        .unwrap();
        assert_eq!(got.as_deref(), Some("http://low:2/"));
        let got = env_proxy("wss://a.example/", &[("ALL_PROXY", "socks5h://s:1080")]).unwrap();
        assert_eq!(got.as_deref(), Some("socks5h://s:1080"));
        // no_proxy before NO_PROXY.
        let vars = [
            ("all_proxy", "socks5://s:1080"),
            ("no_proxy", "other.example"),
            ("NO_PROXY", "a.example"),
        ];
        assert!(env_proxy("ws://a.example/", &vars).unwrap().is_some());
        assert!(env_proxy("ws://x.other.example/", &vars).unwrap().is_none());
        // Loopback never goes through an env proxy.
        assert!(env_proxy("ws://127.0.0.1:9/", &vars).unwrap().is_none());
        assert!(env_proxy("ws://[::1]:9/", &vars).unwrap().is_none());
        // An unsupported scheme is an error, never a direct connection.
        let err = env_proxy("ws://a.example/", &[("all_proxy", "socks://s:1080")]).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedProxy { scheme } if scheme == "socks"));
        let err = env_proxy("ws://a.example/", &[("http_proxy", "https://p:443")]).unwrap_err();
        assert!(matches!(err, Error::UnsupportedProxy { .. }));
    }

    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    fn request(url: &str) -> Request {
        Request::new(url)
            .unwrap()
            .header("Authorization", "Bearer t")
            .header("Cookie", "c=1")
            .header("X-Api-Token", "t2")
            .header("X-Other", "kept")
    }

    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    fn names(r: &Request) -> Vec<&str> {
        r.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    // Follows redirects to wss:// URLs, which a build without TLS refuses (`Error::NoTls`).
    #[cfg(any(feature = "native-tls", feature = "rustls"))]
    fn redirect_rules() {
        let start = request("wss://u:p@a.example/feed");
        let mut visited = vec![start.url.clone()];
        // Same origin: credentials kept, relative Location resolved.
        let next = follow(&start, Some("/v2/feed?x=1"), &mut visited, 5).unwrap();
        assert_eq!(next.url.as_str(), "wss://u:p@a.example/v2/feed?x=1");
        assert_eq!(
            names(&next),
            ["Authorization", "Cookie", "X-Api-Token", "X-Other"]
        );
        // Other origin (https maps to wss): every credential dropped.
        let other = follow(&next, Some("https://b.example/feed"), &mut visited, 5).unwrap();
        assert_eq!(other.url.as_str(), "wss://b.example/feed");
        assert_eq!(names(&other), ["X-Other"]);
        // A port change is another origin too.
        let mut v = vec![start.url.clone()];
        let port = follow(&start, Some("wss://a.example:8443/feed"), &mut v, 5).unwrap();
        assert_eq!(names(&port), ["X-Other"]);
        assert_eq!(port.url.username(), "");
        // Never wss -> ws.
        let mut v = vec![start.url.clone()];
        let err = follow(&start, Some("ws://a.example/feed"), &mut v, 5).unwrap_err();
        assert!(matches!(
            err,
            Error::Redirect {
                reason: RedirectRefusal::Downgrade,
                ..
            }
        ));
        let err = follow(&start, Some("http://a.example/feed"), &mut v, 5).unwrap_err();
        assert!(matches!(
            err,
            Error::Redirect {
                reason: RedirectRefusal::Downgrade,
                ..
            }
        ));
        // Percent-encoded user info survives a same-origin hop unchanged.
        let enc = request("ws://u%40x:p%2Fq@a.example/");
        let mut v = vec![enc.url.clone()];
        let next = follow(&enc, Some("/b"), &mut v, 5).unwrap();
        assert_eq!(next.url.as_str(), "ws://u%40x:p%2Fq@a.example/b");
        // ws -> wss is fine.
        let plain = request("ws://a.example/");
        let mut v = vec![plain.url.clone()];
        assert!(follow(&plain, Some("wss://a.example/"), &mut v, 5).is_ok());
        // A loop, too many, a bad Location.
        let mut v = vec![start.url.clone()];
        let err = follow(&start, Some("/feed"), &mut v, 5).unwrap_err();
        assert!(matches!(
            err,
            Error::Redirect {
                reason: RedirectRefusal::Loop,
                ..
            }
        ));
        let mut v = vec![start.url.clone()];
        let one = follow(&start, Some("/1"), &mut v, 1).unwrap();
        let err = follow(&one, Some("/2"), &mut v, 1).unwrap_err();
        assert!(matches!(
            err,
            Error::Redirect {
                reason: RedirectRefusal::TooMany(1),
                ..
            }
        ));
        for bad in [None, Some("ftp://a.example/"), Some("http://")] {
            let mut v = vec![start.url.clone()];
            let err = follow(&start, bad, &mut v, 5).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Redirect {
                        reason: RedirectRefusal::BadLocation,
                        ..
                    }
                ),
                "{bad:?}: {err:?}"
            );
        }
        // The error never shows credentials.
        let mut v = vec![start.url.clone()];
        let err = follow(
            &start,
            Some("ws://x:secret@a.example/?token=abc"),
            &mut v,
            5,
        )
        .unwrap_err();
        assert!(!err.to_string().contains("secret") && !err.to_string().contains("abc"));
    }

    #[test]
    fn extension_names_are_split() {
        assert_eq!(
            extension_names("permessage-deflate; client_max_window_bits, x-foo"),
            ["permessage-deflate", "x-foo"]
        );
        assert!(extension_names(" , ").is_empty());
    }

    /// A hostile server's 50 KB `Location` is not carried whole into the error (and from
    /// there into every `Reconnecting` event and log line): 50 070 bytes of `Display`
    /// for a loop, before (connect probe of 2026-12-01).
    #[test]
    fn a_huge_location_is_shortened_in_the_error() {
        let start = Request::new("ws://a.example/feed").unwrap();
        let long = format!("ws://a.example/{}", "x".repeat(50_000));
        let bad_scheme = format!("ftp://a.example/{}", "x".repeat(50_000));
        for (location, loop_first) in [(&long, true), (&bad_scheme, false)] {
            let mut visited = vec![start.url.clone()];
            if loop_first {
                // The second time it is a loop.
                let _ = follow(&start, Some(location), &mut visited, 5).unwrap();
            }
            let err = follow(&start, Some(location), &mut visited, 5).unwrap_err();
            let shown = err.to_string();
            assert!(
                shown.len() < 700,
                "{} bytes: {}",
                shown.len(),
                &shown[..200]
            );
            assert!(shown.contains("bytes)"), "says it was cut: {shown}");
        }
    }
}
