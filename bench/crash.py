"""Figures 1 and 2 of the bench (issue 7): crash failover and graceful hand-over, as the
client sees them (the outage of a UDP/TCP probe every 5 ms through the router).

:func:`crash_trial` takes the master's LAN port down and kills it at a chosen phase of
its advert cycle (the phase is stratified over the trials, the same for both daemons in
trial ``index``); :func:`graceful_trial` stops it with SIGTERM, or (ours) promotes the
backup with failoverctl.
"""

from __future__ import annotations

import random
import threading
import time

from netnslab import topology
from netnslab.daemons import master_down_ms

from .scenarios import (
    PRIO,
    A,
    B,
    LinkCutter,
    OursPair,
    Trial,
    WireWatch,
    link,
    make_pair,
    outage_after,
    probe_window,
    scrub,
    warm_up,
)

ANNOUNCEMENTS = ("garp", "na")

TARGETS = ("198.51.100.10",)


def crash_phase_s(interval_ms: int, index: int, n: int) -> float:
    """The crash's phase for trial ``index`` of ``n``, after the master's advert:
    stratified over the advert interval (the middle of the index-th of n equal slices),
    the same for both daemons in trial ``index`` (paired)."""
    return interval_ms / 1000 * (index + 0.5) / max(1, n)


def crash_trial(kind: str, index: int, interval_ms: int, *, lab: topology.Lab, n: int = 1) -> Trial:
    """Crash of the master (its LAN port down by one netlink request, then kill -9) at a
    chosen phase of its advert cycle:
    the bench watches the wire from the router (:class:`WireWatch`), waits for a master
    advert at t_adv and crashes at t_adv + interval + :func:`crash_phase_s`. Value: the
    client-visible outage. Details also: ``phase_ms`` (achieved: the crash - the
    master's last advert on the wire before it) and ``reaction_ms`` (the backup's first
    announcement on the wire - (that last advert + its master-down interval))."""
    variant = f"{interval_ms} ms adverts"
    pair = make_pair(kind, lab, interval_ms)
    interval = interval_ms / 1000
    duration = (4.0 if interval_ms < 1000 else 7.0) + 2 * interval
    phase = crash_phase_s(interval_ms, index, n)
    master = None
    wire: WireWatch | None = None
    cutter: LinkCutter | None = None
    try:
        pair.start(timeout=10 + 6 * interval)
        master = pair.master()
        assert master is not None
        backup = B if master == A else A
        m_mac, b_mac = lab.mac(master), lab.mac(backup)
        warm_up(lab, TARGETS)
        wire = w = WireWatch(lab.ns("router"), lab.router.iface, (m_mac, b_mac))
        cutter = LinkCutter(lab, master)
        seen_adv: list[float] = []

        def crash() -> float:
            # a stratified phase against the master's advert timer, the same for both
            # daemons in trial ``index``: the phase decides most of the outage (3 x
            # interval + skew - phase), so random phases with 10 trials hid any difference
            t_adv = w.wait_for(("advert",), m_mac, time.time(), timeout=2 * interval + 1.0)
            if t_adv is not None:
                seen_adv.append(t_adv)
                time.sleep(max(0.0, t_adv + interval + phase - time.time()))
            else:
                time.sleep(phase)  # no advert seen: the phase is not controlled (recorded)
            # the master off the LAN first (the instant of the crash), then its processes
            t = cutter.down()
            pair.kill(master)
            return t

        res, t_kill = probe_window(lab, TARGETS, crash, lead_s=0.5, duration_s=duration)
        t_dec = pair.decision(backup, t_kill, 2)
        t_ann = wire.wait_for(ANNOUNCEMENTS, b_mac, t_kill, timeout=1.0)
        last_adv = wire.last(("advert",), m_mac, t_kill)
        o = outage_after(res, t_kill)
        md_ms = master_down_ms(interval_ms, PRIO[backup])
        d = {"master": master, **o, "decision_ms": None if t_dec is None else round((t_dec - t_kill) * 1000, 1),
             "phase_target_ms": round(phase * 1000, 1),
             "phase_ms": None if last_adv is None else round((t_kill - last_adv) * 1000, 2),
             "master_down_ms": round(md_ms, 2),
             "announce_ms": None if t_ann is None else round((t_ann - t_kill) * 1000, 2),
             "reaction_ms": None if (t_ann is None or last_adv is None)
             else round((t_ann - (last_adv + md_ms / 1000)) * 1000, 2),
             "master_adverts_after_kill": wire.count(("advert",), m_mac, t_kill, t_kill + 1.0),
             "advert_seen_before_kill": bool(seen_adv)}
        if not o["recovered"] or o["seen"]["after_by"] != backup:
            return Trial("crash", variant, kind, index, None, bound_hit=not o["recovered"],
                         note=f"no answer from {backup} within the {duration - 0.5:.1f} s window", details=d)
        return Trial("crash", variant, kind, index, o["outage_ms"], details=d)
    finally:
        if wire is not None:
            wire.close()
        if cutter is not None:
            cutter.close()
        if master is not None:
            link(lab, master, True)
        pair.stop()
        for d in (A, B):
            scrub(lab, d)


def graceful_trial(kind: str, index: int, interval_ms: int, how: str, *, lab: topology.Lab) -> Trial:
    """``how``: "sigterm" (both daemons) or "promote" (ours: failoverctl promote on the backup)."""
    variant = f"{how}, {interval_ms} ms adverts"
    pair = make_pair(kind, lab, interval_ms, preempt=(how != "promote"))
    try:
        pair.start(timeout=10)
        master = pair.master()
        assert master is not None
        backup = B if master == A else A
        warm_up(lab, TARGETS)

        def event() -> float:
            if how == "sigterm":
                return pair.term(master)
            assert isinstance(pair, OursPair)
            t = time.time()
            threading.Thread(target=pair.cluster[backup].ctl, args=("promote",), daemon=True).start()
            return t

        res, t_ev = probe_window(lab, TARGETS, event, lead_s=0.5 + random.uniform(0, interval_ms / 1000),
                                 duration_s=3.0 + interval_ms / 1000)
        o = outage_after(res, t_ev)
        d = {"master": master, **o}
        if o["seen"]["after_by"] != backup:
            return Trial("graceful", variant, kind, index, None, note=f"{backup} never answered", details=d)
        return Trial("graceful", variant, kind, index, o["outage_ms"], details=d)
    finally:
        pair.stop()
        for d in (A, B):
            scrub(lab, d)
