"""Dataplane: the reconciler facade the daemon drives.

It owns three kinds of kernel objects and reconciles each by diff (desired.py):

- delivery rules and the ``local`` routes of table T (rules.DeliveryRules, rtnetlink),
- the nft mark table (marks.MarkTable, the ``nft`` binary),
- IPVS fwmark services and reals (planned by ipvs_plan.py, applied by
  ipvs.IpvsServices over generic netlink; optional: a kernel without IPVS is
  reported once and everything else runs).

When it reconciles:

- ``start()``: reads the kernel, adopts what matches, removes our leftovers, installs
  routes, marks and IPVS (warm standby). Delivery rules that match the config are left
  alone while the role is unknown: the daemon calls ``set_delivery()`` right after,
  so a restarted master withdraws and re-adds nothing.
- ``flip(on)`` / ``set_delivery(on)``: the delivery rules only, added (removed) in one
  system call with no dump first (``DeliveryRules.flip``): a constant number of netlink
  operations, whatever the number of VIPs and services, about 0.1 ms. Whatever the flip
  did not plainly do (a rule already there or already gone, an error, no
  acknowledgement) is checked by a full delivery pass right after, off the takeover's
  path; a flip that changed rules is followed by one anyway (its own notifications).
- ``reload(cfg)``: full reconcile against the new config (objects tagged with the old
  protocol number or in the old table are ours and removed if no longer desired).
- on netlink notifications (rules and routes of both families, nftables changes):
  within ~20 ms; a reconcile that finds something to fix there counts as a drift repair.
- periodically (``cfg.dataplane.reconcile_interval_s``), including IPVS.
- after a failure: retried with exponential backoff (0.1 s .. 5 s); errors are logged
  (event ``reconcile_error``) and shown in ``status()``, never raised to the caller.

Namespaces: ``netns`` names a network namespace (``/run/netns/NAME``); netlink
sockets are opened inside it and ``nft`` runs under ``ip netns exec``. The daemon
passes None (its own namespace). Nothing is opened before ``start()``, so a
Dataplane can be built in a unit test without root.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..aio import cancel_and_wait
from ..config import Config
from ..telemetry import ReconcileCounters
from . import desired as d, ipvs as _ipvs, nlcodec
from .ipvs_plan import IpvsState, desired_ipvs
from .marks import MarkTable, MarkTableError
from .rules import DeliveryError, DeliveryRules

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE = 7, 8, 11, 19
NFNLGRP_NFTABLES = 7
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
DEBOUNCE_S = 0.02
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
NFT_POLL_S = 0.25  # fallback when nftables notifications cannot be subscribed
DRIFT_CAUSES = ("notify", "periodic", "poll")

PART_DELIVERY, PART_MARKS, PART_IPVS = "delivery", "marks", "ipvs"
ALL_PARTS = (PART_DELIVERY, PART_MARKS, PART_IPVS)


class Dataplane:
    def __init__(self, cfg: Config, log: Any, netns: str | None = None,
                 ipvs_owned_path: Path | str | None = None,
                 delivery_source: Callable[[], bool | None] | None = None):
        """``delivery_source``: where the wanted delivery is decided, when not here (the
        election process flips the rules itself and says so in a shared flag, see
        election/process.py): a delivery pass reads it after it has read the rules, so
        it never undoes a flip it has not heard of yet."""
        self.cfg = cfg
        self._delivery_source = delivery_source
        self.log = log
        self.netns = netns
        #: None until the daemon decides (start leaves matching rules alone meanwhile)
        self.delivery: bool | None = None
        self._rules = DeliveryRules(netns)
        self._marks = MarkTable(d.NFT_TABLE, netns)
        if ipvs_owned_path is None:
            ipvs_owned_path = _ipvs.DEFAULT_OWNED_PATH
            if netns is not None:
                ipvs_owned_path = ipvs_owned_path.with_name(f"ipvs-owned-{netns}.json")
        self._ipvs_owned_path = ipvs_owned_path
        self._ipvs: Any = None
        self.ipvs_available = False
        self._protocols = {cfg.delivery.protocol}
        self._tables = {cfg.delivery.table}
        self._lock: asyncio.Lock | None = None  # marks + IPVS passes
        self._delivery_lock: asyncio.Lock | None = None  # rules + routes pass
        self._trigger: asyncio.Event | None = None  # wakes the runner
        self._notified = False  # netlink said something changed (vs. a wake to re-arm a retry)
        self._tasks: list[asyncio.Task[Any]] = []
        self._watch: list[socket.socket] = []
        self._started = False
        self._warm = True
        self._retry_delay = 0.0
        self._retry_at: float | None = None
        self._objects = {"rules": 0, "routes": 0, "nft_rules": 0, "ipvs_services": 0, "ipvs_reals": 0}
        self._runs = 0
        self._operations = 0
        self._errors = 0
        self._drift_repairs = 0
        self._last_error: str | None = None
        self._failing: set[str] = set()
        self._verify = False  # a flip left something to check: the runner runs a delivery pass
        self._flip_rules = self._sorted_rules(cfg)

    @staticmethod
    def _sorted_rules(cfg: Config) -> tuple[d.RuleSpec, ...]:
        return tuple(sorted(d.delivery_rules(cfg), key=d.RuleSpec.sort_key))

    # ------------------------------------------------------------------ API

    async def start(self) -> None:
        """Open netlink, adopt, clean our leftovers, install warm state; start watching."""
        self._lock = asyncio.Lock()
        self._delivery_lock = asyncio.Lock()
        self._trigger = asyncio.Event()
        await self._rules.open()
        self._started = True
        self._ipvs = _ipvs.IpvsServices(netns=self.netns, owned_path=self._ipvs_owned_path)
        try:
            self.ipvs_available = await asyncio.to_thread(self._ipvs.available)
        except Exception as exc:  # noqa: BLE001 - reported, the rest runs
            self.ipvs_available = False
            self.log.error("ipvs_error", error=str(exc))
        if not self.ipvs_available:
            self.log.warning("ipvs_unavailable", message=_ipvs.UNAVAILABLE_MESSAGE,
                             services_configured=len(self.cfg.ipvs))
        await self._reconcile("start", ALL_PARTS)
        await self._start_watching()
        self._tasks.append(asyncio.create_task(self._runner(), name="dataplane-reconcile"))

    def flip_ready(self) -> bool:
        """True when :meth:`flip` can run now: started, and no delivery pass under way
        (a pass reads the rules, then changes them: a flip must not land in between)."""
        return self._started and self._delivery_lock is not None and not self._delivery_lock.locked()

    def flip(self, on: bool) -> None:
        """The takeover's flip (master: True; backup/fault: False), synchronous: the
        delivery rules in one system call. Only when :meth:`flip_ready`."""
        if not self.flip_ready():
            raise RuntimeError("Dataplane.flip() while not ready (not started, or a delivery pass is running)")
        self._flip(on)

    async def set_delivery(self, on: bool) -> None:
        """:meth:`flip`, once no delivery pass is under way."""
        if not self._started:
            self.delivery = bool(on)
            self.log.info("delivery", on=self.delivery, operations=0)
            return
        assert self._delivery_lock is not None
        async with self._delivery_lock:
            self._flip(on)

    @property
    def flip_rules(self) -> tuple[d.RuleSpec, ...]:
        """The rules a flip adds or deletes, in the order it sends them."""
        return self._flip_rules

    def _flip(self, on: bool) -> None:
        t0 = time.perf_counter()
        try:
            results = self._rules.flip(self._flip_rules, bool(on))
        except OSError as exc:
            results = [(rule, exc.errno or -1) for rule in self._flip_rules]
        self.flipped(bool(on), results, (time.perf_counter() - t0) * 1000)

    def flipped(self, on: bool, results: Sequence[tuple[d.RuleSpec, int | None]], took_ms: float) -> None:
        """A flip done (here, or by the election process): counted, logged, and
        verified by the next pass if any rule's result was not a plain success."""
        self.delivery = on
        done = [rule for rule, err in results if err == 0]
        self._operations += len(done)
        self._objects["rules"] = max(0, self._objects["rules"] + (len(done) if on else -len(done)))
        self.log.info("delivery", on=self.delivery, operations=len(done), took_ms=round(took_ms, 3))
        op = "AddRule" if on else "DeleteRule"
        for rule in done:
            self.log.info("dataplane_op", op=op, object=rule.describe())
        if len(done) != len(results):
            # already there (on) / already gone (off) is the normal case at start and
            # after a restart; anything else is an error the pass reports and retries
            self.log.debug("delivery_verify", results={r.describe(): e for r, e in results if e != 0})
            self._verify = True
            if self._trigger is not None:
                self._trigger.set()

    async def reload(self, cfg: Config) -> None:
        """New desired state, applied by diff (no role change)."""
        self.cfg = cfg
        self._flip_rules = self._sorted_rules(cfg)
        self._protocols.add(cfg.delivery.protocol)
        self._tables.add(cfg.delivery.table)
        if self._started:
            ok = await self._reconcile("reload", ALL_PARTS)
            if ok:
                self._protocols = {cfg.delivery.protocol}
                self._tables = {cfg.delivery.table}

    async def stop(self) -> None:
        """Withdraw delivery; remove routes, marks and IPVS too if remove_on_stop."""
        await self._stop_tasks()
        if not self._started:
            return
        self._delivery_source = None  # stopping: withdrawn, whatever was decided elsewhere
        self.delivery = False
        self._warm = not self.cfg.dataplane.remove_on_stop
        try:
            await self._reconcile("stop", ALL_PARTS)
        finally:
            self._rules.close()
            self._started = False

    async def close(self) -> None:
        """Stop watching and close sockets, leaving every kernel object as it is
        (restart in place: the next process adopts them with zero operations)."""
        await self._stop_tasks()
        self._rules.close()
        self._started = False

    async def _stop_tasks(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        self._stop_watching()

    def counters(self) -> ReconcileCounters:
        """For status and metrics: reconcile passes, operations, errors, drift repairs."""
        return ReconcileCounters(runs=self._runs, operations=self._operations, errors=self._errors,
                                 drift_repairs=self._drift_repairs)

    def status(self) -> dict[str, Any]:
        return {
            "delivery": bool(self.delivery),
            "objects": dict(self._objects),
            "ipvs_available": self.ipvs_available,
            "reconcile": {**self.counters().as_dict(), "last_error": self._last_error},
        }

    # ------------------------------------------------------------ reconcile

    def desired(self) -> d.DesiredState:
        return d.desired_state(self.cfg, bool(self.delivery), warm=self._warm)

    async def _reconcile(self, cause: str, parts: tuple[str, ...]) -> bool:
        """One pass over ``parts``. Returns True when everything converged."""
        assert self._lock is not None and self._delivery_lock is not None
        self._runs += 1
        errors: list[str] = []
        applied = 0
        # Delivery has its own lock: a takeover never waits behind a long nft or
        # IPVS pass (thousands of services); the objects they touch are disjoint.
        if PART_DELIVERY in parts:
            async with self._delivery_lock:
                applied += await self._delivery_pass(self.desired(), errors)
        if PART_MARKS in parts or (PART_IPVS in parts and self.ipvs_available):
            async with self._lock:
                if PART_MARKS in parts:
                    applied += await self._marks_pass(self.desired(), errors)
                if PART_IPVS in parts and self.ipvs_available:
                    applied += await self._ipvs_pass(errors)
        self._operations += applied
        if applied and cause in DRIFT_CAUSES:
            self._drift_repairs += 1
            self.log.warning("drift_repaired", cause=cause, operations=applied)
        if errors:
            self._errors += len(errors)
            self._last_error = errors[-1]
            self._retry_delay = min(RETRY_MAX_S, max(RETRY_MIN_S, self._retry_delay * 2))
            self._retry_at = time.monotonic() + self._retry_delay
            for err in errors:
                self.log.error("reconcile_error", cause=cause, error=err,
                               retry_in_s=round(self._retry_delay, 3))
            if self._trigger is not None:
                self._trigger.set()  # wake the runner so it picks up the retry time (no pass)
            return False
        if self._retry_at is not None and parts == ALL_PARTS:
            self.log.info("reconcile_recovered", cause=cause)
            self._retry_at, self._retry_delay, self._last_error = None, 0.0, None
        return True

    async def _delivery_pass(self, want: d.DesiredState, errors: list[str]) -> int:
        try:
            rules = await self._rules.read_rules(self._protocols)
            routes = await self._rules.read_routes(self._protocols, self._tables)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"reading rules/routes: {exc}")
            return 0
        if self._delivery_source is not None:
            # read after the rules: a flip the rules show is in the flag too (the
            # election process sets it first), so this pass never undoes one
            decided = self._delivery_source()
            if decided is not None and decided != self.delivery:
                self.delivery = decided
            want = self.desired()
        want_rules = want.rules
        if self.delivery is None:
            # role not decided yet: keep our rules that match, add none, drop leftovers
            want_rules = frozenset(rules & d.delivery_rules(self.cfg))
        ops = d.diff(d.DesiredState(want.delivery, want_rules, want.routes, None, ()),
                     rules, routes, d.ActualMarks(exists=False))
        nrules, nroutes = len(rules), len(routes)
        applied = 0
        for op in ops:
            try:
                await self._rules.apply(op)  # type: ignore[arg-type]
            except (DeliveryError, OSError) as exc:
                errors.append(str(exc))
                continue
            applied += 1
            nrules += {d.AddRule: 1, d.DeleteRule: -1}.get(type(op), 0)
            nroutes += {d.AddRoute: 1, d.DeleteRoute: -1}.get(type(op), 0)
            self.log.info("dataplane_op", op=type(op).__name__,
                          object=op.rule.describe() if hasattr(op, "rule") else op.route.describe())  # type: ignore[union-attr]
        self._objects["rules"], self._objects["routes"] = nrules, nroutes
        return applied

    async def _marks_pass(self, want: d.DesiredState, errors: list[str]) -> int:
        try:
            actual = await self._marks.read(want.marks)
        except (MarkTableError, OSError) as exc:
            errors.append(str(exc))
            return 0
        ops = d.diff_marks(want.marks, actual)
        self._objects["nft_rules"] = actual.rule_count
        applied = 0
        for op in ops:
            try:
                if isinstance(op, d.ReplaceMarkTable):
                    await self._marks.replace(op.spec)
                    self._objects["nft_rules"] = len(op.spec.rules)
                    self.log.info("dataplane_op", op="ReplaceMarkTable", table=f"inet {op.spec.name}",
                                  rules=len(op.spec.rules), digest=op.spec.digest)
                else:
                    await self._marks.delete()
                    self._objects["nft_rules"] = 0
                    self.log.info("dataplane_op", op="DeleteMarkTable", table=f"inet {self._marks.name}")
                applied += 1
            except (MarkTableError, OSError) as exc:
                errors.append(str(exc))
        return applied

    async def _ipvs_pass(self, errors: list[str]) -> int:
        assert self._ipvs is not None
        state = desired_ipvs(self.cfg) if self._warm else IpvsState()
        try:
            ops = await asyncio.to_thread(self._ipvs.reconcile, state)
        except Exception as exc:  # noqa: BLE001 - IpvsError and anything pyroute2 raises
            errors.append(f"ipvs: {exc}")
            return 0
        for op in ops:
            self.log.info("dataplane_op", op=type(op).__name__, object=str(op))
        self._objects["ipvs_services"] = len(state)
        self._objects["ipvs_reals"] = sum(len(s.dests) for s in state.services.values())
        return len(ops)

    # -------------------------------------------------------------- runner

    async def _runner(self) -> None:
        assert self._trigger is not None
        loop = asyncio.get_running_loop()
        interval = self.cfg.dataplane.reconcile_interval_s
        next_periodic = loop.time() + interval
        next_poll = loop.time() + NFT_POLL_S if not self._nft_watched else None
        parts: tuple[str, ...]  # which parts a pass reconciles
        while True:
            try:
                now = loop.time()
                deadlines = [next_periodic]
                if self._retry_at is not None:
                    deadlines.append(now + max(0.0, self._retry_at - time.monotonic()))
                if next_poll is not None:
                    deadlines.append(next_poll)
                timeout = max(0.0, min(deadlines) - now)
                # not asyncio.wait_for: on Python 3.11 it swallows a cancellation that
                # arrives as the event is set (a flip sets it), and this loop never ends
                try:
                    async with asyncio.timeout(timeout):
                        await self._trigger.wait()
                except TimeoutError:
                    pass
                now = loop.time()
                if self._trigger.is_set():
                    await asyncio.sleep(DEBOUNCE_S)  # coalesce a burst of notifications
                    self._trigger.clear()
                    verify, self._verify = self._verify, False
                    if not self._notified:
                        if not verify:
                            continue  # only re-arm: the next deadline may have changed
                        cause, parts = "verify", (PART_DELIVERY,)
                    else:
                        self._notified = False
                        cause, parts = "notify", (PART_DELIVERY, PART_MARKS)
                    if self._retry_at is not None:
                        # something is failing and will be retried in full; still repair
                        # the delivery rules at once (cheap; keeps the 1 s repair bound)
                        parts = (PART_DELIVERY,)
                elif self._retry_at is not None and time.monotonic() >= self._retry_at:
                    cause, parts = "retry", ALL_PARTS
                elif now >= next_periodic:
                    cause, parts = "periodic", ALL_PARTS
                    next_periodic = now + self.cfg.dataplane.reconcile_interval_s
                elif next_poll is not None and now >= next_poll:
                    cause, parts = "poll", (PART_MARKS,)
                    next_poll = now + NFT_POLL_S
                else:
                    continue
                await self._reconcile(cause, parts)
                if cause == "periodic":
                    # A full pass leaves ~600 objects in reference cycles (pyroute2's
                    # parsed messages). The daemon froze its start-up heap (gc.freeze),
                    # and at rest it allocates so little that the collector's own
                    # thresholds are reached only every few minutes (generation 1) or
                    # hour (generation 2): RSS crept by ~100 kB a minute until then.
                    # Only objects made since the freeze are scanned: ~0.2 ms, 65,536
                    # VIPs or 2. Not after a notified or verify pass (one may follow a
                    # takeover while its announcements run), nor after the nft poll
                    # (every 250 ms where nftables notifications are unavailable).
                    gc.collect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the runner must not die
                self._errors += 1
                self._last_error = f"reconcile loop: {exc!r}"
                self.log.error("reconcile_error", cause="runner", error=repr(exc))
                await asyncio.sleep(RETRY_MIN_S)

    # -------------------------------------------------------------- watching

    _nft_watched = False

    async def _start_watching(self) -> None:
        loop = asyncio.get_running_loop()
        rt = await asyncio.to_thread(self._netlink_socket, socket.NETLINK_ROUTE,
                                     (RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE,
                                      RTNLGRP_IPV6_RULE))
        loop.add_reader(rt.fileno(), self._on_rtnl, rt)
        self._watch.append(rt)
        try:
            nf = await asyncio.to_thread(self._netlink_socket, NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))
        except OSError as exc:
            self.log.warning("nft_watch_unavailable", error=str(exc), poll_interval_s=NFT_POLL_S)
            self._nft_watched = False
            return
        loop.add_reader(nf.fileno(), self._on_nfnl, nf)
        self._watch.append(nf)
        self._nft_watched = True

    def _stop_watching(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover
            loop = None
        for sock in self._watch:
            if loop is not None:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._watch.clear()

    def _netlink_socket(self, proto: int, groups: tuple[int, ...]) -> socket.socket:
        from ..netns import in_netns  # setns in this thread: no fork (pyroute2's netns sockets fork)
        with in_netns(self.netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
        try:
            sock.bind((0, 0))
            for group in groups:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _drain(self, sock: socket.socket) -> list[bytes] | None:
        """Pending messages; None after an overflow (then everything is suspect)."""
        out: list[bytes] = []
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return None
                return out
            if not data:
                return out
            out.append(data)

    def _on_rtnl(self, sock: socket.socket) -> None:
        datas = self._drain(sock)
        if datas is None or any(self._rtnl_relevant(data) for data in datas):
            self._kick()

    def _on_nfnl(self, sock: socket.socket) -> None:
        datas = self._drain(sock)
        if datas is None or datas:
            self._kick()

    def _kick(self) -> None:
        self._notified = True
        if self._trigger is not None:
            self._trigger.set()

    def _rtnl_relevant(self, data: bytes) -> bool:
        """Rule changes always; route changes in our tables or with our protocol."""
        compat = {t if t < 256 else 252 for t in self._tables}
        for msg in nlcodec.messages(data):
            if msg.type in (RTM_NEWRULE, RTM_DELRULE):
                return True
            if msg.type in (RTM_NEWROUTE, RTM_DELROUTE) and msg.length >= nlcodec.HEADER_SIZE + 12:
                rtm = msg.payload_offset  # struct rtmsg: table at byte 4, protocol at byte 5
                if data[rtm + 5] in self._protocols or data[rtm + 4] in compat:
                    return True
        return False
