"""Typed telemetry: the names counters are kept under, and one frozen snapshot per part.

Pure: no Prometheus, no I/O. The code that counts uses the enums below (a notice's
kind, an advert's rejection reason, an announcement's kind, a hook's result, a control
limit); each part's ``counters()`` returns its snapshot dataclass. The daemon's status
JSON (``failoverctl status``) is made of their :meth:`as_dict`, and the metrics
(metrics.py) read their attributes and iterate the enums for label values: a counter
renamed in one place fails mypy and the tests instead of exporting 0.

The enums are :class:`enum.StrEnum`: a member is its value (``NoticeKind.SPLIT_BRAIN ==
"split_brain"``, same hash), so logs, JSON and label values carry the same strings as
before.

Every mapping of a snapshot is keyed by its enum and has every member: first those
given, in their order (the order they were first counted: the status JSON keeps it),
then those never counted, at 0. A key that is no member raises ValueError. The
mappings are read-only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar


class NoticeKind(enum.StrEnum):
    """Election notices: a log line (the kind is its event name) and a metric. The FSM
    raises all but the last two; the daemon raises those for adverts a peer's address
    sent that were refused (election/trust.py)."""

    SPLIT_BRAIN = "split_brain"
    CONFIG_MISMATCH = "config_mismatch"
    MASTER_DOWN = "master_down"
    TAKEOVER_REQUEST = "takeover_request"
    HANDOVER = "handover"
    DRAIN_DONE = "drain_done"
    PEER_RESTARTING = "peer_restarting"
    #: an offer to us that no longer stood when we could take it
    STALE_HANDOVER = "stale_handover"
    #: our successor never answered: we are master again
    HANDOVER_FAILED = "handover_failed"
    #: a peer's advert failed authentication (a key that differs)
    AUTH_FAILED = "auth_failed"
    #: a peer's advert was out of the replay window (a clock that differs)
    CLOCK_SKEW = "clock_skew"


class RejectReason(enum.StrEnum):
    """Why a received advert was dropped (``AdvertRejected.reason``, all but the last),
    or, for ``config_digest_mismatch``, reported: an authentic advert whose shared
    config digest differs from ours is counted by the daemon, and still handled."""

    MALFORMED = "malformed"
    VERSION = "version"
    AUTH = "auth"
    REPLAY = "replay"
    CLUSTER = "cluster"
    STALE = "stale"
    FUTURE = "future"
    CONFIG_DIGEST_MISMATCH = "config_digest_mismatch"


class AnnounceKind(enum.StrEnum):
    """Announcement frames, by kind (the metric's label is ``mode``)."""

    GARP = "garp"
    NA = "na"
    NEXT_HOP = "next_hop"


class NotifyResult(enum.StrEnum):
    """The result of one notify hook call (``dropped``: never run, its queue was full)."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    ERROR = "error"
    DROPPED = "dropped"


class ControlLimit(enum.StrEnum):
    """A control connection or request cut short by a limit (control.py)."""

    TOO_MANY_CLIENTS = "too_many_clients"
    IDLE_TIMEOUT = "idle_timeout"
    REQUEST_TOO_LARGE = "request_too_large"
    SLOW_READER = "slow_reader"
    BAD_REQUEST = "bad_request"
    INTERNAL_ERROR = "internal_error"


E = TypeVar("E", bound=enum.StrEnum)


def complete(kind: type[E], counts: Mapping[E, int]) -> Mapping[E, int]:
    """``counts`` keyed by the members of ``kind``, every member present (see the
    module docstring); read-only. Raises ValueError for a key that is no member."""
    out: dict[E, int] = {kind(k): n for k, n in counts.items()}
    for member in kind:
        out.setdefault(member, 0)
    return MappingProxyType(out)


def _all(counts: Mapping[E, int]) -> dict[str, int]:
    """For JSON: every member, by value."""
    return {k.value: n for k, n in counts.items()}


def _counted(counts: Mapping[E, int]) -> dict[str, int]:
    """For JSON: the members counted at least once, by value."""
    return {k.value: n for k, n in counts.items() if n}


def _ints(snapshot: Any) -> dict[str, int]:
    """For JSON: a snapshot of plain counters, field by field."""
    return {f.name: getattr(snapshot, f.name) for f in fields(snapshot)}


@dataclass(frozen=True)
class AdvertCounters:
    """The daemon's adverts. Status: ``adverts`` (``rejected``: the reasons counted at
    least once)."""

    sent: int = 0
    received: int = 0  # datagrams the transport handed over, whatever became of them
    rejected: Mapping[RejectReason, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rejected", complete(RejectReason, self.rejected))

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "received": self.received, "rejected": _counted(self.rejected)}


@dataclass(frozen=True)
class NoticeCounters:
    """Election notices by kind. Status: ``notices`` (the kinds counted at least once)."""

    counts: Mapping[NoticeKind, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", complete(NoticeKind, self.counts))

    def as_dict(self) -> dict[str, int]:
        return _counted(self.counts)


@dataclass(frozen=True)
class ReconcileCounters:
    """The data plane's reconciles. Status: ``dataplane.reconcile`` (beside its
    ``last_error``)."""

    runs: int = 0
    operations: int = 0  # kernel operations applied
    errors: int = 0
    drift_repairs: int = 0  # passes that repaired a change made by someone else

    def as_dict(self) -> dict[str, int]:
        return _ints(self)


@dataclass(frozen=True)
class AnnounceCounters:
    """Announcement frames sent by kind, and bursts. Status: ``announce``'s
    ``announcements_sent`` and ``bursts``."""

    sent: Mapping[AnnounceKind, int] = field(default_factory=dict)
    bursts: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sent", complete(AnnounceKind, self.sent))

    def as_dict(self) -> dict[str, Any]:
        return {"announcements_sent": _all(self.sent), "bursts": self.bursts}


@dataclass(frozen=True)
class NotifyCounters:
    """Notify hook calls by result. Status: ``notify.results``."""

    results: Mapping[NotifyResult, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "results", complete(NotifyResult, self.results))

    def as_dict(self) -> dict[str, Any]:
        return {"results": _all(self.results)}


@dataclass(frozen=True)
class ControlCounters:
    """The control socket. Status: ``control``."""

    refused: int = 0  # requests not allowed for the caller
    clients: int = 0  # connections open now (a gauge)
    rejected: Mapping[ControlLimit, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rejected", complete(ControlLimit, self.rejected))

    def as_dict(self) -> dict[str, Any]:
        return {"refused": self.refused, "clients": self.clients, "rejected": _all(self.rejected)}


@dataclass(frozen=True)
class MetricsServerCounters:
    """The metrics listener. Status: ``metrics`` (beside ``listen``)."""

    scrapes: int = 0
    renders: int = 0
    busy: int = 0  # connections closed unread: the listener was serving its maximum

    def as_dict(self) -> dict[str, int]:
        return _ints(self)


@dataclass(frozen=True)
class TransportCounters:
    """The election transport's datagrams. Status: ``transport``."""

    sent: int = 0
    send_errors: int = 0
    received: int = 0
    ttl_drops: int = 0
    foreign_drops: int = 0
    oversize_drops: int = 0
    recv_errors: int = 0
    callback_errors: int = 0
    drained: int = 0  # read by drain() rather than by the reader

    def as_dict(self) -> dict[str, int]:
        return _ints(self)


@dataclass(frozen=True)
class DaemonCounters:
    """Every part's counters at one moment: what the metrics read (``Daemon.counters()``)."""

    adverts: AdvertCounters = field(default_factory=AdvertCounters)
    notices: NoticeCounters = field(default_factory=NoticeCounters)
    reconcile: ReconcileCounters = field(default_factory=ReconcileCounters)
    announce: AnnounceCounters = field(default_factory=AnnounceCounters)
    notify: NotifyCounters = field(default_factory=NotifyCounters)
    control: ControlCounters = field(default_factory=ControlCounters)
    metrics: MetricsServerCounters = field(default_factory=MetricsServerCounters)
    transport: TransportCounters = field(default_factory=TransportCounters)


__all__ = [
    "AdvertCounters", "AnnounceCounters", "AnnounceKind", "ControlCounters", "ControlLimit", "DaemonCounters",
    "MetricsServerCounters", "NoticeCounters", "NoticeKind", "NotifyCounters", "NotifyResult", "ReconcileCounters",
    "RejectReason", "TransportCounters", "complete",
]
