"""UDP transport of election adverts: multicast on the LAN interface, or unicast to peers.

The transport moves opaque datagrams; authentication and parsing are the protocol's
job (:mod:`vipless_failover.election.protocol`). What it guarantees to the election:

- only datagrams received on ``node.interface`` (SO_BINDTODEVICE) and sent with
  TTL / hop limit 255 (so the sender is on-link, as in VRRP) are passed on; others
  are dropped and counted in ``ttl_drops``;
- unicast: only datagrams from a configured peer address are passed on; others are
  counted in ``foreign_drops``;
- ``send`` never blocks and never raises: failures are logged and counted in
  ``send_errors``; the election goes on with the next advert.

Multicast: the socket is bound to ``group:port`` on the interface, joins the group
there, sends to it with TTL 255 from ``node.address`` (IP_PKTINFO / IPV6_PKTINFO),
and does not loop its own datagrams back. Unicast: the socket is bound to
``node.address:port`` on the interface and sends one copy to each peer.

Received datagrams are read with ``recvmsg`` from a ``loop.add_reader`` callback
(asyncio's DatagramProtocol hides the TTL ancillary data), at most
:data:`RECV_BATCH` per wakeup so a flood cannot starve the loop. :meth:`AdvertTransport.drain`
reads what is waiting right now (until EAGAIN, at most :data:`DRAIN_MAX`): the daemon
calls it before it acts on a timer, because after a pause (SIGSTOP, a descheduled vCPU)
asyncio runs expired timers before it sees the readable socket (CPython's ``epoll.poll``
returns no events when it is interrupted and its timeout has passed).

Each datagram is handed on with its receive time on the loop's clock: the kernel's
stamp (SO_TIMESTAMPNS, wall clock) converted by :func:`receive_time`, however late it is
read, so the election decides on true arrival times.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import structlog

from vipless_failover.config import Config, IPAddress
from vipless_failover.telemetry import TransportCounters

# Linux values the socket module does not export on every Python build.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
IPV6_MULTICAST_ALL = getattr(socket, "IPV6_MULTICAST_ALL", 29)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_TIMESTAMPNS = 35  # SCM_TIMESTAMPNS has the same value
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

#: TTL / hop limit of every advert sent, and the only one accepted.
REQUIRED_TTL = 255
#: Datagrams read per reader wakeup at most.
RECV_BATCH = 64
#: Receive buffer asked for (the kernel doubles it): adverts keep arriving while the
#: daemon is stopped, and the ones that find the buffer full are lost, the newest first.
#: The default (212,992 bytes) holds ~256 adverts, 2.5 s at 10 ms adverts; this holds
#: ~2,500 (25 s). Memory is used only while adverts wait.
RCVBUF_BYTES = 1 << 20
#: Datagrams one :meth:`AdvertTransport.drain` reads at most: more than a full receive
#: buffer holds, so a drain normally ends at EAGAIN (all that waited has been read).
DRAIN_MAX = 4096
#: Receive buffer per datagram; adverts are far smaller, larger datagrams are dropped.
RECV_BYTES = 2048

#: ``on_datagram(data, source, rx_time)``: rx_time is when the datagram reached the
#: kernel, on the loop's clock (``loop.time()``), see :func:`receive_time`
OnDatagram = Callable[[bytes, IPAddress, float], None]

_INT = struct.Struct("@i")
_TIMESPEC = struct.Struct("@qq")


def receive_time(rx_wall: float | None, wall_now: float, loop_now: float, empty_at: float) -> float:
    """The loop-clock time a datagram reached the kernel, from its SO_TIMESTAMPNS stamp
    ``rx_wall`` (wall clock), read at ``wall_now`` / ``loop_now``.

    However old the stamp, it is used: a datagram read late (after a pause) keeps its
    true arrival time. A wall-clock step between the arrival and the read would shift
    it, so the result is kept within what is known for certain whatever the wall clock
    did: the datagram arrived after ``empty_at`` (loop time the socket was last found
    empty) and before ``loop_now``. Without a stamp: ``loop_now``."""
    if rx_wall is None:
        return loop_now
    return min(loop_now, max(empty_at, loop_now - (wall_now - rx_wall)))


class TransportError(OSError):
    """The transport cannot be opened (bad interface, address not configured, no privilege)."""


class AdvertTransport:
    """One UDP socket carrying adverts; see the module docstring."""

    def __init__(self, sock: socket.socket, cfg: Config, on_datagram: OnDatagram, ifindex: int,
                 destinations: list[tuple[Any, ...]], logger: Any = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        """``loop``: the asyncio loop whose reader reads the socket; ``None`` for a
        blocking owner (the election process), which calls :meth:`drain` when
        :meth:`fileno` is readable. Receive times are on ``time.monotonic()``'s clock,
        which is also asyncio's."""
        self._sock = sock
        self._on_datagram = on_datagram
        self._log = logger if logger is not None else structlog.get_logger(__name__)
        self._loop = loop
        self._clock = time.monotonic if loop is None else loop.time
        self.mode = cfg.election.transport
        self.interface = cfg.node.interface
        self.ifindex = ifindex
        self.family = cfg.node.address.version
        self.source = cfg.node.address
        self.destinations = destinations
        self.peers = frozenset(cfg.election.peers) if self.mode == "unicast" else None
        self._pktinfo = self._source_pktinfo() if self.mode == "multicast" else []
        self._ttl_cmsg = ((socket.IPPROTO_IP, socket.IP_TTL) if self.family == 4
                          else (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT))
        self._ancbufsize = socket.CMSG_SPACE(_INT.size) * 2 + socket.CMSG_SPACE(_TIMESPEC.size)
        #: loop time the socket was last found empty: nothing waiting in it now arrived
        #: before (the lower bound of :func:`receive_time`)
        self._empty_at = self._clock()
        self._last_send_error: str | None = None
        self._closed = False
        # counters (exported as metrics by the daemon)
        self.sent = 0
        self.send_errors = 0
        self.received = 0
        self.ttl_drops = 0
        self.foreign_drops = 0
        self.oversize_drops = 0
        self.recv_errors = 0
        self.callback_errors = 0
        self.drained = 0  # datagrams read by drain() rather than by the reader
        if loop is not None:
            loop.add_reader(sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(cls, cfg: Config, on_datagram: OnDatagram, *, logger: Any = None) -> AdvertTransport:
        """Open the transport configured in ``cfg.election`` on ``cfg.node.interface``,
        read by the running loop.

        Raises :class:`TransportError` if the socket cannot be set up."""
        return cls.open_blocking(cfg, on_datagram, logger=logger, loop=asyncio.get_running_loop())

    @classmethod
    def open_blocking(cls, cfg: Config, on_datagram: OnDatagram, *, logger: Any = None,
                      loop: asyncio.AbstractEventLoop | None = None) -> AdvertTransport:
        """:meth:`open` for an owner without an event loop (``loop`` None): it polls
        :meth:`fileno` and calls :meth:`drain`."""
        election, node = cfg.election, cfg.node
        try:
            ifindex = socket.if_nametoindex(node.interface)
        except OSError:
            raise TransportError(errno.ENODEV, f"election transport: no interface {node.interface!r}") from None
        family = socket.AF_INET if node.address.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if election.transport == "multicast":
                assert election.group is not None
                destinations = [_sockaddr(election.group, election.port, ifindex)]
                _setup_multicast(sock, cfg, ifindex)
            else:
                destinations = [_sockaddr(peer, election.port, ifindex) for peer in election.peers]
                _setup_unicast(sock, cfg, ifindex)
        except OSError as exc:
            sock.close()
            raise TransportError(exc.errno, f"election transport on {node.interface} "
                                            f"({election.transport}, {node.address}): {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, cfg, on_datagram, ifindex, destinations, logger=logger, loop=loop)

    # ------------------------------------------------------------------ sending

    def send(self, data: bytes) -> None:
        """Send one advert to the group or to every peer. Never blocks, never raises."""
        if self._closed:
            self._send_failed("closed", None)
            return
        for dest in self.destinations:
            try:
                if self._pktinfo:
                    self._sock.sendmsg([data], self._pktinfo, 0, dest)
                else:
                    self._sock.sendto(data, dest)
            except OSError as exc:
                self._send_failed(exc.strerror or type(exc).__name__, dest)
            else:
                self.sent += 1
                if self._last_send_error is not None:
                    self._log.info("advert send recovered", interface=self.interface,
                                   send_errors=self.send_errors)
                    self._last_send_error = None

    def _send_failed(self, why: str, dest: tuple[Any, ...] | None) -> None:
        self.send_errors += 1
        # log each new kind of failure, then only at powers of two (bounded log volume)
        if why != self._last_send_error or _power_of_two(self.send_errors):
            self._log.warning("advert send failed", interface=self.interface, error=why,
                              destination=dest[0] if dest else None, send_errors=self.send_errors)
        self._last_send_error = why

    def _source_pktinfo(self) -> list[tuple[int, int, bytes]]:
        if self.family == 4:
            info = struct.pack("@i4s4s", self.ifindex, self.source.packed, b"\x00" * 4)
            return [(socket.IPPROTO_IP, IP_PKTINFO, info)]
        info = struct.pack("@16si", self.source.packed, self.ifindex)
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]

    # ------------------------------------------------------------------ receiving

    def _on_readable(self) -> None:
        self._read(RECV_BATCH)

    def drain(self, limit: int = DRAIN_MAX) -> int:
        """Read what is waiting in the socket now, without blocking (until EAGAIN, at most
        ``limit`` datagrams), handing each on as the reader would. Returns how many."""
        n = self._read(limit)
        self.drained += n
        return n

    def _read(self, limit: int) -> int:
        read = 0
        for _ in range(limit):
            if self._closed:
                break
            try:
                data, ancdata, flags, addr = self._sock.recvmsg(RECV_BYTES, self._ancbufsize)
            except (BlockingIOError, InterruptedError):
                self._empty_at = self._clock()
                break
            except OSError as exc:
                self.recv_errors += 1
                if _power_of_two(self.recv_errors):
                    self._log.warning("advert receive failed", interface=self.interface,
                                      error=exc.strerror or str(exc), recv_errors=self.recv_errors)
                continue
            read += 1
            self._handle(data, ancdata, flags, addr)
        return read

    def _handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int,
                addr: tuple[Any, ...]) -> None:
        loop_now, wall_now = self._clock(), time.time()
        src = ipaddress.ip_address(addr[0].partition("%")[0])
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self.oversize_drops += 1
            self._drop_log("oversize", src, self.oversize_drops)
            return
        ttl = None
        rx_wall = None
        for level, kind, value in ancdata:
            if (level, kind) == self._ttl_cmsg and len(value) >= _INT.size:
                ttl = _INT.unpack_from(value)[0]
            elif (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS) and len(value) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(value)
                rx_wall = sec + nsec / 1e9
        if ttl != REQUIRED_TTL:
            self.ttl_drops += 1
            self._drop_log("ttl", src, self.ttl_drops, ttl=ttl)
            return
        if self.peers is not None and src not in self.peers:
            self.foreign_drops += 1
            self._drop_log("foreign", src, self.foreign_drops)
            return
        self.received += 1
        try:
            self._on_datagram(data, src, receive_time(rx_wall, wall_now, loop_now, self._empty_at))
        except Exception:  # noqa: BLE001 - a handler bug must not stop the receive loop: counted, logged
            self.callback_errors += 1
            self._log.exception("advert handler failed", interface=self.interface, source=str(src))

    def _drop_log(self, why: str, src: IPAddress, count: int, **extra: Any) -> None:
        if _power_of_two(count):
            self._log.warning("advert datagram dropped", reason=why, source=str(src),
                              interface=self.interface, count=count, **extra)

    # ------------------------------------------------------------------ misc

    def counters(self) -> TransportCounters:
        """For status: datagrams sent, received, dropped (by why) and drained."""
        return TransportCounters(
            sent=self.sent, send_errors=self.send_errors, received=self.received,
            ttl_drops=self.ttl_drops, foreign_drops=self.foreign_drops,
            oversize_drops=self.oversize_drops, recv_errors=self.recv_errors,
            callback_errors=self.callback_errors, drained=self.drained,
        )

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
        finally:
            self._sock.close()


# ---------------------------------------------------------------------------
# socket setup


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _sockaddr(address: IPAddress, port: int, ifindex: int) -> tuple[Any, ...]:
    if address.version == 4:
        return (str(address), port)
    scope = ifindex if (address.is_link_local or address.is_multicast) else 0
    return (str(address), port, 0, scope)


def _optional(sock: socket.socket, level: int, option: int, value: int) -> None:
    """Set an option older kernels may not know (IPV6_MULTICAST_ALL needs Linux 4.20).
    Binding to the group address gives the same filtering without it."""
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise


def _common(sock: socket.socket, cfg: Config) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # the master-down timer counts from arrival
    try:  # CAP_NET_ADMIN: beyond net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)  # up to rmem_max
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, cfg.node.interface.encode())
    if cfg.node.address.version == 4:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, REQUIRED_TTL)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, REQUIRED_TTL)


def _setup_multicast(sock: socket.socket, cfg: Config, ifindex: int) -> None:
    group, port, address = cfg.election.group, cfg.election.port, cfg.node.address
    assert group is not None
    _common(sock, cfg)
    if address.version == 4:
        _optional(sock, socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, REQUIRED_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        # struct ip_mreqn {multiaddr, address, ifindex}: select the interface by index
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                        struct.pack("@4s4si", b"\x00" * 4, address.packed, ifindex))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("@4s4si", group.packed, b"\x00" * 4, ifindex))
    else:
        _optional(sock, socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, REQUIRED_TTL)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                        struct.pack("@16sI", group.packed, ifindex))
    # bound to the group: unicast datagrams to this port are not seen here
    sock.bind(_sockaddr(group, port, ifindex))


def _setup_unicast(sock: socket.socket, cfg: Config, ifindex: int) -> None:
    _common(sock, cfg)
    sock.bind(_sockaddr(cfg.node.address, cfg.election.port, ifindex))
