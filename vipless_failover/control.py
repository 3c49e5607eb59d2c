"""Control socket: newline-delimited JSON over a Unix stream socket.

Request ``{"cmd": "status"}`` -> response ``{"ok": true, "data": {...}}`` or
``{"ok": false, "error": "..."}``; a request the caller got wrong (not JSON, unknown
command, a field of the wrong type or out of range) is answered with ``"usage": true``
too (failoverctl exits 2). The socket is mode 0660, owned by root and the configured
group. The peer's credentials (SO_PEERCRED) decide: root may run every command,
members of the group only the read-only ones; anyone else is refused, and the refusal
is logged.

Limits, so that no client can exhaust the daemon's file descriptors or memory:
at most MAX_CLIENTS connections at once (the last ROOT_RESERVE of them for root, so a
flood by a group member never locks root out; a connection over the cap is answered
with one error line and closed at once), a request line of at most MAX_REQUEST bytes,
and IDLE_TIMEOUT_S to send a request (or to read an answer) before the connection is
dropped. Hitting a limit is counted (``rejected``, by reason) and logged once per
burst (event ``control_limit``), never once per connection.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aio import within
from .telemetry import ControlCounters, ControlLimit

READ_ONLY_COMMANDS = frozenset({"status"})
CHANGING_COMMANDS = frozenset({"promote", "demote", "maintenance", "reload", "announce", "restart"})
MAX_REQUEST = 8 * 1024  # a request line; failoverctl's are under 100 bytes
MAX_CLIENTS = 64  # connections at once
ROOT_RESERVE = 8  # of MAX_CLIENTS, only root may take these
IDLE_TIMEOUT_S = 10.0  # to send a request line, or to take an answer
MAX_TIMEOUT_S = 3600.0  # the largest ``timeout`` a command may ask for
LIMIT_LOG_INTERVAL_S = 10.0  # limit events after the first of a burst: one summary per interval


class UsageError(ValueError):
    """A request the caller got wrong: answered with ``usage: true`` (failoverctl exits 2)."""


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_timeout(value: Any) -> float:
    """A command's ``timeout``: a number of seconds, more than 0 and at most MAX_TIMEOUT_S
    (NaN and the infinities fail the comparison; a huge integer is compared exactly)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"timeout: must be a number of seconds, got {_shown(value)}")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise UsageError(f"timeout: must be more than 0 and at most {MAX_TIMEOUT_S:g} seconds, got {_shown(value)}")
    return float(value)


def _check_on(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"on: must be true or false, got {_shown(value)}")
    return value


#: the fields each command takes besides ``cmd``: name -> (check, required)
FIELDS: dict[str, dict[str, tuple[Callable[[Any], Any], bool]]] = {
    "status": {}, "reload": {}, "announce": {}, "restart": {},
    "promote": {"timeout": (check_timeout, False)},
    "demote": {"timeout": (check_timeout, False)},
    "maintenance": {"on": (_check_on, True), "timeout": (check_timeout, False)},
}


def _no_constant(name: str) -> Any:
    raise UsageError(f"malformed request: {name} is not a JSON number")


def decode_request(line: bytes) -> dict[str, Any]:
    """One request line -> ``{"cmd": ..., field: value}``; raises UsageError naming
    what is wrong. The command is checked here; its fields by :func:`check_fields`."""
    try:
        req = json.loads(line, parse_constant=_no_constant)
    except UsageError:
        raise
    except ValueError:
        raise UsageError("malformed request: not one JSON object per line") from None
    if not isinstance(req, dict):
        raise UsageError("malformed request: not a JSON object")
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        raise UsageError("malformed request: cmd must be a string")
    if cmd not in FIELDS:
        raise UsageError(f"unknown command {cmd!r}")
    return req


def check_fields(req: dict[str, Any]) -> dict[str, Any]:
    """The request with its fields checked (types, ranges, required, unknown)."""
    fields = FIELDS[req["cmd"]]
    for name in req:
        if name != "cmd" and name not in fields:
            raise UsageError(f"{req['cmd']}: unknown field {name!r}")
    out = {"cmd": req["cmd"]}
    for name, (check, required) in fields.items():
        if name in req:
            out[name] = check(req[name])
        elif required:
            raise UsageError(f"{req['cmd']}: {name} is required")
    return out


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class ControlError(Exception):
    """The control socket cannot be set up."""


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ControlError(f"control.group: no such group {name!r}") from None


def in_group(peer: Peer, gid: int) -> bool:
    if peer.gid == gid:
        return True
    try:
        user = pwd.getpwuid(peer.uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(user.pw_name, user.pw_gid)


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


class LimitLog:
    """Limit events (by reason) counted always, logged once per burst: the first at
    once, those that follow within LIMIT_LOG_INTERVAL_S as one summary at its end."""

    def __init__(self, log: Any, interval: float = LIMIT_LOG_INTERVAL_S):
        self.log = log
        self.interval = interval
        self.counts: Counter[ControlLimit] = Counter(dict.fromkeys(ControlLimit, 0))
        self._held: Counter[ControlLimit] = Counter()
        self._flush: asyncio.TimerHandle | None = None

    def hit(self, reason: ControlLimit, **fields: Any) -> None:
        self.counts[reason] += 1
        if self._flush is not None:  # a burst is on: summed up at the end of the interval
            self._held[reason] += 1
            return
        self.log.warning("control_limit", reason=reason, **fields)
        self._arm()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush = loop.call_later(self.interval, self._summary)

    def _summary(self) -> None:
        self._flush = None
        if self._held:
            self.log.warning("control_limit", reason="burst", repeated={k.value: n for k, n in self._held.items()},
                             interval_s=self.interval)
            self._held.clear()
            self._arm()  # still in a burst: the next summary at most an interval later

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class ControlServer:
    def __init__(self, path: Path, group: str, handler: Handler, log: Any, *,
                 max_clients: int = MAX_CLIENTS, root_reserve: int = ROOT_RESERVE,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_request: int = MAX_REQUEST,
                 log_interval: float = LIMIT_LOG_INTERVAL_S):
        self.path = Path(path)
        self.group = group
        self.gid = _group_id(group)
        self.handler = handler
        self.log = log
        self.max_clients = max_clients
        self.root_reserve = min(root_reserve, max_clients)
        self.idle_timeout = idle_timeout
        self.max_request = max_request
        self._server: asyncio.base_events.Server | None = None
        self.refused = 0
        self.clients = 0  # connections being served now
        self._writers: set[asyncio.StreamWriter] = set()
        self.limits = LimitLog(log, log_interval)

    def counters(self) -> ControlCounters:
        """For status and metrics: permission refusals, clients now, limit events by reason."""
        return ControlCounters(refused=self.refused, clients=self.clients, rejected=self.limits.counts)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise ControlError(f"control.socket: {self.path} exists and is not a socket")
            # a stale socket from a previous process, or a live daemon?
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()
            else:
                raise ControlError(f"control.socket: {self.path} is in use by a running daemon")
            finally:
                probe.close()
        old = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                           limit=self.max_request)
        finally:
            os.umask(old)
        os.chown(self.path, 0 if os.geteuid() == 0 else -1, self.gid if os.geteuid() == 0 else -1)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        self.limits.close()
        if self._server is not None:
            self._server.close()
            # the server waits for its connections: a client holding one open must
            # not hold up a stop or a restart
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def slots(self, peer: Peer) -> int:
        """How many connections may be open when this peer's is taken on."""
        return self.max_clients if peer.uid == 0 else self.max_clients - self.root_reserve

    def allowed(self, peer: Peer, cmd: str) -> bool:
        if peer.uid == 0:
            return True
        return cmd in READ_ONLY_COMMANDS and in_group(peer, self.gid)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.transport.abort()
            return
        if self.clients >= self.slots(peer):
            # answered and closed at once: the file descriptor is free again at the
            # next loop iteration (the line fits in an empty socket buffer)
            self.limits.hit(ControlLimit.TOO_MANY_CLIENTS, uid=peer.uid, pid=peer.pid, clients=self.clients)
            writer.write(_line({"ok": False, "error": f"busy: {self.clients} control connections "
                                                      "already (try again later)"}))
            _close(writer)
            return
        self.clients += 1
        self._writers.add(writer)
        try:
            await self._serve(reader, writer, peer)
        except (TimeoutError, ConnectionError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must not flood the log or kill the daemon
            self.limits.hit(ControlLimit.INTERNAL_ERROR, uid=peer.uid, pid=peer.pid, error=repr(exc))
        finally:
            self.clients -= 1
            self._writers.discard(writer)
            _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        while True:
            try:
                line = await within(reader.readline(), self.idle_timeout)
            except TimeoutError:
                self.limits.hit(ControlLimit.IDLE_TIMEOUT, uid=peer.uid, pid=peer.pid)
                writer.write(_line({"ok": False, "error": f"no request within {self.idle_timeout:g} s: "
                                                          "closing"}))
                return
            except (asyncio.LimitOverrunError, ValueError):  # readline's overrun
                self.limits.hit(ControlLimit.REQUEST_TOO_LARGE, uid=peer.uid, pid=peer.pid)
                writer.write(_line(_usage(f"request too large (more than {self.max_request} bytes)")))
                return
            if not line:
                return
            try:
                req = decode_request(line)
            except UsageError as exc:
                self.limits.hit(ControlLimit.BAD_REQUEST, uid=peer.uid, pid=peer.pid, error=str(exc))
                await self._reply(writer, _usage(str(exc)), peer)
                continue
            cmd = req["cmd"]
            if not self.allowed(peer, cmd):
                self.refused += 1
                self.log.warning("control_refused", cmd=cmd, pid=peer.pid, uid=peer.uid, gid=peer.gid)
                await self._reply(writer, {"ok": False, "error":
                                           f"permission denied: {cmd!r} needs "
                                           + ("root" if cmd in CHANGING_COMMANDS
                                              else f"root or group {self.group!r}")}, peer)
                continue
            try:
                req = check_fields(req)
            except UsageError as exc:
                self.limits.hit(ControlLimit.BAD_REQUEST, uid=peer.uid, pid=peer.pid, error=str(exc))
                await self._reply(writer, _usage(str(exc)), peer)
                continue
            try:
                resp = await self.handler(req, peer)
            except Exception as exc:  # a bug must not kill the daemon
                self.log.exception("control_error", cmd=cmd)
                resp = {"ok": False, "error": f"internal error: {exc}"}
            await self._reply(writer, resp, peer)

    async def _reply(self, writer: asyncio.StreamWriter, resp: dict[str, Any], peer: Peer) -> None:
        writer.write(_line(resp))
        try:
            await within(writer.drain(), self.idle_timeout)
        except TimeoutError:
            self.limits.hit(ControlLimit.SLOW_READER, uid=peer.uid, pid=peer.pid)
            raise


def _usage(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "usage": True}


def _line(resp: dict[str, Any]) -> bytes:
    return json.dumps(resp).encode() + b"\n"


def _close(writer: asyncio.StreamWriter) -> None:
    """Close now: what is still unsent (a client that does not read) is dropped rather
    than held with its file descriptor."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


class Unreachable(Exception):
    """The daemon's control socket cannot be reached."""


class Refused(Exception):
    """The caller may not use the control socket."""


def request(path: Path | str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One blocking request (for failoverctl)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unreachable(f"daemon not reachable at {path}: {exc.strerror}") from None
        except PermissionError:
            raise Refused(f"permission denied: {path} is open to root and the daemon's control "
                          "group only") from None
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise Unreachable(f"daemon at {path} closed the connection")
            buf += chunk
        return json.loads(buf)
    except TimeoutError:
        raise Unreachable(f"daemon at {path} did not answer within {timeout:g} s") from None
    except (ConnectionResetError, BrokenPipeError):
        # the daemon closed the socket with the request unread: it is stopping, or
        # between the two processes of a restart in place
        raise Unreachable(f"daemon at {path} closed the connection") from None
    finally:
        sock.close()
