"""Wire protocol of the election: a versioned, HMAC-SHA256-authenticated advert.

Pure: no sockets, no clock. ``encode_advert`` turns an :class:`Advert` into bytes;
:class:`AdvertDecoder` accepts only well-formed, authentic, fresh messages and raises
:class:`AdvertRejected` (with a ``reason``) for anything else.

Wire format, version 1 (all integers unsigned, network byte order)::

    offset size  field
         0    2  magic b"VF"
         2    1  version (1)
         3    1  message type (1 = advert)
         4    1  cluster_id            1..255
         5    1  priority              0..255
         6    1  state                 State
         7    2  flags                 Flag bits
         9    2  advert_interval_ms    1..65535
        11    4  hold_ms
        15    8  counter
        23   16  config_digest
        39    1  address family        4 | 6
        40  4|16 address
         .    1  len(node)             1..32
         .    n  node name, UTF-8
         .    1  len(successor)        0..32
         .    n  successor name, UTF-8
         .   32  HMAC-SHA256(key, every byte before the tag)

A message is 79..154 bytes. Decoding checks, in order: magic and version (cheap),
the structural length (from the family and the two name lengths; pre-tag, so
unauthenticated garbage costs a few byte reads), the cluster id (a fixed byte, so
another cluster sharing the LAN is counted as ``cluster``, not as ``auth``), the HMAC
tag, then every field, then freshness.

Freshness (:class:`AdvertDecoder`) has two parts. A sender's counter is its wall clock
in microseconds (:func:`next_counter`), so a receiver with a clock in step (NTP)
accepts only counters within ``max_skew_us`` of its own clock: a replayed capture is
refused once it is that old, even by a receiver that has just started and remembers
nothing, and no authentic advert can push a sender's counter further ahead than that
(an advert stamped far in the future would otherwise block the sender's real ones).
Within the window, a counter must exceed the last one accepted from the same node.

Keys: a decoder verifies with any of its keys (the signing key first, then keys
still accepted during a rotation) and reports which one matched.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..telemetry import RejectReason

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

    #: the reasons a decoder drops a message for (config_digest_mismatch is the daemon's)
    REASONS = tuple(r for r in RejectReason if r is not RejectReason.CONFIG_DIGEST_MISMATCH)

    def __init__(self, reason: RejectReason, detail: str = ""):
        assert reason in self.REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ---------------------------------------------------------------------------
# wire format

MAGIC = b"VF"
MSG_ADVERT = 1
NAME_MAX_BYTES = 32
TAG_BYTES = 32
DIGEST_BYTES = 16

_HEADER = struct.Struct("!2sBBBBBHHIQ16s")  # magic .. config_digest
_FAMILY_BYTES = {4: 4, 6: 16}
_KNOWN_FLAGS = int(Flag.HANDOVER | Flag.TAKEOVER_REQUEST | Flag.RESTARTING | Flag.STOPPING)
_STATES = frozenset(int(s) for s in State)

#: Smallest and largest message (IPv4 and a 1-byte node name, IPv6 and two 32-byte names).
MIN_MESSAGE_BYTES = _HEADER.size + 1 + 4 + 1 + 1 + 1 + TAG_BYTES
MAX_MESSAGE_BYTES = _HEADER.size + 1 + 16 + 1 + NAME_MAX_BYTES + 1 + NAME_MAX_BYTES + TAG_BYTES

#: Per-node replay state is kept for at most this many node names (least recently
#: heard forgotten first). Only authenticated senders create entries.
MAX_TRACKED_NODES = 256


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"advert {name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"advert {name} must be {lo}..{hi}, got {value}")
    return value


def _name_bytes(field_name: str, value: object, min_len: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"advert {field_name} must be a string, got {type(value).__name__}")
    raw = value.encode("utf-8")
    if not min_len <= len(raw) <= NAME_MAX_BYTES:
        raise ValueError(f"advert {field_name} must be {min_len}..{NAME_MAX_BYTES} bytes of UTF-8, "
                         f"got {len(raw)}")
    return raw


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("HMAC key must be non-empty bytes")
    return bytes(key)


def encode_advert(advert: Advert, key: bytes) -> bytes:
    """Serialize and sign ``advert``. Raises ValueError for values that cannot be sent."""
    key = _check_key(key)
    cluster_id = _check_int("cluster_id", advert.cluster_id, 1, 255)
    priority = _check_int("priority", advert.priority, 0, 255)
    interval = _check_int("advert_interval_ms", advert.advert_interval_ms, 1, 0xFFFF)
    hold = _check_int("hold_ms", advert.hold_ms, 0, 0xFFFFFFFF)
    counter = _check_int("counter", advert.counter, 0, 0xFFFFFFFFFFFFFFFF)
    try:
        state = State(advert.state)
    except ValueError:
        raise ValueError(f"advert state must be a State, got {advert.state!r}") from None
    flags = _check_int("flags", int(advert.flags), 0, 0xFFFF)
    if flags & ~_KNOWN_FLAGS:
        raise ValueError(f"advert flags has unknown bits {flags & ~_KNOWN_FLAGS:#x}")
    digest = advert.config_digest
    if not isinstance(digest, (bytes, bytearray)) or len(digest) != DIGEST_BYTES:
        raise ValueError(f"advert config_digest must be {DIGEST_BYTES} bytes")
    address = advert.address
    if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise ValueError(f"advert address must be an IPv4Address or IPv6Address, got {address!r}")
    node = _name_bytes("node", advert.node, 1)
    successor = _name_bytes("successor", advert.successor, 0)
    body = b"".join((
        _HEADER.pack(MAGIC, PROTOCOL_VERSION, MSG_ADVERT, cluster_id, priority, int(state), flags,
                     interval, hold, counter, bytes(digest)),
        bytes((address.version,)), address.packed,
        bytes((len(node),)), node,
        bytes((len(successor),)), successor,
    ))
    return body + hmac.new(key, body, hashlib.sha256).digest()


def _structural_length(data: bytes) -> int:
    """Total message length implied by the family and name-length bytes.

    Reads only those bytes (no authentication yet); raises ``malformed``."""
    n = len(data)
    off = _HEADER.size
    if n <= off:
        raise AdvertRejected(RejectReason.MALFORMED, f"truncated: {n} bytes")
    family = data[off]
    if family not in _FAMILY_BYTES:
        raise AdvertRejected(RejectReason.MALFORMED, f"unknown address family {family}")
    off += 1 + _FAMILY_BYTES[family]
    if n <= off:
        raise AdvertRejected(RejectReason.MALFORMED, f"truncated: {n} bytes")
    node_len = data[off]
    if not 1 <= node_len <= NAME_MAX_BYTES:
        raise AdvertRejected(RejectReason.MALFORMED, f"node name length {node_len}")
    off += 1 + node_len
    if n <= off:
        raise AdvertRejected(RejectReason.MALFORMED, f"truncated: {n} bytes")
    successor_len = data[off]
    if successor_len > NAME_MAX_BYTES:
        raise AdvertRejected(RejectReason.MALFORMED, f"successor name length {successor_len}")
    return off + 1 + successor_len + TAG_BYTES


def _decode_name(field_name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise AdvertRejected(RejectReason.MALFORMED, f"{field_name} is not UTF-8") from None


def decode_advert(data: bytes, key: bytes, cluster_id: int | None = None) -> Advert:
    """Check and parse one message, without replay protection (see :class:`AdvertDecoder`).

    Raises :class:`AdvertRejected` with reason malformed, version, cluster or auth.
    With ``cluster_id`` None, any cluster id is accepted."""
    return _decode(data, (_check_key(key),), cluster_id)[0]


def _decode(data: bytes, keys: tuple[bytes, ...], cluster_id: int | None) -> tuple[Advert, int]:
    """:func:`decode_advert` with several keys: the advert and the index of the key
    whose tag matched (the first that does)."""
    data = bytes(data)
    n = len(data)
    if n < 3:
        raise AdvertRejected(RejectReason.MALFORMED, f"truncated: {n} bytes")
    if data[:2] != MAGIC:
        raise AdvertRejected(RejectReason.MALFORMED, "bad magic")
    if data[2] != PROTOCOL_VERSION:
        raise AdvertRejected(RejectReason.VERSION, f"version {data[2]}, expected {PROTOCOL_VERSION}")
    if n < MIN_MESSAGE_BYTES:
        raise AdvertRejected(RejectReason.MALFORMED, f"truncated: {n} bytes")
    if n > MAX_MESSAGE_BYTES:
        raise AdvertRejected(RejectReason.MALFORMED, f"too long: {n} bytes")
    expected = _structural_length(data)
    if n != expected:
        what = "truncated" if n < expected else "extra bytes"
        raise AdvertRejected(RejectReason.MALFORMED, f"{what}: {n} bytes, expected {expected}")
    if cluster_id is not None and data[4] != cluster_id:
        raise AdvertRejected(RejectReason.CLUSTER, f"cluster {data[4]}, expected {cluster_id}")
    body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    for key_index, key in enumerate(keys):  # noqa: B007 - read after the loop: which key matched
        if hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
            break
    else:
        raise AdvertRejected(RejectReason.AUTH,
                             "HMAC mismatch" if len(keys) == 1 else f"HMAC matches none of {len(keys)} keys")

    (_magic, _version, msg_type, cid, priority, state, flags, interval, hold, counter,
     digest) = _HEADER.unpack_from(body, 0)
    if msg_type != MSG_ADVERT:
        raise AdvertRejected(RejectReason.MALFORMED, f"unknown message type {msg_type}")
    if cid == 0:
        raise AdvertRejected(RejectReason.MALFORMED, "cluster id 0")
    if state not in _STATES:
        raise AdvertRejected(RejectReason.MALFORMED, f"unknown state {state}")
    if flags & ~_KNOWN_FLAGS:
        raise AdvertRejected(RejectReason.MALFORMED, f"unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
    if interval == 0:
        raise AdvertRejected(RejectReason.MALFORMED, "advert interval 0")
    off = _HEADER.size
    family = body[off]
    size = _FAMILY_BYTES[family]
    raw_address = body[off + 1:off + 1 + size]
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
        ipaddress.IPv4Address(raw_address) if family == 4 else ipaddress.IPv6Address(raw_address))
    off += 1 + size
    node_len = body[off]
    node = _decode_name("node", body[off + 1:off + 1 + node_len])
    off += 1 + node_len
    successor_len = body[off]
    successor = _decode_name("successor", body[off + 1:off + 1 + successor_len])
    return Advert(
        cluster_id=cid, node=node, address=address, priority=priority,
        advert_interval_ms=interval, state=State(state), flags=Flag(flags), successor=successor,
        hold_ms=hold, counter=counter, config_digest=digest,
    ), key_index


class AdvertDecoder:
    """Accepts only well-formed, authentic, fresh adverts of one cluster.

    ``key`` is one key or a sequence of keys (any of them authenticates; see
    :meth:`set_keys`). Freshness: with ``max_skew_us`` > 0 and the receiver's wall
    clock given to :meth:`decode`, the counter must lie within ``max_skew_us`` of it
    (``stale`` below, ``future`` above); and a node's counter must exceed the last
    counter accepted from that node name (``replay``). The replay state changes only
    when a message is accepted, and holds at most ``max_nodes`` names (least recently
    accepted forgotten first)."""

    def __init__(self, key: bytes | Sequence[bytes], cluster_id: int, max_nodes: int = MAX_TRACKED_NODES,
                 max_skew_us: int = 0):
        self.set_keys(key)
        self._cluster_id = _check_int("cluster_id", cluster_id, 1, 255)
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        if max_skew_us < 0:
            raise ValueError(f"max_skew_us must be >= 0, got {max_skew_us}")
        self._max_nodes = max_nodes
        self._max_skew_us = max_skew_us
        self._last: OrderedDict[str, int] = OrderedDict()
        #: node -> index of the key its last accepted advert was signed with
        self.key_used: dict[str, int] = {}

    def set_keys(self, key: bytes | Sequence[bytes]) -> None:
        """The keys that authenticate from now on (a rotation changes them in place;
        the replay state is kept)."""
        keys = (key,) if isinstance(key, (bytes, bytearray)) else tuple(key)
        if not keys:
            raise ValueError("at least one HMAC key is needed")
        self._keys = tuple(_check_key(k) for k in keys)

    def set_window(self, max_skew_us: int) -> None:
        """A new freshness window (0: off); the replay state is kept."""
        if max_skew_us < 0:
            raise ValueError(f"max_skew_us must be >= 0, got {max_skew_us}")
        self._max_skew_us = max_skew_us

    def decode(self, data: bytes, now_us: int | None = None) -> Advert:
        """Check one message; ``now_us`` is the receiver's wall clock in microseconds
        (None: no window check, only the per-node order)."""
        advert, key_index = _decode(data, self._keys, self._cluster_id)
        if self._max_skew_us and now_us is not None:
            off = advert.counter - now_us
            if off < -self._max_skew_us:
                raise AdvertRejected(RejectReason.STALE, f"counter {-off / 1e6:.3f} s behind this clock (window "
                                                         f"{self._max_skew_us / 1e6:g} s) from {advert.node!r}")
            if off > self._max_skew_us:
                raise AdvertRejected(RejectReason.FUTURE, f"counter {off / 1e6:.3f} s ahead of this clock (window "
                                                          f"{self._max_skew_us / 1e6:g} s) from {advert.node!r}")
        last = self._last.get(advert.node)
        if last is not None and advert.counter <= last:
            raise AdvertRejected(RejectReason.REPLAY, f"counter {advert.counter} <= {last} from {advert.node!r}")
        self._last[advert.node] = advert.counter
        self._last.move_to_end(advert.node)
        self.key_used[advert.node] = key_index
        while len(self._last) > self._max_nodes:
            forgotten, _ = self._last.popitem(last=False)
            self.key_used.pop(forgotten, None)
        return advert

    def reset(self, node: str) -> None:
        """Forget the last counter of ``node`` (no-op if unknown)."""
        self._last.pop(node, None)
        self.key_used.pop(node, None)

    def last_counter(self, node: str) -> int | None:
        return self._last.get(node)

    @property
    def tracked_nodes(self) -> int:
        return len(self._last)


def next_counter(prev: int, wall_clock_us: int) -> int:
    """The counter for the next advert: ``max(prev + 1, wall_clock_us)``.

    Seeding from the wall clock (microseconds since the epoch) keeps a restarted
    node's counters above what its peers last accepted, without state on disk."""
    value = max(prev + 1, wall_clock_us)
    if value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError("advert counter exhausted")
    return value
