"""The lab topology: network namespaces, veth pairs and a bridge.

::

    client --- router --- [lan: bridge] --- director-a
     203.0.113.2  .1 | 192.0.2.1           `-- director-b
                     |                      (`-- real servers, later)

* client -- router: 203.0.113.0/24 and 2001:db8:c::/64 (router .1 / ::1, client .2 / ::2).
* router -- LAN: 192.0.2.0/24 and 2001:db8:1::/64; router .1, director-a .11, director-b .12
  (IPv6 ``2001:db8:1::1``, ``::11``, ``::12``, added with ``nodad``).
* VIPs: 198.51.100.0/24 and 2001:db8:100::/64. In ``per-vip`` mode the router has both
  prefixes on-link on its LAN interface (a route ``dev``, not an address), so it resolves
  every VIP with ARP/NS on the LAN. In ``next-hop`` mode it routes them via the floating
  next hop 192.0.2.100 / 2001:db8:1::100 that only the master holds.
* Directors hold no VIP on any interface; each runs the responder (:mod:`netnslab.responder`).
  In ``per-vip`` mode they have the VIP prefixes on-link on their LAN interface (a
  route ``dev``, like the router; the daemon checks it at start).

Every name the lab creates carries its per-run prefix (``vf<6 hex>-``): namespaces are
``<prefix><role>`` and links are created directly inside those namespaces (never in the
caller's) and named ``<prefix>eth0`` etc. A state file ``/run/netns-lab/<name>.json``
lists the namespaces, processes and files of a lab *before* they are created, so
``netns-lab down NAME`` (:func:`destroy`) removes the leftovers of a lab whose owner died.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("NETNS_LAB_STATE_DIR", "/run/netns-lab"))
NAME_RE = re.compile(r"^vf[a-z0-9]{1,6}$")

CLIENT4 = ipaddress.ip_interface("203.0.113.2/24")
CLIENT6 = ipaddress.ip_interface("2001:db8:c::2/64")
ROUTER_CLIENT4 = ipaddress.ip_interface("203.0.113.1/24")
ROUTER_CLIENT6 = ipaddress.ip_interface("2001:db8:c::1/64")
ROUTER_LAN4 = ipaddress.ip_interface("192.0.2.1/24")
ROUTER_LAN6 = ipaddress.ip_interface("2001:db8:1::1/64")
VIP_NET4 = ipaddress.ip_network("198.51.100.0/24")
VIP_NET6 = ipaddress.ip_network("2001:db8:100::/64")
NEXT_HOP4 = ipaddress.ip_interface("192.0.2.100/24")
NEXT_HOP6 = ipaddress.ip_interface("2001:db8:1::100/64")
#: default VIPs the demo and tests probe (all inside VIP_NET4 / VIP_NET6)
DEFAULT_VIPS = (ipaddress.ip_address("198.51.100.10"), ipaddress.ip_address("198.51.100.11"),
                ipaddress.ip_address("2001:db8:100::10"))
RESPONDER_PORT = 7
#: director name -> host number on the LAN (192.0.2.N, 2001:db8:1::N)
DIRECTOR_HOSTS = {"director-a": 11, "director-b": 12, "director-c": 13}
ANNOUNCE_MODES = ("per-vip", "next-hop")


class LabError(RuntimeError):
    """A lab command failed (the message carries the command and its stderr)."""


def run(args: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; raise LabError with stderr if it fails."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _proc_starttime(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (guards against PID reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parens: fields after the last ')' are fixed
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[19])


def _proc_alive(pid: int, starttime: int | None) -> bool:
    st = _proc_starttime(pid)
    if st is None:
        return False
    if starttime is not None and st != starttime:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_process(pid: int, starttime: int | None, *, timeout: float = 3.0,
                 sig: int = signal.SIGTERM) -> None:
    """Signal one recorded process (only if it is still the same process), then SIGKILL
    it if it has not exited within ``timeout``."""
    if not _proc_alive(pid, starttime):
        return
    for s in (sig, signal.SIGKILL):
        try:
            os.kill(pid, s)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # reap it if it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _proc_alive(pid, starttime):
                return
            time.sleep(0.02)


@dataclass
class Host:
    """One namespace of the lab and its interface on the LAN (or toward the client)."""

    role: str
    ns: str
    iface: str
    addr4: ipaddress.IPv4Interface
    addr6: ipaddress.IPv6Interface

    @property
    def ip4(self) -> ipaddress.IPv4Address:
        return self.addr4.ip

    @property
    def ip6(self) -> ipaddress.IPv6Address:
        return self.addr6.ip


@dataclass
class Spawned:
    name: str
    ns: str
    popen: subprocess.Popen[bytes]
    starttime: int | None
    log: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class LabState:
    """What a lab has created (or is about to): written to the state file."""

    name: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    workdir: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "namespaces": self.namespaces,
                           "processes": self.processes, "workdir": self.workdir,
                           "info": self.info}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        d = json.loads(text)
        return cls(name=d["name"], namespaces=list(d.get("namespaces", [])),
                   processes=list(d.get("processes", [])), workdir=d.get("workdir", ""),
                   info=dict(d.get("info", {})))


def new_name() -> str:
    return "vf" + secrets.token_hex(3)


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


class Lab:
    """The namespace lab. Use as a context manager; teardown removes everything it made.

    >>> with Lab() as lab:                       # doctest: +SKIP
    ...     lab.exec("client", "ping", "-c1", "192.0.2.11")
    """

    def __init__(self, name: str | None = None, *, directors: Sequence[str] = ("director-a", "director-b"),
                 announce_mode: str = "per-vip", responders: bool = True,
                 responder_port: int = RESPONDER_PORT, workdir: str | os.PathLike[str] | None = None,
                 python: str = sys.executable, keep_state: bool = False):
        self.name = name or new_name()
        if not NAME_RE.match(self.name):
            raise LabError(f"lab name must match {NAME_RE.pattern} (short: link names carry it), got {self.name!r}")
        if announce_mode not in ANNOUNCE_MODES:
            raise LabError(f"announce_mode must be one of {ANNOUNCE_MODES}, got {announce_mode!r}")
        for d in directors:
            if d not in DIRECTOR_HOSTS:
                raise LabError(f"unknown director {d!r} (known: {', '.join(DIRECTOR_HOSTS)})")
        self.prefix = self.name + "-"
        self.director_names = tuple(directors)
        self.announce_mode = announce_mode
        self.start_responders = responders
        self.responder_port = responder_port
        self.python = python
        self.keep_state = keep_state
        self._workdir_arg = workdir
        self.workdir = Path()
        self.state = LabState(self.name)
        self.hosts: dict[str, Host] = {}
        self.processes: list[Spawned] = []
        self._built = False
        self._owns_state = False  # set once up() wrote the state file (never remove another's)

    # -- names ------------------------------------------------------------
    def ns(self, role: str) -> str:
        """Namespace name of a role: ``client``, ``router``, ``lan``, ``director-a`` ..."""
        return self.prefix + role

    def link(self, short: str) -> str:
        name = self.prefix + short
        assert len(name) <= 15, name
        return name

    @property
    def client(self) -> Host:
        return self.hosts["client"]

    @property
    def router(self) -> Host:
        return self.hosts["router"]

    @property
    def directors(self) -> list[Host]:
        return [self.hosts[d] for d in self.director_names]

    def director(self, name: str) -> Host:
        return self.hosts[name]

    # -- state file -------------------------------------------------------
    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = state_path(self.name).with_suffix(".tmp")
        tmp.write_text(self.state.to_json())
        os.replace(tmp, state_path(self.name))

    # -- lifecycle --------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        if state_path(self.name).exists():
            raise LabError(f"a lab named {self.name} exists ({state_path(self.name)}); "
                           f"`netns-lab down {self.name}` first")
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"netns-lab-{self.name}-"))
        else:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.state.workdir = str(self.workdir)
        self.state.info = {"directors": list(self.director_names), "announce_mode": self.announce_mode,
                           "responder_port": self.responder_port}
        self._save_state()
        self._owns_state = True
        self._build()
        self._built = True
        if self.start_responders:
            for d in self.director_names:
                self.start_responder(d)
        return self

    def down(self) -> None:
        """Stop every process the lab started, delete its namespaces, workdir and state file."""
        if not self._owns_state:
            return
        for p in reversed(self.processes):
            stop_process(p.pid, p.starttime)
            try:
                p.popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        _destroy_state(self.state, keep_workdir=self.keep_state)
        if not self.keep_state:
            try:
                state_path(self.name).unlink()
            except FileNotFoundError:
                pass

    # -- building ---------------------------------------------------------
    def _add_ns(self, role: str) -> str:
        ns = self.ns(role)
        self.state.namespaces.append(ns)
        self._save_state()  # recorded before it exists: a crash leaves nothing unlisted
        run(["ip", "netns", "add", ns])
        self.ip(role, "link", "set", "lo", "up")
        # no DAD: addresses (and link-locals) are usable at once; nothing else changes
        self.sysctl(role, "net.ipv6.conf.all.accept_dad", "0")
        self.sysctl(role, "net.ipv6.conf.default.accept_dad", "0")
        return ns

    def _veth(self, role_a: str, name_a: str, role_b: str, name_b: str) -> None:
        """A veth pair created inside role_a's namespace with its peer in role_b's."""
        self.ip(role_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b,
                "netns", self.ns(role_b))

    def _build(self) -> None:
        for role in ("lan", "router", "client", *self.director_names):
            self._add_ns(role)
        self.sysctl("lan", "net.ipv6.conf.all.disable_ipv6", "1")
        self.sysctl("lan", "net.ipv6.conf.default.disable_ipv6", "1")
        br = self.link("br0")
        self.ip("lan", "link", "add", br, "type", "bridge", "mcast_snooping", "0", "stp_state", "0")
        self.ip("lan", "link", "set", br, "up")

        # client -- router
        c_if, r_cif = self.link("eth0"), self.link("eth0")
        self._veth("client", c_if, "router", r_cif)
        # router -- lan bridge
        r_lif, port = self.link("eth1"), self.link("p-r")
        self._veth("router", r_lif, "lan", port)
        self._bridge_port(port)

        self.hosts["client"] = Host("client", self.ns("client"), c_if, CLIENT4, CLIENT6)
        self.hosts["router"] = Host("router", self.ns("router"), r_lif, ROUTER_LAN4, ROUTER_LAN6)
        self.router_client_iface = r_cif

        self._addr("client", c_if, CLIENT4, CLIENT6)
        self.ip("client", "route", "add", "default", "via", str(ROUTER_CLIENT4.ip))
        self.ip("client", "-6", "route", "add", "default", "via", str(ROUTER_CLIENT6.ip))

        self._addr("router", r_cif, ROUTER_CLIENT4, ROUTER_CLIENT6)
        self._addr("router", r_lif, ROUTER_LAN4, ROUTER_LAN6)
        self.sysctl("router", "net.ipv4.ip_forward", "1")
        self.sysctl("router", "net.ipv6.conf.all.forwarding", "1")
        if self.announce_mode == "per-vip":
            self.ip("router", "route", "add", str(VIP_NET4), "dev", r_lif)
            self.ip("router", "-6", "route", "add", str(VIP_NET6), "dev", r_lif)
        else:
            self.ip("router", "route", "add", str(VIP_NET4), "via", str(NEXT_HOP4.ip))
            self.ip("router", "-6", "route", "add", str(VIP_NET6), "via", str(NEXT_HOP6.ip))

        for d in self.director_names:
            n = DIRECTOR_HOSTS[d]
            d_if, port = self.link("eth0"), self.link("p-" + d.rsplit("-", 1)[-1][:3])
            self._veth(d, d_if, "lan", port)
            self._bridge_port(port)
            a4 = ipaddress.ip_interface(f"192.0.2.{n}/24")
            a6 = ipaddress.ip_interface(f"2001:db8:1::{n}/64")
            self.hosts[d] = Host(d, self.ns(d), d_if, a4, a6)
            self._addr(d, d_if, a4, a6)
            self.ip(d, "route", "add", "default", "via", str(ROUTER_LAN4.ip))
            self.ip(d, "-6", "route", "add", "default", "via", str(ROUTER_LAN6.ip))
            if self.announce_mode == "per-vip":
                # the VIP prefixes are on-link on the LAN for the directors too (a link
                # route, no address): the daemon checks this at start in per-VIP mode
                self.ip(d, "route", "add", str(VIP_NET4), "dev", d_if)
                self.ip(d, "-6", "route", "add", str(VIP_NET6), "dev", d_if)
        self._wait_carrier()
        self.state.info["hosts"] = {r: {"ns": h.ns, "iface": h.iface, "addr4": str(h.addr4),
                                        "addr6": str(h.addr6)} for r, h in self.hosts.items()}
        self._save_state()

    def add_real_server(self, role: str, n: int, vips: Sequence[str] = ("198.51.100.10", "198.51.100.11"),
                        conn_port: int | None = 8) -> Host:
        """An IPVS direct-routing real server on the LAN (VM tier): namespace ``role``,
        192.0.2.``n``, the ``vips`` on its ``lo`` (arp_ignore=1 / arp_announce=2 keep it
        silent for them), default route via the router, the responder on the lab port
        and, with ``conn_port``, the long-lived echo server of :mod:`netnslab.conns`."""
        self._add_ns(role)
        d_if, port = self.link("eth0"), self.link("p-" + role[-3:])
        self._veth(role, d_if, "lan", port)
        self._bridge_port(port)
        a4 = ipaddress.ip_interface(f"192.0.2.{n}/24")
        a6 = ipaddress.ip_interface(f"2001:db8:1::{n}/64")
        for key in ("all", "default"):
            self.sysctl(role, f"net.ipv4.conf.{key}.arp_ignore", "1")
            self.sysctl(role, f"net.ipv4.conf.{key}.arp_announce", "2")
        self._addr(role, d_if, a4, a6)
        self.ip(role, "route", "add", "default", "via", str(ROUTER_LAN4.ip))
        for v in vips:
            self.ip(role, "addr", "add", f"{v}/32", "dev", "lo")
        self.hosts[role] = Host(role, self.ns(role), d_if, a4, a6)
        self._wait_carrier()
        self.start_responder(role)
        if conn_port is not None:
            log = self.workdir / f"conns-{role}.log"
            sp = self.spawn(role, [self.python, "-m", "netnslab.conns", "server", "--name", role,
                                   "--port", str(conn_port), "--lifetime", "3600"], name=f"conns-{role}", log=log)
            self._wait_listening(role, sp)
        return self.hosts[role]

    def _wait_carrier(self, timeout: float = 10.0) -> None:
        """Wait until every lab link is operationally up (carrier reaches a veth's
        peer asynchronously, through the kernel's linkwatch, up to ~1 s later)."""
        deadline = time.monotonic() + timeout
        pending = list(self.state.namespaces)
        while pending:
            role = pending[0][len(self.prefix):]
            links = json.loads(self.ip(role, "-j", "link", "show").stdout)
            down = [link["ifname"] for link in links if link["ifname"] != "lo" and link.get("operstate") != "UP"]
            if not down:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise LabError(f"links without carrier after {timeout}s in {self.ns(role)}: {down}")
            time.sleep(0.05)

    def _bridge_port(self, port: str) -> None:
        self.ip("lan", "link", "set", port, "master", self.link("br0"))
        self.ip("lan", "link", "set", port, "up")

    def _addr(self, role: str, iface: str, a4: ipaddress.IPv4Interface, a6: ipaddress.IPv6Interface) -> None:
        self.ip(role, "addr", "add", str(a4), "dev", iface)
        self.ip(role, "-6", "addr", "add", str(a6), "dev", iface, "nodad")
        self.ip(role, "link", "set", iface, "up")

    # -- commands in namespaces -------------------------------------------
    def ip(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns of role> args...``"""
        return run(["ip", "-n", self.ns(role), *args], check=check)

    def exec(self, role: str, *args: str, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside a role's namespace and wait for it."""
        return run(["ip", "netns", "exec", self.ns(role), *args], check=check, timeout=timeout, input=input)

    def sysctl(self, role: str, key: str, value: str) -> None:
        self.exec(role, "sysctl", "-q", "-w", f"{key}={value}")

    def spawn(self, role: str, args: Sequence[str], *, name: str, log: Path | None = None,
              env: dict[str, str] | None = None) -> Spawned:
        """Start a long-running process in a role's namespace (stdout+stderr to ``log``).

        ``ip netns exec`` execs the command, so the recorded PID is the command's own:
        signals sent to it reach the program itself."""
        with open(log, "ab") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
            popen = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *args], stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        sp = Spawned(name=name, ns=self.ns(role), popen=popen, starttime=_proc_starttime(popen.pid), log=log)
        self.processes.append(sp)
        self.state.processes.append({"name": name, "pid": sp.pid, "starttime": sp.starttime,
                                     "ns": sp.ns})
        self._save_state()
        return sp

    def forget(self, sp: Spawned) -> None:
        """Drop a process that has exited from the lab's records."""
        if sp in self.processes:
            self.processes.remove(sp)
        self.state.processes = [p for p in self.state.processes
                                if not (p["pid"] == sp.pid and p["starttime"] == sp.starttime)]
        self._save_state()

    def start_responder(self, director: str, *, lifetime_s: float = 3600.0) -> Spawned:
        log = self.workdir / f"responder-{director}.log"
        sp = self.spawn(director, [self.python, "-m", "netnslab.responder", "--name", director,
                                   "--port", str(self.responder_port), "--lifetime", str(lifetime_s)],
                        name=f"responder-{director}", log=log)
        self._wait_listening(director, sp)
        return sp

    def _wait_listening(self, director: str, sp: Spawned, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sp.popen.poll() is not None:
                raise LabError(f"responder on {director} exited: {sp.log and sp.log.read_text()}")
            if sp.log and b"listening" in sp.log.read_bytes():
                return
            time.sleep(0.02)
        raise LabError(f"responder on {director} did not start within {timeout}s")

    # -- probing ----------------------------------------------------------
    def probe(self, targets: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address], *,
              interval_ms: float = 10.0, count: int = 1, duration_s: float = 10.0, timeout_ms: float = 500.0,
              tcp: bool = False, port: int | None = None, extra: Sequence[str] = (),
              tcp_every: int = 1) -> dict[str, Any]:
        """Run the prober in the client namespace and return its JSON result."""
        args = prober_args(self, targets, interval_ms=interval_ms, count=count, duration_s=duration_s,
                           timeout_ms=timeout_ms, tcp=tcp, port=port, extra=extra, tcp_every=tcp_every)
        proc = self.exec("client", *args, timeout=duration_s + timeout_ms / 1000 + 30)
        return json.loads(proc.stdout)

    def start_prober(self, targets: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address], *,
                     out: Path, interval_ms: float = 10.0, count: int = 1000, duration_s: float = 10.0,
                     timeout_ms: float = 500.0, tcp: bool = False, port: int | None = None,
                     log: Path | None = None, prefix: Sequence[str] = (), tcp_every: int = 1) -> Spawned:
        """Start the prober in the background; its JSON result goes to ``out``
        (call :func:`read_prober` after it exits). ``log``: its stderr (default
        ``prober.log``, shared); ``prefix``: a command wrapper such as ``chrt -r 5``;
        ``tcp_every``: with ``tcp``, a new connection every that many rounds only."""
        args = prober_args(self, targets, interval_ms=interval_ms, count=count, duration_s=duration_s,
                           timeout_ms=timeout_ms, tcp=tcp, port=port, extra=("--out", str(out)),
                           tcp_every=tcp_every)
        return self.spawn("client", [*prefix, *args], name="prober", log=log or self.workdir / "prober.log")

    # -- inspection -------------------------------------------------------
    def neigh(self, role: str, addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> dict[str, Any] | None:
        """The neighbour entry of ``addr`` in a role's namespace (``ip -j neigh``), or None."""
        fam = "-6" if ipaddress.ip_address(str(addr)).version == 6 else "-4"
        out = self.ip(role, "-j", fam, "neigh", "show", "to", str(addr)).stdout.strip()
        entries = json.loads(out) if out else []
        return entries[0] if entries else None

    def mac(self, role: str) -> str:
        h = self.hosts[role]
        info = json.loads(self.ip(role, "-j", "link", "show", "dev", h.iface).stdout)
        return info[0]["address"]

    def add_manual_delivery(self, director: str, table: int = 100, prio: int = 100) -> None:
        """The HOWTO recipe by hand (what the daemon installs on the master)."""
        self.ip(director, "rule", "add", "prio", str(prio), "to", str(VIP_NET4), "table", str(table))
        self.ip(director, "-6", "rule", "add", "prio", str(prio), "to", str(VIP_NET6), "table", str(table))
        self.ip(director, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(table))
        self.ip(director, "-6", "route", "add", "local", "::/0", "dev", "lo", "table", str(table))

    def del_manual_delivery(self, director: str, table: int = 100, prio: int = 100) -> None:
        self.ip(director, "rule", "del", "prio", str(prio), "to", str(VIP_NET4), "table", str(table))
        self.ip(director, "-6", "rule", "del", "prio", str(prio), "to", str(VIP_NET6), "table", str(table))
        self.ip(director, "route", "flush", "table", str(table))
        self.ip(director, "-6", "route", "flush", "table", str(table))


def prober_args(lab: Lab, targets: Sequence[Any], *, interval_ms: float, count: int, duration_s: float,
                timeout_ms: float, tcp: bool, port: int | None, extra: Sequence[str] = (),
                tcp_every: int = 1) -> list[str]:
    args = [lab.python, "-m", "netnslab.prober", "--port", str(port or lab.responder_port),
            "--interval-ms", str(interval_ms), "--count", str(count), "--duration", str(duration_s),
            "--timeout-ms", str(timeout_ms)]
    if tcp:
        args.append("--tcp")
        if tcp_every != 1:
            args += ["--tcp-every", str(tcp_every)]
    args.extend(extra)
    args.extend(str(t) for t in targets)
    return args


def read_prober(out: Path) -> dict[str, Any]:
    return json.loads(Path(out).read_text())


def _destroy_state(state: LabState, *, keep_workdir: bool = False) -> list[str]:
    """Remove what a state file lists. Returns what was removed (for the CLI)."""
    removed: list[str] = []
    for p in reversed(state.processes):
        if _proc_alive(int(p["pid"]), p.get("starttime")):
            stop_process(int(p["pid"]), p.get("starttime"))
            removed.append(f"process {p['name']} ({p['pid']})")
    existing = set(run(["ip", "netns", "list"], check=False).stdout.split())
    for ns in reversed(state.namespaces):
        if not ns.startswith(state.name + "-"):
            continue  # never touch a namespace that is not ours
        if ns in existing or Path(f"/run/netns/{ns}").exists():
            run(["ip", "netns", "del", ns], check=False)
            removed.append(f"netns {ns}")
    if state.workdir and not keep_workdir and Path(state.workdir).is_dir() \
            and Path(state.workdir).name.startswith(f"netns-lab-{state.name}-"):
        shutil.rmtree(state.workdir, ignore_errors=True)
        removed.append(f"dir {state.workdir}")
    return removed


def destroy(name: str) -> list[str]:
    """Remove the leftovers of a lab by name (its state file lists them)."""
    path = state_path(name)
    if not path.exists():
        raise LabError(f"no lab named {name} ({path} does not exist)")
    state = LabState.from_json(path.read_text())
    removed = _destroy_state(state)
    path.unlink(missing_ok=True)
    return removed


def list_labs() -> list[LabState]:
    if not STATE_DIR.is_dir():
        return []
    out = []
    for p in sorted(STATE_DIR.glob("*.json")):
        try:
            out.append(LabState.from_json(p.read_text()))
        except (OSError, ValueError, KeyError):
            continue
    return out
