"""Interface link tracking from netlink events (RTMGRP_LINK), not polling.

A link counts as up when it is administratively up and has carrier
(IFF_UP and IFF_LOWER_UP); a veth whose peer is down, or a cable pulled, is down.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


def link_is_up(msg: Any) -> bool:
    flags = msg["flags"]
    return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)


class LinkWatch:
    """Calls ``on_change(up)`` whenever the interface's link state changes."""

    def __init__(self, ifname: str, on_change: Callable[[bool], None], log: Any):
        self.ifname = ifname
        self.on_change = on_change
        self.log = log
        self.up: bool | None = None
        self.index: int | None = None
        self._ipr: AsyncIPRoute | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Subscribe and return the current state. Raises OSError if the link is missing."""
        ipr = AsyncIPRoute()
        try:
            await ipr.bind(groups=RTMGRP_LINK)
            links = [link async for link in await ipr.link("dump")]
        except Exception:
            ipr.close()
            raise
        mine = [link for link in links if link.get("ifname") == self.ifname]
        if not mine:
            ipr.close()
            raise OSError(f"no such interface {self.ifname!r}")
        self.index = mine[0]["index"]
        self.up = link_is_up(mine[0])
        self._ipr = ipr
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="linkwatch")
        return self.up

    async def _watch(self) -> None:
        assert self._ipr is not None
        while True:
            try:
                async for msg in self._ipr.get():
                    self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching
                self.log.error("link_watch_error", error=str(exc))
                await asyncio.sleep(0.1)

    def _handle(self, msg: Any) -> None:
        if msg.get("index") != self.index:
            return
        if msg["event"] == "RTM_DELLINK":
            up = False
        elif msg["event"] == "RTM_NEWLINK":
            up = link_is_up(msg)
        else:
            return
        if up != self.up:
            self.up = up
            self.on_change(up)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
