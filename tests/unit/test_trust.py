"""election/trust.py: key fingerprints and which peer signs with which key; which
refused adverts raise a notice (a known peer's address, once per gap)."""

from __future__ import annotations

import ipaddress

import pytest

from vipless_failover.election.trust import KeyRing, PeerTrouble, fingerprint

PEER = ipaddress.ip_address("192.0.2.12")
STRANGER = ipaddress.ip_address("192.0.2.99")


def test_fingerprint_is_short_and_reveals_nothing_of_the_key():
    fp = fingerprint(b"k" * 32)
    assert len(fp) == 12 and int(fp, 16) >= 0 and "k" not in fp
    assert fingerprint(b"k" * 32) == fp != fingerprint(b"j" * 32)


def test_key_ring_describes_who_signs_with_what():
    new, old = b"n" * 32, b"o" * 32
    ring = KeyRing((new, old))
    assert ring.signing == new
    d = ring.describe({"director-b": 1, "director-c": 0})
    assert d == {"signing": fingerprint(new), "accepted": [fingerprint(old)],
                 "peers": {"director-b": f"accepted:{fingerprint(old)}", "director-c": "signing"}}
    with pytest.raises(ValueError):
        KeyRing(())


def test_refusals_from_a_known_peer_raise_a_notice_once_per_gap():
    t = PeerTrouble([PEER], min_gap_s=10.0)
    assert t.notice("auth", PEER, 100.0) == "auth_failed"
    assert t.notice("auth", PEER, 105.0) is None  # within the gap
    assert t.notice("stale", PEER, 105.0) == "clock_skew"  # another kind
    assert t.notice("future", PEER, 106.0) is None  # same kind
    assert t.notice("auth", PEER, 110.0) == "auth_failed"
    # noise: other reasons, or an address that never was a peer's
    assert t.notice("malformed", PEER, 200.0) is None and t.notice("replay", PEER, 200.0) is None
    assert t.notice("auth", STRANGER, 200.0) is None
    t.learn(STRANGER)  # it sent an authentic advert: a peer now
    assert t.notice("auth", STRANGER, 200.0) == "auth_failed"
