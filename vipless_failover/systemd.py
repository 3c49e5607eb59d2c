"""systemd notification protocol (sd_notify) over a plain datagram socket.

No dependency: the daemon writes ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or
an abstract socket when it starts with ``@``). Without ``$NOTIFY_SOCKET`` (not run by
systemd, or ``Type=`` is not notify) every call is a no-op.

* ``READY=1`` once, after the first reconcile (the daemon calls :meth:`Notifier.ready`
  when its start-up is complete),
* ``STATUS=...`` with the role, on every transition,
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from a task of the daemon's event loop
  (a stuck loop stops the pings and systemd restarts the service),
* ``STOPPING=1`` at a graceful stop, ``RELOADING=1`` ... ``READY=1`` around a reload.

The environment is left as it is, so a daemon that re-executes itself in place
(``failoverctl restart``) keeps talking to the same socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent = 0
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", "")) or None
        except ValueError:
            usec = None
        pid = env.get("WATCHDOG_PID")
        if usec is not None and pid and pid.isdigit() and int(pid) != os.getpid():
            usec = None  # the watchdog is meant for another process
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC."""
        return None if not self.watchdog_usec else self.watchdog_usec / 2e6

    def notify(self, **fields: Any) -> bool:
        """Send one message, e.g. ``notify(READY=1, STATUS="MASTER")``. Never raises."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(addr)
                sock.sendall(text.encode())
        except OSError:
            self.errors += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def start_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping from the running loop every half WATCHDOG_USEC (no-op without one), while
        ``healthy()`` says so (the daemon: while the election process reports)."""
        interval = self.watchdog_interval
        if interval is None or self.address is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._watchdog(interval, healthy), name="sd-watchdog")

    async def _watchdog(self, interval: float, healthy: Callable[[], bool]) -> None:
        while True:
            if healthy():
                self.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def role_status(state: str, priority: int, effective: int, master: str | None,
                faults: list[str] | tuple[str, ...] = ()) -> str:
    """The one-line STATUS= systemctl shows."""
    text = f"{state}, priority {priority}" + (f" (effective {effective})" if effective != priority else "")
    if master and state != "MASTER":
        text += f", master {master}"
    if faults:
        text += f", faults: {', '.join(faults)}"
    return text
