"""Issue 13, cases 3 and 4, on a real kernel: what a node trusts.

* a restarted survivor is not held in BACKUP by adverts replayed from a capture older
  than the replay window (``election.max_clock_skew_ms``): it takes over on its own
  master-down timer while the replay is still running;
* one advert signed with the cluster key but carrying counter 2^64-1 under the
  master's name poisons nothing: it is refused as ``future``, the master's real
  adverts go on being accepted, and the backup says ``clock_skew`` about that address;
* a key rotation done by the documented procedure (accept the new key everywhere,
  sign with it everywhere, drop the old one; each step a ``failoverctl reload``) moves
  nothing: no transition, no ``auth`` rejection;
* a node restarted with another key is named: the peer that knew its address raises
  ``auth_failed`` (log event, status notice, ``vipless_failover_notices_total``).

Forged and replayed frames are sent from the router's namespace on the lab LAN by
``netnslab.flood`` (documentation addresses only, bounded in count and time).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netnslab import configgen
from netnslab.capture import BridgeCapture
from netnslab.configgen import NodeSettings
from netnslab.daemons import Cluster, Daemon, event_time, master_down_ms
from netnslab.flood import replay_payloads
from netnslab.topology import Lab
from vipless_failover.election.protocol import Advert, State, encode_advert
from vipless_failover.election.trust import fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from test_operations_lab import METRICS, metric, scrape, wait_for

pytestmark = pytest.mark.lab

INTERVAL = 100
PORT = 5798
CONVERGE_S = 10.0
A, B = "director-a", "director-b"


def _rejected(d: Daemon) -> dict[str, int]:
    st = d.status() or {}
    return dict((st.get("adverts") or {}).get("rejected") or {})


def _notices(d: Daemon) -> dict[str, int]:
    return dict((d.status() or {}).get("notices") or {})


def _send(lab: Lab, target: Daemon, *, kinds: str, count: int, duration: float, src_ip: str,
          replay: Path | None = None, payload: bytes | None = None) -> Any:
    """netnslab.flood from the router at ``target``'s MAC (started, not waited for)."""
    args = [lab.python, "-m", "netnslab.flood", "--iface", lab.router.iface, "--dst-mac", lab.mac(target.director),
            "--src-ip", src_ip, "--cluster-id", str(target.settings.cluster_id), "--kinds", kinds,
            "--count", str(count), "--duration", str(duration)]
    if replay is not None:
        args += ["--replay", str(replay)]
    if payload is not None:
        args += ["--payload", payload.hex()]
    return lab.spawn("router", args, name=f"flood-{kinds}", log=lab.workdir / f"flood-{kinds}.log")


def _flood_result(lab: Lab, sp: Any, timeout: float) -> dict[str, Any]:
    rc = sp.popen.wait(timeout=timeout)
    lab.forget(sp)
    out = [line for line in Path(sp.log).read_text().splitlines() if line.startswith("{")]
    assert rc == 0 and out, f"flood failed (exit {rc}): {Path(sp.log).read_text()[-1000:]}"
    return json.loads(out[-1])



def test_a_restarted_survivor_is_not_held_by_adverts_replayed_from_an_old_capture(
        make_cluster: Callable[..., Cluster], lab: Lab) -> None:
    window = {"election": {"max_clock_skew_ms": 1000}}
    cluster = make_cluster(a=NodeSettings(priority=150, overrides=window),
                           b=NodeSettings(priority=100, overrides=window))
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    with BridgeCapture(lab, filter=f"udp port {PORT}", tag="replay") as cap:
        time.sleep(6.0)
    path = cap.path
    captured = replay_payloads(str(path), PORT)
    assert len(captured) >= 40, f"only {len(captured)} adverts captured in 6 s at {INTERVAL} ms"

    a.kill()  # the old master is dead
    b.wait_transition("MASTER", 5.0)
    b.stop()
    time.sleep(1.5)  # every captured advert is now older than the 1 s window

    replay_s = len(captured) * INTERVAL / 1000
    flood = _send(lab, b, kinds="replay", count=len(captured), duration=replay_s, src_ip=str(lab.director(A).ip4),
                  replay=path)
    t_replay = time.time()
    time.sleep(0.3)  # the replay runs before the survivor starts, and all the while it starts
    t_start = b.start()
    ev = b.wait_transition("MASTER", replay_s, after=t_start)
    t_master = event_time(ev)
    assert t_master is not None
    sent = _flood_result(lab, flood, timeout=replay_s + 10)
    assert sent["sent"] == {"replay": len(captured)}, sent
    # master by its own timer, while the replay still ran (before the fix: BACKUP until it ended)
    assert t_master < t_replay + replay_s - 1.0, (t_master - t_replay, replay_s)
    assert t_master - t_start < 3.0 + master_down_ms(INTERVAL, 100) / 1000, t_master - t_start
    assert _rejected(b).get("stale", 0) >= 10, _rejected(b)
    assert [e.get("to") for e in b.transitions()] == ["BACKUP", "MASTER"], b.transitions()


def test_one_advert_with_counter_2_64_minus_1_does_not_poison_the_master(pair: Cluster, lab: Lab) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    poison = encode_advert(Advert(cluster_id=a.settings.cluster_id, node=A, address=lab.director(A).ip4,
                                  priority=150, advert_interval_ms=INTERVAL, state=State.MASTER,
                                  counter=(1 << 64) - 1, config_digest=bytes(16)),
                           pair.key_file.read_bytes().strip())
    before = _rejected(b)
    _flood_result(lab, _send(lab, b, kinds="given", count=1, duration=1.0, src_ip=str(lab.director(A).ip4),
                             payload=poison), timeout=10)
    pair.hold({A: "MASTER", B: "BACKUP"}, 3.0)
    after = _rejected(b)
    assert after.get("future", 0) - before.get("future", 0) == 1, after
    assert after.get("replay", 0) == before.get("replay", 0), after  # a's real adverts still accepted
    st = b.status() or {}
    peer = [p for p in st.get("peers", []) if p.get("node") == A]
    assert peer and peer[0]["last_seen_s"] < 0.5, st.get("peers")
    assert _notices(b).get("clock_skew") == 1, _notices(b)  # from the master's own address
    assert any(e.get("event") == "clock_skew" and e.get("peer") == str(lab.director(A).ip4)
               for e in b.events(current_run=True))


def _set_keys(d: Daemon, key_file: Path, accept: list[Path]) -> None:
    """Rewrite ``d``'s config with these keys and reload it (one step of a rotation)."""
    d.key_file = key_file
    d.reconfigure(overrides={"election": {"accept_key_files": [str(p) for p in accept]}})
    p = d.ctl("reload")
    assert p.returncode == 0, f"{d.tag}: reload: {p.stdout} {p.stderr}"


def test_key_rotation_by_the_documented_procedure_moves_nothing(pair: Cluster, lab: Lab) -> None:
    a, b = pair[A], pair[B]
    pair.wait_converged(CONVERGE_S, A)
    time.sleep(0.5)
    old = pair.key_file
    new = configgen.write_key(lab.workdir / "rotated.key")
    transitions = {d.tag: len(d.transitions()) for d in (a, b)}
    steps = [("1. accept the new key everywhere", [(a, old, [new]), (b, old, [new])]),
             ("2. sign with the new key, accept the old, node by node", [(a, new, [old]), (b, new, [old])]),
             ("3. drop the old key", [(a, new, []), (b, new, [])])]
    for what, changes in steps:
        for d, key_file, accept in changes:
            _set_keys(d, key_file, accept)
            pair.hold({A: "MASTER", B: "BACKUP"}, 1.0)
        for d in (a, b):
            assert _rejected(d).get("auth", 0) == 0, (what, d.tag, _rejected(d))
            assert len(d.transitions()) == transitions[d.tag], (what, d.tag, d.transitions())
        if what.startswith("2."):
            assert (b.status() or {})["keys"]["peers"].get(A) in (
                "signing", f"accepted:{fingerprint(old.read_bytes().strip())}")
    for d in (a, b):
        keys = (d.status() or {})["keys"]
        assert keys["signing"] == fingerprint(new.read_bytes().strip()) and keys["accepted"] == [], keys
        assert any(e.get("event") == "keys_reloaded" for e in d.events(current_run=True))
    assert (b.status() or {})["keys"]["peers"] == {A: "signing"}
    pair.hold({A: "MASTER", B: "BACKUP"}, 1.0)


def test_a_peer_restarted_with_another_key_is_named_by_auth_failed(make_cluster: Callable[..., Cluster],
                                                                   lab: Lab) -> None:
    cluster = make_cluster(a=NodeSettings(priority=150, metrics_listen=METRICS),
                           b=NodeSettings(priority=100, metrics_listen=METRICS))
    a, b = cluster[A], cluster[B]
    cluster.wait_converged(CONVERGE_S, A)
    a.key_file = configgen.write_key(lab.workdir / "other.key")  # a restart with a key b does not have
    a.write_config()
    a.stop()
    b.wait_state("MASTER", 5.0)
    a.start()
    a.wait_state("MASTER", CONVERGE_S)  # it cannot hear b: two masters, the case to be told about
    wait_for(lambda: _notices(b).get("auth_failed", 0) >= 1, 5.0, "b raises auth_failed")
    ev = [e for e in b.events(current_run=True) if e.get("event") == "auth_failed"]
    assert ev and ev[0].get("peer") == str(lab.director(A).ip4) and ev[0].get("level") == "warning", ev
    assert metric(scrape(b), "vipless_failover_notices_total", kind="auth_failed") >= 1
    time.sleep(2.0)
    assert _notices(b)["auth_failed"] <= 2, _notices(b)  # at most one per 10 s per address, not one per advert
    assert _rejected(b).get("auth", 0) >= 10, _rejected(b)
