"""Bad data plane input is a clear config error (config.py), before anything is applied."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from vipless_failover import config

from .test_desired import BASE


def parse(mutate: Any) -> config.Config:
    data = copy.deepcopy(BASE)
    mutate(data)
    return config.parse(data, "/etc/vf.toml")


def expect(mutate: Any, key: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        parse(mutate)
    assert exc.value.key == key, str(exc.value)
    assert words in exc.value.message, str(exc.value)
    assert str(exc.value).startswith(f"/etc/vf.toml: {key}: ")


def test_base_is_valid() -> None:
    assert parse(lambda d: None).delivery.table == 100


@pytest.mark.parametrize("table,name", [(253, "default"), (254, "main"), (255, "local")])
def test_table_must_not_collide_with_kernel_tables(table: int, name: str) -> None:
    expect(lambda d: d["delivery"].update(table=table), "delivery.table", f"kernel's {name} table")


def test_table_zero_is_refused() -> None:
    expect(lambda d: d["delivery"].update(table=0), "delivery.table", "must be 1..")


@pytest.mark.parametrize("mark", [0, 2**32, -1])
def test_fwmark_range_in_marks(mark: int) -> None:
    expect(lambda d: d["marks"][0].update(fwmark=mark), "marks[0].fwmark", "must be 1..4294967295")


@pytest.mark.parametrize("mark", [0, 2**32])
def test_fwmark_range_in_delivery_rules(mark: int) -> None:
    expect(lambda d: d["delivery"]["rules"][0].update(fwmark=mark), "delivery.rules[0].fwmark", "must be 1..")


def test_fwmark_max_is_accepted() -> None:
    cfg = parse(lambda d: d["marks"][0].update(fwmark=2**32 - 1))
    assert cfg.marks[0].fwmark == 0xFFFFFFFF


def test_duplicate_marks() -> None:
    expect(lambda d: d["marks"][1].update(fwmark=1), "marks[1].fwmark", "duplicate fwmark 1")


def test_duplicate_delivery_rule() -> None:
    expect(lambda d: d["delivery"]["rules"].append({"fwmark": 1}), "delivery.rules[4]", "duplicate rule")


@pytest.mark.parametrize("prefix", ["198.51.100.1/24", "198.51.100.0/33", "not-a-prefix", "2001:db8::/129"])
def test_invalid_mark_prefix(prefix: str) -> None:
    expect(lambda d: d["marks"][0].update(destinations=[prefix]), "marks[0].destinations[0]", "invalid prefix")


def test_invalid_delivery_prefix() -> None:
    expect(lambda d: d["delivery"]["rules"][1].update(to="198.51.100.7/24"), "delivery.rules[1].to",
           "invalid prefix")


def test_mask_needs_fwmark() -> None:
    expect(lambda d: d["delivery"]["rules"][1].update(mask=0xFF), "delivery.rules[1].mask", "needs fwmark")


def test_rule_needs_a_selector() -> None:
    expect(lambda d: d["delivery"]["rules"][1].pop("to"), "delivery.rules[1]", "needs fwmark and/or to")


def test_protocol_must_not_be_the_kernels() -> None:
    expect(lambda d: d["delivery"].update(protocol=2), "delivery.protocol", "must be 5..255")


def test_unknown_scheduler_name_is_refused() -> None:
    expect(lambda d: d["ipvs"]["services"][0].update(scheduler="bogus"), "ipvs.services[0].scheduler",
           "must be one of")
