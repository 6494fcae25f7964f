"""Fault tests run stages in-process through ``dataeff.cli.main`` and read what they print."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def fresh_log_handler() -> Iterator[None]:
    """Drop dataeff's log handler around each test, so ``cli.main`` makes one on this test's stderr.

    The handler keeps the stream it was made with; pytest closes each test's captured
    stream, and a later test's log lines would end as "Logging error" tracebacks.
    """
    log = logging.getLogger("dataeff")
    for handler in [h for h in log.handlers if getattr(h, "_dataeff", False)]:
        log.removeHandler(handler)
    yield
    for handler in [h for h in log.handlers if getattr(h, "_dataeff", False)]:
        log.removeHandler(handler)
