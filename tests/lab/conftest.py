"""Fixtures of the host-tier lab tests (network namespaces on the real kernel).

* ``lab``: a fresh :class:`netnslab.topology.Lab` (client, router, LAN bridge,
  director-a, director-b, responders), torn down after the test even on failure.
* ``make_cluster``: builds and starts the daemons of the ``lab`` with given settings
  (``make_cluster(a=NodeSettings(...), b=...)``); every daemon is stopped after.
* ``pair``: ``make_cluster()`` with the defaults (a: priority 150, b: 100, 100 ms adverts).

The checkout goes on sys.path here, so that the lab tests import ``tests.factories`` and
``tests.contrib_exprs`` however pytest was started (tests/lab is no package: pytest puts
just tests/lab on sys.path for it).

Not root: skipped with the reason, except in CI (``CI=true``), where it is a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster, default_settings
from netnslab.topology import Lab

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _require_lab() -> None:
    problem = None
    if os.geteuid() != 0:
        problem = "lab tests need root (they create network namespaces)"
    elif shutil.which("ip") is None:
        problem = "lab tests need iproute2's ip"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}; CI must run them")
        pytest.skip(problem)


@pytest.fixture
def lab_required() -> None:
    """Skips (or, in CI, fails) when the lab cannot run here."""
    _require_lab()


@pytest.fixture
def lab(request: pytest.FixtureRequest):
    """A fresh lab; ``@pytest.mark.parametrize("lab", [{...Lab kwargs}], indirect=True)``
    changes it (e.g. three directors)."""
    _require_lab()
    kwargs = getattr(request, "param", None) or {}
    with Lab(**kwargs) as lab:
        yield lab


@pytest.fixture
def make_cluster(lab: Lab):
    made: list[Cluster] = []

    def make(start: bool = True, key: bytes | None = None, **settings: NodeSettings) -> Cluster:
        chosen = default_settings(lab.director_names)
        for short, s in settings.items():
            chosen[f"director-{short}" if len(short) == 1 else short] = s
        cluster = Cluster(lab, chosen, key=key)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        for c in made:
            c.stop()


@pytest.fixture
def pair(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()
