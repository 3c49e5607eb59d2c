"""Logging: structlog, JSON lines on stdout by default (journald keeps them), or a
human format (``--log-format console``). Every event has a stable name and fields."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(fmt: str = "json", level: str = "info") -> structlog.stdlib.BoundLogger:
    renderer = (structlog.processors.JSONRenderer(sort_keys=False) if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("vipless-failoverd")
