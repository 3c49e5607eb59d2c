"""``python -m bench``: vipless-failover and keepalived side by side, in one run (root).

    python -m bench [--trials 10] [--sizes 1,1024,16384,65536]
                    [--figures crash,graceful,flood,cost,scale,soak,no-rt,isolation] [--out bench/results]
                    [--cost-window 20] [--soak-min 30] [--soak-sample 30] [--no-rt-min 10]
                    [--isolation-min 10]
                    [--quick] [--merge]
                    [--report-only]

Every figure of issue 7, each with ``--trials`` trials per daemon interleaved (ours,
keepalived, ours, keepalived ...) in namespace labs of netnslab; every trial has a time
bound and a bound hit is reported as such. The soak runs both daemons idle side by side
for ``--soak-min`` minutes and follows their memory. ``no-rt`` (issue 19, not in the
default set: 2 x ``--trials`` x ``--no-rt-min`` minutes) runs each pair at 10 ms adverts
without real-time priority under a CPU hog on every core (:mod:`bench.no_rt`).
``isolation`` (issue 13, not in the default set: 2 intervals x 2 x ``--trials`` x
``--isolation-min`` minutes) runs each pair at real-time priority under the hog, with
scrapes, control clients and 65,536 VIPs' reloads and bursts on our master
(:mod:`bench.isolation`).
Writes ``results.json`` (every trial, after each figure), ``results.md`` (the table,
also printed), ``machine.txt`` and PNG plots to ``--out``. ``--quick`` is a smoke run
(2 trials, small sizes, short windows).
``--merge`` with a subset of ``--figures`` keeps the other figures' trials of the
existing ``results.json`` and replaces only the figures run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netnslab import topology

from . import cost, crash, flood, isolation, no_rt, report, scale, scenarios as S, soak
from .keepalived import KEEPALIVED

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("crash", "graceful", "flood", "cost", "scale", "soak", "no-rt", "isolation")


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ka = subprocess.run([KEEPALIVED, "--version"], capture_output=True, text=True)
    return {"kernel": platform.release(), "kernel_version": platform.version(), "cpu": cpu,
            "cores": str(os.cpu_count()), "python": platform.python_version(),
            "keepalived": (ka.stdout + ka.stderr).splitlines()[0] if (ka.stdout + ka.stderr) else "?",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class Run:
    def __init__(self, out: Path, trials: int):
        self.out = out
        self.n = trials
        self.trials: list[dict[str, Any]] = []
        #: --merge: the trials of the figures not run, kept from the existing results.json
        self.kept: list[dict[str, Any]] = []

    def all(self) -> list[dict[str, Any]]:
        return self.kept + self.trials

    def add(self, t: S.Trial | list[S.Trial]) -> None:
        for x in (t if isinstance(t, list) else [t]):
            self.trials.append(x.to_json())
            v = "-" if x.value_ms is None else f"{x.value_ms:.1f}"
            extra = f" [{x.note}]" if x.note else ""
            print(f"  {x.figure:8} {x.variant:28} {x.daemon:10} #{x.index}: {v}{extra}", flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.all(), indent=1))

    def safe(self, fig: str, variant: str, kind: str, i: int, fn: Callable[[], Any]) -> None:
        try:
            self.add(fn())
        except Exception as exc:  # noqa: BLE001 - a broken trial is recorded, the run goes on
            traceback.print_exc()
            self.add(S.Trial(fig, variant, kind, i, None, note=f"error: {type(exc).__name__}: {str(exc)[:200]}"))


def fig_crash_graceful(run: Run, interval_ms: int, what: str) -> None:
    with topology.Lab() as lab:
        for i in range(run.n):
            for kind in S.DAEMONS:
                if what == "crash":
                    run.safe("crash", f"{interval_ms} ms adverts", kind, i,
                             lambda: crash.crash_trial(kind, i, interval_ms, lab=lab, n=run.n))
                else:
                    run.safe("graceful", f"sigterm, {interval_ms} ms adverts", kind, i,
                             lambda: crash.graceful_trial(kind, i, interval_ms, "sigterm", lab=lab))
            if what == "graceful":  # promote: ours only (keepalived has no such command)
                run.safe("graceful", f"promote, {interval_ms} ms adverts", "ours", i,
                         lambda: crash.graceful_trial("ours", i, interval_ms, "promote", lab=lab))
    run.save()


def fig_scale(run: Run, sizes: list[int]) -> None:
    with scale.raised_gc_thresh():
        for mode in ("per-vip", "next-hop"):
            hits: dict[str, int] = {k: 0 for k in S.DAEMONS}
            hit_size: dict[str, int] = {}
            for n in sizes:
                for i in range(run.n):
                    for kind in S.DAEMONS:
                        variant = f"{mode}, {n} VIPs"
                        if hits[kind] >= 2:  # two trials hit the bound: larger sizes take longer still
                            run.add(S.Trial("scale", variant, kind, i, None,
                                            note=f"not run: time bound hit twice at {hit_size[kind]} VIPs"))
                            continue
                        before = len(run.trials)
                        run.safe("scale", variant, kind, i, lambda: scale.scale_trial(kind, i, n, mode))
                        if run.trials[before:] and run.trials[-1]["bound_hit"]:
                            hits[kind] += 1
                            hit_size.setdefault(kind, n)
                run.save()


#: the cost figure's short-interval variant: 2 VIPs at 10 ms adverts (issue 13's idle cost)
COST_SHORT_MS = 10


def fig_cost(run: Run, sizes: list[int], window_s: float, settle_s: float) -> None:
    for n, interval_ms in [*((n, 100) for n in sizes), (2, COST_SHORT_MS)]:
        sessions = {}
        try:
            for kind in S.DAEMONS:
                sessions[kind] = cost.CostSession(kind, n, settle_s, interval_ms)
            for i in range(run.n):
                for kind in S.DAEMONS:
                    # keepalived with thousands of VIPs burns a third of a core per node:
                    # it is paused (SIGSTOP) while ours is measured, so that ours is not
                    # measured on a machine two thirds busy. Ours is idle (< 1%) and is
                    # never paused (a paused pair would wake to a master-down takeover).
                    busy = n > 2 and "keepalived" in sessions  # with 2 VIPs it is idle (0.1%)
                    paused = sessions["keepalived"].pause() if kind == "ours" and busy else []
                    try:
                        run.safe("cost", sessions[kind].variant, kind, i,
                                 lambda: sessions[kind].measure(i, window_s))
                    finally:
                        cost.resume(paused)
                    if paused:
                        time.sleep(window_s)  # keepalived catches up on what the pause held, unmeasured
        finally:
            for s in sessions.values():
                s.close()
        run.save()


def fig_soak(run: Run, minutes: float, sample_s: float, settle_s: float) -> None:
    sessions: dict[str, cost.CostSession] = {}
    try:
        for kind in S.DAEMONS:
            sessions[kind] = cost.CostSession(kind, 2, settle_s)
        run.safe("soak", "2 VIPs", "both", 0, lambda: soak.soak(sessions, minutes, sample_s))
    finally:
        for s in sessions.values():
            s.close()
    run.save()


def fig_flood(run: Run) -> None:
    for i in range(run.n):
        for kind in S.DAEMONS:
            run.safe("flood", "10,000/s for 10 s", kind, i, lambda: flood.flood_trial(kind, i))
    run.save()


def fig_no_rt(run: Run, minutes: float) -> None:
    for interval_ms in no_rt.INTERVALS:
        for i in range(run.n):
            for kind in S.DAEMONS:
                run.safe("no-rt", f"{interval_ms} ms adverts, SCHED_OTHER, hog on every core", kind, i,
                         lambda: no_rt.no_rt_trial(kind, i, interval_ms, minutes * 60))
                run.save()


def fig_isolation(run: Run, minutes: float) -> None:
    for interval_ms in isolation.TARGETS:
        for i in range(run.n):
            for kind in S.DAEMONS:
                run.safe("isolation", isolation.variant(interval_ms), kind, i,
                         lambda: isolation.isolation_trial(kind, i, interval_ms, minutes * 60))
                run.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--sizes", default="1,1024,16384,65536")
    ap.add_argument("--figures", default="crash,graceful,flood,cost,scale,soak")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--cost-window", type=float, default=20.0,
                    help="seconds per cost window (CPU time is read in nanoseconds from each thread's "
                         "schedstat, plus reaped children's time; default 20)")
    ap.add_argument("--soak-min", type=float, default=30.0,
                    help="minutes of the soak: both daemons idle side by side, RSS sampled (default 30)")
    ap.add_argument("--soak-sample", type=float, default=30.0, help="seconds between soak samples (default 30)")
    ap.add_argument("--no-rt-min", type=float, default=10.0,
                    help="minutes of CPU hog per no-rt trial (default 10)")
    ap.add_argument("--isolation-min", type=float, default=10.0,
                    help="minutes of hog and load per isolation trial (default 10)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 trials, sizes 1,1024, short windows")
    ap.add_argument("--merge", action="store_true",
                    help="keep the trials of the figures not in --figures from the existing results.json in "
                         "--out and replace only those of the figures run (e.g. `--figures cost --merge` "
                         "updates the cost figure alone); without it results.json holds this run only")
    ap.add_argument("--report-only", action="store_true", help="re-render results.md/plots from results.json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("root needed (network namespaces)")
    out = Path(args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.trials, sizes, args.cost_window = 2, [s for s in sizes if s <= 1024] or [1], 3.0
        args.soak_min, args.soak_sample, args.no_rt_min, args.isolation_min = 2.0, 10.0, 0.5, 0.5
    run = Run(out, args.trials)
    figures = args.figures.split(",")
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        ap.error(f"unknown figure(s) {','.join(unknown)}; known: {','.join(FIGURES)}")
    cmd = "python -m bench" + (" --quick" if args.quick else f" --trials {args.trials}")
    if args.figures != ap.get_default("figures"):
        cmd += f" --figures {args.figures}"
    if args.merge:
        cmd += " --merge"
    t0 = time.time()
    settle_s = 2.0 if args.quick else 5.0
    if args.report_only:
        run.trials = json.loads((out / "results.json").read_text())
        info = json.loads((out / "machine.json").read_text())
        cmd = info.get("command", "python -m bench")
    else:
        info = machine_info()
        info["command"] = cmd
        if args.merge and (out / "results.json").exists():
            old = json.loads((out / "results.json").read_text())
            run.kept = [t for t in old if t["figure"] not in figures]
            try:
                old_info = json.loads((out / "machine.json").read_text())
            except (OSError, ValueError):
                old_info = {}
            kept_figs = sorted({t["figure"] for t in run.kept})
            if kept_figs:
                info["merged"] = (f"figures {','.join(figures)} from this run; {','.join(kept_figs)} kept from the "
                                  f"results of the run started {old_info.get('started', '?')} "
                                  f"(`{old_info.get('command', 'python -m bench')}`)"
                                  + (f", which had merged: {old_info['merged']}" if old_info.get("merged") else ""))
        out.mkdir(parents=True, exist_ok=True)
        for fig in figures:
            print(f"== {fig}", flush=True)
            if fig == "crash":
                fig_crash_graceful(run, 100, "crash")
                fig_crash_graceful(run, 1000, "crash")
            elif fig == "graceful":
                fig_crash_graceful(run, 100, "graceful")
            elif fig == "scale":
                fig_scale(run, sizes)
            elif fig == "cost":
                fig_cost(run, [2, max(sizes)] if max(sizes) > 2 else [2], args.cost_window, settle_s)
            elif fig == "flood":
                fig_flood(run)
            elif fig == "soak":
                fig_soak(run, args.soak_min, args.soak_sample, settle_s)
            elif fig == "no-rt":
                fig_no_rt(run, args.no_rt_min)
            elif fig == "isolation":
                fig_isolation(run, args.isolation_min)
        info["duration_min"] = f"{(time.time() - t0) / 60:.0f}"
        (out / "machine.json").write_text(json.dumps(info, indent=1))
        (out / "machine.txt").write_text("\n".join(f"{k}: {v}" for k, v in info.items()) + "\n")
        run.save()
    pngs = report.plots(run.all(), out)
    md = report.markdown(run.all(), info, pngs, cmd)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
