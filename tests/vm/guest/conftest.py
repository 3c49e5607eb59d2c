"""Fixtures of the guest-side tests (run inside the VM by tests/vm/test_vm_tier.py).

* ``netns``: a factory of network namespaces named ``vf<token>-<role>`` (lo up);
  everything created (namespaces, processes) is removed after the test, even on failure.
* ``ipvsadm_ln(ns)``: ``ipvsadm -Ln`` in a namespace, parsed into
  ``{service line: [real server line, ...]}`` with whitespace normalized.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest


def sh(*args: str, check: bool = True, timeout: float = 30.0,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def nsexec(ns: str, *args: str, check: bool = True, timeout: float = 30.0,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout, input=input)


def parse_ipvsadm(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line or line.startswith(("IP Virtual Server", "Prot LocalAddress", "-> RemoteAddress")):
            continue
        if line.startswith("->"):
            assert current is not None, text
            out[current].append(line[3:])
        else:
            current = line
            out[current] = []
    return out


def ipvsadm_ln(ns: str) -> dict[str, list[str]]:
    return parse_ipvsadm(nsexec(ns, "ipvsadm", "-Ln").stdout)


class Namespaces:
    def __init__(self) -> None:
        self.prefix = f"vf{secrets.token_hex(3)}"
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, role: str, lo_up: bool = True) -> str:
        name = f"{self.prefix}-{role}"
        self.names.append(name)
        sh("ip", "netns", "add", name)
        if lo_up:
            sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=3)
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="session", autouse=True)
def _ip_vs_loaded() -> None:
    """The guest must have IPVS; load it (the runner also does) and fail loudly if absent."""
    proc = sh("modprobe", "ip_vs", check=False)
    assert proc.returncode == 0, f"modprobe ip_vs failed in the VM: {proc.stderr}"


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()


@pytest.fixture
def ipvsadm() -> Callable[[str], dict[str, list[str]]]:
    return ipvsadm_ln
