"""What the files under ``contrib/`` ask of the daemon's metrics, for the unit test
(``tests/unit/test_contrib.py``) and the lab test (``tests/lab/test_contrib_lab.py``):
the PromQL expressions of the alert rules and of the Grafana dashboard, and the
``vipless_failover_*`` metric names they use (one extractor for both tests).

The rule files are read line by line (no YAML library is a dependency): they are
plain block YAML that ``promtool check rules`` validates, and the unit test checks
that this reader finds as many rules as promtool does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
RULES = CONTRIB / "prometheus" / "vipless-failover.rules.yml"
RULES_TEST = CONTRIB / "prometheus" / "vipless-failover.rules.test.yml"
DASHBOARD = CONTRIB / "grafana" / "vipless-failover.json"

METRIC_RE = re.compile(r"\bvipless_failover_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """``vipless_failover_*`` metric names in a PromQL expression (label names and
    values never start with the prefix)."""
    return set(METRIC_RE.findall(expr))


# ---------------------------------------------------------------------------
# rule files


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _scalar(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def yaml_values(text: str, key: str) -> list[str]:
    """Every value of ``key:`` in block YAML: an inline scalar, or a ``|`` / ``>``
    block scalar (its lines joined with newlines, folded ones with spaces)."""
    lines = text.splitlines()
    pat = re.compile(rf"^(\s*)(?:- )?{re.escape(key)}:(.*)$")
    out = []
    for i, line in enumerate(lines):
        m = pat.match(line)
        if not m:
            continue
        rest = m.group(2).split(" #", 1)[0].strip()
        if rest and rest[0] in "|>":
            base = _indent(line)
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and _indent(nxt) <= base:
                    break
                block.append(nxt.strip())
            sep = " " if rest[0] == ">" else "\n"
            out.append(sep.join(b for b in block if b).strip())
        else:
            out.append(_scalar(rest))
    return out


def alert_blocks(text: str = "") -> dict[str, str]:
    """alert name -> its text in the rules file (up to the next rule)."""
    text = text or RULES.read_text()
    blocks: dict[str, str] = {}
    parts = re.split(r"(?m)^(?=[ \t]*- (?:alert|record):)", text)
    for part in parts[1:]:
        m = re.match(r"\s*- (alert|record):\s*(\S+)", part)
        assert m, part[:80]
        if m.group(1) == "alert":
            assert m.group(2) not in blocks, f"alert {m.group(2)} defined twice"
            blocks[m.group(2)] = part
    return blocks


def rule_exprs() -> dict[str, str]:
    """alert name -> expression."""
    out = {}
    for name, block in alert_blocks().items():
        exprs = yaml_values(block, "expr")
        assert len(exprs) == 1, f"{name}: {exprs}"
        out[name] = exprs[0]
    return out


def rule_test_cases(text: str = "") -> list[tuple[str, bool]]:
    """(alertname, fires) for every ``alert_rule_test`` item of the promtool test file:
    ``fires`` is False for ``exp_alerts: []``."""
    text = text or RULES_TEST.read_text()
    cases = []
    for chunk in re.split(r"(?m)^(?=[ \t]*- (?:eval_time|interval):)", text):
        if not re.match(r"\s*- eval_time:", chunk):
            continue
        names = yaml_values(chunk, "alertname")
        assert len(names) == 1, chunk
        m = re.search(r"(?m)^\s*exp_alerts:(.*)$", chunk)
        silent = m is None or m.group(1).split("#", 1)[0].strip() == "[]"
        cases.append((names[0], not silent))
    return cases


# ---------------------------------------------------------------------------
# dashboard


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    stack = list((dashboard or load_dashboard()).get("panels", []))
    while stack:
        p = stack.pop(0)
        yield p
        stack.extend(p.get("panels") or [])


def dashboard_exprs(dashboard: dict[str, Any] | None = None) -> list[str]:
    """The expressions of every panel target and every query variable."""
    dashboard = dashboard or load_dashboard()
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets") or [] if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            exprs.append(q.get("query", "") if isinstance(q, dict) else str(q))
    return exprs


def referenced_metric_names() -> set[str]:
    """Every ``vipless_failover_*`` name that the rules or the dashboard use."""
    names: set[str] = set()
    for expr in [*rule_exprs().values(), *dashboard_exprs()]:
        names |= metric_names(expr)
    return names
