"""Figure ``isolation`` (issue 13): the master's adverts under everything else at once.

Each pair runs as the unit runs it (ours: ``chrt -r 10``; keepalived: ``vrrp_rt_priority
10``, its VRRP process at the same real-time priority), with one busy loop per core at
normal priority (``netnslab.hog``) for the whole window. On the master, at the same
time (ours only: keepalived has no such doors):

* **scrapes**: 500 concurrent ``GET /metrics`` every second (``netnslab.load``);
* **control**: 200 control connections, each asking ``status`` every second (the
  daemon serves 64 at once, the rest are turned away and reconnect a second later);
* **65,536 VIPs**: the master announces 65,536 VIPs one by one (per-VIP NA frames) and
  repeats the full burst every 5 s (``announce.refresh_interval_s``); every 5 s its
  IPv4 delivery rule is deleted behind its back (a drift repair pass: the reconcile's
  work does not grow with the VIPs, its rules cover prefixes) and, 2.5 s after each, a
  SIGHUP reload of a config whose announcement section changed (``repeats`` 3 <-> 2)
  re-reads it and rebuilds the 65,536 frames (the control socket is the load's: its 64
  connections are taken);
* **health checks**: none yet (issue 15 brings them); the figure says so.

The router's AF_PACKET socket (:class:`bench.scenarios.WireWatch`, kernel receive
timestamps) records every advert on the LAN. Per trial: the worst master-advert gap,
how many gaps exceeded the target (1.1 x the interval at 100 ms, 2 x at 10 ms) and
the master-down interval, false failovers (the backup entering MASTER), what the load
got (scrapes answered or turned away, control requests answered), the CPU of each
daemon.

Targets (ours), from the issue: no master advert later than 1.1 x the interval at
100 ms adverts and 2 x at 10 ms; 0 false failovers in 10 minutes (``--isolation-min
10``).
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from typing import Any

from netnslab import topology
from netnslab.daemons import event_time, master_down_ms

from . import no_rt, scenarios as S

#: the figure's advert intervals (ms) and the target gap for each, as a factor of it
TARGETS = {100: 1.1, 10: 2.0}
VIPS = 65_536
METRICS = "127.0.0.1:9650"
SCRAPES = 500
CONTROL_CLIENTS = 200
DRIFT_EVERY_S = 5.0


def variant(interval_ms: int) -> str:
    return f"{interval_ms} ms adverts, RT 10, hog on every core, load on the master"


def isolation_trial(kind: str, index: int, interval_ms: int, seconds: float) -> S.Trial:
    md_ms = master_down_ms(interval_ms, S.PRIO[S.B])
    target_ms = TARGETS[interval_ms] * interval_ms
    with topology.Lab() as lab:
        pair: S.Pair
        if kind == "ours":
            ours = S.OursPair(lab, interval_ms, vips=S.vip_config(VIPS),
                              overrides={"metrics": {"listen": METRICS},
                                         "announce": {"refresh_interval_s": int(DRIFT_EVERY_S)}})
            for d in ours.cluster:
                d.command_prefix = ["chrt", "-r", "10"]
            pair = ours
        else:
            pair = S.KaPair(lab, interval_ms, extra_global=("vrrp_rt_priority 10",))
        watch: S.WireWatch | None = None
        spawned: list[topology.Spawned] = []
        try:
            S.start_with_a_master(pair, timeout=60, master_within=20)
            pids = {d: pair.pids(d) for d in (S.A, S.B)}
            policies = {d: no_rt.policies(p) for d, p in pids.items()}
            # adverts only: a burst is 65,536 frames from the same MAC
            watch = S.WireWatch(lab.ns("router"), lab.router.iface, [lab.mac(S.A)],
                                limit=int(seconds * 1000 / interval_ms * 1.5) + 10_000, kinds=("advert",))
            time.sleep(2.0)
            cpu0 = {d: S._cpu_s(p) for d, p in pids.items()}
            t0 = time.time()
            hog = lab.spawn("client", [lab.python, "-m", "netnslab.hog", "--seconds", str(seconds)],
                            name="hog", log=lab.workdir / "hog.log")
            spawned.append(hog)
            load_out = lab.workdir / "load.json"
            forced: dict[str, list[float]] = {"rule deleted": [], "reload": []}
            if isinstance(pair, S.OursPair):
                a = pair.cluster[S.A]
                load = lab.spawn(S.A, [lab.python, "-m", "netnslab.load", "--seconds", str(seconds),
                                       "--scrape", METRICS, "--scrapes", str(SCRAPES),
                                       "--control", str(a.control_socket),
                                       "--control-clients", str(CONTROL_CLIENTS)],
                                 name="load", log=load_out)
                spawned.append(load)
                # a rule deleted, then half a period later a reload: apart, so that a gap
                # can be told to follow one or the other
                next_at = time.monotonic() + DRIFT_EVERY_S / 2
                end = time.monotonic() + seconds
                deleting = True
                while time.monotonic() < end:
                    time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
                    if time.monotonic() >= end:
                        break
                    if deleting:
                        lab.ip(S.A, "-4", "rule", "del", "priority", "100", "table", "100", check=False)
                        forced["rule deleted"].append(time.time())
                    else:  # a changed announcement section: the 65,536 frames are rebuilt
                        over = dict(a.settings.overrides)
                        ann = dict(over["announce"])
                        ann["repeats"] = 2 if ann.get("repeats", 3) == 3 else 3
                        a.reconfigure(overrides={**over, "announce": ann})
                        a.signal(signal.SIGHUP)
                        forced["reload"].append(time.time())
                    deleting = not deleting
                    next_at += DRIFT_EVERY_S / 2
            hog.popen.wait(timeout=seconds + 60)
            for sp in spawned[1:]:
                sp.popen.wait(timeout=60)
            t1 = time.time()
            cpu = {d: (S._cpu_s(p) - cpu0[d]) / (t1 - t0) * 100 for d, p in pids.items()}
            time.sleep(0.5)
            mac_a = lab.mac(S.A).lower()
            times = sorted(f.t for f in list(watch.frames)
                           if f.src == mac_a and f.kind == "advert" and t0 <= f.t <= t1)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            worst_ms = max(gaps, default=0.0) * 1000
            events = [(t, what) for what, ts in forced.items() for t in ts]
            if isinstance(pair, S.OursPair):
                events += [(event_time(e) or 0.0, "burst") for e in pair.cluster[S.A].events(current_run=True)
                           if e.get("event") == "announce.burst"]  # a burst started (reload, takeover)

            def after(t: float) -> str:  # the last forced event or burst before a gap ended, from its start
                last = max(((te, w) for te, w in events if te <= t), default=None)
                return "-" if last is None else f"{last[1]} {(last[0] - t) * 1000:+.0f} ms"
            top = sorted(range(len(gaps)), key=gaps.__getitem__, reverse=True)[:5]
            worst_gaps = [{"at_s": round(times[i] - t0, 3), "gap_ms": round(gaps[i] * 1000, 1),
                           "after": after(times[i + 1])} for i in top]
            false_failovers = no_rt._backup_masters(pair, t0, t1)
            load_result: dict[str, Any] = {}
            if load_out.exists():
                lines = [ln for ln in load_out.read_text().splitlines() if ln.startswith("{")]
                load_result = json.loads(lines[-1]) if lines else {}
            details: dict[str, Any] = {
                "interval_ms": interval_ms, "seconds": round(t1 - t0, 1), "master_adverts": len(times),
                "worst_gap_ms": round(worst_ms, 1), "target_gap_ms": round(target_ms, 1),
                "gaps_over_target": sum(1 for g in gaps if g * 1000 > target_ms),
                "master_down_ms": round(md_ms, 1),
                "gaps_over_master_down": sum(1 for g in gaps if g * 1000 > md_ms),
                "false_failovers": false_failovers, "cpu_pct": {d: round(c, 2) for d, c in cpu.items()},
                "policies": policies, "vips": VIPS if kind == "ours" else len(topology.DEFAULT_VIPS),
                "load": load_result, "rules_deleted": len(forced["rule deleted"]),
                "reloads": len(forced["reload"]), "worst_gaps": worst_gaps,
                "health_checks": "none (issue 15)",
            }
            if isinstance(pair, S.OursPair):
                st = pair.cluster[S.A].status_now() or {}
                details["reconcile"] = (st.get("dataplane") or {}).get("reconcile")
                details["election"] = st.get("election")  # its own worst gap between master adverts
                details["metrics_server"] = st.get("metrics")
                details["control_counters"] = st.get("control")
                details["announce_starts"] = sum(1 for te, w in events if w == "burst" and t0 <= te <= t1)
                details["reloads_done"] = sum(1 for e in pair.cluster[S.A].events(current_run=True)
                                              if e.get("event") == "reloaded" and t0 <= (event_time(e) or 0) <= t1)
            note = f"{false_failovers} false failover(s)" if false_failovers else ""
            if len(times) < (t1 - t0) * 1000 / interval_ms * 0.5:
                note = (note + "; " if note else "") + f"only {len(times)} master adverts seen"
            return S.Trial("isolation", variant(interval_ms), kind, index, round(worst_ms, 1), note=note,
                           details=details)
        finally:
            for sp in spawned:  # what still runs (a failed trial) is stopped with the lab
                if sp.popen.poll() is not None:
                    lab.forget(sp)
            if watch is not None:
                watch.close()
            pair.stop()
