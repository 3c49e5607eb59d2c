"""Everything start checks before it changes anything (daemon.py): at start, and for
reload, restart in place and ``vipless-failoverd --check-config``. Blocking (files,
netlink): the daemon calls these in a thread."""

from __future__ import annotations

import os

from . import config as config_mod
from .announce import check_interface
from .dataplane.ipvs import missing_schedulers


def check_startable(cfg: config_mod.Config) -> None:
    """The checks of a valid config against this machine that start makes before it
    changes anything: per-VIP mode's on-link condition (or the next-hop address), and
    the IPVS schedulers (from the kernel's module lists: files, no netlink). Blocking."""
    check_interface(cfg)
    for key, scheduler in missing_schedulers(cfg):
        raise config_mod.ConfigError(key, f"scheduler {scheduler!r} is not available in this kernel "
                                          f"(no ip_vs_{scheduler} module)", cfg.path)


def preflight(path: str | os.PathLike[str]) -> tuple[config_mod.Config, tuple[bytes, ...]]:
    """Everything start checks, for reload, restart and --check-config: the config
    (with its overlap checks), the key files (signing, then accepted), then
    :func:`check_startable`. Blocking (files, netlink): the daemon calls it in a
    thread. Raises ConfigError."""
    cfg = config_mod.load(path)
    keys = config_mod.read_keys(cfg)
    check_startable(cfg)
    return cfg, keys
