"""The system tier: the Debian package installed into a fresh Debian 12 minbase root
filesystem and its unit run by a real systemd as PID 1 in a container.

* ``deb``: the .deb, built with ``packaging/build-deb`` into a temporary directory
  (or ``$VIPLESS_DEB``).
* ``container``: a pristine ``debootstrap --variant=minbase`` root (a tarball cached in
  ``/var/cache/vipless-failover-tests/``, keyed by the packages included; made when
  absent, delete it to refresh), the package installed with ``apt-get install
  ./vipless-failover_*.deb`` in a chroot (which proves the Depends are complete), then
  booted with ``systemd-nspawn -b`` in a network namespace with a veth to a second
  ("peer") namespace. Torn down after the module even on failure: poweroff (SIGKILL
  if it hangs), namespaces deleted, mounts undone, the root filesystem deleted.

Not root, or a tool missing: skipped with the reason, except in CI (``CI=true``),
where it is a failure.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = ("dbus", "systemd", "systemd-sysv")  # what booting systemd in the container needs
CACHE_DIR = Path("/var/cache/vipless-failover-tests")
ROOTFS_TARBALL = CACHE_DIR / f"debian-{SUITE}-minbase-{'+'.join(sorted(INCLUDE))}.tar"
APT_ARCHIVES = CACHE_DIR / f"apt-archives-{SUITE}"  # downloaded .debs, reused across runs
NSPAWN_DIR = Path("/run/systemd/nspawn")
CONTAINER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# container address on eth0, peer address on the other end of the veth
ADDRESS, PEER_ADDRESS = "192.0.2.11", "192.0.2.12"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: the .deb under a real systemd in a container (root)")


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root (chroot, network namespaces, systemd-nspawn)"
    tools = ["ip", "nft", "nsenter", "chroot", "tar", "systemd-nspawn", "mount", "umount"]
    if not os.environ.get("VIPLESS_DEB"):
        tools += ["dpkg-deb", "help2man"]
    if not ROOTFS_TARBALL.exists():
        tools.append("debootstrap")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = {"systemd-nspawn": "systemd-container", "nft": "nftables", "ip": "iproute2",
                "dpkg-deb": "dpkg", "nsenter": "util-linux"}
        return (f"system tests need {', '.join(missing)} "
                f"(apt-get install {' '.join(sorted({pkgs.get(t, t) for t in missing}))})")
    return None


def require_system_tier() -> None:
    problem = _problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}; CI must run them")
        pytest.skip(problem)


# ---------------------------------------------------------------------------
# helpers


def run(*argv: str | os.PathLike[str], timeout: float = 120, check: bool = True,
        **kw) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path``, deepest first."""
    base = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for _ in range(5):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "--lazy", point], capture_output=True)


def remove_tree(path: Path) -> None:
    """Unmount whatever is mounted below ``path`` (a chroot's /proc, ...), then delete it
    without ever crossing into another file system."""
    if not path.exists():
        return
    unmount_all(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True, timeout=300)


def build_rootfs_tarball() -> None:
    """debootstrap a minbase root with INCLUDE and keep it as a tarball (under a lock:
    concurrent runs wait for one build)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOTFS_TARBALL.exists():
            return
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE_DIR))
        try:
            root = work / "root"
            run("debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, root, MIRROR,
                timeout=1800)
            run("chroot", root, "apt-get", "clean")
            tmp = work / "rootfs.tar"
            run("tar", "--numeric-owner", "--xattrs", "-C", root, "-cf", tmp, ".", timeout=600)
            tmp.rename(ROOTFS_TARBALL)
        finally:
            remove_tree(work)


def install_deb(root: Path, deb: Path) -> str:
    """apt-get install ./the.deb in a chroot of ``root``: pulls the Depends from Debian.
    Downloaded .debs are kept in APT_ARCHIVES, shared by runs one at a time (apt's own
    lock lives in that directory)."""
    APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".apt-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install_deb(root, deb)


def _install_deb(root: Path, deb: Path) -> str:
    run("mount", "--bind", root, root)  # a mount point, as ip netns exec and friends want
    try:
        run("mount", "-t", "proc", "proc", root / "proc")
        run("mount", "--bind", "/dev", root / "dev")
        (APT_ARCHIVES / "partial").mkdir(exist_ok=True)
        run("mount", "--bind", APT_ARCHIVES, root / "var/cache/apt/archives")
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copyfile(deb, root / "tmp" / deb.name)
        env = {"PATH": CONTAINER_PATH, "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        argv = ["chroot", str(root), "apt-get", "install", "-y", "--no-install-recommends", f"/tmp/{deb.name}"]
        p = run(*argv, env=env, timeout=900, check=False)
        if p.returncode != 0:  # the cached package lists may be older than the mirror
            run("chroot", root, "apt-get", "update", "-q", env=env, timeout=600)
            p = run(*argv, env=env, timeout=900)
        (root / "tmp" / deb.name).unlink()
        return p.stdout
    finally:
        unmount_all(root)


class Container:
    """A booted container: ``run`` executes in all its namespaces (nsenter), ``netns``
    on the host inside its network namespace."""

    def __init__(self, root: Path, netns: str, peer_netns: str, workdir: Path):
        self.root = root
        self.netns = netns
        self.peer_netns = peer_netns
        self.workdir = workdir
        self.log = workdir / "nspawn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as the host sees it
        self.at_boot: dict[str, str] = {}
        self.install_log = ""

    def boot(self, timeout: float = 120) -> None:
        with open(self.log, "wb") as log:
            # --capability=CAP_NET_ADMIN: nspawn grants it only with its own private
            # networking, not with --network-namespace-path; the daemon needs it
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit", "-b",
                 f"--network-namespace-path=/run/netns/{self.netns}", f"--machine={self.netns}",
                 "--console=passive", "--capability=CAP_NET_ADMIN"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd-nspawn did not start a container:\n{self.log.read_text()}")
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                for child in children:
                    nspid = [ln for ln in Path(f"/proc/{child}/status").read_text().splitlines()
                             if ln.startswith("NSpid:")]
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                    # PID 1 of the container, once it is systemd (not nspawn's child before exec)
                    if nspid and nspid[0].split()[-1] == "1" and b"systemd" in cmdline.split(b"\0")[0]:
                        self.leader = int(child)
            except OSError:
                pass
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                break
            # fails at once until systemd listens on its private socket; then waits for the boot
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=left).stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)
        target = self.run("systemctl", "is-active", "multi-user.target", check=False).stdout.strip()
        if target != "active":
            raise AssertionError(f"the container did not reach multi-user.target (system {state}):\n"
                                 f"{self.run('systemctl', '--failed', '--no-pager', check=False).stdout}\n"
                                 f"{self.log.read_text()[-4000:]}")
        self.at_boot = {"system": state, **self.show("vipless-failoverd.service", "ActiveState", "SubState",
                                                      "ConditionResult", "UnitFileState", "Result")}

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        inner = ["runuser", "-u", user, "--", *argv] if user else list(argv)
        return run("nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={CONTAINER_PATH}",
                   "LANG=C.UTF-8", *inner, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def host_netns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        dest = self.root / path.lstrip("/")
        dest.write_text(text)
        dest.chmod(mode)

    def journal(self, unit: str = "vipless-failoverd.service", lines: int = 60) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-n", str(lines), "-o", "cat",
                        check=False).stdout

    def poweroff(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.leader:
            try:
                subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl", "poweroff"],
                               capture_output=True, timeout=30)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:  # hung: kill nspawn and the container's PID 1 (ours)
            for pid in (self.proc.pid, self.leader):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            self.proc.wait(30)


def _netns_setup(name: str, peer: str) -> None:
    run("ip", "netns", "add", name)
    run("ip", "netns", "add", peer)
    run("ip", "link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", "peer0", "netns", peer)
    run("ip", "-n", name, "addr", "add", f"{ADDRESS}/24", "dev", "eth0")
    run("ip", "-n", name, "link", "set", "eth0", "up")
    run("ip", "-n", peer, "addr", "add", f"{PEER_ADDRESS}/24", "dev", "peer0")
    run("ip", "-n", peer, "link", "set", "peer0", "up")
    run("ip", "-n", peer, "link", "set", "lo", "up")


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def system_tier() -> None:
    require_system_tier()


@pytest.fixture(scope="module")
def deb(system_tier, tmp_path_factory) -> Path:
    given = os.environ.get("VIPLESS_DEB")
    if given:
        path = Path(given).resolve()
        assert path.is_file(), f"VIPLESS_DEB={given}: no such file"
        return path
    out = tmp_path_factory.mktemp("deb")
    p = run(REPO / "packaging" / "build-deb", out, timeout=900)
    path = Path(p.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out, p.stdout + p.stderr
    return path


@pytest.fixture(scope="module")
def container(system_tier, deb: Path) -> Iterator[Container]:
    if not ROOTFS_TARBALL.exists():
        build_rootfs_tarball()
    workdir = Path(tempfile.mkdtemp(prefix="vf-system-", dir="/var/tmp"))
    token = secrets.token_hex(3)
    name, peer = f"vfsys-{token}", f"vfsys-{token}-p"
    root = workdir / "root"
    mounted_nspawn_dir = False
    created_nspawn_dir = False
    c = Container(root, name, peer, workdir)
    try:
        root.mkdir()
        run("tar", "--numeric-owner", "--xattrs", "-C", root, "-xf", ROOTFS_TARBALL, timeout=600)
        c.install_log = install_deb(root, deb)
        _netns_setup(name, peer)
        if not os.path.ismount(NSPAWN_DIR):
            created_nspawn_dir = not NSPAWN_DIR.exists()
            NSPAWN_DIR.mkdir(parents=True, exist_ok=True)
            run("mount", "-t", "tmpfs", "tmpfs", NSPAWN_DIR)
            mounted_nspawn_dir = True
        c.boot()
        yield c
    finally:
        try:
            c.poweroff()
        finally:
            for ns in (name, peer):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            if mounted_nspawn_dir:
                subprocess.run(["umount", str(NSPAWN_DIR)], capture_output=True)
                if created_nspawn_dir:
                    try:
                        NSPAWN_DIR.rmdir()
                    except OSError:
                        pass
            remove_tree(workdir)
