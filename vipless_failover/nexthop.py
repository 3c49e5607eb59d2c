"""The floating next-hop address (announce mode "next-hop").

The routers route the VIP prefixes via one address (``[announce] next_hop``,
ADDRESS/PREFIXLEN) that only the master holds on ``node.interface``. It is added and
removed through netlink and tagged as ours: with the kernel's IFA_PROTO (Linux >= 6.1)
set to ``delivery.protocol``; on kernels without IFA_PROTO it is identified exactly by
address + label (``<ifname>:vf``, IPv4) or address alone (IPv6, which has no labels).
IPv6 addresses are added with IFA_F_NODAD so they are usable at once (the backup does
not hold the address, and a takeover must not wait ~1 s for DAD).

The Announcer (mode "next-hop") announces the address after :meth:`NextHopAddress.add`;
the kernel itself answers ARP/NS for it, since it is an interface address.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from .config import Config

IFA_F_NODAD = 0x02
LABEL_SUFFIX = ":vf"


class NextHopConflict(RuntimeError):
    """The next-hop address is on the interface but was not added by us."""


class NextHopAddress:
    def __init__(self, cfg: Config, log: Any, *, netns: str | None = None):
        nh = cfg.announce.next_hop
        if nh is None:
            raise ValueError("NextHopAddress needs [announce] next_hop")
        self.cfg = cfg
        self.log = log
        self.netns = netns
        self.interface = nh
        self.ifname = cfg.node.interface
        self.protocol = cfg.delivery.protocol
        label = self.ifname + LABEL_SUFFIX
        self.label = label if nh.version == 4 and len(label) <= 15 else None
        self._ipr: Any = None
        self.use_proto: bool | None = None  # learned on first add/lookup

    # -- netlink ---------------------------------------------------------------

    def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def _index(self) -> int:
        idx = self._iproute().link_lookup(ifname=self.ifname)
        if not idx:
            raise OSError(errno.ENODEV, f"no such interface {self.ifname!r}")
        return idx[0]

    def _find(self) -> tuple[int, list[Any]]:
        """(ifindex, messages for our address on the interface)."""
        index = self._index()
        family = socket.AF_INET if self.interface.version == 4 else socket.AF_INET6
        found = []
        for msg in self._iproute().get_addr(index=index, family=family):
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if addr is not None and ipaddress.ip_address(addr) == self.interface.ip:
                found.append(msg)
        return index, found

    def _ours(self, msg: Any) -> bool:
        proto = msg.get("IFA_PROTO")
        if proto is not None:
            return proto == self.protocol
        # kernel without IFA_PROTO: exact address + label (IPv4) / address (IPv6)
        if self.interface.version == 4:
            return self.label is not None and msg.get("IFA_LABEL") == self.label
        return True

    def present(self) -> bool:
        """Whether our next-hop address is on the interface now."""
        try:
            _, found = self._find()
        except OSError:
            return False
        return any(self._ours(m) for m in found)

    async def add(self) -> None:
        """Hold the address (idempotent). Raises NextHopConflict if someone else holds it."""
        index, found = self._find()
        if found:
            if any(self._ours(m) for m in found):
                return
            raise NextHopConflict(f"{self.interface.ip} is on {self.ifname} but was not added by us")
        kwargs: dict[str, Any] = {"index": index, "address": str(self.interface.ip),
                                  "prefixlen": self.interface.network.prefixlen}
        if self.interface.version == 4:
            kwargs["broadcast"] = str(self.interface.network.broadcast_address) \
                if self.interface.network.prefixlen < 31 else None
            if kwargs["broadcast"] is None:
                del kwargs["broadcast"]
            if self.label:
                kwargs["label"] = self.label
        else:
            kwargs["flags"] = IFA_F_NODAD
        ipr = self._iproute()
        if self.use_proto is not False:
            try:
                ipr.addr("add", proto=self.protocol, **kwargs)
                self.use_proto = True
            except Exception as exc:  # old kernel rejecting IFA_PROTO
                if getattr(exc, "code", None) not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.use_proto = False
        if self.use_proto is False:
            ipr.addr("add", **kwargs)
        self.log.info("nexthop.added", address=str(self.interface), interface=self.ifname,
                      tagged="proto" if self.use_proto else "label")

    async def remove(self) -> None:
        """Give the address up (idempotent; never removes an address that is not ours)."""
        try:
            index, found = self._find()
        except OSError:
            return  # interface gone: so is the address
        for msg in found:
            if not self._ours(msg):
                self.log.warning("nexthop.not_ours", address=str(self.interface.ip), interface=self.ifname)
                continue
            try:
                self._iproute().addr("del", index=index, address=str(self.interface.ip),
                                     prefixlen=msg["prefixlen"])
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EADDRNOTAVAIL:
                    raise
            self.log.info("nexthop.removed", address=str(self.interface), interface=self.ifname)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
