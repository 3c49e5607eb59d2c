"""Failure scenarios, each measured from the client (issue 6).

A scenario is a function ``(ScenarioContext) -> ScenarioResult`` registered under a
name with :func:`scenario`. The context holds a built lab, the running cluster and a
``say`` callback for narration; the result carries the one-line summary (outage ms,
lost requests, end state) and whether it met its bound.

:data:`ALL` lists the eleven scenarios of issue 6 in order, then the three pause cases of
issue 13 (``netns-lab scenario all``); ``master-kill`` (the demo: SIGKILL alone,
optional power-off) is registered too. Every
scenario ends with :func:`check_end`: exactly one master, the router's neighbour
entries of the VIPs point at its MAC, and every other running director has no delivery
rule, does not treat a VIP as local and is not announcing. :func:`run_scenario` builds
a fresh lab per scenario and, after tearing it down, checks that nothing of it is
left (namespaces, processes). docs/scenarios.md has the table of bounds and results.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vipless_failover import sched

from . import capture, prober, topology
from .configgen import NodeSettings
from .daemons import Cluster, Daemon, default_settings, event_time, master_down_ms


@dataclass
class ScenarioContext:
    lab: topology.Lab
    cluster: Cluster
    interval_ms: int
    say: Callable[[str], None] = print
    power_off: bool = False  # master-kill: also take the master's LAN link down
    targets: tuple[str, ...] = tuple(str(v) for v in topology.DEFAULT_VIPS if v.version == 4)


@dataclass
class ScenarioResult:
    name: str
    ok: bool
    outage_ms: float | None
    lost: int
    end_state: str
    bound_ms: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        outage = "-" if self.outage_ms is None else f"{self.outage_ms:.0f}"
        bound = "" if self.bound_ms is None else f" (bound {self.bound_ms:.0f} ms)"
        return (f"{'PASS' if self.ok else 'FAIL'} {self.name}: outage {outage} ms{bound}, "
                f"lost {self.lost}, end state: {self.end_state}")


SCENARIOS: dict[str, Callable[[ScenarioContext], ScenarioResult]] = {}
DESCRIPTIONS: dict[str, str] = {}
#: per scenario: node settings (lab, interval_ms) -> {director: NodeSettings}
SETTINGS: dict[str, Callable[[topology.Lab, int], dict[str, NodeSettings]]] = {}
#: per scenario: called with the cluster before it is started (e.g. a command prefix)
PREPARE: dict[str, Callable[[Cluster], None]] = {}
#: per scenario: an advert interval it always runs at, whatever is asked (ms)
INTERVALS: dict[str, int] = {}
#: the eleven scenarios of issue 6, then the pause cases of issue 13, in order
#: (``netns-lab scenario all``)
ALL: list[str] = []


def scenario(name: str, description: str, *, settings: Callable[[topology.Lab, int], dict[str, NodeSettings]]
             | None = None, prepare: Callable[[Cluster], None] | None = None, listed: bool = True,
             interval_ms: int | None = None):
    def register(fn: Callable[[ScenarioContext], ScenarioResult]):
        SCENARIOS[name] = fn
        DESCRIPTIONS[name] = description
        if interval_ms is not None:
            INTERVALS[name] = interval_ms
        if settings is not None:
            SETTINGS[name] = settings
        if prepare is not None:
            PREPARE[name] = prepare
        if listed:
            ALL.append(name)
        return fn
    return register


def end_state(cluster: Cluster) -> str:
    return ", ".join(f"{t}={s or 'stopped'}" for t, s in cluster.states().items())


def warm_up(ctx: ScenarioContext) -> None:
    """The router resolves every probed VIP before the event (a Linux router updates
    only entries it already has on gratuitous ARP/NA)."""
    ctx.lab.probe(list(ctx.targets), count=3, interval_ms=50, timeout_ms=1500)


def probe_around(ctx: ScenarioContext, event: Callable[[], float], *, lead_s: float = 1.0,
                 duration_s: float = 4.0, interval_ms: float = 10.0, tcp: bool = False,
                 targets: Sequence[str] | None = None) -> tuple[dict[str, Any], float]:
    """Run the prober, fire ``event`` (returns its unix time) ``lead_s`` after the
    first probe, wait for the prober; returns (prober result, event time)."""
    run = start_probe(ctx, duration_s=duration_s, interval_ms=interval_ms, tcp=tcp, targets=targets)
    time.sleep(lead_s)
    t_event = event()
    return run.result(), t_event


class ProbeRun:
    """The prober running in the background in the client (bounded by count and time)."""

    def __init__(self, ctx: ScenarioContext, *, duration_s: float, interval_ms: float = 10.0, tcp: bool = False,
                 targets: Sequence[str] | None = None, prefix: Sequence[str] = (), timeout_ms: float = 500.0,
                 tcp_every: int = 1):
        self.ctx = ctx
        self.duration_s = duration_s
        stamp = time.monotonic_ns()
        self.out = ctx.lab.workdir / f"probe-{stamp}.json"
        count = int(duration_s * 1000 / interval_ms)
        self.sp = ctx.lab.start_prober(list(targets or ctx.targets), out=self.out, interval_ms=interval_ms,
                                       count=count, duration_s=duration_s, timeout_ms=timeout_ms, tcp=tcp,
                                       log=ctx.lab.workdir / f"prober-{stamp}.log", prefix=prefix,
                                       tcp_every=tcp_every)
        _wait_started(self.sp, timeout=60)  # Python start-up under QEMU TCG takes seconds
        self.started = time.time()

    def result(self) -> dict[str, Any]:
        rc = self.sp.popen.wait(timeout=self.duration_s + 60)
        self.ctx.lab.forget(self.sp)
        if rc != 0:
            raise topology.LabError(f"prober exited {rc}: {self.sp.log and self.sp.log.read_text()[-1000:]}")
        return topology.read_prober(self.out)


def start_probe(ctx: ScenarioContext, **kw: Any) -> ProbeRun:
    return ProbeRun(ctx, **kw)


def _wait_started(sp: topology.Spawned, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sp.log is not None and b"started" in sp.log.read_bytes():
            return
        if sp.popen.poll() is not None:
            raise topology.LabError(f"prober exited early: {sp.log and sp.log.read_text()[-1000:]}")
        time.sleep(0.01)
    raise topology.LabError("prober did not start")


#: what the announcement may add to an outage: the GARP/NA burst is sent right after the
#: transition and the router applies it on receipt (measured: a few ms in the lab)
ANNOUNCE_ALLOWANCE_MS = 50.0


@scenario("master-kill", "SIGKILL the master (the demo; --power-off: its link too); the backup takes over",
          listed=False)
def master_kill(ctx: ScenarioContext) -> ScenarioResult:
    master = ctx.cluster.wait_converged(timeout=10, master=max(ctx.cluster, key=lambda d: d.settings.priority).tag)
    backup = next(d for d in ctx.cluster if d is not master and d.running)
    ctx.say(f"master: {master.tag} (priority {master.settings.priority}), backup: {backup.tag} "
            f"(priority {backup.settings.priority})")
    warm_up(ctx)
    def crash() -> float:
        t = master.kill()
        if ctx.power_off:  # the whole director dies: its kernel stops delivering too
            ctx.lab.ip(master.director, "link", "set", ctx.lab.director(master.director).iface, "down")
        return t

    res, t_kill = probe_around(ctx, crash)
    try:
        takeover = backup.wait_transition("MASTER", 5, after=t_kill - 0.001)
    except topology.LabError:
        takeover = None
    t_takeover = event_time(takeover) if takeover else None
    seen = prober.after_event(res, t_kill)
    takeover_bound = master_down_ms(ctx.interval_ms, backup.settings.priority) + 100
    bound = takeover_bound + ANNOUNCE_ALLOWANCE_MS
    outage = res["summary"]["outage_ms"]
    details = {"seen": seen, "summary": res["summary"], "takeover_bound_ms": takeover_bound,
               "takeover_ms": None if t_takeover is None else round((t_takeover - t_kill) * 1000, 1)}
    ok = (seen["after_by"] == backup.tag and res["summary"]["recovered"] and outage <= bound
          and details["takeover_ms"] is not None and details["takeover_ms"] <= takeover_bound)
    if ctx.power_off:
        ctx.say(f"killed {master.tag} (SIGKILL) and took its LAN link down (power loss) at t=0")
    else:
        ctx.say(f"killed {master.tag} (SIGKILL) at t=0; its kernel keeps the delivery rules it had, so "
                f"it still answers what the router sends it until {backup.tag}'s announcement moves the router")
    ctx.say(f"{backup.tag} logged MASTER at +{details['takeover_ms']} ms (bound "
            f"3 x {ctx.interval_ms} + skew + 100 = {takeover_bound:.0f} ms)")
    ctx.say(f"client: answered by {seen['before_by']} before, by {seen['after_by']} after; "
            f"first answer from {seen['after_by']} for a probe sent +{seen['switch_ms']} ms after the kill; "
            f"lost {res['summary']['lost']} of {res['summary']['sent']} probes; "
            f"longest outage {outage:.0f} ms")
    return ScenarioResult("master-kill", ok, outage, res["summary"]["lost"], end_state(ctx.cluster),
                          bound_ms=bound, details=details)


# ---------------------------------------------------------------------------
# helpers shared by the scenarios of issue 6

#: every VIP the scenarios probe: two IPv4 and one IPv6
ALL_VIPS: tuple[str, ...] = tuple(str(v) for v in topology.DEFAULT_VIPS)
DELIVERY_OPS = ("AddRule", "DeleteRule", "AddRoute", "DeleteRoute")
#: CPU hog length: 60 s, as the issue asks (NETNS_LAB_HOG_S shortens it for a quick local run)
HOG_S = float(os.environ.get("NETNS_LAB_HOG_S", "60"))
#: scheduling of the daemons in the starvation scenario, as the systemd unit runs them
#: (CPUSchedulingPolicy=rr, priority 10)
DAEMON_RT = ["chrt", "-r", "10"]


def crash_bound_ms(interval_ms: int, backup_priority: int) -> float:
    """Client outage bound of a crash: 3 x interval + skew + announce + 100 ms."""
    return master_down_ms(interval_ms, backup_priority) + ANNOUNCE_ALLOWANCE_MS + 100


def power_off(lab: topology.Lab, d: Daemon) -> float:
    """The whole director dies: its LAN link goes down and its daemon is SIGKILLed, in
    one shell in its namespace (link first: a slow ``ip`` start must not leave the dead
    director's kernel answering meanwhile). Returns the time just before."""
    if d.pid is None or not d.running:
        raise topology.LabError(f"{d.tag} is not running")
    t = time.time()
    lab.exec(d.director, "sh", "-c", f"ip link set dev {lab.director(d.director).iface} down; kill -9 {d.pid}")
    d.wait_exit(10)
    return t


def pair(ctx: ScenarioContext) -> tuple[Daemon, Daemon]:
    """(master, backup) after convergence: the higher priority is expected to win."""
    best = max(ctx.cluster, key=lambda d: d.settings.priority)
    master = ctx.cluster.wait_converged(timeout=10, master=best.tag)
    backup = next(d for d in ctx.cluster if d is not master)
    return master, backup


def cluster_key(cluster: Cluster) -> bytes:
    return Path(cluster.key_file).read_bytes().strip()


def mac_map(lab: topology.Lab) -> dict[str, str]:
    return {lab.mac(d).lower(): d for d in lab.director_names}


def start_capture(ctx: ScenarioContext, **kw: Any) -> capture.BridgeCapture:
    return capture.BridgeCapture(ctx.lab, **kw).start()


def frames_of(ctx: ScenarioContext, path: Path) -> list[capture.Frame]:
    d = next(iter(ctx.cluster))
    return capture.read_frames(path, key=cluster_key(ctx.cluster), cluster_id=d.settings.cluster_id,
                               macs=mac_map(ctx.lab))


def has_delivery(lab: topology.Lab, director: str, protocol: int = 98) -> bool:
    """Any rule tagged with the daemon's protocol number (v4 or v6)."""
    for fam in ("-4", "-6"):
        out = lab.ip(director, "-j", fam, "rule", "show").stdout.strip()
        for r in json.loads(out) if out else []:
            if str(r.get("protocol")) in (str(protocol), "98"):
                return True
    return False


def vip_is_local(lab: topology.Lab, director: str, vip: str) -> bool:
    out = lab.ip(director, "route", "get", vip, check=False).stdout
    return out.strip().startswith("local")


def check_end(ctx: ScenarioContext, master: Daemon, *, vips: Sequence[str] = ALL_VIPS,
              timeout: float = 5.0) -> tuple[bool, str, dict[str, Any]]:
    """Exactly one master (``master``), the router's neighbour entries of ``vips`` point
    at its MAC, every other running node: no delivery rule, no local VIP, not announcing."""
    problems: list[str] = []
    try:
        ctx.cluster.wait_converged(timeout, master=master.tag)
    except topology.LabError as exc:
        problems.append(str(exc))
    mac = ctx.lab.mac(master.director).lower()
    router: dict[str, str | None] = {}
    deadline = time.monotonic() + 2.0
    while True:  # the announcement may still be on its way
        router = {}
        for v in vips:
            n = ctx.lab.neigh("router", v)
            router[v] = (n or {}).get("lladdr")
        if all((m or "").lower() == mac for m in router.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    macs = mac_map(ctx.lab)
    wrong = {v: macs.get((m or "").lower(), m) for v, m in router.items() if (m or "").lower() != mac}
    if wrong:
        problems.append(f"router neighbour entries not at {master.tag}: {wrong}")
    for d in ctx.cluster:
        if d is master or not d.running:
            continue
        if has_delivery(ctx.lab, d.director):
            problems.append(f"{d.tag} (not master) has delivery rules")
        local = [v for v in vips if ":" not in v and vip_is_local(ctx.lab, d.director, v)]
        if local:
            problems.append(f"{d.tag} (not master) treats {local} as local")
        st = d.status() or {}
        if (st.get("announce") or {}).get("announcing"):
            problems.append(f"{d.tag} (not master) is announcing")
    text = end_state(ctx.cluster) + f"; router -> {master.tag}" + ("" if not wrong else f" (wrong: {wrong})")
    return not problems, text, {"end_problems": problems, "router": router}


def udp_lost(res: dict[str, Any], *, after: float = 0.0, before: float = float("inf"),
             target: str | None = None) -> int:
    return sum(1 for p in res["probes"] if p["proto"] == "udp" and p["by"] is None
               and after <= p["sent"] < before and (target is None or p["target"] == target))


def answered(res: dict[str, Any], *, after: float = 0.0, before: float = float("inf"),
             target: str | None = None, proto: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in res["probes"]:
        if p["by"] and after <= p["sent"] < before and (target is None or p["target"] == target) \
                and (proto is None or p["proto"] == proto):
            out[p["by"]] = out.get(p["by"], 0) + 1
    return out


def transitions_between(d: Daemon, t0: float, t1: float = float("inf")) -> list[tuple[str, str, str]]:
    out = []
    for e in d.transitions():
        t = event_time(e)
        if t is not None and t0 <= t < t1:
            out.append((str(e.get("from")), str(e.get("to")), str(e.get("reason"))))
    return out


def cpu_ticks(pids: int | list[int]) -> int:
    """User and system CPU ticks of ``pids`` (a daemon: :attr:`Daemon.pids`, both processes)."""
    total = 0
    for pid in [pids] if isinstance(pids, int) else pids:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(rest[11]) + int(rest[12])  # utime + stime
    return total


def _result(name: str, checks: dict[str, bool], res: dict[str, Any] | None, end: str,
            bound_ms: float | None, details: dict[str, Any], outage_ms: float | None = None,
            lost: int | None = None) -> ScenarioResult:
    failed = [k for k, v in checks.items() if not v]
    details = {**details, "checks": checks, "failed": failed}
    if res is not None:
        details["summary"] = res["summary"]
        if outage_ms is None:
            outage_ms = res["summary"]["outage_ms"]
    if lost is None:
        lost = res["summary"]["lost"] if res is not None else 0
    return ScenarioResult(name, not failed, outage_ms, lost,
                          end + ("" if not failed else f" [failed: {', '.join(failed)}]"),
                          bound_ms=bound_ms, details=details)


# ---------------------------------------------------------------------------
# 1. crash


@scenario("crash", "1. master SIGKILL + its LAN link down (power-off); the backup takes over")
def crash(ctx: ScenarioContext) -> ScenarioResult:
    master, backup = pair(ctx)
    warm_up(ctx)

    # SIGKILL alone leaves the dead master's delivery rules: its kernel keeps answering
    # (no outage to measure). A crashed director is modelled as link down + SIGKILL.
    res, t_kill = probe_around(ctx, lambda: power_off(ctx.lab, master), lead_s=1.0, duration_s=3.0, tcp=True,
                               targets=ALL_VIPS)
    takeover = backup.wait_transition("MASTER", 5, after=t_kill - 0.001)
    takeover_ms = (event_time(takeover) - t_kill) * 1000  # type: ignore[operator]
    bound = crash_bound_ms(ctx.interval_ms, backup.settings.priority)
    ok_end, end, det = check_end(ctx, backup)
    outage = res["summary"]["outage_ms"]
    seen = prober.after_event(res, t_kill)
    ctx.say(f"{master.tag}'s link taken down and daemon SIGKILLed at t=0; "
            f"{backup.tag} MASTER at +{takeover_ms:.0f} ms; "
            f"client outage {outage:.0f} ms (bound {bound:.0f}), lost {res['summary']['lost']}")
    return _result("crash", {
        "takeover_within_bound": takeover_ms <= bound - ANNOUNCE_ALLOWANCE_MS,
        "outage_within_bound": outage <= bound,
        "recovered": bool(res["summary"]["recovered"]),
        "new_director_answers": seen["after_by"] == backup.tag,
        "end_state": ok_end,
    }, res, end, bound, {**det, "takeover_ms": round(takeover_ms, 1), "seen": seen})


# ---------------------------------------------------------------------------
# 2. hung process


@scenario("hang", "2. master SIGSTOP 5 s then SIGCONT: backup takes over; the resumed master causes no 2nd outage")
def hang(ctx: ScenarioContext) -> ScenarioResult:
    master, backup = pair(ctx)
    warm_up(ctx)
    run = start_probe(ctx, duration_s=8.5, tcp=True, targets=ALL_VIPS)
    time.sleep(1.0)
    t_stop = master.signal(signal.SIGSTOP)
    try:
        takeover = backup.wait_transition("MASTER", 5, after=t_stop - 0.001)
        time.sleep(max(0.0, t_stop + 5.0 - time.time()))
    finally:
        t_cont = master.signal(signal.SIGCONT)
    res = run.result()
    takeover_ms = (event_time(takeover) - t_stop) * 1000  # type: ignore[operator]
    bound = crash_bound_ms(ctx.interval_ms, backup.settings.priority)
    # preempt on and a higher priority: the resumed master re-asserts; the backup yields
    expect = master if master.settings.preempt and master.settings.priority > backup.settings.priority else backup
    ok_end, end, det = check_end(ctx, expect)
    lost_resume = udp_lost(res, after=t_cont)
    outage = res["summary"]["outage_ms"]
    ctx.say(f"{master.tag} stopped at t=0; {backup.tag} MASTER at +{takeover_ms:.0f} ms; SIGCONT at +5 s; "
            f"UDP lost after SIGCONT {lost_resume}; end master {expect.tag}")
    return _result("hang", {
        "takeover_within_bound": takeover_ms <= bound - ANNOUNCE_ALLOWANCE_MS,
        "outage_within_bound": outage <= bound,
        "no_loss_after_resume": lost_resume == 0,
        "end_state": ok_end,
    }, res, end, bound, {**det, "takeover_ms": round(takeover_ms, 1), "lost_after_resume": lost_resume,
                         "master_transitions_after_resume": transitions_between(master, t_cont)})


# ---------------------------------------------------------------------------
# 3. LAN link down, then up


def _bridge_port(lab: topology.Lab, director: str) -> str:
    return lab.link("p-" + director.rsplit("-", 1)[-1][:3])


@scenario("link-down", "3. master LAN link down (cable pulled) then up: FAULT, takeover; on up per preempt")
def link_down(ctx: ScenarioContext) -> ScenarioResult:
    master, backup = pair(ctx)
    warm_up(ctx)
    port = _bridge_port(ctx.lab, master.director)
    run = start_probe(ctx, duration_s=6.5, tcp=True, targets=ALL_VIPS)
    time.sleep(1.0)
    t_down = time.time()
    # the switch port goes down: the director's link loses carrier (its routes stay)
    ctx.lab.ip("lan", "link", "set", port, "down")
    takeover = backup.wait_transition("MASTER", 5, after=t_down - 0.001)
    fault = master.wait_transition("FAULT", 5, after=t_down - 0.001)
    time.sleep(max(0.0, t_down + 2.5 - time.time()))
    t_up = time.time()
    ctx.lab.ip("lan", "link", "set", port, "up")
    res = run.result()
    takeover_ms = (event_time(takeover) - t_down) * 1000  # type: ignore[operator]
    fault_ms = (event_time(fault) - t_down) * 1000  # type: ignore[operator]
    bound = crash_bound_ms(ctx.interval_ms, backup.settings.priority)
    preempt = master.settings.preempt and master.settings.priority > backup.settings.priority
    expect = master if preempt else backup
    ok_end, end, det = check_end(ctx, expect)
    outage_down = max((s["outage"]["ms"] for s in res["streams"].values()), default=0.0)
    lost_up = udp_lost(res, after=t_up)
    ctx.say(f"port {port} down at t=0: {master.tag} FAULT at +{fault_ms:.0f} ms, {backup.tag} MASTER at "
            f"+{takeover_ms:.0f} ms; link up at +{(t_up - t_down):.1f} s: preempt={preempt}, UDP lost after "
            f"link up {lost_up}; end master {expect.tag}")
    return _result("link-down", {
        "takeover_within_bound": takeover_ms <= bound - ANNOUNCE_ALLOWANCE_MS,
        "outage_within_bound": outage_down <= bound,
        "no_loss_on_link_up": lost_up == 0,
        "end_state": ok_end,
    }, res, end, bound, {**det, "takeover_ms": round(takeover_ms, 1), "fault_ms": round(fault_ms, 1),
                         "lost_after_link_up": lost_up,
                         "lost_after_link_up_by_vip": {v: udp_lost(res, after=t_up, target=v) for v in ALL_VIPS},
                         "transitions_after_link_up": {d.tag: [(round((event_time(e) or t_up) - t_up, 3),
                                                                e.get("to"), e.get("reason"))
                                                               for e in d.transitions()
                                                               if (event_time(e) or 0) >= t_up - 0.001]
                                                       for d in (master, backup)}})


# ---------------------------------------------------------------------------
# 4. graceful hand-overs: demote, promote, SIGTERM


@scenario("handover", "4. demote, promote, SIGTERM: no UDP probe lost, never two nodes master/announcing")
def handover(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    cap = start_capture(ctx)
    try:
        run = start_probe(ctx, duration_s=7.0, tcp=True, targets=ALL_VIPS)
        time.sleep(1.0)
        t1 = time.time()
        r1 = a.ctl("demote")
        ctx.cluster.wait_converged(5, master=b.tag)
        time.sleep(max(0.0, t1 + 2.0 - time.time()))
        t2 = time.time()
        r2 = a.ctl("promote")
        ctx.cluster.wait_converged(5, master=a.tag)
        time.sleep(max(0.0, t2 + 2.0 - time.time()))
        t3 = a.term()
        a.wait_exit(10)
        res = run.result()
    finally:
        path = cap.stop()
    frames = frames_of(ctx, path)
    lead = 3 * ctx.interval_ms / 1000  # each window starts with the old master's steady adverts
    windows = {"demote": (t1 - lead, t2, a.tag, b.tag), "promote": (t2 - lead, t3, b.tag, a.tag),
               "sigterm": (t3 - lead, float("inf"), a.tag, b.tag)}
    sw = {k: capture.switches(frames, lo, hi) for k, (lo, hi, _o, _n) in windows.items()}
    # in each window the master-only frames come from the old master, then from the new
    # one: at most one change of sender (old -> new), and the new master sends the last
    last = {k: capture.last_masterish(frames, lo, hi) for k, (lo, hi, _o, _n) in windows.items()}
    one_switch = {k: len(v) == 1 and (v[0][1], v[0][2]) == windows[k][2:] and last[k] == windows[k][3]
                  for k, v in sw.items()}
    ok_end, end, det = check_end(ctx, b)
    lost_udp = udp_lost(res)
    ctx.say(f"demote (rc {r1.returncode}), promote (rc {r2.returncode}), SIGTERM: UDP lost {lost_udp}, "
            f"TCP lost {res['summary']['lost'] - lost_udp}; master-only frames switched sender "
            + ", ".join(f"{k}: {[(round(t - windows[k][0] - lead, 3), f, to) for t, f, to in v]}"
                        for k, v in sw.items()))
    return _result("handover", {
        "commands_ok": r1.returncode == 0 and r2.returncode == 0,
        "no_udp_lost": lost_udp == 0,
        "one_master_at_a_time": all(one_switch.values()),
        "end_state": ok_end,
    }, res, end, 0.0, {**det, "switches": sw, "frames": len(frames)})


# ---------------------------------------------------------------------------
# 5. partition between the directors only


def _partition_settings(lab: topology.Lab, interval_ms: int) -> dict[str, NodeSettings]:
    return default_settings(lab.director_names, advert_interval_ms=interval_ms, metrics_listen="127.0.0.1:9654")


def _scrape(lab: topology.Lab, director: str, port: int = 9654) -> str:
    code = (f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',"
            f"timeout=3).read().decode())")
    return lab.exec(director, lab.python, "-c", code, check=False, timeout=15).stdout


@scenario("partition", "5. partition between the directors only: split brain, said so; on heal one master",
          settings=_partition_settings)
def partition(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    pa, pb = _bridge_port(ctx.lab, a.director), _bridge_port(ctx.lab, b.director)
    table = f"{ctx.lab.name}part"
    rules = (f"table bridge {table} {{\n chain isolate {{\n  type filter hook forward priority 0; policy accept;\n"
             f"  iifname \"{pa}\" oifname \"{pb}\" drop\n  iifname \"{pb}\" oifname \"{pa}\" drop\n }}\n}}\n")
    run = start_probe(ctx, duration_s=7.0, tcp=True, targets=ALL_VIPS)
    time.sleep(1.0)
    t_part = time.time()
    ctx.lab.exec("lan", "nft", "-f", "-", input=rules)
    healed = False
    try:
        b.wait_transition("MASTER", 5, after=t_part)
        time.sleep(1.0)
        both = {d.tag: d.state() for d in ctx.cluster}
    finally:
        t_heal = time.time()
        ctx.lab.exec("lan", "nft", "delete", "table", "bridge", table, check=False)
        healed = True
    res = run.result()
    ok_end, end, det = check_end(ctx, a)
    notices = {d.tag: (d.status() or {}).get("notices", {}).get("split_brain", 0) for d in ctx.cluster}
    logged = {d.tag: sum(1 for e in d.events(current_run=True) if e.get("event") == "split_brain")
              for d in ctx.cluster}
    metric = {d.tag: next((line.split()[-1] for line in _scrape(ctx.lab, d.director).splitlines()
                           if line.startswith("vipless_failover_split_brain_episodes_total")), None)
              for d in ctx.cluster}
    lost_heal = udp_lost(res, after=t_heal)
    ctx.say(f"partition at t=0: states {both}; healed at +{t_heal - t_part:.1f} s; split-brain notices {notices}, "
            f"log events {logged}, metric episodes {metric}; UDP lost after heal {lost_heal}")
    return _result("partition", {
        "both_master_while_partitioned": set(both.values()) == {"MASTER"},
        "split_brain_logged": sum(logged.values()) > 0 and sum(notices.values()) > 0,
        "split_brain_metric": any(m not in (None, "0.0", "0") for m in metric.values()),
        "no_udp_lost": udp_lost(res) == 0,
        "healed": healed,
        "end_state": ok_end,
    }, res, end, 0.0, {**det, "states_partitioned": both, "notices": notices, "logged": logged, "metric": metric})


# ---------------------------------------------------------------------------
# 6. restart in place on the master


@scenario("restart", "6. failoverctl restart on the master (same PID): no loss, no kernel state withdrawn")
def restart(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    pid0 = (a.status() or {}).get("pid")
    mon_log = ctx.lab.workdir / "ip-monitor-rule.log"
    mon = ctx.lab.spawn(a.director, ["ip", "monitor", "rule", "route"], name="ip-monitor", log=mon_log)
    samples: list[bool] = []
    stop_polling = threading.Event()

    def poll() -> None:  # the delivery rules never disappear, sampled every ~20 ms
        while not stop_polling.is_set():
            samples.append(has_delivery(ctx.lab, a.director))
            time.sleep(0.02)

    run = start_probe(ctx, duration_s=5.0, tcp=True, targets=ALL_VIPS)
    time.sleep(1.0)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t = time.time()
    r = a.ctl("restart")
    try:
        deadline = time.monotonic() + 10
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = a.status() or {}
            except Exception:  # noqa: BLE001 - between the two processes
                st = {}
            if st.get("pid") == pid0 and st.get("state") == "MASTER" and st.get("uptime_s", 99) < time.time() - t + 1:
                break
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        stop_polling.set()
        poller.join(5)
    res = run.result()
    topology.stop_process(mon.pid, mon.starttime)
    ctx.lab.forget(mon)
    evs = a.events(current_run=True)
    started = [i for i, e in enumerate(evs) if e.get("event") == "started"]
    new_run = evs[started[-1]:] if started else []
    resumed = bool(new_run and new_run[0].get("resume"))
    ops = [e for e in new_run if e.get("event") == "dataplane_op"]
    delivery_ops = [e for e in ops if e.get("op") in DELIVERY_OPS]
    deleted = [line for line in mon_log.read_text().splitlines() if line.startswith("Deleted")]
    b_moves = transitions_between(b, t)
    ok_end, end, det = check_end(ctx, a)
    ctx.say(f"restart (rc {r.returncode}): pid {pid0} -> {st.get('pid')}, resumed={resumed}, new process "
            f"dataplane ops {len(ops)} (delivery {len(delivery_ops)}), rule samples {len(samples)} "
            f"(missing {samples.count(False)}), netlink deletions {len(deleted)}, lost {res['summary']['lost']}")
    return _result("restart", {
        "same_pid": st.get("pid") == pid0 and pid0 is not None,
        "resumed": resumed,
        "zero_delivery_ops": not delivery_ops,
        "rules_never_missing": bool(samples) and all(samples),
        "no_kernel_deletions": not deleted,
        "backup_unmoved": not b_moves,
        "no_loss": res["summary"]["lost"] == 0,
        "end_state": ok_end,
    }, res, end, 0.0, {**det, "ops": [e.get("op") for e in ops], "deleted": deleted[:5], "backup": b_moves})


# ---------------------------------------------------------------------------
# 7. config reload


def _reload_overrides(phase: int) -> dict[str, Any]:
    """Before: VIPs .10, .11, ::10; mark group ``old`` (fwmark 7, .11) with its service.
    After: .11 removed, .20 added with mark group ``new`` (fwmark 8) and its service."""
    v4 = ["198.51.100.10", "198.51.100.11"] if phase == 0 else ["198.51.100.10", "198.51.100.20"]
    group = ("old", 7, v4[1]) if phase == 0 else ("new", 8, v4[1])
    return {
        "delivery": {"rules": [{"to": f"{v4[0]}/32"}, {"to": f"{v4[1]}/32"}, {"to": "2001:db8:100::10/128"}]},
        "marks": [{"name": group[0], "fwmark": group[1], "destinations": [f"{group[2]}/32"],
                   "protocols": ["udp", "tcp"], "ports": [7]}],
        "ipvs": {"services": [{"fwmark": group[1], "family": "inet", "scheduler": "wrr",
                               "reals": [{"address": "192.0.2.21", "weight": 1, "forward": "dr"}]}]},
        "announce": {"vips": [*v4, "2001:db8:100::10"]},
    }


def _reload_settings(lab: topology.Lab, interval_ms: int) -> dict[str, NodeSettings]:
    base = default_settings(lab.director_names, advert_interval_ms=interval_ms)
    return {d: replace(s, vips=tuple(_reload_overrides(0)["announce"]["vips"]), overrides=_reload_overrides(0))
            for d, s in base.items()}


def _nft(lab: topology.Lab, director: str) -> str:
    return lab.exec(director, "nft", "list", "ruleset").stdout


@scenario("reload", "7. SIGHUP reload adds/removes VIPs, mark groups, services on both: no role change",
          settings=_reload_settings)
def reload(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    old, new, kept = "198.51.100.11", "198.51.100.20", ("198.51.100.10", "2001:db8:100::10")
    targets = (*kept, old, new)
    ctx.lab.probe(list((*kept, old)), count=3, interval_ms=50, timeout_ms=1500)
    run = start_probe(ctx, duration_s=8.0, tcp=False, targets=targets)
    time.sleep(1.5)
    t_r = time.time()
    for d in (a, b):
        d.reconfigure(vips=tuple(_reload_overrides(1)["announce"]["vips"]), overrides=_reload_overrides(1))
        d.signal(signal.SIGHUP)
    for d in (a, b):
        deadline = time.monotonic() + 5
        while not any(e.get("event") == "reloaded" and (event_time(e) or 0) >= t_r for e in d.events(current_run=True)):
            if time.monotonic() > deadline:
                raise topology.LabError(f"{d.tag} did not log 'reloaded': {d.log_text()[-1500:]}")
            time.sleep(0.05)
    time.sleep(max(0.0, t_r + 2.5 - time.time()))
    nft_a, nft_b = _nft(ctx.lab, a.director), _nft(ctx.lab, b.director)
    rules_a = ctx.lab.ip(a.director, "rule", "show").stdout
    t_d = time.time()
    r = a.ctl("demote")  # the new VIP moves with the next hand-over (the announcer reloaded too)
    res = run.result()
    moves = {d.tag: transitions_between(d, t_r, t_d) for d in (a, b)}
    ok_end, end, det = check_end(ctx, b, vips=(*kept, new))
    settle = 1.0
    first_new = min((p["sent"] for p in res["probes"] if p["target"] == new and p["by"]), default=None)
    last_old = max((p["sent"] for p in res["probes"] if p["target"] == old and p["by"]), default=None)
    det["new_vip_first_answer_ms"] = None if first_new is None else round((first_new - t_r) * 1000, 1)
    det["old_vip_last_answer_ms"] = None if last_old is None else round((last_old - t_r) * 1000, 1)
    det["new_vip_lost_after_first"] = None if first_new is None else udp_lost(res, target=new, after=first_new,
                                                                              before=t_d)
    checks = {
        "no_role_change": not any(moves.values()),
        "kept_vips_no_loss": all(udp_lost(res, target=v) == 0 for v in kept),
        "removed_vip_stops": bool(answered(res, target=old, before=t_r)) and not answered(res, target=old,
                                                                                           after=t_r + settle),
        # (a probe sent up to one timeout before the reload may wait in the router's ARP queue)
        "new_vip_works": not answered(res, target=new, before=t_r - 0.5)
        and udp_lost(res, target=new, after=t_r + settle, before=t_d) == 0,
        "new_vip_moves_on_handover": r.returncode == 0 and udp_lost(res, target=new, after=t_d) == 0
        and answered(res, target=new, after=t_d + settle).get(b.tag, 0) > 0,
        "kernel_updated": "198.51.100.20" in rules_a and "198.51.100.11" not in rules_a
        and all("198.51.100.20" in n and "198.51.100.11" not in n for n in (nft_a, nft_b)),
        "end_state": ok_end,
    }
    ctx.say(f"reload on both at t=0: role changes {moves}; {old} answered after: "
            f"{answered(res, target=old, after=t_r + settle)}; {new} answered after: "
            f"{answered(res, target=new, after=t_r + settle)}; demote at +{t_d - t_r:.1f} s: {new} then by "
            f"{answered(res, target=new, after=t_d + settle)}")
    kept_streams = [v for k, v in res["streams"].items() if k.split()[-1] in kept]
    return _result("reload", checks, res, end, 0.0, {**det, "moves": moves},
                   outage_ms=max(s["outage"]["ms"] for s in kept_streams), lost=sum(s["lost"] for s in kept_streams))


# ---------------------------------------------------------------------------
# 8. flood of forged adverts at the backup


@scenario("flood", "8. 100,000 forged adverts (wrong key, replayed, malformed) at the backup in 10 s")
def flood(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    cap = start_capture(ctx, filter="udp port 5798", tag="replay")
    time.sleep(1.0)
    replay = cap.stop()
    st0 = b.status() or {}
    rej0 = dict((st0.get("adverts") or {}).get("rejected", {}))
    b_pids = b.pids
    assert b_pids
    ticks0, w0 = cpu_ticks(b_pids), time.time()
    run = start_probe(ctx, duration_s=12.0, tcp=False, targets=ALL_VIPS)
    fl_log = ctx.lab.workdir / "flood.log"
    fl = ctx.lab.spawn("router", [ctx.lab.python, "-m", "netnslab.flood", "--iface", ctx.lab.router.iface,
                                  "--dst-mac", ctx.lab.mac(b.director), "--count", "100000", "--duration", "10",
                                  "--replay", str(replay), "--cluster-id", str(b.settings.cluster_id)],
                       name="flood", log=fl_log)
    t_f = time.time()
    last_seen: list[float] = []
    states: set[str] = set()
    while fl.popen.poll() is None and time.time() - t_f < 20:
        st = b.status() or {}
        states.add(str(st.get("state")))
        for p in st.get("peers", []):
            if p.get("node") == a.tag:
                last_seen.append(float(p.get("last_seen_s", 99)))
        time.sleep(0.25)
    rc = fl.popen.wait(timeout=10)
    ticks1, w1 = cpu_ticks(b_pids), time.time()
    ctx.lab.forget(fl)
    res = run.result()
    out = [line for line in fl_log.read_text().splitlines() if line.startswith("{")]
    sent = json.loads(out[-1]) if out else {"total": 0, "sent": {}, "elapsed_s": None}
    st1 = b.status() or {}
    rej1 = dict((st1.get("adverts") or {}).get("rejected", {}))
    rejected = {k: rej1.get(k, 0) - rej0.get(k, 0) for k in rej1 if rej1.get(k, 0) - rej0.get(k, 0)}
    cpu = (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / (w1 - w0)
    moves = {d.tag: transitions_between(d, t_f) for d in (a, b)}
    ok_end, end, det = check_end(ctx, a)
    md = master_down_ms(ctx.interval_ms, b.settings.priority) / 1000
    end += f"; backup CPU {cpu * 100:.0f}% of a core, rejected {sum(rejected.values())}"
    ctx.say(f"flood: {sent.get('total')} frames in {sent.get('elapsed_s')} s {sent.get('sent')}; backup rejected "
            f"{rejected} (total {sum(rejected.values())}); backup CPU {cpu * 100:.0f}% of a core; master last "
            f"seen at most {max(last_seen, default=-1):.3f} s ago; transitions {moves}")
    return _result("flood", {
        "flood_sent": rc == 0 and sent.get("total", 0) >= 100_000 and (sent.get("elapsed_s") or 99) <= 10.5,
        "no_role_change": not any(moves.values()) and states == {"BACKUP"},
        "master_adverts_processed": bool(last_seen) and max(last_seen) < md,
        "rejections_counted": all(rejected.get(k, 0) > 0 for k in ("auth", "replay", "malformed")),
        "no_udp_lost": udp_lost(res) == 0,
        "end_state": ok_end,
    }, res, end, None, {**det, "rejected": rejected, "cpu_fraction": round(cpu, 3), "sent": sent,
                        "max_last_seen_s": max(last_seen, default=None)})


# ---------------------------------------------------------------------------
# 9. netlink drift on the master


MARK_GROUP = {"name": "probe", "fwmark": 7, "destinations": ["198.51.100.0/24", "2001:db8:100::/64"],
              "protocols": ["udp", "tcp"], "ports": [7]}


def _drift_settings(lab: topology.Lab, interval_ms: int) -> dict[str, NodeSettings]:
    over = {"marks": [MARK_GROUP],
            "delivery": {"rules": [{"fwmark": 7}, {"to": str(topology.VIP_NET4)}, {"to": str(topology.VIP_NET6)}]}}
    return {d: replace(s, overrides=over)
            for d, s in default_settings(lab.director_names, advert_interval_ms=interval_ms).items()}


def _nft_table(lab: topology.Lab, director: str) -> str | None:
    out = json.loads(lab.exec(director, "nft", "-j", "list", "tables").stdout or "{}")
    for item in out.get("nftables", []):
        t = item.get("table")
        if t:
            return f"{t['family']} {t['name']}"
    return None


@scenario("drift", "9. operator deletes the delivery rule and flushes the nft table on the master: repaired < 1 s",
          settings=_drift_settings)
def drift(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    table = _nft_table(ctx.lab, a.director)
    if table is None:
        raise topology.LabError(f"no nft table on {a.tag}: {_nft(ctx.lab, a.director)}")
    st0 = a.status() or {}
    rep0 = st0["dataplane"]["reconcile"]["drift_repairs"]
    rule = ["prio", "100", "to", str(topology.VIP_NET4), "table", "100"]
    times: dict[str, float] = {}

    def damage() -> float:
        t = time.time()
        ctx.lab.ip(a.director, "rule", "del", *rule)
        ctx.lab.exec(a.director, "nft", "flush", "table", *table.split())
        t_done = time.time()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(times) < 2:
            if "rule" not in times and str(topology.VIP_NET4) in ctx.lab.ip(a.director, "rule", "show").stdout:
                times["rule"] = time.time() - t_done
            if "nft" not in times and "mark set" in ctx.lab.exec(a.director, "nft", "list", "table",
                                                                 *table.split()).stdout:
                times["nft"] = time.time() - t_done
            time.sleep(0.01)
        return t

    res, t = probe_around(ctx, damage, lead_s=1.0, duration_s=3.5, tcp=True, targets=ALL_VIPS)
    st1 = a.status() or {}
    rep1 = st1["dataplane"]["reconcile"]["drift_repairs"]
    ok_end, end, det = check_end(ctx, a)
    ctx.say(f"deleted the to-rule and flushed {table} on {a.tag}: rule back after "
            f"{times.get('rule', -1) * 1000:.0f} ms, marks back after {times.get('nft', -1) * 1000:.0f} ms; "
            f"drift repairs {rep0} -> {rep1}; client outage {res['summary']['outage_ms']:.0f} ms")
    return _result("drift", {
        "rule_repaired_1s": times.get("rule", 9) <= 1.0,
        "nft_repaired_1s": times.get("nft", 9) <= 1.0,
        "counted": rep1 > rep0,
        "outage_within_1s": res["summary"]["outage_ms"] <= 1000,
        "no_role_change": not transitions_between(a, t) and not transitions_between(b, t),
        "end_state": ok_end,
    }, res, end, 1000.0, {**det, "repair_s": times, "drift_repairs": [rep0, rep1]})


# ---------------------------------------------------------------------------
# 10. both directors restart at once


def wipe_kernel_state(lab: topology.Lab, director: str, table: int = 100, protocol: int = 98) -> None:
    """What a reboot does to the daemon's kernel state: rules, table T, nft tables gone."""
    for fam in ("-4", "-6"):
        out = lab.ip(director, "-j", fam, "rule", "show").stdout.strip()
        for r in json.loads(out) if out else []:
            if str(r.get("protocol")) == str(protocol):
                lab.ip(director, fam, "rule", "del", "prio", str(r["priority"]), check=False)
        lab.ip(director, fam, "route", "flush", "table", str(table), check=False)
    name = _nft_table(lab, director)
    if name:
        lab.exec(director, "nft", "delete", "table", *name.split(), check=False)


@scenario("pair-restart", "10. both directors restart at once: one master within master-down + 1 s")
def pair_restart(ctx: ScenarioContext) -> ScenarioResult:
    a, _b = pair(ctx)
    warm_up(ctx)
    for d in ctx.cluster:  # power loss of the pair
        d.kill()
    for d in ctx.cluster:
        wipe_kernel_state(ctx.lab, d.director)
    time.sleep(0.5)
    run = start_probe(ctx, duration_s=5.0, tcp=False, targets=ALL_VIPS)
    time.sleep(0.5)
    starts = [d.start() for d in ctx.cluster]
    t0 = min(starts)
    master = ctx.cluster.wait_converged(10, master=a.tag)
    time.sleep(1.0)
    last = max((event_time(e) or 0) for d in ctx.cluster for e in d.transitions())
    converged_ms = (last - t0) * 1000
    bound = max(master_down_ms(ctx.interval_ms, d.settings.priority) for d in ctx.cluster) + 1000
    res = run.result()
    first = min((p["sent"] + p["rtt_ms"] / 1000 for p in res["probes"] if p["by"] and p["sent"] >= t0 - 0.5),
                default=None)  # when the first answer arrived
    client_ms = None if first is None else (first - t0) * 1000
    ok_end, end, det = check_end(ctx, master)
    end += f"; one master at +{converged_ms:.0f} ms"
    moves = {d.tag: [(round(((event_time(e) or 0) - t0) * 1000), e.get("to"), e.get("reason")) for e in d.transitions()]
             for d in ctx.cluster}
    ctx.say(f"both killed (kernel state wiped) and started at t=0: last transition at +{converged_ms:.0f} ms "
            f"(bound {bound:.0f}); first client answer at +{client_ms:.0f} ms; transitions {moves}")
    return _result("pair-restart", {
        "one_master_within_bound": converged_ms <= bound,
        "client_served": client_ms is not None and client_ms <= bound + ANNOUNCE_ALLOWANCE_MS,
        "end_state": ok_end,
    }, res, end, bound, {**det, "converged_ms": round(converged_ms, 1), "client_ms": client_ms,
                         "transitions": moves}, outage_ms=client_ms)


# ---------------------------------------------------------------------------
# 11. CPU starvation


def _rt_daemons(cluster: Cluster) -> None:
    for d in cluster:
        d.command_prefix = list(DAEMON_RT)


@scenario("starvation", f"11. CPU hog on all cores ({HOG_S:.0f} s) at normal priority; daemons at SCHED_RR 10",
          prepare=_rt_daemons)
def starvation(ctx: ScenarioContext) -> ScenarioResult:
    return _starvation(ctx, "starvation", "no_advert_late_by_more_than_interval")


#: adverts of the variant without real-time priority (ms): the shortest interval at which
#: the daemon does not advise real-time priority (vipless_failover.sched). Below it, at
#: 10 ms, this machine's stalls without real-time priority make false failovers for
#: ours and for keepalived alike (bench figure no-rt, 10 minutes: 3 and 6; one 60 s run
#: of this scenario at 10 ms: a 54 ms gap): that target is the bench's to measure
#: (issue 19, open), and a pass of this scenario there depended on the machine's luck.
NO_RT_INTERVAL_MS = sched.RT_ADVISED_BELOW_MS


@scenario("starvation-no-rt", f"11b. the same hog at {NO_RT_INTERVAL_MS} ms adverts, daemons at normal priority "
          "(SCHED_OTHER, as outside the unit)", interval_ms=NO_RT_INTERVAL_MS)
def starvation_no_rt(ctx: ScenarioContext) -> ScenarioResult:
    return _starvation(ctx, "starvation-no-rt", "no_advert_later_than_master_down")


def _starvation(ctx: ScenarioContext, name: str, gap_check: str) -> ScenarioResult:
    """The hog, the master's adverts on the wire, the backup's view. ``gap_check``:
    ``no_advert_late_by_more_than_interval`` (gap <= 2 x interval) or
    ``no_advert_later_than_master_down`` (gap <= the backup's master-down interval: what
    a false failover needs)."""
    a, b = pair(ctx)
    warm_up(ctx)
    # the client and the service stand-ins model other machines / the kernel's IPVS:
    # they run real-time too, so what is measured is the daemons
    for p in ctx.lab.processes:
        if p.name.startswith("responder-"):
            topology.run(["chrt", "-r", "-p", "5", str(p.pid)])
    cap = start_capture(ctx, filter="udp port 5798", tag="starve", rt_priority=5)
    try:
        run = start_probe(ctx, duration_s=HOG_S + 2.0, tcp=False, targets=ALL_VIPS, prefix=("chrt", "-r", "5"))
        time.sleep(1.0)
        t_h = time.time()
        hog = ctx.lab.spawn("client", [ctx.lab.python, "-m", "netnslab.hog", "--seconds", str(HOG_S)],
                            name="hog", log=ctx.lab.workdir / "hog.log")
        last_seen: list[float] = []
        while hog.popen.poll() is None and time.time() - t_h < HOG_S + 5:
            # the control socket from here, not a failoverctl process every 0.5 s: its
            # interpreter's start-up is normal-priority CPU load beside the daemons
            st = b.status_now() or {}
            last_seen += [float(p.get("last_seen_s", 99)) for p in st.get("peers", []) if p.get("node") == a.tag]
            time.sleep(0.5)
        hog.popen.wait(timeout=10)
        t_end = time.time()
        ctx.lab.forget(hog)
        res = run.result()
    finally:
        path = cap.stop()
    frames = frames_of(ctx, path)
    gaps = [(t, g) for t, g in capture.advert_gaps(frames, a.tag) if t_h <= t <= t_end]
    worst = max((g for _t, g in gaps), default=None)
    moves = {d.tag: transitions_between(d, t_h) for d in (a, b)}
    ok_end, end, det = check_end(ctx, a)
    limit = (2 * ctx.interval_ms / 1000 if gap_check == "no_advert_late_by_more_than_interval"
             else master_down_ms(ctx.interval_ms, b.settings.priority) / 1000)
    scheduling = {d.tag: (d.status_now() or {}).get("scheduling") for d in (a, b)}
    end += f"; worst advert gap {(worst or 0) * 1000:.0f} ms (limit {limit * 1000:.0f})"
    ctx.say(f"hog {HOG_S:.0f} s on {os.cpu_count()} cores: {len(gaps)} master adverts, worst gap "
            f"{(worst or 0) * 1000:.0f} ms (limit {limit * 1000:.0f}), peer last seen at most "
            f"{max(last_seen, default=-1):.3f} s; transitions {moves}; UDP lost {udp_lost(res)}; "
            f"scheduling {scheduling}")
    return _result(name, {
        "adverts_seen": len(gaps) >= HOG_S * 1000 / ctx.interval_ms * 0.9,
        gap_check: worst is not None and worst <= limit,
        "no_failover": not any(moves.values()),
        "no_udp_lost": udp_lost(res) == 0,
        "end_state": ok_end,
    }, res, end, None, {**det, "worst_gap_ms": None if worst is None else round(worst * 1000, 1),
                        "gap_limit_ms": limit * 1000, "max_last_seen_s": max(last_seen, default=None),
                        "adverts": len(gaps), "scheduling": scheduling})


# ---------------------------------------------------------------------------
# 12-14. stopped processes (issue 13): SIGSTOP, then SIGCONT
#
# A stopped daemon's socket keeps receiving; on SIGCONT it must read what waited (with
# the kernel's receive times) before it acts on a timer that expired meanwhile.

#: how long the backup is stopped, one after the other
BACKUP_PAUSES_S = (0.25, 0.5, 1.0, 3.0)
#: how long the master is stopped
MASTER_PAUSES_S = (1.0, 3.0)
#: how long the successor is stopped around a demote (sent HANDOVER_LEAD_S after SIGSTOP)
HANDOVER_PAUSES_S = (0.25, 0.5)
HANDOVER_LEAD_S = 0.05
#: a master that learns of a returned higher-priority master steps down on its next
#: input: frames of its already on their way by then are no flap
REACTION_S = 0.02


def sigstop_for(d: Daemon, seconds: float) -> tuple[float, float]:
    """SIGSTOP ``d`` for ``seconds``, then SIGCONT (always); returns both unix times."""
    t_stop = d.signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        t_cont = d.signal(signal.SIGCONT)
    return t_stop, t_cont


class ControlCall:
    """One control request on a connection opened beforehand, sent at the moment the
    scenario chooses (failoverctl's own start-up takes a few hundred ms)."""

    def __init__(self, d: Daemon, timeout: float = 20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(d.control_socket))

    def send(self, req: dict[str, Any]) -> float:
        t = time.time()
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        return t

    def reply(self) -> dict[str, Any]:
        buf = b""
        try:
            while b"\n" not in buf and len(buf) < 65536:  # bounded: size, and the socket timeout
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
        finally:
            self.sock.close()
        return json.loads(buf.partition(b"\n")[0] or b"{}")


def masterish_of(frames: Sequence[capture.Frame], node: str, after: float, before: float = float("inf")) -> list[float]:
    return sorted(f.t for f in frames if f.node == node and f.masterish and after <= f.t < before)


@scenario("pause-backup", "12. backup SIGSTOPped 0.25, 0.5, 1 and 3 s: no takeover, no master frame from it")
def pause_backup(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    cap = start_capture(ctx)
    stops: list[tuple[float, float]] = []
    try:
        run = start_probe(ctx, duration_s=sum(BACKUP_PAUSES_S) + len(BACKUP_PAUSES_S) * 1.0 + 2.0,
                          tcp=False, targets=ALL_VIPS)
        time.sleep(1.0)
        for pause in BACKUP_PAUSES_S:
            stops.append(sigstop_for(b, pause))
            time.sleep(1.0)  # > master-down: a takeover on resume would show by now
        res = run.result()
    finally:
        path = cap.stop()
    frames = frames_of(ctx, path)
    t0 = stops[0][0]
    per_pause = {f"{p:g}s": {"b_transitions": transitions_between(b, t_stop, t_cont + 1.0),
                             "b_master_frames": len(masterish_of(frames, b.tag, t_stop, t_cont + 1.0))}
                 for p, (t_stop, t_cont) in zip(BACKUP_PAUSES_S, stops, strict=True)}
    st = b.status() or {}
    drained = (st.get("transport") or {}).get("drained")
    ok_end, end, det = check_end(ctx, a)
    ctx.say(f"{b.tag} stopped {', '.join(f'{p:g}' for p in BACKUP_PAUSES_S)} s in turn: "
            + "; ".join(f"{k}: transitions {v['b_transitions']}, master frames {v['b_master_frames']}"
                        for k, v in per_pause.items())
            + f"; adverts it read before a timer after a pause: {drained}; UDP lost {udp_lost(res)}")
    return _result("pause-backup", {
        "no_takeover": not transitions_between(b, t0),
        "no_master_frames_from_backup": not masterish_of(frames, b.tag, t0),
        "master_unmoved": not transitions_between(a, t0),
        "no_udp_lost": udp_lost(res) == 0,
        "end_state": ok_end,
    }, res, end, 0.0, {**det, "pauses": per_pause, "drained": drained})


@scenario("pause-master", "13. master SIGSTOPped 1 and 3 s: backup takes over in bound; on SIGCONT one switch back")
def pause_master(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)  # a: the higher priority
    warm_up(ctx)
    bound = crash_bound_ms(ctx.interval_ms, b.settings.priority)
    cap = start_capture(ctx)
    rounds: list[dict[str, Any]] = []
    try:
        run = start_probe(ctx, duration_s=sum(MASTER_PAUSES_S) + len(MASTER_PAUSES_S) * 1.5 + 2.0,
                          tcp=True, targets=ALL_VIPS)
        time.sleep(1.0)
        for pause in MASTER_PAUSES_S:
            t_stop, t_cont = sigstop_for(a, pause)
            time.sleep(1.5)
            rounds.append({"pause_s": pause, "t_stop": t_stop, "t_cont": t_cont, "t_end": time.time()})
        res = run.result()
    finally:
        path = cap.stop()
    frames = frames_of(ctx, path)
    lead = 3 * ctx.interval_ms / 1000
    checks: dict[str, bool] = {}
    for r in rounds:
        key = f"{r['pause_s']:g}s"
        takeover = [t for e in b.transitions() if e.get("to") == "MASTER"
                    and (t := event_time(e)) is not None and r["t_stop"] <= t < r["t_cont"]]
        r["takeover_ms"] = round((takeover[0] - r["t_stop"]) * 1000, 1) if takeover else None
        sw = capture.switches(frames, r["t_stop"] - lead, r["t_end"])
        r["switches"] = [(round(t - r["t_stop"], 4), f, to) for t, f, to in sw]
        back = masterish_of(frames, a.tag, r["t_cont"], r["t_end"])
        r["transitions"] = {d.tag: transitions_between(d, r["t_stop"], r["t_end"]) for d in (a, b)}
        checks[f"takeover_within_bound_{key}"] = (r["takeover_ms"] is not None
                                                  and r["takeover_ms"] <= bound - ANNOUNCE_ALLOWANCE_MS)
        # The election's rules: of two masters the higher priority stays (preempt or not),
        # so the resumed a stays master and b yields. On the wire: the takeover (a -> b),
        # then one switch back (b -> a) at a's first frame; b steps down on its next input,
        # so a frame of b's already on its way within REACTION_S is no flap.
        checks[f"one_switch_back_{key}"] = (
            len(sw) >= 2 and (sw[0][1], sw[0][2]) == (a.tag, b.tag) and r["t_stop"] <= sw[0][0] < r["t_cont"]
            and bool(back) and (sw[1][0], sw[1][1], sw[1][2]) == (back[0], b.tag, a.tag)
            and all(t <= back[0] + REACTION_S for t, _f, _to in sw[2:])
            and capture.last_masterish(frames, r["t_stop"], r["t_end"]) == a.tag)
        checks[f"one_role_change_back_{key}"] = (r["transitions"][a.tag] == [] and [
            (f, to) for f, to, _why in r["transitions"][b.tag]] == [("BACKUP", "MASTER"), ("MASTER", "BACKUP")])
        checks[f"no_udp_lost_after_resume_{key}"] = udp_lost(res, after=r["t_cont"], before=r["t_end"]) == 0
    ok_end, end, det = check_end(ctx, a)
    checks["end_state"] = ok_end
    ctx.say("; ".join(f"{a.tag} stopped {r['pause_s']:g} s: {b.tag} MASTER at +{r['takeover_ms']} ms "
                      f"(bound {bound - ANNOUNCE_ALLOWANCE_MS:.0f}); master-only frames switched "
                      f"{r['switches']}; transitions {r['transitions']}" for r in rounds)
            + f"; UDP lost {udp_lost(res)}")
    return _result("pause-master", checks, res, end, bound, {**det, "rounds": rounds})


@scenario("pause-handover",
          "14. successor SIGSTOPped 250 / 500 ms around a demote: one switch or none; demote tells which")
def pause_handover(ctx: ScenarioContext) -> ScenarioResult:
    a, b = pair(ctx)
    warm_up(ctx)
    cap = start_capture(ctx)
    rounds: list[dict[str, Any]] = []
    try:
        run = start_probe(ctx, duration_s=len(HANDOVER_PAUSES_S) * 5.0 + 2.0, tcp=True, targets=ALL_VIPS)
        time.sleep(1.0)
        for pause in HANDOVER_PAUSES_S:
            call = ControlCall(a)
            time.sleep(0.3)
            t_stop = b.signal(signal.SIGSTOP)
            try:
                time.sleep(HANDOVER_LEAD_S)
                t_demote = call.send({"cmd": "demote"})
                time.sleep(max(0.0, t_stop + pause - time.time()))
            finally:
                t_cont = b.signal(signal.SIGCONT)
            reply = call.reply()
            t_reply = time.time()
            time.sleep(1.5)
            t_end = time.time()
            rounds.append({"pause_s": pause, "t_stop": t_stop, "t_demote": t_demote, "t_cont": t_cont,
                           "t_end": t_end, "reply": reply, "reply_s": round(t_reply - t_demote, 3),
                           "states": {d.tag: d.state() for d in (a, b)}})
            if rounds[-1]["states"][b.tag] == "MASTER":  # back to a for the next round
                b.ctl("demote")
                ctx.cluster.wait_converged(5, master=a.tag)
                time.sleep(1.0)
        res = run.result()
    finally:
        path = cap.stop()
    frames = frames_of(ctx, path)
    lead = 3 * ctx.interval_ms / 1000
    checks: dict[str, bool] = {}
    for r in rounds:
        key = f"{r['pause_s'] * 1000:g}ms"
        sw = capture.switches(frames, r["t_stop"] - lead, r["t_end"])
        r["switches"] = [(round(t - r["t_demote"], 4), f, to) for t, f, to in sw]
        r["transitions"] = {d.tag: transitions_between(d, r["t_stop"], r["t_end"]) for d in (a, b)}
        refused = [t for e in a.events(current_run=True) if e.get("event") == "command_refused"
                   and (t := event_time(e)) is not None and r["t_demote"] <= t < r["t_end"]]
        r["refused_ms"] = round((refused[0] - r["t_demote"]) * 1000, 1) if refused else None  # from a's log
        ok = bool(r["reply"].get("ok"))
        if ok:  # it says the hand-over happened: exactly one switch, to b, who stays master
            truth = ([(f, to) for _t, f, to in sw] == [(a.tag, b.tag)]
                     and capture.last_masterish(frames, r["t_stop"] - lead, r["t_end"]) == b.tag
                     and (r["reply"].get("data") or {}).get("master") == b.tag
                     and r["states"] == {a.tag: "BACKUP", b.tag: "MASTER"})
        else:  # it says it failed: no switch at all, a master again, and it said so at once
            truth = (sw == [] and r["states"] == {a.tag: "MASTER", b.tag: "BACKUP"}
                     and "did not take over" in str(r["reply"].get("error"))
                     and r["refused_ms"] is not None and r["refused_ms"] < 1000 and r["reply_s"] < 2.0
                     and not any(to == "MASTER" for _f, to, _w in r["transitions"][b.tag]))
        checks[f"demote_tells_the_truth_{key}"] = truth
        # while the old master still offers (it takes back after its master-down interval,
        # 341 ms here) the hand-over completes; after that it is refused and nothing moves
        offer_s = master_down_ms(ctx.interval_ms, a.settings.priority) / 1000
        r["offer_age_s"] = round(r["t_cont"] - r["t_demote"], 3)  # when b ran again
        checks[f"outcome_{key}"] = ok == (r["offer_age_s"] < offer_s) or abs(r["offer_age_s"] - offer_s) <= 0.05
    checks["no_udp_lost"] = udp_lost(res) == 0
    ok_end, end, det = check_end(ctx, a if (a.status() or {}).get("state") == "MASTER" else b)
    checks["end_state"] = ok_end
    def outcome(r: dict[str, Any]) -> str:
        return "ok" if r["reply"].get("ok") else f"refused at +{r['refused_ms']} ms"

    ctx.say("; ".join(f"{b.tag} stopped {r['pause_s'] * 1000:g} ms, "
                      f"demote sent +{(r['t_demote'] - r['t_stop']) * 1000:.0f} ms: "
                      f"{outcome(r)} ({r['reply'].get('data') or r['reply'].get('error')}); "
                      f"master-only frames switched {r['switches']}; transitions {r['transitions']}" for r in rounds)
                 + f"; UDP lost {udp_lost(res)}")
    return _result("pause-handover", checks, res, end, 0.0, {**det, "rounds": rounds})


# ---------------------------------------------------------------------------


def leftovers(name: str) -> list[str]:
    """What of lab ``name`` still exists: namespaces, its state file."""
    out = [ns for ns in topology.run(["ip", "netns", "list"], check=False).stdout.split()
           if ns.startswith(name + "-")]
    if topology.state_path(name).exists():
        out.append(str(topology.state_path(name)))
    return out


def run_scenario(name: str, *, interval_ms: int = 100, say: Callable[[str], None] = print,
                 settings: dict[str, NodeSettings] | None = None,
                 announce_mode: str = "per-vip", power_off: bool = False) -> ScenarioResult:
    """Build a lab, start the pair, run one scenario, tear everything down, and check
    that nothing of the lab is left."""
    fn = SCENARIOS[name]
    interval_ms = INTERVALS.get(name, interval_ms)
    with topology.Lab(announce_mode=announce_mode) as lab:
        say(f"lab {lab.name}: client {lab.client.ip4} -- router -- LAN 192.0.2.0/24 -- "
            + ", ".join(f"{d.role} {d.ip4}" for d in lab.directors))
        if settings is None:
            settings = (SETTINGS[name](lab, interval_ms) if name in SETTINGS
                        else default_settings(lab.director_names, advert_interval_ms=interval_ms))
        cluster = Cluster(lab, settings)
        if name in PREPARE:
            PREPARE[name](cluster)
        try:
            cluster.start()
            result = fn(ScenarioContext(lab, cluster, interval_ms, say, power_off=power_off))
        finally:
            cluster.stop()
    left = leftovers(lab.name)
    result.details["leftovers"] = left
    if left:
        result.ok = False
        result.end_state += f" [left behind: {left}]"
    return result


def table(results: Sequence[ScenarioResult]) -> str:
    lines = [f"{'scenario':<14} {'result':<6} {'outage ms':>10} {'bound ms':>9} {'lost':>6}  end state"]
    for r in results:
        lines.append(f"{r.name:<14} {'PASS' if r.ok else 'FAIL':<6} "
                     f"{'-' if r.outage_ms is None else f'{r.outage_ms:.0f}':>10} "
                     f"{'-' if r.bound_ms is None else f'{r.bound_ms:.0f}':>9} {r.lost:>6}  {r.end_state}")
    return "\n".join(lines)


__all__ = ["ALL", "SCENARIOS", "ScenarioContext", "ScenarioResult", "run_scenario", "scenario", "table", "Daemon"]
