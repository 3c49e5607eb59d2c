"""The director's end of the channel to the election process (daemon.py forks it).

Down: the ``Setup`` (at start and on every reload), the FSM's commands (from the
control commands, the signals and the tracking), a ``SnapshotRequest`` when a status
or a scrape wants a fresher snapshot. Up, in order (:meth:`StepRunner.receive`):
``Ready`` or ``Failed`` at start, then the ``Step`` of each decision and the
``Snapshot`` that status, the metrics and the watchdog show.

A step's actions are carried out one after another, in the callback that brought
it: the transition's logs, telemetry, hooks and systemd status, the announcer's
bursts, the flip's results for the reconciler, the notices, the answer to a control
command that waited for it (``Completed``, ``Refused``), ``Exit``. Next-hop mode's
address changes await the kernel: they continue in a task, and steps arriving
meanwhile wait behind it, so the order never changes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from .aio import within
from .config import Config
from .election import fsm, process
from .election.process import Failed, Ready, Setup, Snapshot, Step
from .election.protocol import State
from .election.trust import KeyRing
from .systemd import role_status
from .telemetry import NoticeKind, TransportCounters

if TYPE_CHECKING:
    from .daemon import Daemon

#: how long start waits for the election process to open its socket
ELECTION_READY_S = 10.0
#: a status or a scrape asks the election for a snapshot when the latest is older than
#: this (one request at a time: the election's work stays bounded whatever the clients)
FRESH_S = 0.02
#: and waits for it at most this long (then shows the latest)
FRESH_WAIT_S = 0.2
#: notices logged as warnings (the others at info)
WARNING_NOTICES = frozenset({NoticeKind.SPLIT_BRAIN, NoticeKind.CONFIG_MISMATCH, NoticeKind.AUTH_FAILED,
                             NoticeKind.CLOCK_SKEW})


def first_snapshot(cfg: Config, digest: bytes, keys: tuple[bytes, ...]) -> Snapshot:
    """What status shows before the election process has sent anything: INIT."""
    now = time.monotonic()
    return Snapshot(now, fsm.Election(fsm.Params.from_config(cfg, digest)).status(now), 0, 0, {},
                    TransportCounters(), KeyRing(keys).describe({}))


class StepRunner:
    """The channel's end for ``director`` (see the module doc). It reads the director's
    config and parts (announcer, tracker, ...) at each use: a reload may replace them."""

    def __init__(self, director: Daemon, snap: Snapshot):
        self.d = director
        self.snap = snap  # the latest the election sent
        self.queue: deque[Step | Snapshot] = deque()  # waiting while a step awaits the kernel
        self._busy = False
        self._pending: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._fresh: asyncio.Future | None = None  # a snapshot asked for
        self.waiters: list[tuple[str, asyncio.Future]] = []  # promote/demote waiting for completion
        self.history: deque[dict[str, Any]] = deque(maxlen=16)
        self.notices: Counter[NoticeKind] = Counter()
        self._track_faults: set[str] = set()  # fault items the election has been told about
        self._track_priority = director.cfg.election.priority

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.d.loop is not None, "the loop is set by run()"
        return self.d.loop

    # -- down ----------------------------------------------------------------------

    def submit(self, cmd: fsm.Command) -> None:
        election = self.d.election
        if election is not None and not election.channel.closed:
            election.channel.send(cmd)

    async def start(self) -> None:
        """Send the election process its Setup; returns once it has opened its socket."""
        election = self.d.election
        assert election is not None
        self._ready = self._loop.create_future()
        self._loop.add_reader(election.channel.fileno(), self.on_channel)
        election.channel.send(self.setup())
        try:
            await within(self._ready, ELECTION_READY_S)
        except TimeoutError:
            raise RuntimeError(f"the election process did not start within {ELECTION_READY_S:g} s") from None

    def setup(self) -> Setup:
        """What a reload may change, and what the takeover needs (at start, on every reload)."""
        d = self.d
        return Setup(d.keys, d.cfg.election.max_clock_skew_ms, d.dataplane.flip_rules, d.announcer.lead_frames())

    def track_changed(self) -> None:
        """Tell the election what tracking now says: fault items and the effective priority."""
        d = self.d
        faults = d.tracker.faults()
        for item in sorted(faults - self._track_faults):
            self.submit(fsm.SetFault(item, True))
        for item in sorted(self._track_faults - faults):
            self.submit(fsm.SetFault(item, False))
        self._track_faults = faults
        prio = d.tracker.effective_priority(d.cfg.election.priority)
        if prio != self._track_priority:
            self._track_priority = prio
            d.log.info("effective_priority", priority=prio, configured=d.cfg.election.priority)
            self.submit(fsm.SetPriority(prio))

    async def fresh_snapshot(self) -> None:
        """The election's snapshot, at most FRESH_S old (waiting at most FRESH_WAIT_S):
        the peers' last-seen ages are the election's, not the latest snapshot's."""
        election = self.d.election
        if election is None or election.channel.closed or not self.d.election_ready:
            return
        if time.monotonic() - self.snap.at < FRESH_S:
            return
        if self._fresh is None or self._fresh.done():
            self._fresh = self._loop.create_future()
            election.channel.send(process.SnapshotRequest())
        try:
            await within(asyncio.shield(self._fresh), FRESH_WAIT_S)
        except TimeoutError:
            pass

    async def wait_for(self, what: str, cmd: fsm.Command, timeout: float) -> dict[str, Any]:
        """Send ``cmd``; the answer is the election's Completed or Refused for ``what``."""
        fut = self._loop.create_future()
        self.waiters.append((what, fut))
        self.submit(cmd)
        try:
            return await within(fut, timeout)
        except TimeoutError:
            return {"ok": False, "error": f"{what} did not complete within {timeout:g} s "
                                          f"(state {self.snap.status['state']})"}

    # -- up --------------------------------------------------------------------------

    def on_channel(self) -> None:
        election = self.d.election
        assert election is not None
        chan = election.channel
        if chan.pending:
            chan.flush()
        messages = chan.receive()
        self.receive(messages or [])
        if messages is None or chan.closed:
            self._election_gone()

    def receive(self, messages: list[Any]) -> None:
        """The election's messages, in order: steps are carried out one after another."""
        for m in messages:
            match m:
                case Step() | Snapshot():  # in order: a snapshot never goes back behind a step
                    self.queue.append(m)
                case Ready():
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(m)
                case Failed(error=error):
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_exception(RuntimeError(f"election transport: {error}"))
        if self.queue and not self._busy:
            self._run_steps()

    def _election_gone(self) -> None:
        election = self.d.election
        assert election is not None
        self._loop.remove_reader(election.channel.fileno())
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError("the election process exited at start"))
            return
        self.d.election_exited()

    def stop_reading(self) -> None:
        election = self.d.election
        if election is not None and not election.channel.closed:
            self._loop.remove_reader(election.channel.fileno())

    async def stop(self) -> None:
        """At exit: the step being carried out finishes (Exit came from it); nothing
        more is carried out."""
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)
        self.queue.clear()
        self._busy = True

    # -- carrying out steps: one at a time, in order ------------------------------------

    def _run_steps(self) -> None:
        self._busy = True
        while self.queue:
            step = self.queue.popleft()
            if isinstance(step, Snapshot):
                self._set_snapshot(step)
                self._after_step()
                continue
            if step.snapshot is not None:  # what the transitions and the waiters see
                self._set_snapshot(step.snapshot)
            if self.d.nexthop is not None and any(isinstance(a, (fsm.StartAnnounce, fsm.StopAnnounce))
                                                  for a in step.actions):
                self._pending = self._loop.create_task(self._run_step_async(step), name="step")
                return  # still busy: the task carries on with the queue
            try:
                for i, action in enumerate(step.actions):
                    self._do(action, step, i)
            except Exception:  # a bug must not stop the director: log it, go on
                self.d.log.exception("internal_error")
            self._after_step()
        self._busy = False

    async def _run_step_async(self, step: Step) -> None:
        d = self.d
        try:
            for i, action in enumerate(step.actions):
                match action:
                    case fsm.StartAnnounce(reason=reason) if d.nexthop is not None:
                        try:
                            await d.nexthop.add()
                        except Exception as exc:  # noqa: BLE001 - reported; the election goes on
                            d.log.error("next_hop_error", error=str(exc))
                        d.announcer.start(reason)
                    case fsm.StopAnnounce() if d.nexthop is not None:
                        d.announcer.stop()
                        try:
                            await d.nexthop.remove()
                        except Exception as exc:  # noqa: BLE001
                            d.log.error("next_hop_error", error=str(exc))
                    case _:
                        self._do(action, step, i)
            self._after_step()
        except Exception:  # a bug must not stop the director: log it, go on
            d.log.exception("internal_error")
        finally:
            self._busy = False
            self._pending = None
        if self.queue:
            self._run_steps()

    def _set_snapshot(self, snap: Snapshot) -> None:
        self.snap = snap
        if self._fresh is not None and not self._fresh.done():
            self._fresh.set_result(None)

    def _after_step(self) -> None:
        self.d.maintenance.follow(self.snap.status)
        self.waiters = [(what, fut) for what, fut in self.waiters if not fut.done()]
        self.poll_telemetry()

    def _do(self, action: fsm.Action, step: Step, index: int) -> None:
        d = self.d
        done = step.done.get(index)
        match action:
            case fsm.InstallDelivery() | fsm.WithdrawDelivery() if isinstance(done, process.Flipped):
                d.dataplane.flipped(done.on, done.results, done.took_ms)
                if done.on:
                    d.telemetry.on_delivery_installed(done.at, announcing=d.cfg.announce.mode != "none")
            case fsm.Transition(old=old, new=new, reason=reason):
                self._transition(old, new, reason, step)
            case fsm.StartAnnounce(reason=reason):
                lead = (done.sent, done.first_at) if isinstance(done, process.LeadSent) and any(
                    done.sent.values()) else None
                d.announcer.start(reason, lead)
            case fsm.StopAnnounce():
                d.announcer.stop()
            case fsm.Exit(restart=restart):
                d.exit(restart)
            case fsm.Completed(command=command, data=data):
                self._complete(command, data)
            case fsm.Refused(command=command, reason=reason):
                d.log.warning("command_refused", command=command, reason=reason)
                self._fail_waiters(command, reason)
            case fsm.Notice(kind=kind, peer=peer, detail=detail):
                self.notices[kind] += 1
                if kind == NoticeKind.SPLIT_BRAIN:
                    d.telemetry.on_split_brain(time.monotonic())
                level = "warning" if kind in WARNING_NOTICES else "info"
                getattr(d.log, level)(str(kind), peer=peer, detail=detail)

    def _transition(self, old: State, new: State, reason: str, step: Step) -> None:
        d = self.d
        entry = {"from": old.name, "to": new.name, "reason": reason, "at": step.decided_wall}
        self.history.append(entry)
        st = self.snap.status  # the step's own snapshot (set before its actions)
        # decided_at: when the election decided (unix time); a takeover's flip and first
        # announcement went out before the election process sent this step
        d.log.info("transition", **{"from": old.name, "to": new.name}, reason=reason,
                   priority=st["effective_priority"], peer=(st["master"] or {}).get("node") or "",
                   decided_at=round(step.decided_wall, 6))
        d.telemetry.on_transition(old.name, new.name, reason, step.decided_mono)
        d.hooks.transition(new.name, old.name, reason)
        d.notifier.status(self.systemd_status())

    def _complete(self, command: str, data: dict[str, Any]) -> None:
        """The election says ``command`` is done: the oldest client waiting for it hears."""
        for i, (what, fut) in enumerate(self.waiters):
            if what == command and not fut.done():
                fut.set_result({"ok": True, "data": data})
                del self.waiters[i]
                return

    def _fail_waiters(self, command: str, reason: str) -> None:
        for what, fut in self.waiters:
            if what == command and not fut.done():
                fut.set_result({"ok": False, "error": reason})

    # -- what the latest snapshot and step show --------------------------------------

    def poll_telemetry(self) -> None:
        self.d.telemetry.poll_announcement(self.d.announcer.first_sent_at)

    def systemd_status(self) -> str:
        st = self.snap.status
        return role_status(st["state"], st["priority"], st["effective_priority"],
                           (st["master"] or {}).get("node"), st["faults"])
