"""``failoverctl keygen``: write a new cluster key file (the HMAC key of the adverts).

The key is 32 random bytes written as 64 hexadecimal characters and a newline: text
that survives copying and editors, and that :func:`config.read_key` reads back whole
(it strips surrounding whitespace, which raw random bytes may begin or end with). The
file is created with mode 0600, exclusively: an existing file is never touched unless
``force`` is given, and then it is replaced atomically (a new file in the same
directory renamed over it), so a director never reads half a key. Needs no config and
no daemon.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import TextIO

DEFAULT_KEY_FILE = "/etc/vipless-failover/cluster.key"
KEY_BYTES = 32
MODE = 0o600


class KeygenError(Exception):
    """The key file was not written; the message says why."""


def new_key() -> bytes:
    """32 random bytes from the OS's CSPRNG as 64 hex characters, then a newline."""
    return secrets.token_hex(KEY_BYTES).encode("ascii") + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fchmod(fd, MODE)  # whatever the umask was
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key(path: str | os.PathLike[str], force: bool = False, key: bytes | None = None) -> Path:
    """Write a new key to ``path`` (mode 0600) and return the path.

    Without ``force`` the file is created exclusively (``O_EXCL``; a dangling symlink
    counts as existing); with ``force`` a temporary file in the same directory is
    renamed over the old one (a symlink there is replaced, not followed)."""
    path = Path(path)
    data = new_key() if key is None else key
    directory = path.parent
    if not directory.is_dir():
        raise KeygenError(f"{path}: directory {directory} does not exist")
    if path.is_dir():
        raise KeygenError(f"{path}: is a directory")
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, MODE)
        except FileExistsError:
            raise KeygenError(f"{path}: already exists (a cluster key in use? --force replaces it)") from None
        except OSError as exc:
            raise KeygenError(f"{path}: {exc.strerror}") from None
        try:
            _write_all(fd, data)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise KeygenError(f"{path}: {exc.strerror}") from None
        os.close(fd)
    else:
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".new")
        except OSError as exc:
            raise KeygenError(f"{path}: {exc.strerror}") from None
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise KeygenError(f"{path}: {exc.strerror}") from None
    try:
        _fsync_dir(directory)
    except OSError:  # pragma: no cover - the file is written; durability is best effort
        pass
    return path


def next_steps(path: Path) -> str:
    shown = path.absolute()
    return (
        f"wrote a new cluster key to {shown} (mode 0600)\n"
        "next:\n"
        "  - copy this same file to every director of the cluster, owner root, mode 0600, at the\n"
        "    path its election.key_file names, e.g.\n"
        f"      scp -p {shown} root@OTHER-DIRECTOR:{shown}\n"
        "  - set election.key_file to that path in each director's config\n"
        "  - (re)start vipless-failoverd on every director: the key is read at start, and\n"
        "    directors with different keys reject each other's adverts\n")


def main(path: str | os.PathLike[str] = DEFAULT_KEY_FILE, force: bool = False,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``failoverctl keygen``: 0 written, 1 refused or failed."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        written = write_key(path, force=force)
    except KeygenError as exc:
        print(f"failoverctl: keygen: {exc}", file=err)
        return 1
    out.write(next_steps(written))
    return 0
