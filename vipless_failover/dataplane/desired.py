"""Desired kernel state, computed from the config and the delivery flag (pure: no I/O).

What a director holds, by role:

============================  ===========  ==================
object                        MASTER       BACKUP / FAULT
============================  ===========  ==================
delivery ``ip rule`` s        installed    absent
``local 0/0 dev lo table T``  installed    installed (warm)
nft mark table                installed    installed (warm)
IPVS services + reals         installed    installed (warm)
============================  ===========  ==================

Design choice: the two ``local ... dev lo table T`` routes stay installed on the
backup. Table T is consulted only through the delivery rules, so without the
rules those routes match nothing. Takeover and release therefore add or delete
the delivery rules only: ``len(cfg.delivery.rules) x families`` netlink
operations, independent of the number of VIPs, mark groups, IPVS services and
real servers (``flip_operations`` is what the unit test counts).

Objects are plain frozen dataclasses that compare by value, so a diff is set
arithmetic: ``diff(desired, actual)`` returns the exact operations.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, IpvsService

#: Name of the nftables table (family inet) owned by the daemon.
NFT_TABLE = "vipless_failover"
#: Chain of that table; priority mangle (-150) in prerouting.
NFT_CHAIN = "prerouting"
FULL_MASK = 0xFFFFFFFF
DEFAULT_ROUTE = {4: "0.0.0.0/0", 6: "::/0"}


# ---------------------------------------------------------------------------
# objects


@dataclass(frozen=True)
class RuleSpec:
    """One policy routing rule (``ip rule``), as we install it or as the kernel reports it.

    ``mask`` is normalized to 0xffffffff when a fwmark is given without a mask (the
    kernel does the same). ``extra`` holds attributes we never set (seen only on rules
    read from the kernel); a rule with extras never equals a desired rule.
    """

    family: int  # 4 | 6
    priority: int
    table: int
    protocol: int
    fwmark: int | None = None
    mask: int | None = None
    dst: str | None = None  # "198.51.100.0/24"
    iif: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        parts = [f"-{self.family} rule prio {self.priority}"]
        if self.dst:
            parts.append(f"to {self.dst}")
        if self.fwmark is not None:
            mark = f"fwmark {self.fwmark:#x}"
            if self.mask not in (None, FULL_MASK):
                mark += f"/{self.mask:#x}"
            parts.append(mark)
        if self.iif:
            parts.append(f"iif {self.iif}")
        parts.append(f"lookup {self.table} proto {self.protocol}")
        if self.extra:
            parts.append(f"+{dict(self.extra)}")
        return " ".join(parts)

    def sort_key(self) -> tuple[Any, ...]:
        return (self.family, self.priority, self.table, self.protocol,
                -1 if self.fwmark is None else self.fwmark, -1 if self.mask is None else self.mask,
                self.dst or "", self.iif or "", repr(self.extra))


@dataclass(frozen=True, order=True)
class RouteSpec:
    """``local <default> dev lo table T proto P`` (scope host for IPv4)."""

    family: int
    table: int
    protocol: int
    dst: str = ""  # "0.0.0.0/0" | "::/0"
    kind: str = "local"
    dev: str = "lo"

    def describe(self) -> str:
        return f"-{self.family} route {self.kind} {self.dst} dev {self.dev} table {self.table} proto {self.protocol}"


@dataclass(frozen=True)
class MarkRule:
    """One rule of the mark chain: destinations (one family), protocols, ports -> mark."""

    group: str
    fwmark: int
    family: int
    destinations: tuple[str, ...]
    protocols: tuple[str, ...]
    ports: tuple[int, ...]

    def body(self) -> str:
        key = "ip daddr" if self.family == 4 else "ip6 daddr"
        parts = [f"{key} {_nft_set(self.destinations)}", f"meta l4proto {_nft_set(self.protocols)}"]
        if self.ports:
            parts.append(f"th dport {_nft_set([str(p) for p in self.ports])}")
        parts.append(f"meta mark set {self.fwmark:#x}")
        return " ".join(parts)

    def comment(self) -> str:
        """Identifies the rule: group name and a digest of its body (nft keeps comments)."""
        return f"vf {self.group} {_digest(self.body())[:12]}"

    def text(self) -> str:
        return f'{self.body()} comment "{self.comment()}"'


@dataclass(frozen=True)
class MarkTableSpec:
    """The whole nft table, replaced in one transaction."""

    name: str
    rules: tuple[MarkRule, ...]
    digest: str = field(default="", compare=False)

    @staticmethod
    def build(name: str, rules: Iterable[MarkRule]) -> MarkTableSpec:
        rules = tuple(rules)
        blob = "\n".join(r.text() for r in rules)
        return MarkTableSpec(name=name, rules=rules, digest=_digest(f"{name}\n{blob}")[:16])

    def comment(self) -> str:
        return f"vipless-failover {self.digest}"

    def script(self) -> str:
        """An ``nft -f -`` script: delete the table if present and define it anew, one batch."""
        lines = [
            f"table inet {self.name}",
            f"delete table inet {self.name}",
            f"table inet {self.name} {{",
            f'\tcomment "{self.comment()}"',
            f"\tchain {NFT_CHAIN} {{",
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
        ]
        lines += [f"\t\t{r.text()}" for r in self.rules]
        lines += ["\t}", "}", ""]
        return "\n".join(lines)


@dataclass(frozen=True)
class DesiredState:
    delivery: bool
    rules: frozenset[RuleSpec]
    routes: frozenset[RouteSpec]
    marks: MarkTableSpec | None  # None: no table of ours may exist
    ipvs: tuple[IpvsService, ...]


# ---------------------------------------------------------------------------
# operations


@dataclass(frozen=True)
class AddRule:
    rule: RuleSpec


@dataclass(frozen=True)
class DeleteRule:
    rule: RuleSpec


@dataclass(frozen=True, order=True)
class AddRoute:
    route: RouteSpec


@dataclass(frozen=True, order=True)
class DeleteRoute:
    route: RouteSpec


@dataclass(frozen=True)
class ReplaceMarkTable:
    spec: MarkTableSpec


@dataclass(frozen=True)
class DeleteMarkTable:
    name: str


Operation = AddRule | DeleteRule | AddRoute | DeleteRoute | ReplaceMarkTable | DeleteMarkTable


@dataclass(frozen=True)
class ActualMarks:
    """What the kernel holds of our nft table (see marks.inspect_listing)."""

    exists: bool
    digest: str | None = None  # from the table comment
    intact: bool = False  # chain and rules exactly as the digest says
    rule_count: int = 0


# ---------------------------------------------------------------------------
# desired state


def delivery_rules(cfg: Config) -> frozenset[RuleSpec]:
    d = cfg.delivery
    out: set[RuleSpec] = set()
    for rule in d.rules:
        for family in rule.families:
            mask = None
            if rule.fwmark is not None:
                mask = rule.mask if rule.mask is not None else FULL_MASK
            out.add(RuleSpec(family=family, priority=d.rule_priority, table=d.table, protocol=d.protocol,
                             fwmark=rule.fwmark, mask=mask,
                             # a /0 destination is no destination (the kernel keeps none)
                             dst=str(rule.to) if rule.to is not None and rule.to.prefixlen else None,
                             iif=rule.iif))
    return frozenset(out)


def local_routes(cfg: Config) -> frozenset[RouteSpec]:
    d = cfg.delivery
    return frozenset(RouteSpec(family=f, table=d.table, protocol=d.protocol, dst=DEFAULT_ROUTE[f]) for f in (4, 6))


def mark_table(cfg: Config, name: str = NFT_TABLE) -> MarkTableSpec | None:
    """The mark table; None when no mark group is configured (then no table at all)."""
    if not cfg.marks:
        return None
    rules: list[MarkRule] = []
    for group in cfg.marks:
        for family in (4, 6):
            nets = [n for n in group.destinations if n.version == family]
            if not nets:
                continue
            # collapse: overlapping prefixes would make nft refuse the anonymous interval set
            # (one family per call: mypy cannot see that nets holds only IPv{family}Network)
            dests = tuple(str(n) for n in ipaddress.collapse_addresses(nets))  # type: ignore[type-var]
            protocols = tuple(sorted(set(group.protocols)))
            ports = tuple(sorted(set(group.ports)))
            rules.append(MarkRule(group=group.name, fwmark=group.fwmark, family=family,
                                  destinations=dests, protocols=protocols, ports=ports))
    return MarkTableSpec.build(name, rules)


def desired_state(cfg: Config, delivery: bool, *, warm: bool = True) -> DesiredState:
    """Objects the kernel must hold. ``delivery``: master (True) or backup/fault (False).
    ``warm=False`` (a stopping daemon with remove_on_stop) drops routes, marks and IPVS too."""
    return DesiredState(
        delivery=delivery,
        rules=delivery_rules(cfg) if delivery else frozenset(),
        routes=local_routes(cfg) if warm else frozenset(),
        marks=mark_table(cfg) if warm else None,
        ipvs=cfg.ipvs if warm else (),
    )


# ---------------------------------------------------------------------------
# diff


def diff_rules(desired: Iterable[RuleSpec], actual: Iterable[RuleSpec]) -> list[Operation]:
    """Adds first (make before break), then deletes; each group sorted."""
    want, have = set(desired), set(actual)
    key = RuleSpec.sort_key
    adds: list[Operation] = [AddRule(r) for r in sorted(want - have, key=key)]
    return adds + [DeleteRule(r) for r in sorted(have - want, key=key)]


def diff_routes(desired: Iterable[RouteSpec], actual: Iterable[RouteSpec]) -> list[Operation]:
    want, have = set(desired), set(actual)
    adds: list[Operation] = [AddRoute(r) for r in sorted(want - have)]
    return adds + [DeleteRoute(r) for r in sorted(have - want)]


def diff_marks(desired: MarkTableSpec | None, actual: ActualMarks, name: str = NFT_TABLE) -> list[Operation]:
    if desired is None:
        return [DeleteMarkTable(name)] if actual.exists else []
    if actual.exists and actual.intact and actual.digest == desired.digest:
        return []
    return [ReplaceMarkTable(desired)]


def diff(desired: DesiredState, rules: Iterable[RuleSpec], routes: Iterable[RouteSpec],
         marks: ActualMarks) -> list[Operation]:
    """Operations that turn the actual (ours-only) objects into the desired ones.

    Order: routes and marks before rules on the way up, so a rule never points at an
    empty table; deletions of rules come before deletions of routes.
    """
    rule_ops = diff_rules(desired.rules, rules)
    route_ops = diff_routes(desired.routes, routes)
    adds = [op for op in route_ops if isinstance(op, AddRoute)]
    dels = [op for op in route_ops if isinstance(op, DeleteRoute)]
    rule_adds = [op for op in rule_ops if isinstance(op, AddRule)]
    rule_dels = [op for op in rule_ops if isinstance(op, DeleteRule)]
    return adds + diff_marks(desired.marks, marks) + rule_adds + rule_dels + dels


def flip_operations(cfg: Config, actual_rules: Iterable[RuleSpec], on: bool) -> list[Operation]:
    """The operations of a takeover (on=True) or release (on=False): rules only."""
    return diff_rules(delivery_rules(cfg) if on else frozenset(), actual_rules)


# ---------------------------------------------------------------------------


def _nft_set(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return "{ " + ", ".join(items) + " }"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
