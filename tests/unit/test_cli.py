"""failoverctl against a real control socket (a ControlServer with a scripted
handler): output, --json, exit codes 0/1/2/3, and the permission rule."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import time

import pytest

from vipless_failover import cli
from vipless_failover.control import ControlServer, Peer

STATUS = {
    "node": "director-a", "address": "192.0.2.11", "state": "MASTER", "priority": 150,
    "effective_priority": 110, "preempt": True, "draining": False, "maintenance": False,
    "master": {"node": "director-a", "address": "192.0.2.11", "priority": 110},
    "last_transition": {"from": "BACKUP", "to": "MASTER", "reason": "master_down", "at": time.time() - 5},
    "transitions": [{"from": "BACKUP", "to": "MASTER", "reason": "master_down", "at": time.time() - 5}],
    "faults": [], "dataplane": {"delivery": True, "objects": {"rules": 2, "routes": 2}},
    "ipvs_available": False, "announce": {"mode": "per-vip", "vips": 2, "announcing": True,
                                          "announcements_sent": {"garp": 4}},
    "adverts": {"sent": 10, "received": 9, "rejected": {}},
    "keys": {"signing": "0123456789ab", "accepted": ["ba9876543210"], "replay_window_ms": 5000,
             "peers": {"director-b": "accepted:ba9876543210"}},
    "peers": [{"node": "director-b", "address": "192.0.2.12", "state": "BACKUP", "priority": 100,
               "last_seen_s": 0.05, "config_match": True}],
    "tracked": [
        {"name": "link:eth0", "kind": "interface", "state": "ok", "weight": 0, "effect": "fault",
         "detail": "node interface"},
        {"name": "check:upstream", "kind": "check", "state": "failed", "weight": 40,
         "effect": "priority -40", "detail": "exit 1"},
    ],
}


class NullLog:
    def __getattr__(self, level):
        return lambda *a, **kw: None


@pytest.fixture
async def server(tmp_path):
    requests: list[dict] = []

    async def handler(req, peer):
        requests.append(req)
        if req["cmd"] == "status":
            return {"ok": True, "data": STATUS}
        if req["cmd"] == "demote":
            return {"ok": False, "error": "no live backup to hand over to"}
        return {"ok": True, "data": {"state": "MASTER"}}

    path = tmp_path / "control.sock"
    srv = ControlServer(path, grp.getgrgid(os.getgid()).gr_name, handler, NullLog())
    await srv.start()
    try:
        yield path, requests
    finally:
        await srv.close()


async def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_status_table_shows_tracked_items(server, capsys):
    path, _ = server
    code, out, err = await run(capsys, "-s", str(path), "status")
    assert code == 0 and err == ""
    assert "state            MASTER" in out
    assert "priority         150 (effective 110)" in out
    lines = out.splitlines()
    i = lines.index(next(ln for ln in lines if ln.startswith("TRACKED")))
    assert lines[i + 1].split()[:3] == ["link:eth0", "ok", "fault"]
    assert lines[i + 2].split()[:4] == ["check:upstream", "failed", "priority", "-40"]
    assert "director-b" in out
    # mid-rotation: the peer still signs with the key this node only accepts
    assert ("keys             signing 0123456789ab, also accepting ba9876543210; peers still signing "
            "with an accepted key: director-b (ba9876543210); replay window 5 s") in lines


async def test_status_json_is_the_daemons_data(server, capsys):
    path, _ = server
    code, out, _ = await run(capsys, "-s", str(path), "status", "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(STATUS))


async def test_changing_commands_send_their_arguments(server, capsys):
    path, requests = server
    assert (await run(capsys, "-s", str(path), "promote", "--timeout", "3"))[0] == 0
    assert (await run(capsys, "-s", str(path), "maintenance", "on"))[0] == 0
    assert (await run(capsys, "-s", str(path), "--json", "reload"))[0] == 0
    assert requests == [{"cmd": "promote", "timeout": 3.0}, {"cmd": "maintenance", "timeout": 10.0, "on": True},
                        {"cmd": "reload"}]


async def test_failure_exits_1_with_the_reason(server, capsys):
    path, _ = server
    code, out, err = await run(capsys, "-s", str(path), "demote")
    assert code == 1 and err.strip() == "failoverctl: demote: no live backup to hand over to"
    code, out, _ = await run(capsys, "-s", str(path), "demote", "--json")
    assert code == 1 and json.loads(out) == {"ok": False, "error": "no live backup to hand over to"}


async def test_usage_errors_exit_2(capsys, tmp_path):
    assert (await run(capsys))[0] == 2
    assert (await run(capsys, "frobnicate"))[0] == 2
    assert (await run(capsys, "maintenance", "maybe"))[0] == 2
    for bad_timeout in ("-1", "0", "nan", "inf", "1e9", "soon"):
        code, _, err = await run(capsys, "-s", str(tmp_path / "unused.sock"), "promote", "--timeout", bad_timeout)
        assert code == 2 and "argument --timeout" in err, bad_timeout


async def test_a_usage_answer_from_the_daemon_exits_2(capsys, tmp_path):
    async def handler(req, peer):
        return {"ok": False, "error": "timeout: must be a number of seconds, got \"x\"", "usage": True}

    path = tmp_path / "control.sock"
    srv = ControlServer(path, grp.getgrgid(os.getgid()).gr_name, handler, NullLog())
    await srv.start()
    try:
        code, _, err = await run(capsys, "-s", str(path), "demote")
        assert code == 2 and err.strip() == 'failoverctl: demote: timeout: must be a number of seconds, got "x"'
        code, out, _ = await run(capsys, "-s", str(path), "demote", "--json")
        assert code == 2 and json.loads(out)["usage"] is True
    finally:
        await srv.close()


async def test_a_broken_config_still_names_its_socket(server, capsys, tmp_path, monkeypatch):
    """The daemon runs the last good config: status must still reach it (issue 13)."""
    path, _ = server
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[control]\nsocket = "{path}"\n[node]\nname = "director a"\n')  # TOML, but invalid
    code, out, err = await run(capsys, "-c", str(bad), "status")
    assert code == 0 and "MASTER" in out
    assert err.strip() == (f"failoverctl: warning: {bad}: node.name: invalid value 'director a'; "
                           f"using its [control] socket {path}")
    # not even TOML: the default socket, with a warning
    monkeypatch.setattr(cli, "DEFAULT_SOCKET", str(path))
    bad.write_text("[control\n")
    code, out, err = await run(capsys, "-c", str(bad), "status", "--json")
    assert code == 0 and json.loads(out)["state"] == "MASTER"
    assert err.startswith(f"failoverctl: warning: {bad}: invalid TOML") and f"the default socket {path}" in err
    # a FIFO in its place is not waited for
    bad.unlink()
    os.mkfifo(bad)
    code, out, err = await asyncio.wait_for(run(capsys, "-c", str(bad), "status", "--json"), 10)
    assert code == 0 and f"{bad}: not a regular file; using the default socket" in err


async def test_unreachable_daemon_exits_3(capsys, tmp_path):
    code, _, err = await run(capsys, "-s", str(tmp_path / "nothing.sock"), "status")
    assert code == 3 and "not reachable" in err


async def test_a_daemon_that_never_answers_exits_3(capsys, tmp_path):
    path = tmp_path / "mute.sock"
    srv = await asyncio.start_unix_server(lambda r, w: asyncio.sleep(30), path=str(path))
    try:
        t0 = time.monotonic()
        code, _, err = await run(capsys, "-s", str(path), "promote", "--timeout", "0.2")
        assert code == 3 and "did not answer" in err
        assert time.monotonic() - t0 < 8  # the request timeout is the promote timeout + 5 s
    finally:
        srv.close()


def test_permission_rule():
    """Root: everything; the control group: read-only commands; anyone else: nothing.
    (The lab test runs failoverctl as real users; this checks the rule itself.)"""
    srv = ControlServer.__new__(ControlServer)
    nobody = pwd.getpwnam("nobody")
    srv.gid = grp.getgrnam("root").gr_gid
    assert srv.allowed(Peer(1, 0, 0), "promote") and srv.allowed(Peer(1, 0, 0), "status")
    member = Peer(1, nobody.pw_uid, srv.gid)  # primary group is the control group
    assert srv.allowed(member, "status") and not srv.allowed(member, "promote")
    other = Peer(1, nobody.pw_uid, nobody.pw_gid)
    assert not srv.allowed(other, "status") and not srv.allowed(other, "reload")
