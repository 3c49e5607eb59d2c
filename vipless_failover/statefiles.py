"""The director's two files that outlive its process (daemon.py).

- :class:`ResumeMarker`, beside the control socket: a master restarting in place
  leaves it, and the next process resumes as master if it starts within
  ``election.restart_hold_ms``.
- :class:`MaintenanceFile`, in the state directory: there while maintenance mode is
  on, so the mode survives restarts until it is turned off.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .election.protocol import State

RESUME_FILE = "resume-{node}.json"


class ResumeMarker:
    def __init__(self, runtime_dir: Path, node: str):
        self.path = runtime_dir / RESUME_FILE.format(node=node)

    def write(self, hold_ms: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"at": time.time(), "hold_ms": hold_ms}))
        os.replace(tmp, self.path)

    def take(self) -> bool:
        """Whether this process resumes as master; the marker is used up either way."""
        try:
            data = json.loads(self.path.read_text())
            self.path.unlink()
        except (OSError, ValueError):
            return False
        age = time.time() - float(data.get("at", 0))
        return 0 <= age * 1000 < float(data.get("hold_ms", 0))


class MaintenanceFile:
    def __init__(self, state_dir: Path, node: str, log: Any):
        self.path = state_dir / f"maintenance-{node}"
        self.log = log
        self.saved = False  # what the file says

    def found(self) -> bool:
        """At start: whether maintenance was on when the last process stopped."""
        if not self.path.exists():
            return False
        self.saved = True
        return True

    def follow(self, status: dict[str, Any]) -> None:
        """The file follows the election's snapshot (once the election has started)."""
        if status["maintenance"] != self.saved and status["state"] != State.INIT.name:
            self.save(status["maintenance"])

    def save(self, on: bool) -> None:
        try:
            if on:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                self.path.write_text(json.dumps({"since": time.time()}) + "\n")
            else:
                self.path.unlink(missing_ok=True)
            self.saved = on
        except OSError as exc:
            self.log.error("maintenance_persist_failed", file=str(self.path), error=str(exc))
            self.saved = on  # reported once; the mode itself is in force
