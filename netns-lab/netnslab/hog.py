"""A bounded CPU hog: one busy loop per core, at normal priority, until a deadline.

    python -m netnslab.hog --seconds 20 [--procs N]

Each child spins (no sleep, no syscall) until its deadline; the parent waits for them
and prints how many ran. Bounded: at most 900 s and 64 processes; a child that
outlives its deadline by a second is killed by the parent.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

MAX_SECONDS = 900.0  # the no-rt bench figure hogs for 10 minutes
MAX_PROCS = 64


def spin(deadline: float) -> None:
    x = 0
    while time.monotonic() < deadline:
        for _ in range(10_000):
            x += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netnslab.hog", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS or not 1 <= args.procs <= MAX_PROCS:
        ap.error(f"seconds must be 0..{MAX_SECONDS}, procs 1..{MAX_PROCS}")
    deadline = time.monotonic() + args.seconds
    pids = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            try:
                spin(deadline)
            finally:
                os._exit(0)
        pids.append(pid)
    def stop(signum: int, frame: object) -> None:  # the lab stops the parent: the children go too
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"hogging {args.procs} cores for {args.seconds} s", flush=True)
    for pid in pids:
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline + 1.0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
