"""The client's prober: a bounded stream of requests to VIPs, measured.

Runs inside the client namespace. Every ``interval`` it sends one UDP request to each
target (and, with ``--tcp``, opens one new TCP connection to each, every round or every
``--tcp-every`` rounds), until ``count``
rounds were sent or ``duration`` elapsed, whichever comes first; then it waits at most
``timeout`` for the last answers. Each probe records its send time (unix seconds),
the director that answered (the responder's reply names it) and the RTT, or that it
was lost. The result, with a summary (lost count, longest outage, who answered, when
the answering director switched), is printed as JSON (or written to ``--out``).

    python -m netnslab.prober --interval-ms 10 --count 500 --port 7 198.51.100.10 2001:db8:100::10

Bounds: interval >= 1 ms, count <= 1,000,000, duration <= 600 s, timeout <= 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MAX_COUNT = 1_000_000
MAX_DURATION_S = 600.0
MAX_TIMEOUT_MS = 10_000.0


@dataclass
class Probe:
    target: str
    proto: str  # "udp" | "tcp"
    seq: int
    sent: float  # unix time
    by: str | None = None  # director that answered, None = lost
    rtt_ms: float | None = None
    error: str | None = None


class _UdpStream(asyncio.DatagramProtocol):
    def __init__(self, prober: Prober, target: str):
        self.prober = prober
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.prober.on_reply("udp", self.target, data)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: the probe stays lost
        self.prober.errors += 1


class Prober:
    def __init__(self, targets: Sequence[str], port: int, interval_ms: float, count: int,
                 duration_s: float, timeout_ms: float, tcp: bool = False, udp: bool = True,
                 tcp_every: int = 1):
        if interval_ms < 1:
            raise ValueError("interval must be >= 1 ms")
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}")
        if not 0 < duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must be 0..{MAX_DURATION_S} s")
        if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise ValueError(f"timeout must be 0..{MAX_TIMEOUT_MS} ms")
        if not (tcp or udp):
            raise ValueError("nothing to probe: enable udp and/or tcp")
        if not 1 <= tcp_every <= MAX_COUNT:
            raise ValueError(f"tcp-every must be 1..{MAX_COUNT}")
        self.targets = [str(ipaddress.ip_address(t)) for t in targets]
        self.port = port
        self.interval = interval_ms / 1000
        self.count = count
        self.duration = duration_s
        self.timeout = timeout_ms / 1000
        self.tcp = tcp
        self.tcp_every = tcp_every
        self.udp = udp
        self.probes: list[Probe] = []
        self.pending: dict[tuple[str, str, int], tuple[Probe, float]] = {}
        self.errors = 0

    def on_reply(self, proto: str, target: str, data: bytes) -> None:
        parts = data.decode(errors="replace").split()
        # reply: "<director> <proto> <target index> <seq>"
        if len(parts) < 4 or parts[1] != proto:
            return
        try:
            seq = int(parts[3])
        except ValueError:
            return
        entry = self.pending.pop((proto, target, seq), None)
        if entry is None:
            return  # late (after its timeout) or duplicate
        probe, t_mono = entry
        rtt = time.monotonic() - t_mono
        if rtt > self.timeout:  # e.g. held in the router's ARP queue: lost for the client
            probe.error = "late"
            return
        probe.by = parts[0]
        probe.rtt_ms = round(rtt * 1000, 3)

    async def _tcp_probe(self, idx: int, target: str, seq: int) -> None:
        probe = Probe(target, "tcp", seq, time.time())
        self.probes.append(probe)
        t0 = time.monotonic()
        self.pending[("tcp", target, seq)] = (probe, t0)
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(target, self.port)
                writer.write(f"tcp {idx} {seq}\n".encode())
                await writer.drain()
                line = await reader.readline()
            self.on_reply("tcp", target, line)
        except (OSError, TimeoutError) as exc:
            probe.error = type(exc).__name__
            self.pending.pop(("tcp", target, seq), None)
        finally:
            if writer is not None:
                writer.close()

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        streams: list[_UdpStream] = []
        if self.udp:
            for t in self.targets:
                fam = socket.AF_INET6 if ":" in t else socket.AF_INET
                _tr, proto = await loop.create_datagram_endpoint(
                    lambda t=t: _UdpStream(self, t), remote_addr=(t, self.port), family=fam)
                streams.append(proto)
        tasks: set[asyncio.Task[None]] = set()
        started_mono = time.monotonic()
        self.started = time.time()
        print(f"started {self.started:.6f}", file=sys.stderr, flush=True)
        for seq in range(self.count):
            due = started_mono + seq * self.interval
            if due - started_mono >= self.duration:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for idx, stream in enumerate(streams):
                probe = Probe(stream.target, "udp", seq, time.time())
                self.probes.append(probe)
                self.pending[("udp", stream.target, seq)] = (probe, time.monotonic())
                assert stream.transport is not None
                try:
                    stream.transport.sendto(f"udp {idx} {seq}".encode())
                except OSError as exc:
                    probe.error = type(exc).__name__
            if self.tcp and seq % self.tcp_every == 0:
                for idx, t in enumerate(self.targets):
                    task = asyncio.create_task(self._tcp_probe(idx, t, seq))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        self.ended = time.time()
        # last answers: wait at most one timeout
        deadline = time.monotonic() + self.timeout
        while (self.pending or tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in list(tasks):
            task.cancel()
        for s in streams:
            if s.transport is not None:
                s.transport.close()
        self.pending.clear()
        return result(self.probes, self.interval * 1000, started=self.started, ended=self.ended,
                      errors=self.errors)


# ---------------------------------------------------------------------------
# analysis (pure)


def _streams(probes: Iterable[Probe]) -> dict[tuple[str, str], list[Probe]]:
    out: dict[tuple[str, str], list[Probe]] = {}
    for p in probes:
        out.setdefault((p.proto, p.target), []).append(p)
    for v in out.values():
        v.sort(key=lambda p: p.seq)
    return out


def analyze_stream(probes: Sequence[Probe], interval_ms: float) -> dict[str, Any]:
    """Lost count, who answered, the longest run of unanswered probes (outage) and
    the switches of the answering director, for one (proto, target) stream."""
    answered_by: dict[str, int] = {}
    switches: list[dict[str, Any]] = []
    last_by: str | None = None
    best: dict[str, Any] | None = None
    run_start: Probe | None = None
    run_len = 0
    last_answered: Probe | None = None
    for p in probes:
        if p.by is None:
            if run_start is None:
                run_start = p
                run_len = 0
            run_len += 1
            continue
        answered_by[p.by] = answered_by.get(p.by, 0) + 1
        if last_by is not None and p.by != last_by:
            switches.append({"at": p.sent, "seq": p.seq, "from": last_by, "to": p.by})
        last_by = p.by
        if run_start is not None:
            outage = {"ms": round((p.sent - run_start.sent) * 1000, 3), "lost": run_len,
                      "from": run_start.sent, "until": p.sent, "recovered": True,
                      "last_before": last_answered.by if last_answered else None, "first_after": p.by}
            if best is None or outage["ms"] > best["ms"]:
                best = outage
            run_start = None
        last_answered = p
    if run_start is not None:
        end = probes[-1].sent + interval_ms / 1000
        outage = {"ms": round((end - run_start.sent) * 1000, 3), "lost": run_len, "from": run_start.sent,
                  "until": None, "recovered": False,
                  "last_before": last_answered.by if last_answered else None, "first_after": None}
        if best is None or outage["ms"] > best["ms"]:
            best = outage
    lost = sum(1 for p in probes if p.by is None)
    rtts = [p.rtt_ms for p in probes if p.rtt_ms is not None]
    return {
        "sent": len(probes), "answered": len(probes) - lost, "lost": lost,
        "answered_by": answered_by, "switches": switches,
        "first_by": next((p.by for p in probes if p.by), None),
        "last_by": next((p.by for p in reversed(probes) if p.by), None),
        "outage": best or {"ms": 0.0, "lost": 0, "from": None, "until": None, "recovered": True,
                           "last_before": None, "first_after": None},
        "rtt_ms_max": max(rtts) if rtts else None,
    }


def result(probes: Sequence[Probe], interval_ms: float, *, started: float | None = None,
           ended: float | None = None, errors: int = 0) -> dict[str, Any]:
    streams = {f"{proto} {target}": analyze_stream(ps, interval_ms)
               for (proto, target), ps in _streams(probes).items()}
    answered_by: dict[str, int] = {}
    for s in streams.values():
        for k, v in s["answered_by"].items():
            answered_by[k] = answered_by.get(k, 0) + v
    summary = {
        "sent": sum(s["sent"] for s in streams.values()),
        "lost": sum(s["lost"] for s in streams.values()),
        "answered_by": answered_by,
        "outage_ms": max((s["outage"]["ms"] for s in streams.values()), default=0.0),
        "recovered": all(s["outage"]["recovered"] for s in streams.values()),
        "icmp_errors": errors,
    }
    return {"interval_ms": interval_ms, "started": started, "ended": ended, "summary": summary,
            "streams": streams, "probes": [asdict(p) for p in probes]}


def probes_of(res: dict[str, Any]) -> list[Probe]:
    return [Probe(**p) for p in res["probes"]]


def after_event(res: dict[str, Any], at: float) -> dict[str, Any]:
    """What the client saw around an event at unix time ``at`` (e.g. the master's kill):
    who answered before it, the first probe sent after it that another director
    answered, and how long after the event that probe was sent (the switch time)."""
    probes = sorted(probes_of(res), key=lambda p: p.sent)
    before = [p for p in probes if p.sent < at and p.by]
    prev = before[-1].by if before else None
    after = [p for p in probes if p.sent >= at]
    first_new = next((p for p in after if p.by and p.by != prev), None)
    lost_after = sum(1 for p in after if p.by is None)
    answered_after: dict[str, int] = {}
    for p in after:
        if p.by:
            answered_after[p.by] = answered_after.get(p.by, 0) + 1
    return {
        "before_by": prev,
        "after_by": first_new.by if first_new else None,
        "switch_ms": round((first_new.sent - at) * 1000, 3) if first_new else None,
        "lost_after": lost_after,
        "answered_after": answered_after,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netnslab.prober", description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="+", help="VIP addresses")
    ap.add_argument("--port", type=int, default=7)
    ap.add_argument("--interval-ms", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=100, help="rounds to send (each round: every target)")
    ap.add_argument("--duration", type=float, default=10.0, help="stop sending after this many seconds")
    ap.add_argument("--timeout-ms", type=float, default=500.0, help="a probe unanswered this long is lost")
    ap.add_argument("--tcp", action="store_true", help="also open one new TCP connection per target per round")
    ap.add_argument("--tcp-every", type=int, default=1, metavar="N",
                    help="with --tcp: a new TCP connection every N rounds only (default 1)")
    ap.add_argument("--no-udp", action="store_true")
    ap.add_argument("--out", help="write the JSON result here instead of stdout")
    args = ap.parse_args(argv)
    try:
        prober = Prober(args.targets, args.port, args.interval_ms, args.count, args.duration,
                        args.timeout_ms, tcp=args.tcp, udp=not args.no_udp, tcp_every=args.tcp_every)
    except ValueError as exc:
        ap.error(str(exc))
    res = asyncio.run(prober.run())
    text = json.dumps(res)
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
