//! tokio-tungstenite 0.30 on a `current_thread` runtime: the async client a user would pick
//! instead of wsbeat, measured in the same run against the same server (issue 11). It uses
//! the same tungstenite underneath, with its default 128 KiB read buffer, TCP_NODELAY on.

use std::hint::black_box;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::runtime::{Builder, Runtime};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tungstenite::{Bytes, Message};

use crate::util::us;

/// One tokio-tungstenite connection with its own current_thread runtime, driven from the
/// calling thread (`block_on`), as a single-threaded async program would.
pub struct Tt {
    rt: Runtime,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

pub fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

impl Tt {
    pub fn connect(url: &str) -> Tt {
        let rt = runtime();
        let (ws, _) = rt
            .block_on(tokio_tungstenite::connect_async_with_config(
                url, None, true,
            ))
            .expect("tokio-tungstenite connect");
        Tt { rt, ws }
    }

    /// Server -> client: `go N SIZE`, then read until the Text end marker. Returns msg/s.
    pub fn s2c(&mut self, n: usize, size: usize) -> f64 {
        let ws = &mut self.ws;
        self.rt.block_on(async {
            let t = Instant::now();
            ws.send(Message::text(format!("go {n} {size}")))
                .await
                .expect("tt send");
            let mut got = 0;
            loop {
                match ws.next().await.expect("tt stream").expect("tt read") {
                    Message::Binary(b) => {
                        black_box(b);
                        got += 1;
                    }
                    Message::Text(_) => break,
                    _ => {}
                }
            }
            assert_eq!(got, n);
            n as f64 / t.elapsed().as_secs_f64()
        })
    }

    /// One echo round trip in µs.
    pub fn rtt(&mut self, payload: &Bytes) -> f64 {
        let ws = &mut self.ws;
        self.rt.block_on(async {
            let t = Instant::now();
            ws.send(Message::Binary(payload.clone()))
                .await
                .expect("tt send");
            loop {
                if let Message::Binary(b) = ws.next().await.expect("tt stream").expect("tt read") {
                    black_box(b);
                    break;
                }
            }
            us(t.elapsed())
        })
    }

    pub fn close(mut self) {
        let ws = &mut self.ws;
        self.rt.block_on(async {
            let _ = ws.close(None).await;
            while let Some(Ok(_)) = ws.next().await {}
        });
    }
}
