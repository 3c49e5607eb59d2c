"""vipless-failoverd: the director. The election runs in a process of its own.

``main`` forks the election process (election/process.py) before anything else runs:
it owns the advert socket, the FSM and its timer, and a takeover's delivery flip and
first announcement frames, at the unit's real-time priority. This process, the
director, at a lower priority, owns the rest; nothing in it can delay an advert:

- daemon.py: the entry point, and :class:`Daemon`: it builds the parts (reconciler,
  announcer, control socket, metrics, hooks, tracking, systemd) and runs the
  lifecycle: start, the election's start, stop, restart in place;
- steps.py: the channel: commands down; up, the election's steps, carried out in
  order, and its snapshots (what status shows);
- commands.py: the control socket's commands, ``status`` and the counters;
- reload.py: the config applied by diff; preflight.py: the checks start makes;
- statefiles.py: the resume marker and the maintenance file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import time
from typing import Any

from . import __version__, config as config_mod, sched
from .announce import Announcer
from .commands import ControlCommands, election_scheduling
from .control import ControlError, ControlServer
from .dataplane.nexthop import NextHopAddress
from .dataplane.reconcile import Dataplane
from .election import fsm, process
from .election.process import ElectionProcess, Snapshot
from .election.protocol import State
from .hooks import NotifyHooks
from .log import setup as setup_logging
from .metrics import MetricsServer, build_registry
from .preflight import check_startable, preflight
from .reload import reload as reload_by_diff
from .statefiles import MaintenanceFile, ResumeMarker
from .steps import StepRunner, first_snapshot
from .systemd import Notifier
from .telemetry import DaemonCounters
from .tracking import Tracker

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
SHUTDOWN_HOOK_GRACE_S = 3.0  # notify hooks still queued or running at exit get this long
#: the watchdog pings systemd only while the election's latest snapshot is this fresh
SNAPSHOT_STALE_S = 5.0


class Daemon:
    """The director: its parts, and their lifecycle (see the module doc)."""

    def __init__(self, cfg: config_mod.Config, keys: bytes | tuple[bytes, ...], log: Any,
                 netns: str | None = None, election: ElectionProcess | None = None):
        self.cfg = cfg
        self.keys = (keys,) if isinstance(keys, bytes) else tuple(keys)
        self.log = log.bind(node=cfg.node.name)
        self.netns = netns
        self.election = election
        self.loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self.digest = cfg.shared_digest()[:16]
        self.steps = StepRunner(self, first_snapshot(cfg, self.digest, self.keys))
        self.election_ready = False
        self.runtime_dir = cfg.control.socket.parent
        flags = election.flags if election is not None else None
        # the IPVS ownership record lives beside the control socket: one per daemon
        self.dataplane = Dataplane(cfg, self.log, ipvs_owned_path=self.runtime_dir / "ipvs-owned.json",
                                   delivery_source=(lambda: flags.delivery) if flags is not None else None)
        self.announcer = self.new_announcer(cfg)
        self.nexthop = NextHopAddress(cfg, self.log) if cfg.announce.mode == "next-hop" else None
        self.control: ControlServer | None = None
        self.commands = ControlCommands(self)
        self.exit_code: int | None = None
        self.exit_restart = False
        self.done = asyncio.Event()
        self.started_wall = time.time()
        self.resume = ResumeMarker(self.runtime_dir, cfg.node.name)
        self.maintenance = MaintenanceFile(cfg.control.state_dir, cfg.node.name, self.log)
        # operations: notify hooks, tracking, metrics, systemd (see hooks/tracking/metrics/systemd.py)
        self.hooks = NotifyHooks(cfg.notify, cfg.node.name, cfg.election.cluster_id, self.log)
        self.tracker = Tracker(cfg.track, self.steps.track_changed, self.log, netns=netns,
                               node_interface=cfg.node.interface)
        self.registry, self.telemetry = build_registry(
            self.status, self.counters, split_brain_gap_s=3 * cfg.election.advert_interval_ms / 1000.0 + 1.0,
            on_scrape=self.steps.poll_telemetry)
        self.metrics_server: MetricsServer | None = None
        self.notifier = Notifier.from_env()
        self._reload_lock = asyncio.Lock()

    def new_announcer(self, cfg: config_mod.Config) -> Announcer:
        announcer = Announcer(cfg, self.log)
        if self.election is not None:  # no frame after the election stopped announcing
            flags = self.election.flags
            announcer.allowed = lambda: flags.announce
        return announcer

    @property
    def snap(self) -> Snapshot:
        """The election's latest snapshot (steps.py)."""
        return self.steps.snap

    def receive(self, messages: list[Any]) -> None:
        self.steps.receive(messages)

    def status(self) -> dict[str, Any]:
        return self.commands.status()

    def counters(self) -> DaemonCounters:
        return self.commands.counters()

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        assert self.election is not None, "main() forks the election process first"
        resume = self.resume.take()
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
            await self.steps.start()  # the election process's Setup, until it has opened its socket
            self.election_ready = True
            self.control = ControlServer(self.cfg.control.socket, self.cfg.control.group, self.commands.answer,
                                         self.log)
            await self.control.start()
            await self.tracker.start()  # node.interface down: SetFault is sent before Start
            self.hooks.start()
            if self.cfg.metrics.listen:
                self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, self.registry,
                                                    self.log, before_render=self.steps.fresh_snapshot)
                await self.metrics_server.start()
        except (OSError, ControlError, config_mod.ConfigError, RuntimeError) as exc:
            self.log.error("startup_failed", error=str(exc))
            await self._shutdown_io(withdraw=not resume)
            self.election.kill()
            return EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signal_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        if self.maintenance.found():  # maintenance survives restarts until turned off
            self.steps.submit(fsm.SetMaintenance(True))
        self.steps.submit(fsm.Start(resume_master=resume))
        self.log.info("started", version=__version__, config=str(self.cfg.path), resume=resume,
                      priority=self.cfg.election.priority, interval_ms=self.cfg.election.advert_interval_ms,
                      transport=self.cfg.election.transport, ipvs_available=self.dataplane.ipvs_available,
                      election_pid=self.election.pid)
        scheduling = election_scheduling(self.election.pid)
        if scheduling.at_risk(self.cfg.election.advert_interval_ms):
            self.log.warning("no_realtime", policy=scheduling.policy,
                             interval_ms=self.cfg.election.advert_interval_ms,
                             advised_below_ms=sched.RT_ADVISED_BELOW_MS, advice=sched.ADVICE)
        # Everything built at start (config, prebuilt frames, VIP sets) lives as long as
        # the process: keep it out of the cyclic GC's scans, which otherwise grow with
        # the number of VIPs and cost the director CPU for nothing.
        gc.freeze()
        # the first reconcile ran in dataplane.start(): tell systemd we are up
        self.notifier.ready(self.steps.systemd_status())
        self.notifier.start_watchdog(healthy=self._election_alive)
        await self.done.wait()
        await self.steps.stop()
        # a restarting backup withdraws nothing either (it holds no delivery rules);
        # only a master leaves the marker that makes the next process resume as master
        # (and an election process that died leaves the kernel as a crash would)
        await self._shutdown_io(withdraw=not self.exit_restart and self.exit_code != EXIT_FAILURE)
        if self.exit_restart and self.snap.status["state"] == State.MASTER.name:
            self.resume.write(self.cfg.election.restart_hold_ms)
        if self.election.wait(process.EXIT_FLUSH_S + 1.0) is None:
            self.log.error("election_process_kept_running", pid=self.election.pid)
            self.election.kill()
        self.log.info("stopped", restart=self.exit_restart)
        return self.exit_code or EXIT_OK

    def _election_alive(self) -> bool:
        return time.monotonic() - self.snap.at < SNAPSHOT_STALE_S

    def _signal_stop(self, sig: int) -> None:
        self.log.info("signal", signal=signal.Signals(sig).name)
        self.notifier.stopping("stopping: handing over")
        self.steps.submit(fsm.Stop())

    def exit(self, restart: bool) -> None:
        """The election's Exit: run() goes on to stop, or to restart in place."""
        self.exit_restart = restart
        self.exit_code = EXIT_OK
        self.done.set()

    def election_exited(self) -> None:
        """The election process is gone (after start): exit 1, leaving the kernel as a crash would."""
        assert self.election is not None
        if self.done.is_set():
            return
        code = self.election.wait(1.0)
        self.log.error("election_process_exited", pid=self.election.pid, code=code)
        self.exit_code = EXIT_FAILURE
        self.done.set()

    async def _shutdown_io(self, withdraw: bool) -> None:
        self.steps.stop_reading()
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

    async def reload(self) -> dict[str, Any]:
        """The config file applied by diff (reload.py), or nothing changes and the answer says why."""
        async with self._reload_lock:  # SIGHUP and failoverctl reload, one at a time
            return await reload_by_diff(self)


# ---------------------------------------------------------------------------
# entry point


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
