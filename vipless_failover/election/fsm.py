"""The election state machine: VRRP semantics (RFC 5798) plus lossless hand-over.

Pure: no sockets, no clock, no kernel. The daemon feeds it

* ``handle_advert(msg, src, now)`` for every authentic advert (a wire-neutral
  :class:`~.events.PeerAdvert`, or the protocol's ``Advert``, read as one),
* ``handle_timer(now)`` when ``next_deadline()`` has passed,
* ``handle_command(cmd, now)`` for Start/Stop/Promote/Demote/faults/priority,

and executes the frozen-dataclass actions each call returns, in order. ``now`` is a
monotonic time in seconds (float) that never goes back. An advert's ``now`` is when it
arrived (the kernel's receive time), however late it is handled: the daemon hands over
every advert waiting in its socket, in arrival order, before a timer or a command, so
the election decides on true arrival times; ``handled_at`` says when it is handled.

State changes are listed in one table, :data:`TRANSITIONS`. Three small named machines
run beside it, each with its own table, as h11 names its small machines: the hand-over
``drain`` (:data:`DRAIN_TRANSITIONS`), a pending ``promote`` (:data:`PROMOTE_TRANSITIONS`)
and the graceful ``stop`` (:data:`STOP_TRANSITIONS`); every change of any of them is
checked against its table, and an undeclared one raises :class:`LocalError`.
``docs/state-diagram.md`` is drawn from the four tables (``python -m
vipless_failover.election.fsm``). Everything else an input does (resetting a timer,
re-asserting, recording a peer) leaves the states as they are.

The operator's commands (``promote``, ``demote``, ``maintenance``) are answered by an
action: :class:`Refused` (and why), or :class:`Completed` once done, maybe several
inputs later, at the end of the input that did it: a ``promote`` when this node is
master, a ``demote`` (or ``maintenance`` on a master) when it is no longer master and
knows the other node that is. A promote whose requests a stop, maintenance or a fault
ended is neither refused nor completed then; its Completed stays due.

Hand-over (``demote``, ``promote``, preemption, SIGTERM) never has two nodes advertising
as master or announcing at once: the old master first sends a HANDOVER advert naming its
successor and stops announcing (it is BACKUP from then on); the successor becomes master
the moment it hears it; the old master keeps its delivery rules installed (``draining``)
until it hears the new master plus ``drain_margin``, at most ``drain_max``, then withdraws.
An offer handled late (read after a pause) is taken only once everything that waited
behind it has been handled (see :class:`Offer`); an old master whose successor never
answered takes mastership back and refuses the ``demote``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..telemetry import NoticeKind
from .events import PeerAdvert
from .protocol import Flag, State

if TYPE_CHECKING:  # pragma: no cover - annotations only: the core imports no config or codec code at run time
    from ..config import Config
    from .protocol import Advert

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---------------------------------------------------------------------------
# inputs: commands


@dataclass(frozen=True)
class Start:
    """Leave INIT. ``resume_master``: this process replaces a master that restarted in
    place (the peers are holding their timers): become master at once, adopting state."""

    resume_master: bool = False


@dataclass(frozen=True)
class Stop:
    """Graceful stop. ``restart``: a master asks its peers to hold for restart_hold and
    exits keeping its kernel state (the next process resumes)."""

    restart: bool = False


@dataclass(frozen=True)
class Promote:
    """Become master now, taken over losslessly from the current master."""


@dataclass(frozen=True)
class Demote:
    """Hand mastership to the best live backup."""


@dataclass(frozen=True)
class SetFault:
    """A tracked item (``link:eth0``, ``check:name``) failed (True) or recovered (False)."""

    item: str
    failed: bool


@dataclass(frozen=True)
class SetPriority:
    """The effective priority changed (tracking weights)."""

    priority: int


@dataclass(frozen=True)
class SetMaintenance:
    """Maintenance: stay backup (a master hands over first)."""

    on: bool


Command = Start | Stop | Promote | Demote | SetFault | SetPriority | SetMaintenance


# ---------------------------------------------------------------------------
# outputs: actions


@dataclass(frozen=True)
class SendAdvert:
    state: State
    priority: int
    flags: Flag = Flag.NONE
    successor: str = ""
    hold_ms: int = 0


@dataclass(frozen=True)
class Transition:
    old: State
    new: State
    reason: str


@dataclass(frozen=True)
class InstallDelivery:
    """Install the delivery rules (idempotent)."""


@dataclass(frozen=True)
class WithdrawDelivery:
    """Remove the delivery rules (idempotent)."""


@dataclass(frozen=True)
class StartAnnounce:
    reason: str


@dataclass(frozen=True)
class StopAnnounce:
    """Stop every announcement at once."""


@dataclass(frozen=True)
class Exit:
    """The graceful stop is complete; ``restart``: kernel state left for the next process."""

    restart: bool = False


@dataclass(frozen=True)
class Refused:
    """A command that cannot be carried out now, and why."""

    command: str
    reason: str


@dataclass(frozen=True)
class Completed:
    """An operator's command is done (``promote``, ``demote``, ``maintenance``); ``data``
    says how: for ``promote`` {"state": "MASTER"} (plus "note": "already master" if it
    was), for ``demote`` and ``maintenance`` on a master {"state": ..., "master": the
    node now master}; {} for ``maintenance`` that needed no hand-over."""

    command: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Notice:
    """Something worth a log line and a metric, of a :class:`NoticeKind`: split_brain,
    config_mismatch, master_down, takeover_request, handover, drain_done,
    peer_restarting, stale_handover (an offer to us that no longer stood when we could
    take it), handover_failed (our successor never answered: we are master again)."""

    kind: NoticeKind
    peer: str = ""
    detail: str = ""


Action = (SendAdvert | Transition | InstallDelivery | WithdrawDelivery | StartAnnounce
          | StopAnnounce | Exit | Refused | Completed | Notice)


# ---------------------------------------------------------------------------
# the transition table


class Event(enum.Enum):
    START = "start"
    RESUME = "resume"
    MASTER_DOWN = "master_down"  # master-down timer expired
    HANDOVER_TO_ME = "handover"  # the master named us its successor
    HIGHER_MASTER = "higher_priority_master"
    TAKEOVER_REQUEST = "takeover_request"  # a peer asked for mastership (promote/preempt)
    DEMOTE = "demote"
    MAINTENANCE = "maintenance"
    STOP = "stop"
    FAULT = "fault"
    FAULT_CLEARED = "fault_cleared"


#: state -> event -> new state. Every state change of the FSM is one entry here.
TRANSITIONS: dict[State, dict[Event, State]] = {
    State.INIT: {
        Event.START: State.BACKUP,
        Event.RESUME: State.MASTER,
        Event.FAULT: State.FAULT,
    },
    State.BACKUP: {
        Event.MASTER_DOWN: State.MASTER,
        Event.HANDOVER_TO_ME: State.MASTER,
        Event.FAULT: State.FAULT,
    },
    State.MASTER: {
        Event.HIGHER_MASTER: State.BACKUP,
        Event.TAKEOVER_REQUEST: State.BACKUP,
        Event.DEMOTE: State.BACKUP,
        Event.MAINTENANCE: State.BACKUP,
        Event.STOP: State.BACKUP,
        Event.FAULT: State.FAULT,
    },
    State.FAULT: {
        Event.FAULT_CLEARED: State.BACKUP,
    },
}


#: Backups advertise too (so the master knows its live successors, and status shows
#: them), but at most once per this many seconds: at 100 ms adverts that halves an
#: idle pair's wake-ups. Only MASTER adverts feed the master-down timer.
BACKUP_ADVERT_PERIOD_S = 1.0

#: takeover requests a preempting backup sends before it falls back to RFC 5798
#: preemption (ignoring the lower-priority master's adverts until its timer expires)
PREEMPT_REQUESTS = 3


class LocalError(Exception):
    """The FSM was driven wrongly by its own caller (a bug, not a peer's fault)."""


# ---------------------------------------------------------------------------
# the small machines beside it


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class SubMachine(Generic[S, E]):
    """A small named machine beside the election's own: its state, and the table
    (state -> event -> new state) every change of it is checked against."""

    def __init__(self, name: str, table: Mapping[S, Mapping[E, S]], initial: S):
        self.name = name
        self.table = table
        self.initial = initial
        self.state = initial

    def go(self, event: E) -> S:
        """Change state on ``event``; one the table does not declare raises LocalError."""
        try:
            new = self.table[self.state][event]
        except KeyError:
            raise LocalError(f"{self.name}: no transition from {self.state.name} on {event.value}") from None
        self.state = new
        return new

    def __repr__(self) -> str:
        return f"<{self.name} machine: {self.state.name}>"


class DrainState(enum.Enum):
    """The hand-over drain: the old master keeps its delivery rules after it stopped
    being master, until the router has moved to the new one."""

    IDLE = "idle"  # no drain: delivering as master, or not at all
    HANDING_OVER = "handing_over"  # HANDOVER sent (re-sent every interval); no master heard yet
    DRAINING = "draining"  # a master heard: delivering for drain_margin more (drain_max at most)


class DrainEvent(enum.Enum):
    HAND_OVER = "hand_over"  # we handed over (demote, maintenance, stop, a takeover request)
    YIELD = "yield"  # we yielded to a higher-priority master, heard already
    MASTER_HEARD = "master_heard"  # a master's advert
    DONE = "drain_done"  # drain_margin after hearing a master, or drain_max
    MASTER = "master"  # we are master again: took back (the successor never answered), or were handed it
    FAULT = "fault"  # we faulted: delivery withdrawn at once


#: drain state -> event -> new state.
DRAIN_TRANSITIONS: dict[DrainState, dict[DrainEvent, DrainState]] = {
    DrainState.IDLE: {
        DrainEvent.HAND_OVER: DrainState.HANDING_OVER,
        DrainEvent.YIELD: DrainState.DRAINING,
    },
    DrainState.HANDING_OVER: {
        DrainEvent.MASTER_HEARD: DrainState.DRAINING,
        DrainEvent.DONE: DrainState.IDLE,
        DrainEvent.MASTER: DrainState.IDLE,
        DrainEvent.FAULT: DrainState.IDLE,
    },
    DrainState.DRAINING: {
        DrainEvent.DONE: DrainState.IDLE,
        DrainEvent.MASTER: DrainState.IDLE,
        DrainEvent.FAULT: DrainState.IDLE,
    },
}


class PromoteState(enum.Enum):
    """An operator's promote on a backup: ask the master to hand over, until it does."""

    IDLE = "idle"
    REQUESTING = "requesting"  # a takeover request every interval, until promote_until


class PromoteEvent(enum.Enum):
    PROMOTE = "promote"  # the command (again: the wait starts over)
    MASTER = "master"  # we became master (handed over, or by our timer)
    EXPIRED = "expired"  # promote_until passed: refused
    CANCELLED = "cancelled"  # a stop, maintenance or a fault ended it (no Refused)


#: promote state -> event -> new state.
PROMOTE_TRANSITIONS: dict[PromoteState, dict[PromoteEvent, PromoteState]] = {
    PromoteState.IDLE: {
        PromoteEvent.PROMOTE: PromoteState.REQUESTING,
    },
    PromoteState.REQUESTING: {
        PromoteEvent.PROMOTE: PromoteState.REQUESTING,
        PromoteEvent.MASTER: PromoteState.IDLE,
        PromoteEvent.EXPIRED: PromoteState.IDLE,
        PromoteEvent.CANCELLED: PromoteState.IDLE,
    },
}


class StopState(enum.Enum):
    """The process's life as the election sees it."""

    RUNNING = "running"
    STOPPING = "stopping"  # a graceful stop: handing over and draining, then Exit
    RESTARTING = "restarting"  # a restart in place: the RESTARTING advert, then Exit at once
    FINISHED = "finished"  # an Exit was returned: the election neither sends nor decides anything more


class StopEvent(enum.Enum):
    STOP = "stop"  # Stop()
    RESTART = "restart"  # Stop(restart=True)
    EXIT = "exit"  # an Exit action was returned


#: stop state -> event -> new state.
STOP_TRANSITIONS: dict[StopState, dict[StopEvent, StopState]] = {
    StopState.RUNNING: {
        StopEvent.STOP: StopState.STOPPING,
        StopEvent.RESTART: StopState.RESTARTING,
    },
    StopState.STOPPING: {
        StopEvent.STOP: StopState.STOPPING,  # asked again while draining: the drain ends with Exit
        StopEvent.RESTART: StopState.RESTARTING,
        StopEvent.EXIT: StopState.FINISHED,
    },
    StopState.RESTARTING: {
        StopEvent.EXIT: StopState.FINISHED,
    },
}

#: every small machine's name, table and initial state, in the order they are drawn
SUB_MACHINES: tuple[tuple[str, Mapping[Any, Mapping[Any, Any]], enum.Enum], ...] = (
    ("drain", DRAIN_TRANSITIONS, DrainState.IDLE),
    ("promote", PROMOTE_TRANSITIONS, PromoteState.IDLE),
    ("stop", STOP_TRANSITIONS, StopState.RUNNING),
)


def mermaid_diagram() -> str:
    """The state diagram, drawn from :data:`TRANSITIONS`, with each small machine of
    :data:`SUB_MACHINES` as a composite state of its own name (its states prefixed
    with it: several have an ``IDLE``)."""
    lines = ["stateDiagram-v2", "    [*] --> INIT"]
    for src, events in TRANSITIONS.items():
        for event, dst in events.items():
            lines.append(f"    {src.name} --> {dst.name}: {event.value}")
    for name, table, initial in SUB_MACHINES:
        states = list(dict.fromkeys([*table, *(dst for row in table.values() for dst in row.values())]))
        lines.append(f"    state {name} {{")
        lines += [f'        state "{st.name}" as {name}_{st.name}' for st in states]
        lines.append(f"        [*] --> {name}_{initial.name}")
        for sub, sub_events in table.items():
            for sub_event, sub_dst in sub_events.items():
                lines.append(f"        {name}_{sub.name} --> {name}_{sub_dst.name}: {sub_event.value}")
        lines.append("    }")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# the machine


@dataclass(frozen=True)
class Params:
    node: str
    address: IPAddress
    priority: int  # configured (base) priority, 1..254
    advert_interval_ms: int
    preempt: bool = True
    preempt_delay_ms: int = 0
    drain_margin_ms: int = 200
    drain_max_ms: int = 3000
    restart_hold_ms: int = 10_000
    config_digest: bytes = b"\x00" * 16

    @classmethod
    def from_config(cls, cfg: Config, digest: bytes) -> Params:
        e = cfg.election
        return cls(node=cfg.node.name, address=cfg.node.address, priority=e.priority,
                   advert_interval_ms=e.advert_interval_ms, preempt=e.preempt,
                   preempt_delay_ms=e.preempt_delay_ms, drain_margin_ms=e.drain_margin_ms,
                   drain_max_ms=e.drain_max_ms, restart_hold_ms=e.restart_hold_ms,
                   config_digest=digest[:16])


@dataclass
class Peer:
    node: str
    address: IPAddress
    priority: int
    state: State
    advert_interval_ms: int
    last_seen: float
    config_match: bool


@dataclass
class Drain:
    """The data of the drain machine (:class:`DrainState`) while it is not IDLE: the old
    master after a hand-over, still delivering, no longer master."""

    successor: str
    started: float
    cap: float  # started + drain_max
    heard: float | None = None  # when the new master was first heard
    resend_at: float = 0.0  # next HANDOVER re-send while the successor is silent
    flags: Flag = Flag.HANDOVER
    priority: int = 0
    command: str = ""  # the operator's command that started it ("demote"), told if it fails


@dataclass
class Offer:
    """A hand-over to us that was handled late (it waited in the socket, e.g. while
    this process was stopped). It is decided at ``decide_at``, after every advert that
    waited behind it: any other advert from the sender (it took mastership back, named
    another node) withdraws it, and it is taken only if the sender was still offering,
    i.e. its latest HANDOVER (re-sent every interval while we are silent) arrived less
    than one interval before. Taking a stale offer would make two masters: the old
    master takes back over after its master-down interval without an answer."""

    sender: str
    last: float  # arrival of the sender's latest HANDOVER naming us
    interval: float  # the sender's advert interval (its re-send period)
    decide_at: float  # when it was handled: decided right after


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    old: State
    new: State
    reason: str


class Election:
    """One node's election state. See the module docstring."""

    HISTORY = 16

    def __init__(self, params: Params):
        self.p = params
        self.state = State.INIT
        self.priority = params.priority  # effective priority
        self.faults: set[str] = set()
        self.maintenance = False
        self.peers: dict[str, Peer] = {}
        self.master: str | None = None  # node name of the current master (self.p.node if us)
        self.master_interval_ms = params.advert_interval_ms
        self.master_down_at: float | None = None
        self.advert_at: float | None = None
        #: the hand-over drain; ``drain`` holds its data while it is not IDLE
        self.drain_machine: SubMachine[DrainState, DrainEvent] = SubMachine("drain", DRAIN_TRANSITIONS,
                                                                             DrainState.IDLE)
        self.drain: Drain | None = None
        self.offer: Offer | None = None
        #: the graceful stop (see :attr:`stopping`, :attr:`finished`)
        self.stop_machine: SubMachine[StopState, StopEvent] = SubMachine("stop", STOP_TRANSITIONS, StopState.RUNNING)
        self.yielded = False  # handed over on request: do not preempt the new master
        self.started_at: float | None = None
        #: an operator's promote; REQUESTING until ``promote_until`` at most
        self.promote_machine: SubMachine[PromoteState, PromoteEvent] = SubMachine("promote", PROMOTE_TRANSITIONS,
                                                                                   PromoteState.IDLE)
        self.promote_until: float = 0.0  # while REQUESTING: refused if not master by then
        self.request_at: float = 0.0  # next takeover request may be sent at
        #: the operator's commands whose Completed is due once they are done, in order
        self.awaiting: list[str] = []
        self.preempt_requests = 0  # unanswered preempt requests to the current master
        self.history: deque[HistoryEntry] = deque(maxlen=self.HISTORY)
        self._mismatch_reported: set[str] = set()

    @property
    def stopping(self) -> bool:
        """A graceful stop (or restart) is under way."""
        return self.stop_machine.state in (StopState.STOPPING, StopState.RESTARTING)

    @property
    def finished(self) -> bool:
        """An Exit was returned: the process is leaving and this election is over; it
        neither sends nor decides anything more (a restarting master's later advert
        would cancel the hold its RESTARTING advert asked of the peers)."""
        return self.stop_machine.state is StopState.FINISHED

    # -- timing -------------------------------------------------------------

    @property
    def interval(self) -> float:
        return self.p.advert_interval_ms / 1000.0

    @property
    def backup_period(self) -> float:
        return max(self.interval, BACKUP_ADVERT_PERIOD_S)

    def skew(self, priority: int | None = None) -> float:
        prio = self.priority if priority is None else priority
        return ((256 - prio) * self.master_interval_ms / 256.0) / 1000.0

    def master_down_interval(self) -> float:
        return 3 * self.master_interval_ms / 1000.0 + self.skew()

    def next_deadline(self) -> float | None:
        if self.finished:
            return None
        times = [self.advert_at, self.master_down_at]
        if self.drain is not None:
            times.append(self._drain_end())
            if self.drain_machine.state is DrainState.HANDING_OVER:
                times.append(self.drain.resend_at)
        if self.promote_machine.state is PromoteState.REQUESTING:
            times.append(min(self.promote_until, self.request_at))
        if self.offer is not None:
            times.append(self.offer.decide_at)
        live = [t for t in times if t is not None]
        return min(live) if live else None

    def _drain_end(self) -> float:
        d = self.drain
        assert d is not None
        if d.heard is None:
            return d.cap
        return min(d.cap, d.heard + self.p.drain_margin_ms / 1000.0)

    # -- the small machines -------------------------------------------------

    def _drain_go(self, event: DrainEvent, drain: Drain | None = None) -> None:
        """Move the drain machine; its data goes with it (``drain``: the new drain's)."""
        if self.drain_machine.go(event) is DrainState.IDLE:
            self.drain = None
        elif drain is not None:
            self.drain = drain

    def _end_drain(self, event: DrainEvent) -> None:
        """End a drain under way, if any (we are master again, or faulted)."""
        if self.drain_machine.state is not DrainState.IDLE:
            self._drain_go(event)

    def _end_promote(self, event: PromoteEvent) -> None:
        """End a promote under way, if any (without a Refused: the caller says it)."""
        if self.promote_machine.state is PromoteState.REQUESTING:
            self.promote_machine.go(event)

    def _await(self, command: str) -> None:
        if command not in self.awaiting:
            self.awaiting.append(command)

    def _completion(self, command: str) -> dict[str, Any] | None:
        """The data of ``command``'s Completed if it is done now, else None."""
        if command == "promote":
            return {"state": self.state.name} if self.state is State.MASTER else None
        # demote, maintenance: handed over, and the node now master heard
        if self.state is not State.MASTER and self.master not in (None, self.p.node):
            return {"state": self.state.name, "master": self.master}
        return None

    def _completions(self) -> list[Action]:
        """A Completed for each awaited command that is done now."""
        done: list[Action] = []
        for command in list(self.awaiting):
            data = self._completion(command)
            if data is not None:
                self.awaiting.remove(command)
                done.append(Completed(command, data))
        return done

    # -- helpers ------------------------------------------------------------

    def _advert(self, flags: Flag = Flag.NONE, successor: str = "", hold_ms: int = 0,
                priority: int | None = None, state: State | None = None) -> SendAdvert:
        if priority is None:
            priority = 0 if self.stopping else self.priority
        return SendAdvert(state=self.state if state is None else state, priority=priority,
                          flags=flags, successor=successor, hold_ms=hold_ms)

    def _go(self, event: Event, now: float, reason: str | None = None) -> list[Action]:
        """Apply a table transition and return the entry actions of the new state."""
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise LocalError(f"no transition from {self.state.name} on {event.value}") from None
        old, self.state = self.state, new
        why = reason or event.value
        self.history.append(HistoryEntry(at=now, old=old, new=new, reason=why))
        actions: list[Action] = [Transition(old, new, why)]
        if new is State.MASTER:
            actions += self._enter_master(now, why)
        elif new is State.BACKUP:
            self._arm_master_down(now)
            self.advert_at = now + self.backup_period
            if old is State.MASTER:
                actions.append(StopAnnounce())
                self.master = None
            elif self.drain_machine.state is DrainState.IDLE:
                actions.append(WithdrawDelivery())
        elif new is State.FAULT:
            self.master_down_at = None
            self.advert_at = None
            self._end_promote(PromoteEvent.CANCELLED)
            if old is State.MASTER:
                # hand over at once: the best backup needs no skew wait
                best = self._best_backup(now)
                actions += [StopAnnounce(),
                            SendAdvert(State.FAULT, 0, Flag.HANDOVER | Flag.STOPPING if best else Flag.STOPPING,
                                       best.node if best else "")]
                self.master = None
            self._end_drain(DrainEvent.FAULT)
            actions.append(WithdrawDelivery())
            if self.stopping:
                actions.append(Exit())  # a fault during a graceful stop ends it
        return actions

    def _enter_master(self, now: float, reason: str) -> list[Action]:
        self.master = self.p.node
        self.preempt_requests = 0
        self.master_interval_ms = self.p.advert_interval_ms
        self.master_down_at = None
        self._end_promote(PromoteEvent.MASTER)
        self.yielded = False
        self._end_drain(DrainEvent.MASTER)
        self.offer = None
        self.advert_at = now + self.interval
        # delivery first (packets the router sends on must be taken), then the router
        # is told, then the peers: the announcement is what ends the client's outage
        return [InstallDelivery(), StartAnnounce(reason), self._advert()]

    def _arm_master_down(self, now: float, at_least: float = 0.0) -> None:
        self.master_down_at = now + max(self.master_down_interval(), at_least)

    def _live_backups(self, now: float) -> list[Peer]:
        def horizon(p: Peer) -> float:  # three of the peer's backup adverts, plus slack
            return 3 * max(p.advert_interval_ms / 1000.0, BACKUP_ADVERT_PERIOD_S) + self.interval
        return [p for p in self.peers.values()
                if p.state is State.BACKUP and p.priority > 0 and now - p.last_seen <= horizon(p)]

    def _best_backup(self, now: float) -> Peer | None:
        live = self._live_backups(now)
        if not live:
            return None
        return max(live, key=lambda p: (p.priority, int(p.address)))

    def _hand_over(self, event: Event, now: float, successor: str, flags: Flag = Flag.HANDOVER,
                   priority: int | None = None) -> list[Action]:
        """MASTER -> BACKUP keeping delivery for the drain; the first advert names the successor."""
        prio = self.priority if priority is None else priority
        actions = self._go(event, now, reason=f"{event.value}:{successor}")
        # _go(BACKUP) emitted StopAnnounce; the HANDOVER advert must follow it at once.
        self._drain_go(DrainEvent.HAND_OVER, Drain(
            successor=successor, started=now, cap=now + self.p.drain_max_ms / 1000.0,
            resend_at=now + self.interval, flags=flags, priority=prio,
            command={Event.DEMOTE: "demote"}.get(event, "")))
        actions.append(SendAdvert(State.BACKUP, prio, flags, successor))
        actions.append(Notice(NoticeKind.HANDOVER, successor, event.value))
        # do not send a plain BACKUP advert right away: the HANDOVER one is what peers need
        self.advert_at = now + self.backup_period
        # if the successor never shows up, take back over after the full master-down time
        self.master_down_at = now + self.master_down_interval()
        return actions

    def _peer_beats_us(self, msg: PeerAdvert) -> bool:
        if msg.priority != self.priority:
            return msg.priority > self.priority
        return int(msg.address) > int(self.p.address)

    def _may_preempt(self, now: float) -> bool:
        return (self.p.preempt and not self.yielded and not self.maintenance and not self.faults
                and not self.stopping
                and self.started_at is not None
                and now >= self.started_at + self.p.preempt_delay_ms / 1000.0)

    # -- inputs -------------------------------------------------------------

    def handle_advert(self, msg: PeerAdvert | Advert, src: IPAddress, now: float,
                      handled_at: float | None = None) -> list[Action]:
        """An authentic, fresh advert from a peer (the decoder has checked it) that
        arrived at ``now`` and is handled at ``handled_at`` (default: ``now``). A
        protocol :class:`~.protocol.Advert` is read as a :class:`PeerAdvert`."""
        if self.finished:
            return []
        peer = msg if isinstance(msg, PeerAdvert) else PeerAdvert.from_advert(msg)
        return self._finish(self._advert_in(peer, src, now, handled_at))

    def handle_timer(self, now: float) -> list[Action]:
        """The deadline of :meth:`next_deadline` was reached."""
        return [] if self.finished else self._finish(self._timer(now))

    def handle_command(self, cmd: Command, now: float) -> list[Action]:
        """A command (start, stop, operator commands, faults, priority)."""
        return [] if self.finished else self._finish(self._command(cmd, now))

    def _finish(self, actions: list[Action]) -> list[Action]:
        """After every input: the commands it completed, then whether it was the last."""
        if self.awaiting:
            actions += self._completions()
        if any(isinstance(a, Exit) for a in actions):
            self.stop_machine.go(StopEvent.EXIT)
        return actions

    def _advert_in(self, msg: PeerAdvert, src: IPAddress, now: float, handled_at: float | None) -> list[Action]:
        if msg.node == self.p.node:
            return []
        late = handled_at is not None and handled_at > now
        actions: list[Action] = []
        if self.offer is not None and msg.node == self.offer.sender \
                and not (msg.handover and msg.successor == self.p.node):
            # the sender moved on before we could answer (took back over, named another)
            self.offer = None
            actions.append(Notice(NoticeKind.STALE_HANDOVER, msg.node,
                                  f"offer withdrawn: a {msg.state.name} advert followed it, not taken"))
        match = msg.config_digest == self.p.config_digest
        self.peers[msg.node] = Peer(node=msg.node, address=msg.address, priority=msg.priority,
                                    state=msg.state, advert_interval_ms=msg.advert_interval_ms,
                                    last_seen=now, config_match=match)
        if not match and msg.node not in self._mismatch_reported:
            self._mismatch_reported.add(msg.node)
            actions.append(Notice(NoticeKind.CONFIG_MISMATCH, msg.node, "shared config digest differs"))
        elif match:
            self._mismatch_reported.discard(msg.node)

        if self.state is State.BACKUP:
            actions += self._backup_hears(msg, now, handled_at if late else None)
        elif self.state is State.MASTER:
            actions += self._master_hears(msg, now)
        elif msg.state is State.MASTER:
            self.master = msg.node  # INIT/FAULT: remember who serves, for status
        return actions

    def _backup_hears(self, msg: PeerAdvert, now: float, late_at: float | None = None) -> list[Action]:
        actions: list[Action] = []
        if msg.handover:
            if msg.successor == self.p.node and not self.maintenance and not self.faults \
                    and not self.stopping:
                if late_at is None:
                    return actions + self._go(Event.HANDOVER_TO_ME, now, reason=f"handover:{msg.node}")
                # handled late: decide once what waited behind it is known (handle_timer)
                self.offer = Offer(sender=msg.node, last=now, decide_at=late_at,
                                   interval=(msg.advert_interval_ms or self.p.advert_interval_ms) / 1000.0)
            self.master = None
            self.master_interval_ms = msg.advert_interval_ms or self.master_interval_ms
            if msg.successor:
                self._arm_master_down(now)  # the successor takes over at once; wait for it
            else:
                self.master_down_at = now + self.skew()  # plain priority-0 stop (VRRP)
            return actions
        if msg.priority == 0 and (msg.state is State.MASTER or msg.node == self.master):
            self.master = None  # the master is leaving (VRRP priority 0): wait only our skew
            self.master_down_at = now + self.skew()
            return actions
        if msg.state is not State.MASTER:
            return actions
        if self.drain is not None and self.drain_machine.state is DrainState.HANDING_OVER:
            self.drain.heard = now
            self._drain_go(DrainEvent.MASTER_HEARD)
        self.master = msg.node
        self.master_interval_ms = msg.advert_interval_ms
        if msg.restarting:
            actions.append(Notice(NoticeKind.PEER_RESTARTING, msg.node, f"hold {msg.hold_ms} ms"))
            self._arm_master_down(now, at_least=msg.hold_ms / 1000.0)
            return actions
        if msg.priority < self.priority and self._may_preempt(now):
            # Preempt without a gap: ask the master to hand over, and meanwhile keep
            # treating it as master. Only if it ignores PREEMPT_REQUESTS requests do we
            # fall back to RFC 5798 preemption (stop resetting the timer, time out).
            if self.preempt_requests < PREEMPT_REQUESTS or self.master_down_at is None:
                self._arm_master_down(now)
            sent = self._request_takeover(now, "preempt")
            if sent:
                self.preempt_requests += 1
            return actions + sent
        self.preempt_requests = 0
        self._arm_master_down(now)
        if self.promote_machine.state is PromoteState.REQUESTING:
            actions += self._request_takeover(now, "promote")
        return actions

    def _request_takeover(self, now: float, why: str) -> list[Action]:
        if now < self.request_at:
            return []
        self.request_at = now + self.interval
        return [SendAdvert(State.BACKUP, self.priority, Flag.TAKEOVER_REQUEST, self.p.node),
                Notice(NoticeKind.TAKEOVER_REQUEST, self.master or "", why)]

    def _master_hears(self, msg: PeerAdvert, now: float) -> list[Action]:
        if msg.handover and msg.successor == self.p.node:
            # a peer that was master too (split brain) yielded to us: heal the router
            self.advert_at = now + self.interval
            return [self._advert(), StartAnnounce("peer_yielded")]
        if msg.takeover_request and msg.state is State.BACKUP:
            if msg.priority == 0:
                return []
            promote = msg.priority <= self.priority  # a lower node asked: it was promoted
            actions: list[Action] = self._hand_over(Event.TAKEOVER_REQUEST, now, msg.node)
            self.yielded = promote
            return actions
        if msg.state is not State.MASTER:
            return []
        actions = [Notice(NoticeKind.SPLIT_BRAIN, msg.node, f"peer master priority {msg.priority}")]
        if msg.priority > 0 and self._peer_beats_us(msg):
            actions += self._go(Event.HIGHER_MASTER, now, reason=f"higher_priority_master:{msg.node}")
            self.master = msg.node
            self.master_interval_ms = msg.advert_interval_ms
            self._arm_master_down(now)
            # keep delivering for the margin: the router may still send to us
            self._drain_go(DrainEvent.YIELD, Drain(successor=msg.node, started=now,
                                                   cap=now + self.p.drain_max_ms / 1000.0, heard=now))
            # tell the winner we yielded: it re-announces, so the router ends pointing at it
            return [*actions, SendAdvert(State.BACKUP, self.priority, Flag.HANDOVER, msg.node)]
        # a lower-priority master: re-assert so stale router caches heal
        self.advert_at = now + self.interval
        return [*actions, self._advert(), StartAnnounce("reassert")]

    def _timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        o = self.offer
        if o is not None and now >= o.decide_at:
            self.offer = None
            if self.state is State.BACKUP and not self.maintenance and not self.faults and not self.stopping:
                if now - o.last <= o.interval:
                    return self._go(Event.HANDOVER_TO_ME, now, reason=f"handover:{o.sender}")
                actions.append(Notice(NoticeKind.STALE_HANDOVER, o.sender,
                                      f"its latest offer arrived {(now - o.last) * 1000:.0f} ms before "
                                      f"it could be taken (re-sent every {o.interval * 1000:.0f} ms): not taken"))
        d = self.drain
        if d is not None:
            if now >= self._drain_end():
                self._drain_go(DrainEvent.DONE)
                actions += [WithdrawDelivery(), Notice(NoticeKind.DRAIN_DONE, d.successor,
                                                       "heard" if d.heard is not None else "cap")]
                if self.stopping:
                    return [*actions, Exit()]
            elif self.drain_machine.state is DrainState.HANDING_OVER and now >= d.resend_at:
                d.resend_at = now + self.interval
                actions.append(SendAdvert(State.BACKUP, d.priority, d.flags, d.successor))
        if self.state is State.BACKUP and self.master_down_at is not None and now >= self.master_down_at:
            if self.maintenance or self.stopping:
                self.master = None
                self._arm_master_down(now)
            else:
                self.master_interval_ms = self.p.advert_interval_ms
                if d is not None and self.drain_machine.state is DrainState.HANDING_OVER:
                    # our hand-over failed: the successor never answered; we take back over
                    why = f"{d.successor} did not take over within {(now - d.started) * 1000:.0f} ms"
                    actions.append(Notice(NoticeKind.HANDOVER_FAILED, d.successor, why))
                    if d.command:
                        actions.append(Refused(d.command, why + "; master again"))
                        self._give_up(d.command)
                actions.append(Notice(NoticeKind.MASTER_DOWN, self.master or ""))
                return actions + self._go(Event.MASTER_DOWN, now)
        if self.promote_machine.state is PromoteState.REQUESTING:
            if now >= self.promote_until:
                self.promote_machine.go(PromoteEvent.EXPIRED)
                actions.append(Refused("promote", "the master did not hand over in time"))
                self._give_up("promote")
            elif now >= self.request_at:
                actions += self._request_takeover(now, "promote")
        if self.advert_at is not None and now >= self.advert_at and self.state in (State.MASTER, State.BACKUP):
            period = self.interval if self.state is State.MASTER else self.backup_period
            behind = now - self.advert_at
            self.advert_at = (self.advert_at + period) if behind < period else now + period
            if self.drain_machine.state is not DrainState.HANDING_OVER:
                actions.append(self._advert())
        return actions

    def _give_up(self, command: str) -> None:
        """``command`` was refused after it was taken on: its Completed is no longer due."""
        if command in self.awaiting:
            self.awaiting.remove(command)

    # -- commands: one method each ----------------------------------------------

    def _command(self, cmd: Command, now: float) -> list[Action]:
        match cmd:
            case Start():
                return self._on_start(cmd, now)
            case Stop():
                return self._on_stop(cmd, now)
            case Promote():
                return self._on_promote(now)
            case Demote():
                return self._on_demote(now)
            case SetMaintenance():
                return self._on_maintenance(cmd, now)
            case SetFault():
                return self._on_fault(cmd, now)
            case SetPriority():
                return self._on_priority(cmd)
        raise LocalError(f"unknown command {cmd!r}")

    def _on_start(self, cmd: Start, now: float) -> list[Action]:
        if self.state is not State.INIT:
            raise LocalError("Start twice")
        self.started_at = now
        if self.faults:
            return self._go(Event.FAULT, now, reason="fault:" + ",".join(sorted(self.faults)))
        if cmd.resume_master:
            return self._go(Event.RESUME, now, reason="resume_after_restart")
        return [*self._go(Event.START, now), self._advert()]  # peers learn of us at once

    def _on_stop(self, cmd: Stop, now: float) -> list[Action]:
        if cmd.restart:
            self.stop_machine.go(StopEvent.RESTART)
            if self.state is State.MASTER:
                return [self._advert(flags=Flag.RESTARTING, hold_ms=self.p.restart_hold_ms, priority=self.priority),
                        Exit(restart=True)]
            return [Exit(restart=True)]
        self.stop_machine.go(StopEvent.STOP)
        self._end_promote(PromoteEvent.CANCELLED)
        if self.state is State.MASTER:
            best = self._best_backup(now)
            if best is None:
                # (no drain: a master has none)
                actions: list[Action] = self._go(Event.STOP, now, reason="stop:no_backup")
                return [*actions, SendAdvert(State.BACKUP, 0, Flag.STOPPING), WithdrawDelivery(), Exit()]
            return self._hand_over(Event.STOP, now, best.node, flags=Flag.HANDOVER | Flag.STOPPING, priority=0)
        if self.state is State.BACKUP and self.drain_machine.state is not DrainState.IDLE:
            return []  # the drain ends with Exit
        actions = []
        if self.state is State.BACKUP:
            actions.append(SendAdvert(State.BACKUP, 0, Flag.STOPPING))
        return [*actions, WithdrawDelivery(), Exit()]

    def _on_promote(self, now: float) -> list[Action]:
        if self.state is State.MASTER:
            return [Completed("promote", {"state": State.MASTER.name, "note": "already master"})]
        if self.state is not State.BACKUP or self.faults:
            return [Refused("promote", f"state is {self.state.name}")]
        if self.maintenance:
            return [Refused("promote", "maintenance mode is on")]
        if self.stopping:
            return [Refused("promote", "stopping")]
        self.yielded = False
        # Ask whoever is master to hand over. With no master known (just started, or
        # the master left), a live master we have not heard yet still answers; if none
        # does, our master-down timer makes us master.
        self.promote_machine.go(PromoteEvent.PROMOTE)
        self.promote_until = now + self.master_down_interval() + self.interval
        self.request_at = now
        self._await("promote")
        return self._request_takeover(now, "promote")

    def _on_demote(self, now: float) -> list[Action]:
        if self.state is not State.MASTER:
            return [Refused("demote", f"not master (state is {self.state.name})")]
        best = self._best_backup(now)
        if best is None:
            return [Refused("demote", "no live backup to hand over to")]
        actions = self._hand_over(Event.DEMOTE, now, best.node)
        self.yielded = True
        self._await("demote")
        return actions

    def _on_maintenance(self, cmd: SetMaintenance, now: float) -> list[Action]:
        if not cmd.on:
            self.maintenance = False
            return [Completed("maintenance", {})]
        if self.state is State.MASTER:
            best = self._best_backup(now)
            if best is None:
                return [Refused("maintenance", "no live backup to hand over to")]
            self.maintenance = True
            self._await("maintenance")
            return self._hand_over(Event.MAINTENANCE, now, best.node)
        self.maintenance = True
        self._end_promote(PromoteEvent.CANCELLED)
        return [Completed("maintenance", {})]

    def _on_fault(self, cmd: SetFault, now: float) -> list[Action]:
        if cmd.failed:
            self.faults.add(cmd.item)
            if self.state is State.INIT:
                return []
            if self.state is not State.FAULT:
                return self._go(Event.FAULT, now, reason=f"fault:{cmd.item}")
            return []
        self.faults.discard(cmd.item)
        if self.state is State.FAULT and not self.faults:
            return [*self._go(Event.FAULT_CLEARED, now, reason=f"recovered:{cmd.item}"), self._advert()]
        return []

    def _on_priority(self, cmd: SetPriority) -> list[Action]:
        if not 1 <= cmd.priority <= 254:
            raise LocalError(f"priority must be 1..254, got {cmd.priority}")
        self.priority = cmd.priority
        return []

    # -- reporting ------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.drain is not None

    def status(self, now: float) -> dict[str, Any]:
        master = None
        if self.master == self.p.node:
            master = {"node": self.p.node, "address": str(self.p.address), "priority": self.priority}
        elif self.master is not None and self.master in self.peers:
            peer = self.peers[self.master]
            master = {"node": peer.node, "address": str(peer.address), "priority": peer.priority}
        return {
            "node": self.p.node,
            "address": str(self.p.address),
            "state": self.state.name,
            "priority": self.p.priority,
            "effective_priority": self.priority,
            "master": master,
            "draining": self.draining,
            "maintenance": self.maintenance,
            "faults": sorted(self.faults),
            "preempt": self.p.preempt,
            "yielded": self.yielded,
            "advert_interval_ms": self.p.advert_interval_ms,
            "master_down_interval_ms": round(self.master_down_interval() * 1000, 3),
            "peers": [
                {"node": p.node, "address": str(p.address), "priority": p.priority,
                 "state": p.state.name, "last_seen_s": round(now - p.last_seen, 3),
                 "config_match": p.config_match}
                for p in sorted(self.peers.values(), key=lambda p: p.node)
            ],
        }


__all__ = [
    "Action", "Command", "Completed", "Demote", "Drain", "Election", "Event", "Exit", "InstallDelivery",
    "LocalError", "Notice", "Offer", "Params", "Peer", "Promote", "Refused", "SendAdvert", "SetFault",
    "SetMaintenance", "SetPriority", "Start", "StartAnnounce", "State", "Stop", "StopAnnounce",
    "TRANSITIONS", "Transition", "WithdrawDelivery", "mermaid_diagram",
    "SubMachine", "SUB_MACHINES", "DrainState", "DrainEvent", "DRAIN_TRANSITIONS", "PromoteState",
    "PromoteEvent", "PROMOTE_TRANSITIONS", "StopState", "StopEvent", "STOP_TRANSITIONS",
    "PeerAdvert",
]


if __name__ == "__main__":  # pragma: no cover - docs generation
    print("```mermaid")
    print(mermaid_diagram(), end="")
    print("```")
