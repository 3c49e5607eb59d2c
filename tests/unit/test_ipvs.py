"""IPVS in the kernel, the parts that need no IPVS (dataplane/ipvs.py): the netmask
attribute, the kernel's errors as messages, the ownership record, a kernel without
IPVS, the schedulers a kernel cannot load. (The plan: test_ipvs_diff.py.)"""

from __future__ import annotations

import errno
import ipaddress
import json
from pathlib import Path

import pytest

from tests.factories import make_config
from vipless_failover.dataplane import ipvs
from vipless_failover.dataplane.ipvs_plan import AddService, DeleteDest, EditService, IpvsDest, IpvsServiceState

A = ipaddress.ip_address


# -- encoding and errors ----------------------------------------------------


def test_netmask_encoding_roundtrip() -> None:
    assert ipvs.netmask_attr(4, 32) == "255.255.255.255"
    assert ipvs.netmask_prefixlen(4, "255.255.255.255") == 32
    assert ipvs.netmask_prefixlen(4, "255.255.255.0") == 24
    for plen in (1, 64, 128):
        assert ipvs.netmask_prefixlen(6, ipvs.netmask_attr(6, plen)) == plen
    assert ipvs.netmask_prefixlen(6, None) == 128


def test_missing_scheduler_error_is_clear() -> None:
    op = AddService(IpvsServiceState(4, 9, "twos"))
    err = ipvs.error_for(op, errno.ENOENT)
    assert err.op is op
    assert "scheduler 'twos' not available in this kernel (modprobe ip_vs_twos?)" in str(err)
    edit = EditService(IpvsServiceState(4, 9, "xyz"), IpvsServiceState(4, 9, "wrr"))
    assert "scheduler 'xyz' not available" in str(ipvs.error_for(edit, errno.ENOENT))


def test_other_errors_name_the_op() -> None:
    op = DeleteDest((4, 1), IpvsDest(A("203.0.113.21")))
    err = ipvs.error_for(op, errno.EPERM)
    assert str(err).startswith("delete real 203.0.113.21:0 dr weight 1 from fwmark 1 inet: ")
    assert "EPERM" in str(err)


# -- ownership record -------------------------------------------------------


def test_ownership_record_roundtrip_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ipvs-owned.json"
    assert ipvs.read_owned(path) == frozenset()
    ipvs.write_owned(path, [(6, 2), (4, 1)])
    assert ipvs.read_owned(path) == {(4, 1), (6, 2)}
    assert json.loads(path.read_text())["services"] == [{"family": 4, "fwmark": 1},
                                                       {"family": 6, "fwmark": 2}]
    ipvs.write_owned(path, [])
    assert ipvs.read_owned(path) == frozenset()
    assert [p.name for p in path.parent.iterdir()] == ["ipvs-owned.json"]  # no temp files left


def test_corrupt_ownership_record_raises(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text("{not json")
    with pytest.raises(ipvs.IpvsError, match="ownership record"):
        ipvs.read_owned(path)
    path.write_text('{"services": [{"fwmark": 1}]}')
    with pytest.raises(ipvs.IpvsError, match="malformed"):
        ipvs.read_owned(path)


def test_unavailable_without_ipvs_is_reported_not_raised() -> None:
    """On a kernel without IPVS (this host) available() is False; read() says why."""
    services = ipvs.IpvsServices(owned_path="/nonexistent/o.json")
    try:
        present = services.available()
    except ipvs.IpvsError as exc:  # e.g. no permission to open netlink: still typed
        pytest.skip(f"cannot probe netlink here: {exc}")
    if present:
        pytest.skip("this kernel has IPVS")
    with pytest.raises(ipvs.IpvsUnavailable, match="IPVS is not available"):
        services.read()


# -- schedulers the kernel lacks: a config error before anything is applied --------


def _sched_cfg(*schedulers: str):
    services = [{"fwmark": i + 1, "scheduler": s} for i, s in enumerate(schedulers)]
    return make_config(ipvs={"services": services})


def test_missing_schedulers_from_the_kernel_module_lists(tmp_path):
    from vipless_failover.dataplane.ipvs import missing_schedulers
    mods = tmp_path / "modules" / "6.1.0-test"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(
        "kernel/net/netfilter/ipvs/ip_vs_rr.ko: kernel/net/netfilter/ipvs/ip_vs.ko\n"
        "kernel/net/netfilter/ipvs/ip_vs_wrr.ko.xz: kernel/net/netfilter/ipvs/ip_vs.ko\n")
    (mods / "modules.builtin").write_text("kernel/net/netfilter/ipvs/ip_vs_sh.ko\n")
    sysmod = tmp_path / "sys_module"
    (sysmod / "ip_vs_lc").mkdir(parents=True)  # loaded
    cfg = _sched_cfg("rr", "wrr", "sh", "lc", "twos", "mh")
    missing = missing_schedulers(cfg, release="6.1.0-test", modules_root=tmp_path / "modules",
                                 sys_module=sysmod)
    assert missing == [("ipvs.services[4].scheduler", "twos"), ("ipvs.services[5].scheduler", "mh")]


def test_missing_schedulers_says_nothing_without_module_lists(tmp_path):
    from vipless_failover.dataplane.ipvs import missing_schedulers
    assert missing_schedulers(_sched_cfg("twos"), release="none", modules_root=tmp_path,
                              sys_module=tmp_path) == []
