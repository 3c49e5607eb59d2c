"""Test data every tier builds from (issue 14): the smallest valid config, with overrides
deep-merged into it; its TOML text; the cluster key and the file that holds it; the status
dict the metrics collector reads.

A plain module, no fixtures: ``from tests.factories import ...`` in tests/unit and
tests/vm/guest (packages under tests/) and in tests/lab (its conftest puts the checkout
on sys.path). The TOML writer and the key writer are the lab's own
(netns-lab/netnslab/configgen.py: ./run installs it beside the daemon in every venv
that runs tests), so that a test and the lab write a config or a key the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from netnslab.configgen import dumps, write_key as _write_key
from vipless_failover import config

#: the cluster key of the tests: 32 bytes of hex, as ``vipless-failover-keygen`` writes one
KEY = b"0123456789abcdef0123456789abcdef"

#: the smallest valid config: a node and its election; every other section has its defaults
MINIMAL: dict[str, Any] = {
    "node": {"name": "director-a", "interface": "eth0", "address": "192.0.2.11"},
    "election": {"cluster_id": 51, "priority": 150, "key_file": "/nonexistent/key"},
}


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` deep-merged into a copy of ``base``: a table merges key by key; a value, a
    list or an array of tables replaces. The result shares nothing with either."""
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    for k, v in over.items():
        old = out.get(k)
        out[k] = merge(old, v) if isinstance(v, Mapping) and isinstance(old, Mapping) else copy.deepcopy(v)
    return out


def config_dict(**sections: Any) -> dict[str, Any]:
    """MINIMAL with ``sections`` deep-merged into it (see merge); a new dict each call."""
    return merge(MINIMAL, sections)


def make_config(source: str | Path = "test.toml", **sections: Any) -> config.Config:
    """``config_dict(**sections)`` through the daemon's parser, as if read from ``source``."""
    return config.parse(config_dict(**sections), source)


def config_toml(**sections: Any) -> str:
    """``config_dict(**sections)`` as TOML text: ``[node]``, ``[election]``, then the other
    sections in the order given (a line appended to the text is a key of the last table)."""
    return dumps(config_dict(**sections))


def write_key(path: Path, key: bytes = KEY) -> Path:
    """The key (``KEY`` unless told) and a newline in a new file of mode 0600."""
    return _write_key(path, key)


#: a status dict as the daemon's status() gives it, with every key the gauges read
#: (tests/unit/test_telemetry.py lists them): a BACKUP with one peer (the MASTER) and one
#: tracked check; the counters are not in it (metrics read DaemonCounters)
STATUS: dict[str, Any] = {
    "version": "0.1.0", "node": "director-a", "cluster_id": 51, "state": "BACKUP", "priority": 100,
    "effective_priority": 100, "maintenance": False, "draining": False, "faults": [],
    "scheduling": {"realtime": True, "at_risk": False}, "announce": {"announcing": False},
    "election": {"cpu_s": 1.5, "rss_bytes": 41_000_000, "snapshot_age_s": 0.2},
    "dataplane": {"delivery": False, "objects": {"rules": 0, "routes": 2, "ipvs_services": 1, "ipvs_reals": 2}},
    "ipvs_available": True,
    "peers": [{"node": "director-b", "address": "192.0.2.12", "priority": 150, "state": "MASTER",
               "last_seen_s": 0.1, "config_match": True}],
    "tracked": [{"name": "check:web", "kind": "check", "state": "ok", "weight": 10, "results": {"ok": 1}}],
}


def status(**over: Any) -> dict[str, Any]:
    """STATUS with ``over`` deep-merged into it (as config_dict); a new dict each call."""
    return merge(STATUS, over)
