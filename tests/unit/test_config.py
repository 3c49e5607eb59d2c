"""Config validation: every bad input names the file, the key path and the problem,
and `vipless-failoverd --check-config` exits 2 without touching the system."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.factories import config_toml, write_key
from vipless_failover import config
from vipless_failover.daemon import main as daemon_main

EXAMPLES = Path(__file__).parents[2] / "examples"

#: [node] and [election] (last: an appended line is an election key); write() fills in {key}
MINIMAL = config_toml(election={"key_file": "{key}"})


def write(tmp_path: Path, text: str, key: Path) -> Path:
    path = tmp_path / "director.toml"
    path.write_text(text.replace("{key}", str(key)))
    return path


def check(path: Path, capsys) -> tuple[int, str]:
    code = daemon_main(["--check-config", "-c", str(path)])
    return code, capsys.readouterr().err.strip()


def test_examples_are_valid_and_share_their_digest(capsys):
    a = config.load(EXAMPLES / "director-a.toml")
    b = config.load(EXAMPLES / "director-b.toml")
    assert a.shared_digest() == b.shared_digest()
    assert a.election.priority != b.election.priority
    assert a.node.address != b.node.address


def test_minimal_config_defaults(tmp_path, key, capsys):
    # lo: --check-config also checks the interface (start does), and every host has lo
    path = write(tmp_path, MINIMAL.replace('"eth0"', '"lo"'), key)
    cfg = config.load(path)
    assert cfg.election.advert_interval_ms == 1000
    assert cfg.election.transport == "multicast"
    assert str(cfg.election.group) == "224.0.0.18"
    assert cfg.control.socket == Path("/run/vipless-failover/control.sock")
    assert cfg.metrics.host == "127.0.0.1"
    assert cfg.delivery.table == 100 and cfg.delivery.protocol == 98
    assert config.read_key(cfg) == b"0123456789abcdef0123456789abcdef"
    code, _err = check(path, capsys)
    assert code == 0


def test_ipv6_node_gets_ipv6_group(tmp_path, key):
    path = write(tmp_path, MINIMAL.replace("192.0.2.11", "2001:db8:1::11"), key)
    assert str(config.load(path).election.group) == "ff02::12"


def test_shared_digest_ignores_node_specific_parts(tmp_path, key):
    a = config.load(write(tmp_path, MINIMAL, key))
    b = config.load(write(tmp_path, MINIMAL.replace("priority = 150", "priority = 100")
                          .replace("director-a", "director-b"), key))
    c = config.load(write(tmp_path, MINIMAL + '\n[announce]\nvips = ["198.51.100.10"]\n', key))
    assert a.shared_digest() == b.shared_digest() != c.shared_digest()


BAD = [
    # (description, edit of MINIMAL, expected message after "FILE: ")
    ("out of range", lambda s: s + "advert_interval_ms = 5\n",
     "election.advert_interval_ms: must be 10..40950, got 5"),
    ("too large", lambda s: s + "advert_interval_ms = 40951\n",
     "election.advert_interval_ms: must be 10..40950, got 40951"),
    ("wrong type", lambda s: s + 'advert_interval_ms = "100"\n',
     "election.advert_interval_ms: must be an integer, got string"),
    ("bool is not int", lambda s: s + "advert_interval_ms = true\n",
     "election.advert_interval_ms: must be an integer, got boolean"),
    ("unknown key", lambda s: s + "advert_intreval_ms = 100\n",
     "election.advert_intreval_ms: unknown key"),
    ("unknown section", lambda s: s + "[elections]\nx = 1\n", "elections: unknown key"),
    ("missing required", lambda s: s.replace("cluster_id = 51\n", ""), "election.cluster_id: is required"),
    ("missing section", lambda s: s.split("[election]")[0], "election: is required"),
    ("priority 0", lambda s: s.replace("priority = 150", "priority = 0"),
     "election.priority: must be 1..254, got 0"),
    ("priority 255", lambda s: s.replace("priority = 150", "priority = 255"),
     "election.priority: must be 1..254, got 255"),
    ("cluster id", lambda s: s.replace("cluster_id = 51", "cluster_id = 256"),
     "election.cluster_id: must be 1..255, got 256"),
    ("bad address", lambda s: s.replace('"192.0.2.11"', '"192.0.2.311"'),
     "node.address: invalid IP address '192.0.2.311'"),
    ("multicast node address", lambda s: s.replace('"192.0.2.11"', '"224.0.0.1"'),
     "node.address: must be a unicast address, got 224.0.0.1"),
    ("bad node name", lambda s: s.replace('"director-a"', '"director a"'),
     "node.name: invalid value 'director a'"),
    ("bad interface", lambda s: s.replace('"eth0"', '"this-name-is-too-long"'),
     "node.interface: invalid value 'this-name-is-too-long'"),
    ("group not multicast", lambda s: s + 'group = "192.0.2.1"\n',
     "election.group: must be a multicast address, got 192.0.2.1"),
    ("group wrong family", lambda s: s + 'group = "ff02::12"\n',
     "election.group: must be IPv4 like node.address, got ff02::12"),
    ("unicast without peers", lambda s: s + 'transport = "unicast"\n',
     'election.peers: must list at least one peer with transport = "unicast"'),
    ("bad transport", lambda s: s + 'transport = "broadcast"\n',
     "election.transport: must be one of multicast, unicast, got 'broadcast'"),
    ("peer is self", lambda s: s + 'transport = "unicast"\npeers = ["192.0.2.11"]\n',
     "election.peers[0]: is this node's own address 192.0.2.11"),
    ("drain max < margin", lambda s: s + "drain_margin_ms = 500\ndrain_max_ms = 100\n",
     "election.drain_max_ms: must be >= drain_margin_ms (500), got 100"),
    ("relative socket", lambda s: s + '[control]\nsocket = "ctl.sock"\n',
     "control.socket: must be an absolute path, got 'ctl.sock'"),
    ("relative state dir", lambda s: s + '[control]\nstate_dir = "state"\n',
     "control.state_dir: must be an absolute path, got 'state'"),
    ("bad metrics listen", lambda s: s + '[metrics]\nlisten = "localhost"\n',
     "metrics.listen: must be HOST:PORT or \"\", got 'localhost'"),
    ("reserved table main", lambda s: s + "[delivery]\ntable = 254\n",
     "delivery.table: must not be the kernel's main table (254)"),
    ("reserved table local", lambda s: s + "[delivery]\ntable = 255\n",
     "delivery.table: must not be the kernel's local table (255)"),
    ("fwmark 0", lambda s: s + "[[delivery.rules]]\nfwmark = 0\n",
     "delivery.rules[0].fwmark: must be 1..4294967295, got 0"),
    ("fwmark too big", lambda s: s + "[[delivery.rules]]\nfwmark = 4294967296\n",
     "delivery.rules[0].fwmark: must be 1..4294967295, got 4294967296"),
    ("bad prefix", lambda s: s + '[[delivery.rules]]\nto = "198.51.100.1/24"\n',
     "delivery.rules[0].to: invalid prefix '198.51.100.1/24' (198.51.100.1/24 has host bits set)"),
    ("empty rule", lambda s: s + '[[delivery.rules]]\niif = "eth0"\n',
     "delivery.rules[0]: needs fwmark and/or to"),
    ("duplicate mark group", lambda s: s + '[[marks]]\nname = "a"\nfwmark = 1\ndestinations = ["198.51.100.0/24"]\n'
                                         '[[marks]]\nname = "b"\nfwmark = 1\ndestinations = ["198.51.100.0/25"]\n',
     "marks[1].fwmark: duplicate fwmark 1 (each mark group needs its own)"),
    ("bad scheduler", lambda s: s + "[[ipvs.services]]\nfwmark = 1\nscheduler = \"fast\"\n",
     "ipvs.services[0].scheduler: must be one of rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh, "
     "twos, got 'fast'"),
    ("real family mismatch", lambda s: s + '[[ipvs.services]]\nfwmark = 1\n[[ipvs.services.reals]]\n'
                                         'address = "2001:db8::1"\n',
     "ipvs.services[0].reals[0].address: must be IPv4 like the service, got 2001:db8::1"),
    ("vip contains own address", lambda s: s + '[announce]\nvips = ["192.0.2.0/24"]\n',
     "announce.vips[0]: contains this director's own address 192.0.2.11"),
    ("next-hop mode without next hop", lambda s: s + '[announce]\nmode = "next-hop"\n',
     'announce.next_hop: is required with mode = "next-hop"'),
    ("next hop without prefix length", lambda s: s + '[announce]\nnext_hop = "192.0.2.100"\n',
     "announce.next_hop: must be ADDRESS/PREFIXLEN, got '192.0.2.100'"),
    ("invalid toml", lambda s: s + "priority = \n", None),
]


@pytest.mark.parametrize("desc,edit,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_reported_with_file_key_and_exit_2(tmp_path, key, capsys, desc, edit, message):
    path = write(tmp_path, edit(MINIMAL), key)
    code, err = check(path, capsys)
    assert code == 2
    if message is None:
        assert err.startswith(f"vipless-failoverd: {path}: invalid TOML: ")
    else:
        assert err == f"vipless-failoverd: {path}: {message}"


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.toml"
    code, err = check(path, capsys)
    assert (code, err) == (2, f"vipless-failoverd: {path}: no such file")


def test_not_utf8(tmp_path, capsys):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00")
    code, err = check(path, capsys)
    assert (code, err) == (2, f"vipless-failoverd: {path}: not UTF-8 text")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_key_file_accessible_by_others_is_refused(tmp_path, key, capsys, mode):
    key.chmod(mode)
    path = write(tmp_path, MINIMAL, key)
    code, err = check(path, capsys)
    assert code == 2
    assert err == (f"vipless-failoverd: {path}: election.key_file: {key}: must not be accessible by others "
                   f"(mode {mode:04o}; chmod 0600 it)")


def test_key_file_missing(tmp_path, key, capsys):
    path = write(tmp_path, MINIMAL, tmp_path / "missing.key")
    code, err = check(path, capsys)
    assert (code, err) == (2, f"vipless-failoverd: {path}: election.key_file: {tmp_path / 'missing.key'}: "
                              "no such file")


def test_key_too_short(tmp_path, key, capsys):
    key.write_text("short")
    path = write(tmp_path, MINIMAL, key)
    code, err = check(path, capsys)
    assert (code, err) == (2, f"vipless-failoverd: {path}: election.key_file: {key}: key must be at least "
                              "16 bytes, got 5")


def test_key_file_is_directory(tmp_path, capsys):
    d = tmp_path / "keydir"
    d.mkdir(mode=0o700)
    path = write(tmp_path, MINIMAL, d)
    code, err = check(path, capsys)
    assert (code, err) == (2, f"vipless-failoverd: {path}: election.key_file: {d}: not a regular file")


def test_relative_key_path_is_relative_to_config(tmp_path, key):
    path = write(tmp_path, MINIMAL.replace("{key}", key.name), key)  # key_file = "cluster.key", beside the config
    assert config.read_key(config.load(path)) == b"0123456789abcdef0123456789abcdef"


def test_check_config_changes_nothing(tmp_path, key, capsys):
    """--check-config reads two files (and the interface) and writes none (no socket, no runtime dir)."""
    sock_dir = tmp_path / "run"
    path = write(tmp_path, MINIMAL.replace('"eth0"', '"lo"') + f'[control]\nsocket = "{sock_dir}/control.sock"\n',
                 key)
    before = sorted(os.listdir(tmp_path))
    code, out = daemon_main(["--check-config", "-c", str(path)]), capsys.readouterr().out
    assert code == 0 and out.strip() == f"{path}: OK"
    assert sorted(os.listdir(tmp_path)) == before


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        daemon_main([])
    assert exc.value.code == 2
    assert re.search(r"required: -c/--config", capsys.readouterr().err)


# ---------------------------------------------------------------------------
# key rotation and the replay window (issue 13, items 3 and 4)


def test_accepted_keys_are_read_after_the_signing_key(tmp_path, key):
    old = write_key(tmp_path / "cluster.key.old", b"fedcba9876543210fedcba9876543210")
    text = MINIMAL + f'accept_key_files = ["{old}"]\nmax_clock_skew_ms = 2000\n'
    cfg = config.load(write(tmp_path, text, key))
    assert cfg.election.accept_key_files == (old,) and cfg.election.max_clock_skew_ms == 2000
    assert config.read_keys(cfg) == (b"0123456789abcdef0123456789abcdef", b"fedcba9876543210fedcba9876543210")
    # an accepted key is checked like the signing key, and named by its key path
    old.chmod(0o644)
    with pytest.raises(config.ConfigError, match=r"election\.accept_key_files\[0\]: .*accessible by others"):
        config.read_keys(cfg)
    # without accepted keys: just the signing key; default window 5 s
    plain = config.load(write(tmp_path, MINIMAL, key))
    assert config.read_keys(plain) == (config.read_key(plain),)
    assert plain.election.max_clock_skew_ms == 5000


@pytest.mark.parametrize("extra, message", [
    ('accept_key_files = ["{key}"]', r"accept_key_files\[0\]: is election.key_file itself"),
    ('accept_key_files = ["/a", "/a"]', r"accept_key_files\[1\]: duplicate of election.accept_key_files\[0\]"),
    ('accept_key_files = ["/a", "/b", "/c", "/d"]', r"accept_key_files: at most 3 files"),
    ('accept_key_files = [""]', r"accept_key_files\[0\]: must be a non-empty string"),
    ("max_clock_skew_ms = 99", r"max_clock_skew_ms: must be 0 \(off\) or at least 100, got 99"),
    ("max_clock_skew_ms = -1", r"max_clock_skew_ms"),
])
def test_bad_rotation_and_window_settings_are_refused(tmp_path, key, extra, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(write(tmp_path, MINIMAL + extra + "\n", key))


def test_reload_may_change_the_keys_and_the_window_only(tmp_path, key):
    a = config.load(write(tmp_path, MINIMAL, key)).election
    b = config.load(write(tmp_path, MINIMAL.replace("{key}", "/other.key")
                          + 'accept_key_files = ["/old.key"]\nmax_clock_skew_ms = 0\n', key)).election
    assert a != b and a.without_keys() == b.without_keys()
    c = config.load(write(tmp_path, MINIMAL.replace("priority = 150", "priority = 140"), key)).election
    assert a.without_keys() != c.without_keys()
