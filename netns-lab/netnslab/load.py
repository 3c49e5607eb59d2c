"""A bounded load on a daemon's side doors: metrics scrapes and control clients.

    python -m netnslab.load --seconds 60 [--scrape 127.0.0.1:9650 --scrapes 500]
                            [--control /path/control.sock --control-clients 200 --control-every 1]

Every second, ``--scrapes`` concurrent ``GET /metrics`` (HTTP/1.1, ``Connection:
close``), each bounded by a 5 s timeout; meanwhile ``--control-clients`` connections
to the control socket, each asking ``{"cmd": "status"}`` every ``--control-every``
seconds and reconnecting (after a second) when the daemon closes it (its connection
cap, its idle timeout). Runs in the namespace it is started in (``ip netns exec``).
Bounded: at most 900 s, 2,000 scrapes a round, 2,000 control clients. Prints one JSON
line of counts when done: scrapes by outcome (``ok``: a 200 with a body, ``closed``:
closed without an answer, the daemon's cap; ``error``, ``timeout``), the worst scrape
time, control requests answered and refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

MAX_SECONDS = 900.0
MAX_SCRAPES = 2000
MAX_CLIENTS = 2000
TIMEOUT_S = 5.0


class Load:
    def __init__(self, deadline: float):
        self.deadline = deadline
        self.scrapes: Counter[str] = Counter()
        self.control: Counter[str] = Counter()
        self.worst_scrape_s = 0.0

    async def scrape(self, host: str, port: int) -> None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    body = await reader.read()
                finally:
                    writer.close()
            outcome = "ok" if body.startswith(b"HTTP/1.1 200") else ("closed" if not body else "other")
        except TimeoutError:
            outcome = "timeout"
        except (ConnectionError, OSError):
            outcome = "error"
        self.scrapes[outcome] += 1
        self.worst_scrape_s = max(self.worst_scrape_s, time.monotonic() - t0)

    async def scraper(self, target: str, per_round: int) -> None:
        host, port = target.rsplit(":", 1)
        next_round = time.monotonic()
        while next_round < self.deadline:
            await asyncio.gather(*(self.scrape(host.strip("[]"), int(port)) for _ in range(per_round)))
            next_round += 1.0
            await asyncio.sleep(max(0.0, next_round - time.monotonic()))

    async def control_client(self, path: str, every: float) -> None:
        while time.monotonic() < self.deadline:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError:
                self.control["connect_error"] += 1
                await asyncio.sleep(1.0)
                continue
            try:
                while time.monotonic() < self.deadline:
                    writer.write(b'{"cmd": "status"}\n')
                    await writer.drain()
                    async with asyncio.timeout(TIMEOUT_S):
                        line = await reader.readline()
                    if not line:
                        self.control["closed"] += 1
                        break
                    self.control["answered" if json.loads(line).get("ok") else "refused"] += 1
                    await asyncio.sleep(every)
            except (TimeoutError, ConnectionError, OSError, ValueError):
                self.control["error"] += 1
            finally:
                writer.close()
            await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> dict[str, object]:
    load = Load(time.monotonic() + args.seconds)
    tasks = []
    if args.scrape:
        tasks.append(load.scraper(args.scrape, args.scrapes))
    if args.control:
        tasks += [load.control_client(args.control, args.control_every) for _ in range(args.control_clients)]
    print("started", flush=True)
    await asyncio.gather(*tasks)
    return {"scrapes": dict(load.scrapes), "worst_scrape_ms": round(load.worst_scrape_s * 1000, 1),
            "control": dict(load.control)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netnslab.load", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--scrape", default="", help="HOST:PORT of the metrics endpoint")
    ap.add_argument("--scrapes", type=int, default=500, help="concurrent scrapes each second")
    ap.add_argument("--control", default="", help="path of the control socket")
    ap.add_argument("--control-clients", type=int, default=200)
    ap.add_argument("--control-every", type=float, default=1.0)
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        ap.error(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 0 <= args.scrapes <= MAX_SCRAPES or not 0 <= args.control_clients <= MAX_CLIENTS:
        ap.error(f"--scrapes at most {MAX_SCRAPES}, --control-clients at most {MAX_CLIENTS}")
    if args.control_every < 0.01:
        ap.error("--control-every at least 0.01 s")
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
