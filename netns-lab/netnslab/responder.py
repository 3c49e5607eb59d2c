"""The director's local responder: answers every request with the director's name.

Runs inside a director namespace. Binds UDP and TCP on 0.0.0.0 and :: with
IP_TRANSPARENT / IPV6_TRANSPARENT: the director holds no VIP on any interface, so the
kernel only lets a transparent socket send from a VIP. The kernel delivers VIP packets
to these sockets only while the delivery rules (``ip rule ... table T`` +
``local 0/0 dev lo table T``) are installed.

UDP: the reply goes out from the address the request was sent to (IP_PKTINFO /
IPV6_RECVPKTINFO on receive, the same ancillary data on sendmsg).
TCP: reads one line (bounded, with a timeout) and answers it, then closes.

Reply: ``<name> <request>`` (the request echoed, so the prober matches replies to probes).

    python -m netnslab.responder --name director-a --port 7 [--lifetime 3600]
"""

from __future__ import annotations

import argparse
import ipaddress
import selectors
import signal
import socket
import struct
import sys
import time

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
MAX_REQUEST = 512
TCP_READ_TIMEOUT_S = 2.0
MAX_TCP_CLIENTS = 256


def udp_socket(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", port))
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        s.bind(("::", port))
    s.setblocking(False)
    return s


def tcp_socket(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind(("0.0.0.0", port))
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        s.bind(("::", port))
    s.listen(128)
    s.setblocking(False)
    return s


def local_address(family: int, ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address of a received datagram, from its pktinfo."""
    for level, kind, data in ancdata:
        if family == socket.AF_INET and level == socket.SOL_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return str(ipaddress.IPv4Address(data[8:12]))
        if family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return str(ipaddress.IPv6Address(data[:16]))
    return None


def reply_ancdata(family: int, src: str) -> list[tuple[int, int, bytes]]:
    if family == socket.AF_INET:
        return [(socket.SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, ipaddress.IPv4Address(src).packed,
                                                        b"\0" * 4))]
    return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, ipaddress.IPv6Address(src).packed + struct.pack("=I", 0))]


def reply(name: str, request: bytes) -> bytes:
    return name.encode() + b" " + request.strip()[:MAX_REQUEST]


class Responder:
    def __init__(self, name: str, port: int):
        self.name = name
        self.sel = selectors.DefaultSelector()
        self.udp = [udp_socket(socket.AF_INET, port), udp_socket(socket.AF_INET6, port)]
        self.tcp = [tcp_socket(socket.AF_INET, port), tcp_socket(socket.AF_INET6, port)]
        self.conns: dict[socket.socket, tuple[float, bytes]] = {}
        for s in self.udp:
            self.sel.register(s, selectors.EVENT_READ, "udp")
        for s in self.tcp:
            self.sel.register(s, selectors.EVENT_READ, "listen")
        self.udp_answered = 0
        self.tcp_answered = 0

    def handle_udp(self, s: socket.socket) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, peer = s.recvmsg(2048, 256)
            except BlockingIOError:
                return
            src = local_address(s.family, anc)
            out = reply(self.name, data)
            try:
                if src is not None:
                    s.sendmsg([out], reply_ancdata(s.family, src), 0, peer)
                else:
                    s.sendto(out, peer)
                self.udp_answered += 1
            except OSError as exc:
                print(f"udp reply to {peer} from {src}: {exc}", file=sys.stderr, flush=True)

    def handle_accept(self, s: socket.socket) -> None:
        try:
            conn, _peer = s.accept()
        except BlockingIOError:
            return
        if len(self.conns) >= MAX_TCP_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        self.conns[conn] = (time.monotonic(), b"")
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def handle_conn(self, conn: socket.socket) -> None:
        started, buf = self.conns[conn]
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\n" not in buf and len(buf) < MAX_REQUEST:
            self.conns[conn] = (started, buf)
            return
        if buf:
            try:
                conn.sendall(reply(self.name, buf) + b"\n")
                self.tcp_answered += 1
            except OSError:
                pass
        self.close(conn)

    def close(self, conn: socket.socket) -> None:
        self.conns.pop(conn, None)
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def serve(self, lifetime_s: float) -> None:
        stop = False

        def on_signal(_signum: int, _frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        end = time.monotonic() + lifetime_s
        print(f"{self.name}: listening on UDP+TCP port {self.udp[0].getsockname()[1]}", flush=True)
        while not stop and time.monotonic() < end:
            for key, _ev in self.sel.select(timeout=0.5):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if key.data == "udp":
                    self.handle_udp(s)
                elif key.data == "listen":
                    self.handle_accept(s)
                else:
                    self.handle_conn(s)
            now = time.monotonic()
            for conn, (started, _buf) in list(self.conns.items()):
                if now - started > TCP_READ_TIMEOUT_S:
                    self.close(conn)
        print(f"{self.name}: stopped; answered udp={self.udp_answered} tcp={self.tcp_answered}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netnslab.responder", description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=7)
    ap.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    args = ap.parse_args(argv)
    Responder(args.name, args.port).serve(args.lifetime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
