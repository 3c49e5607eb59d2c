"""Run ``vipless-failoverd`` in the lab's director namespaces.

:class:`Daemon` is one daemon process: its generated config and key (in the lab's
workdir), its JSON log file, helpers to signal it, read its transitions from the log
(with their timestamps: the log is the precise clock for takeover times) and ask its
status through ``failoverctl``. :class:`Cluster` is the set of daemons of a lab that
share a key (the pair, or more).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from . import configgen, topology
from .configgen import NodeSettings

#: states the daemon reports
STATES = ("INIT", "BACKUP", "MASTER", "FAULT")
#: how long one ``failoverctl`` call may take, interpreter start included: under QEMU's
#: software emulation (the VM tier) a Python start alone can take seconds on a busy host
CTL_TIMEOUT_S = 30.0 if os.environ.get("VIPLESS_IN_VM") == "1" else 10.0


def _bin(name: str) -> str:
    """A console script of this venv (next to the running interpreter), else from PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise topology.LabError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def event_time(ev: Mapping[str, Any]) -> float | None:
    """Unix time of a structlog JSON event (``timestamp``/``ts``/``time``: float or ISO 8601)."""
    for key in ("timestamp", "ts", "time"):
        v = ev.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
            try:
                dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
            return dt.timestamp()  # naive: local time, like structlog's TimeStamper(utc=False)
    return None


def parse_log(text: str) -> list[dict[str, Any]]:
    """The JSON events of a daemon log (other lines, e.g. tracebacks, are skipped)."""
    events = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


class Daemon:
    """One ``vipless-failoverd`` in a director namespace."""

    def __init__(self, lab: topology.Lab, director: str, settings: NodeSettings, key_file: Path,
                 *, tag: str = ""):
        self.lab = lab
        self.director = director
        self.settings = settings
        self.key_file = key_file
        self.tag = tag or director
        self.dir = lab.workdir / self.tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "config.toml"
        self.control_socket = self.dir / "control.sock"
        self.log_path = self.dir / "daemon.log"
        self.proc: topology.Spawned | None = None
        self.starts = 0
        self.last_status_error = ""  # why the last polled status read as unknown
        #: a command wrapper for the next start, e.g. ``["chrt", "-r", "10"]`` (how the
        #: systemd unit schedules the daemon); it must exec the daemon (same PID)
        self.command_prefix: list[str] = []
        self.write_config()

    def write_config(self) -> None:
        doc = configgen.node_config(self.lab, self.director, self.settings, key_file=self.key_file,
                                    control_socket=self.control_socket)
        configgen.write_config(self.config_path, doc)

    def reconfigure(self, **changes: Any) -> None:
        """Change settings (takes effect at the next start)."""
        self.settings = replace(self.settings, **changes)
        self.write_config()

    # -- process ----------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def start(self) -> float:
        """Start the daemon; returns the unix time it was started."""
        if self.running:
            raise topology.LabError(f"{self.tag} is already running (pid {self.pid})")
        if self.proc is not None:
            self.lab.forget(self.proc)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"event": "netns-lab-start", "timestamp": time.time(),
                                "start": self.starts + 1}) + "\n")
        self.starts += 1
        t = time.time()
        self.proc = self.lab.spawn(self.director, [*self.command_prefix, _bin("vipless-failoverd"),
                                                   "--config", str(self.config_path), "--log-format", "json"],
                                   name=f"daemon-{self.tag}", log=self.log_path)
        return t

    @property
    def pids(self) -> list[int]:
        """The daemon's processes: the director (:attr:`pid`) and its election process."""
        if self.pid is None:
            return []
        return [self.pid, *children(self.pid)]

    def signal(self, sig: int) -> float:
        """Send a signal; returns the unix time just before it was sent.

        SIGSTOP, SIGCONT and SIGKILL go to the daemon's process group (it is started in
        a session of its own): a paused or crashed machine pauses or kills both of its
        processes. The others go to the director, which handles them."""
        if not self.running:
            raise topology.LabError(f"{self.tag} is not running")
        assert self.proc is not None
        t = time.time()
        if sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGKILL):
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)
        return t

    def kill(self) -> float:
        """SIGKILL (a crash)."""
        t = self.signal(signal.SIGKILL)
        self.wait_exit(5)
        return t

    def term(self) -> float:
        """SIGTERM (graceful stop: hand-over + drain); does not wait for the exit."""
        return self.signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise topology.LabError(f"{self.tag} did not exit within {timeout}s") from None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Graceful stop and wait; SIGKILL if it does not exit in time."""
        if not self.running:
            return self.proc.popen.returncode if self.proc else None
        self.term()
        try:
            return self.wait_exit(timeout)
        except topology.LabError:
            self.signal(signal.SIGKILL)
            return self.wait_exit(5)

    # -- log --------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self, *, current_run: bool = False) -> list[dict[str, Any]]:
        evs = parse_log(self.log_text())
        if current_run:
            starts = [i for i, e in enumerate(evs) if e.get("event") == "netns-lab-start"]
            if starts:
                evs = evs[starts[-1] + 1:]
        return evs

    def transitions(self, *, current_run: bool = True) -> list[dict[str, Any]]:
        return [e for e in self.events(current_run=current_run) if e.get("event") == "transition"]

    def log_state(self) -> str | None:
        """The state of the latest transition in the current run's log."""
        tr = self.transitions()
        return str(tr[-1].get("to")) if tr else None

    def wait_transition(self, to: str, timeout: float, *, after: float | None = None,
                        poll: float = 0.01) -> dict[str, Any]:
        """Wait for a logged transition to ``to`` (at or after unix time ``after``);
        returns the event (its time: :func:`event_time`)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.transitions():
                if str(ev.get("to")) != to:
                    continue
                t = event_time(ev)
                if after is None or (t is not None and t >= after):
                    return ev
            if time.monotonic() > deadline:
                raise topology.LabError(
                    f"{self.tag}: no transition to {to} within {timeout}s; transitions: "
                    f"{[(e.get('from'), e.get('to'), e.get('reason')) for e in self.transitions()]}; "
                    f"log tail: {self.log_text()[-1500:]}")
            if self.proc is not None and self.proc.popen.poll() is not None:
                raise topology.LabError(f"{self.tag} exited ({self.proc.popen.returncode}) while waiting "
                                        f"for {to}: {self.log_text()[-1500:]}")
            time.sleep(poll)

    # -- control ----------------------------------------------------------
    def ctl(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """``failoverctl --config CFG args...`` (the control socket is a path: no netns needed).
        ``timeout`` bounds the whole process (interpreter start included): by default
        :data:`CTL_TIMEOUT_S`."""
        return subprocess.run([_bin("failoverctl"), "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=CTL_TIMEOUT_S if timeout is None else timeout)

    def request(self, cmd: str, *, wait: float = 5.0, **fields: Any) -> dict[str, Any] | None:
        """One request on the control socket from this process, the way ``failoverctl``
        sends it (``{"cmd": ..., **fields}``; ``wait``: the socket timeout), without
        starting an interpreter: the daemon's answer (``{"ok": ..., "data"|"error": ...}``),
        or None if it is not reachable (between the two processes of a restart in place).

        For an event that must land at a known moment inside a measurement: a fresh
        ``failoverctl`` takes ~0.2 s to start on a host but 6-7 s in the TCG guest
        (measured: the restart reached the daemon 6.4 s after the call, after the probe
        window it was meant to fall in), and its start-up is CPU load the measurement
        then sees."""
        from vipless_failover.control import Unreachable, request
        try:
            return request(self.control_socket, {"cmd": cmd, **fields}, timeout=wait)
        except Unreachable:
            return None

    def status_now(self) -> dict[str, Any] | None:
        """The daemon's status through :meth:`request` (None: not reachable or refused)."""
        resp = self.request("status")
        return resp.get("data") if resp and resp.get("ok") else None

    def status(self) -> dict[str, Any] | None:
        """``failoverctl status --json``; None if the daemon is unreachable (exit 3)."""
        p = self.ctl("status", "--json")
        if p.returncode == 3:
            return None
        if p.returncode != 0:
            raise topology.LabError(f"failoverctl status for {self.tag}: exit {p.returncode}: {p.stderr.strip()}")
        return json.loads(p.stdout)

    def state(self) -> str | None:
        st = self.status()
        return None if st is None else str(st.get("state"))

    def _state_or_none(self) -> str | None:
        """:meth:`state` for polling loops: a status that fails or times out (a starting
        daemon, an emulated guest) reads as not known yet; the loop's deadline decides."""
        try:
            return self.state()
        except (topology.LabError, subprocess.TimeoutExpired, ValueError) as exc:
            self.last_status_error = f"{type(exc).__name__}: {str(exc)[-300:]}"
            return None

    def wait_state(self, state: str, timeout: float, poll: float = 0.05) -> dict[str, Any]:
        """Poll ``failoverctl status`` until the node reports ``state``; returns the status."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            if self.running:
                try:
                    last = self.status()
                except (topology.LabError, subprocess.TimeoutExpired, ValueError):
                    last = None
                if last is not None and last.get("state") == state:
                    return last
            if time.monotonic() > deadline:
                raise topology.LabError(f"{self.tag}: not {state} within {timeout}s (last status {last}); "
                                        f"log tail: {self.log_text()[-1500:]}")
            if self.proc is not None and self.proc.popen.poll() is not None:
                raise topology.LabError(f"{self.tag} exited ({self.proc.popen.returncode}): "
                                        f"{self.log_text()[-1500:]}")
            time.sleep(poll)


class Cluster:
    """The daemons of a lab that share one key (by default: one per lab director)."""

    def __init__(self, lab: topology.Lab, settings: Mapping[str, NodeSettings] | None = None,
                 *, key: bytes | None = None):
        self.lab = lab
        self.key_file = configgen.write_key(lab.workdir / "cluster.key", key)
        settings = settings or default_settings(lab.director_names)
        self.daemons: dict[str, Daemon] = {d: Daemon(lab, d, s, self.key_file) for d, s in settings.items()}
        self._extra: list[Daemon] = []

    def __getitem__(self, director: str) -> Daemon:
        return self.daemons[director]

    def __iter__(self):
        return iter(self.daemons.values())

    def start(self) -> None:
        for d in self.daemons.values():
            d.start()

    def stop(self) -> None:
        for d in [*self._extra, *self.daemons.values()]:
            if d.running:
                d.stop()

    def intruder(self, director: str, settings: NodeSettings, *, key: bytes | None = None,
                 tag: str | None = None) -> Daemon:
        """A daemon with its own (different, by default random) key, on a lab director."""
        tag = tag or f"intruder-{director}"
        key_file = configgen.write_key(self.lab.workdir / f"{tag}.key", key)
        d = Daemon(self.lab, director, settings, key_file, tag=tag)
        self._extra.append(d)
        return d

    def wait_converged(self, timeout: float, master: str | None = None) -> Daemon:
        """Wait until exactly one daemon is MASTER (``master``, if given) and all others
        BACKUP (by status); returns the master."""
        deadline = time.monotonic() + timeout
        states: dict[str, str | None] = {}
        while True:
            dead = [d for d in self.daemons.values() if d.proc is not None and not d.running]
            if dead and all(d.proc is not None and not d.running for d in self.daemons.values()):
                raise topology.LabError("every daemon exited: " + "; ".join(
                    f"{d.tag} ({d.proc.popen.returncode}): {d.log_text()[-800:]}" for d in dead if d.proc))
            states = {d.tag: (d._state_or_none() if d.running else "STOPPED") for d in self.daemons.values()}
            masters = [t for t, s in states.items() if s == "MASTER"]
            others_ok = all(s in ("BACKUP", "STOPPED") for t, s in states.items() if t not in masters)
            if len(masters) == 1 and others_ok and master in (None, masters[0]):
                return self.daemons[masters[0]]
            if time.monotonic() > deadline:
                tails = "; ".join(f"{d.tag} (status: {d.last_status_error}) log: {d.log_text()[-1500:]}"
                                  for d in self.daemons.values() if states.get(d.tag) not in ("MASTER", "BACKUP"))
                raise topology.LabError(f"no single master within {timeout}s: {states}"
                                        + (f"; {tails}" if tails else ""))
            time.sleep(0.05)

    def states(self) -> dict[str, str | None]:
        return {d.tag: (d.state() if d.running else None) for d in self.daemons.values()}

    def hold(self, expected: dict[str, str], seconds: float) -> None:
        """Assert that the states stay exactly ``expected`` for ``seconds`` (sampled
        through failoverctl every 0.2 s)."""
        end = time.monotonic() + seconds
        while True:
            states = self.states()
            assert states == expected, (states, expected)
            if time.monotonic() >= end:
                return
            time.sleep(0.2)


def children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children (from /proc; none if it has gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def default_settings(directors: Iterable[str], **common: Any) -> dict[str, NodeSettings]:
    """director-a priority 150, director-b 100, director-c 50 (all else per ``common``)."""
    prios = {"director-a": 150, "director-b": 100, "director-c": 50}
    return {d: NodeSettings(priority=prios.get(d, 100), **common) for d in directors}


def master_down_ms(interval_ms: int, priority: int) -> float:
    """VRRP master-down interval: 3 x interval + skew, skew = (256 - prio) x interval / 256."""
    return 3 * interval_ms + skew_ms(interval_ms, priority)


def skew_ms(interval_ms: int, priority: int) -> float:
    return (256 - priority) * interval_ms / 256
