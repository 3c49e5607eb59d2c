"""Operator commands end in one action: Completed once done (maybe inputs later), or
Refused. Stories on FSMs wired in memory with a hand-set clock (tests/unit/fsm_sim.py)."""

from __future__ import annotations

import pytest

from vipless_failover.election import fsm
from vipless_failover.election.protocol import State

from .fsm_sim import Sim
from .test_fsm import MD_A, SKEW_100, elected_pair, pair, trio


def completed(sim: Sim, name: str) -> list[tuple[float, fsm.Completed]]:
    return [(t, a) for t, a in sim[name].log if isinstance(a, fsm.Completed)]


def refused(sim: Sim, name: str) -> list[tuple[float, fsm.Refused]]:
    return [(t, a) for t, a in sim[name].log if isinstance(a, fsm.Refused)]


def lone_master() -> Sim:
    sim = Sim()
    sim.add("a", "192.0.2.11", 150)
    sim.start("a")
    sim.run_until_state("a", State.MASTER)
    return sim


# -- promote ----------------------------------------------------------------------


def test_promote_completes_when_the_backup_becomes_master_after_its_takeover_actions():
    sim = elected_pair()
    t0 = sim.now
    actions = sim.command("b", fsm.Promote())
    assert not [a for a in actions if isinstance(a, fsm.Completed)]  # only asked so far
    assert completed(sim, "b") == [(t0, fsm.Completed("promote", {"state": "MASTER"}))]
    # in execution order: the input that made b master ends with it
    log = [a for t, a in sim["b"].log if t == t0]
    become = log.index(fsm.Transition(State.BACKUP, State.MASTER, "handover:a"))
    assert [type(a) for a in log[become:]] == [fsm.Transition, fsm.InstallDelivery, fsm.StartAnnounce,
                                              fsm.SendAdvert, fsm.Completed]
    sim.run_for(5.0)
    assert len(completed(sim, "b")) == 1 and not refused(sim, "b")


def test_promote_on_the_master_completes_at_once():
    sim = elected_pair()
    assert sim.command("a", fsm.Promote()) == [
        fsm.Completed("promote", {"state": "MASTER", "note": "already master"})]
    sim.run_for(2.0)
    assert len(completed(sim, "a")) == 1 and sim.masters() == ["a"]


def test_promote_with_no_master_heard_completes_when_the_timer_makes_it_master():
    sim = pair()
    sim.start("b")
    sim.command("b", fsm.Promote())
    t = sim.run_until_state("b", State.MASTER)
    assert t == pytest.approx(0.3 + SKEW_100)
    assert completed(sim, "b") == [(t, fsm.Completed("promote", {"state": "MASTER"}))]
    assert sim["b"].log[-1] == (t, fsm.Completed("promote", {"state": "MASTER"}))


def test_promote_the_master_ignores_is_refused_and_never_completes():
    sim = elected_pair()
    sim.block("b", "a")  # a never hears b's takeover requests, b still hears a
    t0 = sim.now
    sim.command("b", fsm.Promote())
    md_b = sim["b"].election.master_down_interval()
    sim.run_until(t0 + md_b + 0.1)
    assert refused(sim, "b") == [(pytest.approx(t0 + md_b + 0.1),
                                 fsm.Refused("promote", "the master did not hand over in time"))]
    assert not completed(sim, "b")
    # the refused promote is over: b becoming master later completes nothing
    sim.kill("a")
    sim.run_until_state("b", State.MASTER)
    sim.run_for(1.0)
    assert not completed(sim, "b")


@pytest.mark.parametrize("state", ["FAULT", "INIT"])
def test_promote_in_a_state_that_cannot_is_refused_alone(state):
    sim = elected_pair()
    if state == "FAULT":
        sim.command("b", fsm.SetFault("link:eth0", True))
    else:
        sim.kill("b")
        sim.revive("b")
    assert sim.command("b", fsm.Promote()) == [fsm.Refused("promote", f"state is {state}")]


def test_promote_in_maintenance_or_while_stopping_is_refused_alone():
    sim = elected_pair()
    sim.command("b", fsm.SetMaintenance(True))
    assert sim.command("b", fsm.Promote()) == [fsm.Refused("promote", "maintenance mode is on")]
    sim.command("b", fsm.SetMaintenance(False))
    sim.command("a", fsm.Demote())  # b master; a drains
    assert sim.masters() == ["b"]
    sim.command("a", fsm.Stop())  # a's drain ends with its Exit
    assert not sim["a"].exited
    assert sim.command("a", fsm.Promote()) == [fsm.Refused("promote", "stopping")]


def test_promote_pending_when_a_fault_arrives_is_neither_refused_nor_completed_then():
    """As before the Completed action: the fault ends the takeover requests silently.
    The completion stays due: b becoming master later (here: a crashed) completes it."""
    sim = elected_pair()
    sim.block("b", "a")
    sim.command("b", fsm.Promote())
    sim.run_for(0.05)
    assert sim["b"].election.promote_machine.state is fsm.PromoteState.REQUESTING
    actions = sim.command("b", fsm.SetFault("link:eth0", True))
    assert not [a for a in actions if isinstance(a, fsm.Completed | fsm.Refused)]
    assert sim["b"].election.promote_machine.state is fsm.PromoteState.IDLE
    sim.run_for(2.0)
    assert not completed(sim, "b") and not refused(sim, "b")
    sim.command("b", fsm.SetFault("link:eth0", False))
    sim.kill("a")
    t = sim.run_until_state("b", State.MASTER)
    assert completed(sim, "b") == [(t, fsm.Completed("promote", {"state": "MASTER"}))]


def test_promote_twice_completes_once():
    sim = elected_pair()
    sim.block("b", "a")
    sim.command("b", fsm.Promote())
    sim.run_for(0.05)
    sim.heal()
    sim.command("b", fsm.Promote())
    assert sim.masters() == ["b"]
    sim.run_for(1.0)
    assert [a for _t, a in completed(sim, "b")] == [fsm.Completed("promote", {"state": "MASTER"})]


# -- demote -----------------------------------------------------------------------


def test_demote_completes_when_the_successors_master_advert_arrives():
    sim = elected_pair()
    t0 = sim.now
    actions = sim.command("a", fsm.Demote())
    assert not [a for a in actions if isinstance(a, fsm.Completed)]  # b not heard yet
    assert completed(sim, "a") == [(t0, fsm.Completed("demote", {"state": "BACKUP", "master": "b"}))]
    sim.run_for(5.0)
    assert len(completed(sim, "a")) == 1 and not refused(sim, "a")


def test_demote_completes_only_once_the_paused_successor_answers():
    sim = elected_pair()
    sim.pause("b")
    sim.run_for(0.01)
    t_d = sim.now
    sim.command("a", fsm.Demote())
    sim.run_until(t_d + 0.24)
    assert not completed(sim, "a")  # several inputs later: still due
    sim.resume("b")
    assert completed(sim, "a") == [(t_d + 0.24, fsm.Completed("demote", {"state": "BACKUP", "master": "b"}))]


@pytest.mark.parametrize("state", ["BACKUP", "INIT", "FAULT"])
def test_demote_when_not_master_is_refused_and_nothing_else(state):
    sim = elected_pair()
    name = "b"
    if state == "INIT":
        sim.kill("b")
        sim.revive("b")
    elif state == "FAULT":
        sim.command("b", fsm.SetFault("link:eth0", True))
    assert sim.command(name, fsm.Demote()) == [fsm.Refused("demote", f"not master (state is {state})")]


def test_demote_without_backup_never_completes():
    sim = lone_master()
    assert sim.command("a", fsm.Demote()) == [fsm.Refused("demote", "no live backup to hand over to")]
    sim.run_for(3.0)
    assert not completed(sim, "a")


def test_demote_whose_successor_never_answers_is_refused_and_never_completes():
    sim = elected_pair()
    sim.partition("a", "b")
    sim.check_single_master = False
    t_d = sim.now
    sim.command("a", fsm.Demote())
    sim.run_until(t_d + MD_A)
    assert [a.command for _t, a in refused(sim, "a")] == ["demote"]
    sim.heal()
    sim.run_for(3.0)
    assert sim.masters() == ["a"] and not completed(sim, "a")


def test_demote_in_a_trio_names_the_best_backup_as_master():
    sim = trio()
    t0 = sim.now
    sim.command("a", fsm.Demote())
    assert completed(sim, "a") == [(t0, fsm.Completed("demote", {"state": "BACKUP", "master": "b"}))]


def test_demote_refused_later_while_one_is_under_way_leaves_that_one_due():
    sim = elected_pair()
    sim.pause("b")
    t_d = sim.now
    sim.command("a", fsm.Demote())
    assert sim.command("a", fsm.Demote()) == [fsm.Refused("demote", "not master (state is BACKUP)")]
    sim.run_until(t_d + 0.1)
    sim.resume("b")
    assert completed(sim, "a") == [(t_d + 0.1, fsm.Completed("demote", {"state": "BACKUP", "master": "b"}))]


# -- maintenance ------------------------------------------------------------------


def test_maintenance_on_the_master_completes_like_a_demote():
    sim = elected_pair()
    t0 = sim.now
    actions = sim.command("a", fsm.SetMaintenance(True))
    assert not [a for a in actions if isinstance(a, fsm.Completed)]
    assert completed(sim, "a") == [(t0, fsm.Completed("maintenance", {"state": "BACKUP", "master": "b"}))]


def test_maintenance_on_a_master_without_backup_is_refused_alone():
    sim = lone_master()
    assert sim.command("a", fsm.SetMaintenance(True)) == [
        fsm.Refused("maintenance", "no live backup to hand over to")]
    assert not sim["a"].election.maintenance
    sim.run_for(2.0)
    assert not completed(sim, "a")


def test_maintenance_off_or_on_a_backup_completes_at_once():
    sim = elected_pair()
    assert sim.command("b", fsm.SetMaintenance(True)) == [fsm.Completed("maintenance", {})]
    assert sim.command("b", fsm.SetMaintenance(False)) == [fsm.Completed("maintenance", {})]
    assert sim.command("a", fsm.SetMaintenance(False)) == [fsm.Completed("maintenance", {})]  # off on a master
    fresh = pair()
    assert fresh.command("a", fsm.SetMaintenance(True)) == [fsm.Completed("maintenance", {})]  # before Start


# -- no command, no completion -------------------------------------------------------


def test_takeover_by_the_timer_or_a_stop_completes_nothing():
    sim = elected_pair()
    sim.kill("a")
    sim.run_until_state("b", State.MASTER)
    sim.revive("a")
    sim.start("a")
    sim.run_until_state("a", State.MASTER)  # preempted back
    sim.command("a", fsm.Stop())
    sim.run_for(2.0)
    assert not completed(sim, "a") and not completed(sim, "b")


def test_a_finished_election_completes_nothing():
    sim = elected_pair()
    sim.command("a", fsm.Stop(restart=True))
    assert sim["a"].election.handle_command(fsm.SetMaintenance(False), sim.now) == []
