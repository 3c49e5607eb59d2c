"""Announcement frames, built with ``struct`` (pure: no socket, no kernel).

Gratuitous ARP forms (documented convention, as iputils ``arping -U`` / ``-A`` and
RFC 5227 announcements):

* request: op 1, sender = target = VIP, sender MAC = ours, target MAC 00:00:00:00:00:00,
  Ethernet destination broadcast;
* reply: op 2, sender = target = VIP, sender MAC = target MAC = ours (``arping -A``),
  Ethernet destination broadcast.

IPv6: an unsolicited neighbour advertisement (R=0 S=0 O=1) to all-nodes with the
target link-layer address option, hop limit 255; :class:`NaBuilder` also builds the
responder's solicited answers. 65,536 frames take well under a second.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Any

from ..config import MAX_ANNOUNCED_VIPS, ConfigError

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
        for addr in (net if net.num_addresses > 1 else (net.network_address,)):
            if addr not in seen:
                seen.add(addr)
                if isinstance(addr, IPv4):
                    v4.append(addr)
                else:
                    v6.append(addr)
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

