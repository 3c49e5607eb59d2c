"""Checks that reload and --check-config share with start (issue 13, item 5):
overlapping VIPs, delivery rules and mark groups refused with the key paths of both
sides; config and key read as regular files of bounded size (a FIFO is refused at
once, never read); the on-link check in --check-config and in ``preflight``;
failoverctl's [control] socket taken from a config that does not validate."""

from __future__ import annotations

import ipaddress
import os
import random
import threading
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from tests.factories import config_toml
from vipless_failover import config
from vipless_failover.daemon import main as daemon_main, preflight

#: on lo (--check-config and preflight check the interface); {key} is filled in by each test
BASE = config_toml(node={"interface": "lo"}, election={"key_file": "{key}"})


def parse(extra: str) -> config.Config:
    return config.parse(tomllib.loads(BASE.replace("{key}", "/k") + extra), "t.toml")


def error(extra: str) -> str:
    with pytest.raises(config.ConfigError) as exc:
        parse(extra)
    return str(exc.value)


def rules(*rows: str) -> str:
    return "".join(f"[[delivery.rules]]\n{row}\n" for row in rows)


def mark(name: str, fwmark: int, dests: list[str], protocols: list[str] | None = None,
         ports: list[int] | None = None) -> str:
    text = f'[[marks]]\nname = "{name}"\nfwmark = {fwmark}\ndestinations = {dests!r}\n'.replace("'", '"')
    if protocols is not None:
        text += f"protocols = {protocols!r}\n".replace("'", '"')
    if ports is not None:
        text += f"ports = {ports!r}\n"
    return text


# ---------------------------------------------------------------------------
# overlaps


def test_duplicate_vip_names_both_entries():
    assert error('[announce]\nvips = ["198.51.100.10", "198.51.100.11", "198.51.100.10"]\n') == (
        "t.toml: announce.vips[2]: 198.51.100.10/32 overlaps announce.vips[0] 198.51.100.10/32 "
        "(list each VIP once)")


@pytest.mark.parametrize("vips,later,earlier", [
    (["198.51.100.0/24", "198.51.100.7"], "announce.vips[1]: 198.51.100.7/32", "announce.vips[0] 198.51.100.0/24"),
    (["198.51.100.7", "198.51.100.0/24"], "announce.vips[1]: 198.51.100.0/24", "announce.vips[0] 198.51.100.7/32"),
    (["2001:db8:100::/120", "2001:db8:100::10"], "announce.vips[1]: 2001:db8:100::10/128",
     "announce.vips[0] 2001:db8:100::/120"),
])
def test_nested_vips_are_refused(vips, later, earlier):
    msg = error(f"[announce]\nvips = {vips!r}\n".replace("'", '"'))
    assert msg == f"t.toml: {later} overlaps {earlier} (list each VIP once)"


def test_disjoint_vips_of_both_families_are_accepted():
    cfg = parse('[announce]\nvips = ["198.51.100.0/25", "198.51.100.128/25", "2001:db8:100::/120", '
                '"2001:db8:100::100/120"]\n')
    assert len(cfg.announce.vips) == 4


def test_a_duplicate_among_65535_vips_is_found_quickly():
    vips = [f"2001:db8:100::{i:x}" for i in range(65_535)] + ["2001:db8:100::abcd"]
    doc = tomllib.loads(BASE.replace("{key}", "/k"))
    doc["announce"] = {"vips": vips}
    t0 = time.perf_counter()
    with pytest.raises(config.ConfigError) as exc:
        config.parse(doc, "t.toml")
    assert time.perf_counter() - t0 < 5.0
    assert str(exc.value).startswith("t.toml: announce.vips[65535]: 2001:db8:100::abcd/128 overlaps "
                                     "announce.vips[43981] 2001:db8:100::abcd/128")


def test_nested_pairs_finds_every_overlap():
    rng = random.Random(13)
    for _ in range(200):
        nets = [ipaddress.ip_network(f"198.51.100.{rng.getrandbits(6)}/{rng.randint(26, 32)}", strict=False)
                if rng.random() < 0.7 else
                ipaddress.ip_network(f"2001:db8::{rng.getrandbits(4):x}/{rng.randint(124, 128)}", strict=False)
                for _ in range(rng.randint(0, 12))]
        got = set(config.nested_pairs((n, i) for i, n in enumerate(nets)))
        want = {(i, j) if (nets[j].subnet_of(nets[i]) and (nets[i] != nets[j] or i < j)) else (j, i)
                for i in range(len(nets)) for j in range(i + 1, len(nets))
                if nets[i].version == nets[j].version and nets[i].overlaps(nets[j])}
        assert got == want, nets


def test_nested_delivery_prefixes_name_both_rules():
    assert error(rules('to = "198.51.100.0/24"', 'to = "198.51.100.0/25"')) == (
        "t.toml: delivery.rules[1].to: 198.51.100.0/25 overlaps delivery.rules[0].to 198.51.100.0/24: "
        "delivery.rules[1] adds nothing (every rule leads to table 100)")
    # the broader one later: still the later key, the narrower one is the redundant one
    assert error(rules('to = "198.51.100.0/25"', 'to = "198.51.100.0/24"')) == (
        "t.toml: delivery.rules[1].to: 198.51.100.0/24 overlaps delivery.rules[0].to 198.51.100.0/25: "
        "delivery.rules[0] adds nothing (every rule leads to table 100)")


def test_delivery_rule_covered_by_one_without_iif_or_fwmark_is_refused():
    msg = error(rules('to = "198.51.100.0/24"', 'to = "198.51.100.0/26"\niif = "eth1"'))
    assert "delivery.rules[1].to: 198.51.100.0/26 overlaps delivery.rules[0].to 198.51.100.0/24" in msg
    msg = error(rules('to = "198.51.100.0/24"\nfwmark = 1', 'to = "198.51.100.0/24"'))
    assert msg.endswith("delivery.rules[0] adds nothing (every rule leads to table 100)")


@pytest.mark.parametrize("a,b", [
    ('to = "198.51.100.0/24"\niif = "eth1"', 'to = "198.51.100.0/25"\niif = "eth2"'),  # other traffic
    ('to = "198.51.100.0/24"\niif = "eth1"', 'to = "198.51.100.0/25"'),  # the narrower one selects more
    ('to = "198.51.100.0/24"\nfwmark = 1', 'to = "198.51.100.0/25"'),
    ('to = "198.51.100.0/24"\nfwmark = 1', 'to = "198.51.100.0/25"\nfwmark = 2'),
    ('to = "198.51.100.0/25"', 'to = "198.51.100.128/25"'),  # disjoint
    ('to = "198.51.100.0/24"', 'fwmark = 1'),  # no prefix on one side
])
def test_overlapping_delivery_rules_selecting_other_traffic_are_accepted(a, b):
    assert len(parse(rules(a, b)).delivery.rules) == 2


def test_mark_groups_on_one_destination_and_port_are_ambiguous():
    msg = error(mark("web", 1, ["198.51.100.0/24"], ["tcp"], [80, 443])
                + mark("api", 2, ["198.51.100.10/32"], ["tcp", "udp"], [443, 8443]))
    assert msg == ("t.toml: marks[1].destinations[0]: 198.51.100.10/32 overlaps marks[0].destinations[0] "
                   "198.51.100.0/24: tcp port 443 would get fwmark 1 (web) or 2 (api) depending on rule order")
    # no ports: every port
    msg = error(mark("all", 1, ["2001:db8:100::/64"]) + mark("one", 2, ["2001:db8:100::10/128"], ["udp"], [53]))
    assert msg.endswith("udp port 53 would get fwmark 1 (all) or 2 (one) depending on rule order")
    msg = error(mark("a", 1, ["198.51.100.7/32"]) + mark("b", 2, ["198.51.100.0/30", "198.51.100.4/30"]))
    assert msg.startswith("t.toml: marks[1].destinations[1]: 198.51.100.4/30 overlaps marks[0].destinations[0] "
                          "198.51.100.7/32: tcp/udp any port would get fwmark 1 (a) or 2 (b)")


@pytest.mark.parametrize("a,b", [
    (mark("http", 1, ["198.51.100.0/24"], ["tcp"], [80]), mark("https", 2, ["198.51.100.0/24"], ["tcp"], [443])),
    (mark("t", 1, ["198.51.100.0/24"], ["tcp"]), mark("u", 2, ["198.51.100.10/32"], ["udp"])),
    (mark("x", 1, ["198.51.100.0/25"]), mark("y", 2, ["198.51.100.128/25"])),
    # within one group the destinations are one set (collapsed for nft): merged, not refused
    (mark("one", 1, ["198.51.100.0/24", "198.51.100.10/32"]), ""),
])
def test_mark_groups_that_select_different_traffic_are_accepted(a, b):
    assert parse(a + b).marks


def test_check_config_refuses_overlaps_with_exit_2(tmp_path, key, capsys):
    path = tmp_path / "d.toml"
    path.write_text(BASE.replace("{key}", str(key)) + '[announce]\nvips = ["198.51.100.10", "198.51.100.10"]\n')
    assert daemon_main(["--check-config", "-c", str(path)]) == 2
    assert "announce.vips[1]: 198.51.100.10/32 overlaps announce.vips[0]" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# files: regular, bounded, never blocking


def _in_thread(fn, timeout: float = 5.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def test_config_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "d.toml"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(config.ConfigError) as exc:
        _in_thread(lambda: config.load(fifo))
    assert str(exc.value) == f"{fifo}: not a regular file"
    assert time.monotonic() - t0 < 1.0
    assert _in_thread(lambda: config.control_socket_hint(fifo)) is None


def test_key_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "k"
    os.mkfifo(fifo, 0o600)
    cfg = parse("")
    cfg = replace(cfg, election=replace(cfg.election, key_file=fifo))
    with pytest.raises(config.ConfigError) as exc:
        _in_thread(lambda: config.read_key(cfg))
    assert str(exc.value) == f"t.toml: election.key_file: {fifo}: not a regular file"


def test_config_too_large_is_refused_unread(tmp_path, key):
    path = tmp_path / "d.toml"
    path.write_text(BASE.replace("{key}", str(key)) + "#" * config.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert str(exc.value) == (f"{path}: is {path.stat().st_size} bytes, more than the "
                              f"{config.MAX_CONFIG_BYTES} read at most")


def test_key_too_large_is_refused(tmp_path, key):
    key.write_bytes(b"k" * (config.MAX_KEY_BYTES + 1))
    path = tmp_path / "d.toml"
    path.write_text(BASE.replace("{key}", str(key)))
    with pytest.raises(config.ConfigError) as exc:
        config.read_key(config.load(path))
    assert "election.key_file" in str(exc.value) and f"more than the {config.MAX_KEY_BYTES}" in str(exc.value)


def test_read_regular_file_checks_the_opened_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert config.read_regular_file(f, 3) == b"abc"
    with pytest.raises(config.FileRefused):
        config.read_regular_file(f, 2)
    with pytest.raises(config.FileRefused):
        config.read_regular_file(tmp_path, 100)  # a directory
    with pytest.raises(FileNotFoundError):
        config.read_regular_file(tmp_path / "nope", 100)


# ---------------------------------------------------------------------------
# failoverctl: the socket of a config that does not validate


def test_control_socket_hint_reads_raw_toml(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[control]\nsocket = "/run/x/control.sock"\n[elections]\nbogus = 1\n')
    with pytest.raises(config.ConfigError):
        config.load(path)
    assert config.control_socket_hint(path) == Path("/run/x/control.sock")
    path.write_text('[control]\nsocket = "relative.sock"\n')
    assert config.control_socket_hint(path) is None
    path.write_text('[control\nsocket = "/run/x/control.sock"\n')  # not TOML
    assert config.control_socket_hint(path) is None
    assert config.control_socket_hint(tmp_path / "missing.toml") is None


# ---------------------------------------------------------------------------
# start's checks against this machine, in --check-config and preflight (lo: every
# host has it, with 127.0.0.1/8 and ::1/128 only)


def test_check_config_runs_the_on_link_check(tmp_path, key, capsys):
    path = tmp_path / "d.toml"
    path.write_text(BASE.replace("{key}", str(key)) + '[announce]\nvips = ["127.0.0.8/30", "198.51.100.10"]\n')
    assert daemon_main(["--check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vipless-failoverd: {path}: announce.vips[1]: 198.51.100.10/32 is not on lo's subnets")
    with pytest.raises(config.ConfigError) as exc:
        preflight(path)
    assert exc.value.key == "announce.vips[1]"


def test_preflight_reads_the_key_and_checks_the_machine(tmp_path, key):
    path = tmp_path / "d.toml"
    path.write_text(BASE.replace("{key}", str(key)) + '[announce]\nvips = ["127.0.0.8/30"]\n')
    cfg, keys = preflight(path)
    assert keys == (b"0123456789abcdef0123456789abcdef",) and cfg.announce.vips
    key.chmod(0o644)
    with pytest.raises(config.ConfigError) as exc:
        preflight(path)
    assert exc.value.key == "election.key_file"
