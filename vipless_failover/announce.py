"""Announcements: tell the routers which MAC now serves the VIPs.

Two modes (``[announce] mode``):

* **per-VIP**: for every IPv4 VIP address a gratuitous ARP (request and/or reply
  form), for every IPv6 VIP address an unsolicited neighbour advertisement
  (Override set) to all-nodes; sent from the interface MAC as an immediate burst at
  takeover, ``repeats`` repeats ``repeat_interval_ms`` apart, then an optional
  periodic refresh, paced at ``rate_pps``.
* **next-hop**: the same for the single floating next-hop address (see nexthop.py).

Answering: the kernel answers ARP for VIPs routed locally by a destination
delivery rule (``ip rule to PREFIX table T`` + ``local 0/0 dev lo table T``), but it
never answers a neighbour solicitation for an IPv6 target that is local only by a
route (ndisc only answers for interface addresses, anycast and proxy entries), and
ARP carries no fwmark. So while master, a :class:`NeighbourResponder` answers NS
for every IPv6 VIP, and ARP for IPv4 VIPs that no destination delivery rule covers.

Frames are built with ``struct`` (65,536 frames in well under a second) once in
:meth:`Announcer.open`; sending runs as an asyncio task that never holds the loop
for more than about half a millisecond at a time.

Gratuitous ARP forms (documented convention, as iputils ``arping -U`` / ``-A`` and
RFC 5227 announcements):

* request: op 1, sender = target = VIP, sender MAC = ours, target MAC 00:00:00:00:00:00,
  Ethernet destination broadcast;
* reply: op 2, sender = target = VIP, sender MAC = target MAC = ours (``arping -A``),
  Ethernet destination broadcast.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from . import config as _config
from .config import Config, ConfigError

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ALL_NODES = IPv6("ff02::1")
ALL_NODES_MAC = bytes.fromhex("333300000001")
ICMPV6_NS = 135
ICMPV6_NA = 136
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
ARP_REQUEST = 1
ARP_REPLY = 2
MIN_FRAME = 60  # Ethernet minimum without FCS: short frames are zero-padded

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_MR_ALLMULTI = 2
SO_ATTACH_FILTER = 26
CLONE_NEWNET = 0x40000000

#: longest time one send slice may hold the event loop (seconds)
SLICE_S = 0.0005
#: most frames per slice (also bounds the syscalls between two yields)
SLICE_FRAMES = 256
#: frames sent in line by ``start()``, before it returns: the router hears of a takeover
#: before anything else the daemon does then (the rest follows in the burst task)
LEAD_FRAMES = 8

MAX_ANNOUNCED_VIPS = getattr(_config, "MAX_ANNOUNCED_VIPS", 65_536)


# ---------------------------------------------------------------------------
# pure helpers: VIP expansion, frames, checksums


def expand_vips(vips: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                cap: int = MAX_ANNOUNCED_VIPS) -> tuple[list[IPv4], list[IPv6]]:
    """Every address of every VIP prefix (a /24 is 256 addresses), de-duplicated, in
    configuration order, split by family. More than ``cap`` addresses is a ConfigError."""
    vips = list(vips)
    total = sum(v.num_addresses for v in vips)
    if total > cap:
        raise ConfigError("announce.vips", f"expands to {total} addresses; per-VIP mode announces at most "
                                           f"{cap} (use mode = \"next-hop\" for more)")
    v4: list[IPv4] = []
    v6: list[IPv6] = []
    seen: set[Any] = set()
    for net in vips:
        out = v4 if net.version == 4 else v6
        for addr in (net if net.num_addresses > 1 else (net.network_address,)):
            if addr not in seen:
                seen.add(addr)
                out.append(addr)
    return v4, v6


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return mac
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"invalid MAC {mac!r}")
    return raw


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def icmpv6_checksum(src: IPv6, dst: IPv6, icmp: bytes) -> int:
    """RFC 4443 checksum over the IPv6 pseudo-header and the ICMPv6 message (whose
    checksum field must be zero)."""
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(icmp), 58)
    ck = ~_fold(_ones_sum(pseudo) + _ones_sum(icmp)) & 0xFFFF
    return ck or 0xFFFF


def icmpv6_checksum_ok(src: IPv6, dst: IPv6, icmp: bytes) -> bool:
    """Whether a received ICMPv6 message's checksum is right: the sum over the pseudo-
    header and the message, checksum included, is all ones. (A sum that comes out as
    zero is sent as 0x0000 by Linux and as 0xFFFF by others: both are right.)"""
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(icmp), 58)
    return _fold(_ones_sum(pseudo) + _ones_sum(icmp)) == 0xFFFF


def garp_frame(mac: bytes, vip: IPv4, form: str = "request") -> bytes:
    """A gratuitous ARP for ``vip`` from ``mac`` (see the module doc for the two forms)."""
    if form == "request":
        op, tha = ARP_REQUEST, ZERO_MAC
    elif form == "reply":
        op, tha = ARP_REPLY, mac
    else:
        raise ValueError(f"garp form must be request or reply, got {form!r}")
    ip = vip.packed
    frame = (BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + mac + ip + tha + ip)
    return frame.ljust(MIN_FRAME, b"\x00")


def arp_reply_frame(mac: bytes, vip: IPv4, to_mac: bytes, to_ip: IPv4) -> bytes:
    """A unicast ARP reply: ``vip is-at mac`` to the host that asked."""
    frame = (to_mac + mac + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, ARP_REPLY) + mac + vip.packed + to_mac + to_ip.packed)
    return frame.ljust(MIN_FRAME, b"\x00")


class NaBuilder:
    """Builds neighbour advertisements from one source (MAC + IPv6 address) fast:
    the checksum of everything but the target is computed once."""

    def __init__(self, mac: bytes, src: IPv6, dst: IPv6 = ALL_NODES, dst_mac: bytes = ALL_NODES_MAC,
                 solicited: bool = False, override: bool = True):
        self.mac = mac
        flags = (NA_FLAG_SOLICITED if solicited else 0) | (NA_FLAG_OVERRIDE if override else 0)
        self._flags = struct.pack("!I", flags)
        self._option = b"\x02\x01" + mac  # target link-layer address, length 1 (8 bytes)
        payload_len = 4 + 4 + 16 + len(self._option)
        self._head = (dst_mac + mac + struct.pack("!H", ETH_P_IPV6)
                      + struct.pack("!IHBB", 0x60000000, payload_len, 58, 255) + src.packed + dst.packed)
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", payload_len, 58)
        self._base = (_ones_sum(pseudo) + (ICMPV6_NA << 8) + _ones_sum(self._flags) + _ones_sum(self._option))

    def build(self, target: IPv6 | bytes) -> bytes:
        t = target if isinstance(target, bytes) else target.packed
        ck = ~_fold(self._base + sum(struct.unpack("!8H", t))) & 0xFFFF
        return self._head + struct.pack("!BBH", ICMPV6_NA, 0, ck or 0xFFFF) + self._flags + t + self._option


def unsolicited_na_frame(mac: bytes, src: IPv6, target: IPv6) -> bytes:
    """Unsolicited NA to all-nodes: R=0 S=0 O=1, target LL option = ``mac``, hop limit 255."""
    return NaBuilder(mac, src).build(target)


def build_per_vip_frames(mac: bytes, ll_src: IPv6 | None, v4: list[IPv4], v6: list[IPv6],
                         forms: Iterable[str]) -> tuple[list[bytes], list[bytes]]:
    """(ARP frames, NA frames); per IPv4 VIP one frame per form, in that order."""
    forms = tuple(forms)
    arp = [garp_frame(mac, ip, form) for ip in v4 for form in forms]
    na: list[bytes] = []
    if v6 and ll_src is not None:
        build = NaBuilder(mac, ll_src).build
        na = [build(ip) for ip in v6]
    return arp, na


# ---------------------------------------------------------------------------
# kernel facts


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")
        try:
            yield
        finally:
            if libc.setns(saved, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(target)
        os.close(saved)


def _iproute(netns: str | None):
    from pyroute2 import IPRoute
    return IPRoute(netns=netns) if netns else IPRoute()


def blocking(fn, *args: Any) -> Any:
    """Run a short blocking pyroute2 call. pyroute2 0.9's synchronous IPRoute drives
    its own event loop, which cannot run in a thread whose loop is running: there
    the call goes to a worker thread (and this thread waits for it: milliseconds)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink") as pool:
        return pool.submit(fn, *args).result()


def read_interface(ifname: str, netns: str | None = None) -> dict[str, Any]:
    """ifindex, MAC, link-local and all addresses (with prefix length, scope, proto) of
    ``ifname``, and the gateway-less routes through it in the main table.
    (Blocking; safe to call from a coroutine, see :func:`blocking`.)"""
    return blocking(_read_interface, ifname, netns)


def _read_interface(ifname: str, netns: str | None) -> dict[str, Any]:
    with _iproute(netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise ConfigError("node.interface", f"no such interface {ifname!r}")
        index = idx[0]
        link = ipr.get_links(index)[0]
        mac = link.get("IFLA_ADDRESS")
        addrs = []
        for msg in ipr.get_addr(index=index):
            addr = msg.get("IFA_ADDRESS") if msg["family"] == socket.AF_INET6 else (
                msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"))
            if addr is None:
                continue
            addrs.append({
                "interface": ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"),
                "scope": msg["scope"], "proto": msg.get("IFA_PROTO"), "label": msg.get("IFA_LABEL"),
                "flags": msg.get("IFA_FLAGS", msg["flags"]),
            })
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=254):
                if msg.get("RTA_OIF") != index or msg.get("RTA_GATEWAY") or msg["type"] != 1:
                    continue
                dst = msg.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                routes.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
    ll = [a["interface"].ip for a in addrs if a["interface"].version == 6 and a["interface"].ip.is_link_local]
    return {"index": index, "mac": mac, "link_local": ll[0] if ll else None, "addresses": addrs,
            "onlink_routes": routes, "operstate": link.get("IFLA_OPERSTATE")}


def check_interface(cfg: Config, netns: str | None = None, facts: dict[str, Any] | None = None) -> None:
    """Start-up check of [announce] against the kernel (call once before taking over).

    Raises ConfigError when, in per-VIP mode, a VIP contains one of the director's own
    addresses on ``node.interface`` or is not on-link there (inside the prefix of an
    address of the interface, or of a gateway-less route through it in the main
    table), or when the next-hop address is held on the interface by someone else.
    """
    ann = cfg.announce
    if ann.mode == "none":
        return
    try:
        facts = facts if facts is not None else read_interface(cfg.node.interface, netns)
    except ConfigError as exc:
        raise exc.with_file(cfg.path) from None
    own = [a["interface"] for a in facts["addresses"]]
    ifname = cfg.node.interface
    if ann.mode == "per-vip":
        onlink = [i.network for i in own if not i.ip.is_link_local] + list(facts["onlink_routes"])
        for i, vip in enumerate(ann.vips):
            key = f"announce.vips[{i}]"
            for a in own:
                if a.ip in vip:
                    raise ConfigError(key, f"{vip} contains this director's own address {a.ip} on {ifname}",
                                      cfg.path)
            if not any(n.version == vip.version and n.prefixlen > 0 and vip.subnet_of(n) for n in onlink):
                nets = ", ".join(str(n) for n in onlink if n.version == vip.version and n.prefixlen > 0) or "none"
                raise ConfigError(key, f"{vip} is not on {ifname}'s subnets ({nets}): in per-VIP mode the "
                                       f"router must have the VIPs on-link; add the prefix to {ifname} as a "
                                       f"link route (ip route add {vip} dev {ifname}) or use next-hop mode",
                                  cfg.path)
    if ann.mode == "next-hop" and ann.next_hop is not None:
        for a in facts["addresses"]:
            if a["interface"].ip == ann.next_hop.ip and a["proto"] != cfg.delivery.protocol:
                raise ConfigError("announce.next_hop", f"{ann.next_hop.ip} is already an address of {ifname} "
                                                       f"not added by this daemon", cfg.path)


def delivered_by_destination(cfg: Config, vip: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether a destination delivery rule (``to``, no ``iif``... or any) covers ``vip``:
    then the kernel answers ARP for it while master."""
    return any(r.to is not None and r.to.version == vip.version and vip.subnet_of(r.to)
               for r in cfg.delivery.rules)


def _packet_socket(ifname: str, proto: int, netns: str | None) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        sock.bind((ifname, proto))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------
# answering ARP / NS while master


def _bpf(program: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(struct.pack("HBBI", *ins) for ins in program)


# classic BPF: accept IPv6 ICMPv6 neighbour solicitations (no extension headers) and,
# if wanted, ARP requests; drop everything else in the kernel.
_LDH, _LDB, _JEQ, _RET = 0x28, 0x30, 0x15, 0x06


def _filter_program(arp: bool) -> bytes:
    # jt/jf are relative to the next instruction
    prog = [
        (_LDH, 0, 0, 12),                                   # 0
        (_JEQ, 0, 4, ETH_P_IPV6),                           # 1 -> 2 | 6
        (_LDB, 0, 0, 20),                                   # 2
        (_JEQ, 0, 5, 58),                                   # 3 -> 4 | 9 drop
        (_LDB, 0, 0, 54),                                   # 4
        (_JEQ, 2, 3, ICMPV6_NS),                            # 5 -> 8 accept | 9 drop
        (_JEQ, 0, 2, ETH_P_ARP) if arp else (_RET, 0, 0, 0),  # 6 -> 7 | 9
        (_RET, 0, 0, 0xFFFF),                               # 7 accept ARP (op checked in Python)
        (_RET, 0, 0, 0xFFFF),                               # 8 accept NS
        (_RET, 0, 0, 0),                                    # 9 drop
    ]
    return _bpf(prog)


class NeighbourResponder:
    """While enabled, answers NS for ``v6`` targets (solicited NA, S=1 O=1) and ARP
    requests for ``v4`` addresses, from ``mac`` on one interface."""

    #: frames handled per reader wake-up (bounds the time spent per callback)
    MAX_PER_WAKEUP = 64

    def __init__(self, ifname: str, index: int, mac: bytes, ll_src: IPv6 | None, v4: Iterable[IPv4],
                 v6: Iterable[IPv6], netns: str | None, log: Any):
        self.ifname = ifname
        self.index = index
        self.mac = mac
        self.ll_src = ll_src
        self.v4 = frozenset(a.packed for a in v4)
        self.v6 = frozenset(a.packed for a in v6)
        self.netns = netns
        self.log = log
        self.answered = {"arp": 0, "ns": 0}
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.enabled = False

    def open(self) -> None:
        sock = _packet_socket(self.ifname, ETH_P_ALL, self.netns)
        prog = _filter_program(arp=bool(self.v4))
        n = len(prog) // 8
        buf = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HL", n, ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self._fbuf = buf  # keep alive while attaching (the kernel copies it)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a router re-resolving many VIPs
        except OSError:  # pragma: no cover
            pass
        self._sock = sock
        self._drain()

    def _mreq(self) -> bytes:
        return struct.pack("iHH8s", self.index, PACKET_MR_ALLMULTI, 0, b"")

    def enable(self) -> None:
        """Start answering (takeover)."""
        if self.enabled or self._sock is None:
            return
        self._drain()  # forget solicitations queued while backup
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        if self.v6:
            # solicited-node groups of VIPs are joined by nobody: see all multicast
            try:
                self._sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, self._mreq())
                self._allmulti = True
            except OSError as exc:  # pragma: no cover - depends on driver
                self._allmulti = False
                self.log.warning("announce.allmulti_failed", interface=self.ifname, error=str(exc))
        self.enabled = True

    def disable(self) -> None:
        """Stop answering at once (step-down)."""
        if not self.enabled or self._sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        if getattr(self, "_allmulti", False):
            try:
                self._sock.setsockopt(SOL_PACKET, PACKET_DROP_MEMBERSHIP, self._mreq())
            except OSError:  # pragma: no cover
                pass
            self._allmulti = False
        self.enabled = False

    def close(self) -> None:
        self.disable()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(100_000):
            try:
                self._sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(self.MAX_PER_WAKEUP):
            try:
                frame, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # pragma: no cover
                self.log.warning("announce.responder_recv_failed", error=str(exc))
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            reply = self.answer(frame)
            if reply is not None:
                try:
                    sock.send(reply)
                except OSError as exc:
                    self.log.warning("announce.responder_send_failed", error=str(exc))

    def answer(self, frame: bytes) -> bytes | None:
        """The reply to one received frame, or None (pure; counts answers)."""
        if len(frame) < 42:
            return None
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == ETH_P_ARP and self.v4:
            htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
            if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, ARP_REQUEST):
                return None
            sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
            if tpa not in self.v4 or spa == tpa or sha == self.mac:
                return None  # not ours, or someone's gratuitous ARP
            self.answered["arp"] += 1
            return arp_reply_frame(self.mac, IPv4(tpa), sha, IPv4(spa))
        if ethertype == ETH_P_IPV6 and self.v6 and len(frame) >= 78:
            if frame[20] != 58 or frame[21] != 255 or frame[54] != ICMPV6_NS or frame[55] != 0:
                return None
            target = frame[62:78]
            if target not in self.v6:
                return None
            src = frame[22:38]
            payload_len = struct.unpack_from("!H", frame, 18)[0]
            icmp = frame[54:54 + payload_len]
            if len(icmp) < 24 or not icmpv6_checksum_ok(IPv6(src), IPv6(frame[38:54]), icmp):
                return None
            ll = self.ll_src
            if ll is None:
                return None
            if src == bytes(16):  # DAD probe for a VIP: defend it to all-nodes (S=0)
                builder = NaBuilder(self.mac, ll)
            else:
                builder = NaBuilder(self.mac, ll, dst=IPv6(src), dst_mac=frame[6:12], solicited=True)
            self.answered["ns"] += 1
            return builder.build(target)
        return None


# ---------------------------------------------------------------------------
# the announcer


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
        self.sent = {"garp": 0, "na": 0, "next_hop": 0}
        self.bursts = 0
        self.max_slice_s = 0.0  # longest wall time one send slice held the event loop
        self.max_slice_cpu_s = 0.0  # most CPU time one send slice used (not counting preemption)
        self._segments: list[tuple[str, list[bytes]]] = []
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._responder: NeighbourResponder | None = None
        self._active = False
        self._n_vips = 0
        self.mac: bytes | None = None
        self.ll_src: IPv6 | None = None

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
            v4, v6 = expand_vips(ann.vips)
            self._n_vips = len(v4) + len(v6)
            if v6 and self.ll_src is None:
                self.log.error("announce.no_ipv6_source", interface=cfg.node.interface,
                               detail="no IPv6 address on the interface: IPv6 VIPs are not announced")
            arp: list[bytes] = []
            na: list[bytes] = []
            forms = ann.garp_forms
            # build in slices, yielding, so a 65,536-VIP open does not stall the loop
            step = 2048
            for i in range(0, len(v4), step):
                arp += build_per_vip_frames(self.mac, None, v4[i:i + step], [], forms)[0]
                await asyncio.sleep(0)
            if self.ll_src is not None:
                build = NaBuilder(self.mac, self.ll_src).build
                for i in range(0, len(v6), step):
                    na += [build(ip) for ip in v6[i:i + step]]
                    await asyncio.sleep(0)
            self._segments = [("garp", arp), ("na", na)]
            answer_v4 = [a for net in ann.vips if net.version == 4 and not delivered_by_destination(cfg, net)
                         for a in (net if net.num_addresses > 1 else (net.network_address,))]
            if v6 or answer_v4:
                self._responder = NeighbourResponder(cfg.node.interface, facts["index"], self.mac, self.ll_src, answer_v4, v6,
                                                     self.netns, self.log)
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
            self._segments = [("next_hop", frames)]
        self._sock = _packet_socket(cfg.node.interface, 0, self.netns)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        except OSError:  # pragma: no cover
            pass
        self.log.info("announce.opened", mode=self.mode, interface=cfg.node.interface, vips=self._n_vips,
                      frames=sum(len(f) for _, f in self._segments),
                      mac=":".join(f"{b:02x}" for b in self.mac))

    # -- control --------------------------------------------------------------

    def start(self, reason: str) -> None:
        """Takeover (or re-assert): announce now, repeat, then refresh; answer NS/ARP."""
        if self.mode == "none":
            return
        if self._sock is None:
            raise RuntimeError("Announcer.start() before open()")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._active = True
        self.first_sent_at = None
        lead = self._lead()  # first: the router hears it before anything else is done
        if self._responder is not None:
            self._responder.enable()
        self._task = asyncio.get_running_loop().create_task(self._run(reason, lead), name="announce")

    def _lead(self) -> dict[str, int]:
        """Send the burst's first frames now (within the rate's first allowance).
        Returns how many of each segment went out; the burst goes on from there."""
        sock = self._sock
        assert sock is not None
        budget = min(LEAD_FRAMES, max(1, int(float(self.cfg.announce.rate_pps) * SLICE_S) or 1))
        done: dict[str, int] = {}
        for key, frames in self._segments:
            k = 0
            while k < len(frames) and budget > 0:
                try:
                    sock.send(frames[k])
                except OSError:
                    return done | {key: k}  # buffer full or link down: the burst deals with it
                if self.first_sent_at is None:
                    self.first_sent_at = time.monotonic()
                self.sent[key] += 1
                k += 1
                budget -= 1
            done[key] = k
        return done

    def stop(self) -> None:
        """Step-down: no further frame leaves, no NS/ARP is answered."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        if self._responder is not None:
            self._responder.disable()
        if self._active:
            self.log.info("announce.stopped", sent=dict(self.sent))
        self._active = False

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "announcing": self._active,
            "burst_running": self._task is not None and not self._task.done(),
            "announcements_sent": dict(self.sent),
            "vips": self._n_vips,
            "bursts": self.bursts,
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

    async def _run(self, reason: str, lead: dict[str, int] | None = None) -> None:
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
        except Exception as exc:  # never kill the daemon over an announcement
            self.log.error("announce.failed", error=repr(exc))

    async def _burst(self, skip: dict[str, int] | None = None) -> None:
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
