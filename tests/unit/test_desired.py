"""Desired kernel state per role, exactly (dataplane/desired.py; pure, no root)."""

from __future__ import annotations

import copy
import ipaddress
import subprocess
import sys
from typing import Any

import pytest

from tests.factories import config_dict
from vipless_failover import config
from vipless_failover.dataplane import desired as d
from vipless_failover.dataplane.desired import RouteSpec, RuleSpec

BASE: dict[str, Any] = config_dict(
    delivery={
        "table": 100, "rule_priority": 100,
        "rules": [{"fwmark": 1}, {"to": "198.51.100.0/24"}, {"fwmark": 0x20, "mask": 0xF0, "iif": "eth0"},
                  {"to": "2001:db8:5::/48", "iif": "eth1"}],
    },
    marks=[
        {"name": "web", "fwmark": 1, "destinations": ["198.51.100.0/24", "2001:db8:5::/48"],
         "protocols": ["udp", "tcp"], "ports": [443, 80]},
        {"name": "dns", "fwmark": 2, "destinations": ["203.0.113.53/32"], "protocols": ["udp"]},
    ],
    ipvs={"services": [{"fwmark": 1, "scheduler": "wrr",
                        "reals": [{"address": "203.0.113.21"}, {"address": "203.0.113.22", "weight": 3}]}]},
)


def make(**over: Any) -> config.Config:
    data = copy.deepcopy(BASE)
    for key, value in over.items():
        data[key] = value
    return config.parse(data, "test.toml")


RULES = {
    RuleSpec(4, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF),
    RuleSpec(6, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF),
    RuleSpec(4, 100, 100, 98, dst="198.51.100.0/24"),
    RuleSpec(4, 100, 100, 98, fwmark=0x20, mask=0xF0, iif="eth0"),
    RuleSpec(6, 100, 100, 98, fwmark=0x20, mask=0xF0, iif="eth0"),
    RuleSpec(6, 100, 100, 98, dst="2001:db8:5::/48", iif="eth1"),
}
ROUTES = {RouteSpec(4, 100, 98, "0.0.0.0/0"), RouteSpec(6, 100, 98, "::/0")}


def test_master_holds_rules_routes_marks_ipvs() -> None:
    cfg = make()
    want = d.desired_state(cfg, delivery=True)
    assert want.delivery is True
    assert want.rules == RULES
    assert want.routes == ROUTES
    assert want.marks is not None and [r.body() for r in want.marks.rules] == [
        "ip daddr 198.51.100.0/24 meta l4proto { tcp, udp } th dport { 80, 443 } meta mark set 0x1",
        "ip6 daddr 2001:db8:5::/48 meta l4proto { tcp, udp } th dport { 80, 443 } meta mark set 0x1",
        "ip daddr 203.0.113.53/32 meta l4proto udp meta mark set 0x2",
    ]
    assert want.ipvs == cfg.ipvs


@pytest.mark.parametrize("role", ["backup", "fault"])
def test_backup_and_fault_hold_everything_but_the_rules(role: str) -> None:
    cfg = make()
    want = d.desired_state(cfg, delivery=False)  # backup and fault both: no delivery
    master = d.desired_state(cfg, delivery=True)
    assert want.rules == frozenset()
    assert want.routes == ROUTES  # warm: without the rules table 100 is never consulted
    assert want.marks == master.marks
    assert want.ipvs == master.ipvs


def test_stopped_with_remove_on_stop_holds_nothing() -> None:
    want = d.desired_state(make(), delivery=False, warm=False)
    assert (want.rules, want.routes, want.marks, want.ipvs) == (frozenset(), frozenset(), None, ())


def test_custom_table_priority_protocol() -> None:
    cfg = make(delivery={"table": 4242, "rule_priority": 7, "protocol": 201, "rules": [{"fwmark": 9}]})
    want = d.desired_state(cfg, delivery=True)
    assert want.rules == {RuleSpec(4, 7, 4242, 201, fwmark=9, mask=0xFFFFFFFF),
                          RuleSpec(6, 7, 4242, 201, fwmark=9, mask=0xFFFFFFFF)}
    assert want.routes == {RouteSpec(4, 4242, 201, "0.0.0.0/0"), RouteSpec(6, 4242, 201, "::/0")}


def test_no_mark_groups_means_no_table() -> None:
    assert d.desired_state(make(marks=[]), delivery=True).marks is None


def test_mark_destinations_are_collapsed_so_nft_accepts_the_set() -> None:
    cfg = make(marks=[{"name": "m", "fwmark": 5, "protocols": ["tcp"],
                       "destinations": ["198.51.100.0/25", "198.51.100.128/25", "198.51.100.7/32",
                                        "203.0.113.0/24"]}])
    spec = d.mark_table(cfg)
    assert spec is not None
    assert spec.rules[0].destinations == ("198.51.100.0/24", "203.0.113.0/24")
    assert spec.rules[0].body() == "ip daddr { 198.51.100.0/24, 203.0.113.0/24 } meta l4proto tcp meta mark set 0x5"


def test_mark_script_is_one_atomic_redefinition() -> None:
    spec = d.mark_table(make())
    assert spec is not None
    lines = spec.script().splitlines()
    assert lines[:3] == ["table inet vipless_failover", "delete table inet vipless_failover",
                         "table inet vipless_failover {"]
    assert f'comment "vipless-failover {spec.digest}"' in spec.script()
    assert "type filter hook prerouting priority mangle; policy accept;" in spec.script()
    assert all(f'comment "{r.comment()}"' in spec.script() for r in spec.rules)


def test_mark_digest_follows_content_only() -> None:
    a, b = d.mark_table(make()), d.mark_table(make())
    assert a is not None and b is not None and a.digest == b.digest
    marks = copy.deepcopy(BASE["marks"])
    marks[0]["ports"] = [80]
    c = d.mark_table(make(marks=marks))
    assert c is not None and c.digest != a.digest


def test_describe_reads_like_ip_rule() -> None:
    assert RuleSpec(4, 100, 100, 98, fwmark=0x20, mask=0xF0, iif="eth0").describe() == \
        "-4 rule prio 100 fwmark 0x20/0xf0 iif eth0 lookup 100 proto 98"


def test_desired_module_does_no_io_imports() -> None:
    # the pure core must not pull in netlink machinery (checked in a fresh interpreter)
    code = ("import sys, vipless_failover.dataplane.desired; "
            "sys.exit(any(m.startswith('pyroute2') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("count", [1, 10_000])
def test_flip_is_constant_in_vips_and_services(count: int) -> None:
    """Takeover and release: the same number of operations for 1 or 10,000 VIPs/services."""
    vips = [str(ipaddress.IPv6Network(f"2001:db8:1::{2 * i:x}/128")) for i in range(count)]
    data = copy.deepcopy(BASE)
    data["delivery"] = {"table": 100, "rules": [{"fwmark": 1}, {"to": "198.51.100.0/24"}]}
    data["marks"] = [{"name": "many", "fwmark": 1, "destinations": vips}]
    data["ipvs"] = {"services": [{"fwmark": 1 + i, "family": "inet6",
                                  "reals": [{"address": "2001:db8:ff::1"}]} for i in range(count)]}
    data["announce"] = {"vips": vips}
    cfg = config.parse(data, "big.toml")
    backup = d.desired_state(cfg, delivery=False)
    master = d.desired_state(cfg, delivery=True)
    assert len(cfg.ipvs) == count and len(cfg.announce.vips) == count
    assert master.marks is not None and len(master.marks.rules[0].destinations) == count
    # the actual state is exactly the other role's state: only rules differ
    up = d.diff(master, backup.rules, backup.routes, d.ActualMarks(True, backup.marks.digest, True))  # type: ignore[union-attr]
    down = d.diff(backup, master.rules, master.routes, d.ActualMarks(True, master.marks.digest, True))  # type: ignore[union-attr]
    assert [type(op) for op in up] == [d.AddRule] * 3
    assert [type(op) for op in down] == [d.DeleteRule] * 3
    assert len(d.flip_operations(cfg, backup.rules, True)) == 3
    assert len(d.flip_operations(cfg, master.rules, False)) == 3


def test_a_default_destination_is_a_rule_without_destination() -> None:
    # the kernel keeps no FRA_DST for "to 0.0.0.0/0": the desired rule must match what it reports
    cfg = make(delivery={"table": 100, "rules": [{"to": "0.0.0.0/0"}, {"to": "::/0", "iif": "eth1"}]})
    assert d.delivery_rules(cfg) == {RuleSpec(4, 100, 100, 98), RuleSpec(6, 100, 100, 98, iif="eth1")}
