"""Per-node daemon configs and keys for the lab.

:func:`node_config` builds the TOML document (a dict) for one director of a
:class:`~netnslab.topology.Lab`; :func:`write_config` validates it with the daemon's
own ``config.parse`` and writes it; :func:`write_key` writes a 0600 key file.
``overrides`` deep-merge into the document, so a scenario can set any key.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import topology

DEFAULT_CLUSTER_ID = 51


@dataclass(frozen=True)
class NodeSettings:
    """What a test or scenario chooses per node; everything else follows from the lab."""

    priority: int = 100
    preempt: bool = True
    preempt_delay_ms: int = 0
    advert_interval_ms: int = 100
    transport: str = "multicast"  # or "unicast" (peers: the other directors)
    family: int = 4  # address family of the election (node.address)
    cluster_id: int = DEFAULT_CLUSTER_ID
    vips: tuple[str, ...] = tuple(str(v) for v in topology.DEFAULT_VIPS)
    drain_margin_ms: int = 200
    drain_max_ms: int = 3000
    metrics_listen: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def node_config(lab: topology.Lab, director: str, settings: NodeSettings, *, key_file: Path,
                control_socket: Path) -> dict[str, Any]:
    host = lab.director(director)
    addr = host.ip4 if settings.family == 4 else host.ip6
    election: dict[str, Any] = {
        "cluster_id": settings.cluster_id,
        "priority": settings.priority,
        "advert_interval_ms": settings.advert_interval_ms,
        "preempt": settings.preempt,
        "preempt_delay_ms": settings.preempt_delay_ms,
        "key_file": str(key_file),
        "transport": settings.transport,
        "drain_margin_ms": settings.drain_margin_ms,
        "drain_max_ms": settings.drain_max_ms,
    }
    if settings.transport == "unicast":
        election["peers"] = [str(d.ip4 if settings.family == 4 else d.ip6)
                             for d in lab.directors if d.role != director]
    announce: dict[str, Any] = {"mode": lab.announce_mode, "vips": list(settings.vips)}
    if lab.announce_mode == "next-hop":
        announce["next_hop"] = str(topology.NEXT_HOP4 if settings.family == 4 else topology.NEXT_HOP6)
    doc: dict[str, Any] = {
        "node": {"name": director, "interface": host.iface, "address": str(addr)},
        "election": election,
        "control": {"socket": str(control_socket), "state_dir": str(control_socket.parent)},
        "metrics": {"listen": settings.metrics_listen},
        "delivery": {
            "table": 100,
            "rule_priority": 100,
            "rules": [{"to": str(topology.VIP_NET4)}, {"to": str(topology.VIP_NET6)}],
        },
        "announce": announce,
    }
    return _merge(doc, settings.overrides)


# ---------------------------------------------------------------------------
# a small TOML writer for these documents (tables, arrays of tables, scalars, arrays)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path, ipaddress.IPv4Address, ipaddress.IPv6Address,
                      ipaddress.IPv4Network, ipaddress.IPv6Network)):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dumps(doc: Mapping[str, Any], _path: str = "") -> str:
    lines: list[str] = []
    subs: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, Mapping) or _is_table_array(v):
            subs.append((k, v))
        else:
            lines.append(f"{k} = {_scalar(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in subs:
        path = f"{_path}.{k}" if _path else k
        if isinstance(v, Mapping):
            out += f"\n[{path}]\n" + dumps(v, path)
        else:
            for item in v:
                out += f"\n[[{path}]]\n" + dumps(item, path)
    return out


def write_config(path: Path, doc: Mapping[str, Any]) -> Path:
    """Validate with the daemon's own parser (fails early with its message), then write."""
    from vipless_failover import config as vfconfig

    text = dumps(doc)
    import tomllib

    vfconfig.parse(tomllib.loads(text), path)
    path.write_text(text)
    return path


def write_key(path: Path, key: bytes | None = None) -> Path:
    """A random 32-byte hex key (or the given one), mode 0600."""
    data = key if key is not None else secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data + b"\n")
    finally:
        os.close(fd)
    os.chmod(path, 0o600)
    return path
