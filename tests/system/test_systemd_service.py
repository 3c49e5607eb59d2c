"""The Debian package under a real systemd (PID 1 in a systemd-nspawn container booted
from a fresh Debian 12 minbase root filesystem, see conftest.py): the unit starts
through READY=1, becomes MASTER alone, reloads, restarts in place, runs with exactly
CAP_NET_ADMIN and CAP_NET_RAW, real-time and with an armed watchdog; failoverctl works
for root and for the vipless-failover group only; a stop, a package removal and a
purge leave nothing of ours. Kernel state is read from the host, inside the
container's network namespace."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ADDRESS, REPO, Container, run

pytestmark = [pytest.mark.lab, pytest.mark.system]

UNIT = "vipless-failoverd.service"
CONFIG = "/etc/vipless-failover/vipless-failover.toml"
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
RULE_1 = "198.51.100.0/24"
RULE_2 = "203.0.113.0/24"
VIP = "198.51.100.10"


def config_text(extra_rule: bool = False) -> str:
    """The packaged example, adapted: this container's interface and address, one `to`
    delivery rule (a second one with ``extra_rule``), a mark (so the nft table exists),
    per-VIP announcements of one VIP (on-link through a link route), metrics on lo."""
    text = f"""\
[node]
name = "director-a"
interface = "eth0"
address = "{ADDRESS}"

[election]
cluster_id = 51
priority = 150
advert_interval_ms = 100
key_file = "/etc/vipless-failover/cluster.key"

[control]
group = "vipless-failover"

[metrics]
listen = "127.0.0.1:9654"

[delivery]
table = 100
rule_priority = 100

[[delivery.rules]]
to = "{RULE_1}"
"""
    if extra_rule:
        text += f'\n[[delivery.rules]]\nto = "{RULE_2}"\n'
    text += f"""
[[marks]]
name = "web"
fwmark = 1
destinations = ["{RULE_1}"]
protocols = ["tcp"]
ports = [80]

[announce]
mode = "per-vip"
vips = ["{VIP}"]
"""
    return text


def our_rules(c: Container) -> list[str]:
    rules = c.host_netns("ip", "rule").stdout + c.host_netns("ip", "-6", "rule").stdout
    return [" ".join(ln.split()) for ln in rules.splitlines() if "proto 98" in ln]


def our_routes(c: Container) -> list[str]:
    out = ""
    for family in ("-4", "-6"):
        out += c.host_netns("ip", family, "route", "show", "table", "all", "proto", "98").stdout
    return [" ".join(ln.split()) for ln in out.splitlines() if ln.strip()]


def nft_tables(c: Container) -> str:
    return c.host_netns("nft", "list", "tables").stdout


def wait_for(predicate, timeout: float, what: str, c: Container | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n--- journal ---\n{c.journal()}" if c is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


def main_pid(c: Container) -> int:
    return int(c.show(UNIT, "MainPID")["MainPID"])


def status_json(c: Container) -> dict:
    return json.loads(c.run("failoverctl", "status", "--json").stdout)


@pytest.fixture
def running(container: Container) -> Container:
    """The service active with the base config (written, keyed and started if needed)."""
    c = container
    if not (c.root / "etc/vipless-failover/cluster.key").exists():
        out = c.run("failoverctl", "keygen").stdout
        assert "wrote a new cluster key to /etc/vipless-failover/cluster.key" in out
    # per-VIP mode wants the VIPs on-link: a link route, as the example config says
    c.host_netns("ip", "route", "replace", RULE_1, "dev", "eth0")
    active = c.show(UNIT, "ActiveState")["ActiveState"] == "active"
    cfg = c.root / CONFIG.lstrip("/")
    if not cfg.exists() or cfg.read_text() != config_text():
        c.write(CONFIG, config_text())
        if active:
            c.run("systemctl", "reload", UNIT)
    if not active:
        p = c.run("systemctl", "start", UNIT, check=False, timeout=90)
        assert p.returncode == 0, f"{p.stderr}\n{c.journal()}"
    wait_for(lambda: c.show(UNIT, "StatusText")["StatusText"].startswith("MASTER"), 10, "MASTER", c)
    return c


# ---------------------------------------------------------------------------


def test_package_contents(deb: Path):
    listing = run("dpkg-deb", "--contents", deb).stdout
    paths = {ln.split()[-1].lstrip(".") for ln in listing.splitlines()}
    modes = {ln.split()[-1].lstrip("."): ln.split()[0] for ln in listing.splitlines()}
    for path in ("/usr/sbin/vipless-failoverd", "/usr/bin/failoverctl"):
        assert modes[path] == "-rwxr-xr-x", path
    for path in ("/lib/systemd/system/vipless-failoverd.service",
                 "/etc/vipless-failover/vipless-failover.toml.example",
                 "/usr/share/man/man8/vipless-failoverd.8.gz", "/usr/share/man/man8/failoverctl.8.gz",
                 "/usr/share/doc/vipless-failover/copyright", "/usr/share/doc/vipless-failover/changelog.gz",
                 "/usr/share/doc/vipless-failover/bundled-python-modules.txt",
                 "/usr/share/doc/vipless-failover/README.md",
                 "/usr/share/doc/vipless-failover/docs/operations.md",
                 "/usr/share/doc/vipless-failover/examples/director-a.toml",
                 "/usr/lib/vipless-failover/vipless_failover/daemon.py",
                 "/usr/lib/vipless-failover/vipless_failover/keygen.py"):
        assert path in paths, path
    assert not [p for p in paths if "netnslab" in p or p.endswith((".so", ".pyc"))]
    assert not [p for p in paths if p.startswith("/usr/lib/vipless-failover/bin")]
    control = run("dpkg-deb", "--field", deb).stdout
    assert re.search(r"^Architecture: all$", control, re.M)
    assert re.search(r"^Depends: .*python3 \(>= 3\.11\)", control, re.M)
    assert re.search(r"^Depends: .*nftables", control, re.M)
    assert re.search(r"^Recommends: .*ipvsadm", control, re.M)
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert deb.name == f"vipless-failover_{version}_all.deb"
    info = run("dpkg-deb", "--info", deb, "conffiles").stdout
    assert info.split() == ["/etc/vipless-failover/vipless-failover.toml.example"]


def test_fresh_install_enables_the_unit_but_skips_the_start_without_a_config(container: Container):
    b = container.at_boot
    assert b["system"] in ("running", "degraded"), b
    assert b["UnitFileState"] == "enabled"
    # ConditionPathExists= unmet: inactive and not failed, so the boot is not degraded by us
    assert b["ActiveState"] == "inactive" and b["ConditionResult"] == "no" and b["Result"] == "success", b
    assert container.run("getent", "group", "vipless-failover").returncode == 0
    example = container.root / "etc/vipless-failover/vipless-failover.toml.example"
    assert 'group = "vipless-failover"' in example.read_text()
    # the installed unit verifies where it is installed (ExecStart's program exists)
    p = container.run("systemd-analyze", "verify", "--man=no", f"/lib/systemd/system/{UNIT}", check=False)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr
    # byte-compiled by postinst (py3compile), as dh_python3 does
    assert list((container.root / "usr/lib/vipless-failover/vipless_failover/__pycache__").glob("*.pyc"))


def test_starts_through_ready_and_becomes_master_alone(running: Container):
    c = running
    s = c.show(UNIT, "Type", "ActiveState", "SubState", "StatusText", "NRestarts", "NotifyAccess")
    # Type=notify: systemctl start returned only after READY=1 (with STATUS=)
    assert s["Type"] == "notify" and s["ActiveState"] == "active" and s["SubState"] == "running", s
    assert s["StatusText"] == "MASTER, priority 150" and s["NRestarts"] == "0", s
    key = c.root / "etc/vipless-failover/cluster.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and re.fullmatch(r"[0-9a-f]{64}\n", key.read_text())
    # kernel state, seen from the host in the container's network namespace
    assert our_rules(c) == [f"100: from all to {RULE_1} lookup 100 proto 98"]
    routes = our_routes(c)  # (ip shows no "proto 98" when it filters on it)
    assert "local default dev lo table 100 scope host" in routes, routes
    assert any(r.startswith("local default dev lo table 100 metric") for r in routes), routes  # IPv6
    assert "table inet vipless_failover" in nft_tables(c)
    st = status_json(c)
    assert st["state"] == "MASTER" and st["dataplane"]["delivery"] is True


def test_announces_through_the_sandbox_af_packet(running: Container):
    """A gratuitous ARP for the VIP leaves the sandboxed daemon and reaches the peer."""
    c = running
    listener = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))\n"
        "s.bind(('peer0', 0)); s.settimeout(1.0)\n"
        "print('ready', flush=True)\n"
        "end = time.monotonic() + 10\n"
        "while time.monotonic() < end:\n"
        "    try: f = s.recv(2048)\n"
        "    except TimeoutError: continue\n"
        "    if socket.inet_ntoa(f[28:32]) == sys.argv[1]: print('arp', f[6:12].hex()); sys.exit(0)\n"
        "sys.exit(1)\n")
    p = subprocess.Popen(["ip", "netns", "exec", c.peer_netns, sys.executable, "-c", listener, VIP],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert c.run("failoverctl", "announce").returncode == 0
        out, _ = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and out.startswith("arp "), out
    eth0_mac = c.host_netns("cat", "/sys/class/net/eth0/address").stdout.strip().replace(":", "")
    assert out.split()[1] == eth0_mac
    assert status_json(c)["announce"]["announcements_sent"]["garp"] > 0


def test_metrics_served_with_process_metrics(running: Container):
    scrape = ("import urllib.request\n"
              "print(urllib.request.urlopen('http://127.0.0.1:9654/metrics', timeout=5).read().decode())")
    text = running.host_netns(sys.executable, "-c", scrape).stdout
    assert 'vipless_failover_state{state="MASTER"} 1.0' in text
    # /proc/stat readable in the sandbox (no ProcSubset=pid): the process_* metrics exist
    assert "vipless_failover_process_resident_memory_bytes" in text


def election_pid(c: Container) -> int:
    """The election process: the main PID's one child (election/process.py)."""
    pid = main_pid(c)
    kids = c.run("cat", f"/proc/{pid}/task/{pid}/children").stdout.split()
    assert len(kids) == 1, kids
    return int(kids[0])


def test_exactly_cap_net_admin_and_cap_net_raw(running: Container):
    c = running
    for pid in (main_pid(c), election_pid(c)):  # the director and its election process
        status = c.run("cat", f"/proc/{pid}/status").stdout
        caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
        want = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert caps[field] == want, (pid, field, hex(caps[field]))
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert re.search(r"^Seccomp:\s+2$", status, re.M)  # SystemCallFilter= applied
        # SupplementaryGroups=vipless-failover: the socket may be given to that group
        gid = c.run("getent", "group", "vipless-failover").stdout.split(":")[2]
        assert re.search(rf"^Groups:\s+{gid}\s*$", status, re.M), status
        # the uid is root: no user of its own (see docs/operations.md)
        assert re.search(r"^Uid:\s+0\s+0\s+0\s+0$", status, re.M)


def test_real_time_policy_as_the_unit_says(running: Container):
    c = running
    pid = main_pid(c)
    s = c.show(UNIT, "CPUSchedulingPolicy", "CPUSchedulingPriority")
    assert s["CPUSchedulingPolicy"] in ("2", "rr") and s["CPUSchedulingPriority"] == "10", s
    # the election process runs at the unit's priority; the director (the main PID)
    # lowered itself below it (election/process.py: lower_director)
    election = election_pid(c)
    for p, prio in ((election, 10), (pid, 5)):
        out = c.run("chrt", "-p", str(p)).stdout
        # had systemd failed to set it (a cgroup without RT runtime, no CAP_SYS_NICE in the
        # container), the start itself would have failed with 214/SETSCHEDULER
        assert f"pid {p}'s current scheduling policy: SCHED_RR" in out, out
        assert f"pid {p}'s current scheduling priority: {prio}" in out, out
        sched = c.run("cat", f"/proc/{p}/sched").stdout
        assert re.search(r"^policy\s+:\s+2$", sched, re.M)  # SCHED_RR
    st = status_json(c)
    assert st["election"]["pid"] == election and st["scheduling"]["priority"] == 10


def test_watchdog_is_armed_and_pinged(running: Container):
    c = running
    s = c.show(UNIT, "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert s["WatchdogUSec"] == "10s", s
    first = int(s["WatchdogTimestampMonotonic"])
    assert first > 0
    time.sleep(10 / 2 + 1.5)  # the daemon pings every WatchdogSec/2
    later = int(c.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    assert later > first, "no WATCHDOG=1 within WatchdogSec/2 + 1.5 s"
    env = c.run("cat", f"/proc/{main_pid(c)}/environ").stdout.split("\0")
    assert "WATCHDOG_USEC=10000000" in env


def test_failoverctl_root_group_member_and_other_user(running: Container):
    c = running
    if c.run("id", "alice", check=False).returncode != 0:
        c.run("useradd", "--no-create-home", "--groups", "vipless-failover", "alice")
        c.run("useradd", "--no-create-home", "bob")
    sock = c.run("stat", "-c", "%a %U %G", "/run/vipless-failover/control.sock").stdout.split()
    assert sock == ["660", "root", "vipless-failover"]
    root = c.run("failoverctl", "status")
    assert "state            MASTER" in root.stdout
    member = c.run("failoverctl", "status", user="alice", check=False)
    assert member.returncode == 0 and "state            MASTER" in member.stdout, member.stderr
    # members may read, not act
    act = c.run("failoverctl", "promote", user="alice", check=False)
    assert act.returncode == 1 and "needs root" in act.stderr, act.stderr
    other = c.run("failoverctl", "status", user="bob", check=False)
    assert other.returncode == 1 and "permission denied" in other.stderr, (other.returncode, other.stderr)
    assert other.stdout == ""


def test_reload_applies_a_changed_config(running: Container):
    c = running
    pid = main_pid(c)
    c.write(CONFIG, config_text(extra_rule=True))
    c.run("systemctl", "reload", UNIT)
    wait_for(lambda: any(RULE_2 in r for r in our_rules(c)), 10, f"the rule to {RULE_2}", c)
    s = c.show(UNIT, "ActiveState", "SubState", "StatusText", "MainPID")
    assert s["ActiveState"] == "active" and s["SubState"] == "running" and int(s["MainPID"]) == pid, s
    assert s["StatusText"].startswith("MASTER")
    assert any(RULE_1 in r for r in our_rules(c))
    # and back: the rule goes
    c.write(CONFIG, config_text())
    c.run("systemctl", "reload", UNIT)
    wait_for(lambda: not any(RULE_2 in r for r in our_rules(c)), 10, f"the rule to {RULE_2} gone", c)
    # a config that could not start: `systemctl reload` fails and says why, the old one stays
    c.write(CONFIG, config_text().replace('interface = "eth0"', 'interface = "eth0"\nbogus = 1'))
    bad = c.run("systemctl", "reload", UNIT, check=False)
    assert bad.returncode != 0, bad
    assert "reload refused" in c.journal() and "bogus" in c.journal(), c.journal()[-2000:]
    s = c.show(UNIT, "ActiveState", "SubState", "MainPID")
    assert s["ActiveState"] == "active" and s["SubState"] == "running" and int(s["MainPID"]) == pid, s
    assert any(RULE_1 in r for r in our_rules(c))
    c.write(CONFIG, config_text())


def test_restart_in_place_keeps_the_pid_and_the_sandbox(running: Container):
    """failoverctl restart re-executes the same command line (the package's wrapper,
    isolated mode) in the same process."""
    c = running
    pid = main_pid(c)
    assert c.run("failoverctl", "restart").returncode == 0

    def resumed() -> bool:
        cmd = c.run("cat", f"/proc/{pid}/cmdline", check=False).stdout
        return cmd.startswith("/usr/bin/python3\0-I\0/usr/sbin/vipless-failoverd\0") and \
            c.run("failoverctl", "status", check=False).returncode == 0
    wait_for(resumed, 20, "the daemon back after restart in place", c)
    s = c.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
    assert s["ActiveState"] == "active" and int(s["MainPID"]) == pid and s["NRestarts"] == "0", s
    assert s["StatusText"].startswith("MASTER"), s
    assert any(RULE_1 in r for r in our_rules(c))
    status = c.run("cat", f"/proc/{pid}/status").stdout
    assert re.search(r"^CapEff:\s+0*3000$", status, re.M) and re.search(r"^CapAmb:\s+0*3000$", status, re.M)


def test_stop_leaves_nothing_of_ours(running: Container):
    c = running
    c.run("systemctl", "stop", UNIT, timeout=60)
    s = c.show(UNIT, "ActiveState", "Result")
    assert s == {"ActiveState": "inactive", "Result": "success"}, f"{s}\n{c.journal()}"
    assert our_rules(c) == [] and our_routes(c) == []
    assert "vipless_failover" not in nft_tables(c)
    assert not (c.root / "run/vipless-failover/control.sock").exists()


def test_security_exposure_below_3_recorded_in_docs(container: Container):
    out = container.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    m = re.search(r"Overall exposure level for vipless-failoverd\.service: (\d+\.\d+)", out)
    assert m, out
    score = m.group(1)
    assert float(score) < 3.0, out
    docs = (REPO / "docs" / "operations.md").read_text()
    assert f"exposure level {score}" in docs, f"docs/operations.md should record {score}"


def test_remove_stops_the_service_and_purge_cleans_up(running: Container):
    """Last: the maintainer scripts. remove stops a running service (prerm) and leaves
    the conffile; purge removes it and the state directory, keeps the operator's files."""
    c = running
    env_apt = ("env", "DEBIAN_FRONTEND=noninteractive")
    c.run(*env_apt, "apt-get", "remove", "-y", "vipless-failover", timeout=120)
    assert c.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert our_rules(c) == [] and our_routes(c) == [] and "vipless_failover" not in nft_tables(c)
    assert not (c.root / "usr/lib/vipless-failover").exists()  # prerm's py3clean took the .pyc too
    assert (c.root / "etc/vipless-failover/vipless-failover.toml.example").exists()
    c.run(*env_apt, "apt-get", "purge", "-y", "vipless-failover", timeout=120)
    assert not (c.root / "etc/vipless-failover/vipless-failover.toml.example").exists()
    assert not (c.root / "var/lib/vipless-failover").exists()
    assert (c.root / "etc/vipless-failover/cluster.key").exists()  # the operator's
    assert c.run("getent", "group", "vipless-failover", check=False).returncode == 0
