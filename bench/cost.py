"""Figure 4 of the bench (issue 7): the cost at rest of an idle pair, CPU per minute and
RSS of the master and the backup, in interleaved windows (:class:`CostSession`; the soak,
:mod:`bench.soak`, keeps the same sessions up for longer).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

from netnslab import topology

from .scale import SCALE_RATE_PPS, scale_bound_s
from .scenarios import A, B, KaPair, OursPair, Pair, Trial, _cpu_s, _rss_mb, vip_config, vip_set


def resume(pids: Sequence[int]) -> None:
    """SIGCONT what :meth:`CostSession.pause` stopped."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class CostSession:
    """An idle pair (100 ms adverts, or ``interval_ms``) in its own lab, kept up while the driver takes
    interleaved measurement windows (ours, keepalived, ours ...): CPU seconds per
    minute and RSS of the master and the backup (keepalived: parent + VRRP child)."""

    def __init__(self, kind: str, n: int, settle_s: float, interval_ms: int = 100):
        self.kind, self.n = kind, n
        self.variant = "2 VIPs" if n <= 2 else f"{n} VIPs"
        if interval_ms != 100:
            self.variant += f", {interval_ms} ms adverts"
        self.lab = topology.Lab(responders=False)
        self.lab.__enter__()
        self.error = ""
        bound = scale_bound_s(n)
        if kind == "ours":
            # the same announce rate as the scale figure, so that the takeover schedule
            # (burst + repeats) is over before measuring: this figure is the cost at rest
            self.pair: Pair = OursPair(self.lab, interval_ms, vips=vip_config(n) if n > 2 else None,
                                       rate_pps=SCALE_RATE_PPS)
        else:
            self.pair = KaPair(self.lab, interval_ms, vips=vip_set(n) if n > 2 else None)
        try:
            self.pair.start(timeout=bound)
        except topology.LabError:
            self.error = f"set-up: no master within {bound:.0f} s"
        time.sleep(settle_s)
        if kind == "ours" and not self.error:
            self._wait_announcements_done(bound)

    def _wait_announcements_done(self, bound: float) -> None:
        """Wait (bounded) until the master's announcement schedule has ended."""
        end = time.monotonic() + bound
        while time.monotonic() < end:
            master = self.pair.master()
            st = self.pair.status(master) if master else None
            if st and not (st.get("announce") or {}).get("burst_running"):
                return
            time.sleep(0.5)
        self.error = f"set-up: announcements still running after {bound:.0f} s"

    def pause(self) -> list[int]:
        """SIGSTOP every daemon process of this session; returns the PIDs stopped."""
        stopped = []
        for d in (A, B):
            for pid in self.pair.pids(d):
                try:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
                except ProcessLookupError:
                    pass
        return stopped

    def measure(self, index: int, window_s: float) -> list[Trial]:
        if self.error:
            return [Trial("cost", f"{r}, {self.variant}", self.kind, index, None, bound_hit=True, note=self.error)
                    for r in ("master", "backup")]
        master = self.pair.master() or A
        roles = {"master": master, "backup": B if master == A else A}
        pids = {r: self.pair.pids(d) for r, d in roles.items()}
        c0 = {r: _cpu_s(p) for r, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(window_s)
        dt = time.monotonic() - t0
        out = []
        for r, p in pids.items():
            cpu = _cpu_s(p) - c0[r]
            out.append(Trial("cost", f"{r}, {self.variant}", self.kind, index, round(cpu / dt * 100, 3),
                             details={"cpu_s_per_min": round(cpu / dt * 60, 4), "core_pct": round(cpu / dt * 100, 3),
                                      "rss_mb": round(_rss_mb(p), 1), "pids": len(p), "window_s": round(dt, 1),
                                      "state": self.pair.state(roles[r])}))
        return out

    def close(self) -> None:
        try:
            if isinstance(self.pair, KaPair):
                for k in self.pair.kas.values():
                    if k.running:
                        k.kill()
                    k._forget()
            else:
                self.pair.stop()
        finally:
            self.lab.__exit__(None, None, None)
