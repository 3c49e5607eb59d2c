"""Network namespaces: run a block of code with this thread inside a named one.

Sockets keep the namespace they were created in, so a socket opened inside
:func:`in_netns` serves that namespace for its whole life. This is how the daemon's
own raw sockets (netlink, AF_PACKET) reach a lab namespace without forking (pyroute2's
``netns=`` sockets fork a helper).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")
        try:
            yield
        finally:
            if libc.setns(saved, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(target)
        os.close(saved)
