"""Results of a bench run: the Markdown table (also printed) and PNG plots.

Input: the trials (:class:`bench.scenarios.Trial` as dicts, ``results.json``) and the
machine info. Every row gives the
number of trials, median, p95 and max, the trials that hit their time bound, the
ratio ours/keepalived trial by trial (median of the per-index ratios), and the
issue's target with whether it was met.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SKEW_B_100MS = (256 - 100) * 100 / 256  # backup (priority 100) at 100 ms adverts


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def group(trials: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    out: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        out[(t["figure"], t["variant"])][t["daemon"]].append(t)
    return out


def ratios(ours: Sequence[dict[str, Any]], ka: Sequence[dict[str, Any]]) -> list[float]:
    by = {t["index"]: t["value_ms"] for t in ka}
    out = []
    for t in ours:
        k = by.get(t["index"])
        if t["value_ms"] is not None and k:
            out.append(t["value_ms"] / k)
    return out


def scale_target(variant: str) -> tuple[str, float]:
    mode, n = variant.split(", ")
    n_vips = int(n.split()[0])
    if mode == "next-hop":
        return "<= 50 ms", 50.0
    from .scale import SCALE_RATE_PPS
    frames = n_vips * (2 if n_vips <= 256 else 1)  # IPv4: request + reply GARP; IPv6: one NA
    bound = frames / SCALE_RATE_PPS * 1000 + 50
    return f"<= {bound:.0f} ms ({frames} frames at {SCALE_RATE_PPS:,} pps + 50)", bound


def target_for(fig: str, variant: str, daemon_trials: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    ours = [t for t in daemon_trials.get("ours", [])]
    vals = [t["value_ms"] for t in ours if t["value_ms"] is not None]
    ka_vals = [t["value_ms"] for t in daemon_trials.get("keepalived", []) if t["value_ms"] is not None]
    if not ours:
        return "", ""
    if fig == "crash" and variant.startswith("100 ms"):
        bound = 3 * 100 + SKEW_B_100MS + 30
        ok = bool(vals) and len(vals) == len(ours) and statistics.median(vals) <= bound and \
            (not ka_vals or statistics.median(vals) <= statistics.median(ka_vals))
        return f"median <= {bound:.0f} ms and <= keepalived's median", "met" if ok else "**MISSED**"
    if fig == "graceful":
        lost = [t["details"].get("lost") for t in ours]
        ok = all(x == 0 for x in lost) and len(vals) == len(ours)
        return "no probe lost (5 ms probing)", "met" if ok else f"**MISSED** (lost: {lost})"
    if fig == "scale":
        text, bound = scale_target(variant)
        ok = bool(vals) and len(vals) == len(ours) and max(vals) <= bound
        return text + " (every trial)", "met" if ok else "**MISSED**"
    return "", ""


def table_times(trials: Sequence[dict[str, Any]], figures: Sequence[str]) -> list[str]:
    lines = ["| figure | variant | daemon | trials | median ms | p95 ms | max ms | bound hit / failed | "
             "ratio ours/keepalived (median, trial by trial) | target (ours) | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    g = group(trials)
    for (fig, variant), by_daemon in g.items():
        if fig not in figures:
            continue
        tgt, res = target_for(fig, variant, by_daemon)
        r = ratios(by_daemon.get("ours", []), by_daemon.get("keepalived", []))
        for daemon in ("ours", "keepalived"):
            ts = by_daemon.get(daemon)
            if not ts:
                continue
            vals = [t["value_ms"] for t in ts if t["value_ms"] is not None]
            bad = len(ts) - len(vals)
            bh = sum(1 for t in ts if t["bound_hit"])
            notes = sorted({t["note"] for t in ts if t["note"]})
            badtxt = "0" if not bad else f"{bad} ({bh} bound hit{'s' if bh != 1 else ''}: {'; '.join(notes)[:160]})"
            ratio = fmt(statistics.median(r)) if (daemon == "ours" and r) else ""
            lines.append(f"| {fig} | {variant} | {daemon} | {len(ts)} | "
                         f"{fmt(statistics.median(vals)) if vals else '-'} | {fmt(pct(vals, 95)) if vals else '-'} | "
                         f"{fmt(max(vals)) if vals else '-'} | {badtxt} | {ratio} | "
                         f"{tgt if daemon == 'ours' else ''} | {res if daemon == 'ours' else ''} |")
    return lines


def _detail_stats(ts: Sequence[dict[str, Any]], key: str) -> tuple[list[float], str]:
    """The values of ``details[key]`` of the trials that have it, and "median | p95 | max"."""
    vals = [float(t["details"][key]) for t in ts if (t.get("details") or {}).get(key) is not None]
    if not vals:
        return vals, "- | - | -"
    return vals, f"{fmt(statistics.median(vals))} | {fmt(pct(vals, 95))} | {fmt(max(vals))}"


FLIP_TARGET_VIPS = 65536
FLIP_TARGET_MS = 5.0


def table_flip(trials: Sequence[dict[str, Any]]) -> list[str]:
    """Kernel flip per scale variant and daemon (``details.flip_ms``); the issue's target
    (<= 5 ms at 65,536 VIPs, every trial) on ours' rows at that size."""
    g = [(k, v) for k, v in group(trials).items() if k[0] == "scale"]
    if not any((t.get("details") or {}).get("flip_ms") is not None for _, by in g for ts in by.values() for t in ts):
        return ["(not measured in this run)"]
    lines = ["| mode, VIPs | daemon | trials | with a flip | median ms | p95 ms | max ms | target (ours) | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (_, variant), by_daemon in g:
        n_vips = int(variant.split(", ")[1].split()[0])
        for daemon in ("ours", "keepalived"):
            ts = by_daemon.get(daemon)
            if not ts:
                continue
            vals, stats = _detail_stats(ts, "flip_ms")
            tgt = res = ""
            if daemon == "ours" and n_vips == FLIP_TARGET_VIPS:
                tgt = f"<= {FLIP_TARGET_MS:g} ms (every trial)"
                ok = bool(vals) and len(vals) == len(ts) and max(vals) <= FLIP_TARGET_MS
                res = "met" if ok else "**MISSED**"
            lines.append(f"| {variant} | {daemon} | {len(ts)} | {len(vals)} | {stats} | {tgt} | {res} |")
    return lines


def table_reaction(trials: Sequence[dict[str, Any]]) -> list[str]:
    """Crash trials: each daemon's reaction after the master-down timer
    (``details.reaction_ms``) and the crash phases achieved (``details.phase_ms``)."""
    g = [(k, v) for k, v in group(trials).items() if k[0] == "crash"]
    if not any((t.get("details") or {}).get("reaction_ms") is not None
               for _, by in g for ts in by.values() for t in ts):
        return ["(not measured in this run)"]
    lines = ["| variant | daemon | trials | reaction median ms | p95 ms | max ms | "
             "phase achieved, ms (min .. max) | phase - target, ms (max abs) | outage median ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (_, variant), by_daemon in g:
        for daemon in ("ours", "keepalived"):
            ts = by_daemon.get(daemon)
            if not ts:
                continue
            _, stats = _detail_stats(ts, "reaction_ms")
            phases, _ = _detail_stats(ts, "phase_ms")
            errs = [abs(t["details"]["phase_ms"] - t["details"]["phase_target_ms"]) for t in ts
                    if t["details"].get("phase_ms") is not None and t["details"].get("phase_target_ms") is not None]
            outs = [t["value_ms"] for t in ts if t["value_ms"] is not None]
            cover = f"{fmt(min(phases))} .. {fmt(max(phases))} ({len(phases)})" if phases else "-"
            lines.append(f"| {variant} | {daemon} | {len(ts)} | {stats} | {cover} | "
                         f"{fmt(max(errs)) if errs else '-'} | {fmt(statistics.median(outs)) if outs else '-'} |")
    return lines


def table_cost(trials: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| role, VIPs | daemon | trials | CPU s/min (median) | % of one core (median / max) | "
             "RSS MB (median / max) | bound hit | target (ours) | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (fig, variant), by_daemon in group(trials).items():
        if fig != "cost":
            continue
        for daemon in ("ours", "keepalived"):
            ts = by_daemon.get(daemon)
            if not ts:
                continue
            ok_ts = [t for t in ts if t["value_ms"] is not None]
            bh = sum(1 for t in ts if t["bound_hit"])
            cpu = [t["details"]["cpu_s_per_min"] for t in ok_ts]
            core = [t["details"]["core_pct"] for t in ok_ts]
            rss = [t["details"]["rss_mb"] for t in ok_ts]
            tgt = res = ""
            if daemon == "ours":
                # at rest: < 0.5% of one core at 100 ms adverts; <= 1.5% at 10 ms (issue 13)
                limit = 1.5 if "10 ms adverts" in variant else 0.5
                tgt = f"{'<=' if limit == 1.5 else '<'} {limit:g}% of one core, RSS < 60 MB"
                met = bool(ok_ts) and len(ok_ts) == len(ts) and max(rss) < 60 and (
                    statistics.median(core) <= limit if limit == 1.5 else statistics.median(core) < limit)
                res = "met" if met else "**MISSED**"
            note = "" if not bh else f"{bh}: {ts[0]['note']}"
            lines.append(f"| {variant} | {daemon} | {len(ts)} | {fmt(statistics.median(cpu)) if cpu else '-'} | "
                         f"{(fmt(statistics.median(core)) + ' / ' + fmt(max(core))) if core else '-'} | "
                         f"{(fmt(statistics.median(rss)) + ' / ' + fmt(max(rss))) if rss else '-'} | "
                         f"{note or 0} | {tgt} | {res} |")
    return lines


def table_soak(trials: Sequence[dict[str, Any]]) -> list[str]:
    from .soak import SOAK_PROJECTION_DAYS as DAYS, SOAK_RSS_TARGET_MB as TARGET
    lines = ["| role, VIPs | daemon | minutes | RSS MB start / max / end | growth, second half, kB/min | "
             f"RSS MB projected at {DAYS} days | % of one core over the run | target (ours) | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (fig, variant), by_daemon in group(trials).items():
        if fig != "soak":
            continue
        for daemon in ("ours", "keepalived"):
            for t in by_daemon.get(daemon, []):
                d = t.get("details") or {}
                tgt = res = ""
                if daemon == "ours":
                    tgt = f"RSS < {TARGET:g} MB throughout and at {DAYS} days (second half's growth projected)"
                    ok = (t["value_ms"] is not None and not t["note"] and d.get("rss_max_mb", math.inf) < TARGET
                          and d.get(f"projected_mb_{DAYS}d", math.inf) < TARGET)
                    res = "met" if ok else "**MISSED**" + (f" ({t['note']})" if t["note"] else "")
                if t["value_ms"] is None:
                    lines.append(f"| {variant} | {daemon} | - | - | - | - | - | {tgt} | {res or t['note']} |")
                    continue
                lines.append(f"| {variant} | {daemon} | {fmt(d['minutes'])} | {d['rss_start_mb']:.1f} / "
                             f"{d['rss_max_mb']:.1f} / {d['rss_end_mb']:.1f} | {t['value_ms']:+.2f} | "
                             f"{d[f'projected_mb_{DAYS}d']:.1f} | {fmt(d['core_pct'])} | {tgt} | {res} |")
    return lines


def table_flood(trials: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| daemon | trials | took over | backup CPU during flood, % of one core (median / max) | "
             "forged sent per trial | master adverts accepted by the backup (median; expected ~100) | "
             "target | result |",
             "|---|---|---|---|---|---|---|---|"]
    for (fig, _variant), by_daemon in group(trials).items():
        if fig != "flood":
            continue
        for daemon in ("ours", "keepalived"):
            ts = by_daemon.get(daemon)
            if not ts:
                continue
            took = sum(1 for t in ts if t["details"].get("took_over"))
            core = [t["details"]["core_pct"] for t in ts]
            sent = [t["details"]["flood"]["sent"] for t in ts]
            acc = [t["details"]["master_adverts_accepted"] for t in ts
                   if t["details"].get("master_adverts_accepted") is not None]
            res = ("met" if took == 0 else "**MISSED**") if daemon == "ours" else ""
            lines.append(f"| {daemon} | {len(ts)} | {took} of {len(ts)} | "
                         f"{fmt(statistics.median(core))} / {fmt(max(core))} | {min(sent):,}..{max(sent):,} | "
                         f"{fmt(statistics.median(acc)) if acc else 'n/a (no counter)'} | "
                         f"{'must not take over' if daemon == 'ours' else ''} | {res} |")
    return lines


def table_no_rt(trials: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| variant | daemon | trials | false failovers (total) | worst master-advert gap ms (median / max) | "
             "gaps > master-down (total) | gaps > 2 x interval (total) | CPU % of one core, master / backup "
             "(median) | steal ms over the trials / in the worst gaps | scheduling | target (ours) | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fig, variant), by_daemon in group(trials).items():
        if fig != "no-rt":
            continue
        ka = [t["value_ms"] for t in by_daemon.get("keepalived", []) if t["value_ms"] is not None]
        for daemon in ("ours", "keepalived"):
            ts = [t for t in by_daemon.get(daemon, []) if t["value_ms"] is not None]
            errors = [t for t in by_daemon.get(daemon, []) if t["value_ms"] is None]
            if not ts:
                if errors:
                    lines.append(f"| {variant} | {daemon} | 0 | - | - | - | - | - | - | - | | {errors[0]['note']} |")
                continue
            d = [t["details"] for t in ts]
            worst = [t["value_ms"] for t in ts]
            ff = sum(x["false_failovers"] for x in d)
            pol = sorted({p for x in d for ps in x["policies"].values() for p in ps})
            cpu_m = statistics.median(x["cpu_pct"]["director-a"] for x in d)
            cpu_b = statistics.median(x["cpu_pct"]["director-b"] for x in d)
            tgt = res = ""
            if daemon == "ours":
                tgt = "0 false failovers, worst gap <= 2 x keepalived's (worst trial)"
                ok = ff == 0 and bool(ka) and max(worst) <= 2 * max(ka) and not errors
                res = "met" if ok else "**MISSED**"
            lines.append(f"| {variant} | {daemon} | {len(ts)} | {ff} | {fmt(statistics.median(worst))} / "
                         f"{fmt(max(worst))} | {sum(x['gaps_over_master_down'] for x in d)} | "
                         f"{sum(x['gaps_over_2x_interval'] for x in d)} | {fmt(cpu_m)} / {fmt(cpu_b)} | "
                         f"{fmt(sum(x.get('steal_ms', 0.0) for x in d))} / "
                         f"{fmt(sum(x.get('steal_in_worst_gap_ms') or 0.0 for x in d))} | "
                         f"{', '.join(pol)} | {tgt} | {res} |")
    return lines


def table_isolation(trials: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| variant | daemon | trials | false failovers (total) | worst master-advert gap ms (median / max) | "
             "target gap ms | gaps > target (total) | gaps > master-down (total) | CPU % master / backup "
             "(median) | scrapes ok / turned away / failed (total) | control answered / turned away (total) | "
             "reloads done | target (ours) | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fig, variant), by_daemon in group(trials).items():
        if fig != "isolation":
            continue
        for daemon in ("ours", "keepalived"):
            ts = [t for t in by_daemon.get(daemon, []) if t["value_ms"] is not None]
            errors = [t for t in by_daemon.get(daemon, []) if t["value_ms"] is None]
            if not ts:
                if errors:
                    lines.append(f"| {variant} | {daemon} | 0 | - | - | - | - | - | - | - | - | - | | "
                                 f"{errors[0]['note']} |")
                continue
            d = [t["details"] for t in ts]
            worst = [t["value_ms"] for t in ts]
            ff = sum(x["false_failovers"] for x in d)
            over = sum(x["gaps_over_target"] for x in d)
            sc: dict[str, int] = {}
            ctl: dict[str, int] = {}
            for x in d:
                for k, v in ((x.get("load") or {}).get("scrapes") or {}).items():
                    sc[k] = sc.get(k, 0) + v
                for k, v in ((x.get("load") or {}).get("control") or {}).items():
                    ctl[k] = ctl.get(k, 0) + v
            load = (f"{sc.get('ok', 0):,} / {sc.get('closed', 0):,} / "
                    f"{sc.get('error', 0) + sc.get('timeout', 0) + sc.get('other', 0):,}") if sc else "-"
            ctl_s = f"{ctl.get('answered', 0):,} / {ctl.get('closed', 0) + ctl.get('refused', 0):,}" if ctl else "-"
            rb = f"{sum(x.get('reloads_done') or 0 for x in d)}" if daemon == "ours" else "-"
            tgt = res = ""
            if daemon == "ours":
                tgt = "no gap > target, 0 false failovers (10-minute trials)"
                res = "met" if ff == 0 and over == 0 and not errors else "**MISSED**"
            lines.append(f"| {variant} | {daemon} | {len(ts)} | {ff} | {fmt(statistics.median(worst))} / "
                         f"{fmt(max(worst))} | {fmt(d[0]['target_gap_ms'])} | {over} | "
                         f"{sum(x['gaps_over_master_down'] for x in d)} | "
                         f"{fmt(statistics.median(x['cpu_pct']['director-a'] for x in d))} / "
                         f"{fmt(statistics.median(x['cpu_pct']['director-b'] for x in d))} | {load} | {ctl_s} | "
                         f"{rb} | {tgt} | {res} |")
    return lines


def _or_not_run(lines: list[str]) -> list[str]:
    """A table with no row (its figure was not run) says so instead."""
    return lines if len(lines) > 2 else ["(not run)"]


def markdown(trials: Sequence[dict[str, Any]], machine: dict[str, str], plots: Sequence[str],
             command: str) -> str:
    out = ["# vipless-failover vs keepalived: bench results", "",
           f"Generated by `{command}`. Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
           f"kernel {machine.get('kernel', '?')}; keepalived {machine.get('keepalived', '?')}; "
           f"Python {machine.get('python', '?')}; started {machine.get('started', '?')}, "
           f"took {machine.get('duration_min', '?')} min."
           + (f" Merged (`--merge`): {machine['merged']}." if machine.get("merged") else "")
           + " Trials interleave the daemons (ours, keepalived, ours ...). "
           "A crash is `kill -9` of the master's processes plus its LAN link down (bridge port down), "
           "for both daemons alike. The client probes one VIP over UDP every 5 ms; outage = longest run of "
           "unanswered probes after the event. See docs/bench.md for the method.", "",
           "## Client-visible outage: crash failover and graceful hand-over", "",
           *_or_not_run(table_times(trials, ("crash", "graceful"))), "",
           "## Crash: reaction after the master-down timer", "",
           "The crash's phase is stratified and paired: the bench watches the LAN from the router "
           "(AF_PACKET, kernel receive timestamps), waits for a master advert and crashes the master at "
           "interval x (i + 0.5) / n after the next one, the same phase for both daemons in trial i. "
           "Phase achieved = the crash - the master's last advert on the wire before it. Reaction = the "
           "backup's first announcement on the wire (gratuitous ARP or unsolicited NA) - (that last advert "
           "+ the master-down interval, 3 x interval + (256 - 100) x interval / 256, RFC 5798; keepalived "
           "computes the same): what each daemon adds to VRRP's own timing.", "",
           *table_reaction(trials), "",
           "## Takeover at scale: backup's decision to router has the new MAC", "",
           "per-vip: every VIP's neighbour entry on the router carries the new master's MAC; next-hop: the "
           "router's entry for the floating next hop 192.0.2.100 does. 1 VIP is IPv4, 1,024 and more are "
           "IPv6 from 2001:db8:100::1:0 on. Decision: ours from its log (transition to MASTER), keepalived "
           "from the kernel (its first VIP address added on the backup).", "",
           *_or_not_run(table_times(trials, ("scale",))), "",
           "## Kernel flip: decision to delivery in the kernel", "",
           "Measured from outside, in the scale figure's trials, by a netlink listener opened in the new "
           "master's namespace before the crash. Ours: from its decision (the transition to MASTER in its "
           "log) to the last of its delivery rules (rule protocol and table of its config; as many as the "
           "config declares: 2 in the lab, one IPv4 and one IPv6 `to` rule) added in the kernel, whatever "
           "the number of VIPs. keepalived: from its first to its last address added (every VIP in per-vip "
           "mode, the floating next hop in next-hop mode): its way of taking over delivery.", "",
           *table_flip(trials), "",
           "## Cost at rest (100 ms adverts, idle)", "", *_or_not_run(table_cost(trials)), "",
           "## Flood: forged adverts at 10,000/s for 10 s against the backup", "",
           "Ours: our wire format with a wrong key (to the election group, from the router's LAN address). "
           "keepalived: VRRPv3 with a VRID it does not run (VRRPv3 has no authentication, so a forged "
           "advert with the right VRID cannot be rejected at all).", "",
           *_or_not_run(table_flood(trials)), "",
           "## Without real-time priority: short adverts under CPU load", "",
           "Both daemons at SCHED_OTHER (policies read from the kernel, below), one busy loop per core at "
           "normal priority for the whole window. The router records every advert on the LAN with kernel "
           "receive timestamps; a false failover is the backup entering MASTER during the window. Steal is "
           "the time the hypervisor ran something else while this machine's vCPUs had work (/proc/stat), "
           "over the windows and within each trial's worst gap: a gap full of steal is the machine's, not "
           "the daemon's.", "",
           *_or_not_run(table_no_rt(trials)), "",
           "## Isolation: the master's adverts under everything else at once (issue 13)", "",
           "Both daemons at SCHED_RR 10 (ours as its unit runs it, keepalived's VRRP process by "
           "`vrrp_rt_priority 10`), one busy loop per core at normal priority for the whole window. On our "
           "master at the same time: 500 concurrent metrics scrapes every second, 200 control clients asking "
           "`status` every second (64 are served at once), and every 5 s its IPv4 delivery rule deleted "
           "behind its back and a SIGHUP `reload` that rebuilds its 65,536 per-VIP announcements, which it also "
           "re-sends in full every 5 s (`announce.refresh_interval_s`). keepalived has no such doors; it runs its "
           "3 VIPs under the hog alone. No health checks yet "
           "(issue 15). The router records every advert with kernel receive timestamps.", "",
           *_or_not_run(table_isolation(trials)), "",
           "## Soak: memory at rest over time (100 ms adverts, idle, 2 VIPs)", "",
           "Both daemons run idle side by side, each pair in its own lab; the RSS of each master and backup "
           "(keepalived: parent + VRRP child) is sampled at a fixed interval. Growth = least-squares slope over "
           "the second half of the run (the first half is warm-up), projected linearly to show where a month "
           "of it would lead.", "",
           *_or_not_run(table_soak(trials)), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plots(trials: Sequence[dict[str, Any]], outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    g = group(trials)
    outage = [(k, v) for k, v in g.items() if k[0] in ("crash", "graceful")]
    if outage:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        labels, data, colors = [], [], []
        for (f, variant), by in outage:
            for daemon, color in (("ours", "tab:blue"), ("keepalived", "tab:orange")):
                vals = [t["value_ms"] for t in by.get(daemon, []) if t["value_ms"] is not None]
                if by.get(daemon):
                    labels.append(f"{f}\n{variant}\n{daemon}")
                    data.append(vals or [math.nan])
                    colors.append(color)
        bp = ax.boxplot(data, patch_artist=True, showfliers=True)
        for patch, c in zip(bp["boxes"], colors, strict=True):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        for i, vals in enumerate(data, 1):
            ax.plot([i] * len(vals), vals, "k.", alpha=0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_ylabel("client-visible outage (ms)")
        ax.set_title("Outage per trial (5 ms probing)")
        ax.grid(axis="y", alpha=0.3)
        made.append(_save(fig, outdir / "outage.png"))
    scale = [(k, v) for k, v in g.items() if k[0] == "scale"]
    if scale:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[tuple[str, str], list[tuple[int, list[float], int]]] = defaultdict(list)
        for (_, variant), by in scale:
            mode, n = variant.split(", ")
            for daemon, ts in by.items():
                vals = [t["value_ms"] for t in ts if t["value_ms"] is not None]
                series[(daemon, mode)].append((int(n.split()[0]), vals, sum(1 for t in ts if t["bound_hit"])))
        styles = {("ours", "per-vip"): ("tab:blue", "o-"), ("ours", "next-hop"): ("tab:blue", "s--"),
                  ("keepalived", "per-vip"): ("tab:orange", "o-"), ("keepalived", "next-hop"): ("tab:orange", "s--")}
        for key, pts in series.items():
            pts.sort()
            xs = [n for n, v, _ in pts if v]
            ys = [statistics.median(v) for n, v, _ in pts if v]
            color, style = styles.get(key, ("k", "o-"))
            ax.plot(xs, [max(y, 0.01) for y in ys], style, color=color, label=f"{key[0]} {key[1]} (median)")
            hits = [n for n, v, h in pts if h and not v]
            if hits:
                ax.plot(hits, [3e4] * len(hits), "x", color=color, markersize=10,
                        label=f"{key[0]} {key[1]}: time bound hit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("VIPs")
        ax.set_ylabel("decision -> router learned (ms)")
        ax.set_title("Takeover time vs number of VIPs")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        made.append(_save(fig, outdir / "takeover_vs_vips.png"))
    soak = [t for t in trials if t["figure"] == "soak" and (t.get("details") or {}).get("series")]
    if soak:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colors = {"ours": "tab:blue", "keepalived": "tab:orange"}
        for t in soak:
            ser = t["details"]["series"]
            role = t["variant"].split(",")[0]
            ax.plot([x / 60 for x, _ in ser], [v - ser[0][1] for _, v in ser], "-" if role == "master" else "--",
                    color=colors.get(t["daemon"], "k"),
                    label=f"{t['daemon']} {role} (from {ser[0][1] / 1024:.1f} MB)")
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS growth since the first sample (kB)")
        ax.set_title("Soak: RSS of idle daemons (100 ms adverts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        made.append(_save(fig, outdir / "soak_rss.png"))
    return made
