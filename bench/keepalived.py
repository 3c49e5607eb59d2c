"""Debian's keepalived in the lab's director namespaces: config generation and process control.

:func:`render_config` writes a keepalived.conf equivalent to our daemon's settings (same
priorities, same advert interval: VRRPv3 below 1 s, VRRPv2 with PASS auth at 1 s and
above; VIPs as ``virtual_ipaddress_excluded``; optional ``virtual_rules`` /
``virtual_routes`` for VIP-less delivery behind a floating next hop).
:class:`Keepalived` runs one instance in a director namespace with ``-P`` (VRRP only:
this kernel has no IPVS), ``-R`` (no respawn: a killed VRRP child stays dead), ``-n``
(no fork), ``-l -D`` (log to the console, detailed), ``-G`` (no syslog) and its own
pid files (``-p``/``-r``) and config (``-f``) in a temp dir. It is stopped by PID.

keepalived's console log carries wall-clock timestamps to the second only, so the
bench timestamps every log line itself as it reads it (a reader thread, line
buffered stdout): that is the "decision" time of a transition, within the pipe's
latency (microseconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from netnslab import topology

KEEPALIVED = shutil.which("keepalived") or "/usr/sbin/keepalived"


@dataclass(frozen=True)
class KaSettings:
    priority: int
    advert_interval_ms: int = 100
    vrid: int = 51
    preempt: bool = True
    vips: tuple[str, ...] = ()          # virtual_ipaddress_excluded (each one address, with prefix)
    floating: tuple[str, ...] = ()      # virtual_ipaddress (e.g. the floating next hop 192.0.2.100/24)
    rules: tuple[str, ...] = ()         # virtual_rules lines
    routes: tuple[str, ...] = ()        # virtual_routes lines
    auth_pass: str = "vfbench1"         # VRRPv2 only
    extra_global: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return 3 if self.advert_interval_ms < 1000 else 2


def render_config(name: str, iface: str, s: KaSettings) -> str:
    adv = s.advert_interval_ms / 1000
    g = [f"    router_id {name}", f"    vrrp_version {s.version}", "    vrrp_strict" if False else "",
         # scripts are not used; the defaults for GARP (5 repeats, no delay) are kept
         *[f"    {x}" for x in s.extra_global]]
    lines = ["global_defs {", *[x for x in g if x], "}", "", "vrrp_instance VI_BENCH {",
             "    state BACKUP", f"    interface {iface}", f"    virtual_router_id {s.vrid}",
             f"    priority {s.priority}", f"    advert_int {adv:g}"]
    if not s.preempt:
        lines.append("    nopreempt")
    if s.version == 2:
        lines += ["    authentication {", "        auth_type PASS", f"        auth_pass {s.auth_pass}", "    }"]
    # keepalived refuses an instance without any virtual_ipaddress ("at least one is
    # required"): without a floating address, the first VIP goes there, the rest excluded
    floating, vips = (s.floating, s.vips) if s.floating or not s.vips else (s.vips[:1], s.vips[1:])
    for key, items in (("virtual_ipaddress", floating), ("virtual_ipaddress_excluded", vips),
                       ("virtual_rules", s.rules), ("virtual_routes", s.routes)):
        if items:
            lines.append(f"    {key} {{")
            lines += [f"        {x}" for x in items]
            lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def addresses_added(s: KaSettings) -> int:
    """How many addresses keepalived adds when it becomes master with these settings:
    its ``virtual_ipaddress`` entries of the instance's family (the family of the
    first one; it ignores the others) and every ``virtual_ipaddress_excluded`` one."""
    floating, vips = (s.floating, s.vips) if s.floating or not s.vips else (s.vips[:1], s.vips[1:])
    if not floating:
        return len(vips)
    v6 = ":" in floating[0]
    return sum(1 for a in floating if (":" in a) == v6) + len(vips)


@dataclass
class LogLine:
    t: float  # unix time the bench read it
    text: str


class Keepalived:
    """One keepalived in a director namespace of a :class:`netnslab.topology.Lab`."""

    def __init__(self, lab: topology.Lab, director: str, settings: KaSettings, *, tag: str = ""):
        self.lab = lab
        self.director = director
        self.settings = settings
        self.tag = tag or f"ka-{director}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"vfbench-{self.tag}-", dir=lab.workdir))
        self.conf = self.dir / "keepalived.conf"
        self.pidfile = self.dir / "keepalived.pid"
        self.vrrp_pidfile = self.dir / "vrrp.pid"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starttime: int | None = None
        self.lines: list[LogLine] = []
        self._reader: threading.Thread | None = None
        self.write_config()

    def write_config(self) -> None:
        self.conf.write_text(render_config(self.director, self.lab.director(self.director).iface, self.settings))

    # -- process -------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def vrrp_pid(self, timeout: float = 5.0) -> int | None:
        """PID of the VRRP child (from its pid file)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return int(self.vrrp_pidfile.read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.02)
        return None

    def pids(self) -> list[int]:
        out = [p for p in (self.pid, self.vrrp_pid(0.5)) if p]
        return [p for p in out if Path(f"/proc/{p}").exists()]

    def start(self) -> float:
        if self.running:
            raise topology.LabError(f"{self.tag} already running")
        args = ["ip", "netns", "exec", self.lab.ns(self.director), "stdbuf", "-oL", "-eL", KEEPALIVED,
                "-P", "-R", "-n", "-l",
                "-G", "-f", str(self.conf), "-p", str(self.pidfile), "-r", str(self.vrrp_pidfile)]
        for f in (self.pidfile, self.vrrp_pidfile):
            f.unlink(missing_ok=True)
        t = time.time()
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, bufsize=0)
        self.starttime = topology._proc_starttime(self.popen.pid)
        self.lab.state.processes.append({"name": self.tag, "pid": self.popen.pid,
                                         "starttime": self.starttime, "ns": self.lab.ns(self.director)})
        self.lab._save_state()
        self._reader = threading.Thread(target=self._read, args=(self.popen,), daemon=True)
        self._reader.start()
        return t

    def _read(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        for raw in popen.stdout:
            self.lines.append(LogLine(time.time(), raw.decode(errors="replace").rstrip()))

    def kill(self) -> float:
        """SIGKILL both processes (parent and VRRP child): a crash. Returns the time."""
        child = self.vrrp_pid(0.5)
        t = time.time()
        for pid in (child, self.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reap(5)
        return t

    def term(self) -> float:
        """SIGTERM to the parent (graceful stop: priority-0 advert, addresses removed)."""
        assert self.pid is not None
        t = time.time()
        os.kill(self.pid, signal.SIGTERM)
        return t

    def stop(self, timeout: float = 10.0) -> None:
        if not self.running:
            self._forget()
            return
        self.term()
        if not self._reap(timeout):
            self.kill()
        self._forget()

    def _reap(self, timeout: float) -> bool:
        assert self.popen is not None
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        child = None
        try:
            child = int(self.vrrp_pidfile.read_text().strip())
        except (OSError, ValueError):
            pass
        if child and topology._proc_alive(child, None):
            # -R: the child exits when its parent does; give it a moment, then kill it
            deadline = time.monotonic() + 2
            while topology._proc_alive(child, None) and time.monotonic() < deadline:
                time.sleep(0.02)
            if topology._proc_alive(child, None):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._reader is not None:
            self._reader.join(timeout=2)
        return True

    def _forget(self) -> None:
        if self.popen is None:
            return
        self.lab.state.processes = [p for p in self.lab.state.processes
                                    if not (p["pid"] == self.popen.pid and p["starttime"] == self.starttime)]
        self.lab._save_state()

    # -- log -------------------------------------------------------------------------
    def log_text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def find(self, needle: str, after: float | None = None) -> LogLine | None:
        for line in list(self.lines):
            if needle in line.text and (after is None or line.t >= after):
                return line
        return None

    def wait_log(self, needle: str, timeout: float, after: float | None = None) -> LogLine:
        deadline = time.monotonic() + timeout
        while True:
            hit = self.find(needle, after)
            if hit is not None:
                return hit
            if time.monotonic() > deadline:
                raise topology.LabError(f"{self.tag}: no {needle!r} within {timeout}s; log tail: "
                                        f"{self.log_text()[-1500:]}")
            if not self.running:
                raise topology.LabError(f"{self.tag} exited: {self.log_text()[-1500:]}")
            time.sleep(0.01)

    def state(self) -> str | None:
        """MASTER / BACKUP / FAULT from the last state line of the log (None if none)."""
        for line in reversed(list(self.lines)):
            for word, st in (("Entering MASTER STATE", "MASTER"), ("Entering BACKUP STATE", "BACKUP"),
                             ("Entering FAULT STATE", "FAULT")):
                if word in line.text:
                    return st
        return None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_addresses(lab: topology.Lab, director: str, prefixes: Sequence[str]) -> None:
    """Remove addresses a killed keepalived left on the director's LAN interface
    (only those inside ``prefixes``: the VIP ranges and the floating next hop)."""
    iface = lab.director(director).iface
    for p in prefixes:
        fam = "-6" if ":" in p else "-4"
        lab.ip(director, fam, "addr", "flush", "dev", iface, "to", p, check=False)
