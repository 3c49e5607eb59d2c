"""Election transport in real network namespaces (root).

Topology (every name carries a per-run prefix P, everything is removed at the end)::

    P-n1 --Pe0--+                       P-n1 also has Pe1 -- Px0 in P-x (another LAN)
    P-n2 --Pe0--+-- bridge Pbr0 in P-br
    P-n3 --Pe0--+

    LAN:       192.0.2.{1,2,3}/24      2001:db8::{1,2,3}/64
    other LAN: 203.0.113.{1,2}/24      2001:db8:1::{1,2}/64   (n1, x)

One agent process per namespace (this file run as a script) opens transports with
configs built by ``config.parse`` and answers JSON commands on stdin/stdout.

Negative checks ("X is not received") never rely on sleeping: the unwanted datagram is
sent first, then a wanted marker over the same path; once the marker is in, the
unwanted one has had its chance.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PYTHON = sys.executable
THIS = Path(__file__).resolve()
CALL_TIMEOUT = 10.0

LAN = {4: "192.0.2.{}", 6: "2001:db8::{}"}
LAN_PREFIX = {4: 24, 6: 64}
OTHER = {4: "203.0.113.{}", 6: "2001:db8:1::{}"}
GROUP = {4: "224.0.0.18", 6: "ff02::12"}


# ---------------------------------------------------------------------------
# namespace lab (private to this test file)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Lab:
    def __init__(self) -> None:
        self.p = "vf" + secrets.token_hex(3)[:5]
        self.br = f"{self.p}-br"
        self.n = {i: f"{self.p}-n{i}" for i in (1, 2, 3)}
        self.x = f"{self.p}-x"
        self.lan_if = f"{self.p}e0"
        self.other_if = f"{self.p}e1"
        self.namespaces: list[str] = []

    def addns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        p = self.p
        self.addns(self.br)
        _ip("-n", self.br, "link", "add", f"{p}br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.br, "link", "set", f"{p}br0", "up")
        for i, ns in self.n.items():
            self.addns(ns)
            _ip("-n", self.br, "link", "add", f"{p}b{i}", "type", "veth", "peer", "name", self.lan_if,
                "netns", ns)
            _ip("-n", self.br, "link", "set", f"{p}b{i}", "master", f"{p}br0", "up")
            _ip("-n", ns, "addr", "add", f"{LAN[4].format(i)}/24", "dev", self.lan_if)
            _ip("-n", ns, "addr", "add", f"{LAN[6].format(i)}/64", "dev", self.lan_if, "nodad")
            _ip("-n", ns, "link", "set", self.lan_if, "up")
        self.addns(self.x)
        _ip("-n", self.n[1], "link", "add", self.other_if, "type", "veth", "peer", "name", f"{p}x0",
            "netns", self.x)
        for ns, dev, host in ((self.n[1], self.other_if, 1), (self.x, f"{p}x0", 2)):
            _ip("-n", ns, "addr", "add", f"{OTHER[4].format(host)}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{OTHER[6].format(host)}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        # a link that starts down, in n3 (for send errors)
        self.down_if = f"{p}d0"
        _ip("-n", self.n[3], "link", "add", self.down_if, "type", "veth", "peer", "name", f"{p}d1")
        _ip("-n", self.n[3], "addr", "add", "203.0.113.9/24", "dev", self.down_if)

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.destroy()


# ---------------------------------------------------------------------------
# agent processes


class Agent:
    """A Python process inside one namespace, driven by JSON lines."""

    def __init__(self, ns: str):
        self.ns = ns
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, str(THIS), "agent"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def call(self, timeout: float = CALL_TIMEOUT, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"agent in {self.ns}: no answer to {cmd['op']} within {timeout}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"agent in {self.ns} exited: {err}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"agent in {self.ns}: {reply['error']}")
        return reply

    def stop(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=3)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()  # by PID: only the process this test started
                self.proc.wait(timeout=5)


@pytest.fixture
def agents(lab: Lab) -> Iterator[dict[str, Agent]]:
    started: dict[str, Agent] = {}
    try:
        for key, ns in [(str(i), ns) for i, ns in lab.n.items()] + [("x", lab.x)]:
            started[key] = Agent(ns)
        for agent in started.values():
            agent.call(op="ping")
        yield started
    finally:
        for agent in started.values():
            agent.stop()


_ports = iter(range(15800, 15900))


def node_config(lab: Lab, i: int, family: int, transport: str, port: int,
                peers: tuple[int, ...] = (), interface: str | None = None,
                address: str | None = None) -> dict[str, Any]:
    from tests.factories import config_dict  # here: the agent runs this file as a script

    return config_dict(
        node={"name": f"n{i}", "interface": interface or lab.lan_if, "address": address or LAN[family].format(i)},
        election={"priority": 100, "key_file": "/nonexistent/lab.key", "transport": transport, "port": port,
                  "peers": [LAN[family].format(p) for p in peers]},
    )


def received(reply: dict[str, Any]) -> list[tuple[str, str]]:
    return [(bytes.fromhex(d).decode(), src) for d, src, _rx in reply["received"]]


# ---------------------------------------------------------------------------
# tests

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("family", [4, 6])
def test_multicast_reaches_every_other_node(lab: Lab, agents: dict[str, Agent], family: int) -> None:
    port = next(_ports)
    for i in (1, 2, 3):
        agents[str(i)].call(op="open", id="t", config=node_config(lab, i, family, "multicast", port))
    for i in (1, 2, 3):
        reply = agents[str(i)].call(op="send", id="t", data=f"from-n{i}".encode().hex())
        assert reply["counters"]["sent"] == 1 and reply["counters"]["send_errors"] == 0
    for i in (1, 2, 3):
        reply = agents[str(i)].call(op="wait", id="t", count=2, within=5)
        others = sorted((f"from-n{j}", LAN[family].format(j)) for j in (1, 2, 3) if j != i)
        # own datagram not looped back; the source is the sender's node address
        assert sorted(received(reply)) == others
        assert reply["counters"]["ttl_drops"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_multicast_with_low_ttl_is_dropped(lab: Lab, agents: dict[str, Agent], family: int) -> None:
    port = next(_ports)
    for i in (1, 2):
        agents[str(i)].call(op="open", id="t", config=node_config(lab, i, family, "multicast", port))
    agents["2"].call(op="raw", family=family, src=LAN[family].format(2), dst=GROUP[family], port=port,
                     ttl=1, ifname=lab.lan_if, data=b"ttl-1".hex())
    agents["2"].call(op="raw", family=family, src=LAN[family].format(2), dst=GROUP[family], port=port,
                     ttl=64, ifname=lab.lan_if, data=b"ttl-64".hex())
    agents["2"].call(op="send", id="t", data=b"marker".hex())
    reply = agents["1"].call(op="wait", id="t", count=1, within=5)
    assert received(reply) == [("marker", LAN[family].format(2))]
    assert reply["counters"]["ttl_drops"] == 2


@pytest.mark.parametrize("family", [4, 6])
def test_multicast_on_another_interface_is_not_seen(lab: Lab, agents: dict[str, Agent], family: int) -> None:
    port = next(_ports)
    agents["1"].call(op="open", id="lan", config=node_config(lab, 1, family, "multicast", port))
    # control: a transport on the other interface, to prove the datagram reached n1
    agents["1"].call(op="open", id="other", config=node_config(
        lab, 1, family, "multicast", port, interface=lab.other_if, address=OTHER[family].format(1)))
    agents["2"].call(op="open", id="t", config=node_config(lab, 2, family, "multicast", port))
    agents["x"].call(op="open", id="t", config=node_config(
        lab, 9, family, "multicast", port, interface=f"{lab.p}x0", address=OTHER[family].format(2)))

    agents["x"].call(op="send", id="t", data=b"other-lan".hex())
    other = agents["1"].call(op="wait", id="other", count=1, within=5)
    assert received(other) == [("other-lan", OTHER[family].format(2))]
    agents["2"].call(op="send", id="t", data=b"marker".hex())
    lan = agents["1"].call(op="wait", id="lan", count=1, within=5)
    assert received(lan) == [("marker", LAN[family].format(2))]
    other = agents["1"].call(op="wait", id="other", count=1, within=0)
    assert received(other) == [("other-lan", OTHER[family].format(2))]


@pytest.mark.parametrize("family", [4, 6])
def test_unicast_on_another_interface_is_not_seen(lab: Lab, agents: dict[str, Agent], family: int) -> None:
    """x reaches n1's LAN address through n1's other interface (weak host model would
    accept it); a transport bound to the LAN interface must not see it."""
    port = next(_ports)
    lan_addr, x_addr = LAN[family].format(1), OTHER[family].format(2)
    cfg = node_config(lab, 1, family, "unicast", port, peers=(2,))
    cfg["election"]["peers"].append(x_addr)  # the source is a peer: only the interface filters it
    agents["1"].call(op="open", id="lan", config=cfg)
    control = node_config(lab, 1, family, "unicast", port, interface=lab.other_if)
    control["election"]["peers"] = [x_addr]
    agents["1"].call(op="open", id="other", config=control)
    agents["2"].call(op="open", id="t", config=node_config(lab, 2, family, "unicast", port, peers=(1,)))
    mac = json.loads(subprocess.run(["ip", "-n", lab.n[1], "-j", "link", "show", lab.other_if],
                                    check=True, capture_output=True, timeout=10).stdout)[0]["address"]
    _ip("-n", lab.x, "neigh", "replace", lan_addr, "lladdr", mac, "dev", f"{lab.p}x0", "nud", "permanent")
    _ip("-n", lab.x, "route", "replace", f"{lan_addr}/{32 if family == 4 else 128}", "dev", f"{lab.p}x0")

    agents["x"].call(op="raw", family=family, src=x_addr, dst=lan_addr, port=port, ttl=255,
                     ifname=f"{lab.p}x0", data=b"other-lan".hex())
    other = agents["1"].call(op="wait", id="other", count=1, within=5)
    assert received(other) == [("other-lan", x_addr)]
    agents["2"].call(op="send", id="t", data=b"marker".hex())
    lan = agents["1"].call(op="wait", id="lan", count=1, within=5)
    assert received(lan) == [("marker", LAN[family].format(2))]
    assert lan["counters"]["ttl_drops"] == 0 and lan["counters"]["foreign_drops"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_unicast_only_between_peers(lab: Lab, agents: dict[str, Agent], family: int) -> None:
    port = next(_ports)
    agents["1"].call(op="open", id="t", config=node_config(lab, 1, family, "unicast", port, peers=(2,)))
    agents["2"].call(op="open", id="t", config=node_config(lab, 2, family, "unicast", port, peers=(1,)))
    agents["3"].call(op="open", id="t", config=node_config(lab, 3, family, "unicast", port, peers=(1,)))

    # n3 lists n1 as a peer, but n1 does not list n3: dropped as foreign at n1
    agents["3"].call(op="send", id="t", data=b"from-n3".hex())
    # a peer's datagram with a low TTL: dropped at n1
    agents["2"].call(op="raw", family=family, src=LAN[family].format(2), dst=LAN[family].format(1),
                     port=port, ttl=1, ifname=lab.lan_if, data=b"ttl-1".hex())
    agents["2"].call(op="send", id="t", data=b"from-n2".hex())
    reply = agents["1"].call(op="wait", id="t", count=1, within=5)
    assert received(reply) == [("from-n2", LAN[family].format(2))]
    assert reply["counters"]["foreign_drops"] == 1
    assert reply["counters"]["ttl_drops"] == 1

    # n1 sends to its only peer n2, not to n3; then a marker to n3 over the same LAN
    reply = agents["1"].call(op="send", id="t", data=b"from-n1".hex())
    assert reply["counters"]["sent"] == 1
    assert received(agents["2"].call(op="wait", id="t", count=1, within=5)) == [
        ("from-n1", LAN[family].format(1))]
    agents["1"].call(op="raw", family=family, src=LAN[family].format(1), dst=LAN[family].format(3),
                     port=port, ttl=255, ifname=lab.lan_if, data=b"marker".hex())
    reply = agents["3"].call(op="wait", id="t", count=1, within=5)
    assert received(reply) == [("marker", LAN[family].format(1))]


def test_burst_larger_than_one_batch_is_fully_read(lab: Lab, agents: dict[str, Agent]) -> None:
    from vipless_failover.election.transport import RECV_BATCH

    port = next(_ports)
    burst = 3 * RECV_BATCH
    agents["1"].call(op="open", id="t", config=node_config(lab, 1, 4, "multicast", port))
    agents["2"].call(op="raw", family=4, src=LAN[4].format(2), dst=GROUP[4], port=port, ttl=255,
                     ifname=lab.lan_if, data=b"b".hex(), count=burst)
    reply = agents["1"].call(op="wait", id="t", count=burst, within=5)
    assert sorted(d for d, _ in received(reply)) == sorted(f"b-{n}" for n in range(burst))


def test_send_errors_are_counted_not_raised(lab: Lab, agents: dict[str, Agent]) -> None:
    port = next(_ports)
    for transport in ("multicast", "unicast"):
        cfg = node_config(lab, 3, 4, transport, port, interface=lab.down_if, address="203.0.113.9")
        cfg["election"]["peers"] = ["203.0.113.10"]
        agents["3"].call(op="open", id=transport, config=cfg)
        for _ in range(3):
            reply = agents["3"].call(op="send", id=transport, data=b"x".hex())
        assert reply["counters"]["send_errors"] == 3 and reply["counters"]["sent"] == 0
    # the link comes up: sending works again on the same transports
    _ip("-n", lab.n[3], "link", "set", f"{lab.p}d1", "up")
    _ip("-n", lab.n[3], "link", "set", lab.down_if, "up")
    for transport in ("multicast", "unicast"):
        reply = agents["3"].call(op="send", id=transport, data=b"x".hex())
        assert reply["counters"]["send_errors"] == 3 and reply["counters"]["sent"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_datagrams_read_late_keep_their_receive_time(lab: Lab, agents: dict[str, Agent], family: int) -> None:
    """While n1's loop is stopped (a blocking sleep stands in for SIGSTOP), n2 sends
    three datagrams 0.1 s apart; then n1 drains the socket before anything else, as the
    daemon does before a timer: every datagram is read, and each carries its kernel
    receive time on the loop's clock (CLOCK_MONOTONIC, shared by the namespaces), not
    the time it was read."""
    port = next(_ports)
    for i in (1, 2):
        agents[str(i)].call(op="open", id="t", config=node_config(lab, i, family, "multicast", port))
    stalled: dict[str, Any] = {}
    stall = threading.Thread(target=lambda: stalled.update(agents["1"].call(op="stall", id="t", seconds=0.6)))
    stall.start()
    try:
        time.sleep(0.1)
        sent_at = []
        for n in range(3):
            sent_at.append(agents["2"].call(op="send", id="t", data=f"late-{n}".encode().hex())["sent_at"])
            time.sleep(0.1)
    finally:
        stall.join(CALL_TIMEOUT)
    assert stalled["drained"] == 3 and stalled["stalled_until"] - sent_at[0] > 0.3
    got = stalled["received"]
    assert [bytes.fromhex(d).decode() for d, _src, _rx in got] == ["late-0", "late-1", "late-2"]
    for (_d, _src, rx), sent in zip(got, sent_at, strict=True):
        assert sent - 0.001 <= rx <= sent + 0.02, (rx, sent)
    assert stalled["counters"]["drained"] == 3


def test_a_long_stop_loses_no_datagram(lab: Lab, agents: dict[str, Agent]) -> None:
    """600 adverts wait while the reader is stopped (6 s of a 10 ms master; the kernel's
    default buffer keeps ~256): the transport's receive buffer keeps them all, and one
    drain reads them all."""
    port = next(_ports)
    agents["1"].call(op="open", id="t", config=node_config(lab, 1, 4, "multicast", port))
    stalled: dict[str, Any] = {}
    stall = threading.Thread(target=lambda: stalled.update(agents["1"].call(op="stall", id="t", seconds=1.0)))
    stall.start()
    try:
        time.sleep(0.1)
        for n in range(6):  # in slices: the senders' own queues must not be what drops
            agents["2"].call(op="raw", family=4, src=LAN[4].format(2), dst=GROUP[4], port=port, ttl=255,
                             ifname=lab.lan_if, data=f"s{n}".encode().hex(), count=100)
            time.sleep(0.05)
    finally:
        stall.join(CALL_TIMEOUT)
    assert stalled["drained"] == 600, stalled["counters"]
    assert stalled["counters"]["received"] == 600


def test_receive_time_converts_the_kernel_stamp_and_survives_clock_steps() -> None:
    from vipless_failover.election.transport import receive_time

    # wall 1000.0 = loop 50.0; the socket was last found empty at loop 40.0
    assert receive_time(997.5, 1000.0, 50.0, 40.0) == pytest.approx(47.5)  # read 2.5 s late: kept
    assert receive_time(None, 1000.0, 50.0, 40.0) == 50.0  # no stamp: the read time
    # the wall clock stepped back 1 h after the arrival: never in the future
    assert receive_time(997.5 + 3600, 1000.0, 50.0, 40.0) == 50.0
    # stepped forward 1 h: never before the socket was last seen empty
    assert receive_time(997.5 - 3600, 1000.0, 50.0, 40.0) == 40.0


def test_open_fails_clearly_without_the_interface(lab: Lab, agents: dict[str, Agent]) -> None:
    cfg = node_config(lab, 1, 4, "multicast", next(_ports), interface="nosuchif0")
    with pytest.raises(RuntimeError, match="no interface 'nosuchif0'"):
        agents["1"].call(op="open", id="t", config=cfg)


# ---------------------------------------------------------------------------
# the agent (this file run as a script inside a namespace)


async def _agent_main() -> None:
    import socket

    import structlog

    from vipless_failover import config

    # stdout carries the JSON replies: logs go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from vipless_failover.election.transport import AdvertTransport

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transports: dict[str, AdvertTransport] = {}
    inbox: dict[str, list[tuple[str, str, float]]] = {}
    arrived = asyncio.Event()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def raw_send(cmd: dict[str, Any]) -> None:
        fam = socket.AF_INET if cmd["family"] == 4 else socket.AF_INET6
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cmd["ifname"].encode())
            ifindex = socket.if_nametoindex(cmd["ifname"])
            if fam == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, cmd["ttl"])
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, cmd["ttl"])
                s.bind((cmd["src"], 0))
                dest: tuple[Any, ...] = (cmd["dst"], cmd["port"])
            else:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, cmd["ttl"])
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, cmd["ttl"])
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                s.bind((cmd["src"], 0))
                dest = (cmd["dst"], cmd["port"], 0, ifindex)
            for n in range(min(int(cmd.get("count", 1)), 1000)):  # bounded
                payload = bytes.fromhex(cmd["data"])
                s.sendto(payload + (b"-%d" % n if "count" in cmd else b""), dest)

    while True:
        line = await asyncio.wait_for(reader.readline(), timeout=120)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "exit":
                break
            if op == "ping":
                reply({"ok": True})
            elif op == "open":
                name = cmd["id"]
                inbox[name] = []

                def on_datagram(data: bytes, src: Any, rx_time: float,
                                box: list[tuple[str, str, float]] = inbox[name]) -> None:
                    box.append((data.hex(), str(src), rx_time))
                    arrived.set()

                cfg = config.parse(cmd["config"], "<lab>")
                transports[name] = await AdvertTransport.open(cfg, on_datagram)
                reply({"ok": True})
            elif op == "send":
                t = transports[cmd["id"]]
                t.send(bytes.fromhex(cmd["data"]))
                reply({"counters": t.counters().as_dict(), "sent_at": loop.time()})
            elif op == "raw":
                raw_send(cmd)
                reply({"ok": True})
            elif op == "stall":  # the loop stops (as if SIGSTOPped), then drains first
                time.sleep(min(float(cmd["seconds"]), 5.0))
                stalled_until = loop.time()
                box = inbox[cmd["id"]]
                before = len(box)
                drained = transports[cmd["id"]].drain()
                reply({"drained": drained, "stalled_until": stalled_until, "received": box[before:],
                       "counters": transports[cmd["id"]].counters().as_dict()})
            elif op == "wait":
                deadline = loop.time() + cmd["within"]
                box = inbox[cmd["id"]]
                while len(box) < cmd["count"] and loop.time() < deadline:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        break
                reply({"received": box, "counters": transports[cmd["id"]].counters().as_dict()})
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
            reply({"error": f"{type(exc).__name__}: {exc}"})
    for t in transports.values():
        t.close()


if __name__ == "__main__" and sys.argv[1:] == ["agent"]:
    asyncio.run(_agent_main())
