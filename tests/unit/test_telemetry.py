"""Typed telemetry (issue 14, item 4): the enums are the label sets, every counter of a
part's snapshot reaches its metric, a counter or a status key that is gone fails
loudly (never a silent 0), and the status JSON is what it was before the snapshots."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import ipaddress
import time
import types
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import KEY, make_config, status
from vipless_failover.control import ControlServer
from vipless_failover.daemon import Daemon
from vipless_failover.election import fsm, process
from vipless_failover.election.protocol import Advert, AdvertRejected, State, encode_advert
from vipless_failover.election.trust import TROUBLE
from vipless_failover.metrics import DaemonCollector, MetricsServer, Telemetry, build_registry
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
    TransportCounters,
    complete,
)

P = "vipless_failover_"

#: every key of the status dict the gauges read (the counters are not read from it)
STATUS: dict[str, Any] = status()

#: labelled counter families: metric, label, the enum of its values, where the snapshot keeps them
LABELLED = [
    ("adverts_rejected_total", "reason", RejectReason, ("adverts", "rejected")),
    ("notices_total", "kind", NoticeKind, ("notices", "counts")),
    ("announcements_sent_total", "mode", AnnounceKind, ("announce", "sent")),
    ("notify_runs_total", "result", NotifyResult, ("notify", "results")),
    ("control_rejected_total", "reason", ControlLimit, ("control", "rejected")),
]

#: plain counters (and the control socket's one gauge): part, field -> metric
SCALARS = {
    ("adverts", "sent"): "adverts_sent_total",
    ("adverts", "received"): "adverts_received_total",
    ("announce", "bursts"): "announce_bursts_total",
    ("reconcile", "runs"): "reconcile_runs_total",
    ("reconcile", "operations"): "reconcile_operations_total",
    ("reconcile", "errors"): "reconcile_errors_total",
    ("reconcile", "drift_repairs"): "drift_repairs_total",
    ("control", "refused"): "control_refused_total",
    ("control", "clients"): "control_clients",
}

#: parts whose counters are in the status JSON only (no metric reads them)
STATUS_ONLY = {"metrics", "transport"}


def samples(counters: DaemonCounters, status: dict[str, Any] | None = None) -> dict[tuple[str, tuple], float]:
    reg, _ = build_registry(lambda: STATUS if status is None else status, lambda: counters)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def labelled(s: dict[tuple[str, tuple], float], metric: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (name, labels), v in s.items() if name == P + metric}


def with_part(counters: DaemonCounters, part: str, **changes: Any) -> DaemonCounters:
    return dataclasses.replace(counters, **{part: dataclasses.replace(getattr(counters, part), **changes)})


# ---------------------------------------------------------------------------
# the enums: the strings that were the label sets and the emitters' literals


def test_enum_values_are_the_label_values_of_before():
    # metric label values (contrib/ rules and the dashboard use them): never renamed
    assert [m.value for m in RejectReason] == ["malformed", "version", "auth", "replay", "cluster", "stale",
                                               "future", "config_digest_mismatch"]
    assert [m.value for m in NoticeKind] == ["split_brain", "config_mismatch", "master_down", "takeover_request",
                                             "handover", "drain_done", "peer_restarting", "stale_handover",
                                             "handover_failed", "auth_failed", "clock_skew"]
    assert [m.value for m in AnnounceKind] == ["garp", "na", "next_hop"]
    assert [m.value for m in NotifyResult] == ["ok", "failed", "timeout", "error", "dropped"]
    assert [m.value for m in ControlLimit] == ["too_many_clients", "idle_timeout", "request_too_large",
                                               "slow_reader", "bad_request", "internal_error"]
    # a member is its string: in logs, JSON and comparisons
    assert NoticeKind.SPLIT_BRAIN == "split_brain" and f"{NoticeKind.SPLIT_BRAIN}" == "split_brain"
    assert hash(RejectReason.AUTH) == hash("auth") and str(ControlLimit.SLOW_READER) == "slow_reader"


def test_emitters_use_the_enums():
    assert all(type(r) is RejectReason for r in AdvertRejected.REASONS)
    assert RejectReason.CONFIG_DIGEST_MISMATCH not in AdvertRejected.REASONS  # the daemon's, not the decoder's
    assert set(AdvertRejected.REASONS) | {RejectReason.CONFIG_DIGEST_MISMATCH} == set(RejectReason)
    assert {type(k) for k in TROUBLE} == {RejectReason} and {type(v) for v in TROUBLE.values()} == {NoticeKind}
    assert set(TROUBLE.values()) == {NoticeKind.AUTH_FAILED, NoticeKind.CLOCK_SKEW}


# ---------------------------------------------------------------------------
# the snapshots


def test_every_member_is_present_in_the_order_counted():
    rejected = complete(RejectReason, {RejectReason.REPLAY: 2, RejectReason.AUTH: 1})
    assert list(rejected) == [RejectReason.REPLAY, RejectReason.AUTH, RejectReason.MALFORMED, RejectReason.VERSION,
                              RejectReason.CLUSTER, RejectReason.STALE, RejectReason.FUTURE,
                              RejectReason.CONFIG_DIGEST_MISMATCH]
    assert rejected[RejectReason.FUTURE] == 0
    assert AdvertCounters().rejected == dict.fromkeys(RejectReason, 0)
    assert NoticeCounters().counts == dict.fromkeys(NoticeKind, 0)
    assert AnnounceCounters().sent == dict.fromkeys(AnnounceKind, 0)
    assert NotifyCounters().results == dict.fromkeys(NotifyResult, 0)
    assert ControlCounters().rejected == dict.fromkeys(ControlLimit, 0)
    with pytest.raises(TypeError):
        rejected[RejectReason.AUTH] = 5  # type: ignore[index]


def test_a_name_that_is_no_member_raises():
    with pytest.raises(ValueError):
        AdvertCounters(rejected={"forged": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        NoticeCounters({"split_brian": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        ControlCounters(rejected={"too_many": 1})  # type: ignore[dict-item]


def test_snapshots_are_frozen():
    c = AdvertCounters(sent=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.sent = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DaemonCounters().adverts = c  # type: ignore[misc]


def test_as_dict_is_the_status_json_of_before():
    # the sparse ones (adverts.rejected, notices) list what was counted, in that order;
    # the others every member in the enum's order
    assert AdvertCounters(sent=12, received=30, rejected={RejectReason.REPLAY: 1, RejectReason.AUTH: 2}).as_dict() \
        == {"sent": 12, "received": 30, "rejected": {"replay": 1, "auth": 2}}
    assert AdvertCounters().as_dict() == {"sent": 0, "received": 0, "rejected": {}}
    assert NoticeCounters({NoticeKind.SPLIT_BRAIN: 4, NoticeKind.MASTER_DOWN: 1}).as_dict() \
        == {"split_brain": 4, "master_down": 1}
    assert NoticeCounters().as_dict() == {}
    assert ReconcileCounters(runs=5, operations=9, errors=1, drift_repairs=1).as_dict() \
        == {"runs": 5, "operations": 9, "errors": 1, "drift_repairs": 1}
    assert AnnounceCounters(sent={AnnounceKind.NA: 2, AnnounceKind.GARP: 4}, bursts=1).as_dict() \
        == {"announcements_sent": {"na": 2, "garp": 4, "next_hop": 0}, "bursts": 1}
    assert NotifyCounters(dict.fromkeys(NotifyResult, 0) | {NotifyResult.TIMEOUT: 1}).as_dict() \
        == {"results": {"ok": 0, "failed": 0, "timeout": 1, "error": 0, "dropped": 0}}
    assert ControlCounters(refused=2, clients=1, rejected={ControlLimit.IDLE_TIMEOUT: 3}).as_dict() \
        == {"refused": 2, "clients": 1, "rejected": {"idle_timeout": 3, "too_many_clients": 0,
                                                      "request_too_large": 0, "slow_reader": 0, "bad_request": 0,
                                                      "internal_error": 0}}
    assert MetricsServerCounters(scrapes=14, renders=3, busy=1).as_dict() == {"scrapes": 14, "renders": 3, "busy": 1}
    assert TransportCounters(sent=7, drained=3).as_dict() == {
        "sent": 7, "send_errors": 0, "received": 0, "ttl_drops": 0, "foreign_drops": 0, "oversize_drops": 0,
        "recv_errors": 0, "callback_errors": 0, "drained": 3}
    # keys are plain strings (the JSON has no enum in it)
    assert all(type(k) is str for k in AdvertCounters(rejected={RejectReason.AUTH: 1}).as_dict()["rejected"])


# ---------------------------------------------------------------------------
# the metrics read the snapshots


@pytest.mark.parametrize(("metric", "label", "kind", "where"), LABELLED, ids=[m for m, *_ in LABELLED])
def test_every_member_is_a_label_value_zero_by_default(metric, label, kind, where):
    s = samples(DaemonCounters())
    assert labelled(s, metric, label) == {m.value: 0.0 for m in kind}


@pytest.mark.parametrize(("metric", "label", "kind", "where"), LABELLED, ids=[m for m, *_ in LABELLED])
def test_a_counted_member_shows_up_in_its_metric(metric, label, kind, where):
    part, attr = where
    counts = {m: 10 * (i + 1) for i, m in enumerate(kind)}
    s = samples(with_part(DaemonCounters(), part, **{attr: counts}))
    assert labelled(s, metric, label) == {m.value: float(n) for m, n in counts.items()}


@pytest.mark.parametrize(("part", "attr"), list(SCALARS), ids=[f"{p}.{a}" for p, a in SCALARS])
def test_a_counter_shows_up_in_its_metric(part, attr):
    assert samples(DaemonCounters())[(P + SCALARS[(part, attr)], ())] == 0
    s = samples(with_part(DaemonCounters(), part, **{attr: 1234}))
    assert s[(P + SCALARS[(part, attr)], ())] == 1234


def test_master_down_expiries_are_the_master_down_notices():
    s = samples(DaemonCounters(notices=NoticeCounters({NoticeKind.MASTER_DOWN: 3})))
    assert s[(P + "master_down_expiries_total", ())] == 3
    assert s[(P + "notices_total", (("kind", "master_down"),))] == 3


def exported_fields() -> list[tuple[str, str]]:
    """Every counter of the parts the metrics read."""
    zero = DaemonCounters()
    return [(f.name, g.name) for f in dataclasses.fields(zero) if f.name not in STATUS_ONLY
            for g in dataclasses.fields(getattr(zero, f.name))]


def test_every_counter_of_an_exported_part_has_its_metric():
    covered = set(SCALARS) | {where for *_, where in LABELLED}
    assert set(exported_fields()) == covered


@pytest.mark.parametrize(("part", "attr"), exported_fields(), ids=[f"{p}.{a}" for p, a in exported_fields()])
def test_a_counter_that_is_gone_fails_the_scrape(part, attr):
    """A metric reads its counter as an attribute: were it renamed, the scrape raises
    (mypy says so first) instead of exporting 0."""
    snapshot = getattr(DaemonCounters(), part)
    renamed = types.SimpleNamespace(**{f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)
                                       if f.name != attr})
    counters = dataclasses.replace(DaemonCounters(), **{part: renamed})
    collector = DaemonCollector(lambda: STATUS, lambda: counters, Telemetry(CollectorRegistry()))
    with pytest.raises(AttributeError, match=attr):
        list(collector.collect())


#: every key of STATUS the gauges read (the others are shown by failoverctl only, or
#: are labels of kernel_objects, which lists whatever kinds there are)
READ = [("version",), ("node",), ("cluster_id",), ("state",), ("priority",), ("effective_priority",),
        ("maintenance",), ("draining",), ("faults",), ("scheduling",), ("scheduling", "realtime"),
        ("scheduling", "at_risk"), ("announce",), ("announce", "announcing"), ("dataplane",),
        ("dataplane", "delivery"), ("dataplane", "objects"), ("dataplane", "objects", "ipvs_services"),
        ("dataplane", "objects", "ipvs_reals"), ("ipvs_available",), ("peers",), ("peers", 0, "node"),
        ("peers", 0, "last_seen_s"), ("peers", 0, "priority"), ("tracked",), ("tracked", 0, "name"),
        ("tracked", 0, "kind"), ("tracked", 0, "state"), ("tracked", 0, "weight"), ("tracked", 0, "results")]


@pytest.mark.parametrize("path", READ, ids=lambda p: ".".join(map(str, p)))
def test_a_status_key_that_is_gone_fails_the_scrape(path):
    st = copy.deepcopy(STATUS)
    parent = st
    for k in path[:-1]:
        parent = parent[k]
    del parent[path[-1]]
    collector = DaemonCollector(lambda: st, DaemonCounters, Telemetry(CollectorRegistry()))
    with pytest.raises(KeyError):
        list(collector.collect())


def test_the_families_of_a_scrape():
    collector = DaemonCollector(lambda: STATUS, DaemonCounters, Telemetry(CollectorRegistry()))
    names = [fam.name for fam in collector.collect()]
    assert names == [P + n for n in (
        "info", "state", "priority", "effective_priority", "maintenance", "draining", "faults",
        "scheduling_realtime", "scheduling_at_risk", "election_process_cpu_seconds",
        "election_process_resident_memory_bytes", "election_snapshot_age_seconds", "transitions",
        "last_transition_timestamp_seconds",
        "adverts_sent", "adverts_received", "adverts_rejected", "master_down_expiries", "split_brain_episodes",
        "notices", "announcements_sent", "announce_bursts", "announcing", "reconcile_runs", "reconcile_operations",
        "reconcile_errors", "drift_repairs", "delivery_installed", "ipvs_available", "kernel_objects",
        "ipvs_services", "ipvs_real_servers", "peers", "peer_last_seen_age_seconds", "peer_priority",
        "tracked_item_state", "tracked_item_weight", "track_results", "notify_runs", "control_refused",
        "control_clients", "control_rejected")]


# ---------------------------------------------------------------------------
# the daemon: its status JSON from the snapshots, its metrics from the same


class NullLog:
    def bind(self, **kw: Any) -> NullLog:
        return self

    def __getattr__(self, level: str) -> Any:
        return lambda *a, **kw: None


class StubTransport:
    closed = False

    def send(self, data: bytes) -> None:
        pass

    def drain(self) -> int:
        return 0

    def counters(self) -> TransportCounters:
        return TransportCounters(sent=7, send_errors=1, received=9, ttl_drops=2, drained=3)


@pytest.fixture
async def daemon(tmp_path: Path, key: Path):
    cfg = make_config(tmp_path / "director.toml", node={"interface": "lo"}, election={"key_file": str(key)},
                      control={"socket": str(tmp_path / "run" / "control.sock"),
                               "state_dir": str(tmp_path / "state")})
    d = Daemon(cfg, KEY, NullLog())
    d.loop = asyncio.get_running_loop()
    yield d
    if d.control is not None:
        d.control.limits.close()


def count_things(d: Daemon) -> None:
    """Counts in every part, through the daemon's own paths where there are some: the
    election process's (its datagram handler and executor, its steps and snapshot
    carried to the director as the channel carries them) and the director's."""
    src = ipaddress.ip_address("192.0.2.12")
    up, down = process.Channel.pair()
    director_end = process.Channel(up)
    e = process.Election(d.cfg, d.digest, process.Channel(down), process.SharedFlags(), NullLog(),
                         process.Setup((KEY,), d.cfg.election.max_clock_skew_ms, ()))
    e._on_datagram(b"garbage", src, time.monotonic())  # malformed
    e._on_datagram(b"VF\x09" + bytes(100), src, time.monotonic())  # version
    peer = Advert(cluster_id=51, node="director-b", address=src, priority=100, advert_interval_ms=1000,
                  state=State.BACKUP, counter=time.time_ns() // 1000, config_digest=b"\x01" * 16)
    e._on_datagram(encode_advert(peer, KEY), src, time.monotonic())  # config_digest_mismatch; config_mismatch notice
    e._on_datagram(encode_advert(peer, b"x" * 32), src, time.monotonic())  # auth, from a peer: auth_failed notice
    e._process()  # the adverts that passed reach the FSM, as after every read
    e.execute([fsm.Notice(NoticeKind.SPLIT_BRAIN, "director-b", "test")])
    e.transport = StubTransport()  # type: ignore[assignment]
    e.execute([fsm.SendAdvert(State.BACKUP, 150), fsm.SendAdvert(State.BACKUP, 150)])
    d.election_ready = True
    d.receive([*(director_end.receive() or []), e.snapshot()])
    director_end.close()
    e.chan.close()
    d.hooks.results[NotifyResult.OK] += 3
    d.hooks.results[NotifyResult.TIMEOUT] += 1
    d.announcer.sent[AnnounceKind.GARP] += 4
    d.announcer.sent[AnnounceKind.NA] += 2
    d.announcer.bursts += 1
    d.dataplane._runs, d.dataplane._operations, d.dataplane._errors, d.dataplane._drift_repairs = 5, 9, 1, 1
    d.control = ControlServer(d.cfg.control.socket, "root", None, NullLog())  # type: ignore[arg-type]
    d.control.refused, d.control.clients = 2, 1
    for limit in (ControlLimit.IDLE_TIMEOUT, ControlLimit.TOO_MANY_CLIENTS, ControlLimit.IDLE_TIMEOUT):
        d.control.limits.hit(limit)
    d.metrics_server = MetricsServer("127.0.0.1", 0, d.registry, NullLog())
    d.metrics_server.scrapes, d.metrics_server.renders, d.metrics_server.busy = 4, 2, 1


async def test_status_json_is_unchanged(daemon: Daemon):
    # what `failoverctl status` showed before the snapshots, for the same counts
    # (the same scenario run on the code before them)
    count_things(daemon)
    st = daemon.status()
    assert st["adverts"] == {"sent": 2, "received": 4, "rejected": {
        "malformed": 1, "version": 1, "config_digest_mismatch": 1, "auth": 1}}
    assert list(st["adverts"]["rejected"]) == ["malformed", "version", "config_digest_mismatch", "auth"]
    assert st["notices"] == {"config_mismatch": 1, "auth_failed": 1, "split_brain": 1}
    assert st["control"] == {"refused": 2, "clients": 1, "rejected": {
        "too_many_clients": 1, "idle_timeout": 2, "request_too_large": 0, "slow_reader": 0, "bad_request": 0,
        "internal_error": 0}}
    assert list(st["control"]["rejected"]) == [m.value for m in ControlLimit]
    assert st["metrics"] == {"listen": "127.0.0.1:9654", "scrapes": 4, "renders": 2, "busy": 1}
    assert st["transport"] == {"sent": 7, "send_errors": 1, "received": 9, "ttl_drops": 2, "foreign_drops": 0,
                               "oversize_drops": 0, "recv_errors": 0, "callback_errors": 0, "drained": 3}
    assert st["notify"] == {"commands": [], "timeout_ms": 5000,
                            "results": {"ok": 3, "failed": 0, "timeout": 1, "error": 0, "dropped": 0},
                            "pending": 0, "last": None}
    assert st["announce"] == {"mode": "per-vip", "announcing": False, "burst_running": False,
                              "announcements_sent": {"garp": 4, "na": 2, "next_hop": 0}, "vips": 0, "bursts": 1}
    assert st["dataplane"]["reconcile"] == {"runs": 5, "operations": 9, "errors": 1, "drift_repairs": 1,
                                            "last_error": None}
    # no enum in the JSON: plain strings, keys and values
    for part in ("adverts", "notices", "control", "notify", "announce"):
        assert "Kind" not in repr(st[part]) and "Reason" not in repr(st[part]) and "Result" not in repr(st[part])


async def test_status_before_the_parts_are_up(daemon: Daemon):
    st = daemon.status()
    assert st["adverts"] == {"sent": 0, "received": 0, "rejected": {}}
    assert st["notices"] == {}
    assert st["transport"] == {}
    assert st["control"] == {"refused": 0}
    assert st["metrics"] == {"listen": "127.0.0.1:9654", "scrapes": 0, "renders": 0, "busy": 0}
    assert daemon.counters() == DaemonCounters()


async def test_the_daemons_metrics_are_its_counters(daemon: Daemon):
    count_things(daemon)
    assert daemon.counters().adverts == AdvertCounters(sent=2, received=4, rejected={
        RejectReason.MALFORMED: 1, RejectReason.VERSION: 1, RejectReason.CONFIG_DIGEST_MISMATCH: 1,
        RejectReason.AUTH: 1})
    s = {}
    for fam in text_string_to_metric_families(generate_latest(daemon.registry).decode()):
        for smp in fam.samples:
            s[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert s[(P + "adverts_sent_total", ())] == 2 and s[(P + "adverts_received_total", ())] == 4
    assert labelled(s, "adverts_rejected_total", "reason") == {
        "malformed": 1, "version": 1, "auth": 1, "replay": 0, "cluster": 0, "stale": 0, "future": 0,
        "config_digest_mismatch": 1}
    assert labelled(s, "notices_total", "kind") == {m.value: 0 for m in NoticeKind} | {
        "config_mismatch": 1, "auth_failed": 1, "split_brain": 1}
    assert s[(P + "split_brain_episodes_total", ())] == 1
    assert labelled(s, "announcements_sent_total", "mode") == {"garp": 4, "na": 2, "next_hop": 0}
    assert s[(P + "announce_bursts_total", ())] == 1
    assert labelled(s, "notify_runs_total", "result") == {"ok": 3, "failed": 0, "timeout": 1, "error": 0,
                                                          "dropped": 0}
    assert (s[(P + "reconcile_runs_total", ())], s[(P + "reconcile_operations_total", ())],
            s[(P + "reconcile_errors_total", ())], s[(P + "drift_repairs_total", ())]) == (5, 9, 1, 1)
    assert s[(P + "control_refused_total", ())] == 2 and s[(P + "control_clients", ())] == 1
    assert labelled(s, "control_rejected_total", "reason") == {m.value: 0 for m in ControlLimit} | {
        "too_many_clients": 1, "idle_timeout": 2}
