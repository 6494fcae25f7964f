"""Locations of shard sets, selections and embeddings: local paths or object-storage URLs.

A location is a local path or a URL ``s3://``, ``gs://`` (``gcs://``), ``http://`` or
``https://``; URLs go through fsspec (s3fs and gcsfs are the ``s3`` / ``gcs`` extras,
HTTP needs only aiohttp). Credentials and endpoints come from each backend's usual
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
...) or from fsspec's own configuration (``FSSPEC_S3_*`` variables, ``~/.config/fsspec``):
dataeff adds no setting of its own.

Every remote read is retried on a transient failure (connection reset, timeout, HTTP
408/429/5xx, short read) with exponential backoff; a permanent one (missing object,
access denied, other 4xx) fails at once with :class:`RemoteInputError`, an input error
(exit 2) naming the URL. Local paths take the plain file-system calls, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from dataeff.config import ConfigError

log = logging.getLogger("dataeff")

SCHEMES = ("s3", "gs", "gcs", "http", "https")
#: Attempts per remote call (the first try included) and the first backoff, doubled per retry.
ATTEMPTS = 5
BACKOFF_S = 0.5
#: HTTP statuses worth another try: request timeout, too many requests, server-side errors.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Read size of a sequential remote stream (whole-tar scans): one request per block.
STREAM_BLOCK = 16 * 2**20

T = TypeVar("T")


class RemoteInputError(ConfigError):
    """A URL that cannot be read for good (missing, forbidden, malformed): an input error."""


class RemoteUnavailable(OSError):
    """A URL that kept failing with transient errors after every retry."""


def is_url(location: str | os.PathLike) -> bool:
    """True for ``s3://``, ``gs://``, ``gcs://``, ``http://`` and ``https://`` locations."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for a URL or a local path (a URL keeps its ``//``)."""
    if is_url(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return str(Path(base).joinpath(*names))


def parent(location: str | os.PathLike) -> str:
    """The folder holding ``location``."""
    if is_url(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def basename(location: str | os.PathLike) -> str:
    """The last component of ``location``."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


_S3_SESSIONS: dict[tuple, Any] = {}


def _options(protocol: str) -> dict[str, Any]:
    """Extra arguments of a protocol's file system: S3 shares one botocore session per AWS environment.

    fsspec drops its instances in a forked DataLoader worker; a new S3 client built from the
    session the parent already used skips re-reading botocore's service models, which halves
    a worker's first request (about 0.5 s -> 0.25 s on loopback), paid again every epoch.
    """
    if protocol != "s3":
        return {}
    from aiobotocore.session import AioSession

    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    if env not in _S3_SESSIONS:
        _S3_SESSIONS[env] = AioSession()
    return {"session": _S3_SESSIONS[env]}


def filesystem(url: str) -> Any:
    """The fsspec file system of ``url`` (instances are cached by fsspec, and reset in forked workers)."""
    import fsspec

    protocol = url.partition("://")[0].lower()
    try:
        return fsspec.filesystem(protocol, **_options(protocol))
    except ImportError as exc:
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f"pip install 'dataeff[{extra}]'" if extra else "pip install aiohttp"
        raise RemoteInputError(f"{url}: no {protocol}:// support installed ({exc}); {hint}") from None


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: timeouts, dropped connections, HTTP 408/429/5xx, short reads."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return False
    status = _status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS
    return isinstance(exc, (OSError, TimeoutError, ConnectionError, EOFError)) or type(exc).__module__.startswith(
        ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests")
    )


def retrying(url: str, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried with exponential backoff while it fails transiently.

    Raises:
        RemoteInputError: a permanent failure (missing object, access denied, other 4xx).
        RemoteUnavailable: still failing after :data:`ATTEMPTS` tries.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except (RemoteInputError, RemoteUnavailable):
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".strip()
            if not is_transient(exc):
                kind = "not found" if isinstance(exc, FileNotFoundError) else "cannot be read"
                raise RemoteInputError(f"{url}: {kind} while trying to {what} ({reason})") from exc
            if attempt == ATTEMPTS:
                raise RemoteUnavailable(f"{url}: failed to {what} after {ATTEMPTS} attempts ({reason})") from exc
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: %s failed (%s); retry %d of %d in %.1f s", url, what, reason, attempt, ATTEMPTS - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- reading


class ShortRead(OSError):
    """Fewer bytes arrived than the range asked for (a dropped transfer): transient."""


_WHOLE_BODY_WARNED: set[str] = set()


def read_range(location: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file: one ranged request for a URL.

    A server that ignores ``Range`` (``python -m http.server`` does) answers with the
    whole file; its slice is returned and a warning says the set is then read whole.
    """
    if not is_url(location):
        with open(location, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    def fetch() -> bytes:
        data = filesystem(location).cat_file(location, start=start, end=end)
        if len(data) == end - start:
            return data
        if len(data) > end - start and len(data) >= end:  # the whole file: the server ignored Range
            host = location.split("/")[2]
            if host not in _WHOLE_BODY_WARNED:
                _WHOLE_BODY_WARNED.add(host)
                log.warning("%s ignores byte ranges: every read fetches the whole file", host)
            return bytes(data[start:end])
        raise ShortRead(f"{len(data)} of {end - start} bytes arrived")

    return retrying(location, f"read bytes {start}-{end}", fetch)


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file."""
    if not is_url(location):
        return Path(location).read_bytes()
    url = str(location)
    return retrying(url, "read it", lambda: filesystem(url).cat_file(url))


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def is_file(location: str | os.PathLike) -> bool:
    """True when ``location`` is an existing file (a retried metadata request for a URL)."""
    if not is_url(location):
        return Path(location).is_file()
    url = str(location)

    def probe() -> bool:
        fs = filesystem(url)
        fs.invalidate_cache(url)  # another process (or this one) may have written it since
        try:
            return bool(fs.isfile(url))
        except FileNotFoundError:
            return False

    return retrying(url, "look it up", probe)


def size(location: str | os.PathLike) -> int:
    """Size of a file in bytes."""
    if not is_url(location):
        return Path(location).stat().st_size
    url = str(location)
    fs = filesystem(url)
    fs.invalidate_cache(url)
    return int(retrying(url, "look up its size", lambda: fs.size(url)))


def list_names(folder: str | os.PathLike) -> list[str] | None:
    """Names of the files directly in ``folder``, sorted; None when the store cannot list (plain HTTP)."""
    if not is_url(folder):
        return sorted(p.name for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else []
    url = str(folder).rstrip("/")
    if url.partition("://")[0].lower() in ("http", "https"):
        return None
    fs = filesystem(url)

    def listing() -> list[str]:
        try:
            entries = fs.ls(url, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")

    return retrying(url, "list it", listing)


@contextlib.contextmanager
def open_stream(location: str, block_size: int = STREAM_BLOCK) -> Iterator[BinaryIO]:
    """A file opened for reading: a URL is fetched in requests of ``block_size`` bytes (read ahead)."""
    if not is_url(location):
        with open(location, "rb") as fh:
            yield fh
        return
    fs = filesystem(location)
    fh = retrying(location, "open it", lambda: fs.open(location, "rb", block_size=block_size, cache_type="readahead"))
    try:
        yield fh
    finally:
        fh.close()


# --------------------------------------------------------------------------- writing


def upload(local: str | os.PathLike, url: str) -> None:
    """Copy a local file to ``url`` (retried; an object store replaces it whole)."""
    fs = filesystem(url)
    retrying(url, "upload it", lambda: fs.put_file(str(local), url))


def remove(url: str) -> None:
    """Delete ``url`` if it exists."""
    fs = filesystem(url)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(url)

    retrying(url, "delete it", rm)


def check_writable(url: str) -> None:
    """Refuse a URL scheme that cannot be written (plain HTTP)."""
    if url.partition("://")[0].lower() in ("http", "https"):
        raise RemoteInputError(f"{url}: http(s) locations are read-only; write to a local path, s3:// or gs://")
