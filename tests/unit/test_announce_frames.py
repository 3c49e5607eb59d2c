"""Announcement frames decoded by scapy; VIP expansion; the NS/ARP responder logic."""

from __future__ import annotations

import ipaddress
import re
import struct
import time

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from vipless_failover import config
from vipless_failover.announce import frames, link, responder
from vipless_failover.config import ConfigError

MAC = bytes.fromhex("020000aabbcc")
MAC_S = "02:00:00:aa:bb:cc"
LL = ipaddress.IPv6Address("fe80::1:2ff:fe00:1")


def _valid_cksum(frame: bytes) -> bool:
    """scapy recomputes the ICMPv6 checksum from scratch and compares."""
    pkt = Ether(frame)
    icmp = pkt[IPv6].payload
    given_ck = icmp.cksum
    del icmp.cksum
    return Ether(bytes(pkt))[IPv6].payload.cksum == given_ck


@pytest.mark.parametrize("vip", ["198.51.100.10", "192.0.2.255", "203.0.113.0"])
def test_garp_request(vip: str) -> None:
    pkt = Ether(frames.garp_frame(MAC, ipaddress.IPv4Address(vip), "request"))
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == MAC_S and pkt.type == 0x0806
    arp = pkt[ARP]
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen) == (1, 0x0800, 6, 4)
    assert arp.op == 1
    assert arp.psrc == vip and arp.pdst == vip
    assert arp.hwsrc == MAC_S and arp.hwdst == "00:00:00:00:00:00"
    assert len(bytes(pkt)) == 60


def test_garp_reply() -> None:
    pkt = Ether(frames.garp_frame(MAC, ipaddress.IPv4Address("198.51.100.11"), "reply"))
    arp = pkt[ARP]
    assert pkt.dst == "ff:ff:ff:ff:ff:ff"
    assert arp.op == 2
    assert arp.psrc == arp.pdst == "198.51.100.11"
    assert arp.hwsrc == arp.hwdst == MAC_S


def test_garp_bad_form() -> None:
    with pytest.raises(ValueError):
        frames.garp_frame(MAC, ipaddress.IPv4Address("198.51.100.1"), "probe")


@pytest.mark.parametrize("vip", ["2001:db8::10", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::"])
def test_unsolicited_na(vip: str) -> None:
    frame = frames.unsolicited_na_frame(MAC, LL, ipaddress.IPv6Address(vip))
    pkt = Ether(frame)
    assert pkt.dst == "33:33:00:00:00:01" and pkt.src == MAC_S and pkt.type == 0x86DD
    ip6 = pkt[IPv6]
    assert ip6.src == str(LL) and ip6.dst == "ff02::1" and ip6.hlim == 255 and ip6.nh == 58
    assert ip6.plen == 32
    na = pkt[ICMPv6ND_NA]
    assert na.type == 136 and na.code == 0
    assert (na.R, na.S, na.O) == (0, 0, 1)
    assert na.tgt == vip
    opt = pkt[ICMPv6NDOptDstLLAddr]
    assert opt.type == 2 and opt.len == 1 and opt.lladdr == MAC_S
    assert _valid_cksum(frame)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**128 - 1), st.integers(min_value=0, max_value=2**64 - 1),
       st.binary(min_size=6, max_size=6))
def test_na_checksum_any_target(target: int, ll_low: int, mac: bytes) -> None:
    ll = ipaddress.IPv6Address((0xFE80 << 112) | ll_low)
    frame = frames.unsolicited_na_frame(mac, ll, ipaddress.IPv6Address(target))
    assert _valid_cksum(frame)
    assert frames.icmpv6_checksum(ll, frames.ALL_NODES, frame[54:56] + b"\0\0" + frame[58:]) == \
        int.from_bytes(frame[56:58], "big")


def test_expand_vips_order_dedupe_split() -> None:
    nets = [ipaddress.ip_network(n) for n in
            ("198.51.100.0/30", "198.51.100.1/32", "2001:db8::/126", "192.0.2.7/32")]
    v4, v6 = frames.expand_vips(nets)
    assert [str(a) for a in v4] == ["198.51.100.0", "198.51.100.1", "198.51.100.2", "198.51.100.3", "192.0.2.7"]
    assert [str(a) for a in v6] == ["2001:db8::", "2001:db8::1", "2001:db8::2", "2001:db8::3"]
    v4, _ = frames.expand_vips([ipaddress.ip_network("198.51.100.0/24")])
    assert len(v4) == 256


def test_expand_vips_cap_is_config_error() -> None:
    v4, v6 = frames.expand_vips([ipaddress.ip_network("2001:db8::/112")])
    assert len(v6) == 65_536 and not v4
    with pytest.raises(ConfigError, match="65536"):
        frames.expand_vips([ipaddress.ip_network("2001:db8::/112"), ipaddress.ip_network("192.0.2.1/32")])


def test_build_65536_frames_fast() -> None:
    _, v6 = frames.expand_vips([ipaddress.ip_network("2001:db8::/112")])
    t = time.perf_counter()
    arp, na = frames.build_per_vip_frames(MAC, LL, [], v6, ("request", "reply"))
    elapsed = time.perf_counter() - t
    assert len(na) == 65_536 and not arp
    assert elapsed < 1.0, f"building 65,536 NA frames took {elapsed:.3f}s"
    for i in (0, 1, 4095, 65_535):
        assert Ether(na[i])[ICMPv6ND_NA].tgt == str(v6[i])
        assert _valid_cksum(na[i])


def test_build_per_vip_frames_forms() -> None:
    v4 = [ipaddress.IPv4Address("198.51.100.1"), ipaddress.IPv4Address("198.51.100.2")]
    arp, na = frames.build_per_vip_frames(MAC, None, v4, [ipaddress.IPv6Address("2001:db8::1")], ("reply",))
    assert [Ether(f)[ARP].op for f in arp] == [2, 2]
    assert na == []  # no IPv6 source: no NA
    arp, _ = frames.build_per_vip_frames(MAC, None, v4, [], ("request", "reply"))
    assert [(Ether(f)[ARP].op, Ether(f)[ARP].psrc) for f in arp] == [
        (1, "198.51.100.1"), (2, "198.51.100.1"), (1, "198.51.100.2"), (2, "198.51.100.2")]


# -- responder (pure part) ------------------------------------------------------

ROUTER_MAC = "02:00:00:00:00:01"


class _Log:
    def __getattr__(self, name):
        return lambda *a, **k: None


def _responder() -> responder.NeighbourResponder:
    return responder.NeighbourResponder(
        "eth0", 1, MAC, LL, [ipaddress.IPv4Address("198.51.100.10")],
        [ipaddress.IPv6Address("2001:db8::10")], None, _Log())


def test_responder_answers_ns_for_vip() -> None:
    r = _responder()
    ns = (Ether(src=ROUTER_MAC, dst="33:33:ff:00:00:10")
          / IPv6(src="2001:db8::1", dst="ff02::1:ff00:10", hlim=255)
          / ICMPv6ND_NS(tgt="2001:db8::10") / ICMPv6NDOptSrcLLAddr(lladdr=ROUTER_MAC))
    reply = r.answer(bytes(ns))
    assert reply is not None
    pkt = Ether(reply)
    assert pkt.dst == ROUTER_MAC and pkt.src == MAC_S
    assert pkt[IPv6].dst == "2001:db8::1" and pkt[IPv6].src == str(LL) and pkt[IPv6].hlim == 255
    na = pkt[ICMPv6ND_NA]
    assert (na.R, na.S, na.O) == (0, 1, 1) and na.tgt == "2001:db8::10"
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == MAC_S
    assert _valid_cksum(reply)
    assert r.answered == {"arp": 0, "ns": 1}


def test_responder_ignores_other_ns() -> None:
    r = _responder()
    base = Ether(src=ROUTER_MAC) / IPv6(src="2001:db8::1", dst="ff02::1:ff00:11", hlim=255)
    assert r.answer(bytes(base / ICMPv6ND_NS(tgt="2001:db8::11"))) is None       # not a VIP
    assert r.answer(bytes(Ether(src=ROUTER_MAC) / IPv6(src="2001:db8::1", dst="ff02::1:ff00:10", hlim=64)
                          / ICMPv6ND_NS(tgt="2001:db8::10"))) is None            # hop limit != 255
    bad = bytearray(bytes(Ether(src=ROUTER_MAC) / IPv6(src="2001:db8::1", dst="ff02::1:ff00:10", hlim=255)
                          / ICMPv6ND_NS(tgt="2001:db8::10")))
    bad[56] ^= 0xFF                                                               # broken checksum
    assert r.answer(bytes(bad)) is None
    assert r.answered["ns"] == 0


def test_responder_dad_probe_defended_to_all_nodes() -> None:
    r = _responder()
    ns = Ether(src=ROUTER_MAC) / IPv6(src="::", dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt="2001:db8::10")
    pkt = Ether(r.answer(bytes(ns)))
    assert pkt[IPv6].dst == "ff02::1" and pkt.dst == "33:33:00:00:00:01"
    assert (pkt[ICMPv6ND_NA].S, pkt[ICMPv6ND_NA].O) == (0, 1)


def test_responder_arp() -> None:
    r = _responder()
    req = Ether(src=ROUTER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=ROUTER_MAC, psrc="198.51.100.1",
                                                               pdst="198.51.100.10")
    pkt = Ether(r.answer(bytes(req)))
    assert pkt.dst == ROUTER_MAC and pkt[ARP].op == 2
    assert pkt[ARP].psrc == "198.51.100.10" and pkt[ARP].hwsrc == MAC_S
    assert pkt[ARP].pdst == "198.51.100.1" and pkt[ARP].hwdst == ROUTER_MAC
    # other targets, gratuitous ARPs and replies are ignored
    assert r.answer(bytes(Ether(src=ROUTER_MAC) / ARP(op=1, hwsrc=ROUTER_MAC, psrc="198.51.100.1",
                                                      pdst="198.51.100.11"))) is None
    assert r.answer(frames.garp_frame(bytes.fromhex("020000000009"),
                                      ipaddress.IPv4Address("198.51.100.10"))) is None
    assert r.answer(bytes(Ether(src=ROUTER_MAC) / ARP(op=2, hwsrc=ROUTER_MAC, psrc="198.51.100.1",
                                                      pdst="198.51.100.10"))) is None
    assert r.answered == {"arp": 1, "ns": 0}


# -- config ------------------------------------------------------------------------

def _cfg(**announce_overrides):
    import tomllib
    from pathlib import Path
    data = tomllib.loads(Path(__file__).parents[2].joinpath("examples/director-a.toml").read_text())
    data["announce"].update(announce_overrides)
    return config.parse(data, "a.toml")


def _facts(addrs, routes=()):
    return {"index": 2, "mac": MAC_S, "link_local": LL, "onlink_routes": [ipaddress.ip_network(r) for r in routes],
            "addresses": [{"interface": ipaddress.ip_interface(a), "scope": 0, "proto": None, "label": None,
                           "flags": 0} for a in addrs]}


def test_config_cap_in_per_vip_mode() -> None:
    with pytest.raises(ConfigError, match="at most 65536"):
        _cfg(vips=["2001:db8::/96"])
    assert _cfg(mode="next-hop", next_hop="192.0.2.100/24", vips=["2001:db8::/96"]).announce.mode == "next-hop"


def test_check_interface_ok() -> None:
    cfg = _cfg(vips=["192.0.2.128/25", "2001:db8:1::10"])
    link.check_interface(cfg, facts=_facts(["192.0.2.11/24", "2001:db8:1::11/64", "fe80::1/64"]))
    cfg = _cfg(vips=["198.51.100.10"])
    link.check_interface(cfg, facts=_facts(["192.0.2.11/24"], routes=["198.51.100.0/24"]))


def test_check_interface_vip_not_on_subnet() -> None:
    cfg = _cfg(vips=["198.51.100.10"])
    with pytest.raises(ConfigError) as exc:
        link.check_interface(cfg, facts=_facts(["192.0.2.11/24", "fe80::1/64"]))
    msg = str(exc.value)
    assert msg.startswith("a.toml: announce.vips[0]: 198.51.100.10/32 is not on eth0's subnets (192.0.2.0/24)")
    cfg = _cfg(vips=["2001:db8:2::/120"])
    with pytest.raises(ConfigError, match="not on eth0"):
        link.check_interface(cfg, facts=_facts(["192.0.2.11/24", "2001:db8:1::11/64", "fe80::1/64"]))


def test_check_interface_vip_is_own_address() -> None:
    cfg = _cfg(vips=["192.0.2.128/25"])
    with pytest.raises(ConfigError, match=r"announce.vips\[0\]: .*own address 192.0.2.200 on eth0"):
        link.check_interface(cfg, facts=_facts(["192.0.2.11/24", "192.0.2.200/24"]))


def test_check_interface_next_hop_taken() -> None:
    cfg = _cfg(mode="next-hop", next_hop="192.0.2.100/24")
    facts = _facts(["192.0.2.11/24", "192.0.2.100/24"])
    with pytest.raises(ConfigError, match=re.escape("announce.next_hop: 192.0.2.100 is already an address")):
        link.check_interface(cfg, facts=facts)
    facts["addresses"][1]["proto"] = cfg.delivery.protocol  # ours (daemon restart): adopted
    link.check_interface(cfg, facts=facts)


def test_responder_accepts_both_forms_of_a_zero_checksum() -> None:
    # an NS whose checksum sum comes out as zero: Linux sends 0x0000, others 0xFFFF. The
    # target's last 16 bits are chosen so; one VIP in 65,536 is such a target per router.
    src, dst = "2001:db8::1", "ff02::1:ff00:0"
    probe = bytes(Ether(src=ROUTER_MAC) / IPv6(src=src, dst=dst, hlim=255) / ICMPv6ND_NS(tgt="2001:db8::", cksum=0))
    icmp = probe[54:]
    pseudo = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + \
        struct.pack("!I3xB", len(icmp), 58)
    folded = frames._fold(frames._ones_sum(pseudo) + frames._ones_sum(icmp))
    last = (~folded) & 0xFFFF  # makes the sum all ones with a zero checksum field
    target = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) + last)
    assert frames.icmpv6_checksum(ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst),
                                  icmp[:24 - 16] + target.packed) == 0xFFFF  # i.e. computed 0
    r = responder.NeighbourResponder("eth0", 1, MAC, LL, [], [target], None, _Log())
    for cksum in (0x0000, 0xFFFF):
        frame = bytes(Ether(src=ROUTER_MAC) / IPv6(src=src, dst=dst, hlim=255)
                      / ICMPv6ND_NS(tgt=str(target), cksum=cksum))
        assert r.answer(frame) is not None, hex(cksum)
    frame = bytes(Ether(src=ROUTER_MAC) / IPv6(src=src, dst=dst, hlim=255) / ICMPv6ND_NS(tgt=str(target), cksum=1))
    assert r.answer(frame) is None
    assert r.answered["ns"] == 2
