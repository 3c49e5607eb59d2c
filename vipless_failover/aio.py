"""Small asyncio helpers shared by the daemon's parts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

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


def blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a short blocking pyroute2 call. pyroute2 0.9's synchronous IPRoute drives
    its own event loop, which cannot run in a thread whose loop is running: there
    the call goes to a worker thread (and this thread waits for it: milliseconds)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink") as pool:
        return pool.submit(fn, *args).result()
