"""IPVS direct routing end to end on a real kernel (in the VM), driven by the daemon's
Dataplane (delivery rules + nft marks + IPVS from one config).

::

    client ---- router ---- [LAN bridge in router] ---- director-a  192.0.2.11
    203.0.113.2    .1 | 192.0.2.1                    |-- director-b  192.0.2.12
                      |                               |-- real-1      192.0.2.21  (VIP on lo)
    198.51.100.0/24 via the master director           `-- real-2      192.0.2.22  (VIP on lo)

The directors hold no VIP: their nft table marks VIP:7 traffic with fwmark 1, the
delivery rule ``fwmark 1 -> table 100 (local 0/0 dev lo)`` hands it to LOCAL_IN, where
the IPVS fwmark service forwards it by DR to a real server, which answers the client
directly from the VIP on its ``lo`` (arp_ignore=1 / arp_announce=2 keep it silent for
ARP). The router routes the VIP prefix to the master (a static stand-in for the
announce modes, which the host tier tests).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.factories import make_config
from vipless_failover import config
from vipless_failover.dataplane.reconcile import Dataplane

from .conftest import Namespaces, ipvsadm_ln, nsexec, sh

VIP = "198.51.100.10"
PORT = 7
REALS = {"real-1": "192.0.2.21", "real-2": "192.0.2.22"}
DIRECTORS = {"a": "192.0.2.11", "b": "192.0.2.12"}

CLIENT = r"""
import json, socket, sys, time
vip, port, n, tcp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "tcp"
out = []
deadline = time.monotonic() + 20
for i in range(n):
    if time.monotonic() > deadline:
        break
    req = f"req-{i}"
    try:
        if tcp:
            with socket.create_connection((vip, port), timeout=2) as s:
                s.sendall(req.encode() + b"\n")
                data = s.makefile("rb").readline()
                src = s.getpeername()[0]
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(req.encode(), (vip, port))
                data, (src, _) = s.recvfrom(2048)
        name, _, echoed = data.decode().strip().partition(" ")
        out.append({"req": req, "name": name, "echo": echoed, "src": src})
    except OSError as exc:
        out.append({"req": req, "error": str(exc)})
print(json.dumps(out))
"""


def cfg_for(name: str, address: str, real2_weight: int = 1) -> config.Config:
    return make_config(
        f"{name}.toml",
        node={"name": name, "address": address},
        delivery={"table": 100, "rule_priority": 100, "rules": [{"fwmark": 1}]},
        marks=[{"name": "echo", "fwmark": 1, "destinations": ["198.51.100.0/24"],
                "protocols": ["tcp", "udp"], "ports": [PORT]}],
        ipvs={"services": [{"fwmark": 1, "scheduler": "rr", "reals": [
            {"address": REALS["real-1"], "forward": "dr"},
            {"address": REALS["real-2"], "forward": "dr", "weight": real2_weight}]}]},
        announce={"mode": "none"},
    )


class DrLab:
    def __init__(self, netns: Namespaces, python: str):
        self.netns = netns
        self.python = python
        self.client = netns("client")
        self.router = netns("router")
        self.directors = {k: netns(f"dir-{k}") for k in DIRECTORS}
        self.reals = {k: netns(k) for k in REALS}
        r = self.router
        sh("ip", "-n", r, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", self.client)
        sh("ip", "-n", r, "addr", "add", "203.0.113.1/24", "dev", "c0")
        sh("ip", "-n", r, "link", "set", "c0", "up")
        sh("ip", "-n", self.client, "addr", "add", "203.0.113.2/24", "dev", "eth0")
        sh("ip", "-n", self.client, "link", "set", "eth0", "up")
        sh("ip", "-n", self.client, "route", "add", "default", "via", "203.0.113.1")
        sh("ip", "-n", r, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", r, "addr", "add", "192.0.2.1/24", "dev", "br0")
        sh("ip", "-n", r, "link", "set", "br0", "up")
        nsexec(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        hosts = {**{ns: DIRECTORS[k] for k, ns in self.directors.items()},
                 **{ns: REALS[k] for k, ns in self.reals.items()}}
        for i, (ns, addr) in enumerate(hosts.items()):
            port = f"p{i}"
            sh("ip", "-n", r, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", r, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1")
        for name, ns in self.reals.items():
            for key in ("all", "eth0"):
                nsexec(ns, "sysctl", "-qw", f"net.ipv4.conf.{key}.arp_ignore=1",
                       f"net.ipv4.conf.{key}.arp_announce=2")
            sh("ip", "-n", ns, "addr", "add", f"{VIP}/32", "dev", "lo")
            netns.spawn(ns, python, "-m", "netnslab.responder", "--name", name, "--port", str(PORT),
                        "--lifetime", "240")
        for ns in self.reals.values():
            self._wait_listening(ns)

    def _wait_listening(self, ns: str) -> None:
        for _ in range(100):  # 10 s at most
            if nsexec(ns, "ss", "-Hlun", f"sport = :{PORT}").stdout.strip():
                return
            time.sleep(0.1)
        raise AssertionError(f"responder in {ns} not listening")

    def route_vips_to(self, director: str) -> None:
        sh("ip", "-n", self.router, "route", "replace", "198.51.100.0/24", "via", DIRECTORS[director])

    def requests(self, n: int, proto: str = "udp") -> list[dict[str, Any]]:
        proc = nsexec(self.client, self.python, "-c", CLIENT, VIP, str(PORT), str(n), proto, timeout=60)
        return json.loads(proc.stdout)


@pytest.fixture
def drlab(netns: Namespaces) -> DrLab:
    import sys
    return DrLab(netns, sys.executable)


def answered_by(results: list[dict[str, Any]]) -> list[str]:
    for r in results:
        assert "error" not in r, results
        assert r["src"] == VIP and r["echo"] == r["req"], r
    return [r["name"] for r in results]


async def test_dr_through_dataplane_weight_edit_and_failover(drlab: DrLab, tmp_path: Path) -> None:
    log = structlog.get_logger("vm-test")
    dps = {k: Dataplane(cfg_for(f"director-{k}", addr), log, netns=drlab.directors[k],
                        ipvs_owned_path=tmp_path / f"ipvs-{k}.json") for k, addr in DIRECTORS.items()}
    started: list[Dataplane] = []
    try:
        for dp in dps.values():
            await dp.start()
            started.append(dp)
            assert dp.ipvs_available
        await dps["a"].set_delivery(True)
        await dps["b"].set_delivery(False)
        drlab.route_vips_to("a")

        # both directors hold the IPVS service (warm standby), only a delivers
        for ns in drlab.directors.values():
            assert ipvsadm_ln(ns) == {"FWM 1 rr": ["192.0.2.21:0 Route 1 0 0", "192.0.2.22:0 Route 1 0 0"]}
        rules_a = nsexec(drlab.directors["a"], "ip", "rule", "show").stdout
        assert "fwmark 0x1 lookup 100" in rules_a
        assert "lookup 100" not in nsexec(drlab.directors["b"], "ip", "rule", "show").stdout

        names = answered_by(drlab.requests(8, "udp"))
        assert set(names) == {"real-1", "real-2"}, names  # rr over both reals
        names = answered_by(drlab.requests(4, "tcp"))
        assert set(names) <= {"real-1", "real-2"} and len(names) == 4

        # weight 0 for real-2 by diff: one IPVS edit, new connections all go to real-1
        ops_before = dps["a"].status()["reconcile"]["operations"]
        await dps["a"].reload(cfg_for("director-a", DIRECTORS["a"], real2_weight=0))
        assert dps["a"].status()["reconcile"]["operations"] - ops_before == 1
        assert ipvsadm_ln(drlab.directors["a"])["FWM 1 rr"][1].startswith("192.0.2.22:0 Route 0 ")
        assert set(answered_by(drlab.requests(6, "udp"))) == {"real-1"}

        # failover: a withdraws delivery, b delivers, the router follows b
        await dps["a"].set_delivery(False)
        await dps["b"].set_delivery(True)
        assert "lookup 100" not in nsexec(drlab.directors["a"], "ip", "rule", "show").stdout
        drlab.route_vips_to("b")
        names = answered_by(drlab.requests(8, "udp"))
        assert set(names) == {"real-1", "real-2"}, names
        assert len(answered_by(drlab.requests(2, "tcp"))) == 2
    finally:
        for dp in started:
            await dp.stop()
    # remove_on_stop (default): IPVS services gone from both directors
    for ns in drlab.directors.values():
        assert ipvsadm_ln(ns) == {}
