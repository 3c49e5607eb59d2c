"""sd_notify over a real datagram socket, and the shipped unit checked by
``systemd-analyze verify`` (which must print nothing: it exits 0 even on warnings) and
``systemd-analyze security`` (exposure below 3.0). tests/system runs it under a real
systemd from the Debian package."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vipless_failover.systemd import Notifier, role_status

UNIT = Path(__file__).parents[2] / "systemd" / "vipless-failoverd.service"
SHIPPED_BIN = "/usr/sbin/vipless-failoverd"  # where the Debian package puts it
SHIPPED_CTL = "/usr/bin/failoverctl"


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def messages(sock: socket.socket, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        data = sock.recv(4096).decode()
        out.append(dict(line.split("=", 1) for line in data.splitlines()))
    return out


def test_ready_status_and_stopping(notify_socket):
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled and n.watchdog_interval is None
    assert n.ready("BACKUP, priority 100")
    assert n.status("MASTER, priority 100")
    assert n.stopping()
    ready, status, stopping = messages(sock, 3)
    assert ready == {"READY": "1", "STATUS": "BACKUP, priority 100", "MAINPID": str(os.getpid())}
    assert status == {"STATUS": "MASTER, priority 100"}
    assert stopping["STOPPING"] == "1"


def test_abstract_socket_address():
    name = f"vf-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).notify(STATUS="x")
        assert sock.recv(100) == b"STATUS=x"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready("x") and n.sent == 0


def test_unreachable_socket_is_counted_not_raised(tmp_path):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.notify(STATUS="x") and n.errors == 1


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_pid():
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000"}).watchdog_interval == 5.0
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000",
                              "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.0
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000",
                              "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "junk"}).watchdog_interval is None


async def test_watchdog_pings_from_the_loop(notify_socket):
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # every 50 ms
    n.start_watchdog()
    await asyncio.sleep(0.22)
    n.close()
    sock.settimeout(0.2)
    pings = 0
    try:
        while True:
            assert sock.recv(100) == b"WATCHDOG=1"
            pings += 1
    except TimeoutError:
        pass
    assert 4 <= pings <= 7


def test_role_status_line():
    assert role_status("MASTER", 150, 150, "director-a") == "MASTER, priority 150"
    assert role_status("BACKUP", 150, 110, "director-b", ["check:web"]) == \
        "BACKUP, priority 150 (effective 110), master director-b, faults: check:web"


# ---------------------------------------------------------------------------
# the unit file


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_has_what_the_issue_asks_for():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    assert s["ExecReload"] == ["/usr/bin/failoverctl --config /etc/vipless-failover/vipless-failover.toml reload"]
    assert s["ExecStart"] == [f"{SHIPPED_BIN} --config /etc/vipless-failover/vipless-failover.toml --log-format json"]
    assert set(s["AmbientCapabilities"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(s["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    assert s["ProtectHome"] == ["yes"] and s["PrivateTmp"] == ["yes"]
    assert s["RuntimeDirectory"] == ["vipless-failover"]  # writable under ProtectSystem=strict
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK",
                                                              "AF_PACKET"}


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify needs the Exec binaries to exist: point them at this venv's."""
    daemon = Path(sys.executable).parent / "vipless-failoverd"
    ctl = Path(sys.executable).parent / "failoverctl"
    assert daemon.exists() and ctl.exists(), (daemon, ctl)
    unit = tmp_path / "vipless-failoverd.service"
    unit.write_text(unit_text.replace(SHIPPED_BIN, str(daemon)).replace(SHIPPED_CTL, str(ctl)))
    # --man=no: Documentation= names the package's man pages, not installed on this host
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_passes_without_a_warning(tmp_path):
    text = UNIT.read_text()
    assert text.count(SHIPPED_BIN) == 2  # ExecStartPre and ExecStart, nothing else rewritten
    assert text.count(SHIPPED_CTL) == 1  # ExecReload
    p = _verify(text, tmp_path)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_reports_mistakes(tmp_path):
    # the check above can fail: a typo in a key is reported
    p = _verify(re.sub(r"^WatchdogSec=", "WatchdogSecs=", UNIT.read_text(), flags=re.M), tmp_path)
    assert "Unknown key" in p.stdout + p.stderr


def test_unit_is_packaged_and_sandboxed():
    s = unit_settings()
    assert s["ExecStartPre"] == [f"{SHIPPED_BIN} --config /etc/vipless-failover/vipless-failover.toml --check-config"]
    # a fresh package install has no config: the start is skipped, not failed
    assert s["ConditionPathExists"] == ["/etc/vipless-failover/vipless-failover.toml"]
    # the daemon hands the control socket to this group without CAP_CHOWN
    assert s["SupplementaryGroups"] == ["vipless-failover"]
    assert s["CPUSchedulingPolicy"] == ["rr"] and "RestrictRealtime" not in s
    for key in ("PrivateDevices", "PrivateMounts", "ProtectKernelTunables", "ProtectKernelLogs",
                "ProtectKernelModules", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                "LockPersonality", "RestrictSUIDSGID", "RestrictNamespaces"):
        assert s[key] == ["yes"], key
    assert s["UMask"] == ["0077"] and s["SystemCallFilter"] == ["@system-service"]
    assert s["SystemCallErrorNumber"] == ["EPERM"]


def test_the_package_writes_no_sysctl():
    # ProtectKernelTunables=yes makes /proc/sys read-only: nothing may need to write there
    root = Path(__file__).parents[2] / "vipless_failover"
    offenders = [str(p) for p in root.rglob("*.py") if "/proc/sys" in p.read_text()]
    assert offenders == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_security_exposure_below_3(tmp_path):
    daemon = Path(sys.executable).parent / "vipless-failoverd"
    unit = tmp_path / "vipless-failoverd.service"
    unit.write_text(UNIT.read_text().replace(SHIPPED_BIN, str(daemon)))
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for vipless-failoverd.service: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) < 3.0, p.stdout
    # the figure the unit's header and docs/operations.md quote
    assert f"rates it {m.group(1)}" in UNIT.read_text()
