"""IPVS fwmark virtual services and their real servers in the kernel (generic netlink).

What to apply is planned in ipvs_plan.py (pure: the desired services and reals, the
comparison, the ordered operations). Here: :class:`IpvsServices` reads the kernel's
fwmark services and applies operations through generic netlink (pyroute2). It only
ever touches services it owns: those in the desired state and those listed in its
ownership record (a JSON file, written atomically, that remembers services we created
and that later left the config). Services keyed by address/port (an operator's
``ipvsadm -A -t``) are never read, and fwmark services we do not own are never changed.
Also here: the netmask attribute's encoding, the kernel's errors translated for
people, and the schedulers a kernel cannot load.

The I/O methods are blocking (short netlink round trips) and open a fresh netlink
socket per call, so they can be called from any thread: inside the daemon's event
loop use ``await asyncio.to_thread(services.reconcile, desired)``. (pyroute2's
synchronous sockets refuse to run inside a running asyncio loop.)
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ipvs_plan import (
    MANAGED_FLAGS,
    AddDest,
    AddService,
    DeleteDest,
    DeleteService,
    EditDest,
    EditService,
    IpvsDest,
    IpvsOp,
    IpvsServiceState,
    IpvsState,
    ServiceKey,
    diff_ipvs,
)

if TYPE_CHECKING:  # pragma: no cover
    from vipless_failover.config import Config

DEFAULT_OWNED_PATH = Path("/run/vipless-failover/ipvs-owned.json")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# netlink encoding helpers (pure)


def netmask_attr(family: int, prefixlen: int) -> str:
    """IPVS_SVC_ATTR_NETMASK as pyroute2 wants it (an ``ip4addr``).

    IPv4: the dotted mask. IPv6: the kernel reads the same 32 bits as a prefix
    length in host byte order (what ipvsadm sends), so 128 is encoded natively.
    """
    if family == 4:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{prefixlen}").netmask)
    return socket.inet_ntoa(struct.pack("=I", prefixlen))


def netmask_prefixlen(family: int, value: str | None) -> int:
    """Inverse of :func:`netmask_attr` for what the kernel reports."""
    if value is None:
        return 32 if family == 4 else 128
    if family == 4:
        return ipaddress.IPv4Network(f"0.0.0.0/{value}").prefixlen
    return struct.unpack("=I", socket.inet_aton(value))[0]


# ---------------------------------------------------------------------------
# errors


def missing_schedulers(cfg: Config, release: str | None = None,
                       modules_root: Path = Path("/lib/modules"), sys_module: Path = Path("/sys/module")
                       ) -> list[tuple[str, str]]:
    """Schedulers the config names that this kernel cannot load: ``(key path, scheduler)``.

    A scheduler is there when its module is loaded (``/sys/module/ip_vs_NAME``), built
    in (``modules.builtin``) or installed (``modules.dep``). Where the kernel's module
    lists are absent (a container, a custom kernel) nothing can be told and nothing is
    reported: the kernel's own error then names the scheduler at apply time."""
    rel = release if release is not None else os.uname().release
    base = modules_root / rel
    try:
        listed = (base / "modules.dep").read_text()
        listed += (base / "modules.builtin").read_text() if (base / "modules.builtin").exists() else ""
    except OSError:
        return []
    missing = []
    for i, svc in enumerate(cfg.ipvs):
        mod = f"ip_vs_{svc.scheduler}"
        if (sys_module / mod).exists() or f"/{mod}.ko" in listed:
            continue
        missing.append((f"ipvs.services[{i}].scheduler", svc.scheduler))
    return missing


class IpvsError(Exception):
    """An IPVS operation failed; ``op`` is the operation (None for reads)."""

    def __init__(self, message: str, op: IpvsOp | None = None, code: int | None = None):
        self.op = op
        self.code = code
        super().__init__(message)


class IpvsUnavailable(IpvsError):
    """The kernel has no IPVS (no "IPVS" generic netlink family)."""


UNAVAILABLE_MESSAGE = ("IPVS is not available in this kernel (no IPVS generic netlink family; "
                       "is the ip_vs module loaded? modprobe ip_vs)")


def error_for(op: IpvsOp, code: int | None, detail: str = "") -> IpvsError:
    """Translate a kernel error for ``op`` into a message a person can act on."""
    if isinstance(op, (AddService, EditService)) and code in (errno.ENOENT, errno.EINVAL):
        sched = op.service.scheduler
        if code == errno.ENOENT or not sched:
            return IpvsError(f"{op}: scheduler {sched!r} not available in this kernel "
                             f"(modprobe ip_vs_{sched}?)", op, code)
    if isinstance(op, AddService) and code == errno.EEXIST:
        return IpvsError(f"{op}: service already exists", op, code)
    if isinstance(op, (AddDest, EditDest)) and code == errno.EINVAL:
        # ip_vs_new_dest: the address must be local or unicast in this namespace's
        # FIB; in a namespace without a local table (lo down, no address) it is not.
        return IpvsError(f"{op}: kernel refused the real server address (EINVAL): it must be a "
                         f"unicast address routable in this network namespace (is lo up?)", op, code)
    if isinstance(op, AddDest) and code == errno.EEXIST:
        return IpvsError(f"{op}: real server already exists", op, code)
    if code == errno.ESRCH:
        return IpvsError(f"{op}: no such service or real server (changed behind our back?)", op, code)
    name = errno.errorcode.get(code or 0, str(code))
    reason = os.strerror(code) if code else detail
    return IpvsError(f"{op}: kernel refused it: {name} ({reason})", op, code)


# ---------------------------------------------------------------------------
# ownership record


def read_owned(path: Path) -> frozenset[ServiceKey]:
    """Service keys recorded as ours. A missing file means none; a corrupt one raises."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError) as exc:
        raise IpvsError(f"cannot read IPVS ownership record {path}: {exc}") from None
    try:
        return frozenset((int(s["family"]), int(s["fwmark"])) for s in data["services"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IpvsError(f"malformed IPVS ownership record {path}: {exc!r}") from None


def write_owned(path: Path, keys: Iterable[ServiceKey]) -> None:
    """Write the record atomically (temp file in the same folder, fsync, rename)."""
    body = json.dumps({"version": 1, "services": [{"family": f, "fwmark": m}
                                                   for f, m in sorted(set(keys))]}, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------
# I/O: the kernel through pyroute2


class IpvsServices:
    """Our fwmark virtual services in one network namespace.

    ``netns``: a named namespace (``/run/netns/NAME``) or a path to a netns file;
    None means the caller's namespace. ``owned_path``: the ownership record.
    """

    def __init__(self, netns: str | None = None, owned_path: Path | str = DEFAULT_OWNED_PATH):
        self.netns = netns
        self.owned_path = Path(owned_path)

    # -- sockets ------------------------------------------------------------

    def _open(self) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        kwargs = {"netns": self.netns} if self.netns else {}
        try:
            return _quiet_ipvs_class()(**kwargs)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENOTSUP):
                raise IpvsUnavailable(UNAVAILABLE_MESSAGE, code=exc.code) from None
            raise IpvsError(f"cannot open IPVS netlink socket: {exc}", code=exc.code) from None
        except OSError as exc:
            raise IpvsError(f"cannot open IPVS netlink socket: {exc}", code=exc.errno) from None

    def available(self) -> bool:
        """True if the kernel has IPVS (in our netns). Never raises for a missing IPVS."""
        try:
            sock = self._open()
        except IpvsUnavailable:
            return False
        sock.close()
        return True

    # -- read ---------------------------------------------------------------

    def read(self) -> IpvsState:
        """The kernel's fwmark services and their real servers (others are not read)."""
        from pyroute2.netlink.exceptions import NetlinkError

        sock = self._open()
        try:
            services = []
            for msg in sock.service("dump"):
                svc_nla = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
                if svc_nla is None:
                    continue
                fwmark = svc_nla.get_attr("IPVS_SVC_ATTR_FWMARK") or 0
                if not fwmark:
                    continue  # address/port service: never ours
                af = svc_nla.get_attr("IPVS_SVC_ATTR_AF")
                family = 6 if af == socket.AF_INET6 else 4
                flags_nla = svc_nla.get_attr("IPVS_SVC_ATTR_FLAGS")
                flags = flags_nla["flags"] if flags_nla is not None else 0
                dests = tuple(self._read_dests(sock, af, fwmark))
                services.append(IpvsServiceState(
                    family=family, fwmark=fwmark,
                    scheduler=svc_nla.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "",
                    timeout=svc_nla.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0,
                    flags=flags,
                    netmask=netmask_prefixlen(family, svc_nla.get_attr("IPVS_SVC_ATTR_NETMASK")),
                    dests=dests))
            return IpvsState.of(services)
        except NetlinkError as exc:
            raise IpvsError(f"reading IPVS services failed: {exc}", code=exc.code) from None
        finally:
            sock.close()

    @staticmethod
    def _read_dests(sock: Any, af: int, fwmark: int) -> Iterator[IpvsDest]:
        from pyroute2 import IPVSService

        for msg in sock.dest("dump", service=IPVSService(fwmark=fwmark, af=af)):
            d = msg.get_attr("IPVS_CMD_ATTR_DEST")
            if d is None:
                continue
            yield IpvsDest(address=ipaddress.ip_address(d.get_attr("IPVS_DEST_ATTR_ADDR")),
                           port=d.get_attr("IPVS_DEST_ATTR_PORT") or 0,
                           weight=d.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0,
                           forward=d.get_attr("IPVS_DEST_ATTR_FWD_METHOD") or 0)

    # -- write --------------------------------------------------------------

    def apply(self, ops: Iterable[IpvsOp]) -> int:
        """Apply ``ops`` in order; returns how many were applied.

        Stops at the first failure with an :class:`IpvsError` naming the operation
        (``exc.op``); the operations before it stay applied (a later reconcile
        converges again).
        """
        from pyroute2.netlink.exceptions import NetlinkError

        ops = list(ops)
        if not ops:
            return 0
        sock = self._open()
        done = 0
        try:
            for op in ops:
                try:
                    self._apply_one(sock, op)
                except NetlinkError as exc:
                    raise error_for(op, exc.code, str(exc)) from None
                done += 1
                log.debug("ipvs: %s", op)
        finally:
            sock.close()
        return done

    @staticmethod
    def _apply_one(sock: Any, op: IpvsOp) -> None:
        from pyroute2 import IPVSDest, IPVSService

        if isinstance(op, (AddService, EditService)):
            s = op.service
            svc = IPVSService(fwmark=s.fwmark, af=_af(s.family),
                              netmask=netmask_attr(s.family, s.netmask),
                              sched_name=s.scheduler, timeout=s.timeout,
                              flags={"flags": s.flags, "mask": MANAGED_FLAGS})
            sock.service("add" if isinstance(op, AddService) else "set", service=svc)
        elif isinstance(op, DeleteService):
            sock.service("del", service=IPVSService(fwmark=op.service.fwmark,
                                                    af=_af(op.service.family)))
        else:
            family, fwmark = op.service
            svc = IPVSService(fwmark=fwmark, af=_af(family))
            d = op.dest
            dest = IPVSDest(addr=str(d.address), port=d.port, fwd_method=d.forward,
                            weight=d.weight)
            cmd = {AddDest: "add", EditDest: "set", DeleteDest: "del"}[type(op)]
            sock.dest(cmd, service=svc, dest=dest)

    # -- ownership and reconcile -------------------------------------------

    def owned(self) -> frozenset[ServiceKey]:
        return read_owned(self.owned_path)

    def reconcile(self, desired: IpvsState) -> list[IpvsOp]:
        """Read, diff against ``desired`` (deleting only owned leftovers), apply.

        Returns the operations applied (empty when the kernel already matches:
        adoption after a restart changes nothing). The ownership record is widened
        to include ``desired`` before anything is created and narrowed to exactly
        ``desired`` once all operations succeeded, so a crash in between never
        forgets a service we made.
        """
        owned = self.owned()
        actual = self.read()
        ops = diff_ipvs(desired, actual, owned)
        wanted = desired.keys()
        if not owned >= wanted:
            write_owned(self.owned_path, owned | wanted)
        self.apply(ops)
        if owned != wanted:
            write_owned(self.owned_path, wanted)
        return ops

    def remove_owned(self) -> list[IpvsOp]:
        """Delete every service we own (stop with remove_on_stop); clears the record."""
        return self.reconcile(IpvsState())


_QUIET_IPVS: Any = None


def _quiet_ipvs_class() -> Any:
    """pyroute2's IPVS socket, minus its error-level log line when the family is
    missing ("Generic netlink protocol IPVS not found"): we report that ourselves."""
    global _QUIET_IPVS
    if _QUIET_IPVS is None:
        from pyroute2 import IPVS, AsyncIPVS

        class _QuietAsyncIPVS(AsyncIPVS):
            module_err_level = "debug"

        class _QuietIPVS(IPVS):
            async_class = _QuietAsyncIPVS

        _QUIET_IPVS = _QuietIPVS
    return _QUIET_IPVS


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET
