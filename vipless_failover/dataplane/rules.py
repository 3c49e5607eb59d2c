"""DeliveryRules: the delivery ``ip rule`` s and the ``local`` routes of table T (pyroute2).

Ownership is the rtm/rule protocol number (``cfg.delivery.protocol``, default 98; ``ip
rule`` and ``ip route`` print it as ``proto 98``). Only rules and routes carrying one of
``protocols`` are read as ours, and every delete request names that protocol, which the
kernel matches too: a rule or route of anybody else is never changed or removed.

``netns``: a named network namespace (``ip netns add``); the netlink socket is opened
inside it (it is not created if missing).

The takeover's flip of the delivery rules does not go through pyroute2's request path
(0.3 to 0.6 ms of Python per rule on these machines): the rule requests are encoded once
(:func:`encode_rule_request`), sent in one ``send`` on a dedicated netlink socket, and
the kernel, which handles rtnetlink requests inside that system call, has queued every
acknowledgement by the time it returns (:meth:`DeliveryRules.flip`). The reads of every
reconcile pass are bare dump requests on another socket of our own (:meth:`DeliveryRules._dump`),
decoded by pyroute2's parser; pyroute2's request layer serves the rare changes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from . import nlcodec
from .desired import FULL_MASK, AddRoute, AddRule, DeleteRoute, DeleteRule, RouteSpec, RuleSpec
from .nlcodec import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    encode_attr,
)

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
FR_ACT_TO_TBL = 1
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
RT_TABLE_COMPAT = 252
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE, RTM_GETROUTE = 32, 33, 34, 26
FIB_RULE_DETACHED = 0x8 | 0x10  # FIB_RULE_IIF_DETACHED | FIB_RULE_OIF_DETACHED
DUMP_TIMEOUT_S = 5.0
DUMP_ATTEMPTS = 3  # a dump the kernel flags as interrupted (changed meanwhile) is redone
FRA_DST, FRA_IIFNAME, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 1, 3, 6, 10, 15, 16, 21
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table res1 res2 action flags
_RULE_KNOWN = {"FRA_TABLE", "FRA_PROTOCOL", "FRA_PRIORITY", "FRA_FWMARK", "FRA_FWMASK", "FRA_DST",
               "FRA_IIFNAME"}


def rule_from_msg(msg: Any) -> RuleSpec:
    """A kernel rule message as a RuleSpec (attributes we never set go to ``extra``)."""
    attrs = dict(msg["attrs"])
    extra: dict[str, Any] = {}
    for name, value in msg["attrs"]:
        if name in _RULE_KNOWN:
            continue
        if name == "FRA_SUPPRESS_PREFIXLEN" and value == FULL_MASK:
            continue
        extra[name] = value
    for hdr, default in (("src_len", 0), ("tos", 0), ("action", FR_ACT_TO_TBL), ("flags", 0)):
        value = msg[hdr]
        if hdr == "flags":
            value &= ~FIB_RULE_DETACHED  # the kernel's note that the iif/oif does not exist (yet)
        if value != default:
            extra[hdr] = value
    fwmark = attrs.get("FRA_FWMARK")
    mask = attrs.get("FRA_FWMASK")
    if fwmark is not None and mask is None:
        mask = FULL_MASK
    dst = attrs.get("FRA_DST")
    if dst is not None:
        # as desired.delivery_rules writes it: ipaddress's text form (inet_ntop writes
        # ::200:0 as ::2.0.0.0), and no destination for a /0 (the kernel drops FRA_DST)
        net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
        dst = str(net) if net.prefixlen else None
    return RuleSpec(
        family=FAMILY.get(msg["family"], msg["family"]),
        priority=attrs.get("FRA_PRIORITY", 0),
        table=attrs.get("FRA_TABLE", msg["table"]),
        protocol=attrs.get("FRA_PROTOCOL", 0),
        fwmark=fwmark,
        mask=mask,
        dst=dst,
        iif=attrs.get("FRA_IIFNAME"),
        extra=tuple(sorted((k, _hashable(v)) for k, v in extra.items())),
    )


def route_from_msg(msg: Any, lo_index: int) -> RouteSpec:
    attrs = dict(msg["attrs"])
    family = FAMILY.get(msg["family"], msg["family"])
    dst = attrs.get("RTA_DST", "0.0.0.0" if family == 4 else "::")
    kind = {RTN_LOCAL: "local", 1: "unicast"}.get(msg["type"], f"type{msg['type']}")
    oif = attrs.get("RTA_OIF")
    return RouteSpec(
        family=family,
        table=attrs.get("RTA_TABLE", msg["table"]),
        protocol=msg["proto"],
        dst=f"{dst}/{msg['dst_len']}",
        kind=kind,
        dev="lo" if oif == lo_index else f"ifindex{oif}",
    )


def encode_rule_request(rule: RuleSpec, add: bool, seq: int) -> bytes:
    """The RTM_NEWRULE (``add``) or RTM_DELRULE request for ``rule``, as ``ip rule add``
    sends it (create + exclusive, acknowledged). A rule read back from the kernel with
    ``extra`` attributes cannot be encoded (only our own rule shapes are)."""
    if rule.extra:
        raise ValueError(f"cannot encode a rule with foreign attributes: {rule.describe()}")
    family = AF[rule.family]
    dst_len, dst = 0, b""
    if rule.dst is not None:
        addr, _, plen = rule.dst.partition("/")
        dst, dst_len = socket.inet_pton(family, addr), int(plen)
    attrs = [encode_attr(FRA_PRIORITY, struct.pack("=I", rule.priority)),
             encode_attr(FRA_TABLE, struct.pack("=I", rule.table)),
             encode_attr(FRA_PROTOCOL, struct.pack("=B", rule.protocol))]
    if dst:
        attrs.append(encode_attr(FRA_DST, dst))
    if rule.fwmark is not None:
        attrs.append(encode_attr(FRA_FWMARK, struct.pack("=I", rule.fwmark)))
        attrs.append(encode_attr(FRA_FWMASK, struct.pack("=I", rule.mask if rule.mask is not None else FULL_MASK)))
    if rule.iif is not None:
        attrs.append(encode_attr(FRA_IIFNAME, rule.iif.encode() + b"\0"))
    body = _FIB_RULE_HDR.pack(family, dst_len, 0, 0, rule.table if rule.table < 256 else RT_TABLE_COMPAT,
                              0, 0, FR_ACT_TO_TBL, 0) + b"".join(attrs)
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    return nlcodec.encode(RTM_NEWRULE if add else RTM_DELRULE, flags, seq, body)


def dump_request(msg_type: int, family: int, seq: int) -> bytes:
    """An rtnetlink dump request (``RTM_GETRULE``, ``RTM_GETROUTE``) of ``family``:
    fib_rule_hdr and rtmsg are both 12 bytes, family first; all zero = no filter."""
    return nlcodec.encode(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, bytes([family]) + bytes(11))


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def open_rtnl_socket(netns: str | None = None) -> socket.socket:
    """A bound, non-blocking NETLINK_ROUTE socket of our own (in ``netns``, if named)."""
    from ..netns import in_netns  # setns in this thread: no fork (pyroute2's netns sockets fork)
    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RuleFlipper:
    """The takeover's flip: our delivery rules added (or deleted) in one system call on
    a netlink socket of its own. Needs no event loop and no pyroute2: the election
    process (election/process.py) flips with it, and :class:`DeliveryRules` too."""

    def __init__(self, netns: str | None = None):
        self._sock: socket.socket | None = open_rtnl_socket(netns)
        self._seq = 0

    def flip(self, rules: Sequence[RuleSpec], add: bool) -> list[tuple[RuleSpec, int | None]]:
        """Add (or delete) ``rules`` in one system call. Returns each rule with its result:
        0 done, an errno (EEXIST: already there; ENOENT: already gone) or None (no
        acknowledgement: unknown). Never blocks."""
        if self._sock is None:
            raise RuntimeError("RuleFlipper is closed")
        self._drain()  # stale acknowledgements of an earlier batch, if any
        seqs = [self._next_seq() for _ in rules]
        self._sock.send(b"".join(encode_rule_request(r, add, s) for r, s in zip(rules, seqs, strict=True)))
        acks = self._drain()
        return [(r, acks.get(s)) for r, s in zip(rules, seqs, strict=True)]

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    def _drain(self) -> dict[int, int]:
        assert self._sock is not None
        acks: dict[int, int] = {}
        for _ in range(64):  # bounded: a batch is a few rules
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                raise
            acks.update(nlcodec.parse_acks(data))
        return acks

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class DeliveryRules:
    """Reads and changes our rules and routes in one network namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None
        self._flipper: RuleFlipper | None = None  # the flip's own rtnetlink socket
        self._dump_sock: socket.socket | None = None  # the reads' (dumps) own rtnetlink socket
        self._seq = 0
        self._lo_index = 1

    async def open(self) -> None:
        if self._ipr is not None:
            return
        ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
        await ipr.setup_endpoint()
        self._ipr = ipr
        links = [m async for m in await ipr.link("dump")]
        for link in links:
            if link.get("ifname") == "lo":
                self._lo_index = link["index"]
        self._flipper = RuleFlipper(self.netns)
        self._dump_sock = open_rtnl_socket(self.netns)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._flipper is not None:
            self._flipper.close()
        if self._dump_sock is not None:
            self._dump_sock.close()
        self._flipper = self._dump_sock = None

    def flip(self, rules: Sequence[RuleSpec], add: bool) -> list[tuple[RuleSpec, int | None]]:
        """:meth:`RuleFlipper.flip` on this object's flip socket."""
        if self._flipper is None:
            raise RuntimeError("DeliveryRules.open() was not called")
        return self._flipper.flip(rules, add)

    def _next_seq(self) -> int:
        """A sequence number for a request of the dumps' socket."""
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("DeliveryRules.open() was not called")
        return self._ipr

    # The reads below run at every reconcile pass (every 30 s at rest), so they do not go
    # through pyroute2's request layer (``ipr.rule("dump")``, ``ipr.route("dump")``): its
    # argument processing looks ``get_<field>`` up with a new string per field and
    # request, which CPython's type attribute cache keeps alive (up to 4,096 of them,
    # keyed by address), and each request's sequence number stays banned for the next
    # 255 requests, a list that takes half an hour to fill at this rate: an idle
    # daemon's RSS crept for hours before reaching its plateau. Here: one bare dump
    # request on a socket of our own; a route is decoded (pyroute2's ``rtmsg``) only when
    # its header carries one of our protocols, so a director with a large routing table
    # does not pay Python's decoding for routes that are not ours. The loop runs between
    # two chunks of a dump.

    async def _dump(self, msg_type: int, family: int,
                    keep: Callable[[bytes, int], bool] | None = None) -> list[Any]:
        """The messages of one rtnetlink dump (``RTM_GETRULE`` or ``RTM_GETROUTE``) of
        ``family``, decoded; ``keep(data, offset)``, if given, picks the messages worth
        decoding by their raw bytes. Raises OSError (the kernel refused: its errno;
        TimeoutError: no end within 5 s)."""
        if self._dump_sock is None:
            raise RuntimeError("DeliveryRules.open() was not called")
        try:
            return await self._dump_on(self._dump_sock, msg_type, family, keep)
        except BaseException:
            # a dump left half read (an error, the time bound, a cancel) would make the
            # kernel refuse the next one on this socket (EBUSY): start afresh
            self._dump_sock.close()
            self._dump_sock = None
            try:
                self._dump_sock = open_rtnl_socket(self.netns)
            except OSError:
                pass  # the next read raises "not open"; the reconciler retries
            raise

    async def _dump_on(self, sock: socket.socket, msg_type: int, family: int,
                       keep: Callable[[bytes, int], bool] | None) -> list[Any]:
        loop = asyncio.get_running_loop()
        cls = fibmsg if msg_type == RTM_GETRULE else rtmsg
        out: list[Any] = []
        for _ in range(DUMP_ATTEMPTS):
            seq = self._next_seq()
            await loop.sock_sendall(sock, dump_request(msg_type, family, seq))
            out = []
            interrupted = done = False
            async with asyncio.timeout(DUMP_TIMEOUT_S):
                while not done:
                    data = await loop.sock_recv(sock, 1 << 16)
                    for m in nlcodec.messages(data, strict=True):  # MalformedMessage: EBADMSG
                        if m.seq != seq:
                            continue  # the rest of something abandoned
                        interrupted = interrupted or bool(m.flags & NLM_F_DUMP_INTR)
                        if m.type == NLMSG_ERROR and (err := m.error()):
                            raise OSError(err, f"dump refused: {os.strerror(err)}")
                        if m.type in (NLMSG_ERROR, NLMSG_DONE):
                            done = True
                            break
                        if keep is None or keep(data, m.offset):
                            msg = cls(m.raw)
                            msg.decode()
                            out.append(msg)
                    if not done:
                        await asyncio.sleep(0)  # let the loop run between two chunks
            if not interrupted:
                return out
        return out  # changed under every attempt: as read; the next pass reads again

    async def read_rules(self, protocols: Iterable[int]) -> frozenset[RuleSpec]:
        """Our rules (IPv4 and IPv6) carrying one of ``protocols``."""
        protos = set(protocols)
        out: set[RuleSpec] = set()
        for af in (socket.AF_INET, socket.AF_INET6):
            for msg in await self._dump(RTM_GETRULE, af):
                if msg.get("FRA_PROTOCOL") in protos:
                    out.add(rule_from_msg(msg))
        return frozenset(out)

    async def read_routes(self, protocols: Iterable[int], tables: Iterable[int]) -> frozenset[RouteSpec]:
        """Our routes (any type) carrying one of ``protocols`` in ``tables``."""
        protos, tabs = set(protocols), set(tables)

        def ours(data: bytes, offset: int) -> bool:  # rtm_protocol: byte 5 of struct rtmsg
            return data[offset + nlcodec.HEADER_SIZE + 5] in protos

        out: set[RouteSpec] = set()
        for af in (socket.AF_INET, socket.AF_INET6):
            for msg in await self._dump(RTM_GETROUTE, af, ours):
                if msg["proto"] in protos and msg.get("RTA_TABLE", msg["table"]) in tabs:
                    out.add(route_from_msg(msg, self._lo_index))
        return frozenset(out)

    async def apply(self, op: AddRule | DeleteRule | AddRoute | DeleteRoute) -> None:
        """One netlink request. An add that finds the object present, or a delete that
        finds it gone, counts as done (another reconcile got there first)."""
        try:
            if isinstance(op, AddRule):
                await self.ipr.rule("add", **self._rule_args(op.rule))
            elif isinstance(op, DeleteRule):
                await self.ipr.rule("del", **self._rule_args(op.rule))
            elif isinstance(op, AddRoute):
                await self.ipr.route("add", **self._route_args(op.route))
            elif isinstance(op, DeleteRoute):
                await self.ipr.route("del", **self._route_args(op.route))
            else:  # pragma: no cover
                raise TypeError(op)
        except NetlinkError as exc:
            adding = isinstance(op, (AddRule, AddRoute))
            if (adding and exc.code == 17) or (not adding and exc.code in (2, 3)):  # EEXIST / ENOENT, ESRCH
                if adding:
                    raise DeliveryError(op, exc, "an identical object exists (not ours?)") from None
                return
            raise DeliveryError(op, exc) from None

    @staticmethod
    def _rule_args(rule: RuleSpec) -> dict[str, Any]:
        args: dict[str, Any] = dict(family=AF[rule.family], priority=rule.priority, table=rule.table,
                                    protocol=rule.protocol, action="FR_ACT_TO_TBL")
        if rule.fwmark is not None:
            args["fwmark"] = rule.fwmark
            args["fwmask"] = rule.mask if rule.mask is not None else FULL_MASK
        if rule.dst is not None:
            addr, _, plen = rule.dst.partition("/")
            args["dst"], args["dst_len"] = addr, int(plen)
        if rule.iif is not None:
            args["iifname"] = rule.iif
        for name, value in rule.extra:  # only ever on rules read back: delete them precisely
            if name.startswith("FRA_"):
                args[name.lower()[4:]] = value
            elif name in ("src_len", "tos", "action", "flags"):
                args[name] = value
        return args

    def _route_args(self, route: RouteSpec) -> dict[str, Any]:
        if route.kind != "local" or route.dev != "lo":
            # only local routes are installed; foreign-shaped routes of ours are deleted by key
            args: dict[str, Any] = dict(family=AF[route.family], dst=route.dst, table=route.table,
                                        proto=route.protocol)
            if route.kind.startswith("type"):
                args["type"] = int(route.kind[4:])
            else:
                args["type"] = route.kind
            return args
        args = dict(family=AF[route.family], dst=route.dst, type="local", oif=self._lo_index,
                    table=route.table, proto=route.protocol)
        if route.family == 4:
            args["scope"] = RT_SCOPE_HOST  # netlink wants it (iproute2 adds it for you)
        return args


class DeliveryError(Exception):
    """A rule/route request the kernel refused."""

    def __init__(self, op: Any, exc: NetlinkError, hint: str = ""):
        self.op = op
        self.code = exc.code
        what = op.rule.describe() if hasattr(op, "rule") else op.route.describe()
        verb = type(op).__name__
        msg = f"{verb} {what}: {exc.args[1] if len(exc.args) > 1 else exc}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
