"""failoverctl: talk to a running vipless-failoverd over its control socket.

Exit status: 0 ok, 1 refused or failed, 2 usage, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import config as config_mod, keygen
from .control import Refused, Unreachable, UsageError, check_timeout, request

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_CONFIG = "/etc/vipless-failover/vipless-failover.toml"
DEFAULT_SOCKET = "/run/vipless-failover/control.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="failoverctl",
        description="Control a running vipless-failoverd.",
        epilog="Exit status: 0 ok, 1 refused or failed, 2 usage, 3 daemon not reachable.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="FILE",
                       help=f"daemon config; its [control] socket is used (default {DEFAULT_CONFIG} "
                            f"if it exists, else {DEFAULT_SOCKET})")
    where.add_argument("-s", "--socket", metavar="PATH", help="control socket path")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the daemon's JSON answer")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="role, priority, master, peers, kernel objects, transitions")
    for name, text in (("promote", "make this node master now (lossless hand-over)"),
                       ("demote", "hand mastership to the best live backup")):
        sp = sub.add_parser(name, parents=[common], help=text)
        sp.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="give up waiting after this long (default 10)")
    mp = sub.add_parser("maintenance", parents=[common], help="stay backup (a master hands over first)")
    mp.add_argument("mode", choices=("on", "off"))
    mp.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS")
    sub.add_parser("reload", parents=[common], help="re-read the config and apply the difference (like SIGHUP)")
    sub.add_parser("announce", parents=[common], help="send the announcement burst again now (master only)")
    sub.add_parser("restart", parents=[common], help="restart the daemon in place without failover")
    kp = sub.add_parser("keygen", help="write a new cluster key file (needs no config and no daemon)",
                        description="Write 32 random bytes as 64 hex characters to FILE, mode 0600, "
                                    "then copy the same file to every director.")
    kp.add_argument("file", nargs="?", default=keygen.DEFAULT_KEY_FILE, metavar="FILE",
                    help=f"key file to create (default {keygen.DEFAULT_KEY_FILE})")
    kp.add_argument("--force", action="store_true", help="replace an existing file (atomically)")
    return p


def socket_path(args: argparse.Namespace) -> Path:
    """-s, else the config's [control] socket. A config that does not validate (the
    daemon is still running the last good one) still names its socket when its TOML
    can be read; otherwise the default socket is used. Either way with a warning."""
    if args.socket:
        return Path(args.socket)
    cfg_path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    if cfg_path is None:
        return Path(DEFAULT_SOCKET)
    try:
        return config_mod.load(cfg_path).control.socket
    except config_mod.ConfigError as exc:
        hint = config_mod.control_socket_hint(cfg_path)
        path = hint or Path(DEFAULT_SOCKET)
        print(f"failoverctl: warning: {exc}; using {'its [control] socket' if hint else 'the default socket'} "
              f"{path}", file=sys.stderr)
        return path


def _seconds(text: str) -> float:
    try:
        return check_timeout(float(text))
    except ValueError as exc:  # UsageError too
        raise argparse.ArgumentTypeError(str(exc).removeprefix("timeout: ") if isinstance(exc, UsageError)
                                         else f"not a number of seconds: {text!r}") from None


def _ago(at: float | None) -> str:
    if not at:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))} ({time.time() - at:.1f}s ago)"


def format_status(st: dict[str, Any]) -> str:
    lines = []
    state = st["state"] + (" (draining)" if st.get("draining") else "")
    if st.get("maintenance"):
        state += " [maintenance]"
    rows = [
        ("node", f"{st['node']} ({st['address']})"),
        ("state", state),
        ("priority", f"{st['priority']} (effective {st['effective_priority']})"
                     + ("" if st.get("preempt") else ", no preempt")),
    ]
    m = st.get("master")
    rows.append(("master", f"{m['node']} ({m['address']}, priority {m['priority']})" if m else "none known"))
    lt = st.get("last_transition")
    rows.append(("last transition", f"{lt['from']} -> {lt['to']} ({lt['reason']}) at {_ago(lt['at'])}"
                 if lt else "-"))
    if st.get("faults"):
        rows.append(("faults", ", ".join(st["faults"])))
    dp = st.get("dataplane") or {}
    objs = dp.get("objects") or {}
    rows.append(("delivery", "installed" if dp.get("delivery") else "withdrawn"))
    rows.append(("kernel objects", ", ".join(f"{k} {v}" for k, v in objs.items()) or "-"))
    rows.append(("ipvs", "available" if st.get("ipvs_available") else "NOT available in this kernel"))
    ann = st.get("announce") or {}
    if ann:
        sent = ", ".join(f"{k} {v}" for k, v in (ann.get("announcements_sent") or {}).items())
        rows.append(("announce", f"{ann.get('mode')}, {ann.get('vips', 0)} VIPs, "
                                 f"{'announcing' if ann.get('announcing') else 'silent'}; sent: {sent}"))
    adv = st.get("adverts") or {}
    rej = ", ".join(f"{k} {v}" for k, v in (adv.get("rejected") or {}).items()) or "none"
    rows.append(("adverts", f"sent {adv.get('sent', 0)}, received {adv.get('received', 0)}, rejected: {rej}"))
    keys = st.get("keys")
    if keys:
        text = f"signing {keys['signing']}"
        if keys.get("accepted"):
            text += f", also accepting {', '.join(keys['accepted'])}"
        behind = [f"{node} ({how.split(':', 1)[1]})" for node, how in (keys.get("peers") or {}).items()
                  if how != "signing"]
        if behind:
            text += f"; peers still signing with an accepted key: {', '.join(behind)}"
        window = keys.get("replay_window_ms")
        text += f"; replay window {window / 1000:g} s" if window else "; replay window off"
        rows.append(("keys", text))
    sch = st.get("scheduling")
    if sch:
        text = sch["policy"] + (f" {sch['priority']}" if sch.get("realtime") else "")
        if sch.get("at_risk"):
            text += (f" (not real-time: adverts shorter than {sch['advised_below_ms']} ms need it, or a busy CPU "
                     f"can cause false failovers; see docs/operations.md)")
        rows.append(("scheduling", text))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    peers = st.get("peers") or []
    lines.append("")
    lines.append("PEER            ADDRESS                  STATE   PRIO  LAST SEEN  CONFIG")
    for p in peers:
        lines.append(f"{p['node']:<15} {p['address']:<24} {p['state']:<7} {p['priority']:>4}  "
                     f"{p['last_seen_s']:>8.3f}s  {'same' if p['config_match'] else 'DIFFERS'}")
    if not peers:
        lines.append("(no peer heard)")
    tracked = st.get("tracked") or []
    if tracked:
        lines.append("")
        lines.append("TRACKED                    STATE    EFFECT        DETAIL")
        for t in tracked:
            lines.append(f"{t['name']:<26} {t['state']:<8} {t.get('effect', ''):<13} {t.get('detail', '')}".rstrip())
    hist = st.get("transitions") or []
    if hist:
        lines.append("")
        lines.append("RECENT TRANSITIONS")
        for t in hist[-5:]:
            lines.append(f"  {_ago(t['at'])}  {t['from']} -> {t['to']}  {t['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    if args.command == "keygen":
        return keygen.main(args.file, force=args.force)
    try:
        path = socket_path(args)
    except config_mod.ConfigError as exc:
        print(f"failoverctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    req: dict[str, Any] = {"cmd": args.command}
    timeout = 5.0
    if args.command in ("promote", "demote", "maintenance"):
        req["timeout"] = args.timeout
        timeout = args.timeout + 5.0
    if args.command == "maintenance":
        req["on"] = args.mode == "on"
    try:
        resp = request(path, req, timeout=timeout)
    except Unreachable as exc:
        print(f"failoverctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Refused as exc:
        print(f"failoverctl: {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(resp.get("data") if resp.get("ok") else resp, indent=2, sort_keys=True))
    elif resp.get("ok"):
        if args.command == "status":
            print(format_status(resp["data"]))
        else:
            data = resp.get("data") or {}
            print(f"{args.command}: ok" + (f" ({', '.join(f'{k}={v}' for k, v in data.items())})" if data else ""))
    if not resp.get("ok"):
        if not args.json:
            print(f"failoverctl: {args.command}: {resp.get('error')}", file=sys.stderr)
        return EXIT_USAGE if resp.get("usage") else EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
