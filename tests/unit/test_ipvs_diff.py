"""IPVS desired state and minimal diff (dataplane/ipvs_plan.py, pure; no root, no IPVS, no socket)."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tests.factories import config_dict
from vipless_failover import config
from vipless_failover.dataplane import ipvs_plan as plan
from vipless_failover.dataplane.ipvs_plan import (
    AddDest,
    AddService,
    DeleteDest,
    DeleteService,
    EditDest,
    EditService,
    IpvsDest,
    IpvsServiceState,
    IpvsState,
    desired_ipvs,
    diff_ipvs,
)

A = ipaddress.ip_address

BASE: dict[str, Any] = config_dict(ipvs={"services": [
    {"fwmark": 1, "scheduler": "wrr",
     "reals": [{"address": "203.0.113.21"}, {"address": "203.0.113.22", "weight": 3, "forward": "nat"}]},
    {"fwmark": 2, "family": "inet6", "scheduler": "sh", "persistence_s": 120, "flags": ["sh-port"],
     "reals": [{"address": "2001:db8::21", "port": 8080, "forward": "tun", "weight": 7}]},
]})


def make(mutate: Any = None) -> config.Config:
    data = copy.deepcopy(BASE)
    if mutate is not None:
        mutate(data)
    return config.parse(data, "test.toml")


def svc1(**over: Any) -> IpvsServiceState:
    base = dict(family=4, fwmark=1, scheduler="wrr", timeout=0, flags=0, netmask=32,
                dests=(IpvsDest(A("203.0.113.21"), 0, 1, plan.FWD_DR),
                       IpvsDest(A("203.0.113.22"), 0, 3, plan.FWD_NAT)))
    base.update(over)
    return IpvsServiceState(**base)


def svc2() -> IpvsServiceState:
    return IpvsServiceState(family=6, fwmark=2, scheduler="sh", timeout=120,
                            flags=plan.SVC_F_PERSISTENT | plan.SVC_F_SCHED2, netmask=128,
                            dests=(IpvsDest(A("2001:db8::21"), 8080, 7, plan.FWD_TUN),))


# -- desired ----------------------------------------------------------------


def test_desired_from_config_exact() -> None:
    assert desired_ipvs(make()) == IpvsState.of([svc1(), svc2()])


def test_desired_keys_family_fwmark_and_netmask_per_family() -> None:
    state = desired_ipvs(make())
    assert sorted(state.services) == [(4, 1), (6, 2)]
    assert state.services[(4, 1)].netmask == 32
    assert state.services[(6, 2)].netmask == 128


def test_forward_methods_are_kernel_conn_flags() -> None:
    assert plan.FORWARD_METHOD == {"nat": 0, "tun": 2, "dr": 3}


def test_persistent_flag_without_timeout_gets_ipvsadm_default() -> None:
    def mutate(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][0]["flags"] = ["persistent"]
    svc = desired_ipvs(make(mutate)).services[(4, 1)]
    assert svc.flags == plan.SVC_F_PERSISTENT
    assert svc.timeout == plan.DEFAULT_PERSISTENCE_S


def test_hashed_flag_is_kernel_bookkeeping_and_never_compared() -> None:
    assert svc1(flags=plan.SVC_F_HASHED) == svc1()


def test_example_config_desired() -> None:
    cfg = config.load(Path(__file__).resolve().parents[2] / "examples" / "director-a.toml")
    state = desired_ipvs(cfg)
    assert list(state.services) == [(4, 1)]
    svc = state.services[(4, 1)]
    assert svc.scheduler == "wrr"
    assert [str(d.address) for d in svc.dests] == ["203.0.113.21", "203.0.113.22"]
    assert {d.forward for d in svc.dests} == {plan.FWD_DR}


def test_empty_config_is_empty_state() -> None:
    def mutate(data: dict[str, Any]) -> None:
        del data["ipvs"]
    assert len(desired_ipvs(make(mutate))) == 0


def test_duplicate_service_rejected() -> None:
    with pytest.raises(ValueError):
        IpvsState.of([svc1(), svc1()])


# -- diff -------------------------------------------------------------------


def test_add_everything_from_empty_in_order() -> None:
    ops = diff_ipvs(desired_ipvs(make()), IpvsState())
    assert ops == [
        AddService(svc1(dests=())),
        AddDest((4, 1), IpvsDest(A("203.0.113.21"), 0, 1, plan.FWD_DR)),
        AddDest((4, 1), IpvsDest(A("203.0.113.22"), 0, 3, plan.FWD_NAT)),
        AddService(IpvsServiceState(6, 2, "sh", 120, plan.SVC_F_PERSISTENT | plan.SVC_F_SCHED2, 128)),
        AddDest((6, 2), IpvsDest(A("2001:db8::21"), 8080, 7, plan.FWD_TUN)),
    ]


def test_adopt_desired_equals_actual_no_ops() -> None:
    state = desired_ipvs(make())
    actual = IpvsState.of([svc2(), svc1(flags=plan.SVC_F_HASHED)])  # as the kernel reports it
    assert diff_ipvs(state, actual, owned=state.keys()) == []


def test_change_one_weight_is_exactly_one_edit_dest() -> None:
    def mutate(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][0]["reals"][1]["weight"] = 9
    ops = diff_ipvs(desired_ipvs(make(mutate)), desired_ipvs(make()))
    assert ops == [EditDest((4, 1), IpvsDest(A("203.0.113.22"), 0, 9, plan.FWD_NAT),
                            before=IpvsDest(A("203.0.113.22"), 0, 3, plan.FWD_NAT))]


def test_change_forward_method_is_one_edit_dest() -> None:
    def mutate(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][0]["reals"][0]["forward"] = "tun"
    ops = diff_ipvs(desired_ipvs(make(mutate)), desired_ipvs(make()))
    assert ops == [EditDest((4, 1), IpvsDest(A("203.0.113.21"), 0, 1, plan.FWD_TUN),
                            before=IpvsDest(A("203.0.113.21"), 0, 1, plan.FWD_DR))]


def test_change_scheduler_is_one_edit_service_not_delete_add() -> None:
    def mutate(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][0]["scheduler"] = "lc"
    ops = diff_ipvs(desired_ipvs(make(mutate)), desired_ipvs(make()), owned=[(4, 1), (6, 2)])
    assert ops == [EditService(svc1(scheduler="lc", dests=()), before=svc1(dests=()))]


def test_change_persistence_is_one_edit_service() -> None:
    def mutate(data: dict[str, Any]) -> None:
        data["ipvs"]["services"][1]["persistence_s"] = 30
    ops = diff_ipvs(desired_ipvs(make(mutate)), desired_ipvs(make()))
    assert len(ops) == 1 and isinstance(ops[0], EditService)
    assert ops[0].service.timeout == 30 and ops[0].before.timeout == 120


def test_remove_owned_service_deletes_it_with_its_dests() -> None:
    def mutate(data: dict[str, Any]) -> None:
        del data["ipvs"]["services"][1]
    actual = desired_ipvs(make())
    ops = diff_ipvs(desired_ipvs(make(mutate)), actual, owned=actual.keys())
    assert ops == [DeleteService(svc2().without_dests())]


def test_removed_service_not_in_ownership_record_is_left_alone() -> None:
    def mutate(data: dict[str, Any]) -> None:
        del data["ipvs"]["services"][1]
    assert diff_ipvs(desired_ipvs(make(mutate)), desired_ipvs(make()), owned=[(4, 1)]) == []


def test_foreign_service_untouched() -> None:
    foreign = IpvsServiceState(4, 77, "rr", dests=(IpvsDest(A("192.0.2.99"), 0, 1, plan.FWD_DR),))
    desired = desired_ipvs(make())
    actual = IpvsState.of([svc1(), svc2(), foreign])
    assert diff_ipvs(desired, actual, owned=desired.keys()) == []
    # same fwmark, other family: a different service, still not ours
    foreign6 = IpvsServiceState(6, 1, "rr")
    assert diff_ipvs(desired, IpvsState.of([svc1(), svc2(), foreign6]), owned=desired.keys()) == []


def test_add_and_remove_reals_add_first_then_delete() -> None:
    new = IpvsDest(A("203.0.113.23"), 0, 1, plan.FWD_DR)
    old = IpvsDest(A("203.0.113.21"), 0, 1, plan.FWD_DR)
    desired = IpvsState.of([svc1(dests=(new, IpvsDest(A("203.0.113.22"), 0, 3, plan.FWD_NAT)))])
    ops = diff_ipvs(desired, IpvsState.of([svc1()]))
    assert ops == [AddDest((4, 1), new), DeleteDest((4, 1), old)]


def test_real_port_change_is_add_plus_delete() -> None:
    moved = IpvsDest(A("203.0.113.21"), 8080, 1, plan.FWD_DR)
    desired = IpvsState.of([svc1(dests=(moved, IpvsDest(A("203.0.113.22"), 0, 3, plan.FWD_NAT)))])
    ops = diff_ipvs(desired, IpvsState.of([svc1()]))
    assert [type(op) for op in ops] == [AddDest, DeleteDest]


def test_diff_then_applied_converges() -> None:
    """Applying the ops to a model of the kernel yields the desired state (any pair)."""
    states = [IpvsState(), desired_ipvs(make()), IpvsState.of([svc1(scheduler="rr")]),
              IpvsState.of([svc2(), svc1(dests=())])]
    for want in states:
        for have in states:
            owned = want.keys() | have.keys()
            got = _simulate(have, diff_ipvs(want, have, owned))
            assert got == want
            assert diff_ipvs(want, got, owned) == []


def _simulate(state: IpvsState, ops: list[Any]) -> IpvsState:
    svcs = {k: (v.without_dests(), v.dest_map()) for k, v in state.services.items()}
    for op in ops:
        if isinstance(op, (AddService, EditService)):
            if isinstance(op, AddService):
                assert op.service.key not in svcs
            svcs[op.service.key] = (op.service, svcs.get(op.service.key, (None, {}))[1])
        elif isinstance(op, DeleteService):
            del svcs[op.service.key]
        elif isinstance(op, AddDest):
            assert op.dest.key not in svcs[op.service][1]
            svcs[op.service][1][op.dest.key] = op.dest
        elif isinstance(op, EditDest):
            assert op.dest.key in svcs[op.service][1]
            svcs[op.service][1][op.dest.key] = op.dest
        else:
            del svcs[op.service][1][op.dest.key]
    return IpvsState.of(IpvsServiceState(s.family, s.fwmark, s.scheduler, s.timeout, s.flags,
                                         s.netmask, tuple(dests.values()))
                        for s, dests in svcs.values())


def test_ops_describe_themselves() -> None:
    ops = diff_ipvs(desired_ipvs(make()), IpvsState())
    assert str(ops[0]) == "add service fwmark 1 inet wrr"
    assert str(ops[1]) == "add real 203.0.113.21:0 dr weight 1 to fwmark 1 inet"
    assert str(ops[4]) == "add real [2001:db8::21]:8080 tun weight 7 to fwmark 2 inet6"
