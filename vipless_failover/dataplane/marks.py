"""MarkTable: the daemon's own nftables table (``inet vipless_failover``) that sets fwmarks.

The ``nft`` binary is driven through a subprocess: ``nft -f -`` with a script that
deletes and redefines the whole table in one batch (one kernel transaction, so the
table is replaced whole or not at all), and ``nft list table`` to read it back. That
is clearer than hand-built nfnetlink messages and uses the kernel's own syntax, which
is also what an operator reads. Only the table named ``name`` in family ``inet`` is
ever listed, replaced or deleted.

Recognizing our table: the table carries ``comment "vipless-failover <digest>"``
(digest of the desired table) and each rule ``comment "vf <group> <digest of rule>"``.
``inspect_listing`` checks the chain header, the number and order of rule comments and
that no foreign rule or chain was added, so a flushed, edited or deleted table is seen
as drift and replaced. Within one process the canonical listing after our own apply
is also remembered and compared, which catches in-place edits that kept the comments.

In a network namespace (``netns``), commands run under ``ip netns exec NETNS``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass

from ..aio import within
from .desired import NFT_CHAIN, NFT_TABLE, ActualMarks, MarkTableSpec

CHAIN_HEADER = "type filter hook prerouting priority mangle; policy accept;"
NFT_TIMEOUT_S = 10.0


class MarkTableError(Exception):
    """nftables is unusable or refused our table; the message says why."""


@dataclass(frozen=True)
class Listing:
    """``nft list table`` text, parsed just enough to recognize our table."""

    comment: str | None
    chains: tuple[tuple[str, tuple[str, ...]], ...]  # (name, header lines)
    rules: tuple[tuple[str, str | None], ...]  # (chain, rule comment or None)


_COMMENT_RE = re.compile(r'\scomment "([^"]*)"\s*$')


def parse_listing(text: str) -> Listing:
    comment: str | None = None
    chains: list[tuple[str, list[str]]] = []
    rules: list[tuple[str, str | None]] = []
    depth = 0
    chain: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.endswith("{") and depth == 0:
            depth = 1
            continue
        if depth == 1:
            if line.startswith("comment "):
                comment = line[len("comment "):].strip().strip('"')
                continue
            m = re.match(r"^(chain|set|map|flowtable|counter|quota|limit|ct|secmark|synproxy)\s+(\S+)\s*\{$", line)
            if m:
                depth = 2
                chain = f"{m.group(1)} {m.group(2)}" if m.group(1) != "chain" else m.group(2)
                chains.append((chain, []))
                continue
            if line == "}":
                depth = 0
            continue
        if depth == 2:
            if line == "}":
                depth, chain = 1, None
                continue
            assert chain is not None
            if line.startswith("type ") or line.startswith("policy ") or line.startswith("comment "):
                chains[-1][1].append(line)
                continue
            m = _COMMENT_RE.search(line)
            rules.append((chain, m.group(1) if m else None))
    return Listing(comment=comment, chains=tuple((n, tuple(h)) for n, h in chains), rules=tuple(rules))


def inspect_listing(text: str | None, desired: MarkTableSpec | None) -> ActualMarks:
    """Compare a listing (None: table absent) with the desired table."""
    if text is None:
        return ActualMarks(exists=False)
    listing = parse_listing(text)
    digest = None
    if listing.comment and listing.comment.startswith("vipless-failover "):
        digest = listing.comment.split(" ", 1)[1]
    intact = False
    if desired is not None and digest == desired.digest:
        intact = (
            listing.chains == ((NFT_CHAIN, (CHAIN_HEADER,)),)
            and [c for _, c in listing.rules] == [r.comment() for r in desired.rules]
        )
    return ActualMarks(exists=True, digest=digest, intact=intact, rule_count=len(listing.rules))


class MarkTable:
    """Reads, replaces and deletes the table ``inet <name>`` and nothing else."""

    def __init__(self, name: str = NFT_TABLE, netns: str | None = None, nft: str = "nft"):
        self.name = name
        self.netns = netns
        self.nft = nft
        self._baseline: dict[str, str] = {}  # digest -> canonical listing after our apply

    def _argv(self, *args: str) -> list[str]:
        binary = shutil.which(self.nft)
        if binary is None:
            raise MarkTableError(f"nftables unusable: {self.nft!r} not found in PATH (install the nftables package)")
        argv = [binary, *args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    async def _run(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self._argv(*args),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await within(
                proc.communicate(stdin.encode() if stdin is not None else None), NFT_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def listing(self) -> str | None:
        """The table's text as ``nft list table`` prints it; None if it does not exist."""
        rc, out, err = await self._run("list", "table", "inet", self.name)
        if rc == 0:
            return out
        if "No such file or directory" in err:
            return None
        raise MarkTableError(f"nft list table inet {self.name} failed: {_first_line(err)}")

    async def read(self, desired: MarkTableSpec | None) -> ActualMarks:
        text = await self.listing()
        actual = inspect_listing(text, desired)
        if actual.intact and desired is not None and text is not None:
            base = self._baseline.get(desired.digest)
            if base is None:
                self._baseline[desired.digest] = text  # adopted: remember what "right" looks like
            elif base != text:
                actual = ActualMarks(exists=True, digest=actual.digest, intact=False, rule_count=actual.rule_count)
        return actual

    async def replace(self, spec: MarkTableSpec) -> None:
        """Delete-and-define the whole table in one transaction."""
        rc, _, err = await self._run("-f", "-", stdin=spec.script())
        if rc != 0:
            raise MarkTableError(f"the kernel refused nft table inet {self.name}: {_first_line(err)}")
        text = await self.listing()
        if text is not None:
            self._baseline = {spec.digest: text}

    async def delete(self) -> None:
        """Delete the table if it exists (idempotent, one batch)."""
        script = f"table inet {self.name}\ndelete table inet {self.name}\n"
        rc, _, err = await self._run("-f", "-", stdin=script)
        if rc != 0:
            raise MarkTableError(f"nft delete table inet {self.name} failed: {_first_line(err)}")
        self._baseline = {}


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "no error output"
