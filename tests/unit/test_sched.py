"""sched: the scheduling policy as the kernel reports it, and when short adverts need
real-time priority."""

from __future__ import annotations

import os

from vipless_failover import sched
from vipless_failover.sched import RT_ADVISED_BELOW_MS, Scheduling


def test_this_process_as_the_kernel_reports_it() -> None:
    s = sched.current()
    assert s.policy == sched.POLICY_NAMES[os.sched_getscheduler(0)]
    assert s.priority == os.sched_getparam(0).sched_priority
    assert s.realtime == (os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR))


def test_short_adverts_without_real_time_are_at_risk() -> None:
    other, rr, fifo = Scheduling("SCHED_OTHER", 0), Scheduling("SCHED_RR", 10), Scheduling("SCHED_FIFO", 1)
    assert other.at_risk(10) and other.at_risk(RT_ADVISED_BELOW_MS - 1)
    assert not other.at_risk(RT_ADVISED_BELOW_MS) and not other.at_risk(1000)
    assert not rr.at_risk(10) and not fifo.at_risk(10)
    assert Scheduling("SCHED_BATCH", 0).at_risk(10) and Scheduling("SCHED_IDLE", 0).at_risk(10)
    assert other.describe(10) == {"policy": "SCHED_OTHER", "priority": 0, "realtime": False, "at_risk": True,
                                  "advised_below_ms": RT_ADVISED_BELOW_MS}
    assert rr.describe(10)["realtime"] is True and rr.describe(10)["at_risk"] is False



def test_reset_on_fork_is_not_mistaken_for_another_policy() -> None:
    """chrt -R / CPUSchedulingResetOnFork=yes: the kernel ORs SCHED_RESET_ON_FORK into the
    policy it reports (keepalived's VRRP process reads 0x40000002); still SCHED_RR, still
    real-time, no warning."""
    rr = sched.from_kernel(os.SCHED_RR | sched.RESET_ON_FORK, 10)
    assert rr == Scheduling("SCHED_RR", 10) and rr.realtime and not rr.at_risk(10)
    assert sched.from_kernel(os.SCHED_FIFO | sched.RESET_ON_FORK, 1).policy == "SCHED_FIFO"
    assert sched.from_kernel(os.SCHED_OTHER | sched.RESET_ON_FORK, 0).at_risk(10)
    assert sched.from_kernel(42, 0).policy == "policy 42"
