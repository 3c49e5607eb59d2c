"""A bounded packet capture on the lab's LAN bridge, and what it says about the pair.

:class:`BridgeCapture` runs ``tcpdump`` inside the lab's ``lan`` namespace on the
bridge (every frame any director or the router sends on the LAN crosses it), bounded
in packets (``-c``) and time (it is stopped by the lab, and killed at teardown).
:func:`read_frames` decodes the pcap with scapy into :class:`Frame` records:

* election adverts (UDP to the election port), decoded with the cluster key by
  :func:`vipless_failover.election.protocol.decode_advert` (state, flags, node);
  anything that does not decode (forged adverts of a flood) is kept as ``kind="bad"``;
* announcements: gratuitous ARP (sender IP == target IP) and unsolicited neighbour
  advertisements (ICMPv6 type 136 with Override and without Solicited), by source MAC.

:func:`switches` answers the hand-over question "was there a moment when two nodes
advertised as master or announced": among the master-only frames (MASTER-state adverts
without HANDOVER, and announcements) in a time window, a hand-over is one change of
sender; any further change means the two nodes' master windows overlapped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import topology


@dataclass(frozen=True)
class Frame:
    t: float  # capture timestamp (unix seconds, kernel time)
    kind: str  # "advert" | "garp" | "na" | "bad"
    src_mac: str
    node: str | None = None  # advert: the sender's node name; announcements: by MAC
    state: str | None = None  # advert state name
    flags: int = 0
    priority: int | None = None
    target: str | None = None  # announcements: the VIP announced

    @property
    def masterish(self) -> bool:
        """A frame only a master may send: a MASTER advert that is not a hand-over, or an
        announcement."""
        from vipless_failover.election.protocol import Flag

        if self.kind in ("garp", "na"):
            return True
        return self.kind == "advert" and self.state == "MASTER" and not (self.flags & Flag.HANDOVER)


class BridgeCapture:
    """``tcpdump -w`` on the lab bridge, in the lab's ``lan`` namespace."""

    def __init__(self, lab: topology.Lab, *, max_packets: int = 200_000, snaplen: int = 256,
                 filter: str = "", tag: str = "lan", rt_priority: int | None = None):
        self.lab = lab
        self.path = lab.workdir / f"capture-{tag}-{time.monotonic_ns()}.pcap"
        self.max_packets = max_packets
        self.snaplen = snaplen
        self.filter = filter
        self.rt_priority = rt_priority
        self.proc: topology.Spawned | None = None

    def start(self, timeout: float = 10.0) -> BridgeCapture:
        args = ["tcpdump", "-i", self.lab.link("br0"), "-w", str(self.path), "-U", "-n",
                "-s", str(self.snaplen), "-c", str(self.max_packets), "-B", "8192"]
        if self.filter:
            args.append(self.filter)
        if self.rt_priority is not None:
            args = ["chrt", "-r", str(self.rt_priority), *args]
        log = self.lab.workdir / f"{self.path.stem}.log"
        self.proc = self.lab.spawn("lan", args, name="tcpdump", log=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # tcpdump says "listening on" once it captures
            if self.proc.popen.poll() is not None:
                raise topology.LabError(f"tcpdump exited: {log.read_text()[-500:]}")
            if b"listening on" in log.read_bytes():
                return self
            time.sleep(0.02)
        raise topology.LabError("tcpdump did not start")

    def stop(self) -> Path:
        if self.proc is not None:
            time.sleep(0.05)  # let the last frames reach the file (-U: packet-buffered)
            topology.stop_process(self.proc.pid, self.proc.starttime, sig=2)  # SIGINT: flush
            try:
                self.proc.popen.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
            self.lab.forget(self.proc)
            self.proc = None
        return self.path

    def __enter__(self) -> BridgeCapture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_frames(path: Path, *, key: bytes, cluster_id: int, port: int = 5798,
                macs: Mapping[str, str] | None = None) -> list[Frame]:
    """Decode a capture: adverts (with the cluster key), GARPs and unsolicited NAs.
    ``macs`` maps a MAC (lower case) to a node name for announcements."""
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import ICMPv6ND_NA
    from scapy.layers.l2 import ARP, Ether
    from scapy.utils import PcapReader

    from vipless_failover.election.protocol import AdvertRejected, decode_advert

    macs = {k.lower(): v for k, v in (macs or {}).items()}
    out: list[Frame] = []
    if not path.exists() or path.stat().st_size == 0:
        return out
    with PcapReader(str(path)) as reader:
        for pkt in reader:
            t = float(pkt.time)
            if Ether not in pkt:
                continue
            src = pkt[Ether].src.lower()
            if UDP in pkt and pkt[UDP].dport == port:
                data = bytes(pkt[UDP].payload)
                try:
                    adv = decode_advert(data, key, cluster_id)
                except AdvertRejected:
                    out.append(Frame(t, "bad", src))
                    continue
                out.append(Frame(t, "advert", src, adv.node, adv.state.name, int(adv.flags), adv.priority))
            elif ARP in pkt:
                arp = pkt[ARP]
                if arp.psrc == arp.pdst:  # gratuitous (request or reply form)
                    out.append(Frame(t, "garp", src, macs.get(src), target=arp.psrc))
            elif ICMPv6ND_NA in pkt:
                na = pkt[ICMPv6ND_NA]
                if na.O and not na.S:
                    out.append(Frame(t, "na", src, macs.get(src), target=str(na.tgt)))
    return out


def masterish_by_node(frames: Iterable[Frame], after: float = 0.0) -> dict[str, list[float]]:
    """Times of the master-only frames of each node, at or after ``after``."""
    out: dict[str, list[float]] = {}
    for f in frames:
        if f.t >= after and f.masterish and f.node:
            out.setdefault(f.node, []).append(f.t)
    return out


def switches(frames: Sequence[Frame], after: float, before: float = float("inf")) -> list[tuple[float, str, str]]:
    """The changes of sender among the master-only frames in [after, before), in time
    order: (time, from node, to node). One hand-over is at most one switch; a second
    switch in the same window (A ... B ... A) means two nodes acted as master at once."""
    seq = sorted((f.t, f.node) for f in frames if after <= f.t < before and f.masterish and f.node)
    out: list[tuple[float, str, str]] = []
    for (_t0, n0), (t1, n1) in itertools.pairwise(seq):
        if n1 != n0:
            out.append((t1, str(n0), str(n1)))
    return out


def last_masterish(frames: Sequence[Frame], after: float, before: float = float("inf")) -> str | None:
    """The node that sent the last master-only frame in [after, before)."""
    seq = sorted((f.t, f.node) for f in frames if after <= f.t < before and f.masterish and f.node)
    return seq[-1][1] if seq else None


def advert_gaps(frames: Iterable[Frame], node: str, *, state: str = "MASTER") -> list[tuple[float, float]]:
    """(time, gap seconds) between consecutive adverts of ``node`` in ``state``."""
    ts = sorted(f.t for f in frames if f.kind == "advert" and f.node == node and f.state == state)
    return [(b, b - a) for a, b in itertools.pairwise(ts)]
