//! A PKI generated at test time with the openssl CLI (`tests/peers/gen_certs.sh`) and
//! nginx terminating TLS in front of an echo server.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::echo::EchoServer;
use super::{Proc, TempDir, find_program, free_ports, missing_peer};

/// Certificates and keys made by `gen_certs.sh` in a temp dir (see the script for the list).
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Generates a fresh PKI. `None` (after a loud message) without the openssl CLI.
    pub fn generate() -> Option<Pki> {
        let openssl = match find_program("openssl", "WSBEAT_OPENSSL") {
            Ok(p) => p,
            Err(e) => {
                missing_peer("the openssl CLI", &e, "apt-get install -y openssl");
                return None;
            }
        };
        let dir = TempDir::new("pki");
        // gen_certs.sh calls `openssl`: put the one we found first on its PATH.
        let bin_dir = openssl
            .parent()
            .expect("openssl has a parent dir")
            .to_path_buf();
        let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .expect("PATH");
        let out = Command::new("sh")
            .arg(super::peers_dir().join("gen_certs.sh"))
            .arg(dir.path())
            .env("PATH", path)
            .output()
            .expect("run sh gen_certs.sh");
        assert!(
            out.status.success(),
            "gen_certs.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Pki { dir })
    }

    /// Path of `NAME.pem` / `NAME.key`, e.g. `path("server.pem")`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Contents of a file of the PKI.
    pub fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.path(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
    }

    /// `NAME.pem` + `NAME.key` as a client identity (PKCS#8 PEM, every backend).
    pub fn identity(&self, name: &str) -> wsbeat::Identity {
        wsbeat::Identity::from_pem(
            &self.read(&format!("{name}.pem")),
            &self.read(&format!("{name}.key")),
        )
        .expect("identity from PKCS#8 PEM")
    }
}

/// Which nginx `server` block (one port each) a test talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// `server.pem` (signed by the test CA, SAN localhost/127.0.0.1/::1).
    Good,
    /// `other-server.pem`: signed by a CA the client does not trust.
    UnknownCa,
    /// `wrong-host.pem`: valid, but for `wrong.example` only.
    WrongHost,
    /// `expired.pem`: expired in 2001.
    Expired,
    /// `server.pem` and `ssl_verify_client on` (client certificates of the test CA).
    MutualTls,
}

const SITES: [Site; 5] = [
    Site::Good,
    Site::UnknownCa,
    Site::WrongHost,
    Site::Expired,
    Site::MutualTls,
];

/// nginx (own prefix dir, config and logs in a temp dir; one process, no workers)
/// terminating TLS on five ports in front of an echo server.
pub struct Nginx {
    pub pki: Pki,
    pub upstream: EchoServer,
    pub version: String,
    ports: Vec<u16>,
    proc: Proc,
    dir: TempDir,
}

impl Nginx {
    /// Generates a PKI, starts an echo server (Python if installed, else Node) and
    /// nginx in front of it. `None` (after a loud message) when a peer is missing.
    pub fn start() -> Option<Nginx> {
        let nginx = match find_program("nginx", "WSBEAT_NGINX") {
            Ok(p) => p,
            Err(e) => {
                missing_peer("nginx", &e, "apt-get install -y nginx");
                return None;
            }
        };
        let pki = Pki::generate()?;
        let upstream = EchoServer::start_any()?;
        // `nginx -v` prints "nginx version: nginx/1.22.1" to stderr.
        let out = Command::new(&nginx)
            .arg("-v")
            .output()
            .expect("run nginx -v");
        let version = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let (proc, ports, dir) = super::start_with_retry("nginx", || {
            let dir = TempDir::new("nginx");
            for sub in ["logs", "tmp"] {
                fs::create_dir_all(dir.join(sub)).unwrap();
            }
            let ports = free_ports(SITES.len());
            fs::write(
                dir.join("nginx.conf"),
                config(&dir, &pki, &ports, upstream.port),
            )
            .unwrap();
            let mut cmd = Command::new(&nginx);
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("logs/error.log"))
                .arg("-g")
                .arg(format!(
                    "daemon off; master_process off; pid {};",
                    dir.join("nginx.pid").display()
                ));
            let mut proc = Proc::spawn("nginx", &mut cmd, &dir.join("logs/stderr.log"));
            proc.add_log(dir.join("logs/error.log"));
            for &p in &ports {
                proc.try_wait_port(p)?;
            }
            Ok((proc, ports, dir))
        });
        Some(Nginx {
            pki,
            upstream,
            version,
            ports,
            proc,
            dir,
        })
    }

    /// The port of a site.
    pub fn port(&self, site: Site) -> u16 {
        self.ports[SITES.iter().position(|s| *s == site).unwrap()]
    }

    /// `wss://localhost:PORT/` for a site.
    pub fn url(&self, site: Site) -> String {
        format!("wss://localhost:{}/", self.port(site))
    }

    /// nginx's error log (level info: failed handshakes show there).
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }

    /// TLS handshakes that the client aborted with an alert on `site` (as nginx logs them).
    pub fn rejected_handshakes(&self, site: Site) -> usize {
        let port = format!("server: 0.0.0.0:{}", self.port(site));
        let port2 = format!("127.0.0.1:{}", self.port(site));
        self.error_log()
            .lines()
            .filter(|l| l.contains("SSL_do_handshake() failed") && l.contains("alert"))
            .filter(|l| l.contains(&port) || l.contains(&port2))
            .count()
    }

    /// The access log (one line per proxied request).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("logs/access.log")).unwrap_or_default()
    }

    pub fn diagnostics(&self) -> String {
        self.proc.diagnostics()
    }
}

fn config(dir: &TempDir, pki: &Pki, ports: &[u16], upstream: u16) -> String {
    let d = dir.path().display();
    let mut servers = String::new();
    for (site, port) in SITES.iter().zip(ports) {
        let cert = match site {
            Site::Good | Site::MutualTls => "server",
            Site::UnknownCa => "other-server",
            Site::WrongHost => "wrong-host",
            Site::Expired => "expired",
        };
        let mtls = if *site == Site::MutualTls {
            format!(
                "        ssl_verify_client on;\n        ssl_client_certificate {};\n",
                pki.path("ca.pem").display()
            )
        } else {
            String::new()
        };
        servers.push_str(&format!(
            "    server {{
        # {site:?}
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert_pem};
        ssl_certificate_key {cert_key};
{mtls}        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Client-Dn $ssl_client_s_dn;
            proxy_read_timeout 60s;
            proxy_send_timeout 60s;
        }}
    }}
",
            cert_pem = pki.path(&format!("{cert}.pem")).display(),
            cert_key = pki.path(&format!("{cert}.key")).display(),
        ));
    }
    format!(
        "# Generated by tests/interop_support/tls.rs; run as
# nginx -p DIR -c DIR/nginx.conf -e DIR/logs/error.log -g 'daemon off; master_process off; pid DIR/nginx.pid;'
error_log {d}/logs/error.log info;
events {{
    worker_connections 128;
}}
http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
{servers}}}
"
    )
}
