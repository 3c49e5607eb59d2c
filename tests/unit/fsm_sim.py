"""Several election FSMs wired in memory on a hand-set clock.

No sockets, no sleeps: ``Sim.run_until(t)`` advances a virtual clock from deadline to
deadline and delivers every advert a node sends to the other nodes at once (or drops
it, per ``link`` settings). Every action is recorded with its time so stories can
assert exact deadlines and the hand-over invariants.

``pause(name)`` stops a node's process (SIGSTOP): adverts for it wait in its socket
with their arrival times and its timers do not run. ``resume(name)`` hands the waiting
adverts over first, in order, at their arrival times (``handled_at`` = the resume
time), and only then lets its timers run: what the daemon does after a pause.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from vipless_failover.election import fsm
from vipless_failover.election.protocol import Advert, Flag, State

DIGEST = b"\x11" * 16


@dataclass
class Node:
    name: str
    election: fsm.Election
    alive: bool = True
    delivery: bool = False
    announcing: bool = False
    exited: bool = False
    log: list[tuple[float, object]] = field(default_factory=list)
    counter: int = 0
    paused: bool = False
    inbox: list[tuple[float, Advert]] = field(default_factory=list)  # waiting while paused

    @property
    def state(self) -> State:
        return self.election.state


class InvariantError(AssertionError):
    pass


class Sim:
    def __init__(self, check_single_master: bool = True):
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self.cut: set[frozenset[str]] = set()  # pairs that cannot hear each other
        self.oneway: set[tuple[str, str]] = set()  # (sender, receiver) pairs dropped
        self.check_single_master = check_single_master
        self.adverts: list[tuple[float, str, fsm.SendAdvert]] = []
        self._queue: list[tuple[Node, Advert]] = []  # in flight: delivered after the sender's actions
        self._delivering = False

    def add(self, name: str, address: str, priority: int, interval_ms: int = 100, **kw) -> Node:
        params = fsm.Params(node=name, address=ipaddress.ip_address(address), priority=priority,
                            advert_interval_ms=interval_ms, config_digest=kw.pop("digest", DIGEST), **kw)
        node = Node(name=name, election=fsm.Election(params))
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    # -- driving ----------------------------------------------------------------

    def start(self, name: str, resume: bool = False) -> list:
        return self.command(name, fsm.Start(resume_master=resume))

    def command(self, name: str, cmd) -> list:
        node = self.nodes[name]
        actions = node.election.handle_command(cmd, self.now)
        self._apply(node, actions)
        return actions

    def kill(self, name: str) -> None:
        """A crash: the node stops sending and hearing (its kernel state stays)."""
        self.nodes[name].alive = False

    def revive(self, name: str, priority: int | None = None, **kw) -> Node:
        """Start a fresh process for a crashed node (same identity, new FSM)."""
        old = self.nodes[name]
        p = old.election.p
        params = fsm.Params(node=p.node, address=p.address, priority=priority or p.priority,
                            advert_interval_ms=kw.pop("interval_ms", p.advert_interval_ms),
                            preempt=kw.pop("preempt", p.preempt),
                            preempt_delay_ms=kw.pop("preempt_delay_ms", p.preempt_delay_ms),
                            drain_margin_ms=p.drain_margin_ms, drain_max_ms=p.drain_max_ms,
                            restart_hold_ms=p.restart_hold_ms, config_digest=p.config_digest)
        node = Node(name=name, election=fsm.Election(params), delivery=old.delivery)
        self.nodes[name] = node
        return node

    def pause(self, name: str) -> None:
        """SIGSTOP: the node neither runs its timers nor reads its socket."""
        self.nodes[name].paused = True

    def resume(self, name: str) -> None:
        """SIGCONT: the waiting adverts first, at their arrival times, then the timers."""
        node = self.nodes[name]
        node.paused = False
        waiting, node.inbox = node.inbox, []
        for at, msg in waiting:
            if node.exited:
                break
            self._apply(node, node.election.handle_advert(msg, msg.address, at, handled_at=self.now))
        self.run_until(self.now)

    def partition(self, a: str, b: str) -> None:
        self.cut.add(frozenset((a, b)))

    def block(self, sender: str, receiver: str) -> None:
        self.oneway.add((sender, receiver))

    def heal(self) -> None:
        self.cut.clear()
        self.oneway.clear()

    def next_time(self) -> float | None:
        times = [n.election.next_deadline() for n in self.nodes.values()
                 if n.alive and not n.exited and not n.paused]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def run_until(self, t: float) -> None:
        guard = 0
        while True:
            nxt = self.next_time()
            if nxt is None or nxt > t:
                break
            guard += 1
            assert guard < 1_000_000, "simulation does not converge"
            self.now = max(self.now, nxt)
            for node in list(self.nodes.values()):
                if node.alive and not node.exited and not node.paused:
                    dl = node.election.next_deadline()
                    if dl is not None and dl <= self.now:
                        self._apply(node, node.election.handle_timer(self.now))
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_state(self, name: str, state: State, limit: float = 60.0) -> float:
        """Advance deadline by deadline until ``name`` is in ``state``; return the time."""
        end = self.now + limit
        while self.nodes[name].state is not state:
            nxt = self.next_time()
            assert nxt is not None and nxt <= end, f"{name} never became {state.name}"
            self.run_until(nxt)
        return self.now

    # -- plumbing ---------------------------------------------------------------

    def _apply(self, node: Node, actions: list) -> None:
        self._apply_only(node, actions)
        self._deliver()

    def _deliver(self) -> None:
        """Deliver queued adverts in order (zero latency, but never inside a sender's
        action list: like a real network, a reply arrives after the sender is done)."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._queue:
                sender, msg = self._queue.pop(0)
                for other in list(self.nodes.values()):
                    if other is sender or not other.alive or other.exited:
                        continue
                    if frozenset((sender.name, other.name)) in self.cut:
                        continue
                    if (sender.name, other.name) in self.oneway:
                        continue
                    if other.paused:
                        other.inbox.append((self.now, msg))
                        continue
                    self._apply_only(other, other.election.handle_advert(msg, msg.address, self.now))
        finally:
            self._delivering = False

    def _apply_only(self, node: Node, actions: list) -> None:
        for action in actions:
            node.log.append((self.now, action))
            match action:
                case fsm.SendAdvert():
                    self._send(node, action)
                case fsm.InstallDelivery():
                    node.delivery = True
                case fsm.WithdrawDelivery():
                    node.delivery = False
                case fsm.StartAnnounce():
                    node.announcing = True
                case fsm.StopAnnounce():
                    node.announcing = False
                case fsm.Exit():
                    node.exited = True
                    node.announcing = False
        self._check()

    def _send(self, node: Node, action: fsm.SendAdvert) -> None:
        if not node.alive:
            return
        self.adverts.append((self.now, node.name, action))
        node.counter += 1
        p = node.election.p
        msg = Advert(cluster_id=1, node=node.name, address=p.address, priority=action.priority,
                     advert_interval_ms=p.advert_interval_ms, state=action.state, flags=action.flags,
                     successor=action.successor, hold_ms=action.hold_ms, counter=node.counter,
                     config_digest=p.config_digest)
        self._queue.append((node, msg))

    def _check(self) -> None:
        if not self.check_single_master:
            return
        live = [n for n in self.nodes.values() if n.alive and not n.exited]
        masters = [n.name for n in live if n.state is State.MASTER]
        announcing = [n.name for n in live if n.announcing]
        if len(masters) > 1:
            raise InvariantError(f"two masters at {self.now:.4f}: {masters}")
        if len(announcing) > 1:
            raise InvariantError(f"two nodes announcing at {self.now:.4f}: {announcing}")

    # -- queries ----------------------------------------------------------------

    def masters(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.alive and not n.exited and n.state is State.MASTER]

    def transitions(self, name: str) -> list[tuple[float, fsm.Transition]]:
        return [(t, a) for t, a in self.nodes[name].log if isinstance(a, fsm.Transition)]

    def actions(self, name: str, kind: type) -> list[tuple[float, object]]:
        return [(t, a) for t, a in self.nodes[name].log if isinstance(a, kind)]

    def master_adverts_by(self, name: str) -> list[float]:
        return [t for t, n, a in self.adverts if n == name and a.state is State.MASTER]


__all__ = ["Flag", "Node", "Sim", "State", "InvariantError"]
