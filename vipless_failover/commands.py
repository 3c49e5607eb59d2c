"""What the director answers: the control socket's commands (control.py serves them
to failoverctl), ``status`` and the counters the metrics read (daemon.py).

The election decides, refuses and completes promote, demote and maintenance
(steps.py waits for its ``Completed`` or ``Refused``). Reload is the director's own
(reload.py); restart checks the config as start will, then has the election stop for
a restart in place. Status shows the election's latest snapshot with the director's
parts.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from . import __version__, sched
from .config import ConfigError
from .control import Peer
from .election import fsm
from .election.protocol import State
from .preflight import preflight
from .telemetry import ControlCounters, DaemonCounters, MetricsServerCounters, NoticeCounters

if TYPE_CHECKING:
    from .daemon import Daemon


class ControlCommands:
    """The answers of ``director``, whose parts it reads at each request: a reload may
    have replaced them."""

    def __init__(self, director: Daemon):
        self.d = director

    def counters(self) -> DaemonCounters:
        """Every counter of the director, its parts and the election process (its latest
        snapshot), typed: what the metrics read, and what :meth:`status` shows."""
        d = self.d
        return DaemonCounters(
            adverts=d.snap.adverts,
            notices=NoticeCounters(d.steps.notices),
            reconcile=d.dataplane.counters(),
            announce=d.announcer.counters(),
            notify=d.hooks.counters(),
            control=d.control.counters() if d.control is not None else ControlCounters(),
            metrics=d.metrics_server.counters() if d.metrics_server is not None else MetricsServerCounters(),
            transport=d.snap.transport,
        )

    def status(self) -> dict[str, Any]:
        d = self.d
        counted = self.counters()
        snap = d.snap
        age = max(0.0, time.monotonic() - snap.at)
        st = dict(snap.status)
        st["peers"] = [{**p, "last_seen_s": round(p["last_seen_s"] + age, 3)} for p in st["peers"]]
        interval = d.cfg.election.advert_interval_ms
        election_pid = d.election.pid if d.election is not None else None
        history = d.steps.history
        st.update({
            "version": __version__,
            "config": str(d.cfg.path),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - d.started_wall, 3),
            "last_transition": history[-1] if history else None,
            "transitions": list(history),
            "adverts": counted.adverts.as_dict(),
            "keys": {**snap.keys, "replay_window_ms": d.cfg.election.max_clock_skew_ms},
            "scheduling": election_scheduling(election_pid).describe(interval),
            "election": {"pid": election_pid, "snapshot_age_s": round(age, 3),
                         "director_scheduling": sched.current().describe(interval),
                         "cpu_s": round(snap.cpu_s, 3), "rss_bytes": snap.rss_bytes,
                         "worst_master_gap_ms": snap.worst_master_gap_ms},
            "dataplane": d.dataplane.status(),
            "ipvs_available": d.dataplane.ipvs_available,
            "announce": d.announcer.status(),
            "transport": counted.transport.as_dict() if d.election_ready else {},
            "cluster_id": d.cfg.election.cluster_id,
            "tracked": d.tracker.status(),
            "notify": d.hooks.status(),
            "notices": counted.notices.as_dict(),
            "control": counted.control.as_dict() if d.control is not None else {"refused": 0},
            "metrics": {"listen": d.cfg.metrics.listen, **counted.metrics.as_dict()},
        })
        return st

    async def answer(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        cmd = req["cmd"]
        timeout = float(req.get("timeout", 10.0))
        if cmd == "status":
            await d.steps.fresh_snapshot()
            return {"ok": True, "data": self.status()}
        d.log.info("control", cmd=cmd, uid=peer.uid, pid=peer.pid)
        # the election decides, refuses and completes these (fsm.Completed, fsm.Refused)
        if cmd == "promote":
            return await d.steps.wait_for("promote", fsm.Promote(), timeout)
        if cmd == "demote":
            return await d.steps.wait_for("demote", fsm.Demote(), timeout)
        if cmd == "maintenance":
            on = req.get("on")
            if not isinstance(on, bool):
                return {"ok": False, "error": "maintenance needs on: true|false"}
            return await d.steps.wait_for("maintenance", fsm.SetMaintenance(on), timeout)
        state = d.snap.status["state"]
        if cmd == "reload":
            return await d.reload()
        if cmd == "announce":
            if state != State.MASTER.name:
                return {"ok": False, "error": f"not master (state is {state})"}
            d.announcer.start("operator")
            return {"ok": True, "data": d.announcer.status()}
        if cmd == "restart":
            # the new process must be able to start: check its config as start will
            try:
                await asyncio.to_thread(preflight, d.cfg.path)
            except ConfigError as exc:
                d.log.error("restart_refused", error=str(exc))
                return {"ok": False, "error": f"restart refused: {exc}"}
            d.steps.submit(fsm.Stop(restart=True))
            return {"ok": True, "data": {"restarting": True}}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def election_scheduling(pid: int | None) -> sched.Scheduling:
    """The election process's scheduling (what the adverts' timing depends on)."""
    try:
        return sched.current(pid or 0)
    except OSError:  # it has just exited
        return sched.current()
