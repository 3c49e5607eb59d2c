"""Run a command inside a QEMU VM that boots Debian's stock kernel (the kernel tier).

The host kernel may lack IPVS; Debian's packaged kernel has it. virtme-ng (``vng``)
boots that kernel under QEMU with the host's root filesystem shared read-only (with
writable overlays on /etc, /usr, /var, /tmp, /home, ...; /run is a fresh tmpfs), so
the checkout and its venv are visible at the same paths, and the guest command runs
as root in the same working directory. What the guest prints comes back on vng's
stdout, and its exit status is vng's. See docs/vm-tier.md for what was measured.

    from netnslab.vm import run_in_vm
    proc = run_in_vm("modprobe ip_vs && ipvsadm -Ln", timeout_s=180)

Requirements: root, ``qemu-system-x86_64``, a statically linked busybox
(Debian: ``busybox-static``), ``/boot/vmlinuz-<ver>`` with ``/lib/modules/<ver>``
(Debian: ``linux-image-amd64``), and virtme-ng in the venv that runs this code
(``pip install virtme-ng``; extra ``vm`` of vipless-failover's pyproject.toml).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_MEMORY = "1G"
DEFAULT_CPUS = 2
BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")


class VmUnavailable(RuntimeError):
    """The VM tier cannot run here; the message says what is missing."""


def venv_bin() -> Path:
    """The bin/ of the Python running this code (not resolved: a venv's python is a link)."""
    return Path(sys.executable).absolute().parent


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version))


def find_kernel(boot_dir: Path = BOOT_DIR, modules_dir: Path = MODULES_DIR) -> Path:
    """The newest ``vmlinuz-<ver>`` in ``boot_dir`` whose ``modules_dir/<ver>`` exists."""
    candidates = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name[len("vmlinuz-"):]
        if (modules_dir / version).is_dir() and os.access(image, os.R_OK):
            candidates.append((_version_key(version), image))
    if not candidates:
        raise VmUnavailable(f"no {boot_dir}/vmlinuz-<version> with a matching {modules_dir}/<version> "
                            "(apt-get install linux-image-amd64)")
    return max(candidates)[1]


def _is_static(path: str) -> bool:
    """True if the ELF file has no PT_INTERP (no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only (x86-64 host)
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") != 3  # PT_INTERP
               for i in range(phnum))


def find_static_busybox(path: str | None = None) -> str | None:
    for name in ("busybox-static", "busybox.static", "busybox"):
        found = shutil.which(name, path=path)
        if found and _is_static(found):
            return found
    return None


def vm_env() -> dict[str, str]:
    """The environment for vng: the venv's bin/ first on PATH (vng calls virtme-run)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin"])
    return env


def check_prerequisites(need_kernel: bool = True) -> list[str]:
    """What is missing for the VM tier (empty list: all there)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the VM tier needs root")
    path = vm_env()["PATH"]
    if not (venv_bin() / "vng").exists() and shutil.which("vng", path=path) is None:
        problems.append(f"virtme-ng's vng is not in {venv_bin()} (pip install virtme-ng)")
    if shutil.which("qemu-system-x86_64", path=path) is None:
        problems.append("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    if shutil.which("file", path=path) is None and shutil.which("strings", path=path) is None:
        problems.append("neither file nor strings found, virtme-ng needs one to read the kernel's "
                        "version (apt-get install file)")
    if find_static_busybox(path) is None:
        problems.append("no statically linked busybox, virtme-ng needs one for its initramfs "
                        "(apt-get install busybox-static)")
    if need_kernel:
        try:
            find_kernel()
        except VmUnavailable as exc:
            problems.append(str(exc))
    return problems


def vng_command(command: str, kernel: Path, *, memory: str = DEFAULT_MEMORY,
                cpus: int = DEFAULT_CPUS) -> list[str]:
    vng = venv_bin() / "vng"
    busybox = find_static_busybox(vm_env()["PATH"])
    args = [str(vng) if vng.exists() else "vng", "--disable-kvm", "--run", str(kernel),
            "--memory", memory, "--cpus", str(cpus)]
    if busybox:
        args += ["--busybox", busybox]
    return [*args, "--exec", command]


def run_in_vm(command: str, timeout_s: int, *, memory: str = DEFAULT_MEMORY, cpus: int = DEFAULT_CPUS,
              cwd: str | os.PathLike[str] | None = None,
              kernel: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Boot the newest Debian kernel under QEMU (TCG) and run ``command`` (a shell line) in it.

    Returns the CompletedProcess (guest output on stdout, QEMU/virtme noise on
    stderr, returncode = the guest command's exit status). ``cwd`` (default: the
    current directory) is also the guest's working directory. The whole process
    group is killed after ``timeout_s`` seconds and subprocess.TimeoutExpired is
    raised carrying what was printed so far. Raises VmUnavailable if a
    prerequisite is missing.
    """
    problems = check_prerequisites(need_kernel=kernel is None)
    if problems:
        raise VmUnavailable("; ".join(problems))
    args = vng_command(command, kernel or find_kernel(), memory=memory, cpus=cpus)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", env=vm_env(),
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout_s, output=out, stderr=err) from None
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group we started (vng, virtme-run, qemu)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
