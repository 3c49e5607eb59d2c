"""Health tracking: check commands and extra interfaces.

Every tracked item is either a *fault* item (weight 0: while failed the node is FAULT)
or a *weight* item (while failed the effective priority is lowered by its weight,
never below 1). Items are named ``check:NAME`` and ``link:IFNAME``.

* Check commands (``[[track.check]]``) run every ``interval_ms`` (argv, no shell),
  bounded by ``timeout_ms`` (then killed with their process group); exit 0 is a
  success. The first result decides the state at once; after that ``fall``
  consecutive failures mark the item failed and ``rise`` consecutive successes mark
  it ok again. Until the first result the item is ``unknown`` and counts as ok.
* Interfaces follow netlink link events (RTMGRP_LINK), not polling; up means IFF_UP
  and IFF_LOWER_UP. A missing interface is down, and is picked up when it appears.
  The node's own interface (``node.interface``) is always tracked, as a fault item;
  extra ones come from ``[[track.interface]]``.
* When a tracked interface comes back up, its neighbour entries left INCOMPLETE or
  FAILED while it was down are deleted (:func:`forget_unresolved`): the kernel flushes
  the cache when the carrier goes, but an entry created during the outage (a TCP
  retransmission towards the router) keeps counting its unanswered solicitations and
  holds the new master's replies for up to a second, then drops them.

:class:`Tracker` calls ``on_change()`` (no arguments) whenever an item's state
changes; the daemon then asks :meth:`Tracker.faults` and
:meth:`Tracker.effective_priority` and tells the election. The pure parts
(:class:`CheckState`, :func:`effective_priority`) need no I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .aio import cancel_and_wait
from .config import TrackCheck, TrackConfig, TrackInterface
from .hooks import run_command

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"


def effective_priority(base: int, failed_weights: Iterable[int]) -> int:
    """The configured priority lowered by the weights of the failed items, 1..254."""
    return max(1, min(254, base - sum(failed_weights)))


@dataclass
class CheckState:
    """rise/fall bookkeeping of one item (pure)."""

    rise: int = 1
    fall: int = 1
    state: str = UNKNOWN
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive

    def record(self, ok: bool) -> bool:
        """Add one result; returns True when the state changed."""
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        old = self.state
        if self.state == UNKNOWN:
            self.state = OK if ok else FAILED
        elif self.state == OK and self.failures >= self.fall:
            self.state = FAILED
        elif self.state == FAILED and self.successes >= self.rise:
            self.state = OK
        return self.state != old


@dataclass
class Item:
    name: str  # check:NAME | link:IFNAME
    kind: str  # check | interface
    weight: int  # 0: fault
    check: CheckState = field(default_factory=CheckState)
    detail: str = ""
    since: float = field(default_factory=time.time)
    results: Counter[str] = field(default_factory=Counter)

    @property
    def state(self) -> str:
        return self.check.state

    @property
    def failed(self) -> bool:
        return self.check.state == FAILED

    @property
    def effect(self) -> str:
        return "fault" if self.weight == 0 else f"priority -{self.weight}"

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state, "weight": self.weight,
                "effect": self.effect, "since": self.since, "detail": self.detail,
                "results": dict(self.results)}


IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20


def link_is_up(msg: Any) -> bool:
    """Administratively up and carrier present (a veth whose peer is down, or a pulled
    cable, is down)."""
    flags = msg["flags"]
    return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)


async def forget_unresolved(ipr: Any, ifindex: int) -> list[str]:
    """Delete ``ifindex``'s neighbour entries in state INCOMPLETE or FAILED (both
    families), as ``ip neigh flush dev X nud incomplete nud failed``; the next packet
    to one of them resolves it afresh at once. Returns the addresses deleted."""
    stale = [(nb["family"], nb.get_attr("NDA_DST")) async for nb in await ipr.neigh("dump", ifindex=ifindex)
             if nb["state"] & (NUD_INCOMPLETE | NUD_FAILED) and nb["ifindex"] == ifindex]
    gone = []
    for family, dst in stale:
        try:
            await ipr.neigh("del", ifindex=ifindex, dst=dst, family=family)
        except Exception:  # noqa: BLE001 - resolved or gone meanwhile: nothing to forget
            continue
        gone.append(str(dst))
    return gone


class Tracker:
    def __init__(self, cfg: TrackConfig, on_change: Callable[[], None], log: Any,
                 netns: str | None = None, node_interface: str | None = None):
        self.cfg = cfg
        self.on_change = on_change
        self.log = log
        self.netns = netns
        self.items: dict[str, Item] = {}
        self._checks: dict[str, TrackCheck] = {}
        for c in cfg.checks:
            name = f"check:{c.name}"
            self.items[name] = Item(name, "check", c.weight, CheckState(rise=c.rise, fall=c.fall))
            self._checks[name] = c
        self._ifaces: dict[str, Item] = {}
        if node_interface is not None:  # adverts go nowhere without it: always a fault item
            item = Item(f"link:{node_interface}", "interface", 0, detail="node interface")
            self.items[item.name] = item
            self._ifaces[node_interface] = item
        for i in cfg.interfaces:
            item = Item(f"link:{i.name}", "interface", i.weight)
            self.items[item.name] = item
            self._ifaces[i.name] = item
        self._tasks: list[asyncio.Task[None]] = []
        self._forgets: set[asyncio.Task[None]] = set()
        self._ipr: Any = None

    # -- queries --------------------------------------------------------------

    def faults(self) -> set[str]:
        return {n for n, it in self.items.items() if it.weight == 0 and it.failed}

    def effective_priority(self, base: int) -> int:
        return effective_priority(base, (it.weight for it in self.items.values() if it.weight and it.failed))

    def status(self) -> list[dict[str, Any]]:
        return [it.status() for it in self.items.values()]

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._ifaces:
            await self._start_links()
            self._tasks.append(loop.create_task(self._watch_links(), name="track-links"))
        for name, check in self._checks.items():
            self._tasks.append(loop.create_task(self._run_check(self.items[name], check), name=name))

    async def close(self) -> None:
        await cancel_and_wait([*self._tasks, *self._forgets])
        self._tasks.clear()
        self._forgets.clear()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _set(self, item: Item, ok: bool, detail: str, result: str | None = None) -> None:
        item.results[result or ("ok" if ok else "failed")] += 1
        changed = item.check.record(ok)
        if changed or item.detail != detail:
            item.detail = detail
        if changed:
            item.since = time.time()
            level = "info" if item.state == OK else "warning"
            getattr(self.log, level)("track", item=item.name, state=item.state, effect=item.effect,
                                     detail=detail)
            self.on_change()

    # -- check commands ---------------------------------------------------------

    async def _run_check(self, item: Item, check: TrackCheck) -> None:
        loop = asyncio.get_running_loop()
        interval = check.interval_ms / 1000.0
        next_at = loop.time()
        while True:
            result, detail = await run_command(check.command, None, check.timeout_ms / 1000.0)
            self._set(item, result == "ok", detail, result)
            next_at += interval
            now = loop.time()
            if next_at < now:  # fell behind (a slow check): no burst of catch-up runs
                next_at = now
            await asyncio.sleep(next_at - now)

    # -- interfaces -------------------------------------------------------------

    async def _start_links(self) -> None:
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
        try:
            await ipr.bind(groups=RTMGRP_LINK)
            links = [link async for link in await ipr.link("dump")]
        except Exception:
            ipr.close()
            raise
        self._ipr = ipr
        self._index: dict[int, str] = {}
        seen = set()
        for link in links:
            name = link.get("ifname")
            if name in self._ifaces:
                seen.add(name)
                self._index[link["index"]] = name
                self._link_event(name, link_is_up(link))
        for name in self._ifaces:
            if name not in seen:
                self._link_event(name, False, "no such interface")

    def _link_event(self, name: str, up: bool, detail: str = "") -> None:
        item = self._ifaces[name]
        if item.state != UNKNOWN and (item.state == OK) == up:
            if detail:
                item.detail = detail  # e.g. down, then removed
            return
        self._set(item, up, detail or ("up" if up else "down"))

    async def _watch_links(self) -> None:
        while True:
            try:
                async for msg in self._ipr.get():
                    self._handle_link(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching
                self.log.error("track_link_error", error=str(exc))
                await asyncio.sleep(0.1)

    def _handle_link(self, msg: Any) -> None:
        event = msg.get("event")
        index = msg.get("index")
        name = msg.get("ifname") or self._index.get(index)
        if event == "RTM_DELLINK":
            name = self._index.pop(index, name)
            if name in self._ifaces:
                self._link_event(name, False, "interface removed")
            return
        if event != "RTM_NEWLINK" or name not in self._ifaces:
            # a tracked interface renamed away: its index still maps to the old name
            old = self._index.get(index)
            if event == "RTM_NEWLINK" and old is not None and old != name:
                del self._index[index]
                self._link_event(old, False, f"renamed to {name}")
            return
        self._index[index] = name
        up = link_is_up(msg)
        if up and self._ifaces[name].state == FAILED:
            task = asyncio.get_running_loop().create_task(self._forget_unresolved(name, index),
                                                          name=f"neigh-{name}")
            self._forgets.add(task)
            task.add_done_callback(self._forgets.discard)
        self._link_event(name, up)

    async def _forget_unresolved(self, name: str, index: int) -> None:
        try:
            gone = await forget_unresolved(self._ipr, index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a best effort; the kernel resolves in the end
            self.log.warning("neighbours_not_forgotten", interface=name, error=str(exc))
            return
        if gone:
            self.log.info("neighbours_forgotten", interface=name, addresses=gone,
                          detail="unresolved while the link was down")


__all__ = ["CheckState", "Item", "Tracker", "effective_priority", "forget_unresolved", "link_is_up", "TrackCheck",
           "TrackInterface"]
