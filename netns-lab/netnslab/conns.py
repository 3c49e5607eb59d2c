"""Established TCP connections through the director, counted across an event.

``server`` (on a real server, or any lab host): accepts connections and echoes every
line prefixed with its name, keeping each connection open (bounded lifetime).
``client`` (in the client namespace): opens ``--count`` connections to the targets,
then every ``--interval-ms`` sends one line on each and waits for its echo (at most
``--timeout-ms``), until ``--duration`` elapsed. Prints JSON: per connection, the
exchanges that worked, the first failure (time and error) and whether it was alive at
the end; plus how many survived.

    python -m netnslab.conns server --name real-1 --port 8 --lifetime 300
    python -m netnslab.conns client --port 8 --count 20 --duration 6 198.51.100.10

Bounds: count <= 1000, duration <= 120 s, lifetime <= 3600 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


async def serve(name: str, port: int, lifetime: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(f"{name} ".encode() + line[:200])
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(handle, "0.0.0.0", port)]
    try:
        servers.append(await asyncio.start_server(handle, "::", port))
    except OSError:
        pass
    print("listening", flush=True)
    await asyncio.sleep(lifetime)
    for s in servers:
        s.close()


async def client(targets: list[str], port: int, count: int, duration: float, interval: float,
                 timeout: float) -> dict[str, Any]:
    conns: list[dict[str, Any]] = []
    streams = []
    for i in range(count):
        target = targets[i % len(targets)]
        c: dict[str, Any] = {"id": i, "target": target, "ok": 0, "by": None, "failed_at": None, "error": None}
        try:
            async with asyncio.timeout(timeout * 4):
                r, w = await asyncio.open_connection(target, port)
            streams.append((c, r, w))
        except (OSError, TimeoutError) as exc:
            c["failed_at"], c["error"] = time.time(), f"connect: {type(exc).__name__}"
            streams.append((c, None, None))
        conns.append(c)
    print(f"established {sum(1 for _c, r, _w in streams if r is not None)} {time.time():.6f}",
          file=sys.stderr, flush=True)
    end = time.monotonic() + duration
    seq = 0

    async def exchange(c: dict[str, Any], r: asyncio.StreamReader, w: asyncio.StreamWriter, seq: int) -> None:
        if c["failed_at"] is not None:
            return
        try:
            async with asyncio.timeout(timeout):
                w.write(f"{c['id']} {seq}\n".encode())
                await w.drain()
                line = await r.readline()
            if not line:
                raise ConnectionResetError("closed")
            by, _, echo = line.decode(errors="replace").strip().partition(" ")
            if echo != f"{c['id']} {seq}":
                raise ValueError(f"bad echo {line!r}")
            if c["by"] not in (None, by):
                raise ValueError(f"answered by {by}, before by {c['by']}")
            c["by"] = by
            c["ok"] += 1
        except (OSError, TimeoutError, ValueError) as exc:
            c["failed_at"], c["error"] = time.time(), f"{type(exc).__name__}: {exc}"

    while time.monotonic() < end:
        t0 = time.monotonic()
        await asyncio.gather(*(exchange(c, r, w, seq) for c, r, w in streams if r is not None))
        seq += 1
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    for _c, _r, w in streams:
        if w is not None:
            w.close()
    alive = sum(1 for c in conns if c["failed_at"] is None)
    return {"count": count, "alive": alive, "rounds": seq, "connections": conns}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netnslab.conns", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=8)
    s.add_argument("--lifetime", type=float, default=300.0)
    c = sub.add_parser("client")
    c.add_argument("targets", nargs="+")
    c.add_argument("--port", type=int, default=8)
    c.add_argument("--count", type=int, default=20)
    c.add_argument("--duration", type=float, default=6.0)
    c.add_argument("--interval-ms", type=float, default=100.0)
    c.add_argument("--timeout-ms", type=float, default=1000.0)
    c.add_argument("--out")
    args = ap.parse_args(argv)
    if args.mode == "server":
        if not 0 < args.lifetime <= 3600:
            ap.error("lifetime must be 0..3600 s")
        asyncio.run(serve(args.name, args.port, args.lifetime))
        return 0
    if not 1 <= args.count <= 1000 or not 0 < args.duration <= 120:
        ap.error("count must be 1..1000, duration 0..120 s")
    res = asyncio.run(client(args.targets, args.port, args.count, args.duration, args.interval_ms / 1000,
                             args.timeout_ms / 1000))
    text = json.dumps(res)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        import os
        os.replace(args.out + ".tmp", args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
