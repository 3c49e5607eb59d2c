"""Tracking: rise/fall counting, effective priority, and check commands run for real
(interfaces are tested in the lab: tests/lab/test_operations_lab.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hypothesis import given, strategies as st

from vipless_failover.config import TrackCheck, TrackConfig
from vipless_failover.tracking import FAILED, OK, UNKNOWN, CheckState, Tracker, effective_priority


class NullLog:
    def __getattr__(self, level):
        return lambda *a, **kw: None


def test_first_result_decides_then_fall_and_rise_count_consecutive_results():
    c = CheckState(rise=2, fall=3)
    assert c.state == UNKNOWN
    assert c.record(True) and c.state == OK
    assert not c.record(False) and not c.record(False)
    assert c.record(True) is False  # the run of failures is broken
    assert [c.record(False) for _ in range(3)] == [False, False, True]
    assert c.state == FAILED
    assert not c.record(True)
    assert not c.record(False)  # broken again
    assert [c.record(True) for _ in range(2)] == [False, True]
    assert c.state == OK


def test_first_failure_decides_at_once():
    c = CheckState(rise=5, fall=5)
    assert c.record(False) and c.state == FAILED


@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.booleans(), max_size=60))
def test_state_only_changes_after_rise_or_fall_equal_results(rise, fall, results):
    c = CheckState(rise=rise, fall=fall)
    history: list[bool] = []
    for ok in results:
        before = c.state
        changed = c.record(ok)
        history.append(ok)
        assert changed == (c.state != before)
        if changed and before != UNKNOWN:
            need = rise if ok else fall
            assert len(history) >= need and all(h == ok for h in history[-need:])


def test_effective_priority_is_lowered_by_failed_weights_and_bounded():
    assert effective_priority(150, []) == 150
    assert effective_priority(150, [20, 30]) == 100
    assert effective_priority(10, [50]) == 1
    assert effective_priority(254, []) == 254


async def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_check_commands_drive_faults_and_weights(tmp_path: Path):
    flag = tmp_path / "healthy"
    flag.write_text("")
    checks = (
        TrackCheck(name="web", command=("/usr/bin/test", "-e", str(flag)), interval_ms=50, timeout_ms=50,
                   rise=2, fall=2, weight=0),
        TrackCheck(name="db", command=("/usr/bin/test", "-e", str(flag)), interval_ms=50, timeout_ms=50,
                   weight=40),
    )
    changes: list[tuple[set[str], int]] = []
    tracker: Tracker | None = None

    def on_change():
        changes.append((tracker.faults(), tracker.effective_priority(150)))

    tracker = Tracker(TrackConfig(checks=checks), on_change, NullLog())
    await tracker.start()
    try:
        await wait_until(lambda: all(it.state == OK for it in tracker.items.values()))
        assert tracker.faults() == set() and tracker.effective_priority(150) == 150
        t0 = time.monotonic()
        flag.unlink()
        await wait_until(lambda: tracker.items["check:web"].failed)
        # fall=2 at 50 ms: at least one interval, well under a second
        assert 0.04 <= time.monotonic() - t0 < 1.0
        assert tracker.faults() == {"check:web"}
        assert tracker.effective_priority(150) == 110
        flag.write_text("")
        await wait_until(lambda: not tracker.items["check:web"].failed and not tracker.items["check:db"].failed)
        assert tracker.faults() == set() and tracker.effective_priority(150) == 150
    finally:
        await tracker.close()
    assert changes[-1] == (set(), 150)
    assert ({"check:web"}, 110) in changes
    st = {s["name"]: s for s in tracker.status()}
    assert st["check:web"]["effect"] == "fault" and st["check:db"]["effect"] == "priority -40"
    assert st["check:web"]["results"]["failed"] >= 2


async def test_a_check_that_hangs_is_a_failure_and_is_killed(tmp_path: Path):
    check = TrackCheck(name="slow", command=("/bin/sleep", "10"), interval_ms=200, timeout_ms=100)
    tracker = Tracker(TrackConfig(checks=(check,)), lambda: None, NullLog())
    t0 = time.monotonic()
    await tracker.start()
    try:
        await wait_until(lambda: tracker.items["check:slow"].failed, timeout=2)
        assert time.monotonic() - t0 < 0.5
        item = tracker.items["check:slow"]
        assert item.results["timeout"] == 1 and "killed" in item.detail
    finally:
        await tracker.close()
