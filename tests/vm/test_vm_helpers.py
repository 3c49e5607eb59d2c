"""netnslab.vm helpers that need no VM (kernel choice, venv PATH, static ELF check)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from netnslab import vm


def test_find_kernel_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    mods.mkdir()
    for ver in ("6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"):
        (boot / f"vmlinuz-{ver}").write_bytes(b"x")
    for ver in ("6.1.0-9-amd64", "6.1.0-56-amd64"):  # 6.12 has no modules: not bootable here
        (mods / ver).mkdir()
    assert vm.find_kernel(boot, mods) == boot / "vmlinuz-6.1.0-56-amd64"


def test_find_kernel_none_is_clear(tmp_path: Path) -> None:
    with pytest.raises(vm.VmUnavailable, match="linux-image-amd64"):
        vm.find_kernel(tmp_path, tmp_path)


def test_venv_bin_first_on_path() -> None:
    assert vm.vm_env()["PATH"].split(":")[0] == str(Path(sys.executable).absolute().parent)


def test_static_elf_check(tmp_path: Path) -> None:
    assert not vm._is_static(sys.executable)  # python is dynamically linked
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\n")
    assert not vm._is_static(str(junk))


def test_prerequisites_name_file_for_virtme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # virtme-ng reads the kernel's version with `file` (or `strings`): a bare Debian
    # has neither, and the user got a traceback from inside virtme instead of this
    monkeypatch.setenv("PATH", str(tmp_path))
    problems = vm.check_prerequisites(need_kernel=False)
    assert any("apt-get install file" in p for p in problems), problems
    (tmp_path / "file").write_text("#!/bin/sh\n")
    (tmp_path / "file").chmod(0o755)
    assert not any("apt-get install file" in p for p in vm.check_prerequisites(need_kernel=False))
