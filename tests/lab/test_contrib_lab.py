"""contrib/ against a real scrape: every ``vipless_failover_*`` metric that the alert
rules and the Grafana dashboard use appears in the /metrics of both directors of a
converged pair (lab fixtures from conftest.py, scrape helpers from the operations lab
test; the names come from the same extractor as the unit test's)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_operations_lab import CONVERGE_S, METRICS, A, B, scrape, wait_for

from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster
from tests.contrib_exprs import HISTOGRAM_SUFFIXES, referenced_metric_names  # on sys.path: conftest.py

pytestmark = pytest.mark.lab


def missing_from_scrape(text: str, referenced: set[str]) -> list[str]:
    """Referenced names with no sample in ``text``; a histogram's _bucket/_sum/_count
    is enough when the histogram family is there."""
    samples: set[str] = set()
    histograms: set[str] = set()
    for fam in text_string_to_metric_families(text):
        samples |= {s.name for s in fam.samples}
        if fam.type == "histogram":
            histograms.add(fam.name)
    missing = []
    for name in sorted(referenced):
        if name in samples:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is not None and base in histograms:
            continue
        missing.append(name)
    return missing


def test_every_metric_of_the_rules_and_dashboard_is_in_a_real_scrape(
        make_cluster: Callable[..., Cluster]) -> None:
    referenced = referenced_metric_names()
    assert len(referenced) >= 20, referenced
    cluster = make_cluster(a=NodeSettings(priority=150, metrics_listen=METRICS),
                           b=NodeSettings(priority=100, metrics_listen=METRICS))
    cluster.wait_converged(CONVERGE_S, A)
    for name in (A, B):
        def scrape_with_peer(d=cluster[name]) -> str | None:
            # once it has heard its peer (backups advertise once a second) the per-peer series exist
            text = scrape(d)
            return text if "vipless_failover_peer_last_seen_age_seconds{" in text else None

        text = wait_for(scrape_with_peer, 5.0, f"{name} lists its peer in /metrics", poll=0.2)
        missing = missing_from_scrape(text, referenced)
        assert not missing, f"{name}: referenced by contrib/ but not in the scrape: {missing}"
