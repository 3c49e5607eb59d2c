"""contrib/: the Prometheus alert rules pass ``promtool check rules`` and their own
``promtool test rules`` unit tests (each alert fires and stays silent at least once),
the Grafana dashboard is well formed, and every metric the rules and the dashboard
name is one the daemon's registry exports.

promtool comes from the Debian package ``prometheus``: without it these tests skip,
except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from tests.contrib_exprs import (
    DASHBOARD,
    HISTOGRAM_SUFFIXES,
    RULES,
    RULES_TEST,
    alert_blocks,
    dashboard_exprs,
    dashboard_panels,
    load_dashboard,
    metric_names,
    referenced_metric_names,
    rule_exprs,
    rule_test_cases,
    yaml_values,
)
from tests.factories import status
from vipless_failover.metrics import build_registry
from vipless_failover.telemetry import DaemonCounters

#: the alerts contrib/README.md documents
ALERTS = {
    "VipLessFailoverDown", "VipLessFailoverNoMaster", "VipLessFailoverMultipleMasters",
    "VipLessFailoverSplitBrain", "VipLessFailoverConfigMismatch", "VipLessFailoverAdvertsRejected",
    "VipLessFailoverTakeoverSlow", "VipLessFailoverReconcileErrors", "VipLessFailoverPeerNotHeard",
    "VipLessFailoverPeerUntrusted",
}
SEVERITIES = {"critical", "warning", "info"}
DS_UID = "${datasource}"

# a small status: one peer, one tracked item, some kernel objects, and every key the
# gauges read (the families do not depend on it; it only gives the labelled families
# samples); the counters are all 0 (DaemonCounters())
STATUS = status()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        problem = "promtool (Debian package prometheus) is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}; CI must run these tests")
        pytest.skip(problem)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def exported_metric_names() -> set[str]:
    """Sample names the daemon's registry can export, from its families' names and
    types (counters: ``_total``; histograms: ``_bucket``, ``_sum``, ``_count``)."""
    registry, telemetry = build_registry(lambda: STATUS, DaemonCounters)
    telemetry.on_transition("INIT", "BACKUP", "start", 1.0)
    names: set[str] = set()
    for fam in registry.collect():
        names |= {s.name for s in fam.samples}
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names |= {fam.name + suffix for suffix in HISTOGRAM_SUFFIXES}
        elif fam.type in ("gauge", "unknown", "untyped"):
            names.add(fam.name)
    return names


# ---------------------------------------------------------------------------
# the extractor


def test_metric_names_extractor() -> None:
    expr = ('sum by (cluster_id) (vipless_failover_state{state="MASTER"} * on (job, instance) '
            'group_left (cluster_id) vipless_failover_info) + '
            'rate(vipless_failover_takeover_duration_seconds_bucket{le="0.25"}[5m]) + up{job="vipless-failover"}')
    assert metric_names(expr) == {"vipless_failover_state", "vipless_failover_info",
                                  "vipless_failover_takeover_duration_seconds_bucket"}


# ---------------------------------------------------------------------------
# alert rules


def test_rules_pass_promtool_check() -> None:
    p = run_promtool("check", "rules", str(RULES))
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"SUCCESS: (\d+) rules found", p.stdout)
    assert m, p.stdout
    # the line reader of contrib_exprs sees every rule promtool sees
    assert int(m.group(1)) == len(alert_blocks()) == len(rule_exprs())


def test_rules_unit_tests_pass() -> None:
    p = run_promtool("test", "rules", str(RULES_TEST))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout, p.stdout


def test_alerts_have_severity_summary_and_description() -> None:
    blocks = alert_blocks()
    assert set(blocks) == ALERTS
    for name, block in blocks.items():
        assert yaml_values(block, "severity") and yaml_values(block, "severity")[0] in SEVERITIES, name
        for key in ("summary", "description"):
            values = yaml_values(block, key)
            assert len(values) == 1 and len(values[0]) > 20, f"{name}: {key} {values}"


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases: dict[str, set[bool]] = defaultdict(set)
    for name, fires in rule_test_cases():
        assert name in ALERTS, f"test of unknown alert {name}"
        cases[name].add(fires)
    missing = {name: {True, False} - cases[name] for name in ALERTS if cases[name] != {True, False}}
    assert not missing, f"alerts without a firing (True) or silent (False) test case: {missing}"


# ---------------------------------------------------------------------------
# dashboard


def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["title"] and d["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == DS_UID
    ids = [p["id"] for p in dashboard_panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    panels = [p for p in dashboard_panels(d) if p["type"] != "row"]
    assert len(panels) >= 13
    for p in panels:
        assert p.get("title") and {"h", "w", "x", "y"} <= set(p["gridPos"]), p.get("title")
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == DS_UID, p["title"]
        assert p["targets"], f"{p['title']}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and metric_names(t["expr"]), f"{p['title']}: {t}"
            assert t["datasource"]["uid"] == DS_UID, p["title"]


def test_dashboard_covers_the_daemons_signals() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    p = "vipless_failover_"
    for name in ("state", "priority", "effective_priority", "transitions_total", "adverts_sent_total",
                 "adverts_received_total", "adverts_rejected_total", "takeover_duration_seconds_bucket",
                 "announcements_sent_total", "reconcile_runs_total", "reconcile_errors_total",
                 "drift_repairs_total", "peer_last_seen_age_seconds", "split_brain_episodes_total",
                 "notices_total", "kernel_objects", "ipvs_services", "ipvs_real_servers", "info"):
        assert p + name in used, name


def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    """Each panel expression, Grafana's variables replaced, as a recording rule that
    ``promtool check rules`` parses."""
    subst = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "15s", "$instance": ".*",
             "$cluster": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    n = 0
    for p in dashboard_panels():
        for t in p.get("targets") or []:
            expr = t["expr"]
            for var, value in subst.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, expr
            n += 1
            lines += [f"      - record: dashboard:expr_{n}", "        expr: |",
                      *("          " + line for line in expr.splitlines())]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    p = run_promtool("check", "rules", str(rules))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {n} rules found" in p.stdout


# ---------------------------------------------------------------------------
# names


def test_every_referenced_metric_is_exported() -> None:
    exported = exported_metric_names()
    assert "vipless_failover_state" in exported and "vipless_failover_transitions_total" in exported
    assert "vipless_failover_takeover_duration_seconds_bucket" in exported
    referenced = referenced_metric_names()
    assert len(referenced) >= 20
    unknown = referenced - exported
    assert not unknown, f"not exported by vipless_failover.metrics: {sorted(unknown)}"


def test_contrib_files_exist() -> None:
    for path in (RULES, RULES_TEST, DASHBOARD, RULES.parent.parent / "README.md"):
        assert path.is_file(), path
