"""The election in a process of its own (election/process.py), on the real kernel.

* a director held off the CPU (SIGSTOP of its PID alone: a reload of 65,536 VIPs, a
  burst of scrapes, a long garbage collection look the same to the election) delays
  no advert: the backup keeps hearing the master and never takes over;
* the election process dying takes the director down (exit 1, logged), and the peer
  takes over; the director dying takes the election process with it (no election
  advertising for a director that is gone);
* status names the election process, and under the unit's real-time priority the
  election runs above the director.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from netnslab.daemons import Cluster, children, event_time

pytestmark = pytest.mark.lab

A, B = "director-a", "director-b"
CONVERGE_S = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(cond: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def test_a_stalled_director_delays_no_advert(pair: Cluster) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    assert a.pid is not None and len(a.pids) == 2, a.pids
    t0 = time.time()
    ages: list[float] = []
    os.kill(a.pid, signal.SIGSTOP)  # the director only: its election process runs on
    try:
        end = time.monotonic() + 2.0  # ~6 master-down intervals (100 ms adverts)
        while time.monotonic() < end:
            st = b.status_now()
            assert st is not None
            ages.append(st["peers"][0]["last_seen_s"])
            time.sleep(0.05)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert len(ages) >= 10 and max(ages) < 0.35, ages
    assert not [e for e in b.transitions() if e.get("to") == "MASTER" and event_time(e) >= t0]
    st = a.status_now()
    assert st is not None and st["state"] == "MASTER" and not [
        e for e in a.transitions() if event_time(e) >= t0]


def test_the_election_process_dying_takes_the_director_down(pair: Cluster) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    assert a.pid is not None
    (election,) = children(a.pid)
    t0 = time.time()
    os.kill(election, signal.SIGKILL)
    assert a.wait_exit(5) == 1
    gone = [e for e in a.events(current_run=True) if e.get("event") == "election_process_exited"]
    assert gone and gone[0]["pid"] == election, a.log_text()[-2000:]
    b.wait_transition("MASTER", 3.0, after=t0)


def test_a_crashed_director_leaves_no_election_behind(pair: Cluster) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    assert a.pid is not None
    (election,) = children(a.pid)
    t0 = time.time()
    os.kill(a.pid, signal.SIGKILL)  # the director alone
    a.wait_exit(5)
    _wait(lambda: not _alive(election), 2.0, "the election process gone with its director")
    b.wait_transition("MASTER", 3.0, after=t0)


def test_status_names_the_election_process_which_runs_above_the_director(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(start=False)
    a = cluster[A]
    a.command_prefix = ["chrt", "-r", "10"]  # as the unit schedules it
    cluster.start()
    cluster.wait_converged(CONVERGE_S, A)
    st = a.status_now()
    assert st is not None and a.pid is not None
    assert st["pid"] == a.pid and st["election"]["pid"] == children(a.pid)[0]
    assert st["scheduling"]["policy"] == "SCHED_RR" and st["scheduling"]["priority"] == 10
    director = st["election"]["director_scheduling"]
    assert director["policy"] == "SCHED_RR" and director["priority"] == 5
    assert 0 <= st["election"]["snapshot_age_s"] < 0.1
    # the master's own view of its advert schedule (100 ms adverts, RT 10, an idle lab)
    assert 100 <= st["election"]["worst_master_gap_ms"] < 150, st["election"]
