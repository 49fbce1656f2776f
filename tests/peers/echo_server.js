#!/usr/bin/env node
// WebSocket echo server on the Node `ws` library, for wsbeat's interop tests.
//
//     node tests/peers/echo_server.js [--port N] [--close-code 4001] [--close-reason bye]
//                                     [--max-size BYTES] [--exit-on-stdin-eof]
//
// Same flags, output and commands as echo_server.py (see there): the first stdout
// line is the port; every message is echoed except the text commands close-me,
// stop-reading, stop-reading-chatty, "fragmented SIZE CHUNK", "ping-me N", "header NAME".
'use strict';

const path = require('path');
// ws is installed next to this file by .ci/install-peers.sh (npm ci in tests/peers).
const ws = require(path.join(__dirname, 'node_modules', 'ws'));
const wsVersion = require(path.join(__dirname, 'node_modules', 'ws', 'package.json')).version;

const args = { port: 0, closeCode: 4001, closeReason: 'bye', maxSize: 64 << 20, exitOnStdinEof: false };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const next = () => {
    if (i + 1 >= process.argv.length) throw new Error(`${a} needs a value`);
    return process.argv[++i];
  };
  if (a === '--port') args.port = Number(next());
  else if (a === '--close-code') args.closeCode = Number(next());
  else if (a === '--close-reason') args.closeReason = next();
  else if (a === '--max-size') args.maxSize = Number(next());
  else if (a === '--exit-on-stdin-eof') args.exitOnStdinEof = true;
  else throw new Error(`unknown argument ${a}`);
}

function say(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

function pattern(size) {
  const b = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) b[i] = i % 251;
  return b;
}

if (args.exitOnStdinEof) {
  // The test harness holds our stdin: if it dies, we go too.
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

const server = new ws.WebSocketServer({
  host: '127.0.0.1',
  port: args.port,
  maxPayload: args.maxSize,
  perMessageDeflate: false,
});

server.on('listening', () => {
  const port = server.address().port;
  say(port);
  process.stderr.write(`ws ${wsVersion} (node ${process.version}) listening on 127.0.0.1:${port}\n`);
});

server.on('connection', (sock, req) => {
  say('open');
  let stopped = false;
  let closing = false;
  let pongs = 0;
  let pingsWanted = 0;
  let pongTimer = null;

  sock.on('pong', () => {
    if (pingsWanted === 0) return;
    pongs += 1;
    if (pongs < pingsWanted) {
      sock.ping();
    } else {
      clearTimeout(pongTimer);
      sock.send(`pongs ${pingsWanted}`);
      pingsWanted = 0;
    }
  });

  sock.on('message', (data, isBinary) => {
    if (stopped) return; // frames already buffered when we stopped reading
    if (isBinary) {
      sock.send(data, { binary: true });
      return;
    }
    const msg = data.toString('utf8');
    const sp = msg.indexOf(' ');
    const cmd = sp < 0 ? msg : msg.slice(0, sp);
    const rest = sp < 0 ? '' : msg.slice(sp + 1);
    if (msg === 'close-me') {
      closing = true;
      sock.close(args.closeCode, args.closeReason);
    } else if (msg === 'stop-reading' || msg === 'stop-reading-chatty') {
      stopped = true;
      // Stops reading the TCP socket: the kernel still ACKs, but no frame (and so no
      // ping) is read any more, hence no pong is sent.
      sock.pause();
      say(msg);
      if (msg === 'stop-reading-chatty') {
        let n = 0;
        const t = setInterval(() => {
          n += 1;
          if (sock.readyState === ws.OPEN) sock.send(`tick ${n}`);
          else clearInterval(t);
        }, 50);
      }
    } else if (cmd === 'fragmented') {
      const [size, chunk] = rest.split(' ').map(Number);
      const data = pattern(size);
      for (let i = 0; i < size; i += chunk) {
        sock.send(data.subarray(i, Math.min(size, i + chunk)), { binary: true, fin: i + chunk >= size });
      }
    } else if (cmd === 'ping-me') {
      pingsWanted = Number(rest);
      pongs = 0;
      pongTimer = setTimeout(() => {
        pingsWanted = 0;
        sock.send('pong-timeout');
      }, 5000);
      sock.ping();
    } else if (cmd === 'header') {
      const v = req.headers[rest.toLowerCase()];
      sock.send(v === undefined ? `header ${rest} missing` : `header ${rest}=${v}`);
    } else {
      sock.send(msg);
    }
  });

  sock.on('close', (code, reason) => {
    if (closing) say('close-handshake-done', code);
    else say('peer-closed', code, reason.toString('utf8'));
  });
  sock.on('error', (e) => say('error', e.message));
});
