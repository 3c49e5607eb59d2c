"""The reconciler's runner loop ends when cancelled, even when its trigger is set in
the same loop iteration (Python 3.11's asyncio.wait_for swallowed that cancellation,
and a stopping daemon waited for the runner forever). Pure asyncio; no root."""

from __future__ import annotations

import asyncio

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
