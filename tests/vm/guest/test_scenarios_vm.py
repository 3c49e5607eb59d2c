"""Scenarios 1, 4 and 6 of issue 6 on a kernel with IPVS (in the VM): the directors
forward VIP traffic by IPVS direct routing to two real servers, and established TCP
connections through the director are counted across each event.

One lab (netnslab.topology.Lab plus two real servers on the LAN with the VIPs on
``lo``), one pair of daemons (100 ms adverts), three events in a row, each measured
from the client with the prober (UDP every 10 ms + new TCP connections, to two VIPs)
and with long-lived TCP connections (``netnslab.conns``, one line every 100 ms each); the
new TCP connections come every 100 ms (TCP_EVERY):

* restart (6): ``failoverctl restart`` on the master: same PID, zero delivery
  operations by the new process, no probe lost while the process re-executes (the probe
  window holds the whole re-exec: 20-45 s here), every established connection alive;
* handover (4): ``failoverctl demote``: no UDP probe lost, one master at a time on the
  wire (bridge capture), established connections alive (``sh`` scheduler with
  ``sh-port`` on both directors + ``net.ipv4.vs.sloppy_tcp=1``: the new master sends a
  connection's next packet to the same real server);
* crash (1): LAN link down + SIGKILL of the master (``scenarios.power_off``): outage within
  3 x interval + skew + announce + 100 ms; established connections counted (they
  survive for the same reason).

The commands go to the daemon's control socket from the test process
(``Daemon.request``, what ``failoverctl`` sends), not through a new ``failoverctl``
process: its interpreter needs 6-7 s to start here, so the command reached the daemon
after the probe window it was meant to fall in (measured: restart at +6.4 s, the prober
sending until +4 s) and the window measured only that start-up's CPU load.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netnslab import capture, scenarios, topology
from netnslab.daemons import Cluster, Daemon, default_settings, event_time

VIPS = ("198.51.100.10", "198.51.100.11")
REALS = {"real-1": 21, "real-2": 22}
CONN_PORT = 8
INTERVAL = 100
#: a probe is lost if unanswered this long; under TCG a busy guest (a daemon re-exec
#: importing its modules) delays the prober's own loop by hundreds of ms
PROBE_TIMEOUT_MS = 1500
#: the client and the real servers stand for other machines: real-time here, so a busy
#: guest (the restarted daemon importing its modules on 2 emulated CPUs) does not
#: stall the instruments; the daemons run below them (DAEMON_PRIO)
RT = ("chrt", "-r", "5")
#: the daemons: real-time as the unit runs them, but below the instruments, which stand
#: for other machines and share the guest's 2 CPUs with them. At normal priority a
#: daemon was starved past its peer's master-down interval now and then (the peer took
#: over during the restart step, 1 run in 5); at SCHED_RR 10 (the unit's) the hand-over's
#: work starved the instruments instead (366 UDP probes lost in 2 s)
DAEMON_PRIO = ("chrt", "-r", "1")
#: the guest's packet processing (ksoftirqd) runs above every task, as a NIC's softirq
#: runs at interrupt exit on a real machine (see softirq_first)
SOFTIRQ_RT = ("chrt", "-f", "-p", "50")
#: the restart step's probe window (s): the re-exec takes 20-45 s here (its imports under
#: TCG, and past 57 s once); no longer than the peer's hold (restart_hold_ms below), past
#: which it takes over, and within netnslab.conns' 120 s bound (its connections last 1 s more)
RESTART_WINDOW_S = 110.0
#: every step opens a new TCP connection to each VIP every this many UDP rounds (every
#: 100 ms), not every round: measured in the guest with one every round (200
#: connections/s), the prober alone took 50-84% of an emulated CPU, softirq 33%, the
#: guest was 5-8% idle. The instruments run real-time: the daemons (normal priority) got
#: what was left, the restart's re-exec lasted past 107 s, and in the hand-over the new
#: master went silent long enough for the old one's master-down timer (a takeover 46 ms
#: after it had heard the new master's first advert, then a split brain). The UDP stream
#: keeps its 10 ms resolution and the "0 lost" checks are unchanged.
TCP_EVERY = 10
#: the crash step probes this long after its power-off call (s)
CRASH_AFTER_S = 5.0
#: the pair's first election in the guest (see dr_pair)
CONVERGE_S = 150


def logs(*daemons: Daemon, chars: int = 4000) -> str:
    """The tail of each daemon's log, for an assertion's message."""
    return "\n".join(f"{d.tag}: {d.log_text()[-chars:]}" for d in daemons)


def streams(res: dict[str, Any]) -> str:
    return ", ".join(f"{k}: lost {v['lost']} outage {v['outage']['ms']:.0f} ms rtt max {v['rtt_ms_max']}"
                     for k, v in res["streams"].items())
DR = {
    "marks": [{"name": "echo", "fwmark": 1, "destinations": ["198.51.100.0/24"], "protocols": ["tcp", "udp"],
               "ports": [topology.RESPONDER_PORT, CONN_PORT]}],
    # re-exec + imports take several seconds under QEMU TCG (the host needs < 1 s): the
    # peer must hold longer than the default 10 s, else it takes over (correctly) and
    # the restarted master comes back as a fresh start
    "election": {"restart_hold_ms": int(RESTART_WINDOW_S * 1000)},
    "delivery": {"rules": [{"fwmark": 1}, {"to": str(topology.VIP_NET4)}, {"to": str(topology.VIP_NET6)}]},
    "ipvs": {"services": [{"fwmark": 1, "family": "inet", "scheduler": "sh", "flags": ["sh-port"],
                           "reals": [{"address": f"192.0.2.{n}", "forward": "dr"} for n in REALS.values()]}]},
}


class Conns:
    """Long-lived TCP connections from the client through the director (background)."""

    def __init__(self, lab: topology.Lab, duration: float, count: int = 10):
        self.lab = lab
        stamp = time.monotonic_ns()
        self.out = lab.workdir / f"conns-{stamp}.json"
        log = lab.workdir / f"conns-client-{stamp}.log"
        self.sp = lab.spawn("client", [*RT, lab.python, "-m", "netnslab.conns", "client", "--port", str(CONN_PORT),
                                       "--count", str(count), "--duration", str(duration), "--out", str(self.out),
                                       *VIPS], name="conns-client", log=log)
        self.duration = duration
        deadline = time.monotonic() + 30
        while b"established" not in log.read_bytes():
            assert self.sp.popen.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert log.read_text().split()[1] == str(count), log.read_text()

    def result(self) -> dict[str, Any]:
        self.sp.popen.wait(timeout=self.duration + 60)
        self.lab.forget(self.sp)
        return json.loads(Path(self.out).read_text())


@pytest.fixture
def dr_pair():
    with topology.Lab() as lab:
        for name, n in REALS.items():
            lab.add_real_server(name, n, VIPS, conn_port=CONN_PORT)
        settings = {d: replace(s, overrides=DR)
                    for d, s in default_settings(lab.director_names, advert_interval_ms=INTERVAL).items()}
        cluster = Cluster(lab, settings)
        for d in cluster:
            d.command_prefix = list(DAEMON_PRIO)
        try:
            cluster.start()
            for p in lab.processes:
                if p.name.startswith(("responder-real", "conns-real")):
                    topology.run([*RT[:2], "-p", RT[2], str(p.pid)])
            # eight Python processes start at once here (two daemons, responders, the real
            # servers' tools) on two emulated CPUs; under TCG a daemon's imports alone
            # (pyroute2) take 40 s or more: wait for the first election accordingly
            cluster.wait_converged(CONVERGE_S, "director-a")
            for d in lab.director_names:
                lab.sysctl(d, "net.ipv4.vs.sloppy_tcp", "1")
            with softirq_first():
                yield lab, cluster
        finally:
            cluster.stop()
    assert scenarios.leftovers(lab.name) == []


def _ksoftirqd() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextlib.contextmanager
def softirq_first():
    """Every machine of the lab shares this guest's kernel: under TCG the softirq budget
    runs out at once, the network receive work goes to ksoftirqd (a normal-priority
    thread per CPU) and any busy normal-priority process (an interpreter starting, the
    daemon's re-exec importing its modules) delays every packet of every "machine"
    (measured: RTT through the director up to 400 ms with a failoverctl starting, 76 ms
    with ksoftirqd above it). On real machines a NIC's softirq runs at interrupt exit,
    ahead of any task: ksoftirqd runs above the tasks here, and back to normal after."""
    pids = _ksoftirqd()
    for pid in pids:
        topology.run([*SOFTIRQ_RT, str(pid)])
    try:
        yield
    finally:
        for pid in pids:
            topology.run(["chrt", "-o", "-p", "0", str(pid)])


def _say(line: str) -> None:
    print(line, flush=True)


def test_restart_handover_crash_with_ipvs_dr(dr_pair) -> None:
    lab, cluster = dr_pair
    a, b = cluster["director-a"], cluster["director-b"]
    ctx = scenarios.ScenarioContext(lab, cluster, INTERVAL, _say, targets=VIPS)
    ipvs = lab.exec("director-a", "ipvsadm", "-Ln").stdout
    assert "FWM  1 sh" in ipvs and "192.0.2.21:0" in ipvs and "Route" in ipvs, ipvs
    scenarios.warm_up(ctx)
    first = lab.probe(list(VIPS), count=20, interval_ms=10, timeout_ms=1000, tcp=True)
    assert first["summary"]["lost"] == 0 and set(first["summary"]["answered_by"]) == set(REALS), first["summary"]
    results: list[str] = []

    # -- 6. restart in place on the master ------------------------------------------
    # the window holds the whole re-exec: the restart lands 1 s in, the new process must
    # be master again at least 1 s before the prober stops sending
    pid0 = a.status_now()["pid"]
    conns = Conns(lab, duration=RESTART_WINDOW_S + 1.0)
    run = scenarios.start_probe(ctx, duration_s=RESTART_WINDOW_S, tcp=True, targets=VIPS,
                                timeout_ms=PROBE_TIMEOUT_MS, prefix=RT, tcp_every=TCP_EVERY)
    time.sleep(1.0)
    t = time.time()
    resp = a.request("restart", wait=60)
    assert resp and resp.get("ok"), resp
    deadline = time.monotonic() + RESTART_WINDOW_S - 3.0
    while True:
        st = a.status_now() if a.running else None
        if st and st.get("pid") == pid0 and st.get("uptime_s", 99) < time.time() - t + 1 and st["state"] == "MASTER":
            break
        assert time.monotonic() < deadline, f"not master again within the probe window: {a.log_text()[-2000:]}"
        time.sleep(0.1)
    t_back = time.time()
    res, cr = run.result(), conns.result()
    assert res["ended"] >= t_back + 1.0, (res["ended"], t_back)
    evs = a.events(current_run=True)
    started = [i for i, e in enumerate(evs) if e.get("event") == "started"]
    new_ops = [e.get("op") for e in evs[started[-1]:] if e.get("event") == "dataplane_op"]
    line = (f"restart: pid kept {st.get('pid') == pid0}, new process ops {new_ops}, probes lost "
            f"{res['summary']['lost']}/{res['summary']['sent']} ({streams(res)}), connections alive "
            f"{cr['alive']}/{cr['count']}, master again after {t_back - t:.1f} s")
    _say(line)
    results.append(line)
    assert st.get("pid") == pid0
    assert evs[started[-1]].get("resume") is True, evs[started[-1]]
    assert not [op for op in new_ops if op in scenarios.DELIVERY_OPS], new_ops
    assert res["summary"]["lost"] == 0, res["summary"]
    assert cr["alive"] == cr["count"], cr
    moved = scenarios.transitions_between(b, t)
    assert not moved, f"{moved}: {logs(a, b)}"

    # -- 4. graceful hand-over (demote) ------------------------------------------------
    cap = scenarios.start_capture(ctx)
    try:
        conns = Conns(lab, duration=5.0)
        run = scenarios.start_probe(ctx, duration_s=4.0, tcp=True, targets=VIPS, timeout_ms=PROBE_TIMEOUT_MS,
                                    prefix=RT, tcp_every=TCP_EVERY)
        time.sleep(1.0)
        t = time.time()
        resp = a.request("demote", wait=60, timeout=10.0)  # failoverctl demote (--timeout 10)
        assert resp and resp.get("ok"), resp
        try:
            cluster.wait_converged(10, b.tag)
        except topology.LabError as exc:
            raise AssertionError(f"{exc}; after the demote ({resp}): {logs(a, b)}") from None
        res, cr = run.result(), conns.result()
    finally:
        path = cap.stop()
    frames = scenarios.frames_of(ctx, path)
    sw = capture.switches(frames, t - 3 * INTERVAL / 1000)
    udp_lost = scenarios.udp_lost(res)
    line = (f"handover: UDP lost {udp_lost}, TCP probes lost {res['summary']['lost'] - udp_lost}, master-only "
            f"frames switched {[(round(x - t, 3), f, to) for x, f, to in sw]} ({streams(res)}), connections alive "
            f"{cr['alive']}/{cr['count']}")
    _say(line)
    results.append(line)
    assert udp_lost == 0, res["summary"]
    assert [(f, to) for _x, f, to in sw] == [(a.tag, b.tag)], sw
    assert cr["alive"] == cr["count"], cr
    ok, _end, det = scenarios.check_end(ctx, b, vips=VIPS)
    assert ok, det

    # -- 1. crash of the (new) master: SIGKILL + link down --------------------------------
    # the window runs CRASH_AFTER_S past the call: in the guest, `ip netns exec` + sh + ip
    # take up to ~1.7 s before the link goes down (measured: takeover logged +2,005 ms after
    # the call, client outage 101 ms), and a 2 s window then ended before the recovery
    conns = Conns(lab, duration=CRASH_AFTER_S + 2.0)
    run = scenarios.start_probe(ctx, duration_s=CRASH_AFTER_S + 1.0, tcp=True, targets=VIPS,
                                timeout_ms=PROBE_TIMEOUT_MS, prefix=RT, tcp_every=TCP_EVERY)
    time.sleep(1.0)
    t_kill = scenarios.power_off(lab, b)
    res, cr = run.result(), conns.result()
    takeover = a.wait_transition("MASTER", 5, after=t_kill - 0.001)
    takeover_ms = (event_time(takeover) - t_kill) * 1000
    bound = scenarios.crash_bound_ms(INTERVAL, a.settings.priority)
    outage = res["summary"]["outage_ms"]
    line = (f"crash: {a.tag} MASTER at +{takeover_ms:.0f} ms, client outage {outage:.0f} ms (bound {bound:.0f}), "
            f"lost {res['summary']['lost']} ({streams(res)}), connections alive {cr['alive']}/{cr['count']}")
    _say(line)
    results.append(line)
    assert outage <= bound, res["summary"]
    assert res["summary"]["recovered"]
    ok, _end, det = scenarios.check_end(ctx, a, vips=VIPS)
    assert ok, det
    assert cr["alive"] == cr["count"], cr
    print("\n".join(["VM scenario results:", *results]))
