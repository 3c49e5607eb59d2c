"""Wire protocol of the election: a versioned, HMAC-SHA256-authenticated advert.

Pure: no sockets, no clock. ``encode_advert`` turns an :class:`Advert` into bytes;
:class:`AdvertDecoder` accepts only well-formed, authentic, fresh messages and raises
:class:`AdvertRejected` (with a ``reason``) for anything else.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

PROTOCOL_VERSION = 1


class State(enum.IntEnum):
    INIT = 0
    BACKUP = 1
    MASTER = 2
    FAULT = 3


class Flag(enum.IntFlag):
    NONE = 0
    #: the sender (current master) hands mastership to ``successor`` now; it is
    #: draining and no longer announcing
    HANDOVER = 0x01
    #: the sender asks the current master to hand over to it (promote / preempt)
    TAKEOVER_REQUEST = 0x02
    #: the sender (master) is restarting in place; peers hold their master-down
    #: timer for ``hold_ms``
    RESTARTING = 0x04
    #: the sender is stopping (graceful stop); with priority 0 like VRRP
    STOPPING = 0x08


@dataclass(frozen=True)
class Advert:
    cluster_id: int  # 1..255
    node: str  # sender's node name, 1..32 bytes UTF-8
    address: ipaddress.IPv4Address | ipaddress.IPv6Address  # sender's node address
    priority: int  # 0..255 (0: leaving)
    advert_interval_ms: int  # 1..65535
    state: State
    flags: Flag = Flag.NONE
    successor: str = ""  # HANDOVER/TAKEOVER_REQUEST target node name ("" none), <= 32 bytes
    hold_ms: int = 0  # RESTARTING: how long peers wait, 0..2**32-1
    counter: int = 0  # 0..2**64-1, strictly increasing per sender (replay protection)
    config_digest: bytes = b"\x00" * 16  # first 16 bytes of Config.shared_digest()


class AdvertRejected(Exception):
    """A received message that is dropped (and counted by ``reason``)."""

    REASONS = ("malformed", "version", "auth", "replay", "cluster")

    def __init__(self, reason: str, detail: str = ""):
        assert reason in self.REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
