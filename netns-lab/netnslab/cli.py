"""``netns-lab``: build, inspect and remove the namespace lab; run the demo and scenarios.

    netns-lab up [--name vfNNNNNN] [--daemons] [--announce-mode per-vip|next-hop]
    netns-lab down NAME
    netns-lab list
    netns-lab demo [--interval-ms 100]
    netns-lab scenario NAME|all|list

Needs root (network namespaces). Only documentation address ranges, only inside the
lab's own namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import scenarios, topology
from .daemons import Cluster, default_settings


def _root() -> None:
    if os.geteuid() != 0:
        sys.exit("netns-lab: needs root (it creates network namespaces)")


def cmd_up(args: argparse.Namespace) -> int:
    _root()
    lab = topology.Lab(args.name, announce_mode=args.announce_mode, keep_state=True)
    try:
        lab.up()
        if args.daemons:
            cluster = Cluster(lab, default_settings(lab.director_names, advert_interval_ms=args.interval_ms))
            cluster.start()
            master = cluster.wait_converged(timeout=15)
            print(f"daemons running; master: {master.tag}")
    except BaseException:
        lab.keep_state = False
        lab.down()
        raise
    # left running (own sessions): `netns-lab down NAME` removes it; the state file lists everything
    print(f"lab {lab.name} is up (workdir {lab.workdir})")
    for role, h in lab.hosts.items():
        print(f"  {role:<11} ip netns exec {h.ns} ...   {h.iface} {h.addr4} {h.addr6}")
    print(f"remove it with: netns-lab down {lab.name}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _root()
    try:
        removed = topology.destroy(args.name)
    except topology.LabError as exc:
        print(f"netns-lab: {exc}", file=sys.stderr)
        return 1
    for r in removed:
        print(f"removed {r}")
    print(f"lab {args.name} is down")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    labs = topology.list_labs()
    if args.json:
        print(json.dumps([json.loads(s.to_json()) for s in labs], indent=2))
        return 0
    if not labs:
        print(f"no labs (none has a state file under {topology.STATE_DIR})")
        return 0
    for s in labs:
        alive = sum(1 for p in s.processes if topology._proc_alive(int(p["pid"]), p.get("starttime")))
        print(f"{s.name}: {len(s.namespaces)} namespaces, {alive} processes running, workdir {s.workdir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _root()
    vips = scenarios.ScenarioContext.targets
    how = ("SIGKILL and its LAN link taken down (power loss)" if args.power_off else
           "SIGKILL (add --power-off to take its LAN link down too)")
    print(f"netns-lab demo: two VIP-less directors elect a master; the master is killed by {how}; "
          f"the client keeps sending a UDP request to each of the VIPs {', '.join(vips)} every 10 ms.")
    res = scenarios.run_scenario("master-kill", interval_ms=args.interval_ms, say=print,
                                 announce_mode=args.announce_mode, power_off=args.power_off)
    print(res.line())
    return 0 if res.ok else 1


def cmd_scenario(args: argparse.Namespace) -> int:
    if args.name == "list":
        for name, desc in scenarios.DESCRIPTIONS.items():
            print(f"{name:<16} {desc}")
        return 0
    _root()
    names = list(scenarios.ALL) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        print(f"netns-lab: unknown scenario {unknown[0]!r} (netns-lab scenario list)", file=sys.stderr)
        return 2
    results = []
    for name in names:
        try:
            results.append(scenarios.run_scenario(name, interval_ms=args.interval_ms,
                                                  say=lambda s: print(f"  {s}")))
        except topology.LabError as exc:
            results.append(scenarios.ScenarioResult(name, False, None, 0, f"error: {exc}"))
        print(results[-1].line(), flush=True)
    if len(results) > 1:
        print("\n" + scenarios.table(results))
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netns-lab", description="network-namespace lab for vipless-failover")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="build the lab and leave it running")
    p.add_argument("--name", help="lab name (vf + up to 6 of [a-z0-9]); default random")
    p.add_argument("--daemons", action="store_true", help="also start vipless-failoverd on each director")
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--announce-mode", choices=topology.ANNOUNCE_MODES, default="per-vip")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="remove a lab (and its processes) by name")
    p.add_argument("name")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("list", help="labs with a state file under " + str(topology.STATE_DIR))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("demo", help="elect, kill the master, show what the client saw")
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--announce-mode", choices=topology.ANNOUNCE_MODES, default="per-vip")
    p.add_argument("--power-off", action="store_true",
                   help="also take the master's LAN link down (the whole director dies, not only the daemon)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("scenario", help="run a failure scenario (NAME, all, or list)")
    p.add_argument("name")
    p.add_argument("--interval-ms", type=int, default=100)
    p.set_defaults(func=cmd_scenario)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except topology.LabError as exc:
        print(f"netns-lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
