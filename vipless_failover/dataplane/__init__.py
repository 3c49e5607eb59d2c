"""Data plane: delivery rules, nftables marks and IPVS, declared then reconciled.

``Dataplane`` (reconcile.py) is what the daemon drives; ``desired`` is the pure core.
Imports are lazy so that ``vipless_failover.dataplane.desired`` pulls in no pyroute2.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Dataplane"]


def __getattr__(name: str) -> Any:
    if name == "Dataplane":
        from .reconcile import Dataplane
        return Dataplane
    raise AttributeError(name)
