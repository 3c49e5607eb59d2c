"""aio.within: a timeout that never loses a cancellation (Python 3.11's wait_for does,
when the cancel arrives as the awaited thing completes). Pure asyncio; no root."""

from __future__ import annotations

import asyncio

import pytest

from vipless_failover.aio import within


async def test_cancel_arriving_as_the_inner_completes_is_not_lost() -> None:
    for _ in range(20):
        ev = asyncio.Event()
        after: list[str] = []

        async def worker() -> None:
            await within(ev.wait(), 10)
            after.append("went on")  # a lost cancel: the worker would go on here
            await asyncio.sleep(10)

        task = asyncio.create_task(worker())
        await asyncio.sleep(0.01)
        ev.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert task in done and task.cancelled()
        assert after == []


async def test_timeout_raises_timeout_error() -> None:
    with pytest.raises(asyncio.TimeoutError):
        await within(asyncio.sleep(1), 0.01)
    assert await within(asyncio.sleep(0, result=5), 1) == 5
