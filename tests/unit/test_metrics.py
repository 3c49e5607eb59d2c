"""Metrics: families built from a status dict and the typed counters, bookkeeping of
transitions, split-brain episodes and takeover stages, the HTTP listener, and promtool's
lint of the output."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import status
from vipless_failover.metrics import MetricsServer, build_registry, reason_kind
from vipless_failover.telemetry import (
    AdvertCounters,
    AnnounceCounters,
    AnnounceKind,
    ControlCounters,
    ControlLimit,
    DaemonCounters,
    MetricsServerCounters,
    NoticeCounters,
    NoticeKind,
    NotifyCounters,
    NotifyResult,
    ReconcileCounters,
    RejectReason,
)

# the gauges' part of a status dict (the counters are in COUNTERS): a MASTER, delivery
# on, its peer the BACKUP, one of its two tracked items failed
STATUS = status(
    state="MASTER", priority=150, effective_priority=110, announce={"announcing": True},
    dataplane={"delivery": True, "objects": {"rules": 2, "nft_rules": 3}},
    peers=[{"node": "director-b", "address": "192.0.2.12", "priority": 100, "state": "BACKUP",
            "last_seen_s": 0.05, "config_match": True}],
    tracked=[{"name": "link:eth0", "kind": "interface", "state": "ok", "weight": 0, "results": {}},
             {"name": "check:web", "kind": "check", "state": "failed", "weight": 40,
              "results": {"ok": 3, "failed": 2, "timeout": 1}}],
)
COUNTERS = DaemonCounters(
    adverts=AdvertCounters(sent=12, received=30, rejected={RejectReason.AUTH: 2, RejectReason.REPLAY: 1}),
    notices=NoticeCounters({NoticeKind.MASTER_DOWN: 1, NoticeKind.SPLIT_BRAIN: 4}),
    announce=AnnounceCounters(sent={AnnounceKind.GARP: 4, AnnounceKind.NA: 2}, bursts=1),
    reconcile=ReconcileCounters(runs=5, operations=9, errors=1, drift_repairs=1),
    notify=NotifyCounters({NotifyResult.OK: 3, NotifyResult.TIMEOUT: 1}),
    control=ControlCounters(refused=2),
)


def samples(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_families_from_status():
    reg, tel = build_registry(lambda: STATUS, lambda: COUNTERS)
    tel.on_transition("BACKUP", "MASTER", "master_down", 10.0)
    tel.on_transition("INIT", "BACKUP", "start", 9.0)
    s = samples(reg)
    p = "vipless_failover_"
    assert {k[1][0][1]: v for k, v in s.items() if k[0] == p + "state"} == \
        {"INIT": 0, "BACKUP": 0, "MASTER": 1, "FAULT": 0}
    assert s[(p + "priority", ())] == 150 and s[(p + "effective_priority", ())] == 110
    assert s[(p + "transitions_total", (("from", "BACKUP"), ("reason", "master_down"), ("to", "MASTER")))] == 1
    assert s[(p + "adverts_sent_total", ())] == 12
    assert s[(p + "adverts_rejected_total", (("reason", "auth"),))] == 2
    assert s[(p + "adverts_rejected_total", (("reason", "config_digest_mismatch"),))] == 0  # always listed
    assert s[(p + "master_down_expiries_total", ())] == 1
    assert s[(p + "announcements_sent_total", (("mode", "garp"),))] == 4
    assert s[(p + "announcements_sent_total", (("mode", "next_hop"),))] == 0
    assert s[(p + "reconcile_runs_total", ())] == 5 and s[(p + "drift_repairs_total", ())] == 1
    assert s[(p + "ipvs_available", ())] == 1
    assert s[(p + "ipvs_services", ())] == 1 and s[(p + "ipvs_real_servers", ())] == 2
    assert s[(p + "peers", ())] == 1
    assert s[(p + "peer_last_seen_age_seconds", (("peer", "director-b"),))] == 0.05
    assert s[(p + "tracked_item_state", (("item", "check:web"), ("kind", "check"), ("state", "failed")))] == 1
    assert s[(p + "tracked_item_state", (("item", "check:web"), ("kind", "check"), ("state", "ok")))] == 0
    assert s[(p + "tracked_item_weight", (("item", "check:web"),))] == 40
    assert s[(p + "track_results_total", (("item", "check:web"), ("result", "timeout")))] == 1
    assert s[(p + "notify_runs_total", (("result", "timeout"),))] == 1
    assert s[(p + "control_refused_total", ())] == 2
    assert s[(p + "last_transition_timestamp_seconds", ())] > 1.7e9


def test_control_limits_are_counted_by_reason():
    counters = dataclasses.replace(COUNTERS, control=ControlCounters(
        refused=1, clients=3,
        rejected={ControlLimit.TOO_MANY_CLIENTS: 1140, ControlLimit.IDLE_TIMEOUT: 56, ControlLimit.BAD_REQUEST: 0}))
    reg, _ = build_registry(lambda: STATUS, lambda: counters)
    s = samples(reg)
    p = "vipless_failover_"
    assert s[(p + "control_clients", ())] == 3
    assert s[(p + "control_rejected_total", (("reason", "too_many_clients"),))] == 1140
    assert s[(p + "control_rejected_total", (("reason", "idle_timeout"),))] == 56
    assert s[(p + "control_rejected_total", (("reason", "bad_request"),))] == 0


def test_reason_labels_keep_only_the_kind():
    assert reason_kind("handover:director-b") == "handover"
    assert reason_kind("fault:check:web") == "fault"
    assert reason_kind("master_down") == "master_down"


def test_takeover_histogram_has_delivery_and_announcement_stages():
    reg, tel = build_registry(lambda: STATUS, lambda: COUNTERS)
    tel.on_transition("BACKUP", "MASTER", "master_down", 100.0)
    tel.on_delivery_installed(100.004, announcing=True)
    tel.poll_announcement(None)  # nothing sent yet
    tel.poll_announcement(100.010)
    tel.poll_announcement(100.500)  # only the first frame counts
    s = samples(reg)
    h = "vipless_failover_takeover_duration_seconds"
    assert s[(h + "_count", (("stage", "delivery"),))] == 1
    assert s[(h + "_sum", (("stage", "delivery"),))] == pytest.approx(0.004)
    assert s[(h + "_count", (("stage", "announcement"),))] == 1
    assert s[(h + "_sum", (("stage", "announcement"),))] == pytest.approx(0.010)
    assert s[(h + "_bucket", (("le", "0.005"), ("stage", "delivery")))] == 1
    # a step-down before the first frame observes no announcement stage
    tel.on_transition("BACKUP", "MASTER", "master_down", 200.0)
    tel.on_delivery_installed(200.001, announcing=True)
    tel.on_transition("MASTER", "BACKUP", "higher_priority_master", 200.002)
    tel.poll_announcement(200.003)
    s = samples(reg)
    assert s[(h + "_count", (("stage", "delivery"),))] == 2
    assert s[(h + "_count", (("stage", "announcement"),))] == 1
    # re-installing delivery without a takeover (not a transition) observes nothing
    tel.on_delivery_installed(300.0, announcing=False)
    assert samples(reg)[(h + "_count", (("stage", "delivery"),))] == 2


def test_split_brain_notices_are_counted_as_episodes():
    reg, tel = build_registry(lambda: STATUS, lambda: COUNTERS, split_brain_gap_s=1.0)
    for t in (10.0, 10.1, 10.2, 10.9, 11.5):  # one episode: notices < 1 s apart
        tel.on_split_brain(t)
    tel.on_split_brain(20.0)  # a second episode
    assert samples(reg)[("vipless_failover_split_brain_episodes_total", ())] == 2


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
def test_promtool_accepts_the_exposition():
    reg, tel = build_registry(lambda: STATUS, lambda: COUNTERS)
    tel.on_transition("BACKUP", "MASTER", "master_down", 1.0)
    text = generate_latest(reg)
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_promtool_would_catch_a_bad_name():
    # the lint is real: a counter without _total is reported
    p = subprocess.run(["promtool", "check", "metrics"],
                       input=b"# HELP x_runs runs\n# TYPE x_runs counter\nx_runs 1\n", capture_output=True)
    assert p.returncode != 0


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


class NullLog:
    def __getattr__(self, level):
        return lambda *a, **kw: None


async def test_http_listener_serves_metrics_only():
    scraped = []
    reg, _ = build_registry(lambda: STATUS, lambda: COUNTERS, on_scrape=lambda: scraped.append(1))
    server = MetricsServer("127.0.0.1", 0, reg, NullLog())
    await server.start()
    try:
        resp = await _http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"text/plain; version=0.0.4" in head
        assert b'vipless_failover_state{state="MASTER"} 1.0' in body
        assert scraped == [1] and server.scrapes == 1
        assert (await _http(server.port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        head_only = await _http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200") and head_only.endswith(b"\r\n\r\n")
        # a client that never finishes its request does not hold anything up
        _, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"GET /metr")
        assert (await _http(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        await server.close()


async def test_a_burst_of_scrapes_renders_once_and_excess_connections_are_closed(monkeypatch):
    # issue 13: 500 concurrent scrapes rendered 500 times on the loop that sends adverts
    from vipless_failover import metrics as metrics_mod
    rendered = []
    reg, _ = build_registry(lambda: STATUS, lambda: COUNTERS, on_scrape=lambda: rendered.append(1))
    server = MetricsServer("127.0.0.1", 0, reg, NullLog())
    await server.start()
    try:
        answers = await asyncio.gather(*(_http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") for _ in range(12)))
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        assert len(set(answers)) == 1 and len(rendered) == 1 and server.renders == 1 and server.scrapes == 12
        # older than RENDER_REUSE_S: rendered again
        monkeypatch.setattr(metrics_mod, "RENDER_REUSE_S", 0.0)
        await _http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert server.renders == 2
        # MAX_CLIENTS connections that say nothing: the next one is closed unread
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(metrics_mod.MAX_CLIENTS)]
        for _ in range(100):
            if server._clients == metrics_mod.MAX_CLIENTS:
                break
            await asyncio.sleep(0.01)
        assert server._clients == metrics_mod.MAX_CLIENTS
        try:
            extra = await _http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        except ConnectionResetError:  # closed unread: the kernel may answer with a reset
            extra = b""
        assert extra == b"" and server.busy == 1
        for _, w in held:
            w.close()
        for _ in range(100):
            if server._clients == 0:
                break
            await asyncio.sleep(0.01)
        assert (await _http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        assert server.counters() == MetricsServerCounters(scrapes=14, renders=3, busy=1)
        assert server.counters().as_dict() == {"scrapes": 14, "renders": 3, "busy": 1}
    finally:
        await server.close()
