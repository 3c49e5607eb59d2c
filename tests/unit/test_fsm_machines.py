"""The small machines beside the election's own (drain, promote, stop): their tables,
their diagram, and their states through the stories (tests/unit/fsm_sim.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from vipless_failover.election import fsm
from vipless_failover.election.fsm import (
    DrainEvent,
    DrainState,
    PromoteEvent,
    PromoteState,
    StopEvent,
    StopState,
    SubMachine,
)
from vipless_failover.election.protocol import State

from .fsm_sim import Node, Sim
from .test_fsm import MD_A, OPS, pair


def machines(e: fsm.Election) -> list[SubMachine]:
    return [e.drain_machine, e.promote_machine, e.stop_machine]


class CheckedSim(Sim):
    """A Sim that checks, after every node's actions, that each small machine's state
    and the data it stands for agree."""

    def _apply_only(self, node: Node, actions: list) -> None:
        super()._apply_only(node, actions)
        check_in_step(node.election)


def check_in_step(e: fsm.Election) -> None:
    drain = e.drain_machine.state
    assert (e.drain is None) == (drain is DrainState.IDLE), drain
    if e.drain is not None:
        assert (e.drain.heard is None) == (drain is DrainState.HANDING_OVER), drain
        assert e.state is not State.MASTER
    assert e.draining == (drain is not DrainState.IDLE)
    if e.promote_machine.state is PromoteState.REQUESTING:
        assert e.state is State.BACKUP and not e.stopping and not e.faults and not e.maintenance
    assert e.stopping == (e.stop_machine.state in (StopState.STOPPING, StopState.RESTARTING))
    assert e.finished == (e.stop_machine.state is StopState.FINISHED)
    # an awaited command is completed by the input that does it
    if e.state is State.MASTER:
        assert "promote" not in e.awaiting
    elif e.master not in (None, e.p.node):
        assert "demote" not in e.awaiting and "maintenance" not in e.awaiting


def checked_pair(**kw) -> Sim:
    sim = CheckedSim()
    sim.add("a", "192.0.2.11", 150, **kw)
    sim.add("b", "192.0.2.12", 100, **kw)
    sim.start("a")
    sim.start("b")
    sim.run_until_state("a", State.MASTER)
    sim.run_for(1.0)
    return sim


# -- the tables ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "table", "initial"), fsm.SUB_MACHINES, ids=[m[0] for m in fsm.SUB_MACHINES])
def test_every_event_of_a_small_machine_is_in_its_table(name, table, initial):
    events = {e for row in table.values() for e in row}
    assert events == set(type(next(iter(events))))
    states = set(table) | {dst for row in table.values() for dst in row.values()}
    assert states == set(type(initial)) and initial in table


def test_the_election_runs_the_small_machines_of_the_list():
    e = pair()["a"].election
    assert [(m.name, m.table, m.initial, m.state) for m in machines(e)] == [
        (name, table, initial, initial) for name, table, initial in fsm.SUB_MACHINES]


def test_an_undeclared_change_raises_local_error():
    e = pair()["a"].election
    with pytest.raises(fsm.LocalError, match="stop: no transition from RUNNING on exit"):
        e.stop_machine.go(StopEvent.EXIT)
    with pytest.raises(fsm.LocalError, match="drain: no transition from IDLE on master_heard"):
        e.drain_machine.go(DrainEvent.MASTER_HEARD)
    with pytest.raises(fsm.LocalError, match="promote: no transition from IDLE on expired"):
        e.promote_machine.go(PromoteEvent.EXPIRED)
    assert [m.state for m in machines(e)] == [DrainState.IDLE, PromoteState.IDLE, StopState.RUNNING]
    assert repr(e.stop_machine) == "<stop machine: RUNNING>"


def test_the_diagram_draws_every_small_machine():
    diagram = fsm.mermaid_diagram()
    for name, table, initial in fsm.SUB_MACHINES:
        assert f"    state {name} {{\n" in diagram
        assert f"        [*] --> {name}_{initial.name}\n" in diagram
        for src, row in table.items():
            for event, dst in row.items():
                assert f"        {name}_{src.name} --> {name}_{dst.name}: {event.value}\n" in diagram
    # the election's own machine first, unchanged
    assert diagram.startswith("stateDiagram-v2\n    [*] --> INIT\n    INIT --> BACKUP: start\n")


# -- drain ----------------------------------------------------------------------------


def test_drain_of_a_demote_hands_over_then_drains_then_ends():
    sim = checked_pair()
    a = sim["a"].election
    sim.pause("b")
    t0 = sim.now
    sim.command("a", fsm.Demote())
    assert a.drain_machine.state is DrainState.HANDING_OVER
    sim.run_until(t0 + 0.05)
    sim.resume("b")  # b takes the offer; a hears b's MASTER advert
    assert a.drain_machine.state is DrainState.DRAINING and a.drain.heard == t0 + 0.05
    sim.run_until(t0 + 0.05 + 0.2)  # drain_margin
    assert a.drain_machine.state is DrainState.IDLE and a.drain is None and not sim["a"].delivery


def test_drain_of_a_yield_to_a_higher_master_starts_heard():
    sim = CheckedSim(check_single_master=False)
    sim.add("a", "192.0.2.11", 150)
    sim.add("b", "192.0.2.12", 100)
    sim.partition("a", "b")
    sim.start("a")
    sim.start("b")
    sim.run_for(1.0)
    assert sorted(sim.masters()) == ["a", "b"]
    sim.heal()
    sim.run_for(0.15)  # b hears a's MASTER advert and yields
    b = sim["b"].election
    assert b.state is State.BACKUP and b.drain_machine.state is DrainState.DRAINING
    sim.run_for(0.2)
    assert b.drain_machine.state is DrainState.IDLE


def test_drain_whose_successor_never_answers_ends_when_master_again():
    sim = checked_pair()
    sim.partition("a", "b")
    sim.check_single_master = False
    t_d = sim.now
    sim.command("a", fsm.Demote())
    a = sim["a"].election
    sim.run_until(t_d + MD_A - 0.001)
    assert a.drain_machine.state is DrainState.HANDING_OVER
    sim.run_until(t_d + MD_A)
    assert a.state is State.MASTER and a.drain_machine.state is DrainState.IDLE


def test_drain_ends_on_a_fault():
    sim = checked_pair()
    sim.pause("b")
    sim.command("a", fsm.Demote())
    a = sim["a"].election
    actions = sim.command("a", fsm.SetFault("link:eth0", True))
    assert a.drain_machine.state is DrainState.IDLE and fsm.WithdrawDelivery() in actions


def test_drain_in_maintenance_whose_successor_never_answers_ends_at_its_cap():
    sim = checked_pair()
    sim.partition("a", "b")
    sim.check_single_master = False
    t_d = sim.now
    sim.command("a", fsm.SetMaintenance(True))
    a = sim["a"].election
    sim.run_until(t_d + 3.0 - 0.001)  # drain_max: maintenance never takes back over
    assert a.drain_machine.state is DrainState.HANDING_OVER and sim["a"].delivery
    sim.run_until(t_d + 3.0)
    assert a.drain_machine.state is DrainState.IDLE and not sim["a"].delivery


# -- promote ----------------------------------------------------------------------------


def test_promote_requests_until_master():
    sim = checked_pair()
    sim.block("b", "a")
    sim.command("b", fsm.Promote())
    b = sim["b"].election
    assert b.promote_machine.state is PromoteState.REQUESTING
    sim.heal()
    sim.run_for(0.1)  # the next request reaches a
    assert b.state is State.MASTER and b.promote_machine.state is PromoteState.IDLE


def test_promote_expires():
    sim = checked_pair()
    sim.block("b", "a")
    sim.command("b", fsm.Promote())
    sim.run_for(1.0)
    assert sim["b"].election.promote_machine.state is PromoteState.IDLE
    assert [a for _t, a in sim.actions("b", fsm.Refused)] == [
        fsm.Refused("promote", "the master did not hand over in time")]


@pytest.mark.parametrize("cancel", [fsm.Stop(), fsm.SetMaintenance(True), fsm.SetFault("link:eth0", True)])
def test_promote_is_cancelled_by_a_stop_maintenance_or_fault(cancel):
    sim = checked_pair()
    sim.block("b", "a")
    sim.command("b", fsm.Promote())
    sim.command("b", cancel)
    assert sim["b"].election.promote_machine.state is PromoteState.IDLE


# -- stop ----------------------------------------------------------------------------


def test_stop_of_a_master_stops_then_finishes_after_the_drain():
    sim = checked_pair()
    a = sim["a"].election
    sim.command("a", fsm.Stop())
    assert a.stop_machine.state is StopState.STOPPING and a.stopping and not a.finished
    assert sim.command("a", fsm.Stop()) == []  # asked again while draining
    sim.run_for(0.3)
    assert a.stop_machine.state is StopState.FINISHED and a.finished and sim["a"].exited


def test_restart_finishes_at_once():
    sim = checked_pair()
    a = sim["a"].election
    sim.command("a", fsm.Stop(restart=True))
    assert a.stop_machine.state is StopState.FINISHED


def test_restart_asked_while_draining_exits_at_once():
    sim = checked_pair()
    sim.command("a", fsm.Stop())
    assert sim.command("a", fsm.Stop(restart=True)) == [fsm.Exit(restart=True)]
    assert sim["a"].election.stop_machine.state is StopState.FINISHED


def test_a_fault_while_stopping_finishes():
    sim = checked_pair()
    sim.pause("b")
    sim.command("a", fsm.Stop())
    actions = sim.command("a", fsm.SetFault("link:eth0", True))
    assert actions[-1] == fsm.Exit() and sim["a"].election.finished


def test_backup_stop_finishes_at_once():
    sim = checked_pair()
    sim.command("b", fsm.Stop())
    assert sim["b"].election.stop_machine.state is StopState.FINISHED


# -- random stories: the machines stay in step with their data ------------------------


@settings(max_examples=int(os.environ.get("FSM_EXAMPLES", "200")), deadline=None)
@given(ops=st.lists(st.one_of(OPS, st.tuples(st.just("maintenance"), st.sampled_from("abc"), st.booleans()),
                              st.tuples(st.just("pause"), st.sampled_from("abc")),
                              st.tuples(st.just("resume"), st.sampled_from("abc"))), max_size=25))
def test_random_stories_keep_the_small_machines_in_step(ops):
    sim = CheckedSim(check_single_master=False)
    sim.add("a", "192.0.2.11", 150)
    sim.add("b", "192.0.2.12", 120)
    sim.add("c", "192.0.2.13", 100)
    for n in "abc":
        sim.start(n)
    for op in ops:
        kind, name = op[0], op[1]
        if kind == "run":
            sim.run_for(name)
            continue
        node = sim[name]
        usable = node.alive and not node.exited and not node.paused
        if kind == "kill":
            sim.kill(name)
        elif kind == "revive" and not node.alive:
            sim.revive(name)
            sim.start(name)
        elif kind == "pause" and usable:
            sim.pause(name)
        elif kind == "resume" and node.paused:
            sim.resume(name)
        elif usable and kind in ("stop", "promote", "demote"):
            sim.command(name, {"promote": fsm.Promote(), "demote": fsm.Demote(), "stop": fsm.Stop()}[kind])
        elif usable and kind in ("fault", "clear"):
            sim.command(name, fsm.SetFault("link:eth0", kind == "fault"))
        elif usable and kind == "maintenance":
            sim.command(name, fsm.SetMaintenance(op[2]))
        elif usable and kind == "prio":
            sim.command(name, fsm.SetPriority(op[2]))
    for n in "abc":
        if sim[n].paused:
            sim.resume(n)
    sim.run_for(5.0)
