"""What a node trusts: its keys, and which refused adverts are a peer's trouble.

Pure (no sockets, no clock): the daemon passes the time in.

- :class:`KeyRing`: the signing key (``election.key_file``) and the keys still
  accepted during a rotation (``election.accept_key_files``), shown by fingerprint
  (never the key), with which key each peer signs with (from the decoder).
- :class:`PeerTrouble`: a refused advert from an address that is a peer's (a
  configured unicast peer, or one that has sent an authentic advert) is not noise: a
  key that differs after a rotation or a restart, or a clock out of the replay window,
  leaves two masters. Those raise a notice, at most once per address and kind per
  ``min_gap_s``; everything else is only counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from ..telemetry import NoticeKind, RejectReason

#: rejection reason -> notice kind, for adverts from a known peer address
TROUBLE = {RejectReason.AUTH: NoticeKind.AUTH_FAILED, RejectReason.STALE: NoticeKind.CLOCK_SKEW,
           RejectReason.FUTURE: NoticeKind.CLOCK_SKEW}


def fingerprint(key: bytes) -> str:
    """A short public name of a key: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:12]


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[bytes, ...]  # the signing key first

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key ring needs the signing key")

    @property
    def signing(self) -> bytes:
        return self.keys[0]

    def describe(self, key_used: dict[str, int]) -> dict[str, Any]:
        """For status: fingerprints, and per peer whether it signs with our signing key
        or with one we only accept (a rotation not finished there)."""
        return {"signing": fingerprint(self.signing),
                "accepted": [fingerprint(k) for k in self.keys[1:]],
                "peers": {node: "signing" if i == 0 else f"accepted:{fingerprint(self.keys[i])}"
                          for node, i in sorted(key_used.items())}}


class PeerTrouble:
    """Decides which refused adverts raise a notice (see the module docstring)."""

    def __init__(self, known: Iterable[Hashable] = (), min_gap_s: float = 10.0):
        self.known: set[Hashable] = set(known)
        self.min_gap_s = min_gap_s
        self._last: dict[tuple[Hashable, NoticeKind], float] = {}

    def learn(self, address: Hashable) -> None:
        """``address`` sent an authentic advert: it is a peer's."""
        self.known.add(address)

    def notice(self, reason: RejectReason, address: Hashable, now: float) -> NoticeKind | None:
        """The notice kind to raise for this refusal now, or None."""
        kind = TROUBLE.get(reason)
        if kind is None or address not in self.known:
            return None
        last = self._last.get((address, kind))
        if last is not None and now - last < self.min_gap_s:
            return None
        self._last[(address, kind)] = now
        return kind
