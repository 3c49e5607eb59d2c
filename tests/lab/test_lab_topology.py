"""The lab itself: routing works, VIPs are delivered only by the delivery rules,
the responder answers from the VIP, the prober measures, and teardown leaves nothing."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from netnslab import prober, topology
from netnslab.topology import Lab

VIP4 = "198.51.100.10"
VIP6 = "2001:db8:100::10"


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {n["name"] for n in json.loads(out or "[]")}


@pytest.mark.lab
def test_client_reaches_router_and_directors_both_families(lab: Lab) -> None:
    for role, dst in [("client", "203.0.113.1"), ("client", "2001:db8:c::1"),
                      ("router", "192.0.2.11"), ("router", "192.0.2.12"),
                      ("router", "2001:db8:1::11"), ("router", "2001:db8:1::12"),
                      ("client", "192.0.2.11"), ("client", "2001:db8:1::12")]:
        p = lab.exec(role, "ping", "-c1", "-W2", dst, check=False)
        assert p.returncode == 0, f"{role} -> {dst}: {p.stdout}{p.stderr}"


@pytest.mark.lab
def test_layout_directors_hold_no_vip_and_router_routes_vips_on_link(lab: Lab) -> None:
    for d in lab.directors:
        addrs = json.loads(lab.ip(d.role, "-j", "addr", "show").stdout)
        local = [a["local"] for link in addrs for a in link.get("addr_info", [])]
        assert str(d.ip4) in local and str(d.ip6) in local
        assert not [a for a in local if a.startswith("198.51.100.") or a.startswith("2001:db8:100:")], local
        assert lab.ip(d.role, "rule", "show").stdout.count("lookup") == 3  # only local, main, default
    routes = lab.ip("router", "route", "show", str(topology.VIP_NET4)).stdout
    assert f"dev {lab.router.iface}" in routes and "via" not in routes
    assert lab.exec("router", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    # every name the lab made carries its prefix
    assert all(ns.startswith(lab.prefix) for ns in lab.state.namespaces)
    for ns in lab.state.namespaces:
        links = json.loads(topology.run(["ip", "-n", ns, "-j", "link", "show"]).stdout)
        assert all(link["ifname"] == "lo" or link["ifname"].startswith(lab.prefix) for link in links)


@pytest.mark.lab
def test_no_vip_answers_without_delivery_rules(lab: Lab) -> None:
    res = lab.probe([VIP4, VIP6], count=5, interval_ms=20, timeout_ms=300, tcp=True)
    assert res["summary"]["sent"] == 20
    assert res["summary"]["lost"] == 20
    assert res["summary"]["answered_by"] == {}
    entry = lab.neigh("router", VIP4)
    assert entry is None or "lladdr" not in entry, f"someone answered ARP for {VIP4}: {entry}"


@pytest.mark.lab
def test_manual_delivery_rules_make_director_a_answer_from_the_vip(lab: Lab) -> None:
    lab.add_manual_delivery("director-a")
    # IPv4: director-a's kernel answers the router's ARP for the VIP (rule by destination)
    # IPv6: the kernel answers NS only for its own addresses, so pin the neighbour here
    lab.ip("router", "-6", "neigh", "replace", VIP6, "lladdr", lab.mac("director-a"),
           "dev", lab.router.iface, "nud", "reachable")
    res = lab.probe([VIP4, VIP6], count=20, interval_ms=20, timeout_ms=1500, tcp=True)
    # the prober's UDP sockets are connected to the VIP: a reply from any other
    # source address would not be received, so "answered" means "answered from the VIP"
    assert res["summary"]["lost"] == 0, res["summary"]
    assert res["summary"]["answered_by"] == {"director-a": 80}
    for name, stream in res["streams"].items():
        assert stream["answered_by"] == {"director-a": 20}, name
        assert stream["switches"] == []
    assert lab.neigh("router", VIP4)["lladdr"] == lab.mac("director-a")

    # --tcp-every 5: a new TCP connection every fifth round only, UDP every round
    res = lab.probe([VIP4], count=20, interval_ms=20, timeout_ms=1500, tcp=True, tcp_every=5)
    assert res["summary"]["lost"] == 0, res["summary"]
    assert {k: v["sent"] for k, v in res["streams"].items()} == {f"udp {VIP4}": 20, f"tcp {VIP4}": 4}
    assert [p["seq"] for p in res["probes"] if p["proto"] == "tcp"] == [0, 5, 10, 15]

    # withdraw the rules: director-a stops answering although the router still sends to it
    lab.del_manual_delivery("director-a")
    res = lab.probe([VIP4, VIP6], count=5, interval_ms=20, timeout_ms=300)
    assert res["summary"]["lost"] == 10 and res["summary"]["answered_by"] == {}


@pytest.mark.lab
def test_prober_sees_the_switch_between_directors(lab: Lab) -> None:
    """Rules moved from a to b by hand while the prober runs: the prober reports
    who answered before and after, and the outage between."""
    lab.add_manual_delivery("director-a")
    lab.exec("client", "ping", "-c1", "-W2", VIP4, check=False)  # router resolves the VIP (ARP)
    out = lab.workdir / "switch.json"
    sp = lab.start_prober([VIP4], out=out, interval_ms=10, count=150, duration_s=5, timeout_ms=300)
    time.sleep(0.7)
    lab.del_manual_delivery("director-a")
    t_switch = time.time()
    lab.add_manual_delivery("director-b")
    # what a takeover's gratuitous ARP does for the router, done by hand here
    lab.ip("router", "neigh", "replace", VIP4, "lladdr", lab.mac("director-b"), "dev", lab.router.iface,
           "nud", "reachable")
    assert sp.popen.wait(timeout=15) == 0
    res = topology.read_prober(out)
    stream = res["streams"][f"udp {VIP4}"]
    assert stream["first_by"] == "director-a" and stream["last_by"] == "director-b"
    assert [(s["from"], s["to"]) for s in stream["switches"]] == [("director-a", "director-b")]
    seen = prober.after_event(res, t_switch)
    assert seen["before_by"] == "director-a" and seen["after_by"] == "director-b"
    assert 0 <= seen["switch_ms"] < 1000
    assert stream["outage"]["ms"] < 1000


@pytest.mark.lab
def test_teardown_leaves_nothing_even_on_failure(lab_required: None) -> None:
    lab = Lab()
    with pytest.raises(RuntimeError, match="boom"), lab:
        assert all(ns in _netns_names() for ns in lab.state.namespaces)
        responder_pids = [p.pid for p in lab.processes]
        assert len(responder_pids) == 2
        workdir = lab.workdir
        raise RuntimeError("boom")
    assert not [n for n in _netns_names() if n.startswith(lab.prefix)]
    assert not topology.state_path(lab.name).exists()
    assert not workdir.exists()
    for pid in responder_pids:
        assert not topology._proc_alive(pid, None)


@pytest.mark.lab
def test_netns_lab_down_removes_an_abandoned_lab(lab_required: None) -> None:
    lab = Lab().up()  # its owner "dies": nobody calls down()
    try:
        pids = [p.pid for p in lab.processes]
        assert topology.state_path(lab.name).exists()
        p = subprocess.run(["netns-lab", "down", lab.name], capture_output=True, text=True, timeout=60,
                           env=_venv_env())
        assert p.returncode == 0, p.stderr
        assert not [n for n in _netns_names() if n.startswith(lab.prefix)]
        assert not topology.state_path(lab.name).exists()
        assert not lab.workdir.exists()
        for pid in pids:
            assert not topology._proc_alive(pid, None)
        p = subprocess.run(["netns-lab", "down", lab.name], capture_output=True, text=True, timeout=60,
                           env=_venv_env())
        assert p.returncode == 1 and "no lab named" in p.stderr
    finally:
        if topology.state_path(lab.name).exists():
            topology.destroy(lab.name)


def _venv_env() -> dict[str, str]:
    import os
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


# -- the prober's analysis (pure) ---------------------------------------------


def _probes(spec: str, interval: float = 0.01) -> list[prober.Probe]:
    """'aa..bb' -> probes answered by director-a, lost, director-b ..."""
    names = {"a": "director-a", "b": "director-b", ".": None}
    return [prober.Probe("198.51.100.10", "udp", i, 1000.0 + i * interval, names[c], 0.1 if names[c] else None)
            for i, c in enumerate(spec)]


def test_analysis_outage_switch_and_loss() -> None:
    res = prober.result(_probes("aaaa.....bbb"), 10.0)
    s = res["streams"]["udp 198.51.100.10"]
    assert s["lost"] == 5 and s["answered"] == 7
    assert s["answered_by"] == {"director-a": 4, "director-b": 3}
    assert s["outage"]["lost"] == 5 and s["outage"]["ms"] == pytest.approx(50.0)
    assert s["outage"]["last_before"] == "director-a" and s["outage"]["first_after"] == "director-b"
    assert [(w["from"], w["to"], w["seq"]) for w in s["switches"]] == [("director-a", "director-b", 9)]
    assert res["summary"]["recovered"] is True
    seen = prober.after_event(res, 1000.035)
    assert seen == {"before_by": "director-a", "after_by": "director-b", "switch_ms": pytest.approx(55.0),
                    "lost_after": 5, "answered_after": {"director-b": 3}}


def test_analysis_longest_outage_wins_and_unrecovered_tail() -> None:
    s = prober.analyze_stream(_probes("a..a....a"), 10.0)
    assert s["outage"]["lost"] == 4 and s["outage"]["ms"] == pytest.approx(40.0)
    s = prober.analyze_stream(_probes("aa..."), 10.0)
    assert s["outage"]["recovered"] is False and s["outage"]["ms"] == pytest.approx(30.0)
    s = prober.analyze_stream(_probes("aaa"), 10.0)
    assert s["outage"]["ms"] == 0 and s["lost"] == 0 and s["switches"] == []


def test_prober_refuses_unbounded_runs() -> None:
    with pytest.raises(ValueError):
        prober.Prober(["198.51.100.10"], 7, 0.1, 10, 1, 100)
    with pytest.raises(ValueError):
        prober.Prober(["198.51.100.10"], 7, 10, prober.MAX_COUNT + 1, 1, 100)
    with pytest.raises(ValueError):
        prober.Prober(["198.51.100.10"], 7, 10, 10, prober.MAX_DURATION_S + 1, 100)
    with pytest.raises(ValueError):
        prober.Prober(["198.51.100.10"], 7, 10, 10, 1, 100, tcp=True, tcp_every=0)


@pytest.mark.lab
def test_a_second_lab_with_a_taken_name_refuses_and_leaves_the_first_intact(lab: Lab) -> None:
    with pytest.raises(topology.LabError, match="exists"), Lab(lab.name):
        pass
    assert topology.state_path(lab.name).exists()
    assert all(ns in _netns_names() for ns in lab.state.namespaces)


def test_list_says_so_when_there_is_no_lab(tmp_path, monkeypatch, capsys) -> None:
    from netnslab import cli
    monkeypatch.setattr(topology, "STATE_DIR", tmp_path / "none")
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.startswith("no labs (none has a state file under ")
