"""The election's wire-neutral input (election/events.py): PeerAdvert, and the FSM
deciding the same on it as on the protocol's Advert."""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
from pathlib import Path

import pytest

from vipless_failover.election import events, fsm
from vipless_failover.election.events import PeerAdvert
from vipless_failover.election.protocol import Advert, Flag, State

A = ipaddress.ip_address("192.0.2.11")


def advert(**kw) -> Advert:
    base = dict(cluster_id=7, node="a", address=A, priority=150, advert_interval_ms=100, state=State.MASTER,
                counter=12345, config_digest=b"\x11" * 16)
    return Advert(**{**base, **kw})


def test_from_advert_keeps_what_the_election_reads_and_drops_the_wire_fields():
    msg = advert(flags=Flag.HANDOVER | Flag.STOPPING, successor="b", hold_ms=0, priority=0)
    assert PeerAdvert.from_advert(msg) == PeerAdvert(
        node="a", address=A, priority=0, state=State.MASTER, advert_interval_ms=100,
        config_digest=b"\x11" * 16, handover=True, successor="b")
    names = {f.name for f in dataclasses.fields(PeerAdvert)}
    assert not names & {"cluster_id", "counter", "flags"}


@pytest.mark.parametrize(("flags", "handover", "takeover_request", "restarting"), [
    (Flag.NONE, False, False, False),
    (Flag.HANDOVER, True, False, False),
    (Flag.TAKEOVER_REQUEST, False, True, False),
    (Flag.RESTARTING, False, False, True),
    (Flag.STOPPING, False, False, False),
    (Flag.HANDOVER | Flag.TAKEOVER_REQUEST | Flag.RESTARTING | Flag.STOPPING, True, True, True),
])
def test_from_advert_reads_each_flag(flags, handover, takeover_request, restarting):
    peer = PeerAdvert.from_advert(advert(flags=flags, hold_ms=5000))
    assert (peer.handover, peer.takeover_request, peer.restarting) == (handover, takeover_request, restarting)
    assert peer.hold_ms == 5000


def test_peer_advert_is_frozen():
    peer = PeerAdvert.from_advert(advert())
    with pytest.raises(dataclasses.FrozenInstanceError):
        peer.priority = 1  # type: ignore[misc]


def test_events_module_imports_no_io_and_no_codec_at_run_time():
    tree = ast.parse(Path(events.__file__).read_text())
    imported = set()
    for node in tree.body:  # run-time imports only (not under TYPE_CHECKING)
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{'.' * node.level}{node.module}:{a.name}" for a in node.names}
    assert imported <= {"__future__:annotations", "ipaddress", "dataclasses:dataclass", "typing:TYPE_CHECKING",
                        ".protocol:Flag", ".protocol:State"}, imported


def test_the_election_decides_the_same_on_a_peer_advert_as_on_the_advert():
    """Two backups, one fed the protocol's Advert, the other the PeerAdvert it reads as:
    the same actions for every advert of a story (hand-over, takeover request,
    restarting hold, priority-0 stop, a master of lower priority)."""
    params = fsm.Params(node="b", address=ipaddress.ip_address("192.0.2.12"), priority=100,
                        advert_interval_ms=100, config_digest=b"\x11" * 16)
    b, b_twin = fsm.Election(params), fsm.Election(params)
    assert b.handle_command(fsm.Start(), 0.0) == b_twin.handle_command(fsm.Start(), 0.0)
    story = [
        advert(),
        advert(state=State.BACKUP, flags=Flag.TAKEOVER_REQUEST, successor="c", priority=160),
        advert(flags=Flag.RESTARTING, hold_ms=10_000),
        advert(),
        advert(priority=0, state=State.BACKUP, flags=Flag.STOPPING),
        advert(priority=50),
        advert(state=State.BACKUP, flags=Flag.HANDOVER | Flag.STOPPING, successor="b", priority=0),
    ]
    for i, msg in enumerate(story):
        t = 1.0 + i * 0.1
        got = b.handle_advert(msg, msg.address, t)
        want = b_twin.handle_advert(PeerAdvert.from_advert(msg), msg.address, t)
        assert got == want, i
    assert b.state is b_twin.state is State.MASTER  # the last advert handed over to b
    assert b.status(2.0) == b_twin.status(2.0)
