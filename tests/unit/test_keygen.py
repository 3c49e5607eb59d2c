"""``failoverctl keygen``: the key's format, mode 0600 whatever the umask, exclusive
creation, atomic ``--force``, and a key that the daemon's own ``read_key`` accepts."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vipless_failover import cli, config, keygen

KEY_RE = re.compile(rb"[0-9a-f]{64}\n")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_key_is_64_hex_characters_and_a_newline_and_random():
    keys = {keygen.new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(KEY_RE.fullmatch(k) for k in keys)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_written_with_mode_0600_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = keygen.write_key(tmp_path / "cluster.key")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert KEY_RE.fullmatch(path.read_bytes())


def test_refuses_an_existing_file_and_leaves_it_alone(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_bytes(b"old key in use\n")
    path.chmod(0o640)
    with pytest.raises(keygen.KeygenError, match="already exists"):
        keygen.write_key(path)
    assert path.read_bytes() == b"old key in use\n" and mode(path) == 0o640


def test_refuses_a_dangling_symlink(tmp_path):
    # O_EXCL: never create a file through a link someone left there
    link = tmp_path / "cluster.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(keygen.KeygenError, match="already exists"):
        keygen.write_key(link)
    assert not (tmp_path / "elsewhere").exists()


def test_force_replaces_atomically_with_a_new_inode_and_no_leftovers(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_bytes(b"old key in use\n")
    path.chmod(0o644)
    before = os.stat(path).st_ino
    keygen.write_key(path, force=True)
    assert KEY_RE.fullmatch(path.read_bytes()) and mode(path) == 0o600
    assert os.stat(path).st_ino != before  # renamed over, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.key"]


def test_force_replaces_a_symlink_not_its_target(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep\n")
    link = tmp_path / "cluster.key"
    link.symlink_to(target)
    keygen.write_key(link, force=True)
    assert not link.is_symlink() and KEY_RE.fullmatch(link.read_bytes())
    assert target.read_bytes() == b"keep\n"


def test_missing_directory_and_directory_target_are_reported(tmp_path):
    with pytest.raises(keygen.KeygenError, match="does not exist"):
        keygen.write_key(tmp_path / "nope" / "cluster.key")
    with pytest.raises(keygen.KeygenError, match="is a directory"):
        keygen.write_key(tmp_path, force=True)


def test_a_failed_force_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "cluster.key"
    path.write_bytes(b"old\n")

    def boom(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keygen, "_write_all", boom)
    with pytest.raises(keygen.KeygenError, match="No space left"):
        keygen.write_key(path, force=True)
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.key"]


def test_the_daemon_accepts_the_key(tmp_path):
    key_path = keygen.write_key(tmp_path / "cluster.key")
    src = Path(__file__).parents[2] / "examples" / "director-a.toml"
    text = src.read_text().replace('"/etc/vipless-failover/cluster.key"', f'"{key_path}"')
    cfg_path = tmp_path / "a.toml"
    cfg_path.write_text(text)
    cfg = config.load(cfg_path)
    assert config.read_key(cfg) == key_path.read_bytes().strip()
    assert len(config.read_key(cfg)) == 64


def test_main_prints_the_next_steps_and_exit_codes(tmp_path):
    path = tmp_path / "cluster.key"
    out, err = io.StringIO(), io.StringIO()
    assert keygen.main(path, out=out, err=err) == 0
    text = out.getvalue()
    assert f"wrote a new cluster key to {path}" in text
    assert "every director" in text and "mode 0600" in text and err.getvalue() == ""
    out, err = io.StringIO(), io.StringIO()
    assert keygen.main(path, out=out, err=err) == 1
    assert out.getvalue() == "" and "already exists" in err.getvalue() and "--force" in err.getvalue()
    assert keygen.main(path, force=True, out=io.StringIO(), err=io.StringIO()) == 0


def test_failoverctl_keygen_needs_no_config_and_no_daemon(tmp_path):
    # a bogus config path and no socket anywhere: keygen does not look at either
    path = tmp_path / "k"
    assert cli.main(["-c", str(tmp_path / "missing.toml"), "keygen", str(path)]) == 0
    assert KEY_RE.fullmatch(path.read_bytes()) and mode(path) == 0o600
    assert cli.main(["keygen", str(path)]) == 1
    assert cli.main(["keygen", "--force", str(path)]) == 0
    assert cli.main(["keygen", "--bogus"]) == 2


def test_failoverctl_keygen_default_path_in_help():
    p = subprocess.run([sys.executable, "-m", "vipless_failover.cli", "keygen", "--help"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and keygen.DEFAULT_KEY_FILE in p.stdout
