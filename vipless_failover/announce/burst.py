"""The Announcer: tells the routers which MAC now serves the VIPs, in paced bursts.

Two modes (``[announce] mode``):

* **per-VIP**: for every IPv4 VIP address a gratuitous ARP (request and/or reply
  form), for every IPv6 VIP address an unsolicited neighbour advertisement
  (Override set) to all-nodes; sent from the interface MAC as an immediate burst at
  takeover, ``repeats`` repeats ``repeat_interval_ms`` apart, then an optional
  periodic refresh, paced at ``rate_pps``. While master it also answers ARP/NS for the
  VIPs the kernel does not answer (responder.py).
* **next-hop**: the same for the single floating next-hop address (see
  dataplane/nexthop.py).

Frames are built (frames.py) once in :meth:`Announcer.open`; sending runs as an
asyncio task that never holds the loop for more than about half a millisecond at a
time.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..config import Config
from ..telemetry import AnnounceCounters, AnnounceKind
from .frames import IPv6, NaBuilder, build_per_vip_frames, expand_vips, garp_frame, mac_bytes, unsolicited_na_frame
from .link import packet_socket, read_interface
from .responder import NeighbourResponder, delivered_by_destination

#: longest time one send slice may hold the event loop (seconds)
SLICE_S = 0.0005
#: most frames per slice (also bounds the syscalls between two yields)
SLICE_FRAMES = 256
#: frames sent in line by ``start()``, before it returns: the router hears of a takeover
#: before anything else the daemon does then (the rest follows in the burst task)
LEAD_FRAMES = 8


def send_frames(sock: socket.socket, lead: Iterable[tuple[AnnounceKind, Iterable[bytes]]],
                ) -> tuple[dict[AnnounceKind, int], float | None]:
    """Send ``lead`` (frames by kind) in order on a packet socket, stopping at the first
    frame that does not go (buffer full, link down: the burst deals with it). Returns
    how many of each kind went out, and when the first did (``time.monotonic()``). The
    announcer's lead and the election process's (election/process.py) both use it."""
    sent: dict[AnnounceKind, int] = {}
    first = None
    for kind, frames in lead:
        sent[kind] = 0
        for frame in frames:
            try:
                sock.send(frame)
            except OSError:
                return sent, first
            if first is None:
                first = time.monotonic()
            sent[kind] += 1
    return sent, first


class Announcer:
    """Sends the takeover announcements for one director (see module doc).

    ``log`` is a structlog-style logger (``log.info(event, **fields)``). ``netns``
    (tests, tools) opens the sockets inside that named network namespace.
    """

    def __init__(self, cfg: Config, log: Any, *, netns: str | None = None):
        self.cfg = cfg
        self.log = log
        self.netns = netns
        self.mode = cfg.announce.mode
        self.first_sent_at: float | None = None
        self.last_burst_done_at: float | None = None
        self.sent = dict.fromkeys(AnnounceKind, 0)
        self.bursts = 0
        self.max_slice_s = 0.0  # longest wall time one send slice held the event loop
        self.max_slice_cpu_s = 0.0  # most CPU time one send slice used (not counting preemption)
        self._segments: list[tuple[AnnounceKind, list[bytes]]] = []
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._responder: NeighbourResponder | None = None
        self._active = False
        self._n_vips = 0
        self.mac: bytes | None = None
        self.ll_src: IPv6 | None = None
        #: asked before every send slice: False when the election has stopped the
        #: announcement (a shared flag, see election/process.py) and this process has
        #: not yet heard of it; no frame then leaves
        self.allowed: Callable[[], bool] = lambda: True

    # -- set-up -------------------------------------------------------------

    async def open(self) -> None:
        cfg = self.cfg
        ann = cfg.announce
        if self.mode == "none":
            return
        # pyroute2's synchronous API runs its own event loop: keep it off ours
        facts = await asyncio.to_thread(read_interface, cfg.node.interface, self.netns)
        self.mac = mac_bytes(facts["mac"])
        self.ll_src = facts["link_local"]
        if self.ll_src is None:
            globals6 = [a["interface"].ip for a in facts["addresses"] if a["interface"].version == 6]
            self.ll_src = globals6[0] if globals6 else None
        if self.mode == "per-vip":
            # 65,536 VIPs take ~50 ms of pure Python to expand, frame and index: in a
            # thread, which the interpreter preempts every switch interval (5 ms), not on
            # the loop, where it delayed the election's adverts by as much (a reload at
            # 65,536 VIPs: 135-152 ms gaps at 100 ms adverts, the isolation figure)
            arp, na, n_v4, n_v6, responder = await asyncio.to_thread(self._build_per_vip, facts["index"])
            self._n_vips = n_v4 + n_v6
            if n_v6 and self.ll_src is None:
                self.log.error("announce.no_ipv6_source", interface=cfg.node.interface,
                               detail="no IPv6 address on the interface: IPv6 VIPs are not announced")
            self._segments = [(AnnounceKind.GARP, arp), (AnnounceKind.NA, na)]
            if responder is not None:
                self._responder = responder
                self._responder.open()
        elif self.mode == "next-hop":
            nh = ann.next_hop
            assert nh is not None
            self._n_vips = 1
            if nh.version == 4:
                frames = [garp_frame(self.mac, nh.ip, form) for form in ann.garp_forms]
            elif self.ll_src is not None:
                frames = [unsolicited_na_frame(self.mac, self.ll_src, nh.ip)]
            else:
                frames = []
            self._segments = [(AnnounceKind.NEXT_HOP, frames)]
        self._sock = packet_socket(cfg.node.interface, 0, self.netns)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        except OSError:  # pragma: no cover
            pass
        self.log.info("announce.opened", mode=self.mode, interface=cfg.node.interface, vips=self._n_vips,
                      frames=sum(len(f) for _, f in self._segments),
                      mac=":".join(f"{b:02x}" for b in self.mac))

    def _build_per_vip(self, ifindex: int) -> tuple[list[bytes], list[bytes], int, int, NeighbourResponder | None]:
        """Per-VIP mode's frames (GARP, NA), how many IPv4 and IPv6 VIPs, and the
        responder for them (not yet open). Computation over the config only, changing
        nothing of ``self``: it runs in a worker thread."""
        cfg = self.cfg
        ann = cfg.announce
        assert self.mac is not None
        v4, v6 = expand_vips(ann.vips)
        arp = build_per_vip_frames(self.mac, None, v4, [], ann.garp_forms)[0] if v4 else []
        na: list[bytes] = []
        if self.ll_src is not None:
            build = NaBuilder(self.mac, self.ll_src).build
            na = [build(ip) for ip in v6]
        answer_v4 = [a for net in ann.vips if net.version == 4 and not delivered_by_destination(cfg, net)
                     for a in (net if net.num_addresses > 1 else (net.network_address,))]
        responder = None
        if v6 or answer_v4:
            responder = NeighbourResponder(cfg.node.interface, ifindex, self.mac, self.ll_src,
                                           answer_v4, v6, self.netns, self.log)
        return arp, na, len(v4), len(v6), responder

    # -- control --------------------------------------------------------------

    def lead_frames(self) -> tuple[tuple[AnnounceKind, tuple[bytes, ...]], ...]:
        """The frames :meth:`start` sends first (within the rate's first allowance), for
        the election process to send at the takeover itself. Next-hop mode has none:
        its frames mean something only once the address is added (in this process)."""
        return self._lead_slices() if self.mode == "per-vip" else ()

    def _lead_slices(self) -> tuple[tuple[AnnounceKind, tuple[bytes, ...]], ...]:
        """The first frames of each segment, within the rate's first allowance."""
        budget = self._lead_budget()
        out = []
        for key, frames in self._segments:
            take = tuple(frames[:budget])
            budget -= len(take)
            out.append((key, take))
        return tuple(out)

    def _lead_budget(self) -> int:
        return min(LEAD_FRAMES, max(1, int(float(self.cfg.announce.rate_pps) * SLICE_S) or 1))

    def start(self, reason: str, lead: tuple[dict[AnnounceKind, int], float | None] | None = None) -> None:
        """Takeover (or re-assert): announce now, repeat, then refresh; answer NS/ARP.
        ``lead``: the first frames were sent already (by the election process, see
        :meth:`lead_frames`): how many of each kind, and when the first went out."""
        if self.mode == "none":
            return
        if self._sock is None:
            raise RuntimeError("Announcer.start() before open()")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._active = True
        self.first_sent_at = None
        if lead is None:
            sent = self._lead()  # first: the router hears it before anything else is done
        else:
            sent, self.first_sent_at = lead
            for key, n in sent.items():
                self.sent[key] += n
        if self._responder is not None:
            self._responder.enable()
        self._task = asyncio.get_running_loop().create_task(self._run(reason, sent), name="announce")

    def _lead(self) -> dict[AnnounceKind, int]:
        """Send the burst's first frames now (within the rate's first allowance).
        Returns how many of each segment went out; the burst goes on from there."""
        assert self._sock is not None
        done, first = send_frames(self._sock, self._lead_slices())
        if first is not None and self.first_sent_at is None:
            self.first_sent_at = first
        for key, n in done.items():
            self.sent[key] += n
        return done

    def stop(self) -> None:
        """Step-down: no further frame leaves, no NS/ARP is answered."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        if self._responder is not None:
            self._responder.disable()
        if self._active:
            self.log.info("announce.stopped", sent=self.counters().as_dict()["announcements_sent"])
        self._active = False

    def carry_counts(self, old: Announcer) -> None:
        """Continue ``old``'s counts (a reload replaces the announcer; the process's
        counters must not go back)."""
        for kind, n in old.sent.items():
            self.sent[kind] += n
        self.bursts += old.bursts

    def counters(self) -> AnnounceCounters:
        """For status and metrics: frames sent by kind, bursts."""
        return AnnounceCounters(sent=self.sent, bursts=self.bursts)

    def status(self) -> dict[str, Any]:
        counted = self.counters().as_dict()
        out: dict[str, Any] = {
            "mode": self.mode,
            "announcing": self._active,
            "burst_running": self._task is not None and not self._task.done(),
            "announcements_sent": counted["announcements_sent"],
            "vips": self._n_vips,
            "bursts": counted["bursts"],
        }
        if self._responder is not None:
            out["answered"] = dict(self._responder.answered)
        return out

    async def close(self) -> None:
        task = self._task
        self.stop()
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._responder is not None:
            self._responder.close()
            self._responder = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- sending --------------------------------------------------------------

    async def _run(self, reason: str, lead: dict[AnnounceKind, int] | None = None) -> None:
        ann = self.cfg.announce
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            self.log.info("announce.burst", reason=reason, round=0, lead_frames=sum((lead or {}).values()))
            await self._burst(lead or {})
            for k in range(1, ann.repeats + 1):
                delay = t0 + k * ann.repeat_interval_ms / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._burst()
            if ann.refresh_interval_s > 0:
                while True:
                    await asyncio.sleep(ann.refresh_interval_s)
                    await self._burst()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never kill the daemon over an announcement
            self.log.error("announce.failed", error=repr(exc))

    async def _burst(self, skip: dict[AnnounceKind, int] | None = None) -> None:
        """One pass over all frames, at most rate_pps, yielding every SLICE_S.
        ``skip``: frames of each segment already sent (by ``_lead``) just before."""
        sock = self._sock
        assert sock is not None
        skip = skip or {}
        rate = float(self.cfg.announce.rate_pps)
        allowance = max(1, min(SLICE_FRAMES, int(rate * SLICE_S) or 1))
        start = time.monotonic()
        sent = sum(skip.values())
        for key, frames in self._segments:
            i = skip.get(key, 0)
            n = len(frames)
            while i < n:
                if not self.allowed():
                    return  # the election stopped the announcement: no frame more
                now = time.monotonic()
                allowed = int((now - start) * rate) + allowance - sent
                if allowed <= 0:
                    await asyncio.sleep((sent + 1 - allowance) / rate - (now - start))
                    continue
                limit = min(n, i + allowed, i + SLICE_FRAMES)
                slice_end = now + SLICE_S
                cpu0 = time.thread_time()
                full = False
                while i < limit:
                    try:
                        sock.send(frames[i])
                    except (BlockingIOError, InterruptedError):
                        full = True  # socket buffer full: let the NIC drain, retry this frame
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:
                            full = True
                            break
                        self.log.warning("announce.send_failed", error=exc.strerror, errno=exc.errno,
                                         interface=self.cfg.node.interface)
                        return  # link down or gone: this round is lost, the next may succeed
                    if self.first_sent_at is None:
                        self.first_sent_at = time.monotonic()
                    i += 1
                    sent += 1
                    self.sent[key] += 1
                    if time.monotonic() >= slice_end:
                        break
                held = time.monotonic() - now
                cpu = time.thread_time() - cpu0
                if held > self.max_slice_s:
                    self.max_slice_s = held
                if cpu > self.max_slice_cpu_s:
                    self.max_slice_cpu_s = cpu
                if full:
                    await asyncio.sleep(0.001)
                else:
                    await asyncio.sleep(0)
        self.bursts += 1
        self.last_burst_done_at = time.monotonic()
