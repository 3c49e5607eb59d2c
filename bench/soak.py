"""The soak of the bench: memory of an idle pair over a long run (the "RSS < 60 MB at
rest" target holds over time, not only in the cost figure's 20 s windows). Both daemons'
:class:`~bench.cost.CostSession` side by side, RSS sampled; the value is the growth over
the second half of the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .cost import CostSession
from .scenarios import A, B, Trial, _cpu_s, _rss_mb

SOAK_PROJECTION_DAYS = 30
SOAK_RSS_TARGET_MB = 60.0


def slope_kb_per_min(series: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, kB)`` samples, in kB per minute."""
    if len(series) < 2:
        return None
    n = len(series)
    mt = sum(t for t, _ in series) / n
    mv = sum(v for _, v in series) / n
    den = sum((t - mt) ** 2 for t, _ in series)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in series) / den * 60


def soak(sessions: dict[str, CostSession], minutes: float, sample_s: float) -> list[Trial]:
    """Sample the RSS of every session's master and backup every ``sample_s`` for
    ``minutes``, all sessions side by side (both daemons idle at once). One trial per
    daemon and role: value = RSS growth over the second half of the run, kB/min
    (least squares; the first half is warm-up), with the whole series and the CPU
    share over the run in its details."""
    roles: dict[str, dict[str, str]] = {}
    pids: dict[str, dict[str, list[int]]] = {}
    for kind, ses in sessions.items():
        if ses.error:
            continue
        master = ses.pair.master() or A
        roles[kind] = {"master": master, "backup": B if master == A else A}
        pids[kind] = {r: ses.pair.pids(d) for r, d in roles[kind].items()}
    series: dict[tuple[str, str], list[tuple[float, float]]] = {
        (k, r): [] for k in pids for r in pids[k]}
    c0 = {(k, r): _cpu_s(p) for k in pids for r, p in pids[k].items()}
    t0 = time.monotonic()
    end = t0 + minutes * 60
    while True:
        now = time.monotonic()
        for (k, r) in series:
            series[(k, r)].append((round(now - t0, 1), _rss_mb(pids[k][r]) * 1024))
        if now >= end:
            break
        time.sleep(max(0.0, min(sample_s, end - time.monotonic())))
    dt = time.monotonic() - t0
    out = []
    for kind, ses in sessions.items():
        if kind not in pids:
            out += [Trial("soak", f"{r}, {ses.variant}", kind, 0, None, bound_hit=True, note=ses.error)
                    for r in ("master", "backup")]
            continue
        for r, p in pids[kind].items():
            ser = series[(kind, r)]
            half = [x for x in ser if x[0] >= dt / 2]
            slope = slope_kb_per_min(half)
            rss = [v for _, v in ser]
            end_mb = rss[-1] / 1024
            proj = end_mb + max(0.0, slope or 0.0) * 60 * 24 * SOAK_PROJECTION_DAYS / 1024
            state = ses.pair.state(roles[kind][r])
            out.append(Trial(
                "soak", f"{r}, {ses.variant}", kind, 0, None if slope is None else round(slope, 3),
                note="" if state == r.upper() else f"role changed: {r} is now {state}",
                details={"minutes": round(dt / 60, 1), "sample_s": sample_s,
                         "rss_start_mb": round(rss[0] / 1024, 2), "rss_end_mb": round(end_mb, 2),
                         "rss_max_mb": round(max(rss) / 1024, 2),
                         "growth_second_half_kb_per_min": None if slope is None else round(slope, 3),
                         f"projected_mb_{SOAK_PROJECTION_DAYS}d": round(proj, 1),
                         "core_pct": round((_cpu_s(p) - c0[(kind, r)]) / dt * 100, 3),
                         "state": state, "series": ser}))
    return out
