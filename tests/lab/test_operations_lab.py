"""Operations on a running pair of daemons in the lab (issue 5):

* Prometheus metrics scraped from the daemon and linted by ``promtool check metrics``;
* every control command against a running daemon, its JSON answer checked against a
  schema; ``promote``/``demote`` round trips;
* control socket permissions with real users: root, a member of the control group,
  anyone else (temporary user and group, removed after);
* notify hooks called with the right arguments; a hanging hook delays no advert;
* tracking: a failing check forces FAULT (the backup takes over), a weighted check
  lowers the priority (the preempting backup takes over), an extra tracked interface
  losing its link forces FAULT;
* sd_notify: READY=1 with the role, STATUS= on transitions, WATCHDOG=1 pings;
* reload = start (issue 13): reload, restart and --check-config refuse what start
  refuses (an off-link VIP, a key others can read) and change nothing; a FIFO in
  place of the config is refused at once while adverts keep their schedule; status
  works with a broken config;
* the control socket's limits (issue 13): 1,200 connections from a group member
  leave root's status, the pair and the daemon's fds alone, with no log flood; bad
  fields are usage errors (exit 2).
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster, Daemon, _bin, event_time
from vipless_failover.election.fsm import BACKUP_ADVERT_PERIOD_S
from vipless_failover.metrics import RENDER_REUSE_S

pytestmark = pytest.mark.lab

A, B = "director-a", "director-b"
CONVERGE_S = 10.0
METRICS = "127.0.0.1:9654"  # inside each director's own namespace


# ---------------------------------------------------------------------------
# helpers


def ctl(d: Daemon, *args: str, timeout: float = 20.0) -> tuple[int, Any, str]:
    """failoverctl ... --json: (exit code, parsed JSON or None, stderr)."""
    p = d.ctl(*args, "--json", timeout=timeout)
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        out = p.stdout
    return p.returncode, out, p.stderr


def scrape(d: Daemon) -> str:
    code = ("import urllib.request,sys;"
            f"sys.stdout.write(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())")
    p = d.lab.exec(d.director, sys.executable, "-c", code, timeout=20)
    return p.stdout


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not in scrape")


def wait_for(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(poll)


# a tiny JSON schema: type, or dict of key -> schema (all required), or [schema] for lists
NUM = (int, float)
PEER = {"node": str, "address": str, "priority": int, "state": str, "last_seen_s": NUM, "config_match": bool}
TRANSITION = {"from": str, "to": str, "reason": str, "at": NUM}
TRACKED = {"name": str, "kind": str, "state": str, "weight": int, "effect": str, "detail": str, "results": dict}
STATUS_SCHEMA = {
    "node": str, "address": str, "state": str, "priority": int, "effective_priority": int,
    "master": (dict, type(None)), "draining": bool, "maintenance": bool, "faults": [str], "preempt": bool,
    "advert_interval_ms": int, "master_down_interval_ms": NUM, "peers": [PEER],
    "version": str, "config": str, "pid": int, "uptime_s": NUM,
    "last_transition": (dict, type(None)), "transitions": [TRANSITION],
    "adverts": {"sent": int, "received": int, "rejected": dict},
    "dataplane": {"delivery": bool, "objects": dict, "ipvs_available": bool,
                  "reconcile": {"runs": int, "operations": int, "errors": int, "drift_repairs": int}},
    "ipvs_available": bool, "announce": {"mode": str, "announcing": bool, "announcements_sent": dict},
    "tracked": [TRACKED],
    "notify": {"commands": list, "timeout_ms": int, "results": dict, "pending": int},
    "control": {"refused": int},
}
MASTER_SCHEMA = {"node": str, "address": str, "priority": int}


def check_schema(obj: Any, schema: Any, path: str = "$") -> None:
    if isinstance(schema, dict):
        assert isinstance(obj, dict), f"{path}: expected an object, got {obj!r}"
        for k, sub in schema.items():
            assert k in obj, f"{path}.{k} missing"
            check_schema(obj[k], sub, f"{path}.{k}")
    elif isinstance(schema, list):
        assert isinstance(obj, list), f"{path}: expected an array, got {obj!r}"
        for i, item in enumerate(obj):
            check_schema(item, schema[0], f"{path}[{i}]")
    else:
        ok = isinstance(obj, schema) and not (schema in (int, NUM) and isinstance(obj, bool))
        assert ok, f"{path}: expected {schema}, got {obj!r}"


def check_status(st: dict[str, Any]) -> None:
    check_schema(st, STATUS_SCHEMA)
    if st["master"] is not None:
        check_schema(st["master"], MASTER_SCHEMA, "$.master")
    if st["last_transition"] is not None:
        check_schema(st["last_transition"], TRANSITION, "$.last_transition")
    assert st["state"] in ("INIT", "BACKUP", "MASTER", "FAULT")
    for t in st["tracked"]:
        assert t["state"] in ("ok", "failed", "unknown")


# ---------------------------------------------------------------------------
# metrics


def test_metrics_scrape_passes_promtool(make_cluster: Callable[..., Cluster]) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    cluster = make_cluster(a=NodeSettings(priority=150, metrics_listen=METRICS),
                           b=NodeSettings(priority=100, metrics_listen=METRICS))
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    time.sleep(0.5)
    text_a, text_b = scrape(a), scrape(b)
    for text in (text_a, text_b):
        p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr
    p = "vipless_failover_"
    assert metric(text_a, p + "state", state="MASTER") == 1 and metric(text_a, p + "state", state="BACKUP") == 0
    assert metric(text_b, p + "state", state="BACKUP") == 1 and metric(text_b, p + "state", state="MASTER") == 0
    assert metric(text_a, p + "priority") == 150 and metric(text_a, p + "effective_priority") == 150
    assert metric(text_a, p + "adverts_sent_total") > 0 and metric(text_b, p + "adverts_received_total") > 0
    assert metric(text_a, p + "takeover_duration_seconds_count", stage="delivery") >= 1
    assert metric(text_a, p + "takeover_duration_seconds_count", stage="announcement") >= 1
    assert metric(text_a, p + "takeover_duration_seconds_sum", stage="announcement") < 1.0
    assert metric(text_a, p + "announcements_sent_total", mode="garp") > 0
    assert metric(text_a, p + "delivery_installed") == 1 and metric(text_b, p + "delivery_installed") == 0
    assert metric(text_a, p + "peers") == 1
    # backups advertise once a second (fsm.BACKUP_ADVERT_PERIOD_S)
    assert metric(text_a, p + "peer_last_seen_age_seconds", peer=B) < 1.5
    assert metric(text_a, p + "reconcile_runs_total") >= 1
    assert metric(text_a, p + "transitions_total", **{"from": "BACKUP", "to": "MASTER"}) >= 1
    assert metric(text_a, p + "tracked_item_state", item=f"link:{a.lab.director(A).iface}", state="ok") == 1
    # a master-down expiry is counted: kill the master, the backup takes over by timer
    # (b may already have had one at start, before it heard a)
    expiries = metric(text_b, p + "master_down_expiries_total")
    a.kill()
    b.wait_state("MASTER", 5)
    # a scrape within RENDER_REUSE_S of the last one is served the same body: wait past it
    time.sleep(RENDER_REUSE_S)
    text_b = scrape(b)
    assert metric(text_b, p + "master_down_expiries_total") == expiries + 1
    assert metric(text_b, p + "state", state="MASTER") == 1
    assert metric(text_b, p + "last_transition_timestamp_seconds") > time.time() - 10


def test_scrapes_and_control_clients_at_once_serve_bounded_and_move_nothing(
        make_cluster: Callable[..., Cluster], lab) -> None:
    """The isolation figure's side-door load (netnslab.load), for 4 s on the master run
    as its unit runs it: every second 500 concurrent scrapes (16 served at once, the
    rest closed unread), 200 control clients (64 served at once, the rest turned away);
    answers come back, the caps are counted, and the backup never takes over."""
    cluster = make_cluster(start=False, a=NodeSettings(priority=150, metrics_listen=METRICS),
                           b=NodeSettings(priority=100))
    for d in cluster:
        d.command_prefix = ["chrt", "-r", "10"]
    cluster.start()
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    t0 = time.time()
    p = lab.exec(A, sys.executable, "-m", "netnslab.load", "--seconds", "4", "--scrape", METRICS,
                 "--scrapes", "500", "--control", str(a.control_socket), "--control-clients", "200", timeout=60)
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["scrapes"].get("ok", 0) >= 4, out  # at least the first of each round is served
    assert out["scrapes"].get("closed", 0) > 0, out  # the cap turned the rest away
    assert out["control"].get("answered", 0) >= 4 * 50, out
    assert out["control"].get("closed", 0) + out["control"].get("refused", 0) > 0, out
    assert not [e for e in b.transitions() if e.get("to") == "MASTER" and (event_time(e) or 0) >= t0]
    st = a.status_now()
    assert st is not None and st["state"] == "MASTER"
    assert st["metrics"]["busy"] > 0 and st["control"]["rejected"]["too_many_clients"] > 0, st


# ---------------------------------------------------------------------------
# control commands


def test_every_command_answers_with_its_schema(pair: Cluster) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    # B's first advert (sent at its start) may reach A before A listens; A then hears
    # B at B's next backup advert, one BACKUP_ADVERT_PERIOD_S later
    wait_for(lambda: (a.status_now() or {}).get("peers"), 2 * BACKUP_ADVERT_PERIOD_S + 0.5,
             "the master has heard its backup")
    code, st, _ = ctl(a, "status")
    assert code == 0
    check_status(st)
    assert st["state"] == "MASTER" and st["master"]["node"] == A and st["peers"][0]["node"] == B
    assert st["tracked"][0]["name"].startswith("link:") and st["tracked"][0]["state"] == "ok"
    # human table too
    p = a.ctl("status")
    assert p.returncode == 0 and "TRACKED" in p.stdout and "MASTER" in p.stdout

    code, out, _ = ctl(a, "announce")
    assert code == 0 and out["announcing"] is True and out["mode"] == "per-vip"
    code, out, _ = ctl(b, "announce")  # master only
    assert code == 1 and out == {"ok": False, "error": "not master (state is BACKUP)"}

    code, out, _ = ctl(a, "reload")
    assert code == 0 and out == {"reloaded": str(a.config_path)}

    code, out, _ = ctl(b, "demote")  # not master
    assert code == 1 and "not master" in out["error"]

    code, out, _ = ctl(a, "maintenance", "on")  # a master hands over first
    assert code == 0 and out["state"] == "BACKUP" and out["master"] == B
    st = ctl(a, "status")[1]
    check_status(st)
    assert st["maintenance"] is True and st["state"] == "BACKUP"
    code, out, _ = ctl(a, "promote")
    assert code == 1 and out["error"] == "maintenance mode is on"
    # maintenance survives a restart; a restarted backup does not come back as master
    pid = a.pid
    assert ctl(a, "restart")[0] == 0
    st = wait_for(lambda: (a.status() or {}).get("uptime_s", 99) < 5 and a.status(), 10, "restarted daemon answers")
    assert st["pid"] == pid and st["maintenance"] is True and st["state"] == "BACKUP"
    time.sleep(1.0)  # a master-down interval and more: still backup, b still master
    assert pair.states() == {A: "BACKUP", B: "MASTER"}
    code, out, _ = ctl(a, "maintenance", "off")
    assert code == 0 and out == {}
    # preempt brings a (150) back as master
    a.wait_state("MASTER", 5)

    pid = a.pid
    t_restart = time.time()
    code, out, _ = ctl(a, "restart")
    assert code == 0 and out == {"restarting": True}
    # restart in place: same PID, master again without a failover
    st = wait_for(lambda: (a.status() or {}).get("uptime_s", 99) < 5 and a.status(), 10, "restarted daemon answers")
    assert st["pid"] == pid and a.pid == pid
    a.wait_state("MASTER", 5)
    assert b.state() == "BACKUP"
    # (b may have been master for a moment at start-up, before a's interpreter was up)
    assert not [t for t in b.transitions() if t.get("to") == "MASTER" and event_time(t) > t_restart]


def test_promote_and_demote_round_trips(pair: Cluster) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    time.sleep(0.3)
    for _ in range(2):
        t0 = time.monotonic()
        code, out, err = ctl(b, "promote", "--timeout", "5")
        took = time.monotonic() - t0
        assert code == 0, (out, err)
        assert out["state"] == "MASTER" and took < 3.0
        # returns only when the hand-over has happened: a is no longer master
        assert a.state() == "BACKUP"
        st = b.status()
        assert st["master"]["node"] == B
        # a (higher priority) yielded on request and does not preempt it back
        time.sleep(1.0)
        assert pair.states() == {A: "BACKUP", B: "MASTER"}

        t0 = time.monotonic()
        code, out, err = ctl(b, "demote", "--timeout", "5")
        took = time.monotonic() - t0
        assert code == 0, (out, err)
        assert out["master"] == A and took < 3.0
        a.wait_state("MASTER", 2)
        assert b.state() == "BACKUP"
    # promote of the master itself is a no-op that succeeds
    code, out, _ = ctl(a, "promote")
    assert code == 0 and out["state"] == "MASTER"


# ---------------------------------------------------------------------------
# permissions with real users


@pytest.fixture
def temp_users():
    """A group and two users (a member of it, and not), removed after."""
    for tool in ("groupadd", "useradd", "userdel", "groupdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    token = secrets.token_hex(3)
    group, member, other = f"vf{token}g", f"vf{token}m", f"vf{token}o"
    made: list[tuple[str, str]] = []
    try:
        subprocess.run(["groupadd", "--system", group], check=True, timeout=30)
        made.append(("groupdel", group))
        for user, extra in ((member, ["-G", group]), (other, [])):
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            "-U", *extra, user], check=True, timeout=30)
            made.insert(0, ("userdel", user))
        yield group, pwd.getpwnam(member), pwd.getpwnam(other)
    finally:
        for tool, name in made:
            subprocess.run([tool, name], timeout=30, capture_output=True)
            if tool == "userdel":  # useradd -U made a same-named group
                subprocess.run(["groupdel", name], timeout=30, capture_output=True)


def user_argv(user: pwd.struct_passwd, argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            "--inh-caps=-all", "--bounding-set=-all", *argv]


def as_user(user: pwd.struct_passwd, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(user_argv(user, argv), capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def ctl_for_users(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A failoverctl that unprivileged users can run wherever the clone lives.

    The venv (and pyenv's interpreter) may sit under /root, which is 0700 on Debian:
    copy the package (failoverctl needs only the standard library) into a
    world-readable directory and run it with the system's interpreter."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python, "no /usr/bin/python3 (./run installs python3)"
    where = tmp_path_factory.mktemp("ctl-for-users")
    os.chmod(where, 0o755)
    pkg = Path(__file__).resolve().parents[2] / "vipless_failover"
    shutil.copytree(pkg, where / "vipless_failover", ignore=shutil.ignore_patterns("__pycache__"))
    for d in [where, *where.parents]:  # pytest's base temp dirs are 0700
        if d == Path("/tmp") or d == Path("/"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o711)
    for root, dirs, files in os.walk(where):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(where)!r}); "
            "from vipless_failover.cli import main; sys.exit(main())"]


def test_control_socket_permissions_root_group_other(make_cluster: Callable[..., Cluster], temp_users,
                                                     ctl_for_users: list[str]) -> None:
    group, member, other = temp_users
    cluster = make_cluster(start=False, a=NodeSettings(priority=150, overrides={"control": {"group": group}}))
    a = cluster[A]
    # the users must reach the socket's directory (the lab's workdir is 0700)
    for d in (a.lab.workdir, a.dir):
        os.chmod(d, 0o711)
    cluster.start()
    cluster.wait_converged(CONVERGE_S, A)
    sock = a.control_socket
    stt = os.stat(sock)
    assert (stt.st_mode & 0o777, stt.st_uid, stt.st_gid) == (0o660, 0, grp.getgrnam(group).gr_gid)
    ctl_bin = ctl_for_users

    # root: everything
    assert ctl(a, "status")[0] == 0
    assert ctl(a, "announce")[0] == 0
    # a member of the control group: read-only commands only
    p = as_user(member, [*ctl_bin, "-s", str(sock), "status", "--json"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["node"] == A
    for cmd in (["promote"], ["demote"], ["maintenance", "on"], ["reload"], ["announce"], ["restart"]):
        p = as_user(member, [*ctl_bin, "-s", str(sock), *cmd])
        assert p.returncode == 1, (cmd, p.returncode, p.stderr)
        assert f"permission denied: {cmd[0]!r} needs root" in p.stderr
    # anyone else: the socket's mode keeps them out ...
    p = as_user(other, [*ctl_bin, "-s", str(sock), "status"])
    assert p.returncode == 1 and "permission denied" in p.stderr
    # ... and so does the daemon's own SO_PEERCRED check if the mode were wrong
    os.chmod(sock, 0o666)
    p = as_user(other, [*ctl_bin, "-s", str(sock), "status"])
    assert p.returncode == 1 and "permission denied: 'status' needs root or group" in p.stderr
    p = as_user(other, [*ctl_bin, "-s", str(sock), "demote"])
    assert p.returncode == 1 and "permission denied" in p.stderr
    os.chmod(sock, 0o660)
    # nothing changed, every refusal was logged and counted
    assert cluster.states() == {A: "MASTER", B: "BACKUP"}
    refused = [e for e in a.events(current_run=True) if e.get("event") == "control_refused"]
    assert len(refused) == 6 + 2
    assert {e["uid"] for e in refused} == {member.pw_uid, other.pw_uid}
    assert ctl(a, "status")[1]["control"]["refused"] == 8


# ---------------------------------------------------------------------------
# notify hooks

RECORDER = """\
import json, os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"argv": sys.argv[2:], "t": time.time(),
                        "env": {k: v for k, v in os.environ.items() if k.startswith("VIPLESS_")}}) + "\\n")
"""


def test_notify_hooks_get_the_transition_and_a_hanging_one_delays_nothing(
        make_cluster: Callable[..., Cluster], lab) -> None:
    rec = lab.workdir / "record.py"
    rec.write_text(RECORDER)
    hang_pids = lab.workdir / "hang.pids"
    hang = lab.workdir / "hang.sh"
    hang.write_text(f"#!/bin/sh\necho $$ >> {hang_pids}\nexec sleep 30\n")
    hang.chmod(0o755)
    calls = {d: lab.workdir / f"calls-{d}.jsonl" for d in (A, B)}

    def notify(d: str, *extra: list[str]) -> dict[str, Any]:
        return {"notify": {"commands": [[sys.executable, str(rec), str(calls[d])], *extra], "timeout_ms": 8000}}

    cluster = make_cluster(a=NodeSettings(priority=150, overrides=notify(A, [str(hang)])),
                           b=NodeSettings(priority=100, overrides=notify(B)))
    a, b = cluster[A], cluster[B]
    try:
        cluster.wait_converged(CONVERGE_S, A)

        def read(d: str) -> list[dict[str, Any]]:
            p = calls[d]
            return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

        # a: INIT -> BACKUP, then BACKUP -> MASTER (by hand-over from b, or by its timer)
        got = wait_for(lambda: len(read(A)) >= 2 and read(A), 5, "a's hook calls")
        assert got[0]["argv"] == ["BACKUP", "INIT", "start", A]
        last = got[-1]
        assert last["argv"][:2] == ["MASTER", "BACKUP"] and last["argv"][3] == A
        assert last["env"] == {"VIPLESS_NEW_STATE": "MASTER", "VIPLESS_OLD_STATE": "BACKUP",
                               "VIPLESS_REASON": last["argv"][2], "VIPLESS_NODE": A,
                               "VIPLESS_CLUSTER_ID": "51"}
        # the hanging hook is running now (for the first of a's transitions) ...
        wait_for(lambda: hang_pids.exists() and hang_pids.read_text().strip(), 5, "hanging hook started")
        hung = int(hang_pids.read_text().split()[0])
        os.kill(hung, 0)
        # ... and a's adverts keep their interval: b hears a every ~100 ms
        ages = []
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            st = b.status()
            ages.append(st["peers"][0]["last_seen_s"])
            time.sleep(0.05)
        assert max(ages) < 0.3, ages
        assert cluster.states() == {A: "MASTER", B: "BACKUP"}
        # a transition while the hook hangs is not delayed either
        t0 = time.monotonic()
        code, _out, _ = ctl(a, "demote", "--timeout", "3")
        assert code == 0 and time.monotonic() - t0 < 1.5
        b_calls = wait_for(lambda: [c for c in read(B) if c["argv"][0] == "MASTER"], 3, "b's MASTER hook")
        assert b_calls[-1]["argv"][1:] == ["BACKUP", f"handover:{A}", B]
        a_calls = wait_for(lambda: [c for c in read(A) if c["argv"][:2] == ["BACKUP", "MASTER"]], 3,
                           "a's BACKUP hook")
        assert a_calls[-1]["argv"][2] == f"demote:{B}"
        # the hung hook is killed at its timeout and counted
        wait_for(lambda: ctl(a, "status")[1]["notify"]["results"]["timeout"] >= 1, 12, "hook timeout")
        assert not _alive(hung)
        st = ctl(a, "status")[1]
        assert st["notify"]["results"]["ok"] >= 3
        assert any(e.get("event") == "notify_failed" and e.get("result") == "timeout"
                   for e in a.events(current_run=True))
    finally:
        cluster.stop()
        if hang_pids.exists():
            for pid in hang_pids.read_text().split():
                if _alive(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------------------
# tracking


def _check(flag: Path, **kw: Any) -> dict[str, Any]:
    return {"name": "svc", "command": ["/usr/bin/test", "-e", str(flag)], "interval_ms": 100,
            "timeout_ms": 100, **kw}


def test_failing_check_forces_fault_and_the_backup_takes_over(make_cluster: Callable[..., Cluster], lab) -> None:
    flag = lab.workdir / "svc-healthy"
    flag.write_text("")
    cluster = make_cluster(a=NodeSettings(priority=150, overrides={"track": {"check": [_check(flag, fall=2)]}}))
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    st = a.status()
    item = next(t for t in st["tracked"] if t["name"] == "check:svc")
    assert item["state"] == "ok" and item["effect"] == "fault"
    t0 = time.time()
    flag.unlink()
    ev = b.wait_transition("MASTER", 3, after=t0)
    a.wait_state("FAULT", 2)
    # fall=2 at 100 ms, then an immediate hand-over: well under a second
    assert event_time(ev) - t0 < 1.0
    st = a.status()
    assert st["faults"] == ["check:svc"]
    assert next(t for t in st["tracked"] if t["name"] == "check:svc")["state"] == "failed"
    assert "check:svc" in a.ctl("status").stdout
    # recovery: BACKUP, then preempt makes a master again
    flag.write_text("")
    a.wait_state("MASTER", 5)
    assert b.state() == "BACKUP"


def test_weighted_check_lowers_priority_and_the_backup_preempts(make_cluster: Callable[..., Cluster], lab) -> None:
    flag = lab.workdir / "svc-healthy"
    flag.write_text("")
    cluster = make_cluster(a=NodeSettings(priority=150,
                                          overrides={"track": {"check": [_check(flag, weight=60)]}}))
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    flag.unlink()
    b.wait_state("MASTER", 5)
    st = a.status()
    assert st["state"] == "BACKUP" and st["effective_priority"] == 90 and st["priority"] == 150
    assert st["faults"] == []
    item = next(t for t in st["tracked"] if t["name"] == "check:svc")
    assert item["state"] == "failed" and item["effect"] == "priority -60"
    assert b.status()["peers"][0]["priority"] == 90  # advertised
    flag.write_text("")
    a.wait_state("MASTER", 5)
    assert a.status()["effective_priority"] == 150 and b.state() == "BACKUP"


def test_tracked_interface_link_down_forces_fault(make_cluster: Callable[..., Cluster], lab) -> None:
    ns = lab.ns(A)
    tk0, tk1 = lab.link("tk0"), lab.link("tk1")
    # a veth pair inside a's namespace (removed with it); tk0 is tracked, tk1 its peer
    subprocess.run(["ip", "-n", ns, "link", "add", tk0, "type", "veth", "peer", "name", tk1], check=True)
    for dev in (tk0, tk1):
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    cluster = make_cluster(a=NodeSettings(priority=150, overrides={"track": {"interface": [{"name": tk0}]}}))
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    assert next(t for t in a.status()["tracked"] if t["name"] == f"link:{tk0}")["state"] == "ok"
    t0 = time.time()
    subprocess.run(["ip", "-n", ns, "link", "set", tk1, "down"], check=True)  # tk0 loses carrier
    ev = b.wait_transition("MASTER", 3, after=t0)
    assert event_time(ev) - t0 < 0.5  # a netlink event, not polling
    st = a.wait_state("FAULT", 2)
    assert st["faults"] == [f"link:{tk0}"]
    subprocess.run(["ip", "-n", ns, "link", "set", tk1, "up"], check=True)
    a.wait_state("MASTER", 5)
    # a deleted tracked interface counts as down
    subprocess.run(["ip", "-n", ns, "link", "del", tk0], check=True)
    st = a.wait_state("FAULT", 3)
    assert next(t for t in st["tracked"] if t["name"] == f"link:{tk0}")["detail"] == "interface removed"


def _unresolved(lab, director: str) -> set[str]:
    out = set()
    for fam in ("-4", "-6"):
        for line in lab.ip(director, fam, "neigh", "show").stdout.splitlines():
            if "INCOMPLETE" in line or "FAILED" in line:
                out.add(line.split()[0])
    return out


def test_link_up_forgets_neighbours_left_unresolved_while_down(make_cluster: Callable[..., Cluster], lab) -> None:
    """Seen in CI (link-down scenario, ~1 run in 8): a TCP retransmission while the LAN
    link was down left the router's entry INCOMPLETE; after link up the new master's
    replies waited for its next solicitation, then were dropped with it (540-700 ms of
    loss). The daemon now deletes such entries when the link comes back."""
    cluster = make_cluster(a=NodeSettings(priority=150))
    a = cluster[A]
    cluster.wait_converged(CONVERGE_S, A)
    port = lab.link("p-a")
    router = ("192.0.2.1", "2001:db8:1::1")
    lab.ip("lan", "link", "set", port, "down")
    a.wait_state("FAULT", 3)
    # as a retransmission would: packets towards the router while the carrier is gone
    for dst in router:
        lab.exec(A, "ping", "-c", "1", "-W", "0.2", dst, check=False)
    assert set(router) <= _unresolved(lab, A), "precondition: the router's entries are unresolved"
    t_up = time.monotonic()
    lab.ip("lan", "link", "set", port, "up")
    # the kernel would solicit again a second after the entry was made: well past this
    wait_for(lambda: not (set(router) & _unresolved(lab, A)), 0.5, "unresolved entries forgotten at link up",
             poll=0.01)
    assert time.monotonic() - t_up < 0.6
    ev = wait_for(lambda: [e for e in a.events(current_run=True) if e.get("event") == "neighbours_forgotten"], 2,
                  "a neighbours_forgotten event")
    assert set(router) <= set(ev[-1]["addresses"])
    a.wait_state("MASTER", 5)


# ---------------------------------------------------------------------------
# sd_notify


def test_sd_notify_ready_status_and_watchdog(make_cluster: Callable[..., Cluster], lab) -> None:
    cluster = make_cluster(start=False)
    a, b = cluster[A], cluster[B]
    path = lab.workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        b.start()
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        a.proc = lab.spawn(A, [_bin("vipless-failoverd"), "--config", str(a.config_path), "--log-format", "json"],
                           name="daemon-director-a", log=a.log_path, env=env)
        msgs: list[tuple[float, dict[str, str]]] = []
        end = time.monotonic() + 6
        while time.monotonic() < end:
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            msgs.append((time.monotonic(), dict(line.split("=", 1) for line in data.splitlines())))
        ready = [m for _, m in msgs if m.get("READY") == "1"]
        assert len(ready) == 1 and ready[0]["MAINPID"] == str(a.pid)
        assert ready[0]["STATUS"].startswith(("BACKUP", "INIT", "FAULT", "MASTER"))
        statuses = [m["STATUS"] for _, m in msgs if "STATUS" in m]
        assert any(s.startswith("MASTER, priority 150") for s in statuses), statuses
        pings = [t for t, m in msgs if m.get("WATCHDOG") == "1"]
        # every 0.2 s for ~6 s
        assert len(pings) >= 20
        assert max(b2 - a2 for a2, b2 in itertools.pairwise(pings)) < 0.4
        # a graceful stop says STOPPING=1
        a.term()
        a.wait_exit(10)
        rest = []
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in r for r in rest)
    finally:
        cluster.stop()
        sock.close()


def test_reload_applies_new_tracking_and_hooks(make_cluster: Callable[..., Cluster], lab) -> None:
    cluster = make_cluster()
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    assert [t["name"] for t in a.status()["tracked"]] == [f"link:{lab.director(A).iface}"]
    rec = lab.workdir / "record.py"
    rec.write_text(RECORDER)
    calls = lab.workdir / "calls-reload.jsonl"
    # a check that fails from the start, with a weight, and a hook: added by reload
    a.reconfigure(overrides={"track": {"check": [{"name": "gone", "command": ["/bin/false"],
                                                  "interval_ms": 100, "timeout_ms": 100, "weight": 100}]},
                             "notify": {"commands": [[sys.executable, str(rec), str(calls)]]}})
    code, out, err = ctl(a, "reload")
    assert code == 0, (out, err)
    b.wait_state("MASTER", 5)  # a advertises 150 - 100 = 50 < 100: b preempts
    st = a.status()
    assert st["effective_priority"] == 50
    assert [t["state"] for t in st["tracked"] if t["name"] == "check:gone"] == ["failed"]
    got = wait_for(lambda: calls.exists() and calls.read_text().strip(), 5, "hook after reload")
    assert json.loads(got.splitlines()[-1])["argv"][:2] == ["BACKUP", "MASTER"]
    # reload without it: the item is gone and the priority is back
    a.reconfigure(overrides={})
    assert ctl(a, "reload")[0] == 0
    a.wait_state("MASTER", 5)
    st = a.status()
    assert st["effective_priority"] == 150 and not [t for t in st["tracked"] if t["name"] == "check:gone"]


def test_a_reload_that_replaces_the_announcer_keeps_its_counts(pair: Cluster) -> None:
    """A reload with a changed [announce] builds a new announcer; its frames and bursts
    counters go on from the old one's (a Prometheus counter that goes back reads as a
    process restart, and rate() spikes)."""
    a = pair[A]
    pair.wait_converged(CONVERGE_S, A)
    wait_for(lambda: not a.status()["announce"]["burst_running"], 10, "the takeover's bursts done")
    before = a.status()["announce"]
    assert before["bursts"] >= 1 and sum(before["announcements_sent"].values()) > 0
    a.reconfigure(overrides={"announce": {"repeats": 1}})
    assert ctl(a, "reload")[0] == 0
    after = a.status()["announce"]
    assert after["bursts"] >= before["bursts"], (before, after)
    for kind, n in before["announcements_sent"].items():
        assert after["announcements_sent"][kind] >= n, (before, after)


# ---------------------------------------------------------------------------
# reload = start (issue 13)

OFF_LINK_VIP = "203.0.113.99"  # the client's side of the router: not on the directors' LAN


def ctl_socket(d: Daemon, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """failoverctl -s SOCKET ... (for a daemon whose config file is not a config now)."""
    return subprocess.run([_bin("failoverctl"), "-s", str(d.control_socket), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_reload_restart_and_check_config_refuse_what_start_refuses(pair: Cluster, lab) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    good = a.config_path.read_text()
    st0 = a.status()
    t0 = time.time()

    # a VIP the router cannot have on-link: start refuses it, so do reload (failoverctl
    # and SIGHUP), restart and --check-config
    a.reconfigure(vips=(*a.settings.vips, OFF_LINK_VIP))
    reason = f"announce.vips[3]: {OFF_LINK_VIP}/32 is not on {lab.director(A).iface}'s subnets"
    code, out, _ = ctl(a, "reload")
    assert code == 1 and out["error"].startswith("reload refused: ") and reason in out["error"], out
    p = a.ctl("reload")
    assert p.returncode == 1 and reason in p.stderr
    a.signal(signal.SIGHUP)
    wait_for(lambda: len([e for e in a.events(current_run=True)
                          if e.get("event") == "reload_failed" and reason in e.get("error", "")]) == 3,
             5, "SIGHUP's reload refused")
    code, out, _ = ctl(a, "restart")
    assert code == 1 and out["error"].startswith("restart refused: ") and reason in out["error"], out
    p = lab.exec(A, _bin("vipless-failoverd"), "-c", str(a.config_path), "--check-config", check=False)
    assert p.returncode == 2 and reason in p.stderr

    # a key file others may read: refused the same way
    a.config_path.write_text(good)
    os.chmod(pair.key_file, 0o644)
    try:
        for cmd in ("reload", "restart"):
            code, out, _ = ctl(a, cmd)
            assert code == 1 and "election.key_file" in out["error"] and "accessible by others" in out["error"]
    finally:
        os.chmod(pair.key_file, 0o600)

    # a config that does not validate: status still reaches the daemon (its socket from
    # the raw TOML, with a warning), reload says why it refuses
    a.config_path.write_text(good + "\n[unknown_section]\nx = 1\n")
    p = a.ctl("status", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["state"] == "MASTER", p.stderr
    assert "warning" in p.stderr and "unknown_section: unknown key" in p.stderr, p.stderr
    code, out, _ = ctl(a, "reload")
    assert code == 1 and "unknown_section: unknown key" in out["error"]

    # nothing changed: the same process with the old config, the same roles, no failover
    time.sleep(1.0)
    st = ctl_socket(a, "status", "--json")
    st = json.loads(st.stdout)
    assert st["pid"] == st0["pid"] == a.pid and st["uptime_s"] > st0["uptime_s"]
    assert st["announce"]["vips"] == st0["announce"]["vips"] == 3
    assert st["state"] == "MASTER" and b.state() == "BACKUP"
    assert not [t for t in b.transitions() if t.get("to") == "MASTER" and (event_time(t) or 0) >= t0]
    assert "Traceback" not in a.log_text()
    # the good config again: reload and restart go through
    a.config_path.write_text(good)
    assert ctl(a, "reload")[0] == 0
    code, out, _ = ctl(a, "restart")
    assert code == 0 and out == {"restarting": True}
    st = wait_for(lambda: (a.status() or {}).get("uptime_s", 99) < 5 and a.status(), 10, "restarted daemon answers")
    assert st["pid"] == st0["pid"]


def test_reload_of_a_fifo_is_refused_at_once_while_adverts_go_on(pair: Cluster) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    good = a.config_path.read_text()
    a.config_path.unlink()
    os.mkfifo(a.config_path, 0o600)
    try:
        t0 = time.time()
        a.signal(signal.SIGHUP)
        p = ctl_socket(a, "reload", "--json")
        took = time.time() - t0
        assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
        assert json.loads(p.stdout)["error"] == f"reload refused: {a.config_path}: not a regular file"
        assert took < 2.0
        # a kept its advert schedule: b heard it every ~100 ms and stayed backup
        ages = []
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            ages.append(b.status()["peers"][0]["last_seen_s"])
            time.sleep(0.05)
        assert max(ages) < 0.35, ages
        assert json.loads(ctl_socket(a, "status", "--json").stdout)["state"] == "MASTER"
        assert b.state() == "BACKUP"
        assert not [t for t in b.transitions() if t.get("to") == "MASTER" and (event_time(t) or 0) >= t0]
        refused = [e for e in a.events(current_run=True) if e.get("event") == "reload_failed"]
        assert len(refused) == 2 and all("not a regular file" in e["error"] for e in refused)
    finally:
        try:  # a daemon stuck reading the FIFO gets its end of file
            os.close(os.open(a.config_path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        a.config_path.unlink()
        a.config_path.write_text(good)


# ---------------------------------------------------------------------------
# control socket limits (issue 13)

FLOOD = """
import json, resource, socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, errors = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    for attempt in range(500):  # the listen backlog is full (EAGAIN): retry
        try:
            s.connect(path)
            socks.append(s)
            break
        except BlockingIOError:
            time.sleep(0.001)
        except OSError as exc:
            errors.append(str(exc))
            s.close()
            break
print(json.dumps({"connected": len(socks), "errors": errors[:3]}), flush=True)
time.sleep(hold)
kinds = {}
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        data = None
    kind = ("open" if data is None else "closed" if not data else
            "busy" if b"busy" in data else "idle" if b"no request within" in data else "other")
    kinds[kind] = kinds.get(kind, 0) + 1
print(json.dumps(kinds), flush=True)
"""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_connection_flood_from_a_group_member_harms_nothing(make_cluster: Callable[..., Cluster], temp_users,
                                                              ctl_for_users: list[str]) -> None:
    group, member, _ = temp_users
    cluster = make_cluster(start=False, a=NodeSettings(priority=150, overrides={"control": {"group": group}}))
    a, b = cluster[A], cluster[B]
    for d in (a.lab.workdir, a.dir):
        os.chmod(d, 0o711)
    a.command_prefix = ["prlimit", "--nofile=1024:1024"]  # systemd's default soft limit
    cluster.start()
    cluster.wait_converged(CONVERGE_S, A)
    time.sleep(0.5)
    base_fds = _fds(a.pid)
    t0 = time.time()
    python = ctl_for_users[0]
    flood = subprocess.Popen(user_argv(member, [python, "-I", "-c", FLOOD, str(a.control_socket), "1200", "12"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={"PATH": "/usr/bin:/bin"})
    try:
        first = json.loads(flood.stdout.readline())
        assert first == {"connected": 1200, "errors": []}, (first, flood.stderr.read() if flood.poll() else "")
        # while the member holds every connection it could get: root is served, the
        # daemon's fds stay bounded, the pair stays as it was
        fds = []
        for _ in range(5):
            code, st, err = ctl(a, "status")
            assert code == 0, err
            fds.append(_fds(a.pid))
            time.sleep(0.2)
        assert st["control"]["clients"] <= 56 + 1 and st["control"]["rejected"]["too_many_clients"] >= 1200 - 56
        assert max(fds) < base_fds + 64 + 16, (base_fds, fds)
        print(f"daemon fds: {base_fds} before, {fds} during the flood; control {st['control']}")
        assert st["state"] == "MASTER" and b.state() == "BACKUP"
        out, err = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    # every connection over the cap was answered "busy" and closed at once; the ones
    # taken were dropped after the idle timeout
    kinds = json.loads(out.splitlines()[-1])
    print(f"flood connections: {kinds}")
    assert kinds.get("busy", 0) >= 1200 - 56 and kinds.get("open", 0) == 0, kinds
    assert kinds.get("busy", 0) + kinds.get("idle", 0) == 1200, kinds
    st = ctl(a, "status")[1]
    assert st["control"]["clients"] == 1  # this status request's own
    assert st["control"]["rejected"]["idle_timeout"] == kinds.get("idle", 0)
    assert _fds(a.pid) <= base_fds + 2
    assert st["state"] == "MASTER" and b.state() == "BACKUP"
    assert not [t for t in b.transitions() if t.get("to") == "MASTER" and (event_time(t) or 0) >= t0]
    # logged once per burst, no traceback, no failing reconcile
    log = a.log_text()
    assert "Traceback" not in log
    events = a.events(current_run=True)
    limits = [e for e in events if e.get("event") == "control_limit"]
    assert 1 <= len(limits) <= 4, limits
    assert not [e for e in events if e.get("event") in ("reconcile_error", "control_error", "internal_error")]
    assert len(log.splitlines()) < 200


def test_bad_fields_are_usage_errors(pair: Cluster) -> None:
    a = pair[A]
    pair.wait_converged(CONVERGE_S, A)
    for bad in ("-1", "nan", "1e9", "soon"):
        p = a.ctl("demote", "--timeout", bad)
        assert p.returncode == 2 and "argument --timeout" in p.stderr, (bad, p.returncode, p.stderr)
    # the daemon itself: a raw request with a bad field is a usage error, not an internal error
    for req, error in (({"cmd": "demote", "timeout": "x"}, 'timeout: must be a number of seconds, got "x"'),
                       ({"cmd": "promote", "timeout": -5}, "timeout: must be more than 0 and at most 3600 "
                                                           "seconds, got -5"),
                       ({"cmd": "maintenance", "on": "yes"}, 'on: must be true or false, got "yes"'),
                       ({"cmd": "frobnicate"}, "unknown command 'frobnicate'")):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(a.control_socket))
            s.sendall(json.dumps(req).encode() + b"\n")
            answer = json.loads(s.makefile("rb").readline())
        finally:
            s.close()
        assert answer == {"ok": False, "error": error, "usage": True}
    assert pair.states() == {A: "MASTER", B: "BACKUP"}
    assert "Traceback" not in a.log_text()
    assert not [e for e in a.events(current_run=True) if e.get("event") == "control_error"]
