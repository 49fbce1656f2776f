//! A TCP proxy that can blackhole a connection: it keeps both sockets open but silently
//! drops every byte in both directions, like a dead NAT entry or a pulled cable. It
//! records when it last forwarded a byte towards the client (taken *before* the write,
//! so it is never later than the client's own arrival time).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::util::now_ns;

pub struct PConn {
    pub blackhole: AtomicBool,
    /// [`now_ns`] just before the last write of server bytes to the client.
    pub last_to_client_ns: AtomicU64,
    client: TcpStream,
    server: TcpStream,
}

pub struct Proxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<PConn>>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<PConn>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (conns.clone(), stop.clone());
        let accept = std::thread::Builder::new()
            .name("bench-proxy".into())
            .spawn(move || {
                for s in listener.incoming() {
                    if s2.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = s else { continue };
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let c = Arc::new(PConn {
                        blackhole: AtomicBool::new(false),
                        last_to_client_ns: AtomicU64::new(now_ns()),
                        client,
                        server,
                    });
                    spawn_pipe(c.clone(), true);
                    spawn_pipe(c.clone(), false);
                    let mut l = c2.lock();
                    l.retain(|c| Arc::strong_count(c) > 1);
                    l.push(c);
                }
            })
            .unwrap();
        Proxy {
            addr,
            conns,
            stop,
            accept: Some(accept),
        }
    }

    /// The newest connection.
    pub fn latest(&self) -> Option<Arc<PConn>> {
        self.conns.lock().last().cloned()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        for c in self.conns.lock().drain(..) {
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        }
    }
}

fn spawn_pipe(c: Arc<PConn>, to_client: bool) {
    let _ = std::thread::Builder::new()
        .name("bench-proxy-pipe".into())
        .stack_size(128 << 10)
        .spawn(move || {
            let (mut from, mut to) = if to_client {
                (&c.server, &c.client)
            } else {
                (&c.client, &c.server)
            };
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if c.blackhole.load(Ordering::SeqCst) {
                    continue; // swallowed: nothing forwarded, nothing closed
                }
                if to_client {
                    c.last_to_client_ns.store(now_ns(), Ordering::SeqCst);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        });
}
