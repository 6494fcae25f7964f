"""Loopback object stores for tests: moto's S3 server and ``python -m http.server``.

Nothing leaves the machine: both listen on 127.0.0.1 at a free port. The S3 server runs
in this process (a thread), so its request log (:class:`RequestLog`) sees every request,
including those of DataLoader workers and of CLI subprocesses, which find the endpoint
through ``AWS_ENDPOINT_URL`` in the environment they inherit.

Usage::

    with s3_server() as s3:                       # bucket s3.bucket exists, env set
        s3.put_dir(local_dir, "pool")             # -> s3://<bucket>/pool/...
        n = len(s3.log.gets(".tar"))              # GET requests of tar objects so far
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class RequestLog(logging.Handler):
    """The request lines the server logged (``"GET /bucket/key HTTP/1.1" 206 -``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(_COLOUR.sub("", record.getMessage()))

    def gets(self, suffix: str) -> list[str]:
        """GET requests of object names ending in ``suffix``."""
        out = []
        for line in self.lines:
            parts = line.split('"')
            if len(parts) > 1 and parts[1].startswith("GET ") and parts[1].split()[1].split("?")[0].endswith(suffix):
                out.append(line)
        return out

    def clear(self) -> None:
        self.lines.clear()


@dataclass
class S3:
    endpoint: str
    bucket: str
    log: RequestLog
    env: dict[str, str] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint})

    def put_dir(self, local: Path, prefix: str) -> str:
        """Upload every file under ``local`` to ``s3://<bucket>/<prefix>/``; returns that URL."""
        fs = self.fs()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                fs.put_file(str(path), f"{self.bucket}/{prefix}/{path.relative_to(local).as_posix()}")
        return self.url(prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reset_fsspec() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_server(bucket: str = "dataeff-test") -> Iterator[S3]:
    """A moto S3 server on loopback with ``bucket`` created and the AWS variables set for it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    log = RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    saved_level = werkzeug.level
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(log)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        _reset_fsspec()
        store = S3(endpoint, bucket, log, env)
        store.fs().mkdir(bucket)
        try:
            yield store
        finally:
            _reset_fsspec()
            server.stop()
            werkzeug.removeHandler(log)
            werkzeug.setLevel(saved_level)


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """``python -m http.server`` serving ``root`` on loopback; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("python -m http.server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
