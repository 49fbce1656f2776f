#!/usr/bin/env python3
"""WebSocket echo server on the Python `websockets` library, for wsbeat's interop tests.

    python3 tests/peers/echo_server.py [--port N] [--close-code 4001] [--close-reason bye]
                                       [--max-size BYTES] [--exit-on-stdin-eof]

Listens on 127.0.0.1 (port 0 = any free port) and prints the port as the first line
of stdout, then one line per notable event ("open", "peer-closed 1000 ", ...).

Every text or binary message is echoed back, except these text commands:

    close-me              close with --close-code / --close-reason (the server
                          prints "close-handshake-done CODE" once the client answered)
    stop-reading          stop reading the socket (the kernel still ACKs TCP, but no
                          frame is read any more, so pings go unanswered) and send nothing
    stop-reading-chatty   stop reading, but keep sending "tick N" every 50 ms
    fragmented SIZE CHUNK send one binary message of SIZE bytes (byte i = i % 251) as
                          frames of CHUNK bytes (a fragmented message)
    ping-me N             send N pings one after the other, each waiting for its pong,
                          then send "pongs N" (or "pong-timeout" after 5 s)
    header NAME           answer "header NAME=VALUE" from the upgrade request (or
                          "header NAME missing")

The Node twin is echo_server.js (same flags, same commands).
"""

import argparse
import asyncio
import os
import sys
import threading

import websockets
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


def say(*parts):
    print(*parts, flush=True)


def pattern(size):
    block = bytes(range(251))
    reps = size // 251 + 1
    return (block * reps)[:size]


async def chatty(ws):
    n = 0
    try:
        while True:
            n += 1
            await ws.send(f"tick {n}")
            await asyncio.sleep(0.05)
    except ConnectionClosed:
        pass


async def handler(ws, args):
    say("open")
    try:
        async for msg in ws:
            if isinstance(msg, str):
                cmd, _, rest = msg.partition(" ")
                if msg == "close-me":
                    await ws.close(args.close_code, args.close_reason)
                    rcvd = ws.protocol.close_rcvd
                    say("close-handshake-done", rcvd.code if rcvd else "none")
                    return
                if msg in ("stop-reading", "stop-reading-chatty"):
                    ws.transport.pause_reading()
                    say(msg)
                    if msg == "stop-reading-chatty":
                        await chatty(ws)
                    else:
                        await asyncio.Event().wait()  # until the process is killed
                    return
                if cmd == "fragmented":
                    size, chunk = (int(x) for x in rest.split())
                    data = pattern(size)
                    await ws.send(data[i : i + chunk] for i in range(0, size, chunk))
                    continue
                if cmd == "ping-me":
                    n = int(rest)
                    try:
                        for _ in range(n):
                            waiter = await ws.ping()
                            await asyncio.wait_for(waiter, 5)
                        await ws.send(f"pongs {n}")
                    except asyncio.TimeoutError:
                        await ws.send("pong-timeout")
                    continue
                if cmd == "header":
                    value = ws.request.headers.get(rest)
                    await ws.send(
                        f"header {rest}={value}" if value is not None else f"header {rest} missing"
                    )
                    continue
            await ws.send(msg)
    except ConnectionClosed:
        pass
    rcvd = ws.protocol.close_rcvd
    if rcvd is not None:
        say("peer-closed", rcvd.code, rcvd.reason)
    else:
        say("peer-gone")


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--close-code", type=int, default=4001)
    p.add_argument("--close-reason", default="bye")
    p.add_argument("--max-size", type=int, default=64 << 20)
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    args = p.parse_args()
    if args.exit_on_stdin_eof:
        # The test harness holds our stdin: if it dies, we go too.
        def watch():
            sys.stdin.buffer.read()
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()

    async def h(ws):
        await handler(ws, args)

    async with serve(
        h,
        "127.0.0.1",
        args.port,
        max_size=args.max_size,
        ping_interval=None,  # the client drives the heartbeat; see "ping-me"
        compression=None,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        say(port)
        print(f"websockets {websockets.version.version} listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
