"""vipless-failoverd: wiring. One asyncio loop drives the pure election FSM.

Every input (advert, timer, command, signal, link event) is queued and handled by one
task, in order: the FSM is called, then its actions are carried out in the order given
(e.g. install delivery -> advert -> announce), then the single timer is re-armed from
``next_deadline()``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, config as config_mod, sched
from .aio import within
from .announce import Announcer, check_interface
from .control import ControlError, ControlServer, Peer
from .dataplane.ipvs import missing_schedulers
from .dataplane.nexthop import NextHopAddress
from .dataplane.reconcile import Dataplane
from .election import fsm
from .election.protocol import Advert, AdvertDecoder, AdvertRejected, State, encode_advert, next_counter
from .election.transport import AdvertTransport
from .election.trust import KeyRing, PeerTrouble
from .hooks import NotifyHooks
from .log import setup as setup_logging
from .metrics import MetricsServer, build_registry
from .systemd import Notifier, role_status
from .telemetry import (
    AdvertCounters,
    ControlCounters,
    DaemonCounters,
    MetricsServerCounters,
    NoticeCounters,
    NoticeKind,
    RejectReason,
    TransportCounters,
)
from .tracking import Tracker

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
SHUTDOWN_HOOK_GRACE_S = 3.0  # notify hooks still queued or running at exit get this long
RESUME_FILE = "resume-{node}.json"
PRECISE_LEAD_S = 0.002  # the master-down timer wakes this early, then spins to the exact time
#: notices logged as warnings (the others at info)
WARNING_NOTICES = frozenset({NoticeKind.SPLIT_BRAIN, NoticeKind.CONFIG_MISMATCH, NoticeKind.AUTH_FAILED,
                             NoticeKind.CLOCK_SKEW})


@dataclass
class Input:
    kind: str  # "advert" | "timer" | "command"
    payload: Any = None
    src: Any = None
    at: float | None = None  # adverts: loop time it reached the kernel (however long ago)


class Daemon:
    def __init__(self, cfg: config_mod.Config, keys: bytes | tuple[bytes, ...], log: Any,
                 netns: str | None = None):
        self.cfg = cfg
        self.keys = KeyRing((keys,) if isinstance(keys, bytes) else tuple(keys))
        self.log = log.bind(node=cfg.node.name)
        self.netns = netns
        self.loop: asyncio.AbstractEventLoop | None = None
        self.digest = cfg.shared_digest()[:16]
        self.election = fsm.Election(fsm.Params.from_config(cfg, self.digest))
        self.decoder = AdvertDecoder(self.keys.keys, cfg.election.cluster_id,
                                     max_skew_us=cfg.election.max_clock_skew_ms * 1000)
        self.trouble = PeerTrouble(cfg.election.peers)
        self.runtime_dir = cfg.control.socket.parent
        # the IPVS ownership record lives beside the control socket: one per daemon
        self.dataplane = Dataplane(cfg, self.log, ipvs_owned_path=self.runtime_dir / "ipvs-owned.json")
        self.announcer = Announcer(cfg, self.log)
        self.nexthop = NextHopAddress(cfg, self.log) if cfg.announce.mode == "next-hop" else None
        self.transport: AdvertTransport | None = None
        self.control: ControlServer | None = None
        self.queue: deque[Input] = deque()  # inputs waiting while actions await the kernel
        self._busy = False
        self._pending: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.counter = 0
        self.exit_code: int | None = None
        self.exit_restart = False
        self.done = asyncio.Event()
        self._fsm_now = 0.0  # the last "now" the election was given (it never goes back)
        self._decided_wall, self._decided_mono = time.time(), time.monotonic()  # of the step being handled
        self.waiters: list[tuple[str, asyncio.Future]] = []  # promote/demote waiting for completion
        self.history: deque[dict[str, Any]] = deque(maxlen=16)
        self.adverts_sent = 0
        self.adverts_received = 0  # datagrams, whatever became of them
        self.rejected: Counter[RejectReason] = Counter()
        self.notices: Counter[NoticeKind] = Counter()
        self.started_wall = time.time()
        self.maintenance_file = cfg.control.state_dir / f"maintenance-{cfg.node.name}"
        self.maintenance_saved = False
        # operations: notify hooks, tracking, metrics, systemd (see hooks/tracking/metrics/systemd.py)
        self.hooks = NotifyHooks(cfg.notify, cfg.node.name, cfg.election.cluster_id, self.log)
        self.tracker = Tracker(cfg.track, self._on_track_change, self.log, netns=netns,
                               node_interface=cfg.node.interface)
        self._track_faults: set[str] = set()  # fault items the election has been told about
        self._track_priority = cfg.election.priority
        self.registry, self.telemetry = build_registry(
            self.status, self.counters, split_brain_gap_s=3 * cfg.election.advert_interval_ms / 1000.0 + 1.0,
            on_scrape=self._poll_telemetry)
        self.metrics_server: MetricsServer | None = None
        self.notifier = Notifier.from_env()
        self._reload_lock = asyncio.Lock()

    # -- time -----------------------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None, "the loop is set by run()"
        return self.loop

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        resume = self._take_resume_marker()
        try:
            # pyroute2's synchronous API runs its own loop: keep it off ours
            await asyncio.to_thread(check_startable, self.cfg)  # before anything is applied
        except config_mod.ConfigError as exc:
            print(f"vipless-failoverd: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            await self.dataplane.start()
            await self.announcer.open()
            self.transport = await AdvertTransport.open(self.cfg, self._on_datagram, logger=self.log)
            self.control = ControlServer(self.cfg.control.socket, self.cfg.control.group, self._control, self.log)
            await self.control.start()
            await self.tracker.start()  # node.interface down: SetFault is queued before Start
            self.hooks.start()
            if self.cfg.metrics.listen:
                self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port,
                                                    self.registry, self.log)
                await self.metrics_server.start()
        except (OSError, ControlError, config_mod.ConfigError, RuntimeError) as exc:
            self.log.error("startup_failed", error=str(exc))
            await self._shutdown_io(withdraw=not resume)
            return EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._signal_stop, sig)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._loop.create_task(self.reload()))
        if self.maintenance_file.exists():  # maintenance survives restarts until turned off
            self.maintenance_saved = True
            self.submit_command(fsm.SetMaintenance(True))
        self.submit_command(fsm.Start(resume_master=resume))
        self.log.info("started", version=__version__, config=str(self.cfg.path), resume=resume,
                      priority=self.cfg.election.priority, interval_ms=self.cfg.election.advert_interval_ms,
                      transport=self.cfg.election.transport, ipvs_available=self.dataplane.ipvs_available)
        scheduling = sched.current()
        if scheduling.at_risk(self.cfg.election.advert_interval_ms):
            self.log.warning("no_realtime", policy=scheduling.policy,
                             interval_ms=self.cfg.election.advert_interval_ms,
                             advised_below_ms=sched.RT_ADVISED_BELOW_MS, advice=sched.ADVICE)
        # the first reconcile ran in dataplane.start(): tell systemd we are up
        # Everything built at start (config, prebuilt frames, VIP sets) lives as long as
        # the process: keep it out of the cyclic GC's scans, which otherwise grow with
        # the number of VIPs and cost an idle daemon CPU for nothing.
        gc.freeze()
        self.notifier.ready(self._systemd_status())
        self.notifier.start_watchdog()
        await self.done.wait()
        if self._pending is not None:  # Exit came from it: let it finish what it does
            await asyncio.gather(self._pending, return_exceptions=True)
        self.queue.clear()
        self._busy = True  # nothing more reaches the election
        # a restarting backup withdraws nothing either (it holds no delivery rules);
        # only a master leaves the marker that makes the next process resume as master
        await self._shutdown_io(withdraw=not self.exit_restart)
        if self.exit_restart and self.election.state is State.MASTER:
            self._write_resume_marker()
        self.log.info("stopped", restart=self.exit_restart)
        return self.exit_code or EXIT_OK

    async def _shutdown_io(self, withdraw: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.notifier.close()
        await self.tracker.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        # the transitions of a graceful stop are reported too, within the hooks' timeout
        # but never holding the exit longer than SHUTDOWN_HOOK_GRACE_S
        await self.hooks.close(grace=min(self.cfg.notify.timeout_ms / 1000.0, SHUTDOWN_HOOK_GRACE_S))
        if self.control is not None:
            await self.control.close()
        if self.transport is not None:
            self.transport.close()
        await self.announcer.close()
        if withdraw:
            if self.nexthop is not None:
                try:
                    await self.nexthop.remove()
                except Exception as exc:  # noqa: BLE001 - the rest must still be withdrawn
                    self.log.error("next_hop_error", error=str(exc))
            await self.dataplane.stop()
        else:
            await self.dataplane.close()  # restart in place: the next process adopts it all
        if self.nexthop is not None:
            self.nexthop.close()

    def _signal_stop(self, sig: int) -> None:
        self.log.info("signal", signal=signal.Signals(sig).name)
        self.notifier.stopping("stopping: handing over")
        self.submit_command(fsm.Stop())

    async def reload(self) -> dict[str, Any]:
        """Apply the config file by diff, if it passes every check start makes
        (:func:`preflight`, in a thread: the loop never waits for a file or netlink);
        otherwise nothing changes and the answer says why."""
        async with self._reload_lock:  # SIGHUP and failoverctl reload, one at a time
            try:
                new, keys = await asyncio.to_thread(preflight, self.cfg.path)
            except config_mod.ConfigError as exc:
                self.log.error("reload_failed", error=str(exc))
                return {"ok": False, "error": f"reload refused: {exc}"}
            return await self._apply_reload(new, keys)

    async def _apply_reload(self, new: config_mod.Config, keys: tuple[bytes, ...]) -> dict[str, Any]:
        problems = [k for k, same in (("node", new.node == self.cfg.node),
                                      ("election", new.election.without_keys() == self.cfg.election.without_keys()))
                    if not same]
        if problems:
            msg = (f"reload cannot change [{'], ['.join(problems)}] (but for the keys and the replay window): "
                   f"restart the daemon for that")
            self.log.error("reload_failed", error=msg)
            return {"ok": False, "error": msg}
        old, self.cfg = self.cfg, new
        self._reload_keys(keys, new.election.max_clock_skew_ms)
        await self.dataplane.reload(new)
        if new.announce != old.announce:
            await self._reload_announcer(new)
        await self.hooks.reconfigure(new.notify)
        if new.track != self.tracker.cfg:
            await self.tracker.close()
            self.tracker = Tracker(new.track, self._on_track_change, self.log, netns=self.netns,
                                   node_interface=new.node.interface)
            await self.tracker.start()
            self._on_track_change()  # items no longer configured stop counting
        self.log.info("reloaded", config=str(new.path))
        return {"ok": True, "data": {"reloaded": str(new.path)}}

    def _reload_keys(self, keys: tuple[bytes, ...], max_clock_skew_ms: int) -> None:
        """A rotation: sign with the new signing key from the next advert on, accept
        every configured key; the replay state is kept."""
        self.decoder.set_window(max_clock_skew_ms * 1000)
        if keys == self.keys.keys:
            return
        before = self.keys.describe({})
        self.keys = KeyRing(keys)
        self.decoder.set_keys(keys)
        after = self.keys.describe({})
        self.log.info("keys_reloaded", signing=after["signing"], accepted=after["accepted"],
                      previous_signing=before["signing"])

    async def _reload_announcer(self, new: config_mod.Config) -> None:
        """Announce (and answer for) the reloaded VIP set: added VIPs move with the next
        takeover, removed ones are no longer announced. A master re-announces at once."""
        fresh = Announcer(new, self.log)
        try:
            await fresh.open()
        except (OSError, RuntimeError) as exc:
            self.log.error("reload_announcer_failed", error=str(exc))
            await fresh.close()
            return
        announcing = bool(self.announcer.status().get("announcing"))
        await self.announcer.close()
        fresh.carry_counts(self.announcer)  # counters of a process never go back (Prometheus)
        self.announcer = fresh
        gc.freeze()  # the new frames, like those built at start
        if announcing:
            fresh.start("reload")

    def _save_maintenance(self, on: bool) -> None:
        try:
            if on:
                self.maintenance_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                self.maintenance_file.write_text(json.dumps({"since": time.time()}) + "\n")
            else:
                self.maintenance_file.unlink(missing_ok=True)
            self.maintenance_saved = on
        except OSError as exc:
            self.log.error("maintenance_persist_failed", file=str(self.maintenance_file), error=str(exc))
            self.maintenance_saved = on  # reported once; the mode itself is in force

    # -- resume marker (restart in place) ----------------------------------------

    def _resume_path(self) -> Path:
        return self.runtime_dir / RESUME_FILE.format(node=self.cfg.node.name)

    def _write_resume_marker(self) -> None:
        path = self._resume_path()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"at": time.time(), "hold_ms": self.cfg.election.restart_hold_ms}))
        os.replace(tmp, path)

    def _take_resume_marker(self) -> bool:
        path = self._resume_path()
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return False
        age = time.time() - float(data.get("at", 0))
        return 0 <= age * 1000 < float(data.get("hold_ms", 0))

    # -- inputs -------------------------------------------------------------------

    def _on_datagram(self, data: bytes, src: Any, rx_time: float) -> None:
        self.adverts_received += 1
        # freshness is judged at the kernel's receive time, not when Python got to it
        # (after a pause, adverts that waited in the socket are not stale)
        rx_wall_us = int((time.time() - max(0.0, self.now() - rx_time)) * 1e6)
        try:
            msg = self.decoder.decode(data, rx_wall_us)
        except AdvertRejected as exc:
            self.rejected[exc.reason] += 1
            if self.rejected[exc.reason] in (1, 10, 100, 1000) or self.rejected[exc.reason] % 10000 == 0:
                self.log.warning("advert_rejected", reason=exc.reason, src=str(src), detail=exc.detail,
                                 count=self.rejected[exc.reason])
            kind = self.trouble.notice(exc.reason, src, self.now())
            if kind is not None:  # a peer's address: a key or a clock that differs splits the brain
                self._do(fsm.Notice(kind, str(src), exc.detail))
            return
        if msg.node == self.cfg.node.name:
            return
        self.trouble.learn(src)
        if msg.config_digest != self.digest:
            self.rejected[RejectReason.CONFIG_DIGEST_MISMATCH] += 1  # reported, not fatal
        # the master-down timer counts from the kernel's receive time, not from when
        # Python got to it: a few hundred microseconds, or seconds after a pause
        self._input(Input("advert", msg, src, rx_time))

    def submit_command(self, cmd: fsm.Command) -> None:
        self._input(Input("command", cmd))

    def _on_track_change(self) -> None:
        """Tell the election what tracking now says: fault items and the effective priority."""
        faults = self.tracker.faults()
        for item in sorted(faults - self._track_faults):
            self.submit_command(fsm.SetFault(item, True))
        for item in sorted(self._track_faults - faults):
            self.submit_command(fsm.SetFault(item, False))
        self._track_faults = faults
        prio = self.tracker.effective_priority(self.cfg.election.priority)
        if prio != self._track_priority:
            self._track_priority = prio
            self.log.info("effective_priority", priority=prio, configured=self.cfg.election.priority)
            self.submit_command(fsm.SetPriority(prio))

    def _poll_telemetry(self) -> None:
        self.telemetry.poll_announcement(self.announcer.first_sent_at)

    def _systemd_status(self) -> str:
        e = self.election
        return role_status(e.state.name, e.p.priority, e.priority, e.master, sorted(e.faults))

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        deadline = self.election.next_deadline()
        if deadline is None:
            return
        if deadline == self.election.master_down_at:
            # asyncio rounds its wait up to the next millisecond: the master-down
            # timer, the one a takeover waits for, wakes early and spins the rest
            self.timer = self._loop.call_at(deadline - PRECISE_LEAD_S, self._precise_timer, deadline)
        else:
            self.timer = self._loop.call_at(deadline, self._input, Input("timer"))

    def _precise_timer(self, deadline: float) -> None:
        self.timer = None
        # spin the rest (at most PRECISE_LEAD_S, and only when the master went silent):
        # a sleep overshoots by the timer slack and a wake-up, and the takeover then
        # runs on a cold CPU
        loop = self._loop
        while loop.time() < deadline:
            pass
        self._input(Input("timer"))

    # -- processing: one input at a time, in order -------------------------------
    #
    # An input is handled at once, in the callback that brought it (no extra loop
    # iteration: an idle pair wakes only for its adverts). Actions that must wait for
    # the kernel (delivery rules, the next-hop address) continue in a task; inputs
    # arriving meanwhile queue up behind them, so the order never changes.

    def _input(self, item: Input) -> None:
        if item.kind != "advert":
            self._read_waiting()
        self.queue.append(item)
        if not self._busy:
            self._process()

    def _read_waiting(self) -> None:
        """Before a timer or a command reaches the election: the adverts waiting in the
        socket go first, at their receive times. After a pause the loop runs expired
        timers before it sees the readable socket; without this a backup would take
        over from a master whose adverts are sitting unread."""
        if self.transport is not None and not self.transport.closed:
            self.transport.drain()  # counted in its "drained"

    def _process(self) -> None:
        self._busy = True
        while self.queue:
            try:
                actions = self._call_fsm(self.queue.popleft())
                done = self._takeover_first(actions)
                if any(self._needs_await(a) for a in actions if id(a) not in done):
                    self._pending = self._loop.create_task(self._process_async(actions, done), name="election")
                    return  # still busy: the task carries on with the queue
                for action in actions:
                    if not self._already(action, done):
                        self._do(action)
                self._after_input()
            except Exception:  # a bug must not stop the election: log it, go on
                self.log.exception("internal_error")
        self._busy = False

    def _already(self, action: fsm.Action, done: dict[int, float]) -> bool:
        """Whether _takeover_first did ``action``; reaching its place, the metrics hear of it."""
        if id(action) not in done:
            return False
        if isinstance(action, fsm.InstallDelivery):
            self.telemetry.on_delivery_installed(done[id(action)], announcing=self._announcing())
        return True

    async def _process_async(self, actions: list[fsm.Action], done: dict[int, float] | None = None) -> None:
        done = done or {}
        try:
            for action in actions:
                if self._already(action, done):
                    continue
                if self._needs_await(action):
                    await self._do_async(action)
                else:
                    self._do(action)
            self._after_input()
        except Exception:  # a bug must not stop the election: log it, go on
            self.log.exception("internal_error")
        finally:
            self._busy = False
            self._pending = None
        if self.queue:
            self._process()

    def _call_fsm(self, item: Input) -> list[fsm.Action]:
        present = self.now()
        # an advert at its arrival time (inputs reach the election in arrival order, so
        # this only moves forward; the max() guards the microseconds between a read and
        # a timer), everything else at the present
        now = max(self._fsm_now, present if item.at is None else min(item.at, present))
        self._fsm_now = now
        self._decided_wall, self._decided_mono = time.time(), time.monotonic()
        try:
            if item.kind == "advert":
                return self.election.handle_advert(item.payload, item.src, now, handled_at=present)
            if item.kind == "timer":
                deadline = self.election.next_deadline()
                if deadline is None or deadline > now:
                    return []  # the adverts read before it moved the deadline on
                return self.election.handle_timer(now)
            return self.election.handle_command(item.payload, now)
        except fsm.LocalError as exc:
            self.log.error("election_misuse", error=str(exc))
            return []

    def _after_input(self) -> None:
        self._arm_timer()
        if self.election.maintenance != self.maintenance_saved:
            self._save_maintenance(self.election.maintenance)
        self._check_waiters()
        self._poll_telemetry()

    # -- actions -----------------------------------------------------------------

    def _needs_await(self, action: fsm.Action) -> bool:
        if isinstance(action, (fsm.InstallDelivery, fsm.WithdrawDelivery)):
            # the flip is one system call, done in line; only a delivery pass under way
            # (it reads, then changes the rules) makes it wait
            return not self.dataplane.flip_ready()
        return self.nexthop is not None and isinstance(action, (fsm.StartAnnounce, fsm.StopAnnounce))

    async def _do_async(self, action: fsm.Action) -> None:
        match action:
            case fsm.InstallDelivery():
                await self.dataplane.set_delivery(True)
                self.telemetry.on_delivery_installed(time.monotonic(),
                                                     announcing=self.cfg.announce.mode != "none")
            case fsm.WithdrawDelivery():
                await self.dataplane.set_delivery(False)
            case fsm.StartAnnounce(reason=reason):
                assert self.nexthop is not None  # only next-hop mode awaits (_needs_await)
                try:
                    await self.nexthop.add()
                except Exception as exc:  # noqa: BLE001 - reported; the election goes on
                    self.log.error("next_hop_error", error=str(exc))
                self.announcer.start(reason)
            case fsm.StopAnnounce():
                self.announcer.stop()
                assert self.nexthop is not None  # only next-hop mode awaits (_needs_await)
                try:
                    await self.nexthop.remove()
                except Exception as exc:  # noqa: BLE001
                    self.log.error("next_hop_error", error=str(exc))

    def _announcing(self) -> bool:
        return self.cfg.announce.mode != "none"

    def _takeover_first(self, actions: list[fsm.Action]) -> dict[int, float]:
        """A takeover's delivery flip and first announcement, before the other actions
        of the same step (notices, the transition's log line, hooks and metrics, the
        advert): what ends the client's outage goes first. In line, when the flip can
        be (next-hop mode's address is added in the task that follows). Returns the
        actions done, with the time."""
        flip = next((a for a in actions if isinstance(a, fsm.InstallDelivery)), None)
        if flip is None or not self.dataplane.flip_ready():
            return {}
        self.dataplane.flip(True)
        done = {id(flip): time.monotonic()}
        for a in actions:
            if isinstance(a, fsm.StartAnnounce) and not self._needs_await(a):  # next-hop: in the task
                self.announcer.start(a.reason)
                done[id(a)] = time.monotonic()
                break
        return done

    def _do(self, action: fsm.Action) -> None:
        match action:
            case fsm.InstallDelivery():
                self.dataplane.flip(True)
                self.telemetry.on_delivery_installed(time.monotonic(), announcing=self._announcing())
            case fsm.WithdrawDelivery():
                self.dataplane.flip(False)
            case fsm.SendAdvert():
                self._send(action)
            case fsm.Transition(old=old, new=new, reason=reason):
                self._transition(old, new, reason)
            case fsm.StartAnnounce(reason=reason):
                self.announcer.start(reason)
            case fsm.StopAnnounce():
                self.announcer.stop()
            case fsm.Exit(restart=restart):
                self.exit_restart = restart
                self.exit_code = EXIT_OK
                self.done.set()
            case fsm.Refused(command=command, reason=reason):
                self.log.warning("command_refused", command=command, reason=reason)
                self._fail_waiters(command, reason)
            case fsm.Notice(kind=kind, peer=peer, detail=detail):
                self.notices[kind] += 1
                if kind == NoticeKind.SPLIT_BRAIN:
                    self.telemetry.on_split_brain(time.monotonic())
                level = "warning" if kind in WARNING_NOTICES else "info"
                getattr(self.log, level)(str(kind), peer=peer, detail=detail)

    def _send(self, action: fsm.SendAdvert) -> None:
        if self.transport is None:
            return
        self.counter = next_counter(self.counter, time.time_ns() // 1000)
        msg = Advert(cluster_id=self.cfg.election.cluster_id, node=self.cfg.node.name,
                     address=self.cfg.node.address, priority=action.priority,
                     advert_interval_ms=self.cfg.election.advert_interval_ms, state=action.state,
                     flags=action.flags, successor=action.successor, hold_ms=action.hold_ms,
                     counter=self.counter, config_digest=self.digest)
        self.transport.send(encode_advert(msg, self.keys.signing))
        self.adverts_sent += 1

    def _transition(self, old: State, new: State, reason: str) -> None:
        entry = {"from": old.name, "to": new.name, "reason": reason, "at": self._decided_wall}
        self.history.append(entry)
        # decided_at: when the election decided (unix time); a takeover's flip and first
        # announcement go out before this line is written (see _takeover_first)
        self.log.info("transition", **{"from": old.name, "to": new.name}, reason=reason,
                      priority=self.election.priority, peer=self.election.master or "",
                      decided_at=round(self._decided_wall, 6))
        self.telemetry.on_transition(old.name, new.name, reason, self._decided_mono)
        self.hooks.transition(new.name, old.name, reason)
        self.notifier.status(self._systemd_status())

    # -- control commands -----------------------------------------------------------

    def _check_waiters(self) -> None:
        keep = []
        for what, fut in self.waiters:
            if fut.done():
                continue
            st = self.election.state
            if what == "promote" and st is State.MASTER:
                fut.set_result({"ok": True, "data": {"state": st.name}})
            elif what in ("demote", "maintenance") and st is not State.MASTER \
                    and self.election.master not in (None, self.cfg.node.name):
                fut.set_result({"ok": True, "data": {"state": st.name, "master": self.election.master}})
            else:
                keep.append((what, fut))
        self.waiters = keep

    def _fail_waiters(self, command: str, reason: str) -> None:
        for what, fut in self.waiters:
            if what == command and not fut.done():
                fut.set_result({"ok": False, "error": reason})

    async def _wait_for(self, what: str, cmd: fsm.Command, timeout: float) -> dict[str, Any]:
        fut = self._loop.create_future()
        self.waiters.append((what, fut))
        self.submit_command(cmd)
        try:
            return await within(fut, timeout)
        except TimeoutError:
            return {"ok": False, "error": f"{what} did not complete within {timeout:g} s "
                                          f"(state {self.election.state.name})"}

    def counters(self) -> DaemonCounters:
        """Every counter of the daemon and its parts, typed: what the metrics read, and
        what :meth:`status` shows."""
        return DaemonCounters(
            adverts=AdvertCounters(sent=self.adverts_sent, received=self.adverts_received, rejected=self.rejected),
            notices=NoticeCounters(self.notices),
            reconcile=self.dataplane.counters(),
            announce=self.announcer.counters(),
            notify=self.hooks.counters(),
            control=self.control.counters() if self.control is not None else ControlCounters(),
            metrics=self.metrics_server.counters() if self.metrics_server is not None else MetricsServerCounters(),
            transport=self.transport.counters() if self.transport is not None else TransportCounters(),
        )

    def status(self) -> dict[str, Any]:
        now = self.now()
        counted = self.counters()
        st = self.election.status(now)
        st.update({
            "version": __version__,
            "config": str(self.cfg.path),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_wall, 3),
            "last_transition": self.history[-1] if self.history else None,
            "transitions": list(self.history),
            "adverts": counted.adverts.as_dict(),
            "keys": {**self.keys.describe(self.decoder.key_used),
                     "replay_window_ms": self.cfg.election.max_clock_skew_ms},
            "scheduling": sched.current().describe(self.cfg.election.advert_interval_ms),
            "dataplane": self.dataplane.status(),
            "ipvs_available": self.dataplane.ipvs_available,
            "announce": self.announcer.status(),
            "transport": counted.transport.as_dict() if self.transport is not None else {},
            "cluster_id": self.cfg.election.cluster_id,
            "tracked": self.tracker.status(),
            "notify": self.hooks.status(),
            "notices": counted.notices.as_dict(),
            "control": counted.control.as_dict() if self.control is not None else {"refused": 0},
            "metrics": {"listen": self.cfg.metrics.listen, **counted.metrics.as_dict()},
        })
        return st

    async def _control(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cmd = req["cmd"]
        timeout = float(req.get("timeout", 10.0))
        if cmd == "status":
            return {"ok": True, "data": self.status()}
        self.log.info("control", cmd=cmd, uid=peer.uid, pid=peer.pid)
        if cmd == "promote":
            if self.election.state is State.MASTER:
                return {"ok": True, "data": {"state": "MASTER", "note": "already master"}}
            return await self._wait_for("promote", fsm.Promote(), timeout)
        if cmd == "demote":
            if self.election.state is not State.MASTER:
                return {"ok": False, "error": f"not master (state is {self.election.state.name})"}
            return await self._wait_for("demote", fsm.Demote(), timeout)
        if cmd == "maintenance":
            on = req.get("on")
            if not isinstance(on, bool):
                return {"ok": False, "error": "maintenance needs on: true|false"}
            return await self._wait_for("maintenance", fsm.SetMaintenance(on), timeout) if (
                on and self.election.state is State.MASTER) else self._apply_now(fsm.SetMaintenance(on))
        if cmd == "reload":
            return await self.reload()
        if cmd == "announce":
            if self.election.state is not State.MASTER:
                return {"ok": False, "error": f"not master (state is {self.election.state.name})"}
            self.announcer.start("operator")
            return {"ok": True, "data": self.announcer.status()}
        if cmd == "restart":
            # the new process must be able to start: check its config as start will
            try:
                await asyncio.to_thread(preflight, self.cfg.path)
            except config_mod.ConfigError as exc:
                self.log.error("restart_refused", error=str(exc))
                return {"ok": False, "error": f"restart refused: {exc}"}
            self.submit_command(fsm.Stop(restart=True))
            return {"ok": True, "data": {"restarting": True}}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _apply_now(self, cmd: fsm.Command) -> dict[str, Any]:
        self.submit_command(cmd)
        return {"ok": True, "data": {}}


# ---------------------------------------------------------------------------
# entry point


def check_startable(cfg: config_mod.Config) -> None:
    """The checks of a valid config against this machine that start makes before it
    changes anything: per-VIP mode's on-link condition (or the next-hop address), and
    the IPVS schedulers (from the kernel's module lists: files, no netlink). Blocking."""
    check_interface(cfg)
    for key, scheduler in missing_schedulers(cfg):
        raise config_mod.ConfigError(key, f"scheduler {scheduler!r} is not available in this kernel "
                                          f"(no ip_vs_{scheduler} module)", cfg.path)


def preflight(path: str | os.PathLike[str]) -> tuple[config_mod.Config, tuple[bytes, ...]]:
    """Everything start checks, for reload, restart and --check-config: the config
    (with its overlap checks), the key files (signing, then accepted), then
    :func:`check_startable`. Blocking (files, netlink): the daemon calls it in a
    thread. Raises ConfigError."""
    cfg = config_mod.load(path)
    keys = config_mod.read_keys(cfg)
    check_startable(cfg)
    return cfg, keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vipless-failoverd",
        description="Failover daemon for LVS directors that hold no VIP on any interface.",
        epilog="Signals: SIGTERM/SIGINT hand over and drain, then exit 0; SIGHUP reloads the config. "
               "Exit status: 0 stopped cleanly, 1 runtime failure, 2 bad config or usage.")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML config file")
    p.add_argument("--check-config", action="store_true",
                   help="run every check start runs (the config, the key file, the VIPs on-link on "
                        "node.interface, the IPVS schedulers) and exit: 0 valid, 2 invalid")
    p.add_argument("--log-format", choices=("json", "console"), default="json",
                   help="log format on stdout (default: json)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check_config:
            cfg, keys = preflight(args.config)
        else:
            cfg = config_mod.load(args.config)
            keys = config_mod.read_keys(cfg)
    except config_mod.ConfigError as exc:
        print(f"vipless-failoverd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{cfg.path}: OK")
        return EXIT_OK
    log = setup_logging(args.log_format, args.log_level)

    async def _run() -> tuple[int, bool]:
        daemon = Daemon(cfg, keys, log)
        code = await daemon.run()
        return code, daemon.exit_restart

    code, restart = asyncio.run(_run())
    if restart:
        # restart in place: same PID for systemd; the new process resumes as master.
        # The interpreter's own command line again (the package's wrapper with its -I,
        # a venv's script, python -m: whatever started this process)
        sys.stdout.flush()
        again = sys.orig_argv if argv is None else [sys.executable, "-m", "vipless_failover.daemon", *argv]
        os.execv(sys.executable, again)
    return code


if __name__ == "__main__":
    sys.exit(main())
