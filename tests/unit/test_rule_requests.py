"""The takeover's rule requests, encoded by hand (rules.encode_rule_request): decoded by
pyroute2 they are the very rules the reconciler reads back (pure; no root)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, strategies as st
from pyroute2.netlink.rtnl.fibmsg import fibmsg

from vipless_failover.dataplane.desired import FULL_MASK, RuleSpec
from vipless_failover.dataplane.nlcodec import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from vipless_failover.dataplane.rules import RTM_DELRULE, RTM_NEWRULE, encode_rule_request, rule_from_msg


def decode(data: bytes) -> fibmsg:
    msg = fibmsg(data)
    msg.decode()
    return msg


@st.composite
def rules(draw: st.DrawFn) -> RuleSpec:
    family = draw(st.sampled_from((4, 6)))
    dst = None
    if draw(st.booleans()):
        bits = 32 if family == 4 else 128
        plen = draw(st.integers(1, bits))  # /0: no destination (test below)
        raw = draw(st.integers(0, 2**bits - 1))
        net = ipaddress.ip_network((raw, plen), strict=False) if family == 4 else \
            ipaddress.IPv6Network((raw, plen), strict=False)
        dst = str(net)
    fwmark = draw(st.one_of(st.none(), st.integers(1, 0xFFFFFFFF)))
    mask = None if fwmark is None else draw(st.sampled_from((FULL_MASK, 0xFF, 0xFFFF0000)))
    iif = draw(st.one_of(st.none(), st.sampled_from(("lo", "eth0", "bond0.100"))))
    return RuleSpec(family=family, priority=draw(st.integers(1, 32765)),
                    table=draw(st.integers(1, 0xFFFFFFFF - 1).filter(lambda t: t not in (253, 254, 255))),
                    protocol=draw(st.integers(1, 255)), fwmark=fwmark, mask=mask, dst=dst, iif=iif)


@given(rules(), st.booleans(), st.integers(1, 0x7FFFFFFF))
def test_request_decodes_to_the_same_rule(rule: RuleSpec, add: bool, seq: int) -> None:
    msg = decode(encode_rule_request(rule, add, seq))
    assert rule_from_msg(msg) == rule
    hdr = msg["header"]
    assert hdr["type"] == (RTM_NEWRULE if add else RTM_DELRULE)
    assert hdr["sequence_number"] == seq
    assert hdr["length"] == len(encode_rule_request(rule, add, seq))
    want = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    assert hdr["flags"] == want


def test_large_table_uses_the_compat_header_value() -> None:
    msg = decode(encode_rule_request(RuleSpec(4, 100, 1000, 98, dst="198.51.100.0/24"), True, 1))
    assert msg["table"] == 252 and msg.get_attr("FRA_TABLE") == 1000


def test_a_rule_read_back_with_foreign_attributes_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="foreign attributes"):
        encode_rule_request(RuleSpec(4, 100, 100, 98, extra=(("FRA_GOTO", 5),)), True, 1)


def test_destinations_read_back_as_the_config_writes_them() -> None:
    # inet_ntop writes ::200:0 as ::2.0.0.0; the kernel keeps no FRA_DST for a /0
    odd = RuleSpec(6, 100, 100, 98, dst="::200:0/103")
    assert rule_from_msg(decode(encode_rule_request(odd, True, 1))) == odd
    everything = RuleSpec(4, 100, 100, 98, dst="0.0.0.0/0")
    assert rule_from_msg(decode(encode_rule_request(everything, True, 1))).dst is None


def test_a_detached_interface_is_not_a_foreign_attribute() -> None:
    # the kernel flags a rule whose iif does not exist (yet) as detached (0x8)
    rule = RuleSpec(4, 100, 100, 98, iif="vlan42")
    data = bytearray(encode_rule_request(rule, True, 1))
    struct.pack_into("=I", data, 16 + 8, 0x8)  # fib_rule_hdr.flags
    assert rule_from_msg(decode(bytes(data))) == rule
