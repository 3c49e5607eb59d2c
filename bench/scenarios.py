"""What the bench's figures share (issue 7): the two daemons behind one interface
(:class:`Pair`: :class:`OursPair`, :class:`KaPair`), the :class:`Trial` every trial
returns, the lab helpers (a director's bridge port and the :class:`LinkCutter`, scrub,
the probe window and the outage it shows), the wire as the router sees it
(:class:`WireWatch`), and what a daemon's processes cost (CPU time, RSS).

Each figure's trials are in a module of their own: :mod:`bench.crash` (figures 1 and 2:
crash, graceful hand-over), :mod:`bench.scale` (figure 3), :mod:`bench.cost` (figure 4),
:mod:`bench.flood` (figure 5), :mod:`bench.soak`, :mod:`bench.no_rt` and
:mod:`bench.isolation`. Every trial runs in a namespace lab of :mod:`netnslab` (client
-- router -- LAN bridge -- director-a / director-b, each director with the transparent
responder) and returns a :class:`Trial`: the measured value, or ``None`` with
``bound_hit`` when its time bound was reached, plus details. The driver
(:mod:`bench.__main__`) interleaves the daemons trial by trial (ours, keepalived, ours,
keepalived ...).

A crash is modelled alike for both daemons: ``kill -9`` of the master's processes plus
the master's LAN link down (its bridge port set down: the cable pulled), because a
SIGKILLed keepalived leaves its addresses and a SIGKILLed vipless-failoverd leaves its
delivery rules, and in both cases the dead master's kernel would keep answering.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netnslab import prober, topology
from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster, event_time
from netnslab.scenarios import _wait_started
from vipless_failover.dataplane import nlcodec
from vipless_failover.dataplane.nlcodec import NLM_F_ACK, NLM_F_REQUEST
from vipless_failover.netns import in_netns

from .keepalived import KaSettings, Keepalived

A, B = "director-a", "director-b"
PRIO = {A: 150, B: 100}
PROBE_MS = 5.0
DAEMONS = ("ours", "keepalived")
TABLE = 100


@dataclass
class Trial:
    figure: str
    variant: str
    daemon: str
    index: int
    value_ms: float | None  # None: not measured (bound hit or failure; see note)
    bound_hit: bool = False
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"figure": self.figure, "variant": self.variant, "daemon": self.daemon, "index": self.index,
                "value_ms": self.value_ms, "bound_hit": self.bound_hit, "note": self.note,
                "details": self.details}


# ---------------------------------------------------------------------------
# the two daemons behind one interface


def vip_set(n: int) -> list[str]:
    """``n`` VIPs: IPv4 from 198.51.100.0/24 up to 256, else IPv6 from 2001:db8:100::1:0 on."""
    if n <= 1:
        return ["198.51.100.10"]
    if n <= 256:
        return [str(ipaddress.ip_address("198.51.100.0") + i) for i in range(n)]
    base = ipaddress.ip_address("2001:db8:100::1:0")
    return [str(base + i) for i in range(n)]


def vip_config(n: int) -> list[str]:
    """The same VIPs as prefixes (our config takes prefixes; power-of-two sizes)."""
    if n <= 1:
        return ["198.51.100.10"]
    bits = (n - 1).bit_length()
    assert 1 << bits == n, "sizes must be powers of two"
    if n <= 256:
        return [f"198.51.100.0/{32 - bits}"]
    return [f"2001:db8:100::1:0/{128 - bits}"]


class Pair:
    """Two director daemons of one kind in a lab; director-a (priority 150) preempts."""

    kind = ""

    def start(self, timeout: float) -> None: ...
    def stop(self) -> None: ...
    def pids(self, director: str) -> list[int]: ...
    def kill(self, director: str) -> float: ...
    def term(self, director: str) -> float: ...
    def state(self, director: str) -> str | None: ...
    def decision(self, director: str, after: float, timeout: float) -> float | None: ...
    def status(self, director: str) -> dict[str, Any] | None:
        return None

    def transitions_since(self, t: float) -> int:
        """Role changes of either director at or after unix time ``t``."""
        raise NotImplementedError

    def master(self) -> str | None:
        for d in (A, B):
            if self.state(d) == "MASTER":
                return d
        return None


class OursPair(Pair):
    kind = "ours"

    def __init__(self, lab: topology.Lab, interval_ms: int, *, vips: Sequence[str] | None = None,
                 preempt: bool = True, rate_pps: int | None = None, overrides: dict[str, Any] | None = None):
        over: dict[str, Any] = dict(overrides or {})
        if rate_pps is not None:
            over["announce"] = {**over.get("announce", {}), "rate_pps": rate_pps}
        common: dict[str, Any] = dict(advert_interval_ms=interval_ms, preempt=preempt, overrides=over)
        if vips is not None:
            common["vips"] = tuple(vips)
        self.lab = lab
        self.cluster = Cluster(lab, {d: NodeSettings(priority=PRIO[d], **common) for d in (A, B)})

    def start(self, timeout: float) -> None:
        self.cluster.start()
        self.cluster.wait_converged(timeout)

    def stop(self) -> None:
        self.cluster.stop()
        for d in self.cluster:
            if d.proc is not None:
                self.lab.forget(d.proc)

    def pids(self, director: str) -> list[int]:
        d = self.cluster[director]
        return d.pids if d.running else []  # the director and its election process

    def kill(self, director: str) -> float:
        return self.cluster[director].kill()

    def term(self, director: str) -> float:
        return self.cluster[director].term()

    def state(self, director: str) -> str | None:
        d = self.cluster[director]
        return d.state() if d.running else None

    def decision(self, director: str, after: float, timeout: float) -> float | None:
        try:
            ev = self.cluster[director].wait_transition("MASTER", timeout, after=after - 0.001)
        except topology.LabError:
            return None
        # the election's decision time: the line itself is written after the takeover's
        # flip and first announcement (daemon._takeover_first)
        return float(ev["decided_at"]) if "decided_at" in ev else event_time(ev)

    def status(self, director: str) -> dict[str, Any] | None:
        return self.cluster[director].status()

    def transitions_since(self, t: float) -> int:
        return sum(1 for d in self.cluster for ev in d.transitions()
                   if (event_time(ev) or 0.0) >= t)


class KaPair(Pair):
    kind = "keepalived"

    def __init__(self, lab: topology.Lab, interval_ms: int, *, vips: Sequence[str] | None = None,
                 preempt: bool = True, next_hop: bool = False, extra_global: Sequence[str] = ()):
        vips = list(vips) if vips is not None else [str(v) for v in topology.DEFAULT_VIPS]
        kw: dict[str, Any] = {}
        if next_hop:
            # VIP-less delivery behind the floating next hop: rules + local routes, like ours
            # one floating next hop, IPv4, like ours in the lab (keepalived ignores a
            # virtual_ipaddress of the other family than its instance's anyway); the IPv4
            # local route needs "scope host" (through netlink the kernel refuses it without)
            kw = dict(floating=(str(topology.NEXT_HOP4),),
                      rules=(f"to {topology.VIP_NET4} table {TABLE} priority 100",
                             f"to {topology.VIP_NET6} table {TABLE} priority 100"),
                      routes=(f"local 0.0.0.0/0 dev lo scope host table {TABLE}", f"local ::/0 dev lo table {TABLE}"))
        else:
            kw = dict(vips=tuple(v + ("/128" if ":" in v else "/32") for v in vips))
        self.lab = lab
        self.kas = {d: Keepalived(lab, d, KaSettings(priority=PRIO[d], advert_interval_ms=interval_ms,
                                                     preempt=preempt, extra_global=tuple(extra_global), **kw))
                    for d in (A, B)}

    def start(self, timeout: float) -> None:
        for k in self.kas.values():
            k.start()
        deadline = time.monotonic() + timeout
        while True:
            states = {d: k.state() for d, k in self.kas.items()}
            if sorted(states.values(), key=str) == ["BACKUP", "MASTER"]:
                return
            if time.monotonic() > deadline:
                raise topology.LabError(f"keepalived pair not converged within {timeout}s: {states}")
            time.sleep(0.02)

    def stop(self) -> None:
        for k in self.kas.values():
            k.stop()

    def pids(self, director: str) -> list[int]:
        return self.kas[director].pids() if self.kas[director].running else []

    def kill(self, director: str) -> float:
        return self.kas[director].kill()

    def term(self, director: str) -> float:
        return self.kas[director].term()

    def state(self, director: str) -> str | None:
        k = self.kas[director]
        return k.state() if k.running else None

    def decision(self, director: str, after: float, timeout: float) -> float | None:
        try:
            return self.kas[director].wait_log("Entering MASTER STATE", timeout, after=after).t
        except topology.LabError:
            return None

    def transitions_since(self, t: float) -> int:
        return sum(1 for k in self.kas.values() for line in list(k.lines)
                   if line.t >= t and "Entering " in line.text and " STATE" in line.text)


def start_with_a_master(pair: Pair, timeout: float, master_within: float) -> None:
    """Start the pair and wait until director-a (the higher priority) is master."""
    pair.start(timeout=timeout)
    deadline = time.monotonic() + master_within
    while (master := pair.master()) != A:  # director-a preempts
        if time.monotonic() > deadline:
            raise topology.LabError(f"{pair.kind}: director-a is not master after the start ({master})")
        time.sleep(0.1)


def make_pair(kind: str, lab: topology.Lab, interval_ms: int, **kw: Any) -> Pair:
    if kind == "ours":
        kw.pop("next_hop", None)
        return OursPair(lab, interval_ms, **kw)
    kw.pop("rate_pps", None)
    return KaPair(lab, interval_ms, **kw)


# ---------------------------------------------------------------------------
# lab helpers


def bridge_port(lab: topology.Lab, director: str) -> str:
    """The LAN bridge port of a director (netnslab names it ``p-<last part of the name>``)."""
    return lab.link("p-" + director.rsplit("-", 1)[-1][:3])


def link(lab: topology.Lab, director: str, up: bool) -> None:
    lab.ip("lan", "link", "set", bridge_port(lab, director), "up" if up else "down")


class LinkCutter:
    """Takes a director's LAN bridge port down with one netlink request from this
    process (prepared beforehand): the crash's instant is known to ~0.1 ms. (``ip link
    set`` is a process to spawn, 15 to 70 ms here, during which the dead master's
    kernel and responder still answered: that, not the daemons, was most of the spread
    of the crash figure.)"""

    IFF_UP = 0x1
    RTM_NEWLINK = 16

    def __init__(self, lab: topology.Lab, director: str):
        port = bridge_port(lab, director)
        with in_netns(lab.ns("lan")):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self.index = socket.if_nametoindex(port)
        self.sock.bind((0, 0))
        self.sock.settimeout(2.0)

    def down(self) -> float:
        """The port down; returns the unix time the kernel acknowledged it."""
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, self.index, 0, self.IFF_UP)  # ifinfomsg
        self.sock.send(nlcodec.encode(self.RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, body))
        ack = self.sock.recv(4096)
        t = time.time()
        err = nlcodec.parse_acks(ack).get(1, 0)
        if err:
            raise OSError(err, f"link down of ifindex {self.index}: {os.strerror(err)}")
        return t

    def close(self) -> None:
        self.sock.close()


def scrub(lab: topology.Lab, director: str) -> None:
    """Remove what a killed daemon left in a director namespace: delivery rules at
    priority 100, table 100, VIP / next-hop addresses, our nftables table."""
    for fam in ("-4", "-6"):
        for _ in range(8):
            if lab.ip(director, fam, "rule", "del", "pref", "100", check=False).returncode != 0:
                break
        lab.ip(director, fam, "route", "flush", "table", str(TABLE), check=False)
    iface = lab.director(director).iface
    for p in (str(topology.VIP_NET4), str(topology.VIP_NET6), "192.0.2.100/32", "2001:db8:1::100/128"):
        lab.ip(director, "-6" if ":" in p else "-4", "addr", "flush", "dev", iface, "to", p, check=False)
    lab.exec(director, "nft", "delete", "table", "inet", "vipless_failover", check=False)


def warm_up(lab: topology.Lab, targets: Sequence[str]) -> None:
    lab.probe(list(targets), count=3, interval_ms=50, timeout_ms=1500)


def probe_window(lab: topology.Lab, targets: Sequence[str], event: Callable[[], float], *,
                 lead_s: float, duration_s: float) -> tuple[dict[str, Any], float]:
    """Probe every 5 ms (bounded count and duration), fire ``event`` after ``lead_s``."""
    out = lab.workdir / f"probe-{time.monotonic_ns()}.json"
    count = int(duration_s * 1000 / PROBE_MS)
    sp = lab.start_prober(list(targets), out=out, interval_ms=PROBE_MS, count=count, duration_s=duration_s,
                          timeout_ms=500)
    try:
        _wait_started(sp, timeout=10)
        time.sleep(lead_s)
        t_event = event()
        rc = sp.popen.wait(timeout=duration_s + 30)
    finally:
        if sp.popen.poll() is None:
            topology.stop_process(sp.pid, sp.starttime)
        lab.forget(sp)
    if rc != 0:
        raise topology.LabError(f"prober exited {rc}")
    res = topology.read_prober(out)
    out.unlink(missing_ok=True)
    return res, t_event


def outage_after(res: dict[str, Any], t_event: float) -> dict[str, Any]:
    """Client-visible outage caused by the event: from the first lost probe sent at or
    after it to the next answered one (per stream, the longest); lost probes."""
    probes = sorted(prober.probes_of(res), key=lambda p: p.sent)
    streams: dict[str, list[prober.Probe]] = {}
    for p in probes:
        streams.setdefault(f"{p.proto} {p.target}", []).append(p)
    worst, recovered, lost = 0.0, True, 0
    for ps in streams.values():
        after = [p for p in ps if p.sent >= t_event - PROBE_MS / 1000]
        lost += sum(1 for p in after if p.by is None)
        start = None
        for p in after:
            if p.by is None and start is None:
                start = p.sent
            elif p.by is not None and start is not None:
                worst = max(worst, (p.sent - start) * 1000)
                start = None
        if start is not None:
            recovered = False
            worst = max(worst, (after[-1].sent - start) * 1000 + PROBE_MS)
    seen = prober.after_event(res, t_event)
    return {"outage_ms": round(worst, 1), "recovered": recovered, "lost": lost, "seen": seen,
            "sent": res["summary"]["sent"]}


# ---------------------------------------------------------------------------
# the wire, as the router sees it (the crash figure, no_rt, isolation)

ETH_P_ALL = 3
SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class WireFrame:
    t: float  # the kernel's receive time (SO_TIMESTAMPNS, CLOCK_REALTIME like time.time())
    src: str  # source MAC, lower case
    kind: str  # "advert" | "garp" | "na" (announcements), "arp" (other ARP)


def classify_frame(data: bytes) -> str | None:
    """What an Ethernet frame on the LAN is, for the crash figure: ``advert`` (IPv4,
    UDP or VRRP (112), to a multicast MAC 01:00:5e:..: ours to 224.0.0.18 port 5798,
    keepalived's VRRP), ``garp`` (ARP with sender IP == target IP), ``arp`` (other
    ARP), ``na`` (an ICMPv6 neighbour advertisement without the Solicited flag: next
    header 58 at offset 6 of the IPv6 header, type 136 at 40), else None."""
    if len(data) < 14:
        return None
    etype = int.from_bytes(data[12:14], "big")
    if etype == 0x0800 and data[0:3] == b"\x01\x00\x5e" and len(data) >= 34:
        return "advert" if data[14 + 9] in (17, 112) else None
    if etype == 0x0806 and len(data) >= 42:
        return "garp" if data[14 + 14:14 + 18] == data[14 + 24:14 + 28] else "arp"
    if etype == 0x86DD and len(data) >= 14 + 45 and data[14 + 6] == 58 and data[14 + 40] == 136:
        return None if data[14 + 44] & 0x40 else "na"
    return None


class WireWatch:
    """Adverts and announcements on the LAN as the router receives them: an AF_PACKET
    socket (ETH_P_ALL) opened in the router's namespace, bound to its LAN interface, with
    kernel receive timestamps (SO_TIMESTAMPNS). A thread records, bounded in count
    (``limit``) and stopped by :meth:`close`, a :class:`WireFrame` for every frame from
    one of ``macs`` that :func:`classify_frame` names."""

    def __init__(self, ns: str, iface: str, macs: Sequence[str], limit: int = 200_000,
                 kinds: Sequence[str] | None = None):
        self.macs = {m.lower() for m in macs}
        #: record only frames of these kinds (None: all); the limit counts what is recorded
        self.kinds = None if kinds is None else frozenset(kinds)
        self.iface = iface
        self.limit = limit
        self.frames: list[WireFrame] = []
        self.cond = threading.Condition()
        self.stop_ev = threading.Event()
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, ETH_P_ALL))  # CPython puts the protocol in network order itself
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cmsg_len = socket.CMSG_SPACE(16)
        while not self.stop_ev.is_set():
            try:
                data, anc, _flags, addr = self.sock.recvmsg(128, cmsg_len)
            except TimeoutError:
                continue
            except OSError:
                continue
            if addr[0] != self.iface or addr[2] == PACKET_OUTGOING:
                continue
            kind = classify_frame(data)
            if kind is None or (self.kinds is not None and kind not in self.kinds):
                continue
            src = data[6:12].hex(":")
            if src not in self.macs:
                continue
            t = None
            for level, typ, val in anc:
                if level == socket.SOL_SOCKET and typ == SCM_TIMESTAMPNS and len(val) >= 16:
                    sec, nsec = struct.unpack_from("qq", val)
                    t = sec + nsec / 1e9
            with self.cond:
                if len(self.frames) < self.limit:
                    self.frames.append(WireFrame(time.time() if t is None else t, src, kind))
                self.cond.notify_all()

    def wait_for(self, kinds: Sequence[str], mac: str, after: float, timeout: float) -> float | None:
        """The time of the first frame of ``kinds`` from ``mac`` after ``after`` (bounded wait)."""
        mac = mac.lower()
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                t = self.first(kinds, mac, after)
                left = end - time.monotonic()
                if t is not None or left <= 0:
                    return t
                self.cond.wait(min(left, 0.05))

    def first(self, kinds: Sequence[str], mac: str, after: float) -> float | None:
        mac = mac.lower()
        for f in list(self.frames):
            if f.t > after and f.src == mac and f.kind in kinds:
                return f.t
        return None

    def last(self, kinds: Sequence[str], mac: str, before: float) -> float | None:
        mac = mac.lower()
        out = None
        for f in list(self.frames):
            if f.t < before and f.src == mac and f.kind in kinds:
                out = f.t
        return out

    def count(self, kinds: Sequence[str], mac: str, after: float, before: float) -> int:
        mac = mac.lower()
        return sum(1 for f in list(self.frames) if after <= f.t < before and f.src == mac and f.kind in kinds)

    def close(self) -> None:
        self.stop_ev.set()
        self.thread.join(timeout=2)
        self.sock.close()


# ---------------------------------------------------------------------------
# what a daemon's processes cost: CPU time and resident memory


def _cpu_s(pids: Sequence[int]) -> float:
    """On-CPU seconds of the processes so far, to the nanosecond: for each process the
    sum over its threads of ``sum_exec_runtime`` (first field of
    ``/proc/PID/task/TID/schedstat``, ns), plus the time of its reaped children
    (``cutime + cstime``, fields 16 and 17 of ``/proc/PID/stat``, clock ticks), so that
    the commands a daemon runs (ours runs ``nft`` at its periodic reconcile) are charged
    to it. A difference of two readings is the CPU time of a window. (utime + stime are
    sampled 10 ms ticks: a 20 s window resolved only 0.05% of a core.) A thread that
    exits inside a window takes its time with it (the daemons keep their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    ns_total = 0
    child_ticks = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                ns_total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # the thread is gone
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            child_ticks += int(f[13]) + int(f[14])  # cutime, cstime (fields 16, 17)
        except (OSError, ValueError, IndexError):
            pass
    return ns_total / 1e9 + child_ticks / tick


def _rss_mb(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024
