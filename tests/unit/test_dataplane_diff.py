"""Diffing desired against actual: exact operations (pure; no root)."""

from __future__ import annotations

import copy
from typing import Any

import structlog

from vipless_failover.dataplane import desired as d
from vipless_failover.dataplane.desired import (
    ActualMarks,
    AddRoute,
    AddRule,
    DeleteMarkTable,
    DeleteRoute,
    DeleteRule,
    ReplaceMarkTable,
    RouteSpec,
    RuleSpec,
)
from vipless_failover.dataplane.marks import CHAIN_HEADER, inspect_listing, parse_listing

from .test_desired import BASE, make

FW1 = RuleSpec(4, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF)
FW1_6 = RuleSpec(6, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF)
TO = RuleSpec(4, 100, 100, 98, dst="198.51.100.0/24")
R4, R6 = RouteSpec(4, 100, 98, "0.0.0.0/0"), RouteSpec(6, 100, 98, "::/0")


def simple(**delivery: Any) -> Any:
    dl = {"table": 100, "rules": [{"fwmark": 1}, {"to": "198.51.100.0/24"}]}
    dl.update(delivery)
    return make(delivery=dl)


def intact(spec: d.MarkTableSpec | None) -> ActualMarks:
    assert spec is not None
    return ActualMarks(exists=True, digest=spec.digest, intact=True, rule_count=len(spec.rules))


def test_takeover_from_empty_kernel_installs_routes_then_marks_then_rules() -> None:
    want = d.desired_state(simple(), delivery=True)
    ops = d.diff(want, [], [], ActualMarks(exists=False))
    assert ops == [AddRoute(R4), AddRoute(R6), ReplaceMarkTable(want.marks),  # type: ignore[arg-type]
                   AddRule(TO), AddRule(FW1), AddRule(FW1_6)]


def test_adoption_when_everything_matches_is_zero_operations() -> None:
    want = d.desired_state(simple(), delivery=True)
    assert d.diff(want, want.rules, want.routes, intact(want.marks)) == []


def test_release_deletes_only_rules() -> None:
    cfg = simple()
    master = d.desired_state(cfg, delivery=True)
    backup = d.desired_state(cfg, delivery=False)
    assert d.diff(backup, master.rules, master.routes, intact(master.marks)) == [
        DeleteRule(TO), DeleteRule(FW1), DeleteRule(FW1_6)]


def test_changed_rule_is_added_before_the_old_one_is_deleted() -> None:
    # config moved the prefix rule to another prefix and priority
    new = simple(rule_priority=90, rules=[{"fwmark": 1}, {"to": "203.0.113.0/24"}])
    want = d.desired_state(new, delivery=True)
    ops = d.diff(want, {FW1, FW1_6, TO}, {R4, R6}, intact(want.marks))
    assert ops == [
        AddRule(RuleSpec(4, 90, 100, 98, dst="203.0.113.0/24")),
        AddRule(RuleSpec(4, 90, 100, 98, fwmark=1, mask=0xFFFFFFFF)),
        AddRule(RuleSpec(6, 90, 100, 98, fwmark=1, mask=0xFFFFFFFF)),
        DeleteRule(TO), DeleteRule(FW1), DeleteRule(FW1_6),
    ]


def test_table_change_moves_routes_and_rules() -> None:
    want = d.desired_state(simple(table=200), delivery=True)
    ops = d.diff(want, {FW1, FW1_6, TO}, {R4, R6}, intact(want.marks))
    n4, n6 = RouteSpec(4, 200, 98, "0.0.0.0/0"), RouteSpec(6, 200, 98, "::/0")
    assert ops == [
        AddRoute(n4), AddRoute(n6),
        AddRule(RuleSpec(4, 100, 200, 98, dst="198.51.100.0/24")),
        AddRule(RuleSpec(4, 100, 200, 98, fwmark=1, mask=0xFFFFFFFF)),
        AddRule(RuleSpec(6, 100, 200, 98, fwmark=1, mask=0xFFFFFFFF)),
        DeleteRule(TO), DeleteRule(FW1), DeleteRule(FW1_6),
        DeleteRoute(R4), DeleteRoute(R6),
    ]


def test_our_rule_with_foreign_attributes_is_replaced() -> None:
    want = d.desired_state(simple(), delivery=True)
    tampered = RuleSpec(4, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF, extra=(("FRA_SRC", "192.0.2.1"),))
    ops = d.diff(want, {tampered, FW1_6, TO}, {R4, R6}, intact(want.marks))
    assert ops == [AddRule(FW1), DeleteRule(tampered)]


def test_our_route_with_wrong_device_is_replaced() -> None:
    want = d.desired_state(simple(), delivery=False)
    wrong = RouteSpec(4, 100, 98, "0.0.0.0/0", kind="local", dev="ifindex7")
    assert d.diff(want, [], {wrong, R6}, intact(want.marks)) == [AddRoute(R4), DeleteRoute(wrong)]


def test_marks_missing_flushed_changed_or_unwanted() -> None:
    spec = d.mark_table(simple())
    assert spec is not None
    assert d.diff_marks(spec, ActualMarks(exists=False)) == [ReplaceMarkTable(spec)]
    assert d.diff_marks(spec, ActualMarks(exists=True, digest=spec.digest, intact=False)) == [ReplaceMarkTable(spec)]
    assert d.diff_marks(spec, ActualMarks(exists=True, digest="0" * 16, intact=True)) == [ReplaceMarkTable(spec)]
    assert d.diff_marks(spec, intact(spec)) == []
    assert d.diff_marks(None, intact(spec)) == [DeleteMarkTable("vipless_failover")]
    assert d.diff_marks(None, ActualMarks(exists=False)) == []


def test_mark_group_change_replaces_the_table_once() -> None:
    old = d.mark_table(simple())
    marks = copy.deepcopy(BASE["marks"])
    marks[1]["destinations"] = ["203.0.113.54/32"]
    new = d.desired_state(make(marks=marks, delivery={"rules": [{"fwmark": 1}]}), delivery=True)
    assert new.marks is not None and old is not None and new.marks.digest != old.digest
    assert d.diff(new, new.rules, new.routes, intact(old)) == [ReplaceMarkTable(new.marks)]


def test_delivery_unknown_keeps_matching_rules_only() -> None:
    # what start() does before the role is known: desired rules = actual & config
    cfg = simple()
    stale = RuleSpec(4, 55, 100, 98, fwmark=1, mask=0xFFFFFFFF)
    actual = {FW1, TO, stale}
    keep = frozenset(actual & d.delivery_rules(cfg))
    want = d.DesiredState(False, keep, d.local_routes(cfg), None, ())
    assert d.diff(want, actual, {R4, R6}, ActualMarks(exists=False)) == [DeleteRule(stale)]


# --- reading the nft table back ---------------------------------------------

def listing(spec: d.MarkTableSpec, rules: list[str] | None = None, extra_chain: bool = False) -> str:
    body = [f"\t\t{r.body()} comment \"{r.comment()}\"" for r in spec.rules] if rules is None else rules
    text = [f"table inet {spec.name} {{", f'\tcomment "{spec.comment()}"', "\tchain prerouting {",
            f"\t\t{CHAIN_HEADER}", *body, "\t}"]
    if extra_chain:
        text += ["\tchain other {", "\t\ttype filter hook input priority filter; policy accept;", "\t}"]
    return "\n".join([*text, "}", ""])


def test_inspect_listing_recognizes_intact_flushed_and_edited_tables() -> None:
    spec = d.mark_table(make())
    assert spec is not None
    assert inspect_listing(None, spec) == ActualMarks(exists=False)
    ok = inspect_listing(listing(spec), spec)
    assert ok == ActualMarks(exists=True, digest=spec.digest, intact=True, rule_count=3)
    flushed = inspect_listing(listing(spec, rules=[]), spec)
    assert flushed.exists and not flushed.intact and flushed.rule_count == 0
    extra = inspect_listing(listing(spec, rules=[*(f"\t\t{r.text()}" for r in spec.rules), "\t\tcounter"]), spec)
    assert not extra.intact and extra.rule_count == 4
    assert not inspect_listing(listing(spec, extra_chain=True), spec).intact
    other = d.mark_table(make(marks=[BASE["marks"][0]]))
    assert other is not None
    assert not inspect_listing(listing(spec), other).intact


def test_parse_listing_of_real_nft_output() -> None:
    # captured from `nft list table inet vipless_failover` (nftables 1.0.6)
    text = (
        "table inet vipless_failover {\n"
        '\tcomment "vipless-failover 4a53578e628951e2"\n'
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority mangle; policy accept;\n"
        "\t\tip daddr 198.51.100.0/24 meta l4proto { tcp, udp } th dport { 80, 443 } meta mark set 0x00000001"
        ' comment "vf web 6c651590b9e6"\n'
        "\t}\n"
        "}\n"
    )
    parsed = parse_listing(text)
    assert parsed.comment == "vipless-failover 4a53578e628951e2"
    assert parsed.chains == (("prerouting", (CHAIN_HEADER,)),)
    assert parsed.rules == (("prerouting", "vf web 6c651590b9e6"),)


# --- the facade without root -----------------------------------------------

def test_dataplane_is_constructed_lazily_without_root() -> None:
    from vipless_failover.dataplane import Dataplane

    dp = Dataplane(make(), structlog.get_logger(), netns="vf-does-not-exist")
    st = dp.status()
    assert st == {
        "delivery": False,
        "objects": {"rules": 0, "routes": 0, "nft_rules": 0, "ipvs_services": 0, "ipvs_reals": 0},
        "ipvs_available": False,
        "reconcile": {"runs": 0, "operations": 0, "errors": 0, "drift_repairs": 0, "last_error": None},
    }


async def test_set_delivery_before_start_only_records_the_decision() -> None:
    from vipless_failover.dataplane import Dataplane

    dp = Dataplane(make(), structlog.get_logger(), netns="vf-does-not-exist")
    await dp.set_delivery(True)
    assert dp.delivery is True and dp.status()["reconcile"]["runs"] == 0
    await dp.stop()  # never started: nothing to undo, no error
