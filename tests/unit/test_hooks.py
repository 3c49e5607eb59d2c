"""Notify hooks: argv + environment, never a shell, bounded by a timeout (the whole
process group is killed), failures counted, and never blocking the caller."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from vipless_failover.config import NotifyConfig
from vipless_failover.hooks import QUEUE_MAX, NotifyHooks, run_command


class ListLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        def log(event: str, **kw):
            self.events.append((level, event, kw))
        return log


RECORDER = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"argv": sys.argv[2:], "env": {k: v for k, v in os.environ.items()
                                                     if k.startswith("VIPLESS_")}}) + "\\n")
"""


def recorder(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    out = tmp_path / "calls.jsonl"
    return [sys.executable, str(script), str(out)], out


def calls(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


async def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_command_gets_new_old_reason_node_as_args_and_env(tmp_path, monkeypatch):
    # inherited VIPLESS_* variables (a stale one of ours, a CI variable) never reach a hook
    monkeypatch.setenv("VIPLESS_NEW_STATE", "stale")
    monkeypatch.setenv("VIPLESS_DEB", "/tmp/x.deb")
    argv, out = recorder(tmp_path)
    hooks = NotifyHooks(NotifyConfig(commands=(tuple(argv),), timeout_ms=5000), "director-a", 51, ListLog())
    hooks.start()
    try:
        hooks.transition("MASTER", "BACKUP", "master_down")
        await wait_for(lambda: hooks.results["ok"] == 1)
    finally:
        await hooks.close()
    [call] = calls(out)
    assert call["argv"] == ["MASTER", "BACKUP", "master_down", "director-a"]
    assert call["env"] == {"VIPLESS_NEW_STATE": "MASTER", "VIPLESS_OLD_STATE": "BACKUP",
                           "VIPLESS_REASON": "master_down", "VIPLESS_NODE": "director-a",
                           "VIPLESS_CLUSTER_ID": "51"}


async def test_no_shell_metacharacters_are_interpreted(tmp_path):
    argv, out = recorder(tmp_path)
    hooks = NotifyHooks(NotifyConfig(commands=((*argv, "$(touch pwned)", ";", "*"),)), "n", 1, ListLog())
    hooks.start()
    try:
        hooks.transition("FAULT", "MASTER", "fault:link:eth0 && rm -rf /")
        await wait_for(lambda: hooks.results["ok"] == 1)
    finally:
        await hooks.close()
    [call] = calls(out)
    assert call["argv"] == ["$(touch pwned)", ";", "*", "FAULT", "MASTER", "fault:link:eth0 && rm -rf /", "n"]
    assert not (Path.cwd() / "pwned").exists()


async def test_calls_run_in_transition_order_for_each_command(tmp_path):
    argv, out = recorder(tmp_path)
    argv2 = [*argv[:2], str(tmp_path / "second.jsonl")]
    hooks = NotifyHooks(NotifyConfig(commands=(tuple(argv), tuple(argv2))), "n", 1, ListLog())
    hooks.start()
    seq = [("BACKUP", "INIT"), ("MASTER", "BACKUP"), ("BACKUP", "MASTER"), ("FAULT", "BACKUP")]
    try:
        for new, old in seq:
            hooks.transition(new, old, "r")
        await wait_for(lambda: hooks.results["ok"] == 8)
    finally:
        await hooks.close()
    assert [tuple(c["argv"][:2]) for c in calls(out)] == seq
    assert [tuple(c["argv"][:2]) for c in calls(tmp_path / "second.jsonl")] == seq


async def test_hanging_command_is_killed_with_its_children_and_never_blocks(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the hook starts a child that would outlive it, then hangs
    script = tmp_path / "hang.sh"
    script.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nsleep 60\n")
    script.chmod(0o755)
    log = ListLog()
    hooks = NotifyHooks(NotifyConfig(commands=((str(script),),), timeout_ms=300), "n", 1, log)
    hooks.start()
    try:
        t0 = time.monotonic()
        hooks.transition("MASTER", "BACKUP", "master_down")
        assert time.monotonic() - t0 < 0.01  # queued, not run, by the caller
        # the loop stays free while the hook hangs
        ticks = 0
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
            ticks += 1
            assert ticks < 500
        child = int(pidfile.read_text())
        os.kill(child, 0)  # alive while the hook runs
        await wait_for(lambda: hooks.results["timeout"] == 1, timeout=3)
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 1.5
        await wait_for(lambda: not Path(f"/proc/{child}").exists() or
                       Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", timeout=2)
    finally:
        await hooks.close()
    assert any(e[1] == "notify_failed" and e[2]["result"] == "timeout" for e in log.events)


async def test_failures_are_counted_and_logged(tmp_path):
    log = ListLog()
    hooks = NotifyHooks(NotifyConfig(commands=(
        (sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"),
        (str(tmp_path / "missing"),),
    )), "n", 1, log)
    hooks.start()
    try:
        hooks.transition("MASTER", "BACKUP", "r")
        await wait_for(lambda: hooks.results["failed"] == 1 and hooks.results["error"] == 1)
    finally:
        await hooks.close()
    failed = [e[2] for e in log.events if e[1] == "notify_failed"]
    assert {f["result"] for f in failed} == {"failed", "error"}
    assert any(f["detail"] == "exit 3: boom" for f in failed)
    assert hooks.status()["results"]["ok"] == 0


async def test_a_backlog_drops_the_oldest_calls_and_counts_them(tmp_path):
    hooks = NotifyHooks(NotifyConfig(commands=(("/bin/sleep", "5"),), timeout_ms=5000), "n", 1, ListLog())
    hooks.start()
    try:
        for i in range(QUEUE_MAX + 10):
            hooks.transition("MASTER", "BACKUP", f"r{i}")
        await asyncio.sleep(0.05)
        # one is running, QUEUE_MAX wait
        assert hooks.results["dropped"] >= 9
        assert hooks.status()["pending"] <= QUEUE_MAX
    finally:
        t0 = time.monotonic()
        await hooks.close()
        assert time.monotonic() - t0 < 2  # close kills the running one


async def test_close_waits_for_queued_calls_within_the_grace(tmp_path):
    argv, out = recorder(tmp_path)
    hooks = NotifyHooks(NotifyConfig(commands=(tuple(argv),)), "n", 1, ListLog())
    hooks.start()
    hooks.transition("BACKUP", "MASTER", "stop")
    await hooks.close(grace=5)
    assert len(calls(out)) == 1


async def test_run_command_results():
    assert await run_command(["/bin/true"], None, 1) == ("ok", "")
    assert (await run_command(["/bin/false"], None, 1))[0] == "failed"
    assert (await run_command(["/bin/sleep", "5"], None, 0.1))[0] == "timeout"
    assert (await run_command(["/nonexistent/prog"], None, 1))[0] == "error"
