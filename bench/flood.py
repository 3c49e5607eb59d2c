"""Figure 5 of the bench (issue 7): a flood of forged adverts against the backup (ours
with a wrong key, keepalived's VRRPv3 with a VRID it does not run), 10,000 a second for
10 s: the backup's CPU, and whether it took over.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from netnslab import topology
from vipless_failover.netns import in_netns

from .scenarios import A, B, OursPair, Trial, _cpu_s, make_pair

FLOOD_PPS = 10_000
FLOOD_S = 10.0


def forged_frames(kind: str, lab: topology.Lab, count: int = 1000) -> list[bytes]:
    """Forged adverts from the router's LAN address to the election multicast group:
    ours with a wrong key (our wire format, valid apart from the HMAC), keepalived
    VRRPv3 with a VRID it does not run (VRRPv3 has no authentication)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vrrp import VRRPv3

    from vipless_failover.election.protocol import Advert, State, encode_advert

    src_mac = json.loads(lab.ip("router", "-j", "link", "show", "dev", lab.router.iface).stdout)[0]["address"]
    eth = Ether(src=src_mac, dst="01:00:5e:00:00:12")
    ip = IP(src=str(lab.router.ip4), dst="224.0.0.18", ttl=255)
    frames = []
    wrong_key = os.urandom(32)
    for i in range(count):
        if kind == "ours":
            adv = Advert(cluster_id=51, node="intruder", address=ipaddress.ip_address(str(lab.router.ip4)),
                         priority=254, advert_interval_ms=100, state=State.MASTER, counter=1_000_000 + i)
            pkt = eth / ip / UDP(sport=5798, dport=5798) / encode_advert(adv, wrong_key)
        else:
            pkt = eth / IP(src=str(lab.router.ip4), dst="224.0.0.18", ttl=255, proto=112) / VRRPv3(
                vrid=52, priority=254, adv=10, ipcount=1, addrlist=["198.51.100.10"])
        frames.append(bytes(pkt))
    return frames


def send_flood(lab: topology.Lab, frames: Sequence[bytes], pps: int, seconds: float) -> dict[str, Any]:
    """Send ``pps`` x ``seconds`` frames (bounded count and time) from the router's LAN link."""
    with in_netns(lab.ns("router")):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((lab.router.iface, 0))
    total = int(pps * seconds)
    batch = max(1, pps // 100)  # every 10 ms
    sent, errors = 0, 0
    t0 = time.monotonic()
    try:
        while sent < total and time.monotonic() - t0 < seconds + 2:
            due = t0 + (sent / pps)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for _ in range(min(batch, total - sent)):
                try:
                    s.send(frames[sent % len(frames)])
                except OSError:
                    errors += 1
                sent += 1
    finally:
        s.close()
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - t0, 2)}


def flood_trial(kind: str, index: int) -> list[Trial]:
    with topology.Lab(responders=False) as lab:
        pair = make_pair(kind, lab, 100)
        try:
            pair.start(timeout=10)
            time.sleep(0.5)
            master = pair.master()
            assert master is not None
            backup = B if master == A else A
            frames = forged_frames(kind, lab)
            pids = pair.pids(backup)
            st0 = pair.status(backup) if isinstance(pair, OursPair) else None
            c0 = _cpu_s(pids)
            t0 = time.time()
            sent = send_flood(lab, frames, FLOOD_PPS, FLOOD_S)
            dt = time.time() - t0
            cpu = _cpu_s(pids) - c0
            time.sleep(0.3)
            took = pair.decision(backup, t0, 0.01) is not None
            d: dict[str, Any] = {"flood": sent, "backup_state_after": pair.state(backup),
                                 "master_state_after": pair.state(master), "took_over": took,
                                 "cpu_s": round(cpu, 3), "core_pct": round(cpu / dt * 100, 2)}
            if st0 is not None:
                st1 = pair.status(backup) or {}
                rec = st1["adverts"]["received"] - st0["adverts"]["received"]
                rej = sum(st1["adverts"]["rejected"].values()) - sum(st0["adverts"]["rejected"].values())
                d.update({"received": rec, "rejected": rej, "master_adverts_accepted": rec - rej,
                          "master_adverts_expected": round(dt / 0.1)})
            else:
                d["master_adverts_accepted"] = None  # keepalived has no counter to read here
            return [Trial("flood", "10,000/s for 10 s", kind, index, d["cpu_s"], details=d)]
        finally:
            pair.stop()
