"""IPVS desired state and the plan of operations (pure: no I/O; no root or IPVS needed).

- :func:`desired_ipvs` turns the config into an :class:`IpvsState` (the same on master
  and backup: warm standby);
- :func:`diff_ipvs` compares a desired with an actual state and returns the minimal,
  ordered list of :data:`IpvsOp` (changing one real server's weight is one
  :class:`EditDest`; changing a scheduler is one :class:`EditService`, so the
  connections of the service survive).

ipvs.py reads the kernel's fwmark services into an :class:`IpvsState` and applies the
operations through generic netlink; desired.py holds the other desired kernel state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from vipless_failover.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Kernel forwarding methods (IP_VS_CONN_F_*): masquerading, tunnel, direct routing.
FWD_NAT = 0
FWD_TUN = 2
FWD_DR = 3
FORWARD_METHOD = {"nat": FWD_NAT, "tun": FWD_TUN, "dr": FWD_DR}
FORWARD_NAME = {v: k for k, v in FORWARD_METHOD.items()}

#: Kernel service flags (IP_VS_SVC_F_*).
SVC_F_PERSISTENT = 0x0001
SVC_F_HASHED = 0x0002  # kernel-internal: set on every live service, never compared
SVC_F_ONEPACKET = 0x0004
SVC_F_SCHED1 = 0x0008
SVC_F_SCHED2 = 0x0010
SVC_F_SCHED3 = 0x0020
#: Config flag name -> kernel bit (sh/mh share the scheduler-private bits, like ipvsadm).
SERVICE_FLAG_BITS = {
    "persistent": SVC_F_PERSISTENT,
    "hashed": SVC_F_HASHED,
    "onepacket": SVC_F_ONEPACKET,
    "sh-fallback": SVC_F_SCHED1,
    "sh-port": SVC_F_SCHED2,
    "mh-fallback": SVC_F_SCHED1,
    "mh-port": SVC_F_SCHED2,
}
#: Flags we set and compare (HASHED is the kernel's bookkeeping).
MANAGED_FLAGS = SVC_F_PERSISTENT | SVC_F_ONEPACKET | SVC_F_SCHED1 | SVC_F_SCHED2 | SVC_F_SCHED3
#: ipvsadm's default persistence when ``-p`` is given without a timeout.
DEFAULT_PERSISTENCE_S = 300

#: (family 4|6, fwmark): the identity of one fwmark virtual service.
ServiceKey = tuple[int, int]
#: (address, port): the identity of one real server within a service.
DestKey = tuple[IPAddress, int]


# ---------------------------------------------------------------------------
# model


@dataclass(frozen=True, order=True)
class IpvsDest:
    """One real server of a service, as the kernel knows it."""

    address: IPAddress
    port: int = 0
    weight: int = 1
    forward: int = FWD_DR  # IP_VS_CONN_F_*: 0 nat, 2 tun, 3 dr

    @property
    def key(self) -> DestKey:
        return (self.address, self.port)

    def __str__(self) -> str:
        fwd = FORWARD_NAME.get(self.forward, str(self.forward))
        addr = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{addr}:{self.port} {fwd} weight {self.weight}"


@dataclass(frozen=True)
class IpvsServiceState:
    """One fwmark virtual service and its real servers (sorted by key)."""

    family: int  # 4 | 6
    fwmark: int
    scheduler: str = "wlc"
    timeout: int = 0  # persistence timeout, seconds
    flags: int = 0  # IP_VS_SVC_F_* within MANAGED_FLAGS
    netmask: int = 32  # prefix length: 32 (v4) or 128 (v6) for per-address persistence
    dests: tuple[IpvsDest, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dests", tuple(sorted(self.dests, key=_dest_sort_key)))
        object.__setattr__(self, "flags", self.flags & MANAGED_FLAGS)

    @property
    def key(self) -> ServiceKey:
        return (self.family, self.fwmark)

    def attrs(self) -> tuple[str, int, int, int]:
        """The editable attributes (what an EditService changes)."""
        return (self.scheduler, self.timeout, self.flags, self.netmask)

    def dest_map(self) -> dict[DestKey, IpvsDest]:
        return {d.key: d for d in self.dests}

    def without_dests(self) -> IpvsServiceState:
        return IpvsServiceState(self.family, self.fwmark, self.scheduler, self.timeout,
                                self.flags, self.netmask, ())

    def __str__(self) -> str:
        fam = "inet" if self.family == 4 else "inet6"
        extra = f" persistent {self.timeout}" if self.flags & SVC_F_PERSISTENT else ""
        return f"fwmark {self.fwmark} {fam} {self.scheduler}{extra}"


def _dest_sort_key(d: IpvsDest) -> tuple[int, int, int]:
    return (d.address.version, int(d.address), d.port)


@dataclass(frozen=True)
class IpvsState:
    """A set of fwmark services keyed by (family, fwmark)."""

    services: Mapping[ServiceKey, IpvsServiceState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services",
                           MappingProxyType(dict(sorted(dict(self.services).items()))))

    @classmethod
    def of(cls, services: Iterable[IpvsServiceState]) -> IpvsState:
        out: dict[ServiceKey, IpvsServiceState] = {}
        for svc in services:
            if svc.key in out:
                raise ValueError(f"duplicate IPVS service {svc}")
            out[svc.key] = svc
        return cls(out)

    def keys(self) -> frozenset[ServiceKey]:
        return frozenset(self.services)

    def only(self, keys: Iterable[ServiceKey]) -> IpvsState:
        wanted = set(keys)
        return IpvsState({k: v for k, v in self.services.items() if k in wanted})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IpvsState) and dict(self.services) == dict(other.services)

    def __hash__(self) -> int:  # pragma: no cover - states are not used as keys
        return hash(tuple(self.services.items()))

    def __len__(self) -> int:
        return len(self.services)


# ---------------------------------------------------------------------------
# operations


@dataclass(frozen=True)
class AddService:
    service: IpvsServiceState  # dests are added by AddDest ops

    def __str__(self) -> str:
        return f"add service {self.service}"


@dataclass(frozen=True)
class EditService:
    service: IpvsServiceState
    before: IpvsServiceState

    def __str__(self) -> str:
        return f"edit service {self.before} -> {self.service}"


@dataclass(frozen=True)
class DeleteService:
    service: IpvsServiceState  # its dests go with it

    def __str__(self) -> str:
        return f"delete service {self.service}"


@dataclass(frozen=True)
class AddDest:
    service: ServiceKey
    dest: IpvsDest

    def __str__(self) -> str:
        return f"add real {self.dest} to {_key_str(self.service)}"


@dataclass(frozen=True)
class EditDest:
    service: ServiceKey
    dest: IpvsDest
    before: IpvsDest

    def __str__(self) -> str:
        return f"edit real {self.before} -> {self.dest} of {_key_str(self.service)}"


@dataclass(frozen=True)
class DeleteDest:
    service: ServiceKey
    dest: IpvsDest

    def __str__(self) -> str:
        return f"delete real {self.dest} from {_key_str(self.service)}"


IpvsOp = AddService | EditService | DeleteService | AddDest | EditDest | DeleteDest


def _key_str(key: ServiceKey) -> str:
    return f"fwmark {key[1]} {'inet' if key[0] == 4 else 'inet6'}"


# ---------------------------------------------------------------------------
# pure functions


def service_from_config(svc: Any) -> IpvsServiceState:
    """One ``config.IpvsService`` as the kernel state it should produce."""
    flags = 0
    for name in svc.flags:
        flags |= SERVICE_FLAG_BITS[name]
    timeout = svc.persistence_s
    if timeout > 0:
        flags |= SVC_F_PERSISTENT
    elif flags & SVC_F_PERSISTENT:
        timeout = DEFAULT_PERSISTENCE_S
    dests = tuple(IpvsDest(address=r.address, port=r.port, weight=r.weight,
                           forward=FORWARD_METHOD[r.forward]) for r in svc.reals)
    return IpvsServiceState(family=svc.family, fwmark=svc.fwmark, scheduler=svc.scheduler,
                            timeout=timeout, flags=flags,
                            netmask=32 if svc.family == 4 else 128, dests=dests)


def desired_ipvs(cfg: Config) -> IpvsState:
    """The IPVS state the config asks for (the same on master and backup: warm standby)."""
    return IpvsState.of(service_from_config(s) for s in cfg.ipvs)


def diff_ipvs(desired: IpvsState, actual: IpvsState,
              owned: Iterable[ServiceKey] = ()) -> list[IpvsOp]:
    """Minimal ordered operations that turn ``actual`` into ``desired``.

    Services in ``actual`` that are not desired are deleted only if their key is in
    ``owned`` (our ownership record); any other service is someone else's and is
    left alone. A desired service already present is adopted and edited in place.
    Order: deletions of services first, then per desired service (sorted by key)
    add/edit the service, add new reals, edit changed reals, delete removed reals
    (adding before deleting keeps a service from being briefly empty).
    """
    owned_keys = set(owned)
    ops: list[IpvsOp] = []
    for key, stale in actual.services.items():
        if key not in desired.services and key in owned_keys:
            ops.append(DeleteService(stale.without_dests()))
    for key, want in desired.services.items():
        have = actual.services.get(key)
        if have is None:
            ops.append(AddService(want.without_dests()))
            ops.extend(AddDest(key, d) for d in want.dests)
            continue
        if want.attrs() != have.attrs():
            ops.append(EditService(want.without_dests(), have.without_dests()))
        have_dests = have.dest_map()
        want_dests = want.dest_map()
        ops.extend(AddDest(key, d) for k, d in want_dests.items() if k not in have_dests)
        ops.extend(EditDest(key, d, have_dests[k]) for k, d in want_dests.items()
                   if k in have_dests and have_dests[k] != d)
        ops.extend(DeleteDest(key, d) for k, d in have_dests.items() if k not in want_dests)
    return ops

