"""Issue 19: a daemon knows whether it runs at real-time priority, and says so when its
adverts are short enough to need it (log event ``no_realtime``, ``failoverctl
status``, ``vipless_failover_scheduling_at_risk``). The policy is the kernel's: one
director runs as the unit runs it (``chrt -r 10``), the other at normal priority."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster
from netnslab.scenarios import DAEMON_RT
from vipless_failover.sched import RT_ADVISED_BELOW_MS

sys.path.insert(0, str(Path(__file__).parent))
from test_operations_lab import METRICS, metric, scrape

pytestmark = pytest.mark.lab

A, B = "director-a", "director-b"


@pytest.mark.parametrize("interval_ms", [10, RT_ADVISED_BELOW_MS])
def test_short_adverts_without_real_time_priority_are_reported(make_cluster: Callable[..., Cluster],
                                                               interval_ms: int) -> None:
    cluster = make_cluster(start=False,
                           a=NodeSettings(priority=150, advert_interval_ms=interval_ms, metrics_listen=METRICS),
                           b=NodeSettings(priority=100, advert_interval_ms=interval_ms, metrics_listen=METRICS))
    a, b = cluster[A], cluster[B]
    a.command_prefix = list(DAEMON_RT)  # as the unit runs it; b at normal priority
    cluster.start()
    cluster.wait_converged(10.0, A)
    at_risk = interval_ms < RT_ADVISED_BELOW_MS
    sa, sb = (a.status() or {})["scheduling"], (b.status() or {})["scheduling"]
    assert sa == {"policy": "SCHED_RR", "priority": 10, "realtime": True, "at_risk": False,
                  "advised_below_ms": RT_ADVISED_BELOW_MS}
    assert sb == {"policy": "SCHED_OTHER", "priority": 0, "realtime": False, "at_risk": at_risk,
                  "advised_below_ms": RT_ADVISED_BELOW_MS}
    warned = {d.tag: [e for e in d.events(current_run=True) if e.get("event") == "no_realtime"] for d in (a, b)}
    assert warned[A] == []
    if at_risk:
        (ev,) = warned[B]
        assert ev["level"] == "warning" and ev["policy"] == "SCHED_OTHER" and ev["interval_ms"] == interval_ms
        assert "chrt" in ev["advice"]
    else:
        assert warned[B] == []
    assert metric(scrape(a), "vipless_failover_scheduling_realtime") == 1
    assert metric(scrape(a), "vipless_failover_scheduling_at_risk") == 0
    assert metric(scrape(b), "vipless_failover_scheduling_realtime") == 0
    assert metric(scrape(b), "vipless_failover_scheduling_at_risk") == float(at_risk)
    text = b.ctl("status").stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("scheduling"))
    assert ("not real-time" in line) == at_risk, line
