"""The election process: adverts, the FSM and its timer, the takeover's flip and first frames.

The director (daemon.py) forks it before it starts its event loop and threads. It runs
at the unit's real-time priority (the director lowers its own, :func:`fork`), and
nothing the director does (scrapes, control clients, reconciles of 65,536 VIPs, reloads,
hooks, bursts, a garbage collection holding the interpreter) can delay an advert or the
master-down timer: they are in another interpreter. See docs/election-process.md.

Its loop is a blocking ``epoll`` over the advert socket and the channel to the
director, with the FSM's ``next_deadline()`` as the timeout; no asyncio. Every wake-up
reads the adverts waiting in the socket first, at their kernel receive times, then acts
on the timer if it is due, then on the director's messages. One input at a time:
the FSM decides, then :meth:`Election.execute` carries out, in the FSM's order, what
ends a client's outage (the delivery flip, the first announcement frames, the advert)
and passes every other action up the channel, in order, as one :class:`Step`.

The channel is a ``socketpair(AF_UNIX, SOCK_SEQPACKET)``: one pickled message per
datagram, both ends the same code of the same process image (nothing else can write
to it). Down: :class:`Setup` (at start and on every reload) and the FSM's commands.
Up: :class:`Ready` or :class:`Failed` (after the first Setup), a :class:`Step` per
input that did something, a :class:`Snapshot` with every step and every 2 s (the
director's ``status``, metrics and watchdog read the latest).

The director's reconcile of the delivery rules must never undo a flip it has not yet
heard of: :class:`SharedFlags` (one shared page, written by this process before each
flip) is what its delivery pass reads as the wanted delivery, after it has read the
rules (dataplane/reconcile.py).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..announce.burst import send_frames
from ..announce.link import packet_socket
from ..config import Config
from ..dataplane.desired import RuleSpec
from ..dataplane.rules import RuleFlipper
from ..sched import RESET_ON_FORK
from ..telemetry import AdvertCounters, AnnounceKind, RejectReason, TransportCounters
from . import fsm
from .protocol import Advert, AdvertDecoder, AdvertRejected, State, encode_advert, next_counter
from .transport import SO_RCVBUFFORCE, AdvertTransport
from .trust import KeyRing, PeerTrouble

#: the master-down timer wakes this early, then spins to the exact time (epoll rounds
#: its timeout up to the next millisecond)
PRECISE_LEAD_S = 0.002
#: a snapshot goes up at least this often (the director's watchdog checks its age)
SNAPSHOT_PERIOD_S = 2.0
#: the channel's buffers: a Setup carries the flip's rules and the lead frames
CHANNEL_BUFFER = 4 << 20
#: how long the election process waits for a full channel to take its last messages
EXIT_FLUSH_S = 1.0
PR_SET_PDEATHSIG = 1
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


# ---------------------------------------------------------------------------
# messages


@dataclass(frozen=True)
class Setup:
    """Director -> election: what a reload may change, and what the takeover needs."""

    keys: tuple[bytes, ...]
    max_clock_skew_ms: int
    flip_rules: tuple[RuleSpec, ...]
    #: the first announcement frames, per kind (Announcer.lead_frames)
    lead: tuple[tuple[AnnounceKind, tuple[bytes, ...]], ...] = ()


@dataclass(frozen=True)
class SnapshotRequest:
    """Director -> election: send a snapshot now (status of a control client, a scrape)."""


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Flipped:
    """The delivery flip done for an InstallDelivery/WithdrawDelivery action."""

    on: bool
    at: float  # time.monotonic() when it returned
    results: tuple[tuple[RuleSpec, int | None], ...]
    took_ms: float


@dataclass(frozen=True)
class LeadSent:
    """The first frames of a StartAnnounce, sent by the election process."""

    sent: dict[AnnounceKind, int]
    first_at: float | None


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    status: dict[str, Any]  # Election.status(at)
    sent: int
    received: int
    rejected: dict[RejectReason, int]
    transport: TransportCounters
    keys: dict[str, Any]
    cpu_s: float = 0.0  # the election process's own CPU time
    rss_bytes: int = 0  # and its resident memory
    #: the longest time between two master adverts it sent, as it saw it (ms): what the
    #: process did, apart from what the network path to the peers added
    worst_master_gap_ms: float = 0.0

    @property
    def adverts(self) -> AdvertCounters:
        return AdvertCounters(sent=self.sent, received=self.received, rejected=self.rejected)


@dataclass(frozen=True)
class Step:
    """What one input made the FSM do that the director carries on with, in order.
    ``done`` maps an action's index in ``actions`` to what this process did for it."""

    actions: tuple[fsm.Action, ...]
    decided_wall: float
    decided_mono: float
    done: dict[int, Flipped | LeadSent] = field(default_factory=dict)
    snapshot: Snapshot | None = None


# ---------------------------------------------------------------------------
# shared flags


class SharedFlags:
    """One shared anonymous page, made before the fork: what the election process last
    decided, for the director to read without a message. ``delivery``: None (not yet
    decided), False, True. ``announce``: whether announcing is allowed."""

    _DELIVERY, _ANNOUNCE = 0, 1

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
        self._page[self._DELIVERY] = 0
        self._page[self._ANNOUNCE] = 0

    @property
    def delivery(self) -> bool | None:
        return {0: None, 1: False, 2: True}[self._page[self._DELIVERY]]

    @delivery.setter
    def delivery(self, on: bool) -> None:
        self._page[self._DELIVERY] = 2 if on else 1

    @property
    def announce(self) -> bool:
        return self._page[self._ANNOUNCE] == 1

    @announce.setter
    def announce(self, on: bool) -> None:
        self._page[self._ANNOUNCE] = 1 if on else 0


# ---------------------------------------------------------------------------
# the channel


class Channel:
    """One end of the SEQPACKET socketpair: pickled messages, never blocking on send
    (what does not fit waits in order and goes on :meth:`flush`)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        for opt, force in ((socket.SO_SNDBUF, SO_SNDBUFFORCE), (socket.SO_RCVBUF, SO_RCVBUFFORCE)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, CHANNEL_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, CHANNEL_BUFFER)
        self._out: deque[bytes] = deque()
        self._buf = bytearray(CHANNEL_BUFFER)
        self.closed = False

    @classmethod
    def pair(cls) -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any) -> None:
        self._out.append(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        self.flush()

    def flush(self) -> bool:
        """Send what waits; True when nothing is left."""
        while self._out:
            try:
                self.sock.send(self._out[0])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # the other end is gone: nothing to deliver to
                self._out.clear()
                self.closed = True
                return True
            self._out.popleft()
        return True

    @property
    def pending(self) -> bool:
        return bool(self._out)

    def receive(self) -> list[Any] | None:
        """Every message waiting (maybe none); None when the other end has closed."""
        out: list[Any] = []
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                n = 0
            if not n:
                self.closed = True
                return out or None
            out.append(pickle.loads(memoryview(self._buf)[:n]))  # our own process image at the other end

    def receive_one(self, timeout: float) -> Any:
        """The next message, waiting at most ``timeout`` seconds; None if none came."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        got = self.receive()
        return got[0] if got else None

    def close(self) -> None:
        self.closed = True
        self.sock.close()


# ---------------------------------------------------------------------------
# the election process


class Election:
    """The loop of the election process (see the module doc)."""

    def __init__(self, cfg: Config, digest: bytes, channel: Channel, flags: SharedFlags, log: Any,
                 setup: Setup, clock: Callable[[], float] = time.monotonic):
        """``clock``: the time every decision is taken at (time.monotonic, the transport's
        and asyncio's clock; tests set it by hand)."""
        self.clock = clock
        self.cfg = cfg
        self.digest = digest
        self.chan = channel
        self.flags = flags
        self.log = log
        self.fsm = fsm.Election(fsm.Params.from_config(cfg, digest))
        self.keys = KeyRing(setup.keys)
        self.decoder = AdvertDecoder(setup.keys, cfg.election.cluster_id,
                                     max_skew_us=setup.max_clock_skew_ms * 1000)
        self.trouble = PeerTrouble(cfg.election.peers)
        self.transport: AdvertTransport | None = None
        self.flipper: RuleFlipper | None = None
        self.flip_rules: tuple[RuleSpec, ...] = ()
        self.lead: tuple[tuple[AnnounceKind, tuple[bytes, ...]], ...] = ()
        self.packet: socket.socket | None = None
        self.counter = 0
        self.sent = 0
        self.received = 0
        self.rejected: Counter[RejectReason] = Counter()
        self.inputs: deque[tuple[str, Any, Any, float | None]] = deque()
        self._fsm_now = 0.0
        self._next_snapshot = 0.0
        self._decided = (time.time(), self.clock())
        self.exit: fsm.Exit | None = None
        self._last_master_sent: float | None = None
        self.worst_master_gap_s = 0.0
        self.apply(setup)

    # -- set-up ------------------------------------------------------------------

    def apply(self, setup: Setup) -> None:
        """A Setup: keys and replay window (a rotation signs with the new key from the
        next advert on), the flip's rules, the lead frames."""
        self.decoder.set_window(setup.max_clock_skew_ms * 1000)
        if setup.keys != self.keys.keys:
            self.keys = KeyRing(setup.keys)
            self.decoder.set_keys(setup.keys)
        self.flip_rules = setup.flip_rules
        self.lead = setup.lead
        if self.lead and self.packet is None:
            self.packet = packet_socket(self.cfg.node.interface, 0, None)

    def open(self) -> None:
        self.flipper = RuleFlipper()
        self.transport = AdvertTransport.open_blocking(self.cfg, self._on_datagram, logger=self.log)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.flipper is not None:
            self.flipper.close()
        if self.packet is not None:
            self.packet.close()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        assert self.transport is not None
        ep = select.epoll()
        ep.register(self.transport.fileno(), select.EPOLLIN)
        ep.register(self.chan.fileno(), select.EPOLLIN)
        chan_fd = self.chan.fileno()
        try:
            while self.exit is None and not self.chan.closed:
                deadline = self.fsm.next_deadline()
                precise = deadline is not None and deadline == self.fsm.master_down_at
                wake = self._next_snapshot
                if deadline is not None:
                    wake = min(wake, deadline - PRECISE_LEAD_S if precise else deadline)
                events = ep.poll(max(0.0, wake - self.clock()))
                if self.chan.pending:
                    self.chan.flush()
                # adverts first, at their kernel receive times: after a pause, the adverts
                # that waited in the socket come before a timer that expired meanwhile
                self._read_adverts()
                self._timer()
                if any(fd == chan_fd for fd, _ in events):
                    self._read_channel()
                if self.clock() >= self._next_snapshot and self.exit is None:
                    if self.chan.pending:  # the director is behind: no more of these queued
                        self._next_snapshot = self.clock() + SNAPSHOT_PERIOD_S
                    else:
                        self.chan.send(self.snapshot())
        finally:
            ep.close()

    def _read_adverts(self) -> None:
        assert self.transport is not None
        self.transport.drain()
        self._process()

    def _timer(self) -> None:
        deadline = self.fsm.next_deadline()
        if deadline is None:
            return
        if deadline == self.fsm.master_down_at and 0 < deadline - self.clock() <= PRECISE_LEAD_S:
            # the takeover's timer: spin the rest (a sleep overshoots by the timer slack
            # and a wake-up, and the takeover then runs on a cold CPU), then read what
            # came meanwhile
            while self.clock() < deadline:
                pass
            self._read_adverts()
            deadline = self.fsm.next_deadline()
        if deadline is not None and self.clock() >= deadline:
            self._input("timer", None)

    def _read_channel(self) -> None:
        messages = self.chan.receive()
        for m in messages or ():
            if isinstance(m, SnapshotRequest):
                self.chan.send(self.snapshot())
            elif isinstance(m, Setup):
                try:
                    self.apply(m)
                except OSError as exc:
                    self.log.error("election_setup_failed", error=str(exc))
            else:
                self._read_adverts()  # what came before the command goes first
                self._input("command", m)

    # -- inputs ----------------------------------------------------------------------

    def _on_datagram(self, data: bytes, src: Any, rx_time: float) -> None:
        self.received += 1
        rx_wall_us = int((time.time() - max(0.0, self.clock() - rx_time)) * 1e6)
        try:
            msg = self.decoder.decode(data, rx_wall_us)
        except AdvertRejected as exc:
            self.rejected[exc.reason] += 1
            if self.rejected[exc.reason] in (1, 10, 100, 1000) or self.rejected[exc.reason] % 10000 == 0:
                self.log.warning("advert_rejected", reason=exc.reason, src=str(src), detail=exc.detail,
                                 count=self.rejected[exc.reason])
            kind = self.trouble.notice(exc.reason, src, self.clock())
            if kind is not None:  # a peer's address: a key or a clock that differs splits the brain
                self._send_step([fsm.Notice(kind, str(src), exc.detail)], {})
            return
        if msg.node == self.cfg.node.name:
            return
        self.trouble.learn(src)
        if msg.config_digest != self.digest:
            self.rejected[RejectReason.CONFIG_DIGEST_MISMATCH] += 1  # reported, not fatal
        self.inputs.append(("advert", msg, src, rx_time))

    def _input(self, kind: str, payload: Any) -> None:
        self.inputs.append((kind, payload, None, None))
        self._process()

    def _process(self) -> None:
        while self.inputs:
            kind, payload, src, at = self.inputs.popleft()
            try:
                self.execute(self._decide(kind, payload, src, at))
            except Exception:  # a bug must not stop the election: log it, go on
                self.log.exception("internal_error")

    def _decide(self, kind: str, payload: Any, src: Any, at: float | None) -> list[fsm.Action]:
        present = self.clock()
        # an advert at its arrival time (inputs reach the election in arrival order, so
        # this only moves forward), everything else at the present
        now = max(self._fsm_now, present if at is None else min(at, present))
        self._fsm_now = now
        self._decided = (time.time(), self.clock())
        try:
            if kind == "advert":
                return self.fsm.handle_advert(payload, src, now, handled_at=present)
            if kind == "timer":
                deadline = self.fsm.next_deadline()
                if deadline is None or deadline > now:
                    return []  # the adverts read before it moved the deadline on
                return self.fsm.handle_timer(now)
            return self.fsm.handle_command(payload, now)
        except fsm.LocalError as exc:
            self.log.error("election_misuse", error=str(exc))
            return []

    # -- actions -------------------------------------------------------------------------

    def execute(self, actions: list[fsm.Action]) -> None:
        """Carry out ``actions`` in order; what ends a client's outage first: a takeover's
        flip and first frames before the rest of its step. The rest goes up as one Step."""
        done: dict[int, Flipped | LeadSent] = {}
        flip = next((i for i, a in enumerate(actions) if isinstance(a, fsm.InstallDelivery)), None)
        if flip is not None:  # a takeover: its flip, then its first frames
            done[flip] = self._flip(True)
            lead = next((i for i, a in enumerate(actions) if isinstance(a, fsm.StartAnnounce)), None)
            if lead is not None:
                done[lead] = self._lead()
        up: list[fsm.Action] = []
        up_done: dict[int, Flipped | LeadSent] = {}
        for i, a in enumerate(actions):
            match a:
                case fsm.SendAdvert():
                    self._send(a)
                    continue
                case fsm.InstallDelivery() if i not in done:
                    done[i] = self._flip(True)
                case fsm.WithdrawDelivery():
                    done[i] = self._flip(False)
                case fsm.StartAnnounce() if i not in done:
                    done[i] = self._lead()
                case fsm.StopAnnounce():
                    self.flags.announce = False
                case fsm.Exit():
                    self.exit = a
            if i in done:
                up_done[len(up)] = done[i]
            up.append(a)
        if up:
            self._send_step(up, up_done)

    def _send_step(self, actions: list[fsm.Action], done: dict[int, Flipped | LeadSent]) -> None:
        wall, mono = self._decided
        self.chan.send(Step(tuple(actions), wall, mono, done, self.snapshot()))

    def _flip(self, on: bool) -> Flipped:
        self.flags.delivery = on  # before the flip: the director's pass reads it after the rules
        t0 = time.perf_counter()
        assert self.flipper is not None
        try:
            results = tuple(self.flipper.flip(self.flip_rules, on)) if self.flip_rules else ()
        except OSError as exc:
            results = tuple((rule, exc.errno or -1) for rule in self.flip_rules)
        return Flipped(on, self.clock(), results, (time.perf_counter() - t0) * 1000)

    def _lead(self) -> LeadSent:
        self.flags.announce = True
        if self.packet is None:
            return LeadSent({}, None)
        return LeadSent(*send_frames(self.packet, self.lead))

    def _send(self, action: fsm.SendAdvert) -> None:
        if self.transport is None:
            return
        self.counter = next_counter(self.counter, time.time_ns() // 1000)
        msg = Advert(cluster_id=self.cfg.election.cluster_id, node=self.cfg.node.name,
                     address=self.cfg.node.address, priority=action.priority,
                     advert_interval_ms=self.cfg.election.advert_interval_ms, state=action.state,
                     flags=action.flags, successor=action.successor, hold_ms=action.hold_ms,
                     counter=self.counter, config_digest=self.digest)
        self.transport.send(encode_advert(msg, self.keys.signing))
        self.sent += 1
        if action.state is State.MASTER:
            now = self.clock()
            if self._last_master_sent is not None:
                self.worst_master_gap_s = max(self.worst_master_gap_s, now - self._last_master_sent)
            self._last_master_sent = now
        else:
            self._last_master_sent = None

    def snapshot(self) -> Snapshot:
        now = self.clock()
        self._next_snapshot = now + SNAPSHOT_PERIOD_S
        transport = self.transport.counters() if self.transport is not None else TransportCounters()
        return Snapshot(now, self.fsm.status(now), self.sent, self.received, dict(self.rejected),
                        transport, self.keys.describe(self.decoder.key_used), time.process_time(), _rss_bytes(),
                        round(self.worst_master_gap_s * 1000, 3))


def _rss_bytes() -> int:
    """This process's resident memory (0 if /proc cannot say)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------------------
# fork


@dataclass
class ElectionProcess:
    """The director's handle on the election process."""

    pid: int
    channel: Channel
    flags: SharedFlags

    def wait(self, timeout: float) -> int | None:
        """Reap it: its exit status, or None if it has not exited within ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return 0
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= end:
                return None
            time.sleep(0.01)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(2.0)


def fork(cfg: Config, digest: bytes, log: Any) -> ElectionProcess:
    """Fork the election process (before any thread or event loop runs here: a fork
    after threads have started is unsafe). The child never returns. This process then
    lowers its own real-time priority below the election's (:func:`lower_director`)."""
    parent_end, child_end = Channel.pair()
    flags = SharedFlags()
    parent_pid = os.getpid()
    sys.stdout.flush()  # what the director wrote must not be written twice
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the election process
        code = 70
        try:
            parent_end.close()
            code = _child_main(Channel(child_end), flags, parent_pid, cfg, digest, log.bind(process="election"))
        except BaseException:  # noqa: BLE001 - never return into the director's code
            try:
                log.exception("election_process_failed")
            finally:
                code = 70
        finally:
            sys.stdout.flush()
            os._exit(code)
    child_end.close()
    lower_director()
    return ElectionProcess(pid, Channel(parent_end), flags)


def _child_main(chan: Channel, flags: SharedFlags, parent_pid: int, cfg: Config, digest: bytes,
                log: Any) -> int:
    # an election that outlives its director would advertise with nobody reconciling,
    # and its peer would never take over
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the director's to handle
        signal.signal(sig, signal.SIG_IGN)
    gc.freeze()  # what the director built before the fork is not ours to scan
    first = chan.receive_one(timeout=3600.0)
    while first is None and not chan.closed:
        first = chan.receive_one(timeout=3600.0)
    if not isinstance(first, Setup):
        return 1
    try:
        election = Election(cfg, digest, chan, flags, log, first)
    except OSError as exc:
        chan.send(Failed(str(exc)))
        return 1
    try:
        election.open()
    except OSError as exc:
        chan.send(Failed(str(exc)))
        election.close()
        return 1
    chan.send(Ready(os.getpid()))
    chan.send(election.snapshot())
    try:
        election.run()
    finally:
        end = time.monotonic() + EXIT_FLUSH_S
        while not chan.flush() and time.monotonic() < end:
            time.sleep(0.005)
        election.close()
    return 0


#: the director runs this much below the election's real-time priority (at least 1)
DIRECTOR_BELOW = 5


def lower_director() -> None:
    """The director (everything but the election) at a lower real-time priority than
    the election process, which it can then never preempt; at normal priority, as it is."""
    policy = os.sched_getscheduler(0) & ~RESET_ON_FORK
    if policy not in (os.SCHED_RR, os.SCHED_FIFO):
        return
    prio = os.sched_getparam(0).sched_priority
    lower = max(1, prio - DIRECTOR_BELOW)
    if lower != prio:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(lower))
        except OSError:
            pass


__all__ = ["Channel", "Election", "ElectionProcess", "Failed", "Flipped", "LeadSent", "Ready", "Setup",
           "SharedFlags", "Snapshot", "SnapshotRequest", "Step", "fork", "lower_director"]
