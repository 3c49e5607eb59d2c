"""Failure scenarios, each measured from the client (issue 6 adds the rest).

A scenario is a function ``(ScenarioContext) -> ScenarioResult`` registered under a
name with :func:`scenario`. The context holds a built lab, the running cluster and a
``say`` callback for narration; the result carries the one-line summary (outage ms,
lost requests, end state) and whether it met its bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import prober, topology
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


def scenario(name: str, description: str):
    def register(fn: Callable[[ScenarioContext], ScenarioResult]):
        SCENARIOS[name] = fn
        DESCRIPTIONS[name] = description
        return fn
    return register


def end_state(cluster: Cluster) -> str:
    return ", ".join(f"{t}={s or 'stopped'}" for t, s in cluster.states().items())


def warm_up(ctx: ScenarioContext) -> None:
    """The router resolves every probed VIP before the event (a Linux router updates
    only entries it already has on gratuitous ARP/NA)."""
    ctx.lab.probe(list(ctx.targets), count=3, interval_ms=50, timeout_ms=1500)


def probe_around(ctx: ScenarioContext, event: Callable[[], float], *, lead_s: float = 1.0,
                 duration_s: float = 4.0, interval_ms: float = 10.0, tcp: bool = False) -> tuple[dict[str, Any], float]:
    """Run the prober, fire ``event`` (returns its unix time) ``lead_s`` after the
    first probe, wait for the prober; returns (prober result, event time)."""
    out = ctx.lab.workdir / f"probe-{time.monotonic_ns()}.json"
    count = int(duration_s * 1000 / interval_ms)
    sp = ctx.lab.start_prober(list(ctx.targets), out=out, interval_ms=interval_ms, count=count,
                              duration_s=duration_s, timeout_ms=500, tcp=tcp)
    _wait_started(sp, timeout=10)
    time.sleep(lead_s)
    t_event = event()
    rc = sp.popen.wait(timeout=duration_s + 30)
    ctx.lab.forget(sp)
    if rc != 0:
        raise topology.LabError(f"prober exited {rc}: {sp.log and sp.log.read_text()[-1000:]}")
    return topology.read_prober(out), t_event


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


@scenario("master-kill", "SIGKILL the master (a crash); the backup takes over")
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


def run_scenario(name: str, *, interval_ms: int = 100, say: Callable[[str], None] = print,
                 settings: dict[str, NodeSettings] | None = None,
                 announce_mode: str = "per-vip", power_off: bool = False) -> ScenarioResult:
    """Build a lab, start the pair, run one scenario, tear everything down."""
    fn = SCENARIOS[name]
    with topology.Lab(announce_mode=announce_mode) as lab:
        say(f"lab {lab.name}: client {lab.client.ip4} -- router -- LAN 192.0.2.0/24 -- "
            + ", ".join(f"{d.role} {d.ip4}" for d in lab.directors))
        cluster = Cluster(lab, settings or default_settings(lab.director_names, advert_interval_ms=interval_ms))
        try:
            cluster.start()
            return fn(ScenarioContext(lab, cluster, interval_ms, say, power_off=power_off))
        finally:
            cluster.stop()


__all__ = ["SCENARIOS", "ScenarioContext", "ScenarioResult", "run_scenario", "scenario", "Daemon"]
