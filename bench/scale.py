"""Figure 3 of the bench (issue 7): takeover at scale, with up to 65,536 VIPs; the
router's neighbour table is the judge (:class:`NeighWatch`: the time every VIP, or the
floating next hop, carries the new master's MAC).

The kernel flip is seen from outside by netlink listeners in the backup's namespace
(:class:`RuleWatch` for our delivery rules, :class:`AddrWatch` for keepalived's
addresses). :data:`SCALE_RATE_PPS` is also the announce rate of the cost figure
(:mod:`bench.cost`) and the report's bound (:mod:`bench.report`).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from netnslab import topology
from vipless_failover.dataplane import nlcodec
from vipless_failover.dataplane.nlcodec import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE
from vipless_failover.netns import in_netns

from .keepalived import addresses_added
from .scenarios import A, B, KaPair, OursPair, Pair, Trial, link, vip_config, vip_set

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
