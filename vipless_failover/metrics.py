"""Prometheus metrics: a dedicated registry, read at scrape time.

Most values are read from the daemon's own state when Prometheus scrapes
(:class:`DaemonCollector` turns ``Daemon.counters()``, the typed counters of
telemetry.py, and the gauges of ``Daemon.status()`` into metric families), so there
is no second set of counters to keep in step. Counters are read as attributes and
labelled by iterating their enums; gauges as ``status["key"]``: a name that changes
fails mypy or the scrape (and the tests), it never exports 0. What the state does not
keep is counted here by :class:`Telemetry`: transitions by from/to/reason, split-brain
episodes, and the takeover duration histogram (decision -> delivery rules
installed -> first announcement frame sent).

The HTTP listener (:class:`MetricsServer`, ``[metrics] listen``) runs on the daemon's
event loop, so a scrape sees one consistent snapshot and never races the election
task; it answers ``GET /metrics`` only (``/`` links to it).

Names follow Prometheus conventions: ``vipless_failover_`` prefix, ``_total``
counters, seconds, and the state as one gauge per state
(``vipless_failover_state{state="MASTER"} 1``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from .aio import within
from .telemetry import (
    AnnounceKind,
    ControlLimit,
    DaemonCounters,
    MetricsServerCounters,
    NoticeKind,
    NotifyResult,
    RejectReason,
)

#: the classic text format: every Prometheus 2.x understands it (our names need no escaping)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PREFIX = "vipless_failover"
STATES = ("INIT", "BACKUP", "MASTER", "FAULT")
TRACK_STATES = ("ok", "failed", "unknown")
TAKEOVER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 5.0
#: a burst of scrapes renders once: a body rendered less than this ago is served again
#: (rendering costs ~1 ms of the loop; 500 concurrent scrapes once delayed adverts 500 ms)
RENDER_REUSE_S = 0.5
#: scrape connections served at once; more are closed at once, unread (counted)
MAX_CLIENTS = 16


def reason_kind(reason: str) -> str:
    """``handover:director-b`` -> ``handover``: labels stay few (the log has the rest)."""
    return reason.split(":", 1)[0] or "unknown"


class Telemetry:
    """Counts what the daemon's state does not keep. ``now`` is time.monotonic()."""

    def __init__(self, registry: CollectorRegistry, split_brain_gap_s: float = 1.0):
        self.transitions: Counter[tuple[str, str, str]] = Counter()
        self.last_transition_at: float | None = None  # unix time
        self.split_brain_episodes = 0
        self.split_brain_gap_s = split_brain_gap_s
        self._last_split_brain: float | None = None
        self._takeover_at: float | None = None  # decision time of the takeover in progress
        self._awaiting_announce = False
        self.takeover = Histogram(
            f"{PREFIX}_takeover_duration_seconds",
            "Time from the decision to become master to: the delivery rules installed "
            "(stage=delivery), the first announcement frame sent (stage=announcement).",
            ["stage"], buckets=TAKEOVER_BUCKETS, registry=registry)
        # show both series from the start (a scrape before any takeover still lists them)
        for stage in ("delivery", "announcement"):
            self.takeover.labels(stage)

    def on_transition(self, old: str, new: str, reason: str, now: float) -> None:
        self.transitions[(old, new, reason_kind(reason))] += 1
        self.last_transition_at = time.time()
        if new == "MASTER":
            self._takeover_at = now
            self._awaiting_announce = False
        else:
            self._takeover_at = None
            self._awaiting_announce = False

    def on_delivery_installed(self, now: float, announcing: bool) -> None:
        """Called after InstallDelivery completed (on a takeover: observe)."""
        if self._takeover_at is None or self._awaiting_announce:
            return
        self.takeover.labels("delivery").observe(max(0.0, now - self._takeover_at))
        self._awaiting_announce = announcing
        if not announcing:
            self._takeover_at = None

    def poll_announcement(self, first_sent_at: float | None) -> None:
        """Observe the announcement stage once the announcer has sent its first frame."""
        if not self._awaiting_announce or self._takeover_at is None or first_sent_at is None:
            return
        if first_sent_at >= self._takeover_at:
            self.takeover.labels("announcement").observe(first_sent_at - self._takeover_at)
        self._awaiting_announce = False
        self._takeover_at = None

    def on_split_brain(self, now: float) -> None:
        """One episode per run of split-brain notices less than the gap apart."""
        last, self._last_split_brain = self._last_split_brain, now
        if last is None or now - last > self.split_brain_gap_s:
            self.split_brain_episodes += 1


def _g(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    if value is not None:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _c(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> CounterMetricFamily:
    if value is not None:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


class DaemonCollector(Collector):
    """Metric families from ``counters()`` (the daemon's typed counters), ``status()``
    (its status dict, for the gauges) and ``telemetry``."""

    def __init__(self, status: Callable[[], Mapping[str, Any]], counters: Callable[[], DaemonCounters],
                 telemetry: Telemetry, on_scrape: Callable[[], None] | None = None):
        self._status = status
        self._counters = counters
        self.telemetry = telemetry
        self._on_scrape = on_scrape

    def describe(self) -> list[Any]:
        return []  # families vary with peers and tracked items: no fixed description

    def collect(self) -> Iterable[Any]:
        if self._on_scrape is not None:
            self._on_scrape()
        # gauges from the status dict, read as st[...]: a key that is gone raises (the
        # scrape fails, and the tests), it never exports 0; counters from the typed
        # snapshot, labelled by their enums (every member, 0 when never counted)
        st = self._status()
        c = self._counters()
        tel = self.telemetry

        info = _g("info", "Version and identity of this node (always 1).",
                  labels=["version", "node", "cluster_id"])
        info.add_metric([str(st["version"]), str(st["node"]), str(st["cluster_id"])], 1)
        yield info

        state = _g("state", "1 for the current election state, 0 for the others.", labels=["state"])
        for s in STATES:
            state.add_metric([s], 1.0 if st["state"] == s else 0.0)
        yield state
        yield _g("priority", "Configured election priority.", st["priority"])
        yield _g("effective_priority", "Priority advertised now (configured minus failed tracking weights).",
                 st["effective_priority"])
        yield _g("maintenance", "1 while maintenance mode keeps this node backup.", float(bool(st["maintenance"])))
        yield _g("draining", "1 while an old master still delivers during a hand-over drain.",
                 float(bool(st["draining"])))
        yield _g("faults", "Tracked items forcing FAULT now.", len(st["faults"]))
        sched = st["scheduling"]
        yield _g("scheduling_realtime", "1 if the daemon runs at real-time priority (SCHED_RR or SCHED_FIFO).",
                 float(bool(sched["realtime"])))
        yield _g("scheduling_at_risk", "1 if the advert interval is short enough to need real-time priority "
                 "and the daemon lacks it (a busy CPU can then cause false failovers).",
                 float(bool(sched["at_risk"])))
        el = st["election"]
        yield _c("election_process_cpu_seconds", "CPU time of the election process (adverts, FSM, takeover flip).",
                 el["cpu_s"])
        yield _g("election_process_resident_memory_bytes", "Resident memory of the election process.",
                 el["rss_bytes"])
        yield _g("election_snapshot_age_seconds", "Age of the election process's latest report to the director "
                 "(over 5: it is stuck, and the systemd watchdog is no longer pinged).", el["snapshot_age_s"])

        tr = _c("transitions", "State transitions by old state, new state and reason.",
                labels=["from", "to", "reason"])
        for (old, new, reason), n in sorted(tel.transitions.items()):
            tr.add_metric([old, new, reason], n)
        yield tr
        yield _g("last_transition_timestamp_seconds", "Unix time of the last state transition (0: none yet).",
                 tel.last_transition_at or 0.0)

        adv = c.adverts
        yield _c("adverts_sent", "Adverts sent.", adv.sent)
        yield _c("adverts_received", "Datagrams received on the election transport.", adv.received)
        rej = _c("adverts_rejected", "Adverts dropped (or, for config_digest_mismatch, reported) by reason.",
                 labels=["reason"])
        for reason in sorted(RejectReason):
            rej.add_metric([reason.value], adv.rejected[reason])
        yield rej

        notices = c.notices.counts
        yield _c("master_down_expiries", "Master-down timer expiries (this node took over).",
                 notices[NoticeKind.MASTER_DOWN])
        yield _c("split_brain_episodes", "Episodes of two masters seen at once.", tel.split_brain_episodes)
        nf = _c("notices", "Election notices by kind.", labels=["kind"])
        for kind in sorted(NoticeKind):
            nf.add_metric([kind.value], notices[kind])
        yield nf

        ann = c.announce
        af = _c("announcements_sent", "Announcement frames sent by mode (garp, na, next_hop).", labels=["mode"])
        for mode in sorted(AnnounceKind):
            af.add_metric([mode.value], ann.sent[mode])
        yield af
        yield _c("announce_bursts", "Announcement bursts started.", ann.bursts)
        yield _g("announcing", "1 while this node announces the VIPs.", float(bool(st["announce"]["announcing"])))

        rec = c.reconcile
        yield _c("reconcile_runs", "Reconcile passes.", rec.runs)
        yield _c("reconcile_operations", "Kernel operations applied by reconciles.", rec.operations)
        yield _c("reconcile_errors", "Reconcile errors.", rec.errors)
        yield _c("drift_repairs", "Reconciles that repaired a change made by someone else.", rec.drift_repairs)
        dp = st["dataplane"]
        yield _g("delivery_installed", "1 while the delivery rules are installed.", float(bool(dp["delivery"])))
        yield _g("ipvs_available", "1 if the kernel has IPVS.", float(bool(st["ipvs_available"])))
        objs = dp["objects"]
        ko = _g("kernel_objects", "Kernel objects installed by this daemon, by kind.", labels=["kind"])
        for kind_name, n in sorted(objs.items()):
            ko.add_metric([kind_name], n)
        yield ko
        yield _g("ipvs_services", "IPVS virtual services installed.", objs["ipvs_services"])
        yield _g("ipvs_real_servers", "IPVS real servers installed.", objs["ipvs_reals"])

        peers = st["peers"]
        yield _g("peers", "Peers heard since start.", len(peers))
        age = _g("peer_last_seen_age_seconds", "Seconds since the last advert of each peer.", labels=["peer"])
        prio = _g("peer_priority", "Last advertised priority of each peer.", labels=["peer"])
        for p in peers:
            age.add_metric([p["node"]], p["last_seen_s"])
            prio.add_metric([p["node"]], p["priority"])
        yield age
        yield prio

        tracked = st["tracked"]
        ts = _g("tracked_item_state", "1 for the current state (ok, failed, unknown) of each tracked item.",
                labels=["item", "kind", "state"])
        tw = _g("tracked_item_weight", "Priority lowered while the item fails (0: it forces FAULT).",
                labels=["item"])
        runs = _c("track_results", "Results of tracked items (check commands: ok, failed, timeout, error).",
                  labels=["item", "result"])
        for it in tracked:
            for s in TRACK_STATES:
                ts.add_metric([it["name"], it["kind"], s], 1.0 if it["state"] == s else 0.0)
            tw.add_metric([it["name"]], it["weight"])
            for result, n in sorted(it["results"].items()):
                runs.add_metric([it["name"], result], n)
        yield ts
        yield tw
        yield runs

        nr = _c("notify_runs", "Notify command runs by result (ok, failed, timeout, error, dropped).",
                labels=["result"])
        for notify_result in sorted(NotifyResult):
            nr.add_metric([notify_result.value], c.notify.results[notify_result])
        yield nr

        control = c.control
        yield _c("control_refused", "Control requests refused (not allowed for the caller).", control.refused)
        yield _g("control_clients", "Control socket connections open now.", control.clients)
        cr = _c("control_rejected", "Control connections or requests cut short by a limit, by reason "
                                    "(too_many_clients, idle_timeout, request_too_large, slow_reader, "
                                    "bad_request, internal_error).", labels=["reason"])
        for limit in sorted(ControlLimit):
            cr.add_metric([limit.value], control.rejected[limit])
        yield cr


def build_registry(status: Callable[[], Mapping[str, Any]], counters: Callable[[], DaemonCounters],
                   split_brain_gap_s: float = 1.0,
                   on_scrape: Callable[[], None] | None = None) -> tuple[CollectorRegistry, Telemetry]:
    """The daemon's registry: its collector (``status`` for the gauges, ``counters``
    for the counters), the takeover histogram, and the process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    telemetry = Telemetry(registry, split_brain_gap_s)
    registry.register(DaemonCollector(status, counters, telemetry, on_scrape))
    ProcessCollector(namespace=PREFIX, registry=registry)
    return registry, telemetry


class MetricsServer:
    """A minimal HTTP/1.1 listener on the daemon's loop serving ``GET /metrics``.

    Bounded: at most :data:`MAX_CLIENTS` connections are served at once (others are
    closed unread and counted in ``busy``), a request must arrive within
    :data:`REQUEST_TIMEOUT_S`, and the body is rendered at most once per
    :data:`RENDER_REUSE_S` whatever the number of scrapes."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, log: Any,
                 before_render: Callable[[], Awaitable[None]] | None = None):
        """``before_render``: awaited before a body is rendered (the daemon: a fresh
        snapshot of the election process)."""
        self._before_render = before_render
        self.host = host
        self.port = port
        self.registry = registry
        self.log = log
        self.scrapes = 0
        self.renders = 0
        self.busy = 0  # connections closed unread: MAX_CLIENTS were being served
        self._clients = 0
        self._body: bytes | None = None
        self._rendered_at = 0.0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def counters(self) -> MetricsServerCounters:
        """For status: scrapes served, bodies rendered, connections closed unread."""
        return MetricsServerCounters(scrapes=self.scrapes, renders=self.renders, busy=self.busy)

    def _render_due(self) -> bool:
        return self._body is None or time.monotonic() - self._rendered_at >= RENDER_REUSE_S

    def _render(self) -> bytes:
        body = self._body
        if body is None or self._render_due():
            body = self._body = generate_latest(self.registry)
            self._rendered_at = time.monotonic()
            self.renders += 1
        return body

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            self.busy += 1
            if self.busy in (1, 10, 100, 1000) or self.busy % 10000 == 0:
                self.log.warning("metrics_busy", clients=self._clients, closed=self.busy)
            writer.transport.abort()
            return
        self._clients += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._clients -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await within(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            if len(head) > MAX_REQUEST_HEAD:
                await self._send(writer, 431, b"request head too large\n", "text/plain")
                return
            parts = head.split(b"\r\n", 1)[0].split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
            path = target.split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await self._send(writer, 405, b"method not allowed\n", "text/plain", head_only=False)
            elif path == b"/metrics":
                self.scrapes += 1
                if self._before_render is not None and self._render_due():
                    await self._before_render()
                body = self._render()
                await self._send(writer, 200, body, CONTENT_TYPE, head_only=method == b"HEAD")
            elif path == b"/":
                await self._send(writer, 200, b'<html><body><a href="/metrics">metrics</a></body></html>\n',
                                 "text/html", head_only=method == b"HEAD")
            else:
                await self._send(writer, 404, b"not found\n", "text/plain", head_only=method == b"HEAD")
        except ConnectionError:
            pass
        except Exception as exc:  # noqa: BLE001 - a scrape must never hurt the daemon
            self.log.error("metrics_error", error=str(exc))
            try:
                await self._send(writer, 500, b"internal error\n", "text/plain")
            except ConnectionError:
                pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, code: int, body: bytes, ctype: str, head_only: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                  500: "Internal Server Error"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        writer.write(head if head_only else head + body)
        await writer.drain()
