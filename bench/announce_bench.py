"""Takeover to "the router has the new master's MAC for every VIP" (root, netns lab).

    .venv/bin/python -m bench.announce_bench [--sizes 1,1024,16384,65536] [--runs 5] [--rate 50000]

Uses the lab topology of tests/lab/test_announce_lab.py (router, bridge, two
directors; unique names, removed at the end). Per size the router first resolves every
VIP to director-a; then each run flips mastership to the other director (delivery
rules move, the old Announcer stops, the new one starts) and polls the router's
neighbour table until every VIP carries the new MAC. Sizes: 1 VIP is IPv4
(198.51.100.16), larger sizes are IPv6 from 2001:db8::/32 (the IPv4 documentation
ranges hold only 768 addresses). Next-hop mode: the router routes the VIPs via one
floating address; one announcement whatever the size, so its time does not depend on
the size. "flip" is the kernel state change alone (ip rule del + add, timed around the
netlink calls). Neighbour gc_thresh1..3 are raised for the run and restored.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ipaddress
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute

from vipless_failover.announce import Announcer, in_netns
from vipless_failover.nexthop import NextHopAddress

_spec = importlib.util.spec_from_file_location(
    "announce_lab", Path(__file__).resolve().parents[1] / "tests/lab/test_announce_lab.py")
lab_mod = importlib.util.module_from_spec(_spec)
assert _spec.loader is not None
_spec.loader.exec_module(lab_mod)

TABLE = lab_mod.TABLE


def vip_net(size: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if size == 1:
        return ipaddress.ip_network("198.51.100.16/32")
    bits = (size - 1).bit_length()
    assert 1 << bits == size, "sizes must be powers of two"
    return ipaddress.ip_network(f"2001:db8:100:0:1::/{128 - bits}")


class Rules:
    """Delivery rule for one prefix in one director namespace, via netlink (timed)."""

    def __init__(self, ns: str):
        self.ns = ns
        self.ipr: Any = None

    async def open(self) -> "Rules":
        self.ipr = AsyncIPRoute(netns=self.ns, flags=0)
        await self.ipr.setup_endpoint()
        return self

    async def set(self, net: Any, present: bool) -> None:
        fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
        try:
            await self.ipr.rule("add" if present else "del", family=fam, priority=100, table=TABLE,
                                dst=str(net.network_address), dst_len=net.prefixlen)
        except Exception as exc:
            if getattr(exc, "code", None) not in (17, 2):  # EEXIST / ENOENT
                raise

    def close(self) -> None:
        if self.ipr is not None:
            self.ipr.close()


class RouterNeigh:
    def __init__(self, ns: str):
        self.ns = ns
        self.ipr: Any = None

    async def open(self) -> "RouterNeigh":
        self.ipr = AsyncIPRoute(netns=self.ns, flags=0)
        await self.ipr.setup_endpoint()
        return self

    async def macs(self, family: int) -> dict[str, str]:
        out = {}
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        async for n in await self.ipr.neigh("dump", family=af):
            mac = n.get("NDA_LLADDR")
            if mac:
                out[n.get("NDA_DST")] = mac
        return out


async def wait_all(lab: Any, addrs: set[str], mac: str, family: int, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        macs = await lab.router_neigh.macs(family)
        if all(macs.get(a) == mac for a in addrs):
            return time.monotonic()
        if time.monotonic() - t0 > timeout:
            missing = sum(1 for a in addrs if macs.get(a) != mac)
            raise RuntimeError(f"{missing} of {len(addrs)} entries not at {mac} after {timeout}s")
        await asyncio.sleep(0.002)


async def resolve(lab: Any, addrs: list[str], mac: str, family: int, pps: int = 20_000) -> None:
    with in_netns(lab.r):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for round_ in range(5):
            macs = await lab.router_neigh.macs(family)
            todo = [a for a in addrs if macs.get(a) != mac]
            if not todo:
                return
            for i, a in enumerate(todo):
                s.sendto(b"x", (a, 9))
                if i % 200 == 199:
                    await asyncio.sleep(200 / pps)
            await asyncio.sleep(1.5)
        raise RuntimeError("router did not resolve every VIP")
    finally:
        s.close()


async def bench_per_vip(lab: Any, size: int, runs: int, rate: int) -> tuple[list[float], list[float]]:
    net = vip_net(size)
    fam = net.version
    addrs = [str(a) for a in (net if size > 1 else [net.network_address])]
    for ns in (lab.a, lab.b):
        lab_mod.sh("ip", "-n", ns, "route", "add", str(net), "dev", lab.dev[ns])
    macs = {lab.a: lab.mac(lab.a), lab.b: lab.mac(lab.b)}
    anns = {ns: Announcer(lab.config(ns, vips=[str(net)], rate_pps=rate, repeats=2, repeat_interval_ms=1000),
                          lab_mod._Log(), netns=ns) for ns in (lab.a, lab.b)}
    rules = {ns: await Rules(ns).open() for ns in (lab.a, lab.b)}
    takeovers, flips = [], []
    try:
        for a in anns.values():
            await a.open()
        await rules[lab.a].set(net, True)
        anns[lab.a].start("bench: initial")
        await resolve(lab, addrs, macs[lab.a], fam)
        master, other = lab.a, lab.b
        want = set(addrs)
        for _ in range(runs):
            await asyncio.sleep(1.2)  # past the router's lock time
            anns[master].stop()
            t0 = time.monotonic()
            await rules[master].set(net, False)
            await rules[other].set(net, True)
            flips.append(time.monotonic() - t0)
            anns[other].start("bench: takeover")
            done = await wait_all(lab, want, macs[other], fam, timeout=30 + 2 * size / rate)
            takeovers.append(done - t0)
            master, other = other, master
    finally:
        for a in anns.values():
            await a.close()
        for r in rules.values():
            await r.set(net, False)
            r.close()
        for ns in (lab.a, lab.b):
            lab_mod.sh("ip", "-n", ns, "route", "del", str(net), "dev", lab.dev[ns], check=False)
    return takeovers, flips


async def bench_next_hop(lab: Any, size: int, runs: int) -> tuple[list[float], list[float]]:
    net = vip_net(size)
    nh = "192.0.2.100/24" if net.version == 4 else "2001:db8::100/64"
    gw = nh.split("/")[0]
    fam = 4 if net.version == 4 else 6
    lab_mod.sh("ip", "-n", lab.r, "route", "replace", str(net), "via", gw)
    macs = {lab.a: lab.mac(lab.a), lab.b: lab.mac(lab.b)}
    cfgs = {ns: lab.config(ns, mode="next-hop", next_hop=nh, vips=[str(net)], repeats=2) for ns in (lab.a, lab.b)}
    anns = {ns: Announcer(cfgs[ns], lab_mod._Log(), netns=ns) for ns in cfgs}
    nhs = {ns: NextHopAddress(cfgs[ns], lab_mod._Log(), netns=ns) for ns in cfgs}
    takeovers, flips = [], []
    try:
        for a in anns.values():
            await a.open()
        await nhs[lab.a].add()
        anns[lab.a].start("bench: initial")
        lab.poke([str(net.network_address + 5 if size > 1 else net.network_address)])
        await wait_all(lab, {gw}, macs[lab.a], fam, 5)
        master, other = lab.a, lab.b
        for _ in range(runs):
            await asyncio.sleep(1.2)
            anns[master].stop()
            t0 = time.monotonic()
            await nhs[master].remove()
            await nhs[other].add()
            flips.append(time.monotonic() - t0)
            anns[other].start("bench: takeover")
            done = await wait_all(lab, {gw}, macs[other], fam, 5)
            takeovers.append(done - t0)
            master, other = other, master
    finally:
        for a in anns.values():
            await a.close()
        for n in nhs.values():
            await n.remove()
        lab_mod.sh("ip", "-n", lab.r, "route", "del", str(net), check=False)
    return takeovers, flips


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} {max(xs) * 1000:8.1f}"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,1024,16384,65536")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rate", type=int, default=50_000, help="rate_pps for per-VIP mode")
    ap.add_argument("--modes", default="per-vip,next-hop")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with lab_mod.raised_gc_thresh(), lab_mod.AnnounceLab() as lab:
        lab_mod.sh("ip", "-n", lab.r, "addr", "add", "198.51.100.1/24", "dev", lab.dev[lab.r])
        lab_mod.sh("ip", "-n", lab.r, "addr", "add", "2001:db8:100::1/64", "dev", lab.dev[lab.r], "nodad")
        lab.router_neigh = await RouterNeigh(lab.r).open()
        for size in sizes:
            for mode in args.modes.split(","):
                if mode == "per-vip":
                    take, flip = await bench_per_vip(lab, size, args.runs, args.rate)
                    bound = f"{size / args.rate * 1000:.1f} ms + 50"
                else:
                    take, flip = await bench_next_hop(lab, size, args.runs)
                    bound = "50 ms"
                rows.append((size, mode, take, flip, bound))
                print(f"  {size} {mode}: median {statistics.median(take) * 1000:.1f} ms", flush=True)
    print(f"\nper-VIP rate_pps = {args.rate}; {args.runs} runs each; times in ms\n")
    print(f"{'VIPs':>6} {'mode':<9} {'takeover med':>12} {'max':>8} {'flip med':>9} {'max':>8}  target")
    for size, mode, take, flip, bound in rows:
        t, f = ms(take).split(), ms(flip).split()
        print(f"{size:>6} {mode:<9} {t[0]:>12} {t[1]:>8} {f[0]:>9} {f[1]:>8}  < {bound}")


if __name__ == "__main__":
    asyncio.run(main())
