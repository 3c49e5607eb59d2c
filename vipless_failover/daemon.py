"""vipless-failoverd: the director. The election runs in a process of its own.

``main`` forks the election process (election/process.py) before anything else runs:
it owns the advert socket, the FSM and its timer, and a takeover's delivery flip and
first announcement frames, at the unit's real-time priority. This process (the
director, at a lower priority) owns the rest: config and reload, the reconciler,
the announcement's bursts and responder, the control socket, metrics, hooks,
tracking and systemd. It sends the election its commands and a ``Setup``; it
carries out, in order, the actions of each ``Step`` the election sends up, and shows
the latest ``Snapshot`` as status. Nothing here can delay an advert.
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
from pathlib import Path
from typing import Any

from . import __version__, config as config_mod, sched
from .aio import within
from .announce import Announcer, check_interface
from .control import ControlError, ControlServer, Peer
from .dataplane.ipvs import missing_schedulers
from .dataplane.nexthop import NextHopAddress
from .dataplane.reconcile import Dataplane
from .election import fsm, process
from .election.process import ElectionProcess, Failed, Ready, Setup, Snapshot, Step
from .election.protocol import State
from .election.trust import KeyRing
from .hooks import NotifyHooks
from .log import setup as setup_logging
from .metrics import MetricsServer, build_registry
from .systemd import Notifier, role_status
from .telemetry import (
    ControlCounters,
    DaemonCounters,
    MetricsServerCounters,
    NoticeCounters,
    NoticeKind,
    TransportCounters,
)
from .tracking import Tracker

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
SHUTDOWN_HOOK_GRACE_S = 3.0  # notify hooks still queued or running at exit get this long
RESUME_FILE = "resume-{node}.json"
#: how long start waits for the election process to open its socket
ELECTION_READY_S = 10.0
#: the watchdog pings systemd only while the election's latest snapshot is this fresh
SNAPSHOT_STALE_S = 2.0
#: a status or a scrape asks the election for a snapshot when the latest is older than
#: this (one request at a time: the election's work stays bounded whatever the clients)
FRESH_S = 0.02
#: and waits for it at most this long (then shows the latest)
FRESH_WAIT_S = 0.2
#: notices logged as warnings (the others at info)
WARNING_NOTICES = frozenset({NoticeKind.SPLIT_BRAIN, NoticeKind.CONFIG_MISMATCH, NoticeKind.AUTH_FAILED,
                             NoticeKind.CLOCK_SKEW})


def first_snapshot(cfg: config_mod.Config, digest: bytes, keys: tuple[bytes, ...]) -> Snapshot:
    """What status shows before the election process has sent anything: INIT."""
    now = time.monotonic()
    return Snapshot(now, fsm.Election(fsm.Params.from_config(cfg, digest)).status(now), 0, 0, {},
                    TransportCounters(), KeyRing(keys).describe({}))


class Daemon:
    def __init__(self, cfg: config_mod.Config, keys: bytes | tuple[bytes, ...], log: Any,
                 netns: str | None = None, election: ElectionProcess | None = None):
        self.cfg = cfg
        self.keys = (keys,) if isinstance(keys, bytes) else tuple(keys)
        self.log = log.bind(node=cfg.node.name)
        self.netns = netns
        self.election = election
        self.loop: asyncio.AbstractEventLoop | None = None
        self.digest = cfg.shared_digest()[:16]
        self.snap = first_snapshot(cfg, self.digest, self.keys)
        self.election_ready = False
        self.runtime_dir = cfg.control.socket.parent
        flags = election.flags if election is not None else None
        # the IPVS ownership record lives beside the control socket: one per daemon
        self.dataplane = Dataplane(cfg, self.log, ipvs_owned_path=self.runtime_dir / "ipvs-owned.json",
                                   delivery_source=(lambda: flags.delivery) if flags is not None else None)
        self.announcer = self._announcer(cfg)
        self.nexthop = NextHopAddress(cfg, self.log) if cfg.announce.mode == "next-hop" else None
        self.control: ControlServer | None = None
        self.steps: deque[Step | Snapshot] = deque()  # waiting while a step awaits the kernel
        self._busy = False
        self._pending: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._fresh: asyncio.Future | None = None  # a snapshot asked for
        self.exit_code: int | None = None
        self.exit_restart = False
        self.done = asyncio.Event()
        self.waiters: list[tuple[str, asyncio.Future]] = []  # promote/demote waiting for completion
        self.history: deque[dict[str, Any]] = deque(maxlen=16)
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

    def _announcer(self, cfg: config_mod.Config) -> Announcer:
        announcer = Announcer(cfg, self.log)
        if self.election is not None:  # no frame after the election stopped announcing
            flags = self.election.flags
            announcer.allowed = lambda: flags.announce
        return announcer

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None, "the loop is set by run()"
        return self.loop

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        assert self.election is not None, "main() forks the election process first"
        resume = self._take_resume_marker()
        try:
            # pyroute2's synchronous API runs its own loop: keep it off ours
            await asyncio.to_thread(check_startable, self.cfg)  # before anything is applied
        except config_mod.ConfigError as exc:
            print(f"vipless-failoverd: {exc}", file=sys.stderr)
            self.election.kill()
            return EXIT_CONFIG
        try:
            await self.dataplane.start()
            await self.announcer.open()
            await self._start_election()
            self.control = ControlServer(self.cfg.control.socket, self.cfg.control.group, self._control, self.log)
            await self.control.start()
            await self.tracker.start()  # node.interface down: SetFault is sent before Start
            self.hooks.start()
            if self.cfg.metrics.listen:
                self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port,
                                                    self.registry, self.log, before_render=self.fresh_snapshot)
                await self.metrics_server.start()
        except (OSError, ControlError, config_mod.ConfigError, RuntimeError) as exc:
            self.log.error("startup_failed", error=str(exc))
            await self._shutdown_io(withdraw=not resume)
            self.election.kill()
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
                      transport=self.cfg.election.transport, ipvs_available=self.dataplane.ipvs_available,
                      election_pid=self.election.pid)
        scheduling = _election_scheduling(self.election.pid)
        if scheduling.at_risk(self.cfg.election.advert_interval_ms):
            self.log.warning("no_realtime", policy=scheduling.policy,
                             interval_ms=self.cfg.election.advert_interval_ms,
                             advised_below_ms=sched.RT_ADVISED_BELOW_MS, advice=sched.ADVICE)
        # Everything built at start (config, prebuilt frames, VIP sets) lives as long as
        # the process: keep it out of the cyclic GC's scans, which otherwise grow with
        # the number of VIPs and cost the director CPU for nothing.
        gc.freeze()
        # the first reconcile ran in dataplane.start(): tell systemd we are up
        self.notifier.ready(self._systemd_status())
        self.notifier.start_watchdog(healthy=self._election_alive)
        await self.done.wait()
        if self._pending is not None:  # Exit came from it: let it finish what it does
            await asyncio.gather(self._pending, return_exceptions=True)
        self.steps.clear()
        self._busy = True  # nothing more is carried out
        # a restarting backup withdraws nothing either (it holds no delivery rules);
        # only a master leaves the marker that makes the next process resume as master
        # (and an election process that died leaves the kernel as a crash would)
        await self._shutdown_io(withdraw=not self.exit_restart and self.exit_code != EXIT_FAILURE)
        if self.exit_restart and self.snap.status["state"] == State.MASTER.name:
            self._write_resume_marker()
        if self.election.wait(process.EXIT_FLUSH_S + 1.0) is None:
            self.log.error("election_process_kept_running", pid=self.election.pid)
            self.election.kill()
        self.log.info("stopped", restart=self.exit_restart)
        return self.exit_code or EXIT_OK

    async def _start_election(self) -> None:
        """Send the election process its Setup; returns once it has opened its socket."""
        assert self.election is not None
        self._ready = self._loop.create_future()
        self._loop.add_reader(self.election.channel.fileno(), self._on_channel)
        self.election.channel.send(self._setup())
        try:
            await within(self._ready, ELECTION_READY_S)
        except TimeoutError:
            raise RuntimeError(f"the election process did not start within {ELECTION_READY_S:g} s") from None
        self.election_ready = True

    def _setup(self) -> Setup:
        return Setup(self.keys, self.cfg.election.max_clock_skew_ms, self.dataplane.flip_rules,
                     self.announcer.lead_frames())

    async def _shutdown_io(self, withdraw: bool) -> None:
        if self.election is not None and not self.election.channel.closed:
            self._loop.remove_reader(self.election.channel.fileno())
        self.notifier.close()
        await self.tracker.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        # the transitions of a graceful stop are reported too, within the hooks' timeout
        # but never holding the exit longer than SHUTDOWN_HOOK_GRACE_S
        await self.hooks.close(grace=min(self.cfg.notify.timeout_ms / 1000.0, SHUTDOWN_HOOK_GRACE_S))
        if self.control is not None:
            await self.control.close()
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

    async def fresh_snapshot(self) -> None:
        """The election's snapshot, at most FRESH_S old (waiting at most FRESH_WAIT_S):
        the peers' last-seen ages are the election's, not the latest snapshot's."""
        if self.election is None or self.election.channel.closed or not self.election_ready:
            return
        if time.monotonic() - self.snap.at < FRESH_S:
            return
        if self._fresh is None or self._fresh.done():
            self._fresh = self._loop.create_future()
            self.election.channel.send(process.SnapshotRequest())
        try:
            await within(asyncio.shield(self._fresh), FRESH_WAIT_S)
        except TimeoutError:
            pass

    def _election_alive(self) -> bool:
        return time.monotonic() - self.snap.at < SNAPSHOT_STALE_S

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
        if keys != self.keys:
            before, after = KeyRing(self.keys).describe({}), KeyRing(keys).describe({})
            self.keys = keys
            # a rotation: the election signs with the new signing key from its next
            # advert on and accepts every configured key; its replay state is kept
            self.log.info("keys_reloaded", signing=after["signing"], accepted=after["accepted"],
                          previous_signing=before["signing"])
        await self.dataplane.reload(new)
        if new.announce != old.announce:
            await self._reload_announcer(new)
        if self.election is not None:
            self.election.channel.send(self._setup())
        await self.hooks.reconfigure(new.notify)
        if new.track != self.tracker.cfg:
            await self.tracker.close()
            self.tracker = Tracker(new.track, self._on_track_change, self.log, netns=self.netns,
                                   node_interface=new.node.interface)
            await self.tracker.start()
            self._on_track_change()  # items no longer configured stop counting
        self.log.info("reloaded", config=str(new.path))
        return {"ok": True, "data": {"reloaded": str(new.path)}}

    async def _reload_announcer(self, new: config_mod.Config) -> None:
        """Announce (and answer for) the reloaded VIP set: added VIPs move with the next
        takeover, removed ones are no longer announced. A master re-announces at once."""
        fresh = self._announcer(new)
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

    # -- the election's side: commands down, steps and snapshots up ---------------

    def submit_command(self, cmd: fsm.Command) -> None:
        if self.election is not None and not self.election.channel.closed:
            self.election.channel.send(cmd)

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

    def _on_channel(self) -> None:
        assert self.election is not None
        chan = self.election.channel
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
                    self.steps.append(m)
                case Ready():
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(m)
                case Failed(error=error):
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_exception(RuntimeError(f"election transport: {error}"))
        if self.steps and not self._busy:
            self._run_steps()

    def _election_gone(self) -> None:
        assert self.election is not None
        self._loop.remove_reader(self.election.channel.fileno())
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError("the election process exited at start"))
            return
        if self.done.is_set():
            return
        code = self.election.wait(1.0)
        self.log.error("election_process_exited", pid=self.election.pid, code=code)
        self.exit_code = EXIT_FAILURE
        self.done.set()

    def _poll_telemetry(self) -> None:
        self.telemetry.poll_announcement(self.announcer.first_sent_at)

    def _systemd_status(self) -> str:
        st = self.snap.status
        return role_status(st["state"], st["priority"], st["effective_priority"],
                           (st["master"] or {}).get("node"), st["faults"])

    # -- carrying out steps: one at a time, in order --------------------------------
    #
    # A step is carried out in the callback that brought it. Next-hop mode's address
    # changes await the kernel: they continue in a task, and steps arriving meanwhile
    # wait behind it, so the order never changes.

    def _run_steps(self) -> None:
        self._busy = True
        while self.steps:
            step = self.steps.popleft()
            if isinstance(step, Snapshot):
                self._set_snapshot(step)
                self._after_step()
                continue
            if step.snapshot is not None:  # what the transitions and the waiters see
                self._set_snapshot(step.snapshot)
            if self.nexthop is not None and any(isinstance(a, (fsm.StartAnnounce, fsm.StopAnnounce))
                                                for a in step.actions):
                self._pending = self._loop.create_task(self._run_step_async(step), name="step")
                return  # still busy: the task carries on with the queue
            try:
                for i, action in enumerate(step.actions):
                    self._do(action, step, i)
            except Exception:  # a bug must not stop the director: log it, go on
                self.log.exception("internal_error")
            self._step_done(step)
        self._busy = False

    async def _run_step_async(self, step: Step) -> None:
        try:
            for i, action in enumerate(step.actions):
                match action:
                    case fsm.StartAnnounce(reason=reason) if self.nexthop is not None:
                        try:
                            await self.nexthop.add()
                        except Exception as exc:  # noqa: BLE001 - reported; the election goes on
                            self.log.error("next_hop_error", error=str(exc))
                        self.announcer.start(reason)
                    case fsm.StopAnnounce() if self.nexthop is not None:
                        self.announcer.stop()
                        try:
                            await self.nexthop.remove()
                        except Exception as exc:  # noqa: BLE001
                            self.log.error("next_hop_error", error=str(exc))
                    case _:
                        self._do(action, step, i)
            self._step_done(step)
        except Exception:  # a bug must not stop the director: log it, go on
            self.log.exception("internal_error")
        finally:
            self._busy = False
            self._pending = None
        if self.steps:
            self._run_steps()

    def _step_done(self, step: Step) -> None:
        self._after_step()

    def _set_snapshot(self, snap: Snapshot) -> None:
        self.snap = snap
        if self._fresh is not None and not self._fresh.done():
            self._fresh.set_result(None)

    def _after_step(self) -> None:
        st = self.snap.status
        if st["maintenance"] != self.maintenance_saved and st["state"] != State.INIT.name:
            self._save_maintenance(st["maintenance"])
        self.waiters = [(what, fut) for what, fut in self.waiters if not fut.done()]
        self._poll_telemetry()

    def _do(self, action: fsm.Action, step: Step, index: int) -> None:
        done = step.done.get(index)
        match action:
            case fsm.InstallDelivery() | fsm.WithdrawDelivery() if isinstance(done, process.Flipped):
                self.dataplane.flipped(done.on, done.results, done.took_ms)
                if done.on:
                    self.telemetry.on_delivery_installed(done.at, announcing=self.cfg.announce.mode != "none")
            case fsm.Transition(old=old, new=new, reason=reason):
                self._transition(old, new, reason, step)
            case fsm.StartAnnounce(reason=reason):
                lead = (done.sent, done.first_at) if isinstance(done, process.LeadSent) and any(
                    done.sent.values()) else None
                self.announcer.start(reason, lead)
            case fsm.StopAnnounce():
                self.announcer.stop()
            case fsm.Exit(restart=restart):
                self.exit_restart = restart
                self.exit_code = EXIT_OK
                self.done.set()
            case fsm.Completed(command=command, data=data):
                self._complete(command, data)
            case fsm.Refused(command=command, reason=reason):
                self.log.warning("command_refused", command=command, reason=reason)
                self._fail_waiters(command, reason)
            case fsm.Notice(kind=kind, peer=peer, detail=detail):
                self.notices[kind] += 1
                if kind == NoticeKind.SPLIT_BRAIN:
                    self.telemetry.on_split_brain(time.monotonic())
                level = "warning" if kind in WARNING_NOTICES else "info"
                getattr(self.log, level)(str(kind), peer=peer, detail=detail)

    def _transition(self, old: State, new: State, reason: str, step: Step) -> None:
        entry = {"from": old.name, "to": new.name, "reason": reason, "at": step.decided_wall}
        self.history.append(entry)
        st = step.snapshot.status if step.snapshot is not None else self.snap.status
        # decided_at: when the election decided (unix time); a takeover's flip and first
        # announcement went out before the election process sent this step
        self.log.info("transition", **{"from": old.name, "to": new.name}, reason=reason,
                      priority=st["effective_priority"], peer=(st["master"] or {}).get("node") or "",
                      decided_at=round(step.decided_wall, 6))
        self.telemetry.on_transition(old.name, new.name, reason, step.decided_mono)
        self.hooks.transition(new.name, old.name, reason)
        self.notifier.status(self._systemd_status())

    # -- control commands -----------------------------------------------------------

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

    async def _wait_for(self, what: str, cmd: fsm.Command, timeout: float) -> dict[str, Any]:
        fut = self._loop.create_future()
        self.waiters.append((what, fut))
        self.submit_command(cmd)
        try:
            return await within(fut, timeout)
        except TimeoutError:
            return {"ok": False, "error": f"{what} did not complete within {timeout:g} s "
                                          f"(state {self.snap.status['state']})"}

    def counters(self) -> DaemonCounters:
        """Every counter of the director, its parts and the election process (its latest
        snapshot), typed: what the metrics read, and what :meth:`status` shows."""
        return DaemonCounters(
            adverts=self.snap.adverts,
            notices=NoticeCounters(self.notices),
            reconcile=self.dataplane.counters(),
            announce=self.announcer.counters(),
            notify=self.hooks.counters(),
            control=self.control.counters() if self.control is not None else ControlCounters(),
            metrics=self.metrics_server.counters() if self.metrics_server is not None else MetricsServerCounters(),
            transport=self.snap.transport,
        )

    def status(self) -> dict[str, Any]:
        counted = self.counters()
        snap = self.snap
        age = max(0.0, time.monotonic() - snap.at)
        st = dict(snap.status)
        st["peers"] = [{**p, "last_seen_s": round(p["last_seen_s"] + age, 3)} for p in st["peers"]]
        interval = self.cfg.election.advert_interval_ms
        election_pid = self.election.pid if self.election is not None else None
        st.update({
            "version": __version__,
            "config": str(self.cfg.path),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_wall, 3),
            "last_transition": self.history[-1] if self.history else None,
            "transitions": list(self.history),
            "adverts": counted.adverts.as_dict(),
            "keys": {**snap.keys, "replay_window_ms": self.cfg.election.max_clock_skew_ms},
            "scheduling": _election_scheduling(election_pid).describe(interval),
            "election": {"pid": election_pid, "snapshot_age_s": round(age, 3),
                         "director_scheduling": sched.current().describe(interval)},
            "dataplane": self.dataplane.status(),
            "ipvs_available": self.dataplane.ipvs_available,
            "announce": self.announcer.status(),
            "transport": counted.transport.as_dict() if self.election_ready else {},
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
            await self.fresh_snapshot()
            return {"ok": True, "data": self.status()}
        self.log.info("control", cmd=cmd, uid=peer.uid, pid=peer.pid)
        # the election decides, refuses and completes these (fsm.Completed, fsm.Refused)
        if cmd == "promote":
            return await self._wait_for("promote", fsm.Promote(), timeout)
        if cmd == "demote":
            return await self._wait_for("demote", fsm.Demote(), timeout)
        if cmd == "maintenance":
            on = req.get("on")
            if not isinstance(on, bool):
                return {"ok": False, "error": "maintenance needs on: true|false"}
            return await self._wait_for("maintenance", fsm.SetMaintenance(on), timeout)
        state = self.snap.status["state"]
        if cmd == "reload":
            return await self.reload()
        if cmd == "announce":
            if state != State.MASTER.name:
                return {"ok": False, "error": f"not master (state is {state})"}
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


def _election_scheduling(pid: int | None) -> sched.Scheduling:
    """The election process's scheduling (what the adverts' timing depends on)."""
    try:
        return sched.current(pid or 0)
    except OSError:  # it has just exited
        return sched.current()


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
    # before the event loop and any thread: the election process is a fork of this one
    election = process.fork(cfg, cfg.shared_digest()[:16], log.bind(node=cfg.node.name))

    async def _run() -> tuple[int, bool]:
        daemon = Daemon(cfg, keys, log, election=election)
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
