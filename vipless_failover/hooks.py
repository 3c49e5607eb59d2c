"""Notify hooks: commands run on every state transition.

Each configured command is an argv list (never run through a shell). On a transition it
is run as ``argv... NEW_STATE OLD_STATE REASON NODE`` with the same four values in its
environment (``VIPLESS_NEW_STATE``, ``VIPLESS_OLD_STATE``, ``VIPLESS_REASON``,
``VIPLESS_NODE``, plus ``VIPLESS_CLUSTER_ID``). The rest of the environment is the
daemon's, without any ``VIPLESS_*`` variable it inherited: that prefix belongs to this
interface, so a hook never reads a stale or foreign value under one of its names.

Hooks never block the election: :meth:`NotifyHooks.transition` only queues the call and
returns. One task per command runs its calls in order (a hook sees transitions in the
order they happened), each bounded by ``timeout_ms``: a command still running then is
killed with its whole process group. Failures (non-zero exit, timeout, cannot start) are
logged (event ``notify_failed``) and counted by result. If a command falls behind by
more than :data:`QUEUE_MAX` transitions the oldest queued calls are dropped and counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .aio import cancel_and_wait, within
from .config import NotifyConfig
from .telemetry import NotifyCounters, NotifyResult

QUEUE_MAX = 64
ENV_PREFIX = "VIPLESS_"  # the hook interface's own variables


@dataclass(frozen=True)
class Call:
    new: str
    old: str
    reason: str
    node: str
    cluster_id: int
    queued_at: float

    def argv(self, command: Sequence[str]) -> list[str]:
        return [*command, self.new, self.old, self.reason, self.node]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update({"VIPLESS_NEW_STATE": self.new, "VIPLESS_OLD_STATE": self.old,
                    "VIPLESS_REASON": self.reason, "VIPLESS_NODE": self.node,
                    "VIPLESS_CLUSTER_ID": str(self.cluster_id)})
        return env


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def run_command(argv: Sequence[str], env: dict[str, str] | None, timeout: float) -> tuple[NotifyResult, str]:
    """Run one command to completion or timeout. Returns (result, detail): result is
    ok | failed (non-zero exit) | timeout (killed) | error (could not start)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        return NotifyResult.ERROR, f"{argv[0]}: {exc.strerror or exc}"
    try:
        _, err = await within(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return NotifyResult.TIMEOUT, f"killed after {timeout:g} s"
    except asyncio.CancelledError:
        _kill_group(proc)
        await proc.wait()
        raise
    if proc.returncode == 0:
        return NotifyResult.OK, ""
    tail = (err or b"").decode(errors="replace").strip()[-300:]
    return NotifyResult.FAILED, f"exit {proc.returncode}" + (f": {tail}" if tail else "")


class NotifyHooks:
    def __init__(self, cfg: NotifyConfig, node: str, cluster_id: int, log: Any):
        self.cfg = cfg
        self.node = node
        self.cluster_id = cluster_id
        self.log = log
        self.results: Counter[NotifyResult] = Counter(dict.fromkeys(NotifyResult, 0))
        self.last: dict[str, Any] | None = None
        self._queues: list[asyncio.Queue[Call]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for i, command in enumerate(self.cfg.commands):
            q: asyncio.Queue[Call] = asyncio.Queue()
            self._queues.append(q)
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._runner(tuple(command), q), name=f"notify-{i}"))

    async def reconfigure(self, cfg: NotifyConfig) -> None:
        if cfg == self.cfg:
            return
        await self.close(grace=self.cfg.timeout_ms / 1000.0)
        self.cfg = cfg
        self.start()

    def transition(self, new: str, old: str, reason: str) -> None:
        """Queue a call of every command; returns at once."""
        call = Call(new=new, old=old, reason=reason, node=self.node, cluster_id=self.cluster_id,
                    queued_at=time.monotonic())
        for q in self._queues:
            while q.qsize() >= QUEUE_MAX:
                q.get_nowait()
                q.task_done()
                self.results[NotifyResult.DROPPED] += 1
                self.log.warning("notify_dropped", reason="queue full", queued=QUEUE_MAX)
            q.put_nowait(call)

    async def _runner(self, command: tuple[str, ...], q: asyncio.Queue[Call]) -> None:
        timeout = self.cfg.timeout_ms / 1000.0
        while True:
            call = await q.get()
            t0 = time.monotonic()
            try:
                result, detail = await run_command(call.argv(command), call.env(), timeout)
            finally:
                q.task_done()
            self.results[result] += 1
            took = round(time.monotonic() - t0, 3)
            self.last = {"command": command[0], "to": call.new, "result": result.value, "detail": detail,
                         "duration_s": took, "at": time.time()}
            if result is NotifyResult.OK:
                self.log.info("notify", command=command[0], to=call.new, result=result, duration_s=took)
            else:
                self.log.warning("notify_failed", command=command[0], to=call.new, result=result,
                                 detail=detail, duration_s=took)

    def counters(self) -> NotifyCounters:
        """For status and metrics: calls by result."""
        return NotifyCounters(results=self.results)

    def status(self) -> dict[str, Any]:
        return {"commands": [list(c) for c in self.cfg.commands], "timeout_ms": self.cfg.timeout_ms,
                **self.counters().as_dict(), "pending": sum(q.qsize() for q in self._queues),
                "last": self.last}

    async def close(self, grace: float = 0.0) -> None:
        """Let queued calls finish for up to ``grace`` seconds (the transitions of a
        graceful stop are reported too), then cancel and kill whatever still runs."""
        if grace > 0 and self._queues:
            try:
                await within(asyncio.gather(*(q.join() for q in self._queues)), grace)
            except TimeoutError:
                pass
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        self._queues.clear()
