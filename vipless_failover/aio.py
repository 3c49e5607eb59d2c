"""Small asyncio helpers shared by the daemon's parts."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Iterable, TypeVar

T = TypeVar("T")


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel the tasks and wait until each has ended; what they raise is not ours
    to handle any more (they were being shut down)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass


async def within(aw: Awaitable[T], timeout: float) -> T:
    """``asyncio.wait_for`` without Python 3.11's lost cancellation: there, a cancel that
    arrives as the awaited thing completes is swallowed (the result is returned), and a
    task being shut down runs on. Raises TimeoutError (= asyncio.TimeoutError)."""
    async with asyncio.timeout(timeout):
        return await aw
