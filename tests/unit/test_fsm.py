"""Election stories on FSMs wired in memory with a hand-set clock (no sockets, no sleeps)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipless_failover.election import fsm
from vipless_failover.election.protocol import Flag, State

from .fsm_sim import InvariantError, Sim

MS = 0.001
# prio 100 @ 100 ms: skew = (256-100)*100/256 ms = 60.9375 ms
SKEW_100 = 156 * 100 / 256 * MS
SKEW_150 = 106 * 100 / 256 * MS
SKEW_120 = 136 * 100 / 256 * MS


def pair(**kw) -> Sim:
    sim = Sim()
    sim.add("a", "192.0.2.11", 150, **kw)
    sim.add("b", "192.0.2.12", 100, **kw)
    return sim


def elected_pair(**kw) -> Sim:
    sim = pair(**kw)
    sim.start("a")
    sim.start("b")
    sim.run_until_state("a", State.MASTER)
    sim.run_for(1.0)
    return sim


def last_master_advert(sim: Sim, name: str) -> float:
    return sim.master_adverts_by(name)[-1]


# -- purity -----------------------------------------------------------------------


def test_fsm_and_protocol_import_no_io():
    forbidden = {"asyncio", "socket", "pyroute2", "time", "selectors", "threading", "subprocess"}
    root = Path(fsm.__file__).parent
    for name in ("fsm.py", "protocol.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = {node.module.split(".")[0]}
            else:
                continue
            assert not mods & forbidden, f"{name} imports {mods & forbidden}"


def test_state_diagram_in_docs_matches_table():
    doc = (Path(__file__).parents[2] / "docs" / "state-diagram.md").read_text()
    assert fsm.mermaid_diagram() in doc, "regenerate: python -m vipless_failover.election.fsm"


def test_every_table_entry_is_reachable_by_name():
    events = {e for row in fsm.TRANSITIONS.values() for e in row}
    assert events == set(fsm.Event)


# -- timing -----------------------------------------------------------------------


def test_master_down_interval_is_three_intervals_plus_skew():
    sim = pair()
    b = sim["b"].election
    assert b.skew() == pytest.approx(SKEW_100)
    assert b.master_down_interval() == pytest.approx(0.3 + 0.0609375)


def test_startup_higher_priority_wins_at_its_own_master_down_time():
    sim = pair()
    sim.start("a")
    sim.start("b")
    t = sim.run_until_state("a", State.MASTER)
    assert t == pytest.approx(0.3 + SKEW_150)
    sim.run_for(2.0)
    assert sim.masters() == ["a"]
    assert sim["b"].state is State.BACKUP
    assert sim["a"].delivery and not sim["b"].delivery
    assert sim["a"].announcing and not sim["b"].announcing


def test_crash_backup_takes_over_exactly_master_down_after_last_advert():
    sim = elected_pair()
    sim.kill("a")
    last = last_master_advert(sim, "a")
    t = sim.run_until_state("b", State.MASTER)
    assert t - last == pytest.approx(0.3 + SKEW_100)  # 360.9375 ms
    assert sim["b"].announcing and sim["b"].delivery
    assert [n for t, n in sim.actions("b", fsm.Notice) if n.kind == "master_down"]


def test_master_adverts_every_interval():
    sim = elected_pair()
    times = sim.master_adverts_by("a")[-10:]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([0.1] * 9)


def test_backup_adverts_once_a_second_master_every_interval():
    sim = elected_pair()
    sim.run_for(5.0)
    b_times = [t for t, n, a in sim.adverts if n == "b" and t > 2.0]
    gaps = [y - x for x, y in zip(b_times, b_times[1:])]
    assert gaps and all(g == pytest.approx(fsm.BACKUP_ADVERT_PERIOD_S) for g in gaps)
    assert sim["a"].election.status(sim.now)["peers"][0]["last_seen_s"] <= fsm.BACKUP_ADVERT_PERIOD_S


# -- graceful stop and hand-over ---------------------------------------------------


def test_graceful_stop_hands_over_at_once_and_drains():
    sim = elected_pair()
    t0 = sim.now
    sim.command("a", fsm.Stop())
    # the successor became master at the same instant: no skew wait
    assert sim["b"].state is State.MASTER
    assert sim.transitions("b")[-1][0] == t0
    # the old master stopped announcing before b started, and still delivers
    assert not sim["a"].announcing and sim["a"].delivery and sim["a"].state is State.BACKUP
    handover = [a for t, a in sim.actions("a", fsm.SendAdvert) if a.flags & Flag.HANDOVER]
    assert handover[-1].successor == "b" and handover[-1].priority == 0
    # drain: until b is heard (at once) + margin 200 ms, then withdraw and exit
    sim.run_for(0.199)
    assert sim["a"].delivery and not sim["a"].exited
    sim.run_for(0.002)
    assert not sim["a"].delivery and sim["a"].exited
    withdraw = sim.actions("a", fsm.WithdrawDelivery)[-1][0]
    assert withdraw == pytest.approx(t0 + 0.2)


def test_graceful_stop_without_backup_withdraws_and_exits_at_once():
    sim = Sim()
    sim.add("a", "192.0.2.11", 150)
    sim.start("a")
    sim.run_until_state("a", State.MASTER)
    actions = sim.command("a", fsm.Stop())
    assert any(isinstance(a, fsm.Exit) for a in actions)
    assert not sim["a"].delivery


def test_plain_priority_zero_makes_backup_wait_only_its_skew():
    """A VRRP-style stop (no successor named) costs the backup its skew time."""
    sim = elected_pair()
    sim.kill("a")  # so that only the crafted advert reaches b
    b = sim["b"].election
    from vipless_failover.election.protocol import Advert
    import ipaddress
    msg = Advert(cluster_id=1, node="a", address=ipaddress.ip_address("192.0.2.11"), priority=0,
                 advert_interval_ms=100, state=State.MASTER, counter=10**6,
                 config_digest=b.p.config_digest)
    t0 = sim.now
    sim._apply(sim["b"], b.handle_advert(msg, msg.address, t0))
    t = sim.run_until_state("b", State.MASTER)
    assert t - t0 == pytest.approx(SKEW_100)


def test_lost_handover_advert_is_resent_until_successor_answers():
    sim = elected_pair()
    sim.partition("a", "b")
    sim.command("a", fsm.Demote())
    assert sim["b"].state is State.BACKUP  # did not hear it
    sim.run_for(0.05)
    sim.heal()
    t = sim.run_until_state("b", State.MASTER)
    assert t <= sim.transitions("a")[-1][0] + 0.1 + 1e-9
    sim.run_for(1.0)
    assert sim.masters() == ["b"] and not sim["a"].delivery


def test_demote_hands_over_and_old_master_does_not_preempt_back():
    sim = elected_pair()
    t0 = sim.now
    sim.command("a", fsm.Demote())
    assert sim["b"].state is State.MASTER and sim.transitions("b")[-1][0] == t0
    sim.run_for(5.0)
    assert sim.masters() == ["b"]
    assert not sim["a"].delivery
    # ... until the new master fails
    sim.kill("b")
    sim.run_until_state("a", State.MASTER)


def test_demote_without_backup_is_refused():
    sim = Sim()
    sim.add("a", "192.0.2.11", 150)
    sim.start("a")
    sim.run_until_state("a", State.MASTER)
    actions = sim.command("a", fsm.Demote())
    assert actions == [fsm.Refused("demote", "no live backup to hand over to")]
    assert sim["a"].state is State.MASTER


def test_promote_backup_takes_over_without_two_masters():
    sim = elected_pair()
    t0 = sim.now
    sim.command("b", fsm.Promote())
    # the request reached a, a handed over, b took over: all at t0
    assert sim["b"].state is State.MASTER and sim.transitions("b")[-1][0] == t0
    assert sim["a"].state is State.BACKUP and sim["a"].election.yielded
    sim.run_for(5.0)
    assert sim.masters() == ["b"]


def test_promote_with_no_master_heard_asks_then_takes_over_by_timer():
    sim = pair()
    sim.start("b")
    actions = sim.command("b", fsm.Promote())
    assert actions[0] == fsm.SendAdvert(State.BACKUP, 100, Flag.TAKEOVER_REQUEST, "b")
    t = sim.run_until_state("b", State.MASTER)
    assert t == pytest.approx(0.3 + SKEW_100)
    assert not sim.actions("b", fsm.Refused)


def test_promote_right_after_start_reaches_the_unheard_master():
    """A fresh backup that has not heard the master yet must not become a second master."""
    sim = elected_pair()
    sim.kill("b")
    sim.revive("b")
    sim.start("b")
    sim.command("b", fsm.Promote())
    assert sim.masters() == ["b"]  # a heard the request and handed over
    sim.run_for(2.0)
    assert sim.masters() == ["b"]


def test_promote_refused_when_master_never_answers():
    sim = elected_pair()
    sim.partition("a", "b")
    sim.command("b", fsm.Promote())
    sim.run_for(0.2)
    refused = sim.actions("b", fsm.Refused)
    assert not refused
    # b no longer hears a: it becomes master by timeout (split brain), the promote is moot
    sim.check_single_master = False
    sim.run_for(1.0)
    assert sim["b"].state is State.MASTER


# -- preemption --------------------------------------------------------------------


def test_restarted_higher_priority_node_preempts_without_two_masters():
    sim = elected_pair()
    sim.kill("a")
    sim.run_until_state("b", State.MASTER)
    sim.run_for(1.0)
    sim.revive("a")
    t0 = sim.now
    sim.start("a")
    t = sim.run_until_state("a", State.MASTER)
    # a hears b's next advert (<= 100 ms), asks, b hands over at once
    assert t - t0 <= 0.1 + 1e-9
    sim.run_for(1.0)
    assert sim.masters() == ["a"]
    assert not sim["b"].delivery


def test_preempt_falls_back_to_rfc_timeout_when_master_ignores_requests():
    sim = elected_pair()
    sim.kill("a")
    sim.run_until_state("b", State.MASTER)
    sim.check_single_master = False
    sim.block("a", "b")  # b never hears a's takeover requests
    sim.revive("a")
    t0 = sim.now
    sim.start("a")
    t = sim.run_until_state("a", State.MASTER)
    requests = [x for x, act in sim.actions("a", fsm.SendAdvert) if act.flags & Flag.TAKEOVER_REQUEST]
    assert len(requests) >= fsm.PREEMPT_REQUESTS
    # the advert that brought the last counted request was the last to reset a's timer
    assert t == pytest.approx(requests[fsm.PREEMPT_REQUESTS - 1] + 0.3 + SKEW_150)
    assert t - t0 < 1.0


def test_no_preempt_restarted_higher_priority_node_stays_backup():
    sim = elected_pair(preempt=False)
    sim.kill("a")
    sim.run_until_state("b", State.MASTER)
    sim.revive("a")
    sim.start("a")
    sim.run_for(5.0)
    assert sim.masters() == ["b"]
    assert sim["a"].state is State.BACKUP


def test_preempt_delay_is_respected():
    sim = elected_pair()
    sim.kill("a")
    sim.run_until_state("b", State.MASTER)
    sim.revive("a", preempt_delay_ms=1000)
    t0 = sim.now
    sim.start("a")
    t = sim.run_until_state("a", State.MASTER)
    assert 1.0 <= t - t0 <= 1.1 + 1e-9


def test_lower_effective_priority_on_master_lets_backup_preempt():
    sim = elected_pair()
    sim.command("a", fsm.SetPriority(50))
    t = sim.run_until_state("b", State.MASTER)
    assert sim.masters() == ["b"]
    assert t <= sim.now


# -- split brain ------------------------------------------------------------------


def test_partition_then_heal_leaves_one_master_and_reasserts():
    sim = elected_pair()
    sim.check_single_master = False
    sim.partition("a", "b")
    sim.run_until_state("b", State.MASTER)
    assert sorted(sim.masters()) == ["a", "b"]
    sim.heal()
    sim.run_for(0.5)
    assert sim.masters() == ["a"]
    assert not sim["b"].announcing
    notices = sim.actions("a", fsm.Notice) + sim.actions("b", fsm.Notice)
    assert [n for t, n in notices if n.kind == "split_brain"]
    # whichever heard the other first, the winner re-announced after the heal
    healed = [t for t, a in sim.actions("a", fsm.StartAnnounce) if a.reason in ("reassert", "peer_yielded")]
    assert healed and healed[-1] >= sim.now - 0.5
    sim.run_for(1.0)
    assert not sim["b"].delivery  # the loser withdrew after its drain margin


def test_equal_priority_two_masters_higher_address_wins():
    sim = Sim(check_single_master=False)
    sim.add("a", "192.0.2.11", 100)
    sim.add("b", "192.0.2.12", 100)
    sim.partition("a", "b")  # both time out and become master (as if at the same instant)
    sim.start("a")
    sim.start("b")
    sim.run_for(1.0)
    assert sorted(sim.masters()) == ["a", "b"]
    sim.heal()
    sim.run_for(0.5)
    assert sim.masters() == ["b"]


def test_equal_priority_backup_does_not_preempt():
    """RFC 5798: a backup with the same priority accepts the master it hears."""
    sim = Sim()
    sim.add("a", "192.0.2.11", 100)
    sim.add("b", "192.0.2.12", 100)
    sim.start("a")
    sim.run_until_state("a", State.MASTER)
    sim.start("b")
    sim.run_for(2.0)
    assert sim.masters() == ["a"]


# -- faults -----------------------------------------------------------------------


def test_link_down_on_master_faults_and_backup_takes_over_at_once():
    sim = elected_pair()
    t0 = sim.now
    sim.command("a", fsm.SetFault("link:eth0", True))
    assert sim["a"].state is State.FAULT and not sim["a"].delivery and not sim["a"].announcing
    assert sim["b"].state is State.MASTER and sim.transitions("b")[-1][0] == t0
    sim.command("a", fsm.SetFault("link:eth0", False))
    assert sim["a"].state is State.BACKUP
    sim.run_until_state("a", State.MASTER, limit=1.0)  # preempt: takes back
    sim.run_for(1.0)
    assert sim.masters() == ["a"]


def test_fault_before_start_enters_fault():
    sim = pair()
    sim.command("a", fsm.SetFault("link:eth0", True))
    sim.start("a")
    assert sim["a"].state is State.FAULT
    assert sim["a"].election.next_deadline() is None


# -- restart in place -------------------------------------------------------------


def test_restart_in_place_peers_hold_and_new_process_resumes():
    sim = elected_pair()
    actions = sim.command("a", fsm.Stop(restart=True))
    assert actions[-1] == fsm.Exit(restart=True)
    assert sim["a"].delivery  # kernel state left in place
    sim["a"].exited = True
    sim.run_for(5.0)  # a new process takes a while; b holds (restart_hold 10 s)
    assert sim["b"].state is State.BACKUP
    sim.revive("a")
    sim.start("a", resume=True)
    assert sim["a"].state is State.MASTER
    sim.run_for(2.0)
    assert sim.masters() == ["a"]
    assert not [t for t, a in sim.transitions("b") if a.new is State.MASTER]


def test_restart_hold_is_bounded():
    sim = elected_pair()
    sim.command("a", fsm.Stop(restart=True))
    sim["a"].exited = True
    t0 = sim.now
    t = sim.run_until_state("b", State.MASTER, limit=20)
    assert t - t0 == pytest.approx(10.0)


# -- three nodes ------------------------------------------------------------------


def trio() -> Sim:
    sim = Sim()
    sim.add("a", "192.0.2.11", 150)
    sim.add("b", "192.0.2.12", 120)
    sim.add("c", "192.0.2.13", 100)
    for n in "abc":
        sim.start(n)
    sim.run_until_state("a", State.MASTER)
    sim.run_for(1.0)
    return sim


def test_three_nodes_crash_next_highest_takes_over_on_its_skew():
    sim = trio()
    sim.kill("a")
    last = last_master_advert(sim, "a")
    t = sim.run_until_state("b", State.MASTER)
    assert t - last == pytest.approx(0.3 + SKEW_120)
    sim.run_for(1.0)
    assert sim.masters() == ["b"] and sim["c"].state is State.BACKUP


def test_three_nodes_stop_hands_over_to_best_backup():
    sim = trio()
    sim.command("a", fsm.Stop())
    assert sim.masters() == ["b"]
    sim.run_for(2.0)
    assert sim.masters() == ["b"] and sim["c"].state is State.BACKUP


def test_three_nodes_promote_lowest():
    sim = trio()
    t0 = sim.now
    sim.command("c", fsm.Promote())
    assert [t for t, a in sim.transitions("c") if a.new is State.MASTER] == [t0]
    sim.run_for(3.0)
    # a yielded; b has preempt and a higher priority than c: it takes over losslessly
    assert sim.masters() == ["b"]


# -- maintenance and misc ---------------------------------------------------------


def test_maintenance_hands_over_and_never_becomes_master():
    sim = elected_pair()
    sim.command("a", fsm.SetMaintenance(True))
    assert sim.masters() == ["b"]
    sim.kill("b")
    sim.run_for(5.0)
    assert sim["a"].state is State.BACKUP
    assert sim.command("a", fsm.Promote()) == [fsm.Refused("promote", "maintenance mode is on")]
    sim.command("a", fsm.SetMaintenance(False))
    sim.run_until_state("a", State.MASTER, limit=1.0)


def test_config_digest_mismatch_is_reported_once_not_fatal():
    sim = Sim()
    sim.add("a", "192.0.2.11", 150)
    sim.add("b", "192.0.2.12", 100, digest=b"\x22" * 16)
    sim.start("a")
    sim.start("b")
    sim.run_for(2.0)
    notices = [n for t, n in sim.actions("b", fsm.Notice) if n.kind == "config_mismatch"]
    assert len(notices) == 1
    assert sim.masters() == ["a"]


def test_backup_stop_exits_at_once():
    sim = elected_pair()
    actions = sim.command("b", fsm.Stop())
    assert isinstance(actions[-1], fsm.Exit)
    assert actions[0] == fsm.SendAdvert(State.BACKUP, 0, Flag.STOPPING)


def test_misuse_raises_local_error():
    sim = pair()
    sim.start("a")
    with pytest.raises(fsm.LocalError):
        sim.start("a")
    with pytest.raises(fsm.LocalError):
        sim.command("a", fsm.SetPriority(0))


def test_status_reports_master_and_peers():
    sim = elected_pair()
    st_b = sim["b"].election.status(sim.now)
    assert st_b["state"] == "BACKUP"
    assert st_b["master"] == {"node": "a", "address": "192.0.2.11", "priority": 150}
    assert [p["node"] for p in st_b["peers"]] == ["a"]
    assert st_b["master_down_interval_ms"] == pytest.approx(360.938, abs=1e-3)


# -- random stories ---------------------------------------------------------------

OPS = st.one_of(
    st.tuples(st.just("run"), st.floats(min_value=0.001, max_value=1.5)),
    st.tuples(st.just("kill"), st.sampled_from("abc")),
    st.tuples(st.just("revive"), st.sampled_from("abc")),
    st.tuples(st.just("stop"), st.sampled_from("abc")),
    st.tuples(st.just("promote"), st.sampled_from("abc")),
    st.tuples(st.just("demote"), st.sampled_from("abc")),
    st.tuples(st.just("fault"), st.sampled_from("abc")),
    st.tuples(st.just("clear"), st.sampled_from("abc")),
    st.tuples(st.just("prio"), st.sampled_from("abc"), st.integers(1, 254)),
)


@settings(max_examples=int(os.environ.get("FSM_EXAMPLES", "300")), deadline=None)
@given(ops=st.lists(OPS, max_size=25), preempt=st.booleans())
def test_random_stories_never_two_masters_and_converge(ops, preempt):
    sim = Sim()
    sim.add("a", "192.0.2.11", 150, preempt=preempt)
    sim.add("b", "192.0.2.12", 120, preempt=preempt)
    sim.add("c", "192.0.2.13", 100, preempt=preempt)
    for n in "abc":
        sim.start(n)
    for op in ops:
        kind, name = op[0], op[1]
        if kind == "run":
            sim.run_for(name)
            continue
        node = sim[name]
        usable = node.alive and not node.exited
        if kind == "kill":
            sim.kill(name)
        elif kind == "revive" and not usable:
            sim.revive(name)
            sim.start(name)
        elif usable and kind == "stop":
            sim.command(name, fsm.Stop())
        elif usable and kind == "promote":
            sim.command(name, fsm.Promote())
        elif usable and kind == "demote":
            sim.command(name, fsm.Demote())
        elif usable and kind in ("fault", "clear"):
            sim.command(name, fsm.SetFault("link:eth0", kind == "fault"))
        elif usable and kind == "prio":
            sim.command(name, fsm.SetPriority(op[2]))
    # heal everything that can be healed, then let it settle
    for n in "abc":
        node = sim[n]
        if node.alive and not node.exited:
            sim.command(n, fsm.SetFault("link:eth0", False))
    sim.run_for(15.0)
    live = [n for n in "abc" if sim[n].alive and not sim[n].exited]
    if live:
        assert len(sim.masters()) == 1, (sim.masters(), live)
        master = sim.masters()[0]
        assert sim[master].delivery and sim[master].announcing
        for n in live:
            if n != master:
                assert not sim[n].delivery and not sim[n].announcing, n


@settings(max_examples=int(os.environ.get("FSM_EXAMPLES", "300")), deadline=None)
@given(ops=st.lists(st.one_of(OPS, st.tuples(st.just("cut"), st.sampled_from("abc"), st.sampled_from("abc"))),
                    max_size=25))
def test_random_stories_with_partitions_converge_after_heal(ops):
    """Partitions may make two masters (split brain); once healed, exactly one remains,
    and only it delivers and announces."""
    sim = Sim(check_single_master=False)
    sim.add("a", "192.0.2.11", 150)
    sim.add("b", "192.0.2.12", 120)
    sim.add("c", "192.0.2.13", 100)
    for n in "abc":
        sim.start(n)
    for op in ops:
        kind, name = op[0], op[1]
        if kind == "run":
            sim.run_for(name)
        elif kind == "cut" and name != op[2]:
            sim.partition(name, op[2])
        elif kind in ("promote", "demote") and sim[name].alive and not sim[name].exited:
            sim.command(name, fsm.Promote() if kind == "promote" else fsm.Demote())
        elif kind == "prio" and sim[name].alive and not sim[name].exited:
            sim.command(name, fsm.SetPriority(op[2]))
    sim.heal()
    sim.run_for(15.0)
    masters = sim.masters()
    assert len(masters) == 1, masters
    for n in "abc":
        assert sim[n].delivery == sim[n].announcing == (n == masters[0]), n
