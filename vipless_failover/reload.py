"""Reload (SIGHUP, ``failoverctl reload``; daemon.py runs one at a time): the config
file applied by diff, if it passes every check start makes (:func:`preflight`, in a
thread: the loop never waits for a file or netlink); otherwise nothing changes and the
answer says why.

A reload cannot change ``[node]`` or ``[election]`` but for the keys and the replay
window: the election process gets those in a new ``Setup``. The data plane, the
announcer (a new one when ``[announce]`` changed), the hooks and the tracking follow
the new config.
"""

from __future__ import annotations

import asyncio
import gc
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError
from .election.trust import KeyRing
from .preflight import preflight
from .tracking import Tracker

if TYPE_CHECKING:
    from .daemon import Daemon


async def reload(d: Daemon) -> dict[str, Any]:
    try:
        new, keys = await asyncio.to_thread(preflight, d.cfg.path)
    except ConfigError as exc:
        d.log.error("reload_failed", error=str(exc))
        return {"ok": False, "error": f"reload refused: {exc}"}
    return await _apply(d, new, keys)


async def _apply(d: Daemon, new: Config, keys: tuple[bytes, ...]) -> dict[str, Any]:
    problems = [k for k, same in (("node", new.node == d.cfg.node),
                                  ("election", new.election.without_keys() == d.cfg.election.without_keys()))
                if not same]
    if problems:
        msg = (f"reload cannot change [{'], ['.join(problems)}] (but for the keys and the replay window): "
               f"restart the daemon for that")
        d.log.error("reload_failed", error=msg)
        return {"ok": False, "error": msg}
    old, d.cfg = d.cfg, new
    if keys != d.keys:
        before, after = KeyRing(d.keys).describe({}), KeyRing(keys).describe({})
        d.keys = keys
        # a rotation: the election signs with the new signing key from its next
        # advert on and accepts every configured key; its replay state is kept
        d.log.info("keys_reloaded", signing=after["signing"], accepted=after["accepted"],
                   previous_signing=before["signing"])
    await d.dataplane.reload(new)
    if new.announce != old.announce:
        await _reload_announcer(d, new)
    if d.election is not None:
        d.election.channel.send(d.steps.setup())
    await d.hooks.reconfigure(new.notify)
    if new.track != d.tracker.cfg:
        await d.tracker.close()
        d.tracker = Tracker(new.track, d.steps.track_changed, d.log, netns=d.netns,
                            node_interface=new.node.interface)
        await d.tracker.start()
        d.steps.track_changed()  # items no longer configured stop counting
    d.log.info("reloaded", config=str(new.path))
    return {"ok": True, "data": {"reloaded": str(new.path)}}


async def _reload_announcer(d: Daemon, new: Config) -> None:
    """Announce (and answer for) the reloaded VIP set: added VIPs move with the next
    takeover, removed ones are no longer announced. A master re-announces at once."""
    fresh = d.new_announcer(new)
    try:
        await fresh.open()
    except (OSError, RuntimeError) as exc:
        d.log.error("reload_announcer_failed", error=str(exc))
        await fresh.close()
        return
    announcing = bool(d.announcer.status().get("announcing"))
    await d.announcer.close()
    fresh.carry_counts(d.announcer)  # counters of a process never go back (Prometheus)
    d.announcer = fresh
    gc.freeze()  # the new frames, like those built at start
    if announcing:
        fresh.start("reload")
