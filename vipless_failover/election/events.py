"""Wire-neutral inputs of the election: what the FSM reads of a peer's advert.

The FSM decides on a :class:`PeerAdvert`, never on a codec's message: a codec (ours,
:mod:`.protocol`; a VRRPv3 one later) turns what it decoded and authenticated into a
``PeerAdvert``, and the election needs no change. A field the other protocol does not
carry takes its default (no hand-over, no takeover request, not restarting).

Pure: no sockets, no clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .protocol import Flag, State

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .protocol import Advert

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class PeerAdvert:
    """One peer's advert, as the election reads it."""

    node: str  # the sender's node name
    address: IPAddress  # the sender's node address (its tie-breaker at equal priority)
    priority: int  # 0..255; 0: the sender is leaving (VRRP)
    state: State  # the state the sender advertises
    advert_interval_ms: int  # the sender's advert interval (0: unknown, use ours)
    config_digest: bytes  # the sender's shared-config digest (compared with ours)
    #: the sender (the master) hands mastership to ``successor`` now
    handover: bool = False
    #: the sender asks the master to hand over to it (promote or preempt)
    takeover_request: bool = False
    #: the sender (the master) restarts in place: hold the master-down timer ``hold_ms``
    restarting: bool = False
    successor: str = ""  # the node a hand-over or takeover request names ("" none)
    hold_ms: int = 0  # with ``restarting``: how long to hold

    @classmethod
    def from_advert(cls, advert: Advert) -> PeerAdvert:
        """What the election reads of a decoded :class:`~.protocol.Advert`."""
        flags = advert.flags
        return cls(node=advert.node, address=advert.address, priority=advert.priority, state=advert.state,
                   advert_interval_ms=advert.advert_interval_ms, config_digest=advert.config_digest,
                   handover=bool(flags & Flag.HANDOVER), takeover_request=bool(flags & Flag.TAKEOVER_REQUEST),
                   restarting=bool(flags & Flag.RESTARTING), successor=advert.successor, hold_ms=advert.hold_ms)


__all__ = ["PeerAdvert"]
