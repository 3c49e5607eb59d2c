"""Kernel tier: ONE VM boot (Debian's stock kernel, which has IPVS, under QEMU TCG via
virtme-ng) runs pytest on tests/vm/guest/ and must pass. See docs/vm-tier.md.

Not root: skipped with the reason. In CI (``CI=true``) a missing kernel, qemu,
static busybox or virtme-ng is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from netnslab import vm

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = Path(__file__).resolve().parent / "guest"
#: one boot (~20 s) + the guest tests under TCG (~5-7 min)
VM_TIMEOUT_S = 600
#: compiled here before the boot: the guest's root is read-only, and a process that
#: compiles these from source under TCG takes tens of seconds to start
PRECOMPILE = ("vipless_failover", "netns-lab/netnslab")


def _require_vm() -> None:
    if os.geteuid() != 0:
        pytest.skip("the VM tier needs root (QEMU, namespaces inside the guest)")
    problems = vm.check_prerequisites()
    if problems:
        message = "VM tier cannot run: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must run the VM tier)")
        pytest.skip(message)


def guest_command() -> str:
    python = shlex.quote(str(vm.venv_bin() / "python"))
    return (f"cd {shlex.quote(str(REPO))} && modprobe ip_vs && "
            "export VIPLESS_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 && "
            f"{python} -m pytest -p no:cacheprovider -q -rfEs "
            f"{shlex.quote(str(GUEST_TESTS.relative_to(REPO)))}")


def test_guest_suite_passes_in_vm() -> None:
    _require_vm()
    subprocess.run([str(vm.venv_bin() / "python"), "-m", "compileall", "-q", *PRECOMPILE], cwd=REPO, check=True)
    try:
        proc = vm.run_in_vm(guest_command(), timeout_s=VM_TIMEOUT_S, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        sys.stdout.write(f"--- guest output until the timeout ---\n{exc.output or ''}\n"
                         f"--- vng stderr ---\n{exc.stderr or ''}\n")
        pytest.fail(f"VM did not finish within {VM_TIMEOUT_S} s (killed)")
    sys.stdout.write(f"--- guest output ---\n{proc.stdout}\n")
    if proc.returncode != 0:
        sys.stdout.write(f"--- vng stderr ---\n{proc.stderr[-20000:]}\n")
    assert proc.returncode == 0, f"guest pytest failed (exit {proc.returncode}); output above"
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ passed", line)]
    assert summary, "no pytest summary in the guest output"
    last = summary[-1]
    assert not re.search(r"\d+ (failed|error|skipped)", last), last
    passed = int(re.search(r"(\d+) passed", last).group(1))  # type: ignore[union-attr]
    collected = sum(1 for p in GUEST_TESTS.glob("test_*.py")
                    for line in p.read_text().splitlines() if re.match(r"(async )?def test_", line))
    assert passed == collected, f"guest ran {passed} tests, tests/vm/guest defines {collected}"
