"""Config of the operations keys: [notify] and [track] (checks and interfaces)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.factories import config_toml
from vipless_failover import config

BASE = config_toml()

EXAMPLES = Path(__file__).parents[2] / "examples"


def parse(extra: str) -> config.Config:
    return config.parse(tomllib.loads(BASE + extra), "t.toml")


def error(extra: str) -> str:
    with pytest.raises(config.ConfigError) as exc:
        parse(extra)
    return str(exc.value)


def test_defaults_have_no_hooks_and_nothing_tracked():
    cfg = parse("")
    assert cfg.notify == config.NotifyConfig(commands=(), timeout_ms=5000)
    assert cfg.track == config.TrackConfig(checks=(), interfaces=())


def test_full_operations_section():
    cfg = parse("""
[notify]
commands = [["/usr/local/bin/notify", "--quiet"], ["/usr/bin/logger", "-t", "vf"]]
timeout_ms = 2000

[[track.check]]
name = "haproxy"
command = ["/usr/bin/pgrep", "-x", "haproxy"]
interval_ms = 1000
timeout_ms = 500
rise = 2
fall = 3

[[track.check]]
name = "upstream"
command = ["/usr/local/bin/check-upstream"]
weight = 60

[[track.interface]]
name = "eth1"

[[track.interface]]
name = "eth2"
weight = 20
""")
    assert cfg.notify.commands == (("/usr/local/bin/notify", "--quiet"), ("/usr/bin/logger", "-t", "vf"))
    assert cfg.notify.timeout_ms == 2000
    hap, up = cfg.track.checks
    assert hap == config.TrackCheck("haproxy", ("/usr/bin/pgrep", "-x", "haproxy"), 1000, 500, 2, 3, 0)
    assert (up.interval_ms, up.timeout_ms, up.rise, up.fall, up.weight) == (2000, 1000, 1, 1, 60)
    assert cfg.track.interfaces == (config.TrackInterface("eth1", 0), config.TrackInterface("eth2", 20))


@pytest.mark.parametrize("extra, message", [
    ('[notify]\ncommands = ["/bin/true"]', "t.toml: notify.commands[0]: must be a non-empty array of strings"),
    ('[notify]\ncommands = [[]]', "t.toml: notify.commands[0]: must be a non-empty array of strings"),
    ('[notify]\ncommands = [["notify.sh"]]', "t.toml: notify.commands[0][0]: must be an absolute path"),
    ('[notify]\ncommands = [["/bin/x", 3]]', "t.toml: notify.commands[0][1]: must be a string, got integer"),
    ('[notify]\ntimeout_ms = 0', "t.toml: notify.timeout_ms: must be 10..600000, got 0"),
    ('[notify]\nshell = "x"', "t.toml: notify.shell: unknown key"),
    ('[[track.check]]\ncommand = ["/bin/true"]', "t.toml: track.check[0].name: is required"),
    ('[[track.check]]\nname = "a"', "t.toml: track.check[0].command: is required"),
    ('[[track.check]]\nname = "a"\ncommand = "/bin/true"', "t.toml: track.check[0].command: must be a non-empty"),
    ('[[track.check]]\nname = "a"\ncommand = ["/bin/true"]\nweight = 254',
     "t.toml: track.check[0].weight: must be 0..253, got 254"),
    ('[[track.check]]\nname = "a"\ncommand = ["/bin/true"]\nrise = 0', "t.toml: track.check[0].rise: must be 1..100"),
    ('[[track.check]]\nname = "a"\ncommand = ["/bin/true"]\nfall = 0', "t.toml: track.check[0].fall: must be 1..100"),
    ('[[track.check]]\nname = "a"\ncommand = ["/bin/true"]\ninterval_ms = 100\ntimeout_ms = 200',
     "t.toml: track.check[0].timeout_ms: must be <= interval_ms (100), got 200"),
    ('[[track.check]]\nname = "a"\ncommand = ["/bin/true"]\n[[track.check]]\nname = "a"\ncommand = ["/bin/true"]',
     "t.toml: track.check[1].name: duplicate check name 'a'"),
    ('[[track.check]]\nname = "a b"\ncommand = ["/bin/true"]', "t.toml: track.check[0].name: invalid value"),
    ('[[track.interface]]\nname = "eth0"', "t.toml: track.interface[0].name: interface 'eth0' is already "
                                           "tracked (node.interface always is)"),
    ('[[track.interface]]\nname = "eth1"\n[[track.interface]]\nname = "eth1"',
     "t.toml: track.interface[1].name: interface 'eth1' is already tracked"),
    ('[[track.interface]]\nname = "eth1"\nweight = -1', "t.toml: track.interface[0].weight: must be 0..253"),
    ('[track]\nchecks = []', "t.toml: track.checks: unknown key"),
])
def test_bad_operations_keys(extra, message):
    assert error(extra).startswith(message)


def test_examples_show_the_operations_keys_commented_out():
    for name in ("director-a.toml", "director-b.toml"):
        text = (EXAMPLES / name).read_text()
        assert "# [notify]" in text and "# [[track.check]]" in text and "# [[track.interface]]" in text
        # uncommented, they are valid
        lines = [ln[2:] if ln.startswith("# ") and any(k in ln for k in (
            "[notify]", "commands =", "timeout_ms =", "[[track.", "name =", "command =", "interval_ms =",
            "rise =", "fall =", "weight =")) else ln for ln in text.splitlines()]
        cfg = config.parse(tomllib.loads("\n".join(lines)), name)
        assert cfg.notify.commands and cfg.track.checks and cfg.track.interfaces
