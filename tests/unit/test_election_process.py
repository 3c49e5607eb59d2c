"""The election process's own logic (election/process.py), without the kernel: the order
in which it carries out a step, what it passes up, the shared flags, the channel.
The process itself, its sockets and its flip run in the host lab
(tests/lab/test_election_process_lab.py and every lab test of the daemon)."""

from __future__ import annotations

import ipaddress
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from tests.factories import KEY, make_config
from vipless_failover.election import fsm, process
from vipless_failover.election.protocol import State
from vipless_failover.telemetry import AnnounceKind, NoticeKind


class NullLog:
    def bind(self, **kw: Any) -> NullLog:
        return self

    def __getattr__(self, level: str) -> Any:
        return lambda *a, **kw: None


class Recorder:
    """Stands in for the flip's netlink socket, the packet socket and the advert
    socket: it records what was done, in order, and what the shared flags said then."""

    def __init__(self, flags: process.SharedFlags):
        self.flags = flags
        self.done: list[tuple[str, Any]] = []
        self.closed = False

    def flip(self, rules: Any, add: bool) -> list[tuple[Any, int | None]]:
        self.done.append(("flip", (add, self.flags.delivery)))
        return [(r, 0) for r in rules]

    def send(self, data: bytes) -> None:
        self.done.append(("frame" if data.startswith(b"frame") else "advert", data[:7]))

    def counters(self) -> Any:
        from vipless_failover.telemetry import TransportCounters
        return TransportCounters()


@pytest.fixture
def election(tmp_path: Path):
    cfg = make_config(tmp_path / "director.toml", node={"interface": "lo"},
                      election={"key_file": str(tmp_path / "k")},
                      control={"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path)})
    up, down = process.Channel.pair()
    director = process.Channel(up)
    flags = process.SharedFlags()
    e = process.Election(cfg, cfg.shared_digest()[:16], process.Channel(down), flags, NullLog(),
                         process.Setup((KEY,), 5000, ("rule-1", "rule-2"),  # type: ignore[arg-type]
                                       ((AnnounceKind.GARP, (b"frame-1", b"frame-2")), (AnnounceKind.NA, ()))))
    rec = Recorder(flags)
    e.flipper = e.packet = e.transport = rec  # type: ignore[assignment]
    yield e, rec, director
    director.close()
    e.chan.close()


def test_a_takeover_flips_then_sends_its_lead_frames_then_the_rest_of_its_step(election) -> None:
    e, rec, director = election
    actions = [fsm.Transition(State.BACKUP, State.MASTER, "master_down"), fsm.InstallDelivery(),
               fsm.StartAnnounce("master_down"), fsm.SendAdvert(State.MASTER, 150),
               fsm.Notice(NoticeKind.SPLIT_BRAIN, "director-b", "x")]
    e.execute(actions)
    # the flag says "on" before the flip (the director's pass reads it after the rules)
    assert [what for what, _ in rec.done] == ["flip", "frame", "frame", "advert"] and e.sent == 1
    assert rec.done[0] == ("flip", (True, True))
    assert e.flags.announce is True
    (step,) = director.receive() or []
    assert isinstance(step, process.Step)
    # everything but the advert goes up, in the FSM's order, with what was done for it
    assert [type(a).__name__ for a in step.actions] == ["Transition", "InstallDelivery", "StartAnnounce", "Notice"]
    flipped, lead = step.done[1], step.done[2]
    assert isinstance(flipped, process.Flipped) and flipped.on and flipped.results == (("rule-1", 0), ("rule-2", 0))
    assert isinstance(lead, process.LeadSent) and lead.sent == {AnnounceKind.GARP: 2, AnnounceKind.NA: 0}
    assert lead.first_at is not None and lead.first_at <= flipped.at + 1.0
    assert step.snapshot is not None and step.snapshot.sent == 1


def test_a_step_down_clears_the_flags_before_the_director_hears_of_it(election) -> None:
    e, rec, director = election
    e.execute([fsm.InstallDelivery(), fsm.StartAnnounce("x")])
    assert e.flags.delivery is True and e.flags.announce is True
    e.execute([fsm.Transition(State.MASTER, State.BACKUP, "x"), fsm.StopAnnounce(), fsm.WithdrawDelivery(),
               fsm.SendAdvert(State.BACKUP, 150)])
    assert e.flags.announce is False and e.flags.delivery is False
    assert rec.done[-2] == ("flip", (False, False)) and rec.done[-1][0] == "advert"
    steps = director.receive() or []
    assert [type(a).__name__ for a in steps[-1].actions] == ["Transition", "StopAnnounce", "WithdrawDelivery"]


def test_an_exit_ends_the_loop_after_its_step_went_up(election) -> None:
    e, _, director = election
    e.execute([fsm.SendAdvert(State.BACKUP, 0), fsm.Exit(restart=True)])
    assert e.exit == fsm.Exit(restart=True)
    (step,) = director.receive() or []
    assert step.actions == (fsm.Exit(restart=True),)


def test_a_snapshot_request_is_answered_with_the_fsms_status(election) -> None:
    e, _, director = election
    director.send(process.SnapshotRequest())
    e._read_channel()
    (snap,) = director.receive() or []
    assert isinstance(snap, process.Snapshot)
    assert snap.status["node"] == "director-a" and snap.status["state"] == "INIT"
    assert snap.adverts.sent == 0 and snap.keys["signing"]


def test_a_setup_rotates_the_key_from_the_next_advert_on(election) -> None:
    e, _, director = election
    new = b"fedcba9876543210fedcba9876543210"
    director.send(process.Setup((new, KEY), 2000, ()))
    e._read_channel()
    assert e.keys.signing == new and e.flip_rules == () and e.lead == ()
    assert director.receive() == []  # a Setup is not answered


def test_the_shared_flags_start_undecided_and_are_shared_across_a_fork() -> None:
    import os
    flags = process.SharedFlags()
    assert flags.delivery is None and flags.announce is False
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        flags.delivery = True
        flags.announce = True
        os._exit(0)
    os.waitpid(pid, 0)
    assert flags.delivery is True and flags.announce is True


def test_the_channel_never_blocks_and_keeps_the_order() -> None:
    a, b = process.Channel.pair()
    tx, rx = process.Channel(a), process.Channel(b)
    big = b"x" * (process.CHANNEL_BUFFER // 2)
    for i in range(6):  # more than the buffers hold
        tx.send((i, big))
    assert tx.pending
    got: list[int] = []
    while len(got) < 6:
        got += [m[0] for m in rx.receive() or []]
        tx.flush()
    assert got == list(range(6)) and not tx.pending
    tx.close()
    assert rx.receive() is None and rx.closed


def test_messages_survive_the_channel_as_the_same_objects() -> None:
    step = process.Step((fsm.Refused("demote", "not master (state is BACKUP)"),), 1.0, 2.0)
    assert pickle.loads(pickle.dumps(step)) == step


def test_the_worst_gap_between_master_adverts_is_what_the_process_saw(election) -> None:
    e, _, _ = election
    e.execute([fsm.SendAdvert(State.MASTER, 150)])
    time.sleep(0.03)
    e.execute([fsm.SendAdvert(State.MASTER, 150)])
    e.execute([fsm.SendAdvert(State.BACKUP, 150)])  # not master: the next master advert starts afresh
    time.sleep(0.06)
    e.execute([fsm.SendAdvert(State.MASTER, 150)])
    snap = e.snapshot()
    assert 30 <= snap.worst_master_gap_ms < 60, snap.worst_master_gap_ms


# -- the adapter on a hand-set clock: what the loop does, in its order ----------------


class Clock:
    """The election's clock, set by hand; ``wall_us(t)`` is the senders' wall clock at
    ``t`` (the adverts' counters; the receiver judges them against the real wall clock,
    so a story must stay within the replay window, 5 s)."""

    def __init__(self, t: float = 1000.0):
        self.t = self.t0 = t
        self.wall0_us = time.time_ns() // 1000

    def wall_us(self, t: float) -> int:
        return self.wall0_us + int((t - self.t0) * 1e6)

    def __call__(self) -> float:
        return self.t


def master_advert(e: process.Election, counter: int) -> bytes:
    from vipless_failover.election.protocol import Advert, encode_advert
    return encode_advert(Advert(cluster_id=e.cfg.election.cluster_id, node="director-b",
                                address=ipaddress.ip_address("192.0.2.12"), priority=200,
                                advert_interval_ms=e.cfg.election.advert_interval_ms, state=State.MASTER,
                                counter=counter, config_digest=e.digest), KEY)


def arrived(e: process.Election, clock: Clock, at: float) -> None:
    """director-b's master advert, sent (its counter: its wall clock then) and received at
    ``at`` on the hand-set clock, read now."""
    e._on_datagram(master_advert(e, clock.wall_us(at)), ipaddress.ip_address("192.0.2.12"), at)


def started_backup(e: process.Election, clock: Clock) -> None:
    """Started, then hearing director-b (priority 200) as master: a backup."""
    e.clock = clock
    e._input("command", fsm.Start())
    arrived(e, clock, clock.t)
    e._process()
    assert e.fsm.state is State.BACKUP and e.fsm.master == "director-b"


def test_on_a_hand_set_clock_the_master_down_timer_takes_over_flip_first(election) -> None:
    e, rec, director = election
    clock = Clock()
    started_backup(e, clock)
    deadline = e.fsm.master_down_at
    while (due := e.fsm.next_deadline()) is not None and due < deadline:  # its own backup adverts
        clock.t = due
        e._timer()
    rec.done.clear()
    clock.t = deadline - 0.01
    e._timer()  # not due: nothing
    assert e.fsm.state is State.BACKUP and not rec.done
    clock.t = deadline
    e._timer()
    assert e.fsm.state is State.MASTER
    assert [what for what, _ in rec.done] == ["flip", "frame", "frame", "advert"]
    steps = [m for m in director.receive() or [] if isinstance(m, process.Step)]
    names = [type(a).__name__ for a in steps[-1].actions]
    assert names[names.index("Transition"):] == ["Transition", "InstallDelivery", "StartAnnounce"], names
    assert steps[-1].decided_mono == deadline  # decided at the deadline, on the election's clock


def test_on_a_hand_set_clock_adverts_that_waited_through_a_pause_hold_the_backup(
        election) -> None:
    e, rec, _ = election
    clock = Clock()
    started_backup(e, clock)
    rec.done.clear()
    t0 = clock.t
    clock.t = t0 + 4.5  # resumed after 4.5 s: the master-down deadline (3.4 s at 1 s adverts) passed ...
    for k in range(1, 45):  # ... but the master's adverts of the pause wait in the socket
        arrived(e, clock, t0 + k * 0.1)
    e._process()  # read first (the loop's _read_adverts), decided at their arrival times
    assert not e.rejected  # every one accepted
    e._timer()
    # no takeover: no flip, no frame (its periodic backup advert, once a second, is due)
    assert e.fsm.state is State.BACKUP and [what for what, _ in rec.done] in ([], ["advert"])


def test_on_a_hand_set_clock_adverts_read_late_count_from_their_arrival(election) -> None:
    """The master fell silent 0.5 s into a 4.5 s pause (1 s adverts): its adverts, read after the
    pause, count from when they arrived, so its silence is seen and this node takes over
    (decided at their receive times, they would have held it backup past master-down)."""
    e, rec, _ = election
    clock = Clock()
    started_backup(e, clock)
    t0 = clock.t
    clock.t = t0 + 4.5
    for k in range(1, 6):
        arrived(e, clock, t0 + k * 0.1)
    e._process()
    assert not e.rejected
    assert e.fsm.master_down_at is not None and e.fsm.master_down_at < clock.t
    e._timer()
    assert e.fsm.state is State.MASTER and ("flip", (True, True)) in rec.done
