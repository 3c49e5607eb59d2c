"""IPVS fwmark services on a real kernel (in the VM): create from config, change by
diff, adopt, leave foreign services alone, remove, clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.factories import config_dict, config_toml, write_key
from vipless_failover import config
from vipless_failover.dataplane import ipvs
from vipless_failover.dataplane.ipvs import IpvsError, IpvsServices
from vipless_failover.dataplane.ipvs_plan import (
    AddService,
    DeleteService,
    EditDest,
    EditService,
    IpvsServiceState,
    IpvsState,
    desired_ipvs,
)

from .conftest import Namespaces, ipvsadm_ln, nsexec, sh

BASE: dict[str, Any] = config_dict(node={"name": "a"}, ipvs={"services": [
    {"fwmark": 1, "scheduler": "wrr",
     "reals": [{"address": "203.0.113.21"}, {"address": "203.0.113.22", "weight": 3, "forward": "nat"}]},
    {"fwmark": 2, "family": "inet6", "scheduler": "sh", "persistence_s": 120,
     "reals": [{"address": "2001:db8::21", "forward": "tun", "weight": 7}]},
]})

#: ``ipvsadm -Ln`` for BASE, whitespace normalized
BASE_LISTING = {
    "FWM 1 wrr": ["203.0.113.21:0 Route 1 0 0", "203.0.113.22:0 Masq 3 0 0"],
    "FWM 2 IPv6 sh persistent 120": ["[2001:db8::21]:0 Tunnel 7 0 0"],
}


def make(mutate: Any = None) -> config.Config:
    data = copy.deepcopy(BASE)
    if mutate is not None:
        mutate(data)
    return config.parse(data, "vm-test.toml")


@pytest.fixture
def director(netns: Namespaces, tmp_path: Path) -> tuple[str, IpvsServices]:
    ns = netns("director")
    return ns, IpvsServices(netns=ns, owned_path=tmp_path / "ipvs-owned.json")


def test_available_and_empty(director: tuple[str, IpvsServices]) -> None:
    ns, services = director
    assert services.available()
    assert services.read() == IpvsState()
    assert ipvsadm_ln(ns) == {}


def test_create_from_config(director: tuple[str, IpvsServices]) -> None:
    ns, services = director
    desired = desired_ipvs(make())
    ops = services.reconcile(desired)
    assert [type(op).__name__ for op in ops] == ["AddService", "AddDest", "AddDest", "AddService", "AddDest"]
    assert ipvsadm_ln(ns) == BASE_LISTING
    assert services.read() == desired
    assert services.owned() == {(4, 1), (6, 2)}


def test_weight_edit_is_one_op_and_scheduler_change_edits_in_place(director: tuple[str, IpvsServices]) -> None:
    ns, services = director
    services.reconcile(desired_ipvs(make()))

    def weight(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][0]["reals"][1]["weight"] = 9
    ops = services.reconcile(desired_ipvs(make(weight)))
    assert len(ops) == 1 and isinstance(ops[0], EditDest)
    assert ipvsadm_ln(ns)["FWM 1 wrr"] == ["203.0.113.21:0 Route 1 0 0", "203.0.113.22:0 Masq 9 0 0"]

    def sched(data: dict[str, Any]) -> None:
        weight(data)
        data["ipvs"]["services"][0]["scheduler"] = "lc"
        data["ipvs"]["services"][0]["reals"][0]["forward"] = "tun"
    ops = services.reconcile(desired_ipvs(make(sched)))
    assert [type(op) for op in ops] == [EditService, EditDest]
    listing = ipvsadm_ln(ns)
    assert "FWM 1 wrr" not in listing
    assert listing["FWM 1 lc"] == ["203.0.113.21:0 Tunnel 1 0 0", "203.0.113.22:0 Masq 9 0 0"]
    assert services.read() == desired_ipvs(make(sched))


def test_adopted_by_a_second_instance_with_zero_ops(director: tuple[str, IpvsServices], tmp_path: Path) -> None:
    ns, services = director
    desired = desired_ipvs(make())
    services.reconcile(desired)
    again = IpvsServices(netns=ns, owned_path=services.owned_path)  # a restarted daemon
    assert again.reconcile(desired) == []
    lost_record = IpvsServices(netns=ns, owned_path=tmp_path / "fresh.json")  # record lost
    assert lost_record.reconcile(desired) == []
    assert ipvsadm_ln(ns) == BASE_LISTING


def test_foreign_services_untouched_and_ours_removed(director: tuple[str, IpvsServices]) -> None:
    ns, services = director
    nsexec(ns, "ipvsadm", "-A", "-t", "192.0.2.50:80", "-s", "rr")
    nsexec(ns, "ipvsadm", "-a", "-t", "192.0.2.50:80", "-r", "203.0.113.40:80", "-m")
    nsexec(ns, "ipvsadm", "-A", "-f", "77", "-s", "rr")
    nsexec(ns, "ipvsadm", "-a", "-f", "77", "-r", "203.0.113.41", "-g", "-w", "4")
    foreign = {
        "TCP 192.0.2.50:80 rr": ["203.0.113.40:80 Masq 1 0 0"],
        "FWM 77 rr": ["203.0.113.41:0 Route 4 0 0"],
    }
    assert ipvsadm_ln(ns) == foreign

    services.reconcile(desired_ipvs(make()))
    assert ipvsadm_ln(ns) == {**foreign, **BASE_LISTING}
    assert (4, 77) in services.read().services  # seen, but not ours
    assert services.owned() == {(4, 1), (6, 2)}

    removed = services.remove_owned()
    assert sorted(str(op) for op in removed) == ["delete service fwmark 1 inet wrr",
                                                 "delete service fwmark 2 inet6 sh persistent 120"]
    assert ipvsadm_ln(ns) == foreign
    assert services.owned() == frozenset()


def test_service_removed_from_config_is_deleted_via_ownership_record(director: tuple[str, IpvsServices]) -> None:
    ns, services = director
    services.reconcile(desired_ipvs(make()))

    def drop_v6(data: dict[str, Any]) -> None:
        del data["ipvs"]["services"][1]
    restarted = IpvsServices(netns=ns, owned_path=services.owned_path)
    ops = restarted.reconcile(desired_ipvs(make(drop_v6)))
    assert len(ops) == 1 and isinstance(ops[0], DeleteService) and ops[0].service.key == (6, 2)
    assert ipvsadm_ln(ns) == {"FWM 1 wrr": BASE_LISTING["FWM 1 wrr"]}
    assert restarted.owned() == {(4, 1)}


def test_scheduler_the_kernel_lacks_gives_clear_error(director: tuple[str, IpvsServices]) -> None:
    ns, services = director
    with pytest.raises(IpvsError) as info:
        services.apply([AddService(IpvsServiceState(4, 9, "vfnosuch"))])
    assert "scheduler 'vfnosuch' not available in this kernel (modprobe ip_vs_vfnosuch?)" in str(info.value)
    assert isinstance(info.value.op, AddService)
    assert ipvsadm_ln(ns) == {}

    # a scheduler the config accepts but Debian's 6.1 kernel has no module for
    if sh("modprobe", "-n", "ip_vs_twos", check=False).returncode == 0:
        return  # a newer kernel ships it; the synthetic case above still ran

    def twos(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][0]["scheduler"] = "twos"
    with pytest.raises(IpvsError, match=r"scheduler 'twos' not available in this kernel \(modprobe ip_vs_twos\?\)"):
        services.reconcile(desired_ipvs(make(twos)))
    assert "FWM 1 twos" not in ipvsadm_ln(ns)


def test_real_server_in_namespace_without_routes_gives_clear_error(netns: Namespaces, tmp_path: Path) -> None:
    ns = netns("bare", lo_up=False)  # a fresh namespace: lo never up, no local routes
    services = IpvsServices(netns=ns, owned_path=tmp_path / "o.json")
    with pytest.raises(IpvsError, match="real server address"):
        services.reconcile(desired_ipvs(make()))
    assert ipvs.read_owned(tmp_path / "o.json") == {(4, 1), (6, 2)}  # remembered although half-applied
    services.remove_owned()
    assert ipvsadm_ln(ns) == {}


def test_daemon_refuses_a_scheduler_the_kernel_lacks_and_applies_nothing(netns: Namespaces,
                                                                         tmp_path: Path) -> None:
    """Debian's 6.1 kernel has no ip_vs_twos: a clear config error (exit 2) before
    anything is applied (no IPVS service, no nft table, no rule or route of ours)."""
    import os
    import sys
    ns = netns("director")
    nsexec(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    for dev in ("eth0", "eth1"):
        nsexec(ns, "ip", "link", "set", dev, "up")
    nsexec(ns, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
    key = write_key(tmp_path / "key")
    cfg = tmp_path / "director.toml"
    cfg.write_text(config_toml(
        node={"name": "a"}, election={"key_file": str(key)},
        control={"socket": f"{tmp_path}/control.sock", "state_dir": str(tmp_path)}, metrics={"listen": ""},
        delivery={"rules": [{"fwmark": 1}]}, marks=[{"name": "web", "fwmark": 1, "destinations": ["198.51.100.0/24"]}],
        ipvs={"services": [{"fwmark": 1, "scheduler": "twos"}]}, announce={"mode": "none"}))
    daemon = os.path.join(os.path.dirname(sys.executable), "vipless-failoverd")
    p = nsexec(ns, daemon, "--config", str(cfg), check=False, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert (f"{cfg}: ipvs.services[0].scheduler: scheduler 'twos' is not available in this kernel "
            "(no ip_vs_twos module)") in p.stderr
    assert ipvsadm_ln(ns) == {}
    assert "vipless_failover" not in nsexec(ns, "nft", "list", "tables").stdout
    assert "proto 98" not in nsexec(ns, "ip", "rule", "show").stdout
    routes = nsexec(ns, "ip", "route", "show", "table", "100", check=False)
    # no route of ours: the table is empty, or (this kernel) does not even exist
    assert routes.stdout.strip() == "" and (routes.returncode == 0 or "does not exist" in routes.stderr)
