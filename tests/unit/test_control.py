"""The control socket's limits (issue 13, item 6), against a real ControlServer on a
Unix socket with a scripted handler: a cap on connections (with slots only root may
take), an idle timeout, a request size cap, each logged once per burst and counted;
bad fields answered as usage errors, never as internal errors."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import time

import pytest

from vipless_failover.control import (
    MAX_TIMEOUT_S,
    ControlServer,
    Peer,
    UsageError,
    check_fields,
    check_timeout,
    decode_request,
)


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


@pytest.fixture
async def make_server(tmp_path):
    made: list[ControlServer] = []
    handled: list[dict] = []

    async def handler(req, peer):
        handled.append(req)
        if req["cmd"] == "promote":
            await asyncio.sleep(0.3)  # an answer that takes a while (clients wait, not idle)
        return {"ok": True, "data": {"cmd": req["cmd"]}}

    async def make(**kw):
        log = RecordingLog()
        srv = ControlServer(tmp_path / f"c{len(made)}.sock", grp.getgrgid(os.getgid()).gr_name, handler, log, **kw)
        await srv.start()
        made.append(srv)
        return srv, log, handled

    try:
        yield make
    finally:
        for srv in made:
            await srv.close()


async def connect(srv: ControlServer):
    return await asyncio.open_unix_connection(str(srv.path))


async def ask(srv: ControlServer, req: dict | bytes) -> dict:
    r, w = await connect(srv)
    try:
        w.write(req if isinstance(req, bytes) else json.dumps(req).encode() + b"\n")
        await w.drain()
        return json.loads(await asyncio.wait_for(r.readline(), 5))
    finally:
        w.close()


# ---------------------------------------------------------------------------
# fields


@pytest.mark.parametrize("req,message", [
    ({"cmd": "promote", "timeout": "x"}, 'timeout: must be a number of seconds, got "x"'),
    ({"cmd": "promote", "timeout": -1}, "timeout: must be more than 0 and at most 3600 seconds, got -1"),
    ({"cmd": "demote", "timeout": 0}, "timeout: must be more than 0 and at most 3600 seconds, got 0"),
    ({"cmd": "demote", "timeout": 1e300}, "timeout: must be more than 0 and at most 3600 seconds, got 1e+300"),
    ({"cmd": "demote", "timeout": 10 ** 400}, "timeout: must be more than 0 and at most 3600 seconds, got "
                                              "1000000000000000000000000000000000000..."),
    ({"cmd": "promote", "timeout": True}, "timeout: must be a number of seconds, got true"),
    ({"cmd": "promote", "timeout": None}, "timeout: must be a number of seconds, got null"),
    ({"cmd": "promote", "timeout": [1]}, "timeout: must be a number of seconds, got [1]"),
    ({"cmd": "maintenance"}, "maintenance: on is required"),
    ({"cmd": "maintenance", "on": "yes"}, 'on: must be true or false, got "yes"'),
    ({"cmd": "status", "verbose": 1}, "status: unknown field 'verbose'"),
    ({"cmd": "frobnicate"}, "unknown command 'frobnicate'"),
    ({"cmd": 7}, "malformed request: cmd must be a string"),
    ({"timeout": 1}, "malformed request: cmd must be a string"),
    (b"[1, 2]\n", "malformed request: not a JSON object"),
    (b"status\n", "malformed request: not one JSON object per line"),
    (b'{"cmd": "promote", "timeout": NaN}\n', "malformed request: NaN is not a JSON number"),
    (b'{"cmd": "promote", "timeout": Infinity}\n', "malformed request: Infinity is not a JSON number"),
    (b"\xff\xfe\n", "malformed request: not one JSON object per line"),
])
async def test_bad_fields_are_usage_errors_not_internal_errors(make_server, req, message):
    srv, log, handled = await make_server()
    assert await ask(srv, req) == {"ok": False, "error": message, "usage": True}
    assert handled == []
    assert srv.counters().as_dict()["rejected"]["bad_request"] == 1
    assert not log.named("control_error")
    # the connection stays usable after a usage error
    assert (await ask(srv, {"cmd": "status"}))["ok"] is True


async def test_good_fields_reach_the_handler_checked():
    assert check_fields(decode_request(b'{"cmd": "promote", "timeout": 3}')) == {"cmd": "promote", "timeout": 3.0}
    assert check_fields({"cmd": "maintenance", "on": False}) == {"cmd": "maintenance", "on": False}
    assert check_timeout(MAX_TIMEOUT_S) == MAX_TIMEOUT_S
    with pytest.raises(UsageError):
        check_timeout(MAX_TIMEOUT_S + 1)


# ---------------------------------------------------------------------------
# connection cap


async def test_connections_over_the_cap_are_answered_and_closed_at_once(make_server):
    srv, log, _ = await make_server(max_clients=4, root_reserve=1, idle_timeout=30)
    held = [await connect(srv) for _ in range(4)]  # root (this test) may take all 4
    await asyncio.sleep(0.05)
    assert srv.clients == 4
    t0 = time.monotonic()
    for _ in range(20):
        r, w = await connect(srv)
        line = json.loads(await asyncio.wait_for(r.readline(), 2))
        assert line == {"ok": False, "error": "busy: 4 control connections already (try again later)"}
        assert await asyncio.wait_for(r.read(), 2) == b""  # closed by the daemon
        w.close()
    assert time.monotonic() - t0 < 2
    assert srv.counters().as_dict()["rejected"]["too_many_clients"] == 20
    # the held ones still work, and a freed slot is served again
    r, w = held[0]
    w.write(b'{"cmd": "status"}\n')
    assert json.loads(await r.readline())["ok"] is True
    w.close()
    await asyncio.sleep(0.05)
    assert (await ask(srv, {"cmd": "status"}))["ok"] is True
    for _, w in held[1:]:
        w.close()
    # one log line for the burst (the rest are summed up later), no traceback
    assert len(log.named("control_limit")) == 1
    assert not [e for e in log.events if e[0] in ("exception", "error")]


def test_root_keeps_slots_that_others_cannot_take():
    srv = ControlServer.__new__(ControlServer)
    srv.max_clients, srv.root_reserve = 64, 8
    assert srv.slots(Peer(1, 0, 0)) == 64
    assert srv.slots(Peer(1, 65534, 65534)) == 56


async def test_a_burst_is_logged_once_then_summed_up(make_server):
    srv, log, _ = await make_server(max_clients=1, idle_timeout=30, log_interval=0.3)
    _r0, w0 = await connect(srv)
    await asyncio.sleep(0.05)
    for _ in range(30):
        r, w = await connect(srv)
        await r.read()
        w.close()
    assert [kw["reason"] for kw in log.named("control_limit")] == ["too_many_clients"]
    await asyncio.sleep(0.5)
    summary = log.named("control_limit")[1:]
    assert summary == [{"reason": "burst", "repeated": {"too_many_clients": 29}, "interval_s": 0.3}]
    await asyncio.sleep(0.4)  # the burst is over: nothing more
    assert len(log.named("control_limit")) == 2
    w0.close()


# ---------------------------------------------------------------------------
# idle timeout, request size


async def test_a_client_that_sends_nothing_is_dropped(make_server):
    srv, _log, _ = await make_server(idle_timeout=0.3)
    r, w = await connect(srv)
    t0 = time.monotonic()
    line = json.loads(await asyncio.wait_for(r.readline(), 3))
    assert line == {"ok": False, "error": "no request within 0.3 s: closing"}
    assert await asyncio.wait_for(r.read(), 3) == b""
    assert 0.25 < time.monotonic() - t0 < 2
    w.close()
    # half a request, then silence: dropped the same way (the line must come in time)
    r, w = await connect(srv)
    w.write(b'{"cmd": "sta')
    assert (await asyncio.wait_for(r.read(), 3)).startswith(b'{"ok": false, "error": "no request within')
    w.close()
    await asyncio.sleep(0.05)
    assert srv.counters().as_dict()["rejected"]["idle_timeout"] == 2 and srv.clients == 0


async def test_waiting_for_a_slow_answer_is_not_idleness(make_server):
    srv, _, _ = await make_server(idle_timeout=0.2)
    assert await ask(srv, {"cmd": "promote", "timeout": 5}) == {"ok": True, "data": {"cmd": "promote"}}


async def test_a_request_over_the_size_cap_is_refused(make_server):
    srv, _log, handled = await make_server(max_request=1024)
    r, w = await connect(srv)
    w.write(b'{"cmd": "status", "x": "' + b"a" * 5000)
    await w.drain()
    line = json.loads(await asyncio.wait_for(r.readline(), 3))
    assert line == {"ok": False, "error": "request too large (more than 1024 bytes)", "usage": True}
    assert await asyncio.wait_for(r.read(), 3) == b""
    w.close()
    assert handled == [] and srv.counters().as_dict()["rejected"]["request_too_large"] == 1


async def test_close_does_not_wait_for_idle_clients(make_server):
    srv, _, _ = await make_server(idle_timeout=60)
    held = [await connect(srv) for _ in range(3)]
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.wait_for(srv.close(), 5)
    assert time.monotonic() - t0 < 1
    for r, w in held:
        assert await asyncio.wait_for(r.read(), 2) == b""
        w.close()


async def test_counters_for_status_and_metrics(make_server):
    srv, _, _ = await make_server()
    c = srv.counters().as_dict()
    assert c == {"refused": 0, "clients": 0, "rejected": {
        "too_many_clients": 0, "idle_timeout": 0, "request_too_large": 0, "slow_reader": 0, "bad_request": 0,
        "internal_error": 0}}


def test_a_daemon_that_closes_with_the_request_unread_is_unreachable(tmp_path):
    """What failoverctl sees while the daemon stops or restarts in place: the socket is
    closed with its request unread (ECONNRESET on a Unix socket), exit 3, no traceback."""
    import socket
    import threading

    from vipless_failover.control import Unreachable, request

    path = tmp_path / "control.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def close_unread() -> None:
        conn, _ = srv.accept()
        while not conn.recv(1, socket.MSG_PEEK):  # the request is there, unread
            pass
        conn.close()

    t = threading.Thread(target=close_unread)
    t.start()
    try:
        with pytest.raises(Unreachable, match="closed the connection"):
            request(path, {"cmd": "status"}, timeout=5)
    finally:
        t.join(5)
        srv.close()
