"""The netlink message codec (dataplane/nlcodec.py) on the kernel's own answers, saved in
data/rtnl_*.hex by data/netlink_capture.py (one receive buffer a line), and encode /
decode round trips (pure; no root, no socket)."""

from __future__ import annotations

import errno
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, strategies as st
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from vipless_failover import config
from vipless_failover.dataplane import Dataplane, nlcodec
from vipless_failover.dataplane.desired import RouteSpec, RuleSpec
from vipless_failover.dataplane.nlcodec import (
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    MalformedMessage,
    attrs,
    encode,
    encode_attr,
    messages,
    parse_acks,
)
from vipless_failover.dataplane.rules import route_from_msg, rule_from_msg

DATA = Path(__file__).parent / "data"
RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH, RTM_NEWRULE = 20, 24, 28, 32
FRA_DST, FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 1, 6, 15, 21
NDA_DST, NDA_LLADDR = 1, 2
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
#: what netlink_capture.py installed (examples/director-a.toml's IPv4 rules)
RULE_TO = RuleSpec(4, 100, 100, 98, dst="198.51.100.0/24")
RULE_MARK = RuleSpec(4, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF)


def saved(name: str) -> list[bytes]:
    lines = (DATA / name).read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line and not line.startswith("#")]


# -- the kernel's answers ------------------------------------------------------


def test_acks_of_a_flip_one_receive_each() -> None:
    bufs = saved("rtnl_rule_acks.hex")
    assert [parse_acks(b) for b in bufs] == [{7001: 0}, {7002: errno.EEXIST}, {7003: errno.ENOENT}]
    assert parse_acks(b"".join(bufs)) == {7001: 0, 7002: errno.EEXIST, 7003: errno.ENOENT}
    msgs = [m for b in bufs for m in messages(b, strict=True)]
    assert [(m.type, m.seq) for m in msgs] == [(NLMSG_ERROR, 7001), (NLMSG_ERROR, 7002), (NLMSG_ERROR, 7003)]
    # an acknowledgement carries the request's header only; an error echoes the request
    assert msgs[0].length == 16 + 4 + 16
    echoed = messages(msgs[1].payload[4:])
    assert [(m.type, m.seq) for m in echoed] == [(RTM_NEWRULE, 7002)]
    assert len({m.pid for m in msgs}) == 1


def test_rule_dump_walked_and_decoded() -> None:
    (buf,) = saved("rtnl_rule_dump.hex")
    msgs = list(messages(buf, strict=True))
    assert [m.type for m in msgs] == [RTM_NEWRULE] * 5 + [NLMSG_DONE]
    assert all(m.seq == 7010 and m.flags & NLM_F_MULTI for m in msgs)
    assert sum(nlcodec.align(m.length) for m in msgs) == len(buf)
    ours = [m for m in msgs if dict(m.attrs(12)).get(FRA_PROTOCOL) == b"\x62"]
    assert len(ours) == 2
    first = dict(ours[0].attrs(12))
    assert first[FRA_DST] == socket.inet_aton("198.51.100.0")
    assert struct.unpack("=I", first[FRA_TABLE]) == struct.unpack("=I", first[FRA_PRIORITY]) == (100,)
    decoded = set()
    for m in ours:
        msg = fibmsg(m.raw)
        msg.decode()
        decoded.add(rule_from_msg(msg))
    assert decoded == {RULE_TO, RULE_MARK}


def test_route_dump_kept_by_protocol_then_decoded() -> None:
    bufs = saved("rtnl_route_dump.hex")
    msgs = [m for b in bufs for m in messages(b, strict=True)]
    assert [m.type for m in msgs][-1] == NLMSG_DONE and len(bufs[-1]) == 20
    # what DeliveryRules.read_routes keeps undecoded: rtm_protocol, byte 5 of struct rtmsg
    kept = [m for m in msgs if m.type == RTM_NEWROUTE and m.data[m.payload_offset + 5] == 98]
    assert len(kept) == 1
    route = rtmsg(kept[0].raw)
    route.decode()
    assert route_from_msg(route, lo_index=1) == RouteSpec(4, 100, 98, "0.0.0.0/0")


def test_neighbour_dump_addresses_and_macs() -> None:
    (buf,) = saved("rtnl_neigh_dump.hex")
    found = {}
    for m in messages(buf, strict=True):
        if m.type == RTM_NEWNEIGH:
            a = dict(m.attrs(12))  # after struct ndmsg
            found[socket.inet_ntoa(a[NDA_DST])] = a[NDA_LLADDR].hex(":")
    assert found == {"192.0.2.1": "02:00:00:00:00:01", "192.0.2.2": "02:00:00:00:00:02"}


def test_address_notification() -> None:
    (buf,) = [b for b in saved("rtnl_notifications.hex") if next(messages(b)).type == RTM_NEWADDR]
    (m,) = messages(buf, strict=True)
    assert m.payload[:2] == bytes([socket.AF_INET, 24])  # ifaddrmsg: family, prefix length
    a = dict(m.attrs(8))
    assert a[IFA_LOCAL] == a[IFA_ADDRESS] == socket.inet_aton("192.0.2.11")
    assert a[IFA_LABEL] == b"v0\0"


def test_the_reconciler_wakes_for_our_rules_and_routes_only() -> None:
    cfg = config.load(Path(__file__).resolve().parents[2] / "examples" / "director-a.toml")
    assert (cfg.delivery.protocol, cfg.delivery.table) == (98, 100)
    dp = Dataplane(cfg, log=None)
    seen = [(next(messages(b)).type, dp._rtnl_relevant(b)) for b in saved("rtnl_notifications.hex")]
    # two rules, the address, three routes of the kernel's (local, main table), ours in table 100
    assert seen == [(RTM_NEWRULE, True), (RTM_NEWRULE, True), (RTM_NEWADDR, False), (RTM_NEWROUTE, False),
                    (RTM_NEWROUTE, False), (RTM_NEWROUTE, False), (RTM_NEWROUTE, True)]


# -- malformed buffers -----------------------------------------------------------


def test_acks_are_read_by_sequence_number() -> None:
    def ack(seq: int, err: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", err) + bytes(16)

    assert parse_acks(ack(7, 0) + ack(8, -17) + ack(9, -2)) == {7: 0, 8: 17, 9: 2}
    assert parse_acks(b"") == {}
    assert parse_acks(ack(7, 0)[:18]) == {}  # truncated before the errno: nothing made up


def test_a_header_that_cannot_be_right_ends_the_walk() -> None:
    good = encode(RTM_NEWRULE, 0, 1, bytes(12))
    for bad in (struct.pack("=IHHII", 8, 3, 0, 2, 0),           # shorter than a header
                struct.pack("=IHHII", 4096, 3, 0, 2, 0)):       # longer than the buffer
        assert [m.seq for m in messages(good + bad)] == [1]
        walked = []
        with pytest.raises(MalformedMessage) as exc:
            for m in messages(good + bad, strict=True):
                walked.append(m.seq)
        assert walked == [1] and exc.value.errno == errno.EBADMSG
    assert [m.seq for m in messages(good + bytes(10), strict=True)] == [1]  # trailing bytes < a header
    assert list(attrs(encode_attr(1, b"ab") + struct.pack("=HH", 2, 9) + encode_attr(3, b"c"))) == [(1, b"ab")]
    assert list(attrs(struct.pack("=HH", 40, 1) + b"short")) == []


def test_error_of_other_messages_is_none() -> None:
    assert next(messages(encode(NLMSG_DONE, 2, 1, bytes(4)))).error() is None
    assert next(messages(encode(NLMSG_ERROR, 0, 1, b""))).error() is None  # no room for the errno


# -- round trips -------------------------------------------------------------------

message_fields = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
                           st.integers(0, 0xFFFFFFFF), st.binary(max_size=64))
attr_fields = st.tuples(st.integers(0, nlcodec.NLA_TYPE_MASK), st.binary(max_size=40))


@given(st.lists(message_fields, max_size=8))
def test_messages_round_trip(fields: list[tuple[int, int, int, int, bytes]]) -> None:
    data = b"".join(encode(t, f, s, p, pid=pid) for t, f, s, pid, p in fields)
    assert len(data) % 4 == 0
    got = [(m.type, m.flags, m.seq, m.pid, m.payload) for m in messages(data, strict=True)]
    assert got == [(t, f, s, pid, p) for t, f, s, pid, p in fields]


@given(st.lists(attr_fields, max_size=8), st.sampled_from((0, nlcodec.NLA_F_NESTED, nlcodec.NLA_F_NET_BYTEORDER)))
def test_attributes_round_trip(fields: list[tuple[int, bytes]], flag: int) -> None:
    body = bytes(12) + b"".join(encode_attr(t | flag, p) for t, p in fields)
    (m,) = messages(encode(RTM_NEWRULE, NLM_F_MULTI, 5, body))
    assert list(m.attrs(12)) == fields
    assert m.attr_map(12) == dict(fields)  # by type, the last of a repeated type


@given(st.lists(message_fields, min_size=1, max_size=4), st.data())
def test_a_cut_buffer_yields_the_whole_messages_before_the_cut(fields: list[tuple[int, int, int, int, bytes]],
                                                               data: st.DataObject) -> None:
    parts = [encode(t, f, s, p, pid=pid) for t, f, s, pid, p in fields]
    whole = b"".join(parts)
    cut = data.draw(st.integers(0, len(whole)))
    offset, whole_before_cut = 0, []
    for part, (_, _, seq, _, payload) in zip(parts, fields, strict=True):
        if offset + 16 + len(payload) > cut:  # its padding may be cut off, not the message
            break
        whole_before_cut.append(seq)
        offset += len(part)
    assert [m.seq for m in messages(whole[:cut])] == whole_before_cut
