"""Run ``dataeff`` and SIGKILL its whole process group at the k-th file commit: seeded, exact kill points.

Every output a stage writes reaches its final name through ``os.replace`` (atomic writes,
finished tars), so the commits are the points where a kill can leave a different state
behind. This wrapper counts them and kills the job (its process group: shard workers and
loader workers die with it, as under a scheduler) just before or just after commit ``k``.
With ``k = 0`` it kills nothing and logs every commit's target path, one JSON string a
line, so a test can pick its seeded points among the commits of a clean run.

Usage::

    python -m tests.faults.kill_points <k> <before|after> <log file or ''> <dataeff arguments...>
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def install(kill_at: int, when: str, log_path: str) -> Callable[[], None]:
    """Replace ``os.replace`` by a counting one that kills the process group at commit ``kill_at``.

    Returns:
        a function that puts the real ``os.replace`` back (for a clean run in-process).
    """
    real = os.replace
    count = 0

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal count
        count += 1
        if log_path:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(os.fsdecode(dst)) + "\n")
        if count == kill_at and when == "before":
            os.killpg(0, signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if count == kill_at and when == "after":
            os.killpg(0, signal.SIGKILL)

    os.replace = replace

    def restore() -> None:
        os.replace = real

    return restore


if __name__ == "__main__":
    kill_at, when, log_path, *arguments = sys.argv[1:]
    install(int(kill_at), when, log_path)
    from dataeff.cli import main

    sys.exit(main(arguments))
