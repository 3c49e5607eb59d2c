"""Control socket: newline-delimited JSON over a Unix stream socket.

Request ``{"cmd": "status"}`` -> response ``{"ok": true, "data": {...}}`` or
``{"ok": false, "error": "..."}``. The socket is mode 0660, owned by root and the
configured group. The peer's credentials (SO_PEERCRED) decide: root may run every
command, members of the group only the read-only ones; anyone else is refused, and the
refusal is logged.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

READ_ONLY_COMMANDS = frozenset({"status"})
CHANGING_COMMANDS = frozenset({"promote", "demote", "maintenance", "reload", "announce", "restart"})
MAX_REQUEST = 64 * 1024


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


class ControlServer:
    def __init__(self, path: Path, group: str, handler: Handler, log: Any):
        self.path = Path(path)
        self.group = group
        self.gid = _group_id(group)
        self.handler = handler
        self.log = log
        self._server: asyncio.base_events.Server | None = None
        self.refused = 0

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
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chown(self.path, 0 if os.geteuid() == 0 else -1, self.gid if os.geteuid() == 0 else -1)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def allowed(self, peer: Peer, cmd: str) -> bool:
        if peer.uid == 0:
            return True
        return cmd in READ_ONLY_COMMANDS and in_group(peer, self.gid)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError
                except ValueError:
                    await self._reply(writer, {"ok": False, "error": "malformed request"})
                    continue
                cmd = req["cmd"]
                if cmd not in READ_ONLY_COMMANDS | CHANGING_COMMANDS:
                    await self._reply(writer, {"ok": False, "error": f"unknown command {cmd!r}"})
                    continue
                if not self.allowed(peer, cmd):
                    self.refused += 1
                    self.log.warning("control_refused", cmd=cmd, pid=peer.pid, uid=peer.uid, gid=peer.gid)
                    await self._reply(writer, {"ok": False, "error":
                                               f"permission denied: {cmd!r} needs "
                                               + ("root" if cmd in CHANGING_COMMANDS
                                                  else f"root or group {self.group!r}")})
                    continue
                try:
                    resp = await self.handler(req, peer)
                except Exception as exc:  # a bug must not kill the daemon
                    self.log.exception("control_error", cmd=cmd)
                    resp = {"ok": False, "error": f"internal error: {exc}"}
                await self._reply(writer, resp)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, resp: dict[str, Any]) -> None:
        writer.write(json.dumps(resp).encode() + b"\n")
        await writer.drain()


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
    except socket.timeout:
        raise Unreachable(f"daemon at {path} did not answer within {timeout:g} s") from None
    finally:
        sock.close()
