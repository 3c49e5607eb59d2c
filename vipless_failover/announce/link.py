"""The announcing interface: its facts (ifindex, MAC, addresses, on-link routes), the
start-up check of ``[announce]`` against them, and a packet socket bound to it.

The facts are read through pyroute2 (blocking, a few milliseconds; safe to call from a
coroutine, see :func:`vipless_failover.aio.blocking`).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from ..aio import blocking
from ..config import Config, ConfigError
from ..netns import in_netns


def _iproute(netns: str | None):
    from pyroute2 import IPRoute
    return IPRoute(netns=netns) if netns else IPRoute()


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



def packet_socket(ifname: str, proto: int, netns: str | None) -> socket.socket:
    """A non-blocking AF_PACKET socket bound to ``ifname`` (in ``netns``) for ``proto``
    (an ETH_P_* value; 0: send only)."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        sock.bind((ifname, proto))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

