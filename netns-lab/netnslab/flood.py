"""Forged election adverts at one director: wrong key, replayed captures, malformed.

Runs in a lab namespace on the LAN (the router's). Each frame is an Ethernet frame to
the target director's MAC carrying an IPv4 UDP datagram to the election group and port
with TTL 255 (so the transport's on-link check passes and the advert decoder has to
judge it). Three kinds, interleaved:

* ``wrong_key``: well-formed adverts (MASTER, priority 254, increasing counters,
  named like the real nodes) authenticated with a random key;
* ``replay``: the exact bytes of real adverts captured on the LAN before the flood;
* ``malformed``: bad magic, truncated, over-long, and bit-flipped real adverts;
* ``given``: payloads given on the command line (``--payload HEX``), e.g. one advert
  forged with the cluster key.

``--kinds`` picks some of them (default: every kind available). ``--kinds replay``
alone sends the capture's adverts in their captured order (cycled past its end), so
with ``--count`` = the adverts captured and ``--duration`` = the capture's length it
replays the capture at its own pace.

Bounded: at most ``--count`` frames (<= 1,000,000) within ``--duration`` seconds
(<= 60), paced evenly. Prints JSON: frames sent per kind and the elapsed time.

    python -m netnslab.flood --iface vf1234-eth1 --dst-mac 02:.. --count 100000 \
        --duration 10 --replay capture.pcap --cluster-id 51
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import socket
import sys
import time

MAX_COUNT = 1_000_000
MAX_DURATION_S = 60.0
ETH_P_ALL = 0x0003


def _frame(dst_mac: str, src_mac: str, src_ip: str, group: str, port: int, payload: bytes) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether(dst=dst_mac, src=src_mac) / IP(src=src_ip, dst=group, ttl=255)
                 / UDP(sport=port, dport=port) / payload)


def replay_payloads(pcap: str, port: int) -> list[bytes]:
    """UDP payloads to the election port in a capture (real adverts)."""
    from scapy.layers.inet import UDP
    from scapy.utils import PcapReader

    out = []
    with PcapReader(pcap) as reader:
        for pkt in reader:
            if UDP in pkt and pkt[UDP].dport == port:
                out.append(bytes(pkt[UDP].payload))
    return out


def payloads(kinds_n: int, cluster_id: int, replay: list[bytes]) -> dict[str, list[bytes]]:
    from vipless_failover.election.protocol import Advert, State, encode_advert

    wrong_key = secrets.token_hex(32).encode()
    digest = bytes(16)
    forged = [encode_advert(Advert(cluster_id=cluster_id, node=("director-a", "director-b", "intruder")[i % 3],
                                   address=ipaddress.ip_address("192.0.2.1"), priority=254,
                                   advert_interval_ms=100, state=State.MASTER, counter=(1 << 60) + i,
                                   config_digest=digest), wrong_key)
              for i in range(kinds_n)]
    base = replay[0] if replay else forged[0]
    malformed: list[bytes] = []
    for i in range(kinds_n):
        m = i % 4
        if m == 0:
            malformed.append(b"XX" + os.urandom(60 + i % 40))  # bad magic
        elif m == 1:
            malformed.append(base[: 3 + i % (len(base) - 3)])  # truncated
        elif m == 2:
            malformed.append(base + os.urandom(1 + i % 200))  # extra bytes
        else:
            flipped = bytearray(base)
            flipped[40 + i % (len(base) - 72)] ^= 1 << (i % 8)  # bit flip: HMAC fails
            malformed.append(bytes(flipped))
    out = {"wrong_key": forged, "malformed": malformed}
    if replay:
        out["replay"] = [replay[i % len(replay)] for i in range(kinds_n)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netnslab.flood", description=__doc__.split("\n")[0])
    ap.add_argument("--iface", required=True)
    ap.add_argument("--dst-mac", required=True)
    ap.add_argument("--src-ip", default="192.0.2.1")
    ap.add_argument("--group", default="224.0.0.18")
    ap.add_argument("--port", type=int, default=5798)
    ap.add_argument("--cluster-id", type=int, default=51)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--replay", help="pcap with real adverts to replay")
    ap.add_argument("--payload", action="append", default=[], metavar="HEX",
                    help="a UDP payload to send (kind 'given'; repeatable)")
    ap.add_argument("--kinds", help="comma-separated kinds to send (wrong_key, replay, malformed, given); "
                                    "default: all available")
    args = ap.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT:
        ap.error(f"count must be 1..{MAX_COUNT}")
    if not 0 < args.duration <= MAX_DURATION_S:
        ap.error(f"duration must be 0..{MAX_DURATION_S}")
    if (not ipaddress.ip_address(args.group).is_multicast
            or ipaddress.ip_address(args.src_ip) not in ipaddress.ip_network("192.0.2.0/24")):
        ap.error("group must be multicast and src-ip inside 192.0.2.0/24 (documentation range)")
    replay = replay_payloads(args.replay, args.port) if args.replay else []
    if args.replay and not replay:
        ap.error(f"no adverts to port {args.port} in {args.replay}")
    try:
        given = [bytes.fromhex(h) for h in args.payload]
    except ValueError as exc:
        ap.error(f"--payload: {exc}")
    kinds = payloads(200, args.cluster_id, replay)
    if given:
        kinds["given"] = [given[i % len(given)] for i in range(200)]
    if args.kinds:
        wanted = [k.strip() for k in args.kinds.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in kinds]
        if unknown or not wanted:
            ap.error(f"--kinds: {', '.join(unknown) or 'none given'} not available (have {', '.join(kinds)})")
        kinds = {k: kinds[k] for k in wanted}
    if list(kinds) == ["replay"]:
        kinds = {"replay": replay}  # the whole capture, in order
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((args.iface, 0))
    src_mac = ":".join(f"{b:02x}" for b in sock.getsockname()[4][:6])
    frames = [(k, _frame(args.dst_mac, src_mac, args.src_ip, args.group, args.port, p))
              for i in range(min(map(len, kinds.values()))) for k, ps in kinds.items() for p in (ps[i],)]
    sent = {k: 0 for k in kinds}
    errors = 0
    t0 = time.monotonic()
    deadline = t0 + args.duration
    per_s = args.count / (args.duration * 0.95)
    n = 0
    while n < args.count:
        now = time.monotonic()
        if now >= deadline:
            break
        due = int((now - t0) * per_s) + 1 - n  # paced: never ahead of count/duration
        if due <= 0:
            time.sleep(0.001)
            continue
        for _ in range(min(due, 500, args.count - n)):
            kind, frame = frames[n % len(frames)]
            try:
                sock.send(frame)
                sent[kind] += 1
            except OSError:
                errors += 1
                time.sleep(0.0005)
            n += 1
    elapsed = time.monotonic() - t0
    sock.close()
    print(json.dumps({"sent": sent, "total": sum(sent.values()), "errors": errors,
                      "elapsed_s": round(elapsed, 3), "replay_sources": len(replay)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
