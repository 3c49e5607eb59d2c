"""Answering ARP and NS for the VIPs while master: :class:`NeighbourResponder`.

The kernel answers ARP for VIPs routed locally by a destination delivery rule (``ip
rule to PREFIX table T`` + ``local 0/0 dev lo table T``), but it never answers a
neighbour solicitation for an IPv6 target that is local only by a route (ndisc only
answers for interface addresses, anycast and proxy entries), and ARP carries no
fwmark. So while master the responder answers NS for every IPv6 VIP, and ARP for IPv4
VIPs that no destination delivery rule covers (:func:`delivered_by_destination`).

It reads an AF_PACKET socket whose classic BPF filter lets through only NS (and, if
wanted, ARP requests); :meth:`NeighbourResponder.answer` (pure) builds each reply.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable
from typing import Any

from ..config import Config
from .frames import (
    ARP_REQUEST,
    ETH_P_ALL,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ICMPV6_NS,
    IPv4,
    IPv6,
    NaBuilder,
    arp_reply_frame,
    icmpv6_checksum_ok,
)
from .link import packet_socket

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_MR_ALLMULTI = 2
SO_ATTACH_FILTER = 26


def delivered_by_destination(cfg: Config, vip: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether a destination delivery rule (``to``, no ``iif``... or any) covers ``vip``:
    then the kernel answers ARP for it while master."""
    # (subnet_of of the same version only: mypy cannot tie r.to's version to vip's)
    return any(r.to is not None and r.to.version == vip.version and vip.subnet_of(r.to)  # type: ignore[arg-type]
               for r in cfg.delivery.rules)


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
        sock = packet_socket(self.ifname, ETH_P_ALL, self.netns)
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
