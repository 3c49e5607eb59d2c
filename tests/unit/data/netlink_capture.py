"""Captures the kernel's netlink answers saved beside this file (rtnl_*.hex), which
tests/unit/test_nlcodec.py decodes. Run once, as root, on a Linux with network
namespaces: ``.venv/bin/python tests/unit/data/netlink_capture.py``.

It works in a namespace of its own (documentation addresses only; nothing leaves it),
speaks netlink with the daemon's own code (vipless_failover.dataplane.nlcodec and
rules.encode_rule_request) and writes one file per exchange: ``#`` lines say what
was asked, then each receive buffer as one line of hex.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import time
from pathlib import Path

from vipless_failover.dataplane import nlcodec
from vipless_failover.dataplane.desired import RuleSpec
from vipless_failover.dataplane.rules import RTM_GETROUTE, RTM_GETRULE, dump_request, encode_rule_request
from vipless_failover.netns import in_netns

HERE = Path(__file__).parent
RTM_GETNEIGH = 30
RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE = 5, 7, 8

#: the rules the flip would install for examples/director-a.toml (IPv4)
RULE_TO = RuleSpec(4, 100, 100, 98, dst="198.51.100.0/24")
RULE_MARK = RuleSpec(4, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF)


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10)


def rtnl(ns: str, groups: int = 0) -> socket.socket:
    with in_netns(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, groups))
    sock.settimeout(2.0)
    return sock


def dump(sock: socket.socket, request: bytes) -> list[bytes]:
    """The receive buffers of one dump, up to its NLMSG_DONE (or error)."""
    sock.send(request)
    out = []
    while True:
        buf = sock.recv(1 << 16)
        out.append(buf)
        if any(m.type in (nlcodec.NLMSG_DONE, nlcodec.NLMSG_ERROR) for m in nlcodec.messages(buf)):
            return out


def receive(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` receive buffers (the kernel queues each acknowledgement as its own)."""
    return [sock.recv(1 << 16) for _ in range(count)]


def save(name: str, comment: str, buffers: list[bytes]) -> None:
    lines = [f"# {line}" for line in comment.splitlines()] + [b.hex() for b in buffers]
    (HERE / name).write_text("\n".join(lines) + "\n")
    print(f"{name}: {len(buffers)} buffers, {sum(len(b) for b in buffers)} bytes")


def main() -> None:
    ns = "vfcap" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip(ns, "link", "set", "v0", "up")
        ip(ns, "link", "set", "v1", "up")
        watch = rtnl(ns, (1 << (RTNLGRP_IPV4_IFADDR - 1)) | (1 << (RTNLGRP_IPV4_ROUTE - 1))
                     | (1 << (RTNLGRP_IPV4_RULE - 1)))
        sock = rtnl(ns)

        # the flip: one send, three requests; the acks of all three in one buffer
        batch = (encode_rule_request(RULE_TO, True, 7001) + encode_rule_request(RULE_TO, True, 7002)
                 + encode_rule_request(RULE_MARK, False, 7003))
        sock.send(batch)
        save("rtnl_rule_acks.hex",
             "acks to one send (one receive each): add 'to 198.51.100.0/24 table 100 proto 98 pref 100'\n"
             "(seq 7001), the same again (seq 7002: EEXIST), delete 'fwmark 0x1 ...' never added\n"
             "(seq 7003: ENOENT)",
             receive(sock, 3))
        sock.send(encode_rule_request(RULE_MARK, True, 7004))
        receive(sock, 1)

        ip(ns, "addr", "add", "192.0.2.11/24", "dev", "v0")
        ip(ns, "route", "add", "local", "default", "dev", "lo", "table", "100", "proto", "98")
        ip(ns, "neigh", "add", "192.0.2.1", "lladdr", "02:00:00:00:00:01", "dev", "v0")
        ip(ns, "neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "v0", "nud", "stale")

        save("rtnl_rule_dump.hex",
             "RTM_GETRULE dump, AF_INET, seq 7010: the default rules and our two rules (proto 98)",
             dump(sock, dump_request(RTM_GETRULE, socket.AF_INET, 7010)))
        save("rtnl_route_dump.hex",
             "RTM_GETROUTE dump, AF_INET, seq 7011: 'local default dev lo table 100 proto 98', the\n"
             "link route of 192.0.2.0/24 on v0 and the local table",
             dump(sock, dump_request(RTM_GETROUTE, socket.AF_INET, 7011)))
        ndmsg = struct.pack("=B3xiHBB", socket.AF_INET, 0, 0, 0, 0)
        save("rtnl_neigh_dump.hex",
             "RTM_GETNEIGH dump, AF_INET, seq 7012: 192.0.2.1 at 02:00:00:00:00:01, 192.0.2.2 at\n"
             "02:00:00:00:00:02 (stale), both on v0",
             dump(sock, nlcodec.encode(RTM_GETNEIGH, nlcodec.NLM_F_REQUEST | nlcodec.NLM_F_DUMP, 7012, ndmsg)))

        time.sleep(0.2)
        notes = []
        while True:
            try:
                notes.append(watch.recv(1 << 16))
            except TimeoutError:
                break
            watch.settimeout(0.3)
        save("rtnl_notifications.hex",
             "notifications (groups IPV4_IFADDR, IPV4_ROUTE, IPV4_RULE) for all of the above, one\n"
             "receive each: RTM_NEWRULE x2, RTM_NEWADDR 192.0.2.11/24, RTM_NEWROUTE (prefix route,\n"
             "local and broadcast routes of the address), RTM_NEWROUTE table 100 proto 98",
             notes)
        sock.close()
        watch.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


if __name__ == "__main__":
    main()
