"""Announcements: tell the routers which MAC now serves the VIPs.

One module per part:

- ``frames.py``: the frames (gratuitous ARP request/reply, unsolicited and solicited
  NA, ICMPv6 checksums) and the VIP address list; pure.
- ``responder.py``: :class:`NeighbourResponder`, which answers ARP/NS for the VIPs the
  kernel does not answer, while master (AF_PACKET + classic BPF).
- ``link.py``: the interface's facts (ifindex, MAC, addresses, on-link routes),
  :func:`check_interface` (the start-up check of ``[announce]``), packet sockets.
- ``burst.py``: :class:`Announcer`, the takeover burst, its repeats and refreshes,
  paced so that the election is never stalled.

The floating next-hop address of mode "next-hop" is a kernel object the daemon owns:
``vipless_failover/dataplane/nexthop.py``. Imports are lazy so that ``frames`` pulls
in no socket or pyroute2 code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Announcer", "check_interface"]


def __getattr__(name: str) -> Any:
    if name == "Announcer":
        from .burst import Announcer
        return Announcer
    if name == "check_interface":
        from .link import check_interface
        return check_interface
    raise AttributeError(name)
