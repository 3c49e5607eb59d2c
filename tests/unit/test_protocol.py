"""Wire protocol of the election: encode/decode, authentication, freshness, fuzzing."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import hmac
import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from vipless_failover.election import protocol
from vipless_failover.election.protocol import (
    MAX_MESSAGE_BYTES,
    MIN_MESSAGE_BYTES,
    Advert,
    AdvertDecoder,
    AdvertRejected,
    Flag,
    State,
    decode_advert,
    encode_advert,
    next_counter,
)

KEY = b"vipless-failover-test-key"
OTHER_KEY = b"another-cluster-key-0123"
DATA = Path(__file__).parent / "data"
ELECTION = Path(protocol.__file__).parent

#: The advert saved in data/advert_v1.hex (encoded with KEY).
SAVED = Advert(
    cluster_id=51, node="director-a", address=ipaddress.ip_address("2001:db8::11"), priority=150,
    advert_interval_ms=100, state=State.MASTER, flags=Flag.HANDOVER | Flag.RESTARTING,
    successor="director-b", hold_ms=10000, counter=1722000000123456, config_digest=bytes(range(16)),
)


def advert(**changes: object) -> Advert:
    base = Advert(cluster_id=51, node="director-a", address=ipaddress.ip_address("192.0.2.11"),
                  priority=150, advert_interval_ms=100, state=State.BACKUP, counter=1000)
    return dataclasses.replace(base, **changes)


def sign(body: bytes, key: bytes = KEY) -> bytes:
    return body + hmac.new(key, body, hashlib.sha256).digest()


def resign(data: bytes, key: bytes = KEY) -> bytes:
    """Replace the tag of a (possibly edited) message with a valid one."""
    return sign(data[:-32], key)


def rejected(data: bytes, decoder: AdvertDecoder | None = None) -> str:
    decoder = decoder or AdvertDecoder(KEY, 51)
    with pytest.raises(AdvertRejected) as info:
        decoder.decode(data)
    return info.value.reason


# ---------------------------------------------------------------------------
# round trip and saved bytes


@pytest.mark.parametrize("address", ["192.0.2.11", "2001:db8::11", "0.0.0.0", "ffff:ffff::1"])
def test_round_trip_every_field(address: str) -> None:
    msg = Advert(
        cluster_id=255, node="n" * 32, address=ipaddress.ip_address(address), priority=0,
        advert_interval_ms=65535, state=State.FAULT,
        flags=Flag.HANDOVER | Flag.TAKEOVER_REQUEST | Flag.RESTARTING | Flag.STOPPING,
        successor="s" * 32, hold_ms=2**32 - 1, counter=2**64 - 1, config_digest=b"\xff" * 16,
    )
    data = encode_advert(msg, KEY)
    assert MIN_MESSAGE_BYTES <= len(data) <= MAX_MESSAGE_BYTES
    got = AdvertDecoder(KEY, 255).decode(data)
    assert got == msg
    assert type(got.state) is State and type(got.flags) is Flag
    assert type(got.address) is type(msg.address)


@pytest.mark.parametrize("state", list(State))
def test_round_trip_states_and_minimal_fields(state: State) -> None:
    msg = advert(state=state, node="a", successor="", priority=1, advert_interval_ms=1, counter=0)
    data = encode_advert(msg, KEY)
    assert AdvertDecoder(KEY, 51).decode(data) == msg


def test_round_trip_utf8_names() -> None:
    msg = advert(node="dïrector-ä", successor="节点-b")
    assert AdvertDecoder(KEY, 51).decode(encode_advert(msg, KEY)) == msg


def test_message_size_bounds() -> None:
    smallest = advert(node="a", successor="")
    largest = advert(node="x" * 32, successor="y" * 32, address=ipaddress.ip_address("2001:db8::1"))
    assert len(encode_advert(smallest, KEY)) == MIN_MESSAGE_BYTES == 79
    assert len(encode_advert(largest, KEY)) == MAX_MESSAGE_BYTES == 154


def test_saved_bytes_pin_the_wire_format() -> None:
    saved = bytes.fromhex((DATA / "advert_v1.hex").read_text().strip())
    assert AdvertDecoder(KEY, 51).decode(saved) == SAVED
    assert encode_advert(SAVED, KEY) == saved


def test_saved_bytes_layout() -> None:
    """The documented layout, field by field, independent of the encoder."""
    body = b"".join((
        b"VF", bytes((1, 1, 51, 150, int(State.MASTER))),
        struct.pack("!HHIQ", 0x05, 100, 10000, 1722000000123456), bytes(range(16)),
        b"\x06", ipaddress.ip_address("2001:db8::11").packed,
        b"\x0a", b"director-a", b"\x0a", b"director-b",
    ))
    saved = bytes.fromhex((DATA / "advert_v1.hex").read_text().strip())
    assert saved == sign(body)


# ---------------------------------------------------------------------------
# local misuse raises ValueError


@pytest.mark.parametrize("changes", [
    {"cluster_id": 0}, {"cluster_id": 256}, {"priority": -1}, {"priority": 256},
    {"advert_interval_ms": 0}, {"advert_interval_ms": 65536}, {"hold_ms": -1}, {"hold_ms": 2**32},
    {"counter": -1}, {"counter": 2**64}, {"node": ""}, {"node": "x" * 33}, {"node": "é" * 17},
    {"successor": "y" * 33}, {"config_digest": b"\x00" * 15}, {"config_digest": b"\x00" * 32},
    {"flags": 0x10}, {"state": 7}, {"address": "192.0.2.11"}, {"priority": True}, {"node": None},
])
def test_encode_rejects_misuse(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode_advert(advert(**changes), KEY)


def test_encode_and_decoder_reject_empty_key() -> None:
    with pytest.raises(ValueError):
        encode_advert(advert(), b"")
    with pytest.raises(ValueError):
        AdvertDecoder(b"", 51)
    with pytest.raises(ValueError):
        AdvertDecoder(KEY, 0)


# ---------------------------------------------------------------------------
# each rejection reason


def test_reason_version() -> None:
    data = bytearray(encode_advert(advert(), KEY))
    data[2] = 2
    assert rejected(resign(bytes(data))) == "version"


def test_reason_cluster() -> None:
    assert rejected(encode_advert(advert(cluster_id=52), KEY)) == "cluster"


def test_reason_auth_wrong_key() -> None:
    assert rejected(encode_advert(advert(), OTHER_KEY)) == "auth"


def test_reason_auth_resigned_with_other_key() -> None:
    data = encode_advert(advert(), KEY)
    assert rejected(resign(data, OTHER_KEY)) == "auth"


def test_reason_auth_edited_field() -> None:
    data = bytearray(encode_advert(advert(priority=100), KEY))
    data[5] = 254  # priority, tag left as it was
    assert rejected(bytes(data)) == "auth"


def test_reason_replay_same_bytes() -> None:
    decoder = AdvertDecoder(KEY, 51)
    data = encode_advert(advert(counter=5), KEY)
    decoder.decode(data)
    assert rejected(data, decoder) == "replay"


def test_reason_replay_older_counter() -> None:
    decoder = AdvertDecoder(KEY, 51)
    decoder.decode(encode_advert(advert(counter=10), KEY))
    assert rejected(encode_advert(advert(counter=9), KEY), decoder) == "replay"
    assert rejected(encode_advert(advert(counter=10, priority=1), KEY), decoder) == "replay"
    assert decoder.decode(encode_advert(advert(counter=11), KEY)).counter == 11


def test_replay_state_is_per_node() -> None:
    decoder = AdvertDecoder(KEY, 51)
    decoder.decode(encode_advert(advert(node="a", counter=100), KEY))
    assert decoder.decode(encode_advert(advert(node="b", counter=1), KEY)).node == "b"
    assert rejected(encode_advert(advert(node="a", counter=100), KEY), decoder) == "replay"


def test_reset_forgets_a_node() -> None:
    decoder = AdvertDecoder(KEY, 51)
    data = encode_advert(advert(counter=100), KEY)
    decoder.decode(data)
    decoder.reset("director-a")
    decoder.reset("unknown-node")
    assert decoder.last_counter("director-a") is None
    assert decoder.decode(data).counter == 100


def test_rejected_messages_do_not_change_replay_state() -> None:
    decoder = AdvertDecoder(KEY, 51)
    decoder.decode(encode_advert(advert(counter=10), KEY))
    # authentic but from another cluster, and forged with a huge counter: no effect
    assert rejected(encode_advert(advert(counter=10**12, cluster_id=52), KEY), decoder) == "cluster"
    assert rejected(encode_advert(advert(counter=10**12), OTHER_KEY), decoder) == "auth"
    bad_state = bytearray(encode_advert(advert(counter=10**12), KEY))
    bad_state[6] = 9
    assert rejected(resign(bytes(bad_state)), decoder) == "malformed"
    assert decoder.last_counter("director-a") == 10
    assert decoder.decode(encode_advert(advert(counter=11), KEY)).counter == 11


def test_replay_state_is_bounded() -> None:
    decoder = AdvertDecoder(KEY, 51, max_nodes=4)
    for i in range(10):
        decoder.decode(encode_advert(advert(node=f"n{i}", counter=1), KEY))
    assert decoder.tracked_nodes == 4
    assert decoder.last_counter("n9") == 1 and decoder.last_counter("n0") is None
    assert AdvertDecoder(KEY, 51).decode(encode_advert(advert(), KEY))  # default bound works
    big = AdvertDecoder(KEY, 51)
    for i in range(300):
        big.decode(encode_advert(advert(node=f"n{i}", counter=1), KEY))
    assert big.tracked_nodes == protocol.MAX_TRACKED_NODES


# malformed: each kind, always with a valid tag so the check itself is exercised


def _edit(offset: int, value: int | bytes, msg: Advert | None = None) -> bytes:
    data = bytearray(encode_advert(msg or advert(), KEY))
    if isinstance(value, int):
        value = bytes((value,))
    data[offset:offset + len(value)] = value
    return resign(bytes(data))


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(b"V", id="one-byte"),
    pytest.param(b"XF" + encode_advert(advert(), KEY)[2:], id="bad-magic"),
    pytest.param(_edit(3, 2), id="unknown-type"),
    pytest.param(_edit(6, 4), id="unknown-state"),
    pytest.param(_edit(7, 0x80), id="unknown-flag-high"),
    pytest.param(_edit(8, 0x10), id="unknown-flag-low"),
    pytest.param(_edit(9, b"\x00\x00"), id="interval-zero"),
    pytest.param(_edit(39, 5), id="bad-family"),
    pytest.param(_edit(39, 6), id="family-length-mismatch"),
    pytest.param(_edit(44, 0), id="node-length-zero"),
    pytest.param(_edit(44, 33), id="node-length-33"),
    pytest.param(_edit(44, 9), id="node-length-short"),
    pytest.param(_edit(55, 33), id="successor-length-33"),
    pytest.param(_edit(55, 1), id="successor-length-long"),
    pytest.param(_edit(45, 0xFF), id="node-not-utf8"),
    pytest.param(_edit(56, 0xC3, advert(successor="b")), id="successor-not-utf8"),
    pytest.param(encode_advert(advert(), KEY) + b"\x00", id="extra-byte"),
    pytest.param(b"VF\x01" + b"\x00" * 200, id="too-long"),
])
def test_reason_malformed(data: bytes) -> None:
    assert rejected(data) == "malformed"


def test_layout_offsets_used_above() -> None:
    data = encode_advert(advert(), KEY)
    assert data[39] == 4 and data[40:44] == ipaddress.ip_address("192.0.2.11").packed
    assert data[44] == len("director-a") and data[45:55] == b"director-a" and data[55] == 0


def test_every_truncation_is_malformed() -> None:
    for msg in (advert(), SAVED, advert(address=ipaddress.ip_address("2001:db8::1"), successor="x" * 32)):
        data = encode_advert(msg, KEY)
        for n in range(len(data)):
            assert rejected(data[:n]) == "malformed", n


def test_one_extra_byte_is_malformed_even_when_signed() -> None:
    data = encode_advert(advert(), KEY)
    for extra in (b"\x00", b"\xff"):
        assert rejected(data + extra) == "malformed"
        assert rejected(sign(data[:-32] + extra)) == "malformed"


def test_reason_strings_are_exactly_the_documented_ones() -> None:
    assert AdvertRejected.REASONS == ("malformed", "version", "auth", "replay", "cluster", "stale", "future")
    exc = AdvertRejected("auth", "HMAC mismatch")
    assert exc.reason == "auth" and str(exc) == "auth: HMAC mismatch"


def test_decode_advert_without_cluster_filter() -> None:
    msg = advert(cluster_id=200)
    assert decode_advert(encode_advert(msg, KEY), KEY) == msg
    with pytest.raises(AdvertRejected) as info:
        decode_advert(encode_advert(msg, KEY), KEY, cluster_id=51)
    assert info.value.reason == "cluster"


def test_unauthenticated_garbage_rejected_before_parsing() -> None:
    """A forged message whose fields are all invalid fails on its tag, not on a field:
    nothing beyond the length is parsed before the tag is checked."""
    data = bytearray(encode_advert(advert(), KEY))
    data[3] = 99  # unknown type
    data[6] = 99  # unknown state
    data[45] = 0xFF  # bad UTF-8
    assert rejected(bytes(data)) == "auth"


# ---------------------------------------------------------------------------
# fuzzing: nothing but AdvertRejected, never accepted


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_flipped_bits_never_accepted(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from([advert(), SAVED, advert(node="z", successor="")]))
    raw = bytearray(encode_advert(msg, KEY))
    positions = data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=8, unique=True))
    for bit in positions:
        raw[bit // 8] ^= 1 << (bit % 8)
    decoder = AdvertDecoder(KEY, msg.cluster_id)
    with pytest.raises(AdvertRejected):
        decoder.decode(bytes(raw))
    assert decoder.tracked_nodes == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_accepted(raw: bytes) -> None:
    decoder = AdvertDecoder(KEY, 51)
    with pytest.raises(AdvertRejected):
        decoder.decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=MIN_MESSAGE_BYTES - 32, max_size=MAX_MESSAGE_BYTES - 32))
def test_random_signed_bodies_only_rejected_or_consistent(body: bytes) -> None:
    """Even with a valid tag, random content is either rejected cleanly or decodes to
    an advert that re-encodes to exactly the same bytes."""
    raw = sign(b"VF\x01" + body[3:])
    try:
        got = decode_advert(raw, KEY)
    except AdvertRejected:
        return
    assert encode_advert(got, KEY) == raw


names = st.text(min_size=1, max_size=8).filter(lambda s: 1 <= len(s.encode()) <= 32)


@settings(max_examples=200, deadline=None)
@given(
    cluster_id=st.integers(1, 255), priority=st.integers(0, 255), state=st.sampled_from(list(State)),
    flags=st.integers(0, 0x0F).map(Flag), interval=st.integers(1, 65535), hold=st.integers(0, 2**32 - 1),
    counter=st.integers(0, 2**64 - 1), digest=st.binary(min_size=16, max_size=16), node=names,
    successor=st.one_of(st.just(""), names),
    address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
)
def test_round_trip_property(cluster_id, priority, state, flags, interval, hold, counter, digest, node,
                             successor, address) -> None:
    msg = Advert(cluster_id=cluster_id, node=node, address=address, priority=priority,
                 advert_interval_ms=interval, state=state, flags=flags, successor=successor,
                 hold_ms=hold, counter=counter, config_digest=digest)
    assert AdvertDecoder(KEY, cluster_id).decode(encode_advert(msg, KEY)) == msg


# ---------------------------------------------------------------------------
# next_counter


def test_next_counter() -> None:
    assert next_counter(0, 1_700_000_000_000_000) == 1_700_000_000_000_000
    assert next_counter(1_700_000_000_000_000, 1_700_000_000_000_000) == 1_700_000_000_000_001
    assert next_counter(1_700_000_000_000_005, 1_699_999_999_000_000) == 1_700_000_000_000_006  # clock stepped back
    with pytest.raises(ValueError):
        next_counter(2**64 - 1, 0)


def test_restarted_node_is_fresh_when_seeded_from_wall_clock() -> None:
    decoder = AdvertDecoder(KEY, 51)
    before = 0
    for now_us in (1_700_000_000_000_000, 1_700_000_000_100_000):
        before = next_counter(before, now_us)
        decoder.decode(encode_advert(advert(counter=before), KEY))
    restarted = next_counter(0, 1_700_000_001_000_000)  # new process, no memory, a second later
    assert decoder.decode(encode_advert(advert(counter=restarted), KEY)).counter == restarted


# ---------------------------------------------------------------------------
# purity: the election core does no I/O

FORBIDDEN = {"asyncio", "socket", "pyroute2", "time", "selectors"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("__import__")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            found.add("importlib.import_module")
    return found


@pytest.mark.parametrize("name", ["protocol.py", "fsm.py"])
def test_election_core_imports_no_io(name: str) -> None:
    path = ELECTION / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    imported = _imported_modules(path)
    assert imported, f"{path}: no imports found (parser broken?)"
    bad = imported & (FORBIDDEN | {"__import__", "importlib.import_module"})
    assert not bad, f"{path} imports {sorted(bad)}"


def test_import_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\nimport asyncio.events as e\n")
    assert {"time", "asyncio"} <= _imported_modules(sample)


# ---------------------------------------------------------------------------
# freshness against the receiver's clock, and several keys (issue 13, items 3 and 4)

NOW_US = 1_800_000_000_000_000  # the receiver's wall clock, microseconds
SKEW_US = 5_000_000


def _reason(decoder: AdvertDecoder, data: bytes, now_us: int | None = NOW_US) -> str | None:
    try:
        decoder.decode(data, now_us)
    except AdvertRejected as exc:
        return exc.reason
    return None


def test_a_fresh_decoder_refuses_a_replayed_capture_older_than_the_window() -> None:
    # the case: a restarted survivor believed adverts replayed from a capture
    captured = [encode_advert(advert(counter=NOW_US - 60_000_000 + i * 100_000), KEY) for i in range(50)]
    fresh = AdvertDecoder(KEY, 51, max_skew_us=SKEW_US)  # remembers nothing
    assert {_reason(fresh, d) for d in captured} == {"stale"}
    assert fresh.tracked_nodes == 0
    # without the window (the old decoder) every one of them was accepted
    old = AdvertDecoder(KEY, 51)
    assert {_reason(old, d) for d in captured} == {None}


def test_an_advert_from_the_future_cannot_block_the_senders_real_ones() -> None:
    # one authentic advert with counter 2**64-1 made the receiver refuse the peer forever
    decoder = AdvertDecoder(KEY, 51, max_skew_us=SKEW_US)
    assert _reason(decoder, encode_advert(advert(counter=2**64 - 1), KEY)) == "future"
    assert _reason(decoder, encode_advert(advert(counter=NOW_US + SKEW_US + 1), KEY)) == "future"
    assert _reason(decoder, encode_advert(advert(counter=NOW_US), KEY)) is None
    # the worst an advert inside the window can do: the sender's next ones are refused
    # until its clock passes that counter, at most the window later
    poison = NOW_US + SKEW_US
    assert _reason(decoder, encode_advert(advert(counter=poison), KEY)) is None
    assert _reason(decoder, encode_advert(advert(counter=NOW_US + 1), KEY), NOW_US + 1) == "replay"
    later = poison + 1
    assert _reason(decoder, encode_advert(advert(counter=later), KEY), later) is None


def test_window_edges_and_no_clock_given() -> None:
    decoder = AdvertDecoder(KEY, 51, max_skew_us=SKEW_US)
    assert _reason(decoder, encode_advert(advert(counter=NOW_US - SKEW_US), KEY)) is None
    decoder = AdvertDecoder(KEY, 51, max_skew_us=SKEW_US)
    assert _reason(decoder, encode_advert(advert(counter=NOW_US - SKEW_US - 1), KEY)) == "stale"
    # no clock: only the per-node order (what decode() did before)
    assert _reason(decoder, encode_advert(advert(counter=1), KEY), None) is None
    with pytest.raises(ValueError):
        AdvertDecoder(KEY, 51, max_skew_us=-1)


def test_a_refused_advert_changes_no_state() -> None:
    decoder = AdvertDecoder(KEY, 51, max_skew_us=SKEW_US)
    assert _reason(decoder, encode_advert(advert(counter=NOW_US), KEY)) is None
    assert _reason(decoder, encode_advert(advert(counter=NOW_US + 10 * SKEW_US), KEY)) == "future"
    assert decoder.last_counter("director-a") == NOW_US


def test_any_of_several_keys_authenticates_and_the_decoder_says_which() -> None:
    new, old = b"n" * 32, b"o" * 32
    decoder = AdvertDecoder((new, old), 51)
    a = decoder.decode(encode_advert(advert(node="a", counter=1), old))
    b = decoder.decode(encode_advert(advert(node="b", counter=1), new))
    assert (a.node, b.node) == ("a", "b")
    assert decoder.key_used == {"a": 1, "b": 0}
    with pytest.raises(AdvertRejected) as info:
        decoder.decode(encode_advert(advert(node="a", counter=2), b"x" * 32))
    assert info.value.reason == "auth" and "none of 2 keys" in info.value.detail
    # a rotation swaps the keys in place and keeps the replay state
    decoder.set_keys(new)
    assert _reason(decoder, encode_advert(advert(node="a", counter=2), old), None) == "auth"
    assert _reason(decoder, encode_advert(advert(node="a", counter=1), new), None) == "replay"
    assert decoder.decode(encode_advert(advert(node="a", counter=3), new)).counter == 3
    assert decoder.key_used["a"] == 0
    with pytest.raises(ValueError):
        decoder.set_keys(())
