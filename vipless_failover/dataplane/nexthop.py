"""The floating next-hop address (announce mode "next-hop").

The routers route the VIP prefixes via one address (``[announce] next_hop``,
ADDRESS/PREFIXLEN) that only the master holds on ``node.interface``. It is added and
removed through netlink and tagged as ours: with the kernel's IFA_PROTO (Linux >= 6.1)
set to ``delivery.protocol``; on kernels without IFA_PROTO it is identified exactly by
address + label (``<ifname>:vf``, IPv4) or address alone (IPv6, which has no labels).
IPv6 addresses are added with IFA_F_NODAD so they are usable at once (the backup does
not hold the address, and a takeover must not wait ~1 s for DAD).

The Announcer (announce/burst.py, mode "next-hop") announces the address after :meth:`NextHopAddress.add`;
the kernel itself answers ARP/NS for it, since it is an interface address.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from ..aio import blocking
from ..config import Config

IFA_F_NODAD = 0x02
LABEL_SUFFIX = ":vf"


def kernel_has_ifa_proto(release: str | None = None) -> bool:
    """IFA_PROTO exists since Linux 6.1."""
    import os
    import re
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 1)


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
        self.use_proto: bool | None = None  # learned on first add/lookup
        self._aipr: Any = None  # AsyncIPRoute, opened on first use
        self._index = 0

    # -- netlink (blocking; run in a worker thread, see aio.blocking) ----------------

    def _with_ipr(self, fn):
        from pyroute2 import IPRoute
        with (IPRoute(netns=self.netns) if self.netns else IPRoute()) as ipr:
            return fn(ipr)

    def _find(self, ipr: Any) -> tuple[int, list[Any]]:
        """(ifindex, messages for our address on the interface)."""
        idx = ipr.link_lookup(ifname=self.ifname)
        if not idx:
            raise OSError(errno.ENODEV, f"no such interface {self.ifname!r}")
        index = idx[0]
        family = socket.AF_INET if self.interface.version == 4 else socket.AF_INET6
        found = []
        for msg in ipr.get_addr(index=index, family=family):
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if addr is not None and ipaddress.ip_address(addr) == self.interface.ip:
                found.append(msg)
        return index, found

    def _ours(self, msg: Any) -> bool:
        proto = msg.get("IFA_PROTO")
        if proto is not None or (self.use_proto is not False and kernel_has_ifa_proto()):
            return proto == self.protocol  # the kernel omits IFA_PROTO 0 (not tagged)
        # kernel without IFA_PROTO: exact address + label (IPv4) / address (IPv6)
        if self.interface.version == 4:
            return self.label is not None and msg.get("IFA_LABEL") == self.label
        return True

    def _present(self, ipr: Any) -> bool:
        try:
            _, found = self._find(ipr)
        except OSError:
            return False
        return any(self._ours(m) for m in found)

    def present(self) -> bool:
        """Whether our next-hop address is on the interface now (a netlink dump)."""
        return blocking(self._with_ipr, self._present)

    # -- async path (the daemon): one netlink socket kept open ------------------------

    async def _async_ipr(self) -> tuple[Any, int]:
        if self._aipr is None:
            from pyroute2 import AsyncIPRoute
            ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
            try:
                idx = await ipr.link_lookup(ifname=self.ifname)
            except Exception:
                ipr.close()
                raise
            if not idx:
                ipr.close()
                raise OSError(errno.ENODEV, f"no such interface {self.ifname!r}")
            self._aipr, self._index = ipr, idx[0]
        return self._aipr, self._index

    async def _async_find(self) -> list[Any]:
        ipr, index = await self._async_ipr()
        family = socket.AF_INET if self.interface.version == 4 else socket.AF_INET6
        found = []
        async for msg in await ipr.addr("dump", index=index, family=family):
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if addr is not None and ipaddress.ip_address(addr) == self.interface.ip:
                found.append(msg)
        return found

    async def add(self) -> None:
        """Hold the address (idempotent). Raises NextHopConflict if someone else holds it.

        A takeover costs one netlink request on a socket opened once; the address is
        looked up only when the kernel says it exists already."""
        ipr, index = await self._async_ipr()
        kwargs: dict[str, Any] = {"index": index, "address": str(self.interface.ip),
                                  "prefixlen": self.interface.network.prefixlen}
        if self.interface.version == 4:
            if self.interface.network.prefixlen < 31:
                kwargs["broadcast"] = str(self.interface.network.broadcast_address)
            if self.label:
                kwargs["label"] = self.label
        else:
            kwargs["flags"] = IFA_F_NODAD
        try:
            if self.use_proto is not False:
                try:
                    await ipr.addr("add", proto=self.protocol, **kwargs)
                    self.use_proto = True
                except Exception as exc:  # a kernel without IFA_PROTO rejects it
                    if getattr(exc, "code", None) not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self.use_proto = False
            if self.use_proto is False:
                await ipr.addr("add", **kwargs)
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise
            if any(self._ours(m) for m in await self._async_find()):
                return  # already ours: nothing to do
            raise NextHopConflict(f"{self.interface.ip} is on {self.ifname} but was not added by us") from None
        self.log.info("nexthop.added", address=str(self.interface), interface=self.ifname,
                      tagged="proto" if self.use_proto else "label")

    async def remove(self) -> None:
        """Give the address up (idempotent; never removes an address that is not ours)."""
        try:
            found = await self._async_find()
        except OSError:
            return  # interface gone: so is the address
        ipr, index = await self._async_ipr()
        removed = foreign = False
        for msg in found:
            if not self._ours(msg):
                foreign = True
                continue
            try:
                await ipr.addr("del", index=index, address=str(self.interface.ip), prefixlen=msg["prefixlen"])
                removed = True
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EADDRNOTAVAIL:
                    raise
        if foreign:
            self.log.warning("nexthop.not_ours", address=str(self.interface.ip), interface=self.ifname)
        if removed:
            self.log.info("nexthop.removed", address=str(self.interface), interface=self.ifname)

    def close(self) -> None:
        """Close the netlink socket (the address stays as it is)."""
        if self._aipr is not None:
            self._aipr.close()
            self._aipr = None
