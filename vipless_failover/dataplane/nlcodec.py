"""Netlink messages as bytes: walk, decode and encode them (pure: no socket, no kernel).

A receive buffer holds one or more messages, each a 16-byte header (length, type,
flags, sequence number, port id; host byte order) and a payload, each padded to 4
bytes. Payloads of rtnetlink and generic netlink are a fixed family header followed
by attributes (rtattr / nlattr: 2-byte length, 2-byte type, payload, padded to 4).

- :func:`messages` walks the messages of a buffer (:class:`Message`);
- :meth:`Message.error` reads an ``NLMSG_ERROR`` (an acknowledgement when 0);
  :func:`parse_acks` maps a buffer's acknowledgements by sequence number;
- :func:`attrs` / :meth:`Message.attrs` walk attributes (:meth:`Message.attr_map`: by type);
- :func:`encode` and :func:`encode_attr` build them.

What each family header and attribute means stays with the code that speaks that
family (rules.py: rules and routes); pyroute2 decodes the messages worth decoding.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import NamedTuple

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
HEADER_SIZE = HEADER.size  # 16
ATTR_HEADER = struct.Struct("=HH")  # rtattr / nlattr: length, type
_ERRNO = struct.Struct("=i")

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO, NLM_F_DUMP_INTR = 0x1, 0x2, 0x4, 0x8, 0x10
NLM_F_ROOT, NLM_F_MATCH, NLM_F_DUMP = 0x100, 0x200, 0x300  # GET requests
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800  # NEW requests
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF


def align(n: int) -> int:
    """``n`` rounded up to the netlink alignment (4 bytes)."""
    return (n + 3) & ~3


class MalformedMessage(OSError):
    """A buffer whose message header cannot be right (errno EBADMSG)."""

    def __init__(self, detail: str):
        super().__init__(errno.EBADMSG, detail)


class Message(NamedTuple):
    """One message of a receive buffer: its header, and where it lies in ``data``."""

    data: bytes  # the whole buffer (not copied)
    offset: int  # of the header in ``data``
    length: int  # header + payload, without the padding after it
    type: int
    flags: int
    seq: int
    pid: int

    def __repr__(self) -> str:
        return (f"Message(type={self.type}, flags={self.flags:#x}, seq={self.seq}, pid={self.pid}, "
                f"offset={self.offset}, length={self.length})")

    @property
    def payload_offset(self) -> int:
        return self.offset + HEADER_SIZE

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def payload(self) -> bytes:
        return self.data[self.offset + HEADER_SIZE:self.offset + self.length]

    @property
    def raw(self) -> bytes:
        """The message itself, header included (what pyroute2's decoders take)."""
        return self.data[self.offset:self.offset + self.length]

    def error(self) -> int | None:
        """For an ``NLMSG_ERROR``: the errno (0: an acknowledgement). None for any other
        message, or one too short to carry the error."""
        if self.type != NLMSG_ERROR or self.length < HEADER_SIZE + _ERRNO.size:
            return None
        negative_errno: int = _ERRNO.unpack_from(self.data, self.offset + HEADER_SIZE)[0]
        return -negative_errno

    def attrs(self, header_size: int) -> Iterator[tuple[int, bytes]]:
        """The attributes after the family header (``header_size`` bytes: 12 for
        fib_rule_hdr, rtmsg and ndmsg, 8 for ifaddrmsg, 16 for ifinfomsg)."""
        return attrs(self.data, self.offset + HEADER_SIZE + header_size, self.offset + self.length)

    def attr_map(self, header_size: int) -> dict[int, bytes]:
        """:meth:`attrs` as type -> payload (the last of a repeated type)."""
        return dict(self.attrs(header_size))


_new_message = tuple.__new__  # a Message per message of a route dump: the cheapest way to make one


def messages(data: bytes, *, strict: bool = False) -> Iterator[Message]:
    """The messages of a receive buffer, in order.

    A header that cannot be right (shorter than a header, or longer than what is left
    of the buffer) ends the walk: nothing after it can be found. With ``strict`` that
    raises :class:`MalformedMessage` instead (after the messages before it)."""
    off, size = 0, len(data)
    while off + HEADER_SIZE <= size:
        length, mtype, flags, seq, pid = HEADER.unpack_from(data, off)
        if length < HEADER_SIZE or off + length > size:
            if strict:
                raise MalformedMessage(f"netlink message of length {length}")
            return
        yield _new_message(Message, (data, off, length, mtype, flags, seq, pid))
        off += align(length)


def attrs(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each attribute in ``data[start:end]``; the type without the
    nested / byte-order flags. An attribute that cannot be right ends the walk."""
    stop = len(data) if end is None else min(end, len(data))
    a = start
    while a + ATTR_HEADER.size <= stop:
        alen, atype = ATTR_HEADER.unpack_from(data, a)
        if alen < ATTR_HEADER.size or a + alen > stop:
            return
        yield atype & NLA_TYPE_MASK, data[a + ATTR_HEADER.size:a + alen]
        a += align(alen)


def parse_acks(data: bytes) -> dict[int, int]:
    """Sequence number -> errno (0: done) of the ``NLMSG_ERROR`` messages in ``data``."""
    out: dict[int, int] = {}
    for msg in messages(data):
        err = msg.error()
        if err is not None:
            out[msg.seq] = err
    return out


def encode(msg_type: int, flags: int, seq: int, payload: bytes = b"", pid: int = 0) -> bytes:
    """One message: the header, ``payload``, and the padding to 4 bytes (so that
    encoded messages can be joined into one ``send``)."""
    length = HEADER_SIZE + len(payload)
    return HEADER.pack(length, msg_type, flags, seq, pid) + payload + b"\0" * (align(length) - length)


def encode_attr(attr_type: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = ATTR_HEADER.size + len(payload)
    return ATTR_HEADER.pack(length, attr_type) + payload + b"\0" * (align(length) - length)
