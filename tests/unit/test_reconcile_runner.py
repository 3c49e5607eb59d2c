"""The reconciler's runner loop: it ends when cancelled, even when its trigger is set
in the same loop iteration (Python 3.11's asyncio.wait_for swallowed that
cancellation, and a stopping daemon waited for the runner forever); it collects the
garbage of a pass at rest. Pure asyncio; no root."""

from __future__ import annotations

import asyncio
import gc
import weakref

import structlog

from vipless_failover.dataplane.reconcile import Dataplane

from .test_desired import make


async def test_runner_ends_when_cancelled_as_its_trigger_is_set() -> None:
    for _ in range(20):
        dp = Dataplane(make(), structlog.get_logger())
        dp._trigger = asyncio.Event()
        passes: list[str] = []

        async def fake_pass(cause: str, parts: tuple[str, ...]) -> bool:
            passes.append(cause)
            return True

        dp._reconcile = fake_pass  # type: ignore[method-assign]
        runner = asyncio.create_task(dp._runner())
        await asyncio.sleep(0.01)  # the runner waits for its trigger
        dp._trigger.set()  # what a flip does ...
        runner.cancel()  # ... as the daemon stops
        done, _ = await asyncio.wait({runner}, timeout=2)
        assert runner in done, "the runner did not end after cancel()"
        assert runner.cancelled()


class _Node:
    """Garbage in a reference cycle, as pyroute2's parsed messages leave after a pass."""

    def __init__(self) -> None:
        self.me = self


async def test_runner_collects_the_cycles_of_a_pass_at_rest_only() -> None:
    """After a periodic pass the runner collects garbage (the daemon froze its heap and
    at rest the collector's thresholds are reached only every few minutes, so an idle
    master's RSS crept); after a notified pass it does not (one may follow a takeover)."""
    cfg = make(dataplane={"reconcile_interval_s": 1})
    dp = Dataplane(cfg, structlog.get_logger())
    dp._trigger = asyncio.Event()
    left: dict[str, weakref.ref[_Node]] = {}
    ran: dict[str, asyncio.Event] = {"notify": asyncio.Event(), "periodic": asyncio.Event()}

    async def fake_pass(cause: str, parts: tuple[str, ...]) -> bool:
        left[cause] = weakref.ref(_Node())
        ran[cause].set()
        return True

    dp._reconcile = fake_pass  # type: ignore[method-assign]
    gc.disable()  # only the runner collects here
    runner = asyncio.create_task(dp._runner())
    try:
        dp._notified = True
        dp._trigger.set()
        async with asyncio.timeout(2):
            await ran["notify"].wait()
        await asyncio.sleep(0.05)
        assert left["notify"]() is not None, "collected after a notified pass"
        async with asyncio.timeout(3):  # the periodic pass: 1 s after the runner started
            await ran["periodic"].wait()
        await asyncio.sleep(0.05)
        assert left["periodic"]() is None, "the cycles of a periodic pass were not collected"
        assert left["notify"]() is None
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        gc.enable()
