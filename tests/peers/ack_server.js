#!/usr/bin/env node
// Acking WebSocket server on the Node `ws` library, for wsbeat's acked-delivery soak
// (tests/delivery_soak.rs).
//
//     node tests/peers/ack_server.js [--port N]
//
// The first stdout line is the port. For every text message that is a JSON object with
// an integer "id", it prints "rx ID" (before acking, so a kill in between shows up as
// a received, unacked message) and answers {"ack": ID}. Other messages are ignored.
'use strict';

const path = require('path');
const ws = require(path.join(__dirname, 'node_modules', 'ws'));

let port = 0;
for (let i = 2; i < process.argv.length; i++) {
  if (process.argv[i] === '--port') port = Number(process.argv[++i]);
  else throw new Error(`unknown argument ${process.argv[i]}`);
}

const out = [];
function flush() {
  if (out.length) {
    process.stdout.write(out.join(''));
    out.length = 0;
  }
}

const server = new ws.WebSocketServer({ host: '127.0.0.1', port });
server.on('listening', () => {
  process.stdout.write(`${server.address().port}\n`);
});
server.on('connection', (sock) => {
  sock.on('message', (data, isBinary) => {
    if (isBinary) return;
    let id;
    try {
      id = JSON.parse(data.toString()).id;
    } catch (e) {
      return;
    }
    if (!Number.isInteger(id)) return;
    // Recorded synchronously (stdout to a pipe is synchronous on Linux) before the ack.
    out.push(`rx ${id}\n`);
    flush();
    sock.send(JSON.stringify({ ack: id }));
  });
});
