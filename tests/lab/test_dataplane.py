"""Data plane on the host kernel, in network namespaces (root; no IPVS on this kernel).

The Dataplane runs in this test process and acts on a namespace through its
``netns`` argument (netlink sockets opened inside it, ``nft`` under ``ip netns exec``).

Topology (P = per-run prefix; everything is removed at the end, even on failure)::

    P-c (client)  Pc0 203.0.113.2/24 --- Pr0 203.0.113.1/24  P-r (router, forwarding)
                                          Pr1 192.0.2.1/24  --- Pd0 192.0.2.11/24  P-d (director)
    router: 198.51.100.0/24 via 192.0.2.11 (routed VIPs; the director has no VIP anywhere)

A responder in P-d binds the VIP 198.51.100.10:PORT with IP_TRANSPARENT. The client
gets an answer only while the director delivers (fwmark rule + nft mark): the
director does not forward, so without delivery the request is dropped.
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.factories import config_dict
from vipless_failover import config
from vipless_failover.dataplane import Dataplane

pytestmark = pytest.mark.lab

VIP = "198.51.100.10"
PORT = 5300
IP_TRANSPARENT = 19
REPAIR_BOUND_S = 1.0


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=15)


class Lab:
    def __init__(self) -> None:
        self.p = "vf" + secrets.token_hex(3)[:5]
        self.c, self.r, self.d = f"{self.p}-c", f"{self.p}-r", f"{self.p}-d"
        self.namespaces: list[str] = []

    def addns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        p = self.p
        for ns in (self.c, self.r, self.d):
            self.addns(ns)
        sh("ip", "-n", self.c, "link", "add", f"{p}c0", "type", "veth", "peer", "name", f"{p}r0", "netns", self.r)
        sh("ip", "-n", self.d, "link", "add", f"{p}d0", "type", "veth", "peer", "name", f"{p}r1", "netns", self.r)
        for ns, dev, addr in ((self.c, f"{p}c0", "203.0.113.2/24"), (self.r, f"{p}r0", "203.0.113.1/24"),
                              (self.r, f"{p}r1", "192.0.2.1/24"), (self.d, f"{p}d0", "192.0.2.11/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.c, "route", "add", "default", "via", "203.0.113.1")
        sh("ip", "-n", self.d, "route", "add", "default", "via", "192.0.2.1")
        sh("ip", "-n", self.r, "route", "add", "198.51.100.0/24", "via", "192.0.2.11")
        sh("ip", "netns", "exec", self.r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", self.d, "sysctl", "-qw", "net.ipv4.ip_forward=0")

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    # --- looking at the director -----------------------------------------
    def run(self, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.d, *args, check=check).stdout

    def rules(self, family: int = 4) -> str:
        return self.run("ip", f"-{family}", "rule", "show")

    def routes(self, table: str = "100", family: int = 4) -> str:
        return self.run("ip", f"-{family}", "route", "show", "table", table)

    def nft(self) -> str:
        return self.run("nft", "list", "ruleset")

    def snapshot(self) -> dict[str, str]:
        return {"rules4": self.rules(4), "rules6": self.rules(6), "routes4": self.routes(family=4),
                "routes6": self.routes(family=6), "nft": self.nft()}


class Responder:
    """UDP echo on VIP:PORT in the director namespace (IP_TRANSPARENT: no VIP on any interface)."""

    def __init__(self, ns: str):
        from pyroute2 import netns as pr_netns
        self.sock = pr_netns.create_socket(ns, socket.AF_INET, socket.SOCK_DGRAM, 0, flags=0)
        self.sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        self.sock.bind((VIP, PORT))
        self.sock.settimeout(0.05)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(b"re:" + data, peer)

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.sock.close()


class Client:
    def __init__(self, ns: str):
        from pyroute2 import netns as pr_netns
        self.sock = pr_netns.create_socket(ns, socket.AF_INET, socket.SOCK_DGRAM, 0, flags=0)
        self.sock.bind(("203.0.113.2", 0))
        self.n = 0

    def ask(self, timeout: float = 0.3) -> bool:
        """One request, True if answered (stale answers are skipped by their sequence)."""
        self.n += 1
        msg = f"q{self.n}".encode()
        self.sock.sendto(msg, (VIP, PORT))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(2048)
            except TimeoutError:
                return False
            if data == b"re:" + msg:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


CFG: dict[str, Any] = config_dict(
    node={"name": "d"},
    election={"cluster_id": 9, "priority": 100, "key_file": "/nonexistent"},
    delivery={"table": 100, "rule_priority": 100, "rules": [{"fwmark": 1}]},
    marks=[{"name": "udp", "fwmark": 1, "destinations": ["198.51.100.0/24"], "protocols": ["udp"],
            "ports": [PORT]}],
    ipvs={"services": [{"fwmark": 1, "reals": [{"address": "203.0.113.21"}]}]},
    dataplane={"reconcile_interval_s": 60},
)


def make_cfg(**over: Any) -> config.Config:
    data = json.loads(json.dumps(CFG))
    data.update(over)
    return config.parse(data, "lab.toml")


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def traffic(lab: Lab) -> Iterator[Client]:
    responder = Responder(lab.d)
    client = Client(lab.c)
    try:
        yield client
    finally:
        client.close()
        responder.close()


@pytest.fixture
async def dp_factory(lab: Lab, tmp_path: Path) -> Any:
    made: list[Dataplane] = []

    def make(cfg: config.Config | None = None) -> Dataplane:
        dp = Dataplane(cfg or make_cfg(), structlog.get_logger().bind(ns=lab.d), netns=lab.d,
                       ipvs_owned_path=tmp_path / "ipvs-owned.json")
        made.append(dp)
        return dp

    try:
        yield make
    finally:
        for dp in made:
            try:
                await asyncio.wait_for(dp.close(), 10)
            except TimeoutError:
                for t in asyncio.all_tasks():
                    t.print_stack()
                raise


async def ask(client: Client) -> bool:
    return await asyncio.to_thread(client.ask)


async def wait_for(pred: Any, bound: float) -> float:
    """Seconds until pred() holds; fails after ``bound``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > bound:
            pytest.fail(f"not within {bound} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_delivery_only_while_master(lab: Lab, traffic: Client, dp_factory: Any) -> None:
    dp = dp_factory()
    await dp.start()
    assert not dp.status()["ipvs_available"]  # this kernel: said so, the rest runs
    # backup (warm): routes and marks, no rule; the client gets nothing
    await dp.set_delivery(False)
    assert "proto 98" not in lab.rules(4) and "proto 98" not in lab.rules(6)
    assert "local default dev lo proto 98 scope host" in lab.routes(family=4)
    assert "local default dev lo proto 98" in lab.routes(family=6)
    assert "meta mark set 0x00000001" in lab.nft()
    assert not await ask(traffic)
    # master: one rule per family, and the VIP answers though no interface holds it
    ops = dp.status()["reconcile"]["operations"]
    await dp.set_delivery(True)
    assert dp.status()["reconcile"]["operations"] - ops == 2  # rules only
    assert "100:\tfrom all fwmark 0x1 lookup 100 proto 98" in lab.rules(4)
    assert "100:\tfrom all fwmark 0x1 lookup 100 proto 98" in lab.rules(6)
    assert VIP not in lab.run("ip", "addr")
    assert await ask(traffic)
    assert dp.status()["objects"] == {"rules": 2, "routes": 2, "nft_rules": 1, "ipvs_services": 0, "ipvs_reals": 0}
    # back to backup: no answer again
    await dp.set_delivery(False)
    assert "proto 98" not in lab.rules(4)
    assert not await ask(traffic)
    await dp.set_delivery(True)
    assert await ask(traffic)
    # stop: everything of ours is gone
    await dp.stop()
    assert "proto 98" not in lab.rules(4) + lab.rules(6) + lab.routes(family=4) + lab.routes(family=6)
    assert "vipless_failover" not in lab.nft()
    assert not await ask(traffic)
    assert dp.status()["reconcile"]["errors"] == 0


async def test_deleted_rule_is_repaired_within_a_second(lab: Lab, traffic: Client, dp_factory: Any) -> None:
    dp = dp_factory()
    await dp.start()
    await dp.set_delivery(True)
    assert await ask(traffic)
    for family in (4, 6):
        before = dp.status()["reconcile"]["drift_repairs"]
        lab.run("ip", f"-{family}", "rule", "del", "prio", "100", "fwmark", "1", "table", "100")
        took = await wait_for(lambda: "fwmark 0x1 lookup 100 proto 98" in lab.rules(family), REPAIR_BOUND_S)
        assert took < REPAIR_BOUND_S
        await wait_for(lambda: dp.status()["reconcile"]["drift_repairs"] == before + 1, 0.5)
    # our local route deleted by hand: also repaired
    lab.run("ip", "route", "del", "local", "default", "dev", "lo", "table", "100")
    await wait_for(lambda: "local default dev lo proto 98" in lab.routes(family=4), REPAIR_BOUND_S)
    assert await ask(traffic)


async def test_flushed_or_deleted_nft_table_is_repaired(lab: Lab, traffic: Client, dp_factory: Any) -> None:
    dp = dp_factory()
    await dp.start()
    await dp.set_delivery(True)
    for how in (["flush", "table", "inet", "vipless_failover"], ["delete", "table", "inet", "vipless_failover"],
                ["delete", "chain", "inet", "vipless_failover", "prerouting"]):
        before = dp.status()["reconcile"]["drift_repairs"]
        lab.run("nft", *how)
        assert "meta mark set" not in lab.nft()
        await wait_for(lambda: "meta mark set 0x00000001" in lab.nft(), REPAIR_BOUND_S)
        await wait_for(lambda: dp.status()["reconcile"]["drift_repairs"] == before + 1, 0.5)
    # a rule added to our table by someone is drift too: the table is restored as defined
    lab.run("nft", "add", "rule", "inet", "vipless_failover", "prerouting", "meta", "mark", "set", "0x9")
    await wait_for(lambda: "0x00000009" not in lab.nft(), REPAIR_BOUND_S)
    assert await ask(traffic)


async def test_foreign_objects_are_never_touched(lab: Lab, dp_factory: Any) -> None:
    # someone else's: a rule in our table at our priority, a rule of another protocol (99,
    # which iproute2 names "openr"),
    # a route in our table, a route in another table, nft tables (one with our name in
    # another family)
    lab.run("ip", "rule", "add", "prio", "100", "fwmark", "7", "table", "100")
    lab.run("ip", "-6", "rule", "add", "prio", "100", "fwmark", "1", "table", "100", "proto", "99")
    lab.run("ip", "rule", "add", "prio", "300", "to", "203.0.113.0/24", "table", "300")
    lab.run("ip", "route", "add", "unreachable", "203.0.113.0/24", "table", "100")
    lab.run("ip", "route", "add", "local", "default", "dev", "lo", "table", "300")
    lab.run("nft", "add", "table", "inet", "other")
    lab.run("nft", "add", "chain", "inet", "other", "c", "{ type filter hook prerouting priority -150 ; }")
    lab.run("nft", "add", "rule", "inet", "other", "c", "meta", "mark", "set", "0x7")
    lab.run("nft", "add", "table", "ip", "vipless_failover")

    def foreign() -> list[str]:
        out = [line for line in (lab.rules(4) + lab.rules(6)).splitlines()
               if "fwmark 0x7" in line or "proto openr" in line or "proto 99" in line
               or "lookup 300" in line]
        out += [line for line in lab.routes("100").splitlines() if "unreachable" in line]
        out += lab.routes("300").splitlines()
        nft = lab.nft()
        out += [nft[nft.index("table inet other"):].split("}\n}")[0], str("table ip vipless_failover" in nft)]
        return out

    before = foreign()
    assert len(before) == 7 and before[-1] == "True"
    dp = dp_factory()
    await dp.start()
    await dp.set_delivery(True)
    assert foreign() == before
    # the other protocol's rule has the same selectors as ours: both exist side by side
    assert lab.rules(6).count("fwmark 0x1 lookup 100") == 2
    await dp.set_delivery(False)
    assert foreign() == before
    await dp.stop()
    assert foreign() == before
    assert "proto 98" not in lab.rules(4) + lab.rules(6) + lab.routes()
    assert "table inet vipless_failover" not in lab.nft()
    assert dp.status()["reconcile"]["errors"] == 0


async def test_restart_adopts_with_zero_operations_and_no_loss(lab: Lab, traffic: Client,
                                                               dp_factory: Any) -> None:
    first = dp_factory()
    await first.start()
    await first.set_delivery(True)
    state = lab.snapshot()
    answered: list[bool] = []
    stop = threading.Event()

    def probe() -> None:  # bounded: at most 200 requests, ~10 ms apart
        for _ in range(200):
            if stop.is_set():
                return
            answered.append(traffic.ask(timeout=0.2))
            time.sleep(0.01)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    await asyncio.sleep(0.1)
    await first.close()  # process goes away, kernel state stays
    second = dp_factory()
    await second.start()
    await second.set_delivery(True)
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.to_thread(prober.join, 5)
    assert second.status()["reconcile"]["operations"] == 0
    assert lab.snapshot() == state
    assert len(answered) >= 10 and all(answered), answered


async def test_stop_with_remove_on_stop_false_leaves_marks_for_adoption(lab: Lab, dp_factory: Any) -> None:
    cfg = make_cfg(dataplane={"remove_on_stop": False, "reconcile_interval_s": 60})
    dp = dp_factory(cfg)
    await dp.start()
    await dp.set_delivery(True)
    await dp.stop()
    assert "proto 98" not in lab.rules(4) + lab.rules(6)
    assert "local default dev lo proto 98" in lab.routes()
    assert "meta mark set 0x00000001" in lab.nft()
    again = dp_factory(cfg)
    await again.start()
    await again.set_delivery(False)
    assert again.status()["reconcile"]["operations"] == 0


async def test_reload_applies_only_the_difference(lab: Lab, traffic: Client, dp_factory: Any) -> None:
    dp = dp_factory()
    await dp.start()
    await dp.set_delivery(True)
    rules_before = lab.rules(4) + lab.rules(6)
    ops = dp.status()["reconcile"]["operations"]
    marks = json.loads(json.dumps(CFG["marks"]))
    marks[0]["ports"] = [PORT, PORT + 1]
    await dp.reload(make_cfg(marks=marks))
    assert dp.status()["reconcile"]["operations"] - ops == 1  # the table, replaced once
    assert lab.rules(4) + lab.rules(6) == rules_before
    assert f"dport {{ {PORT}, {PORT + 1} }}" in lab.nft()
    assert await ask(traffic)
    # a new priority: rules move (added before the old are deleted)
    delivery = dict(CFG["delivery"], rule_priority=90)
    await dp.reload(make_cfg(marks=marks, delivery=delivery))
    assert "90:\tfrom all fwmark 0x1 lookup 100 proto 98" in lab.rules(4)
    assert "100:\tfrom all fwmark 0x1" not in lab.rules(4)
    assert await ask(traffic)
    assert dp.status()["reconcile"]["errors"] == 0


async def test_nft_refused_is_reported_not_raised(lab: Lab, dp_factory: Any) -> None:
    dp = dp_factory()
    dp._marks.nft = "vf-no-such-nft-binary"  # nftables missing
    await dp.start()
    await dp.set_delivery(True)
    st = dp.status()
    assert st["delivery"] and st["reconcile"]["errors"] >= 1
    assert "nftables unusable" in st["reconcile"]["last_error"]
    assert "fwmark 0x1 lookup 100 proto 98" in lab.rules(4)  # the rest runs
    # while nft keeps failing (retried with backoff), a deleted rule is still repaired at once
    lab.run("ip", "rule", "del", "prio", "100", "fwmark", "1", "table", "100")
    await wait_for(lambda: "fwmark 0x1 lookup 100 proto 98" in lab.rules(4), REPAIR_BOUND_S)
    runs = dp.status()["reconcile"]["runs"]
    await asyncio.sleep(0.5)  # failing retries back off: a handful of runs, not a busy loop
    assert dp.status()["reconcile"]["runs"] - runs <= 5


async def test_flip_is_in_line_and_what_it_installs_reads_back_unchanged(lab: Lab, traffic: Client,
                                                                          dp_factory: Any) -> None:
    # destinations the kernel reports in another form than the config's (a /0 has no
    # FRA_DST; inet_ntop writes ::200:0 as ::2.0.0.0) must not read as drift on every pass
    odd = [{"to": "0.0.0.0/0", "iif": "vfnone0"}, {"to": "::200:0/103"}]
    cfg = make_cfg(delivery=dict(CFG["delivery"], rules=[*CFG["delivery"]["rules"], *odd]))
    dp = dp_factory(cfg)
    await dp.start()
    await dp.set_delivery(False)
    assert dp.flip_ready()
    dp.flip(True)  # synchronous: the rules are in the kernel when it returns
    assert "100:\tfrom all fwmark 0x1 lookup 100 proto 98" in lab.rules(4)
    assert "100:\tfrom all iif vfnone0 [detached] lookup 100 proto 98" in lab.rules(4)
    assert "to ::2.0.0.0/103 lookup 100 proto 98" in lab.rules(6)  # iproute2 prints it so too
    assert await ask(traffic)
    await asyncio.sleep(0.3)  # the pass the flip's own notifications start has run
    st = dp.status()["reconcile"]
    assert st["drift_repairs"] == 0 and st["errors"] == 0
    assert dp.status()["objects"]["rules"] == 4
    # a second flip the same way changes nothing and leaves a check behind that finds nothing
    ops = st["operations"]
    dp.flip(True)
    await asyncio.sleep(0.3)
    assert dp.status()["reconcile"]["operations"] == ops
    assert dp.status()["reconcile"]["drift_repairs"] == 0
    dp.flip(False)
    assert "proto 98" not in lab.rules(4) + lab.rules(6)
    assert not await ask(traffic)


async def test_reads_find_ours_in_a_large_table_over_several_dump_chunks(lab: Lab) -> None:
    """The reconciler's reads are bare dumps on a socket of their own (rules.py): they
    must span several 64 kB chunks, skip other protocols and tables, and start afresh
    after a dump abandoned half read."""
    from vipless_failover.dataplane.desired import RouteSpec, RuleSpec
    from vipless_failover.dataplane.rules import RTM_GETROUTE, DeliveryRules, dump_request

    # 3,000 IPv6 routes of another protocol in another table: several chunks of a dump
    batch = "".join(f"route add unreachable 2001:db8:f:{i:x}::/64 table 200 proto 99\n" for i in range(3000))
    subprocess.run(["ip", "-6", "-n", lab.d, "-batch", "-"], input=batch, text=True, check=True, timeout=60)
    for cmd in (("ip", "route", "add", "local", "default", "dev", "lo", "table", "100", "proto", "98"),
                ("ip", "-6", "route", "add", "local", "default", "dev", "lo", "table", "100", "proto", "98"),
                ("ip", "route", "add", "local", "default", "dev", "lo", "table", "300", "proto", "98"),
                ("ip", "route", "add", "unreachable", "198.51.100.0/24", "table", "100", "proto", "99"),
                ("ip", "-6", "rule", "add", "prio", "100", "fwmark", "1", "table", "100", "proto", "98"),
                ("ip", "rule", "add", "prio", "100", "to", "198.51.100.0/24", "table", "100", "proto", "98"),
                ("ip", "rule", "add", "prio", "100", "fwmark", "7", "table", "100", "proto", "99")):
        lab.run(*cmd)
    rules = DeliveryRules(netns=lab.d)
    await rules.open()
    try:
        want_routes = {RouteSpec(4, 100, 98, "0.0.0.0/0"), RouteSpec(6, 100, 98, "::/0")}
        want_rules = {RuleSpec(6, 100, 100, 98, fwmark=1, mask=0xFFFFFFFF),
                      RuleSpec(4, 100, 100, 98, dst="198.51.100.0/24")}
        assert await rules.read_routes([98], [100]) == want_routes
        assert await rules.read_rules([98]) == want_rules
        # the foreign routes are there and span more than one chunk
        foreign = await rules._dump(RTM_GETROUTE, socket.AF_INET6, lambda data, off: True)
        assert sum(1 for m in foreign if m["proto"] == 99) == 3000
        assert sum(len(m.data) for m in foreign) > 3 * (1 << 16)
        # a dump abandoned half read: the kernel would refuse the next one on that socket
        # (EBUSY); the read fails once, then works on a fresh socket
        sock = rules._dump_sock
        assert sock is not None
        sock.send(dump_request(RTM_GETROUTE, socket.AF_INET6, 0x7FFFFFF0))
        with pytest.raises(OSError) as exc:
            await rules.read_routes([98], [100])
        assert exc.value.errno == errno.EBUSY
        assert rules._dump_sock is not sock and sock.fileno() == -1
        assert await rules.read_routes([98], [100]) == want_routes
    finally:
        rules.close()
