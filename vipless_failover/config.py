"""Configuration: one TOML file, validated into frozen, typed objects.

Every error names the file, the key path and what is wrong, e.g.
``/etc/vipless-failover/a.toml: election.advert_interval_ms: must be 10..40950, got 5``.
Loading never touches the system (the key file is only read and checked).
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Routing tables the daemon must never use: unspec, default, main, local.
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
#: rtm_protocol / FRA_PROTOCOL value that marks rules, routes and addresses as ours
#: (iproute2 shows it by number; 0..4 are the kernel's and 8..19, 42, 186-188 are taken
#: by known daemons).
DEFAULT_RT_PROTOCOL = 98
#: per-VIP mode announces each address of each VIP prefix; the expansion is capped here
#: (larger sets belong in next-hop mode: one address, one announcement).
MAX_ANNOUNCED_VIPS = 65_536
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos")
FORWARD_METHODS = ("nat", "tun", "dr")
SERVICE_FLAGS = ("persistent", "hashed", "onepacket", "sh-fallback", "sh-port", "mh-fallback", "mh-port")
#: what is read of the config and key files at most (a config listing 65,536 VIPs one
#: address a line is ~1.6 MB; prefixes are shorter); bigger files are refused unread
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_KEY_BYTES = 4096
#: keys accepted besides election.key_file during a rotation, at most
MAX_ACCEPT_KEY_FILES = 3
#: the smallest replay window: below it, clocks kept by NTP on a LAN drift out of it
MIN_CLOCK_SKEW_MS = 100
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


class ConfigError(Exception):
    """A configuration problem: ``file: key.path: what is wrong``."""

    def __init__(self, key: str, message: str, file: str | os.PathLike[str] | None = None):
        self.key = key
        self.message = message
        self.file = str(file) if file is not None else None
        super().__init__(str(self))

    def with_file(self, file: str | os.PathLike[str]) -> ConfigError:
        return ConfigError(self.key, self.message, file)

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        prefix = f"{self.file}: " if self.file else ""
        return f"{prefix}{where}{self.message}"


# ---------------------------------------------------------------------------
# typed model


@dataclass(frozen=True)
class NodeConfig:
    name: str
    interface: str
    address: IPAddress


@dataclass(frozen=True)
class ElectionConfig:
    cluster_id: int
    priority: int
    advert_interval_ms: int
    preempt: bool
    preempt_delay_ms: int
    key_file: Path
    transport: str  # "multicast" | "unicast"
    group: IPAddress | None
    port: int
    peers: tuple[IPAddress, ...]
    drain_margin_ms: int
    drain_max_ms: int
    restart_hold_ms: int
    #: keys still accepted (never used to sign) while a new key_file is rolled out
    accept_key_files: tuple[Path, ...] = ()
    #: adverts whose counter (the sender's clock) is further than this from ours are
    #: refused (replay window; 0 = off)
    max_clock_skew_ms: int = 5000

    def without_keys(self) -> ElectionConfig:
        """This election config less what a reload may change (the keys, the window)."""
        return replace(self, key_file=Path(), accept_key_files=(), max_clock_skew_ms=0)


@dataclass(frozen=True)
class ControlConfig:
    socket: Path
    group: str
    state_dir: Path  # what must survive restarts (maintenance mode)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str  # "host:port", "" disables
    host: str
    port: int


@dataclass(frozen=True)
class DeliveryRule:
    """One ``ip rule``: by fwmark (with mask) and/or by destination, optionally by iif."""

    fwmark: int | None = None
    mask: int | None = None
    to: IPNetwork | None = None
    iif: str | None = None
    families: tuple[int, ...] = (4, 6)  # a fwmark rule exists for v4 and v6


@dataclass(frozen=True)
class DeliveryConfig:
    table: int
    rule_priority: int
    protocol: int
    rules: tuple[DeliveryRule, ...]


@dataclass(frozen=True)
class MarkGroup:
    name: str
    fwmark: int
    destinations: tuple[IPNetwork, ...]
    protocols: tuple[str, ...]
    ports: tuple[int, ...]


@dataclass(frozen=True)
class RealServer:
    address: IPAddress
    port: int
    weight: int
    forward: str  # nat | tun | dr


@dataclass(frozen=True)
class IpvsService:
    fwmark: int
    family: int  # 4 | 6
    scheduler: str
    persistence_s: int
    flags: tuple[str, ...]
    reals: tuple[RealServer, ...]


@dataclass(frozen=True)
class AnnounceConfig:
    mode: str  # "per-vip" | "next-hop" | "none"
    vips: tuple[IPNetwork, ...]
    next_hop: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    garp_forms: tuple[str, ...]
    rate_pps: int
    repeats: int
    repeat_interval_ms: int
    refresh_interval_s: int


@dataclass(frozen=True)
class DataplaneConfig:
    remove_on_stop: bool
    reconcile_interval_s: int


@dataclass(frozen=True)
class NotifyConfig:
    """Commands run on every transition (argv lists, never a shell), each given
    NEW_STATE OLD_STATE REASON NODE as extra arguments and in its environment."""

    commands: tuple[tuple[str, ...], ...] = ()
    timeout_ms: int = 5000


@dataclass(frozen=True)
class TrackCheck:
    """A check command run every interval; exit 0 = ok. ``weight`` 0 forces FAULT while
    failed, otherwise the effective priority is lowered by ``weight``."""

    name: str
    command: tuple[str, ...]
    interval_ms: int = 2000
    timeout_ms: int = 1000
    rise: int = 1
    fall: int = 1
    weight: int = 0


@dataclass(frozen=True)
class TrackInterface:
    """An extra interface whose link state is tracked (netlink events); ``weight`` as
    for checks. The node's own interface is always tracked and forces FAULT."""

    name: str
    weight: int = 0


@dataclass(frozen=True)
class TrackConfig:
    checks: tuple[TrackCheck, ...] = ()
    interfaces: tuple[TrackInterface, ...] = ()


@dataclass(frozen=True)
class Config:
    path: Path
    node: NodeConfig
    election: ElectionConfig
    control: ControlConfig
    metrics: MetricsConfig
    delivery: DeliveryConfig
    marks: tuple[MarkGroup, ...]
    ipvs: tuple[IpvsService, ...]
    announce: AnnounceConfig
    dataplane: DataplaneConfig
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def shared_digest(self) -> bytes:
        """SHA-256 over the part of the config that must agree across the cluster.

        Node identity, priority, preempt, key path, control and metrics are per node
        and excluded; VIPs, delivery, marks, IPVS and timing are shared.
        """
        shared = {
            "cluster_id": self.election.cluster_id,
            "advert_interval_ms": self.election.advert_interval_ms,
            "delivery": {k: v for k, v in self.raw.get("delivery", {}).items()},
            "marks": self.raw.get("marks", []),
            "ipvs": self.raw.get("ipvs", {}),
            "announce": {k: v for k, v in self.raw.get("announce", {}).items()},
        }
        blob = json.dumps(shared, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).digest()

    def vip_networks(self) -> tuple[IPNetwork, ...]:
        return self.announce.vips


# ---------------------------------------------------------------------------
# reading helpers


class _Table:
    """A TOML table being read: every key read is consumed; leftovers are errors."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(path, f"must be a table, got {_typename(data)}")
        self.data = dict(data)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def _take(self, name: str, default: Any, required: bool) -> Any:
        if name in self.data:
            return self.data.pop(name)
        if required:
            raise ConfigError(self.key(name), "is required")
        return default

    def table(self, name: str, required: bool = False) -> _Table:
        return _Table(self._take(name, {}, required), self.key(name))

    def tables(self, name: str) -> list[_Table]:
        value = self._take(name, [], False)
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"must be an array of tables, got {_typename(value)}")
        return [_Table(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def str(self, name: str, default: str | None = None, required: bool = False,
            choices: Iterable[str] | None = None, pattern: re.Pattern[str] | None = None) -> str:
        value = self._take(name, default, required and default is None)
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"must be a string, got {_typename(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise ConfigError(self.key(name), f"invalid value {value!r}")
        return value

    # below, str (and then int, bool, list) name the methods above: annotations say builtins.
    def int(self, name: builtins.str, default: int | None = None, lo: int | None = None, hi: int | None = None,
            required: bool = False) -> int:
        value = self._take(name, default, required or default is None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, got {_typename(value)}")
        return _check_range(self.key(name), value, lo, hi)

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._take(name, default, False)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {_typename(value)}")
        return value

    def list(self, name: builtins.str, default: builtins.list[Any] | None = None) -> builtins.list[Any]:
        value = self._take(name, default if default is not None else [], False)
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"must be an array, got {_typename(value)}")
        return value

    def has(self, name: builtins.str) -> builtins.bool:
        return name in self.data

    def done(self) -> None:
        if self.data:
            unknown = sorted(self.data)[0]
            raise ConfigError(self.key(unknown), "unknown key")


def _typename(value: Any) -> str:
    return {
        bool: "boolean", int: "integer", float: "float", str: "string",
        list: "array", dict: "table",
    }.get(type(value), type(value).__name__)


def _check_range(key: str, value: int, lo: int | None, hi: int | None) -> int:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            raise ConfigError(key, f"must be {lo}..{hi}, got {value}")
        if lo is not None:
            raise ConfigError(key, f"must be >= {lo}, got {value}")
        raise ConfigError(key, f"must be <= {hi}, got {value}")
    return value


def _address(key: str, value: Any) -> IPAddress:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be an IP address string, got {_typename(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(key, f"invalid IP address {value!r}") from None


def _network(key: str, value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a prefix string, got {_typename(value)}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(key, f"invalid prefix {value!r} ({exc})") from None


def _item_str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, got {_typename(value)}")
    return value


def _items(key: str, values: list[Any], parse: Callable[[str, Any], Any]) -> tuple[Any, ...]:
    return tuple(parse(f"{key}[{i}]", v) for i, v in enumerate(values))


def _fwmark(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {_typename(value)}")
    return _check_range(key, value, 1, 0xFFFFFFFF)


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {_typename(value)}")
    return _check_range(key, value, 1, 65535)


# ---------------------------------------------------------------------------
# sections


def _node(t: _Table) -> NodeConfig:
    name = t.str("name", required=True, pattern=NAME_RE)
    interface = t.str("interface", required=True, pattern=IFNAME_RE)
    address = _address(t.key("address"), t._take("address", None, True))
    if address.is_multicast or address.is_unspecified:
        raise ConfigError(t.key("address"), f"must be a unicast address, got {address}")
    t.done()
    return NodeConfig(name=name, interface=interface, address=address)


def _election(t: _Table, node: NodeConfig) -> ElectionConfig:
    cluster_id = t.int("cluster_id", lo=1, hi=255, required=True)
    priority = t.int("priority", lo=1, hi=254, required=True)
    interval = t.int("advert_interval_ms", default=1000, lo=10, hi=40950)
    preempt = t.bool("preempt", True)
    preempt_delay = t.int("preempt_delay_ms", default=0, lo=0, hi=3_600_000)
    key_file = Path(t.str("key_file", required=True))
    transport = t.str("transport", default="multicast", choices=("multicast", "unicast"))
    port = t.int("port", default=5798, lo=1, hi=65535)
    default_group = "224.0.0.18" if node.address.version == 4 else "ff02::12"
    group: IPAddress | None = None
    if transport == "multicast" or t.has("group"):
        group = _address(t.key("group"), t._take("group", default_group, False))
        if not group.is_multicast:
            raise ConfigError(t.key("group"), f"must be a multicast address, got {group}")
        if group.version != node.address.version:
            raise ConfigError(t.key("group"), f"must be IPv{node.address.version} like node.address, got {group}")
    peers = _items(t.key("peers"), t.list("peers"), _address)
    for i, peer in enumerate(peers):
        if peer.version != node.address.version:
            raise ConfigError(f"{t.key('peers')}[{i}]",
                              f"must be IPv{node.address.version} like node.address, got {peer}")
        if peer == node.address:
            raise ConfigError(f"{t.key('peers')}[{i}]", f"is this node's own address {peer}")
    if transport == "unicast" and not peers:
        raise ConfigError(t.key("peers"), "must list at least one peer with transport = \"unicast\"")
    drain_margin = t.int("drain_margin_ms", default=200, lo=0, hi=60_000)
    drain_max = t.int("drain_max_ms", default=3000, lo=0, hi=600_000)
    if drain_max < drain_margin:
        raise ConfigError(t.key("drain_max_ms"), f"must be >= drain_margin_ms ({drain_margin}), got {drain_max}")
    restart_hold = t.int("restart_hold_ms", default=10_000, lo=0, hi=600_000)
    accept = tuple(Path(_item_str(f"{t.key('accept_key_files')}[{i}]", v))
                   for i, v in enumerate(t.list("accept_key_files")))
    if len(accept) > MAX_ACCEPT_KEY_FILES:
        raise ConfigError(t.key("accept_key_files"), f"at most {MAX_ACCEPT_KEY_FILES} files, got {len(accept)}")
    for i, path in enumerate(accept):
        if path == key_file:
            raise ConfigError(f"{t.key('accept_key_files')}[{i}]", f"is election.key_file itself ({path})")
        if path in accept[:i]:
            raise ConfigError(f"{t.key('accept_key_files')}[{i}]", f"duplicate of "
                              f"{t.key('accept_key_files')}[{accept.index(path)}] ({path})")
    skew = t.int("max_clock_skew_ms", default=5000, lo=0, hi=3_600_000)
    if 0 < skew < MIN_CLOCK_SKEW_MS:
        raise ConfigError(t.key("max_clock_skew_ms"), f"must be 0 (off) or at least {MIN_CLOCK_SKEW_MS}, got {skew}")
    t.done()
    return ElectionConfig(
        cluster_id=cluster_id, priority=priority, advert_interval_ms=interval, preempt=preempt,
        preempt_delay_ms=preempt_delay, key_file=key_file, transport=transport, group=group,
        port=port, peers=peers, drain_margin_ms=drain_margin, drain_max_ms=drain_max,
        restart_hold_ms=restart_hold, accept_key_files=accept, max_clock_skew_ms=skew,
    )


def _control(t: _Table) -> ControlConfig:
    sock = Path(t.str("socket", default="/run/vipless-failover/control.sock"))
    if not sock.is_absolute():
        raise ConfigError(t.key("socket"), f"must be an absolute path, got {str(sock)!r}")
    group = t.str("group", default="root")
    state_dir = Path(t.str("state_dir", default="/var/lib/vipless-failover"))
    if not state_dir.is_absolute():
        raise ConfigError(t.key("state_dir"), f"must be an absolute path, got {str(state_dir)!r}")
    t.done()
    return ControlConfig(socket=sock, group=group, state_dir=state_dir)


def _metrics(t: _Table) -> MetricsConfig:
    listen = t.str("listen", default="127.0.0.1:9654")
    host, port = "", 0
    if listen:
        host, sep, port_s = listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not port_s.isdigit():
            raise ConfigError(t.key("listen"), f"must be HOST:PORT or \"\", got {listen!r}")
        port = _check_range(t.key("listen"), int(port_s), 1, 65535)
        _address(t.key("listen"), host)
    t.done()
    return MetricsConfig(listen=listen, host=host, port=port)


def _delivery(t: _Table) -> DeliveryConfig:
    table = t.int("table", default=100, lo=1, hi=0xFFFFFFFF)
    if table in RESERVED_TABLES:
        raise ConfigError(t.key("table"), f"must not be the kernel's {RESERVED_TABLES[table]} table ({table})")
    rule_priority = t.int("rule_priority", default=100, lo=1, hi=32765)
    protocol = t.int("protocol", default=DEFAULT_RT_PROTOCOL, lo=5, hi=255)
    rules: list[DeliveryRule] = []
    seen: set[tuple[Any, ...]] = set()
    for rt in t.tables("rules"):
        fwmark = _fwmark(rt.key("fwmark"), rt._take("fwmark", None, False)) if rt.has("fwmark") else None
        mask = rt.int("mask", lo=1, hi=0xFFFFFFFF) if rt.has("mask") else None
        if mask is not None and fwmark is None:
            raise ConfigError(rt.key("mask"), "needs fwmark")
        to = _network(rt.key("to"), rt._take("to", None, False)) if rt.has("to") else None
        iif = rt.str("iif", pattern=IFNAME_RE) if rt.has("iif") else None
        if fwmark is None and to is None:
            raise ConfigError(rt.path, "needs fwmark and/or to")
        rt.done()
        families = (to.version,) if to is not None else (4, 6)
        rule = DeliveryRule(fwmark=fwmark, mask=mask, to=to, iif=iif, families=families)
        ident = (fwmark, mask, to, iif)
        if ident in seen:
            raise ConfigError(rt.path, "duplicate rule")
        seen.add(ident)
        rules.append(rule)
    t.done()
    return DeliveryConfig(table=table, rule_priority=rule_priority, protocol=protocol, rules=tuple(rules))


def _marks(tables: list[_Table]) -> tuple[MarkGroup, ...]:
    groups: list[MarkGroup] = []
    names: set[str] = set()
    marks: set[int] = set()
    for t in tables:
        name = t.str("name", required=True, pattern=NAME_RE)
        if name in names:
            raise ConfigError(t.key("name"), f"duplicate mark group name {name!r}")
        names.add(name)
        fwmark = _fwmark(t.key("fwmark"), t._take("fwmark", None, True))
        if fwmark in marks:
            raise ConfigError(t.key("fwmark"), f"duplicate fwmark {fwmark} (each mark group needs its own)")
        marks.add(fwmark)
        dests = _items(t.key("destinations"), t.list("destinations"), _network)
        if not dests:
            raise ConfigError(t.key("destinations"), "must list at least one prefix")
        protocols = tuple(t.list("protocols", ["tcp", "udp"]))
        for i, proto in enumerate(protocols):
            if proto not in ("tcp", "udp", "sctp"):
                raise ConfigError(f"{t.key('protocols')}[{i}]", f"must be tcp, udp or sctp, got {proto!r}")
        if not protocols:
            raise ConfigError(t.key("protocols"), "must list at least one protocol")
        ports = _items(t.key("ports"), t.list("ports"), _port)
        t.done()
        groups.append(MarkGroup(name=name, fwmark=fwmark, destinations=dests, protocols=protocols, ports=ports))
    return tuple(groups)


def _ipvs(t: _Table) -> tuple[IpvsService, ...]:
    services: list[IpvsService] = []
    seen: set[tuple[int, int]] = set()
    for st in t.tables("services"):
        fwmark = _fwmark(st.key("fwmark"), st._take("fwmark", None, True))
        family = {"inet": 4, "inet6": 6}[st.str("family", default="inet", choices=("inet", "inet6"))]
        if (fwmark, family) in seen:
            raise ConfigError(st.key("fwmark"), f"duplicate service for fwmark {fwmark}")
        seen.add((fwmark, family))
        scheduler = st.str("scheduler", default="wlc", choices=SCHEDULERS)
        persistence = st.int("persistence_s", default=0, lo=0, hi=0x7FFFFFFF)
        flags = tuple(st.list("flags"))
        for i, flag in enumerate(flags):
            if flag not in SERVICE_FLAGS:
                raise ConfigError(f"{st.key('flags')}[{i}]", f"must be one of {', '.join(SERVICE_FLAGS)}, got {flag!r}")
        reals: list[RealServer] = []
        real_seen: set[tuple[IPAddress, int]] = set()
        for rt in st.tables("reals"):
            addr = _address(rt.key("address"), rt._take("address", None, True))
            if addr.version != family:
                raise ConfigError(rt.key("address"), f"must be IPv{family} like the service, got {addr}")
            port = rt.int("port", default=0, lo=0, hi=65535)
            weight = rt.int("weight", default=1, lo=0, hi=65535)
            forward = rt.str("forward", default="dr", choices=FORWARD_METHODS)
            rt.done()
            if (addr, port) in real_seen:
                raise ConfigError(rt.key("address"), f"duplicate real server {addr}")
            real_seen.add((addr, port))
            reals.append(RealServer(address=addr, port=port, weight=weight, forward=forward))
        st.done()
        services.append(IpvsService(fwmark=fwmark, family=family, scheduler=scheduler,
                                    persistence_s=persistence, flags=flags, reals=tuple(reals)))
    t.done()
    return tuple(services)


def _announce(t: _Table, node: NodeConfig) -> AnnounceConfig:
    mode = t.str("mode", default="per-vip", choices=("per-vip", "next-hop", "none"))
    vips = _items(t.key("vips"), t.list("vips"), _network)
    for i, vip in enumerate(vips):
        if node.address in vip:
            raise ConfigError(f"{t.key('vips')}[{i}]", f"contains this director's own address {node.address}")
    if mode == "per-vip":
        total = sum(v.num_addresses for v in vips)
        if total > MAX_ANNOUNCED_VIPS:
            raise ConfigError(t.key("vips"), f"expands to {total} addresses; per-VIP mode announces at most "
                                             f"{MAX_ANNOUNCED_VIPS} (use mode = \"next-hop\" for more)")
    next_hop = None
    if t.has("next_hop"):
        value = t.str("next_hop")
        try:
            next_hop = ipaddress.ip_interface(value)
        except ValueError:
            raise ConfigError(t.key("next_hop"), f"must be ADDRESS/PREFIXLEN, got {value!r}") from None
        if "/" not in value:
            raise ConfigError(t.key("next_hop"), f"must be ADDRESS/PREFIXLEN, got {value!r}")
        if next_hop.ip == node.address:
            raise ConfigError(t.key("next_hop"), f"is this director's own address {node.address}")
    if mode == "next-hop" and next_hop is None:
        raise ConfigError(t.key("next_hop"), "is required with mode = \"next-hop\"")
    forms = tuple(t.list("garp_forms", ["request", "reply"]))
    for i, form in enumerate(forms):
        if form not in ("request", "reply"):
            raise ConfigError(f"{t.key('garp_forms')}[{i}]", f"must be request or reply, got {form!r}")
    if not forms:
        raise ConfigError(t.key("garp_forms"), "must list request and/or reply")
    rate = t.int("rate_pps", default=2000, lo=1, hi=1_000_000)
    repeats = t.int("repeats", default=3, lo=0, hi=100)
    repeat_interval = t.int("repeat_interval_ms", default=1000, lo=10, hi=600_000)
    refresh = t.int("refresh_interval_s", default=0, lo=0, hi=86_400)
    t.done()
    return AnnounceConfig(mode=mode, vips=vips, next_hop=next_hop, garp_forms=forms, rate_pps=rate,
                          repeats=repeats, repeat_interval_ms=repeat_interval, refresh_interval_s=refresh)


def _dataplane(t: _Table) -> DataplaneConfig:
    remove = t.bool("remove_on_stop", True)
    interval = t.int("reconcile_interval_s", default=30, lo=1, hi=86_400)
    t.done()
    return DataplaneConfig(remove_on_stop=remove, reconcile_interval_s=interval)


def _argv(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f"must be a non-empty array of strings (argv, no shell), got {_typename(value)}")
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            raise ConfigError(f"{key}[{i}]", f"must be a string, got {_typename(arg)}")
    if not os.path.isabs(value[0]):
        raise ConfigError(f"{key}[0]", f"must be an absolute path to the program, got {value[0]!r}")
    return tuple(value)


def _notify(t: _Table) -> NotifyConfig:
    commands = _items(t.key("commands"), t.list("commands"), _argv)
    timeout = t.int("timeout_ms", default=5000, lo=10, hi=600_000)
    t.done()
    return NotifyConfig(commands=commands, timeout_ms=timeout)


def _track(t: _Table, node: NodeConfig) -> TrackConfig:
    checks: list[TrackCheck] = []
    names: set[str] = set()
    for ct in t.tables("check"):
        name = ct.str("name", required=True, pattern=NAME_RE)
        if name in names:
            raise ConfigError(ct.key("name"), f"duplicate check name {name!r}")
        names.add(name)
        command = _argv(ct.key("command"), ct._take("command", None, True))
        interval = ct.int("interval_ms", default=2000, lo=10, hi=3_600_000)
        timeout = ct.int("timeout_ms", default=min(1000, interval), lo=10, hi=600_000)
        if timeout > interval:
            raise ConfigError(ct.key("timeout_ms"), f"must be <= interval_ms ({interval}), got {timeout}")
        rise = ct.int("rise", default=1, lo=1, hi=100)
        fall = ct.int("fall", default=1, lo=1, hi=100)
        weight = ct.int("weight", default=0, lo=0, hi=253)
        ct.done()
        checks.append(TrackCheck(name=name, command=command, interval_ms=interval, timeout_ms=timeout,
                                 rise=rise, fall=fall, weight=weight))
    interfaces: list[TrackInterface] = []
    ifnames: set[str] = {node.interface}
    for it in t.tables("interface"):
        name = it.str("name", required=True, pattern=IFNAME_RE)
        if name in ifnames:
            raise ConfigError(it.key("name"), f"interface {name!r} is already tracked"
                              + (" (node.interface always is)" if name == node.interface else ""))
        ifnames.add(name)
        weight = it.int("weight", default=0, lo=0, hi=253)
        it.done()
        interfaces.append(TrackInterface(name=name, weight=weight))
    t.done()
    return TrackConfig(checks=tuple(checks), interfaces=tuple(interfaces))


# ---------------------------------------------------------------------------
# overlaps between entries (checked once every section is read)
#
# Prefixes either nest or are disjoint. Which overlaps are refused:
# * announce.vips: any (redundant: announcements are de-duplicated, but the per-VIP
#   cap counts the overlap twice, and a VIP listed twice is usually a typo for another);
# * delivery.rules: a rule whose `to` lies inside another's whose other selectors
#   (fwmark/mask, iif) are absent or the same: every rule leads to the same table, so
#   the narrower one is redundant. Overlapping rules that select different traffic
#   (another iif, another fwmark) are allowed;
# * marks: destinations of two groups that overlap for a common protocol and port:
#   such packets would get one fwmark or the other depending on the order of the
#   nft rules (ambiguous). Overlaps on disjoint ports or protocols are allowed (one
#   VIP, port 80 -> mark 1, port 443 -> mark 2). Within one group the destinations
#   are one set, collapsed into one nft rule: overlaps there are merged, not refused.


def nested_pairs(entries: Iterable[tuple[IPNetwork, Any]]) -> Iterator[tuple[Any, Any]]:
    """``(outer tag, inner tag)`` for every two entries whose prefixes overlap: the
    outer contains the inner (of equal prefixes the earlier one is outer).

    One sort and a stack of the prefixes that contain the current one (a nested
    chain), so n entries cost O(n log n) plus the pairs found."""
    spans = []  # (version, first, last, position, tag): the address ranges as integers
    for pos, (net, tag) in enumerate(entries):
        first = int(net.network_address)
        spans.append((net.version, first, first + (1 << (net.max_prefixlen - net.prefixlen)) - 1, pos, tag))
    spans.sort(key=lambda s: (s[0], s[1], -s[2], s[3]))  # by start; of equal starts the wider first
    stack: list[tuple[int, int, Any]] = []  # (version, last, tag)
    for version, first, last, _, tag in spans:
        while stack and (stack[-1][0] != version or stack[-1][1] < first):
            stack.pop()
        for outer in stack:
            yield outer[2], tag
        stack.append((version, last, tag))


def _later_first(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The entry later in the file (reported as the key) and the earlier one."""
    return (a, b) if a > b else (b, a)


def check_overlaps(delivery: DeliveryConfig, marks: tuple[MarkGroup, ...], announce: AnnounceConfig) -> None:
    """Refuse overlapping VIPs, redundant delivery rules and ambiguous mark groups
    (see above), naming the key paths of both entries."""
    vips = announce.vips
    for outer, inner in nested_pairs((v, (i,)) for i, v in enumerate(vips)):
        (j,), (i,) = _later_first(outer, inner)
        raise ConfigError(f"announce.vips[{j}]", f"{vips[j]} overlaps announce.vips[{i}] {vips[i]} "
                                                 "(list each VIP once)")

    rules = delivery.rules

    def covers(o: DeliveryRule, n: DeliveryRule) -> bool:
        return (o.iif is None or o.iif == n.iif) and (o.fwmark is None or (o.fwmark, o.mask) == (n.fwmark, n.mask))

    for outer, inner in nested_pairs((r.to, (i,)) for i, r in enumerate(rules) if r.to is not None):
        o, n = rules[outer[0]], rules[inner[0]]
        redundant = inner[0] if covers(o, n) else outer[0] if o.to == n.to and covers(n, o) else None
        if redundant is None:
            continue
        (j,), (i,) = _later_first(outer, inner)
        raise ConfigError(f"delivery.rules[{j}].to", f"{rules[j].to} overlaps delivery.rules[{i}].to {rules[i].to}: "
                                                     f"delivery.rules[{redundant}] adds nothing (every rule "
                                                     f"leads to table {delivery.table})")

    dests = ((d, (g, k)) for g, group in enumerate(marks) for k, d in enumerate(group.destinations))
    for outer, inner in nested_pairs(dests):
        (g2, k2), (g1, k1) = _later_first(outer, inner)
        if g1 == g2:
            continue
        a, b = marks[g1], marks[g2]
        protocols = sorted(set(a.protocols) & set(b.protocols))
        if not protocols:
            continue
        if a.ports and b.ports:
            ports = sorted(set(a.ports) & set(b.ports))
            if not ports:
                continue
        else:
            ports = sorted(set(a.ports or b.ports))  # no ports: every port
        where = f"port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))}" if ports else "any port"
        raise ConfigError(f"marks[{g2}].destinations[{k2}]",
                          f"{b.destinations[k2]} overlaps marks[{g1}].destinations[{k1}] {a.destinations[k1]}: "
                          f"{'/'.join(protocols)} {where} would get fwmark {a.fwmark} ({a.name}) or "
                          f"{b.fwmark} ({b.name}) depending on rule order")


def parse(data: dict[str, Any], path: Path | str = "<config>") -> Config:
    """Validate a decoded TOML document. Raises ConfigError (with file name)."""
    path = Path(path)
    try:
        top = _Table(data, "")
        node = _node(top.table("node", required=True))
        election = _election(top.table("election", required=True), node)
        control = _control(top.table("control"))
        metrics = _metrics(top.table("metrics"))
        delivery = _delivery(top.table("delivery"))
        marks = _marks(top.tables("marks"))
        ipvs = _ipvs(top.table("ipvs"))
        announce = _announce(top.table("announce"), node)
        dataplane = _dataplane(top.table("dataplane"))
        notify = _notify(top.table("notify"))
        track = _track(top.table("track"), node)
        top.done()
        check_overlaps(delivery, marks, announce)
    except ConfigError as exc:
        raise exc.with_file(path) from None
    return Config(path=path, node=node, election=election, control=control, metrics=metrics,
                  delivery=delivery, marks=marks, ipvs=ipvs, announce=announce, dataplane=dataplane,
                  raw=data, notify=notify, track=track)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file (does not read the key). The file must be a
    regular file of at most MAX_CONFIG_BYTES (see :func:`read_regular_file`)."""
    p = Path(path)
    try:
        text = read_regular_file(p, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError("", "no such file", p) from None
    except FileRefused as exc:
        raise ConfigError("", str(exc), p) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror}", p) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", "not UTF-8 text", p) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", p) from None
    return parse(data, p)


def control_socket_hint(path: str | os.PathLike[str]) -> Path | None:
    """``[control] socket`` of a config that may not validate (for failoverctl): taken
    from the raw TOML; None when the file cannot be read or parsed or names none."""
    try:
        data = tomllib.loads(read_regular_file(Path(path), MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, FileRefused, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    control = data.get("control")
    sock = control.get("socket") if isinstance(control, dict) else None
    if isinstance(sock, str) and os.path.isabs(sock):
        return Path(sock)
    return None


MIN_KEY_BYTES = 16


def read_key(config: Config) -> bytes:
    """Read the HMAC key. The file must be a regular file (at most MAX_KEY_BYTES), must
    not be world-readable or world-writable, and must hold at least 16 bytes
    (surrounding whitespace stripped). The mode is checked on the file opened."""
    return _read_key_file(config, config.election.key_file, "election.key_file")


def read_keys(config: Config) -> tuple[bytes, ...]:
    """The signing key (election.key_file), then each key of election.accept_key_files,
    every file checked as :func:`read_key` checks it."""
    accepted = tuple(_read_key_file(config, path, f"election.accept_key_files[{i}]")
                     for i, path in enumerate(config.election.accept_key_files))
    return (read_key(config), *accepted)


def _read_key_file(config: Config, path: Path, key: str) -> bytes:
    if not path.is_absolute():
        path = (config.path.parent / path)

    def check_mode(st: os.stat_result) -> None:
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise FileRefused(f"must not be accessible by others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod 0600 it)")

    try:
        data = read_regular_file(path, MAX_KEY_BYTES, check=check_mode).strip()
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file", config.path) from None
    except FileRefused as exc:
        raise ConfigError(key, f"{path}: {exc}", config.path) from None
    except OSError as exc:
        raise ConfigError(key, f"{path}: {exc.strerror}", config.path) from None
    if len(data) < MIN_KEY_BYTES:
        raise ConfigError(key, f"{path}: key must be at least {MIN_KEY_BYTES} bytes, got {len(data)}",
                          config.path)
    return data


class FileRefused(Exception):
    """A file that is not read: not a regular file, too large, or (a caller's check)
    with the wrong mode."""


def read_regular_file(path: Path, limit: int,
                      check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes.

    Opened non-blocking and checked with fstat before anything is read, so a FIFO,
    a device or a directory put in its place is refused at once (FileRefused) instead
    of blocking the reader; ``check`` may refuse the opened file by its stat too.
    Raises OSError (FileNotFoundError, ...) as open and read do."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused("not a regular file")
        if st.st_size > limit:
            raise FileRefused(f"is {st.st_size} bytes, more than the {limit} read at most")
        if check is not None:
            check(st)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # it grew after fstat
                raise FileRefused(f"is more than the {limit} bytes read at most")
        return b"".join(chunks)
    finally:
        os.close(fd)


def to_jsonable(obj: Any) -> Any:
    """A JSON-friendly view of config objects (for status output)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(obj).items() if k != "raw"}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (Path, ipaddress._BaseAddress, ipaddress._BaseNetwork, ipaddress._BaseV4,
                        ipaddress._BaseV6)):
        return str(obj)
    return obj
