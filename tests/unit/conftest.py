"""Fixtures of the unit tests; the data they are built from is in tests/factories.py.

* ``key``: the cluster key (``factories.KEY``) in ``tmp_path/cluster.key``, mode 0600.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import write_key


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return write_key(tmp_path / "cluster.key")
