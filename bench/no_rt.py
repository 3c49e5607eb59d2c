"""Figure ``no-rt`` (issue 19): a pair at short adverts without real-time priority,
with one busy loop per core at normal priority, ours and keepalived in one run.

Both daemons run at SCHED_OTHER, as a user gets who runs the daemon outside the unit
(which sets SCHED_RR), in a container without CAP_SYS_NICE, or forgets ``chrt``; the
policy of every daemon process is read from the kernel and recorded with the trial.
For ``--no-rt-min`` minutes (default 10) ``netnslab.hog`` spins on every core; the
router's AF_PACKET socket (:class:`bench.scenarios.WireWatch`, kernel receive
timestamps) records every advert on the LAN. Per trial:

* **false failovers**: the backup entering MASTER during the hog (ours: its
  transitions log; keepalived: "Entering MASTER STATE" of the backup's log);
* **worst master-advert gap**: the longest time between two adverts of the master on
  the wire, and how many gaps exceeded the master-down interval;
* the CPU of each director's daemon processes over the window.

Target (ours): 0 false failovers and a worst gap no more than 2 x keepalived's in the
same run.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

from netnslab import topology
from netnslab.daemons import event_time, master_down_ms
from vipless_failover import sched

from . import scenarios as S

#: the figure's advert intervals (ms)
INTERVALS = (10,)


def policies(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(sched.current(pid).policy)
        except OSError:
            out.append("gone")
    return out


def _backup_masters(pair: S.Pair, t0: float, t1: float) -> int:
    """How often the backup (director-b) entered MASTER in [t0, t1]."""
    if isinstance(pair, S.OursPair):
        return sum(1 for ev in pair.cluster[S.B].transitions()
                   if ev.get("to") == "MASTER" and t0 <= (event_time(ev) or 0.0) <= t1)
    assert isinstance(pair, S.KaPair)
    return sum(1 for line in list(pair.kas[S.B].lines)
               if t0 <= line.t <= t1 and "Entering MASTER STATE" in line.text)


class StealWatch:
    """The machine's steal time (``/proc/stat``: time the hypervisor ran something
    else while a vCPU of this machine had work), sampled every 50 ms by a thread, so a
    long advert gap can be told apart from a vCPU that was not running at all."""

    TICK_S = 1 / os.sysconf("SC_CLK_TCK")

    def __init__(self, period_s: float = 0.05):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, name="steal-watch", daemon=True)
        self._thread.start()

    @staticmethod
    def steal_ticks() -> int:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0  # cpu user nice system idle iowait irq softirq steal

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.steal_ticks()))
            self._stop.wait(self._period)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def steal_ms(self, t0: float, t1: float) -> float:
        """Steal summed over all CPUs between the samples around [t0, t1] (ms)."""
        before = [v for t, v in self.samples if t <= t0]
        after = [v for t, v in self.samples if t >= t1]
        if not before or not after:
            return 0.0
        return (after[0] - before[-1]) * self.TICK_S * 1000


def no_rt_trial(kind: str, index: int, interval_ms: int, seconds: float) -> S.Trial:
    variant = f"{interval_ms} ms adverts, SCHED_OTHER, hog on every core"
    md_ms = master_down_ms(interval_ms, S.PRIO[S.B])
    with topology.Lab() as lab:
        pair = S.make_pair(kind, lab, interval_ms)
        watch: S.WireWatch | None = None
        steal: StealWatch | None = None
        try:
            S.start_with_a_master(pair, timeout=30, master_within=10)
            pids = {d: pair.pids(d) for d in (S.A, S.B)}
            sched = {d: policies(p) for d, p in pids.items()}
            watch = S.WireWatch(lab.ns("router"), lab.router.iface, [lab.mac(S.A), lab.mac(S.B)],
                                limit=int(seconds * 1000 / interval_ms * 1.5) + 10_000)
            steal = StealWatch()
            time.sleep(2.0)
            cpu0 = {d: S._cpu_s(p) for d, p in pids.items()}
            t0 = time.time()
            hog = lab.spawn("client", [lab.python, "-m", "netnslab.hog", "--seconds", str(seconds)],
                            name="hog", log=lab.workdir / "hog.log")
            try:
                hog.popen.wait(timeout=seconds + 30)
            finally:
                lab.forget(hog)
            t1 = time.time()
            cpu = {d: (S._cpu_s(p) - cpu0[d]) / (t1 - t0) * 100 for d, p in pids.items()}
            time.sleep(0.5)
            mac_a = lab.mac(S.A).lower()
            times = sorted(f.t for f in list(watch.frames) if f.src == mac_a and f.kind == "advert" and t0 <= f.t <= t1)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            worst_ms = max(gaps, default=0.0) * 1000
            steal.close()
            worst_at = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
            long_gaps = [(times[i], times[i + 1]) for i, g in enumerate(gaps) if g * 1000 > md_ms]
            false_failovers = _backup_masters(pair, t0, t1)
            details: dict[str, Any] = {
                "interval_ms": interval_ms, "seconds": round(t1 - t0, 1), "master_adverts": len(times),
                "worst_gap_ms": round(worst_ms, 1), "master_down_ms": round(md_ms, 1),
                "gaps_over_master_down": sum(1 for g in gaps if g * 1000 > md_ms),
                "gaps_over_2x_interval": sum(1 for g in gaps if g * 1000 > 2 * interval_ms),
                "false_failovers": false_failovers, "cpu_pct": {d: round(c, 2) for d, c in cpu.items()},
                "policies": sched, "cores": os.cpu_count(),
                # the hypervisor's steal over the window, and within the worst gap and the
                # gaps over master-down (from /proc/stat, 10 ms ticks summed over CPUs)
                "steal_ms": round(steal.steal_ms(t0, t1), 1),
                "steal_in_worst_gap_ms": (None if worst_at is None else
                                          round(steal.steal_ms(times[worst_at], times[worst_at + 1]), 1)),
                "steal_in_long_gaps_ms": [round(steal.steal_ms(a, b), 1) for a, b in long_gaps][:50],
            }
            note = f"{false_failovers} false failover(s)" if false_failovers else ""
            if len(times) < (t1 - t0) * 1000 / interval_ms * 0.5:
                note = (note + "; " if note else "") + f"only {len(times)} master adverts seen"
            return S.Trial("no-rt", variant, kind, index, round(worst_ms, 1), note=note, details=details)
        finally:
            if watch is not None:
                watch.close()
            if steal is not None:
                steal.close()
            pair.stop()
