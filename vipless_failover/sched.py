"""Whether the daemon runs at real-time priority, and whether its adverts need it.

The systemd unit runs the daemon at ``SCHED_RR`` (priority 10). At normal priority
(``SCHED_OTHER``: the daemon started by hand, in a container without
``CAP_SYS_NICE``, or with the unit's scheduling lines removed) a CPU kept busy by
other processes, or a hypervisor that runs something else on the machine's vCPUs, can
hold the daemon off the CPU. The bench's ``no-rt`` figure (10 ms adverts, a busy loop
per core) measured worst master-advert gaps of 17-33 ms on a quiet machine, and
138-330 ms in runs where other load or the hypervisor's steal came on top (keepalived
at normal priority: 16 ms, and 61-99 ms with false failovers too). The peers' master-down interval is 3 x the
interval + skew: at 10 ms adverts ~36 ms, at 100 ms ~340 ms. Below
:data:`RT_ADVISED_BELOW_MS` a stall of that size makes a false failover.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: at advert intervals below this (ms) a daemon without real-time priority is at risk
#: of false failovers when the CPU is busy (see the module docstring)
RT_ADVISED_BELOW_MS = 100

POLICY_NAMES = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR",
                os.SCHED_BATCH: "SCHED_BATCH", os.SCHED_IDLE: "SCHED_IDLE"}
REALTIME = ("SCHED_FIFO", "SCHED_RR")
ADVICE = ("run it as the systemd unit does (CPUSchedulingPolicy=rr, CPUSchedulingPriority=10), "
          "or under `chrt -r 10`; in a container grant CAP_SYS_NICE")


@dataclass(frozen=True)
class Scheduling:
    policy: str  # SCHED_OTHER, SCHED_RR, ...
    priority: int  # the real-time priority (0 for the normal policies)

    @property
    def realtime(self) -> bool:
        return self.policy in REALTIME

    def at_risk(self, advert_interval_ms: int) -> bool:
        """Whether adverts this short need real-time priority that the process lacks."""
        return not self.realtime and advert_interval_ms < RT_ADVISED_BELOW_MS

    def describe(self, advert_interval_ms: int) -> dict[str, object]:
        return {"policy": self.policy, "priority": self.priority, "realtime": self.realtime,
                "at_risk": self.at_risk(advert_interval_ms), "advised_below_ms": RT_ADVISED_BELOW_MS}


#: the flag the kernel ORs into the policy it reports for a process whose children start
#: at normal priority (``chrt -R``, systemd's ``CPUSchedulingResetOnFork=yes``; keepalived
#: sets it on its VRRP process); its policy is the rest
RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)


def from_kernel(policy: int, priority: int) -> Scheduling:
    """What ``sched_getscheduler``/``sched_getparam`` report, named (reset-on-fork aside)."""
    policy &= ~RESET_ON_FORK
    return Scheduling(POLICY_NAMES.get(policy, f"policy {policy}"), priority)


def current(pid: int = 0) -> Scheduling:
    """The scheduling policy of ``pid`` (0: this process), from the kernel."""
    return from_kernel(os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority)
