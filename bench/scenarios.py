"""The bench's trials: one function per figure of issue 7, ours and keepalived alike.

Every trial runs in a namespace lab of :mod:`netnslab` (client -- router -- LAN bridge --
director-a / director-b, each director with the transparent responder) and returns a
:class:`Trial`: the measured value, or ``None`` with ``bound_hit`` when its time bound
was reached, plus details. The driver (:mod:`bench.__main__`) interleaves the daemons
trial by trial (ours, keepalived, ours, keepalived ...).

A crash is modelled alike for both daemons: ``kill -9`` of the master's processes plus
the master's LAN link down (its bridge port set down: the cable pulled), because a
SIGKILLed keepalived leaves its addresses and a SIGKILLed vipless-failoverd leaves its
delivery rules, and in both cases the dead master's kernel would keep answering.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netnslab import prober, topology
from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster, event_time, master_down_ms
from netnslab.scenarios import _wait_started
from vipless_failover.dataplane import nlcodec
from vipless_failover.dataplane.nlcodec import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE
from vipless_failover.netns import in_netns

from .keepalived import KaSettings, Keepalived, addresses_added

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
# figure 1 + 2: crash failover, graceful hand-over (client-visible outage)

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


ANNOUNCEMENTS = ("garp", "na")

TARGETS = ("198.51.100.10",)


def crash_phase_s(interval_ms: int, index: int, n: int) -> float:
    """The crash's phase for trial ``index`` of ``n``, after the master's advert:
    stratified over the advert interval (the middle of the index-th of n equal slices),
    the same for both daemons in trial ``index`` (paired)."""
    return interval_ms / 1000 * (index + 0.5) / max(1, n)


def crash_trial(kind: str, index: int, interval_ms: int, *, lab: topology.Lab, n: int = 1) -> Trial:
    """Crash of the master (its LAN port down by one netlink request, then kill -9) at a
    chosen phase of its advert cycle:
    the bench watches the wire from the router (:class:`WireWatch`), waits for a master
    advert at t_adv and crashes at t_adv + interval + :func:`crash_phase_s`. Value: the
    client-visible outage. Details also: ``phase_ms`` (achieved: the crash - the
    master's last advert on the wire before it) and ``reaction_ms`` (the backup's first
    announcement on the wire - (that last advert + its master-down interval))."""
    variant = f"{interval_ms} ms adverts"
    pair = make_pair(kind, lab, interval_ms)
    interval = interval_ms / 1000
    duration = (4.0 if interval_ms < 1000 else 7.0) + 2 * interval
    phase = crash_phase_s(interval_ms, index, n)
    master = None
    wire: WireWatch | None = None
    cutter: LinkCutter | None = None
    try:
        pair.start(timeout=10 + 6 * interval)
        master = pair.master()
        assert master is not None
        backup = B if master == A else A
        m_mac, b_mac = lab.mac(master), lab.mac(backup)
        warm_up(lab, TARGETS)
        wire = w = WireWatch(lab.ns("router"), lab.router.iface, (m_mac, b_mac))
        cutter = LinkCutter(lab, master)
        seen_adv: list[float] = []

        def crash() -> float:
            # a stratified phase against the master's advert timer, the same for both
            # daemons in trial ``index``: the phase decides most of the outage (3 x
            # interval + skew - phase), so random phases with 10 trials hid any difference
            t_adv = w.wait_for(("advert",), m_mac, time.time(), timeout=2 * interval + 1.0)
            if t_adv is not None:
                seen_adv.append(t_adv)
                time.sleep(max(0.0, t_adv + interval + phase - time.time()))
            else:
                time.sleep(phase)  # no advert seen: the phase is not controlled (recorded)
            # the master off the LAN first (the instant of the crash), then its processes
            t = cutter.down()
            pair.kill(master)
            return t

        res, t_kill = probe_window(lab, TARGETS, crash, lead_s=0.5, duration_s=duration)
        t_dec = pair.decision(backup, t_kill, 2)
        t_ann = wire.wait_for(ANNOUNCEMENTS, b_mac, t_kill, timeout=1.0)
        last_adv = wire.last(("advert",), m_mac, t_kill)
        o = outage_after(res, t_kill)
        md_ms = master_down_ms(interval_ms, PRIO[backup])
        d = {"master": master, **o, "decision_ms": None if t_dec is None else round((t_dec - t_kill) * 1000, 1),
             "phase_target_ms": round(phase * 1000, 1),
             "phase_ms": None if last_adv is None else round((t_kill - last_adv) * 1000, 2),
             "master_down_ms": round(md_ms, 2),
             "announce_ms": None if t_ann is None else round((t_ann - t_kill) * 1000, 2),
             "reaction_ms": None if (t_ann is None or last_adv is None)
             else round((t_ann - (last_adv + md_ms / 1000)) * 1000, 2),
             "master_adverts_after_kill": wire.count(("advert",), m_mac, t_kill, t_kill + 1.0),
             "advert_seen_before_kill": bool(seen_adv)}
        if not o["recovered"] or o["seen"]["after_by"] != backup:
            return Trial("crash", variant, kind, index, None, bound_hit=not o["recovered"],
                         note=f"no answer from {backup} within the {duration - 0.5:.1f} s window", details=d)
        return Trial("crash", variant, kind, index, o["outage_ms"], details=d)
    finally:
        if wire is not None:
            wire.close()
        if cutter is not None:
            cutter.close()
        if master is not None:
            link(lab, master, True)
        pair.stop()
        for d in (A, B):
            scrub(lab, d)


def graceful_trial(kind: str, index: int, interval_ms: int, how: str, *, lab: topology.Lab) -> Trial:
    """``how``: "sigterm" (both daemons) or "promote" (ours: failoverctl promote on the backup)."""
    variant = f"{how}, {interval_ms} ms adverts"
    pair = make_pair(kind, lab, interval_ms, preempt=(how != "promote"))
    try:
        pair.start(timeout=10)
        master = pair.master()
        assert master is not None
        backup = B if master == A else A
        warm_up(lab, TARGETS)

        def event() -> float:
            if how == "sigterm":
                return pair.term(master)
            assert isinstance(pair, OursPair)
            t = time.time()
            threading.Thread(target=pair.cluster[backup].ctl, args=("promote",), daemon=True).start()
            return t

        res, t_ev = probe_window(lab, TARGETS, event, lead_s=0.5 + random.uniform(0, interval_ms / 1000),
                                 duration_s=3.0 + interval_ms / 1000)
        o = outage_after(res, t_ev)
        d = {"master": master, **o}
        if o["seen"]["after_by"] != backup:
            return Trial("graceful", variant, kind, index, None, note=f"{backup} never answered", details=d)
        return Trial("graceful", variant, kind, index, o["outage_ms"], details=d)
    finally:
        pair.stop()
        for d in (A, B):
            scrub(lab, d)


# ---------------------------------------------------------------------------
# figure 3: takeover at scale (router's neighbour table is the judge)

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NDA_DST, NDA_LLADDR = 1, 2
RTNLGRP_NEIGH = 3


def _parse_neigh(buf: bytes) -> Iterator[tuple[bytes, bytes | None]]:
    """(address, MAC or None) of each neighbour entry in a receive buffer."""
    for msg in nlcodec.messages(buf):
        if msg.type != RTM_NEWNEIGH:
            continue
        a = msg.attr_map(12)  # after struct ndmsg
        if NDA_DST in a:
            yield a[NDA_DST], a.get(NDA_LLADDR)


class NeighWatch:
    """Follows the router's neighbour table (netlink notifications, in a thread) and
    records the time every watched address first carries ``mac`` together."""

    def __init__(self, ns: str, addrs: Sequence[str], mac: str):
        self.want = {socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in addrs}
        self.mac = bytes.fromhex(mac.replace(":", ""))
        self.have: set[bytes] = set()
        self.done_at: float | None = None
        self.overflow = False
        self.stop_ev = threading.Event()
        with in_netns(ns):
            self.mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
            self.dump_sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.mon.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        self.mon.bind((0, 1 << (RTNLGRP_NEIGH - 1)))
        self.mon.settimeout(0.1)
        self.dump_sock.bind((0, 0))
        self._apply(self.dump(), time.time())
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def dump(self) -> list[tuple[bytes, bytes | None]]:
        out = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            ndmsg = struct.pack("=B3xiHBB", fam, 0, 0, 0, 0)
            self.dump_sock.send(nlcodec.encode(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, ndmsg))
            while True:
                buf = self.dump_sock.recv(1 << 20)
                out.extend(_parse_neigh(buf))
                if any(m.type == NLMSG_DONE for m in nlcodec.messages(buf)):
                    break
        return out

    def _apply(self, items: Sequence[tuple[bytes, bytes | None]] | Iterator[tuple[bytes, bytes | None]],
               t: float) -> None:
        for dst, mac in items:
            if dst in self.want:
                if mac == self.mac:
                    self.have.add(dst)
                else:
                    self.have.discard(dst)
        if self.done_at is None and len(self.have) == len(self.want):
            self.done_at = t

    def _run(self) -> None:
        while not self.stop_ev.is_set() and self.done_at is None:
            try:
                buf = self.mon.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: notifications lost; fall back to a dump
                self.overflow = True
                self._apply(self.dump(), time.time())
                continue
            self._apply(_parse_neigh(buf), time.time())

    def wait(self, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while self.done_at is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.done_at

    def close(self) -> None:
        self.stop_ev.set()
        self.thread.join(timeout=2)
        self.mon.close()
        self.dump_sock.close()


RTM_NEWADDR, RTM_NEWRULE = 20, 32
IFA_ADDRESS, IFA_LOCAL = 1, 2
FRA_TABLE, FRA_PROTOCOL = 15, 21
RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE = 5, 9, 8, 19
WATCH_LIMIT = 1 << 20  # addresses / rules a watch records at most


class _NetlinkWatch:
    """A raw NETLINK_ROUTE socket opened inside a namespace, bound to ``groups``, read by
    a thread that hands every receive buffer (with the time it was read) to
    :meth:`_handle` until :meth:`close`. Bounded: the thread stops at close (0.05 s
    receive timeout) and the records are capped."""

    def __init__(self, ns: str, groups: int):
        self.overflow = False
        self.stop_ev = threading.Event()
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((0, groups))
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                buf = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: notifications were lost (flagged; counts may stay short)
                self.overflow = True
                continue
            self._handle(buf, time.time())

    def _handle(self, buf: bytes, t: float) -> None:
        raise NotImplementedError

    def after(self, t0: float) -> list[float]:
        """Times (sorted) of what was seen at or after ``t0``."""
        raise NotImplementedError

    def close(self) -> None:
        self.stop_ev.set()
        self.thread.join(timeout=2)
        self.sock.close()


class AddrWatch(_NetlinkWatch):
    """Addresses added in a namespace (netlink notifications, every message of every
    buffer), each distinct address with the time it first appeared. A keepalived backup
    adds its VIPs (or its floating addresses) right after deciding to become master, so
    the first address added after the crash is its decision as the kernel sees it (its
    console log comes through a pipe and can arrive late when it logs thousands of
    lines), and first to last is its kernel flip. Addresses added before the crash
    (a dual-master episode of the set-up) are kept apart by :meth:`after`."""

    def __init__(self, ns: str):
        self.added: dict[bytes, float] = {}  # family byte + address -> first seen
        super().__init__(ns, (1 << (RTNLGRP_IPV4_IFADDR - 1)) | (1 << (RTNLGRP_IPV6_IFADDR - 1)))

    def _handle(self, buf: bytes, t: float) -> None:
        for msg in nlcodec.messages(buf):
            if msg.type != RTM_NEWADDR:
                continue
            a = msg.attr_map(8)  # after struct ifaddrmsg
            key = msg.payload[:1] + (a.get(IFA_LOCAL) or a.get(IFA_ADDRESS) or b"")  # ifa_family + address
            if key not in self.added and len(self.added) < WATCH_LIMIT:
                self.added[key] = t

    def after(self, t0: float) -> list[float]:
        """Times (sorted) of the distinct addresses first added at or after ``t0``."""
        return sorted(t for t in list(self.added.values()) if t >= t0)

    def before(self, t0: float) -> int:
        return sum(1 for t in list(self.added.values()) if t < t0)


class RuleWatch(_NetlinkWatch):
    """Policy rules added in a namespace with rule protocol ``protocol`` (and, if given,
    table ``table``): opened in the backup's namespace before the crash, it sees our
    delivery rules arrive. ``times`` holds the time of each (every RTM_NEWRULE message
    of every buffer)."""

    def __init__(self, ns: str, protocol: int, table: int | None = None):
        self.protocol, self.table = protocol, table
        self.times: list[float] = []
        super().__init__(ns, (1 << (RTNLGRP_IPV4_RULE - 1)) | (1 << (RTNLGRP_IPV6_RULE - 1)))

    def _handle(self, buf: bytes, t: float) -> None:
        for msg in nlcodec.messages(buf):
            if msg.type != RTM_NEWRULE:
                continue
            proto, table = None, buf[msg.payload_offset + 4]  # struct fib_rule_hdr: table at byte 4
            for atype, val in msg.attrs(12):  # after fib_rule_hdr
                if atype == FRA_PROTOCOL and val:
                    proto = val[0]
                elif atype == FRA_TABLE and len(val) >= 4:
                    table = struct.unpack_from("=I", val)[0]
            if proto == self.protocol and (self.table is None or table == self.table) \
                    and len(self.times) < WATCH_LIMIT:
                self.times.append(t)

    def after(self, t0: float) -> list[float]:
        return [t for t in list(self.times) if t >= t0]


def wait_after(get: Callable[[], list[float]], count: int, timeout: float) -> list[float]:
    """Poll ``get`` (bounded) until it returns ``count`` times or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while True:
        ts = get()
        if len(ts) >= count or time.monotonic() > end:
            return ts
        time.sleep(0.005)


def delivery_rules_of(config_path: Path) -> tuple[int, int, int]:
    """(number of delivery rules, rule protocol, table) of a daemon config: what the
    master installs when it takes over (vipless_failover's own config model)."""
    from vipless_failover import config as vfconfig
    from vipless_failover.dataplane.desired import delivery_rules

    cfg = vfconfig.load(config_path)
    return len(delivery_rules(cfg)), cfg.delivery.protocol, cfg.delivery.table


def resolve(lab: topology.Lab, addrs: Sequence[str], mac: str, timeout: float, pps: int = 20_000) -> list[str]:
    """Make the router resolve every address (to ``mac``): it only updates entries it has.
    Bounded: a few rounds, paced, within ``timeout``. Returns the addresses it did not
    resolve to ``mac`` (empty: all done)."""
    fam = socket.AF_INET6 if ":" in addrs[0] else socket.AF_INET
    with in_netns(lab.ns("router")):
        s = socket.socket(fam, socket.SOCK_DGRAM)
    watch = NeighWatch(lab.ns("router"), addrs, mac)
    deadline = time.monotonic() + timeout

    def missing() -> list[str]:
        return [] if watch.done_at is not None else \
            [a for a in addrs if socket.inet_pton(fam, a) not in watch.have]

    try:
        for _ in range(6):
            watch._apply(watch.dump(), time.time())
            if watch.done_at is not None:
                return []
            todo = missing()
            for i, a in enumerate(todo):
                try:
                    s.sendto(b"x", (a, 9))
                except OSError:
                    time.sleep(0.05)
                if i % 500 == 499:
                    time.sleep(500 / pps)
                if time.monotonic() > deadline:
                    return missing()
            if watch.wait(min(3.0, max(0.0, deadline - time.monotonic()))) is not None:
                return []
        return missing()
    finally:
        watch.close()
        s.close()


@contextlib.contextmanager
def raised_gc_thresh(values: tuple[int, int, int] = (131072, 262144, 524288)) -> Iterator[None]:
    """Neighbour table limits are global to the machine: raise (never lower), then restore."""
    keys = [f"/proc/sys/net/{fam}/neigh/default/gc_thresh{i}" for fam in ("ipv4", "ipv6") for i in (1, 2, 3)]
    saved = {k: Path(k).read_text().strip() for k in keys}
    try:
        for k in keys:
            if values[int(k[-1]) - 1] > int(saved[k]):
                Path(k).write_text(str(values[int(k[-1]) - 1]))
        yield
    finally:
        for k, v in saved.items():
            Path(k).write_text(v)


SCALE_RATE_PPS = 50_000


def wait_stable(pair: Pair, quiet_s: float, timeout: float) -> float | None:
    """Wait (bounded) until one director is MASTER, the other BACKUP, and neither has
    changed role for ``quiet_s``; returns the unix time the quiet window began."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t0 = time.time()
        m = pair.master()
        if m is not None and pair.state(B if m == A else A) == "BACKUP":
            time.sleep(quiet_s)
            if pair.transitions_since(t0) == 0:
                return t0
        else:
            time.sleep(0.05)
    return None


def scale_bound_s(n: int) -> float:
    return 30.0 + 2 * n / SCALE_RATE_PPS


def scale_trial(kind: str, index: int, n: int, mode: str) -> Trial:
    """Crash of the master (kill -9 + link down) with ``n`` VIPs; time from the backup's
    decision to the router having the new MAC for every VIP (per-vip) or for the
    floating next hop (next-hop). A fresh lab per trial (a keepalived master with
    thousands of addresses is removed with its namespace).

    Details also carry ``flip_ms``, the kernel flip seen from outside by a netlink
    listener in the backup's namespace: ours, from the decision in its log to its last
    delivery rule added (as many as its config declares); keepalived, from its first to
    its last address added (every VIP in per-vip mode, the floating addresses in
    next-hop mode)."""
    variant = f"{mode}, {n} VIPs"
    bound = scale_bound_s(n)
    with topology.Lab(announce_mode=mode, responders=False) as lab:
        vips = vip_set(n)
        if kind == "ours":
            pair: Pair = OursPair(lab, 100, vips=vip_config(n), rate_pps=SCALE_RATE_PPS)
        else:
            pair = KaPair(lab, 100, vips=vips, next_hop=(mode == "next-hop"))
        try:
            t0 = time.monotonic()
            try:
                pair.start(timeout=bound)
            except topology.LabError as exc:
                return Trial("scale", variant, kind, index, None, bound_hit=True,
                             note=f"set-up: no master within {bound:.0f} s", details={"error": str(exc)[:300]})
            # a stable pair before the crash: keepalived's new master stops advertising while
            # it adds thousands of addresses, so its peer becomes master too for a while
            # (and takes the router's entries); such a set-up is retried, never measured
            role_changes = 0
            for _attempt in range(3):
                left = bound - (time.monotonic() - t0)
                t_quiet = wait_stable(pair, 1.0, max(2.0, left))
                if t_quiet is None:
                    return Trial("scale", variant, kind, index, None, bound_hit=True,
                                 note=f"set-up: no stable master and backup within {bound:.0f} s")
                master = pair.master()
                if master is None:
                    role_changes += 1
                    continue
                backup = B if master == A else A
                old_mac, new_mac = lab.mac(master), lab.mac(backup)
                if mode == "per-vip":
                    watched = vips
                else:
                    watched = [str(topology.NEXT_HOP4.ip)]
                    warm_up_nh(lab)
                left = bound - (time.monotonic() - t0)
                unresolved = resolve(lab, watched, old_mac, timeout=max(5.0, left))
                if unresolved:
                    return Trial("scale", variant, kind, index, None, bound_hit=True,
                                 note=f"set-up: the router did not resolve all {len(watched)} addresses to the "
                                      f"master within {bound:.0f} s ({len(unresolved)} left)",
                                 details={"unresolved": unresolved[:20], "unresolved_count": len(unresolved)})
                changed = pair.transitions_since(t_quiet)
                if not changed:
                    break
                role_changes += changed
            else:
                return Trial("scale", variant, kind, index, None,
                             note="set-up: the pair changed roles during each of 3 set-ups",
                             details={"setup_role_changes": role_changes})
            setup_s = time.monotonic() - t0
            # the kernel flip, seen from outside: ours' delivery rules arriving in the
            # backup's namespace, keepalived's addresses (all of them: VIPs or floating)
            addrs: AddrWatch | None = None
            flipw: _NetlinkWatch
            if isinstance(pair, KaPair):
                flip_expected = addresses_added(pair.kas[backup].settings)
                flipw = addrs = AddrWatch(lab.ns(backup))
            else:
                assert isinstance(pair, OursPair)
                flip_expected, proto, table = delivery_rules_of(pair.cluster[backup].config_path)
                flipw = RuleWatch(lab.ns(backup), proto, table=table)
            watch = NeighWatch(lab.ns("router"), watched, new_mac)
            time.sleep(random.uniform(0, 0.1))  # random phase against the advert timer
            try:
                t_kill = pair.kill(master)
                link(lab, master, False)
                t_dec = pair.decision(backup, t_kill, 10)
                done = watch.wait(bound)
                # bounded: the flip comes before the announcements, so it is over by now
                # unless it failed (or, for keepalived, it is still adding addresses)
                flip = wait_after(lambda: flipw.after(t_kill), flip_expected, 2.0 if done is not None else 0.0)
                if addrs is not None:
                    t_dec = flip[0] if flip else None  # first address added on the backup (see AddrWatch)
            finally:
                watch.close()
                flipw.close()
            flip_end = flip[flip_expected - 1] if len(flip) >= flip_expected else None
            flip_ms = None if (flip_end is None or t_dec is None) else round((flip_end - t_dec) * 1000, 2)
            d = {"setup_s": round(setup_s, 1), "overflow": watch.overflow, "setup_role_changes": role_changes,
                 "decision_ms": None if t_dec is None else round((t_dec - t_kill) * 1000, 1),
                 "learned": len(watch.have), "watched": len(watched),
                 "flip_ms": flip_ms, "flip_expected": flip_expected, "flip_seen": len(flip),
                 "flip_overflow": flipw.overflow}
            if addrs is not None:
                d["addresses_before_kill"] = addrs.before(t_kill)
            if t_dec is None:
                return Trial("scale", variant, kind, index, None, note="backup never became master", details=d)
            if done is None:
                return Trial("scale", variant, kind, index, None, bound_hit=True,
                             note=f"router had {len(watch.have)}/{len(watched)} after {bound:.0f} s", details=d)
            d["from_kill_ms"] = round((done - t_kill) * 1000, 1)
            return Trial("scale", variant, kind, index, round((done - t_dec) * 1000, 1), details=d)
        finally:
            if kind == "keepalived":
                for k in pair.kas.values():  # type: ignore[attr-defined]
                    if k.running:
                        k.kill()  # removing 65,536 addresses one by one would take minutes: the lab goes
                    k._forget()
            else:
                pair.stop()


def warm_up_nh(lab: topology.Lab) -> None:
    """The router resolves the floating next hop (one probe through it)."""
    lab.exec("router", "ping", "-c", "1", "-W", "1", str(topology.NEXT_HOP4.ip), check=False)


# ---------------------------------------------------------------------------
# figure 4: cost at rest


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


def resume(pids: Sequence[int]) -> None:
    """SIGCONT what :meth:`CostSession.pause` stopped."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class CostSession:
    """An idle pair (100 ms adverts, or ``interval_ms``) in its own lab, kept up while the driver takes
    interleaved measurement windows (ours, keepalived, ours ...): CPU seconds per
    minute and RSS of the master and the backup (keepalived: parent + VRRP child)."""

    def __init__(self, kind: str, n: int, settle_s: float, interval_ms: int = 100):
        self.kind, self.n = kind, n
        self.variant = "2 VIPs" if n <= 2 else f"{n} VIPs"
        if interval_ms != 100:
            self.variant += f", {interval_ms} ms adverts"
        self.lab = topology.Lab(responders=False)
        self.lab.__enter__()
        self.error = ""
        bound = scale_bound_s(n)
        if kind == "ours":
            # the same announce rate as the scale figure, so that the takeover schedule
            # (burst + repeats) is over before measuring: this figure is the cost at rest
            self.pair: Pair = OursPair(self.lab, interval_ms, vips=vip_config(n) if n > 2 else None,
                                       rate_pps=SCALE_RATE_PPS)
        else:
            self.pair = KaPair(self.lab, interval_ms, vips=vip_set(n) if n > 2 else None)
        try:
            self.pair.start(timeout=bound)
        except topology.LabError:
            self.error = f"set-up: no master within {bound:.0f} s"
        time.sleep(settle_s)
        if kind == "ours" and not self.error:
            self._wait_announcements_done(bound)

    def _wait_announcements_done(self, bound: float) -> None:
        """Wait (bounded) until the master's announcement schedule has ended."""
        end = time.monotonic() + bound
        while time.monotonic() < end:
            master = self.pair.master()
            st = self.pair.status(master) if master else None
            if st and not (st.get("announce") or {}).get("burst_running"):
                return
            time.sleep(0.5)
        self.error = f"set-up: announcements still running after {bound:.0f} s"

    def pause(self) -> list[int]:
        """SIGSTOP every daemon process of this session; returns the PIDs stopped."""
        stopped = []
        for d in (A, B):
            for pid in self.pair.pids(d):
                try:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
                except ProcessLookupError:
                    pass
        return stopped

    def measure(self, index: int, window_s: float) -> list[Trial]:
        if self.error:
            return [Trial("cost", f"{r}, {self.variant}", self.kind, index, None, bound_hit=True, note=self.error)
                    for r in ("master", "backup")]
        master = self.pair.master() or A
        roles = {"master": master, "backup": B if master == A else A}
        pids = {r: self.pair.pids(d) for r, d in roles.items()}
        c0 = {r: _cpu_s(p) for r, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(window_s)
        dt = time.monotonic() - t0
        out = []
        for r, p in pids.items():
            cpu = _cpu_s(p) - c0[r]
            out.append(Trial("cost", f"{r}, {self.variant}", self.kind, index, round(cpu / dt * 100, 3),
                             details={"cpu_s_per_min": round(cpu / dt * 60, 4), "core_pct": round(cpu / dt * 100, 3),
                                      "rss_mb": round(_rss_mb(p), 1), "pids": len(p), "window_s": round(dt, 1),
                                      "state": self.pair.state(roles[r])}))
        return out

    def close(self) -> None:
        try:
            if isinstance(self.pair, KaPair):
                for k in self.pair.kas.values():
                    if k.running:
                        k.kill()
                    k._forget()
            else:
                self.pair.stop()
        finally:
            self.lab.__exit__(None, None, None)


# ---------------------------------------------------------------------------
# soak: memory of an idle pair over a long run (the "RSS < 60 MB at rest" target
# holds over time, not only in the cost figure's 20 s windows)

SOAK_PROJECTION_DAYS = 30
SOAK_RSS_TARGET_MB = 60.0


def slope_kb_per_min(series: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, kB)`` samples, in kB per minute."""
    if len(series) < 2:
        return None
    n = len(series)
    mt = sum(t for t, _ in series) / n
    mv = sum(v for _, v in series) / n
    den = sum((t - mt) ** 2 for t, _ in series)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in series) / den * 60


def soak(sessions: dict[str, CostSession], minutes: float, sample_s: float) -> list[Trial]:
    """Sample the RSS of every session's master and backup every ``sample_s`` for
    ``minutes``, all sessions side by side (both daemons idle at once). One trial per
    daemon and role: value = RSS growth over the second half of the run, kB/min
    (least squares; the first half is warm-up), with the whole series and the CPU
    share over the run in its details."""
    roles: dict[str, dict[str, str]] = {}
    pids: dict[str, dict[str, list[int]]] = {}
    for kind, ses in sessions.items():
        if ses.error:
            continue
        master = ses.pair.master() or A
        roles[kind] = {"master": master, "backup": B if master == A else A}
        pids[kind] = {r: ses.pair.pids(d) for r, d in roles[kind].items()}
    series: dict[tuple[str, str], list[tuple[float, float]]] = {
        (k, r): [] for k in pids for r in pids[k]}
    c0 = {(k, r): _cpu_s(p) for k in pids for r, p in pids[k].items()}
    t0 = time.monotonic()
    end = t0 + minutes * 60
    while True:
        now = time.monotonic()
        for (k, r) in series:
            series[(k, r)].append((round(now - t0, 1), _rss_mb(pids[k][r]) * 1024))
        if now >= end:
            break
        time.sleep(max(0.0, min(sample_s, end - time.monotonic())))
    dt = time.monotonic() - t0
    out = []
    for kind, ses in sessions.items():
        if kind not in pids:
            out += [Trial("soak", f"{r}, {ses.variant}", kind, 0, None, bound_hit=True, note=ses.error)
                    for r in ("master", "backup")]
            continue
        for r, p in pids[kind].items():
            ser = series[(kind, r)]
            half = [x for x in ser if x[0] >= dt / 2]
            slope = slope_kb_per_min(half)
            rss = [v for _, v in ser]
            end_mb = rss[-1] / 1024
            proj = end_mb + max(0.0, slope or 0.0) * 60 * 24 * SOAK_PROJECTION_DAYS / 1024
            state = ses.pair.state(roles[kind][r])
            out.append(Trial(
                "soak", f"{r}, {ses.variant}", kind, 0, None if slope is None else round(slope, 3),
                note="" if state == r.upper() else f"role changed: {r} is now {state}",
                details={"minutes": round(dt / 60, 1), "sample_s": sample_s,
                         "rss_start_mb": round(rss[0] / 1024, 2), "rss_end_mb": round(end_mb, 2),
                         "rss_max_mb": round(max(rss) / 1024, 2),
                         "growth_second_half_kb_per_min": None if slope is None else round(slope, 3),
                         f"projected_mb_{SOAK_PROJECTION_DAYS}d": round(proj, 1),
                         "core_pct": round((_cpu_s(p) - c0[(kind, r)]) / dt * 100, 3),
                         "state": state, "series": ser}))
    return out


# ---------------------------------------------------------------------------
# figure 5: flood of forged adverts against the backup

FLOOD_PPS = 10_000
FLOOD_S = 10.0


def forged_frames(kind: str, lab: topology.Lab, count: int = 1000) -> list[bytes]:
    """Forged adverts from the router's LAN address to the election multicast group:
    ours with a wrong key (our wire format, valid apart from the HMAC), keepalived
    VRRPv3 with a VRID it does not run (VRRPv3 has no authentication)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vrrp import VRRPv3

    from vipless_failover.election.protocol import Advert, State, encode_advert

    src_mac = json.loads(lab.ip("router", "-j", "link", "show", "dev", lab.router.iface).stdout)[0]["address"]
    eth = Ether(src=src_mac, dst="01:00:5e:00:00:12")
    ip = IP(src=str(lab.router.ip4), dst="224.0.0.18", ttl=255)
    frames = []
    wrong_key = os.urandom(32)
    for i in range(count):
        if kind == "ours":
            adv = Advert(cluster_id=51, node="intruder", address=ipaddress.ip_address(str(lab.router.ip4)),
                         priority=254, advert_interval_ms=100, state=State.MASTER, counter=1_000_000 + i)
            pkt = eth / ip / UDP(sport=5798, dport=5798) / encode_advert(adv, wrong_key)
        else:
            pkt = eth / IP(src=str(lab.router.ip4), dst="224.0.0.18", ttl=255, proto=112) / VRRPv3(
                vrid=52, priority=254, adv=10, ipcount=1, addrlist=["198.51.100.10"])
        frames.append(bytes(pkt))
    return frames


def send_flood(lab: topology.Lab, frames: Sequence[bytes], pps: int, seconds: float) -> dict[str, Any]:
    """Send ``pps`` x ``seconds`` frames (bounded count and time) from the router's LAN link."""
    with in_netns(lab.ns("router")):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((lab.router.iface, 0))
    total = int(pps * seconds)
    batch = max(1, pps // 100)  # every 10 ms
    sent, errors = 0, 0
    t0 = time.monotonic()
    try:
        while sent < total and time.monotonic() - t0 < seconds + 2:
            due = t0 + (sent / pps)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for _ in range(min(batch, total - sent)):
                try:
                    s.send(frames[sent % len(frames)])
                except OSError:
                    errors += 1
                sent += 1
    finally:
        s.close()
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - t0, 2)}


def flood_trial(kind: str, index: int) -> list[Trial]:
    with topology.Lab(responders=False) as lab:
        pair = make_pair(kind, lab, 100)
        try:
            pair.start(timeout=10)
            time.sleep(0.5)
            master = pair.master()
            assert master is not None
            backup = B if master == A else A
            frames = forged_frames(kind, lab)
            pids = pair.pids(backup)
            st0 = pair.status(backup) if isinstance(pair, OursPair) else None
            c0 = _cpu_s(pids)
            t0 = time.time()
            sent = send_flood(lab, frames, FLOOD_PPS, FLOOD_S)
            dt = time.time() - t0
            cpu = _cpu_s(pids) - c0
            time.sleep(0.3)
            took = pair.decision(backup, t0, 0.01) is not None
            d: dict[str, Any] = {"flood": sent, "backup_state_after": pair.state(backup),
                                 "master_state_after": pair.state(master), "took_over": took,
                                 "cpu_s": round(cpu, 3), "core_pct": round(cpu / dt * 100, 2)}
            if st0 is not None:
                st1 = pair.status(backup) or {}
                rec = st1["adverts"]["received"] - st0["adverts"]["received"]
                rej = sum(st1["adverts"]["rejected"].values()) - sum(st0["adverts"]["rejected"].values())
                d.update({"received": rec, "rejected": rej, "master_adverts_accepted": rec - rej,
                          "master_adverts_expected": round(dt / 0.1)})
            else:
                d["master_adverts_accepted"] = None  # keepalived has no counter to read here
            return [Trial("flood", "10,000/s for 10 s", kind, index, d["cpu_s"], details=d)]
        finally:
            pair.stop()

