"""``dataeff shard out=s3://…`` (or ``gs://``): shard into a local staging folder, upload as it goes.

:func:`dataeff.data.shard.main` writes into the staging folder exactly as into any output
folder; each tar it finishes (renamed into place, then journalled) is uploaded, then its
journal, and the local tar is cut to a sparse file of the same size, so staging holds
about one shard of data whatever the size of the set. At the end the index, the resolved
config and ``summary.json`` (last: its presence marks the remote set complete) are
uploaded, and the remote journals and stale tars of an earlier run are removed.

Resume is as local: the remote folder is the record. A new run first mirrors it into a
fresh staging folder (summary, index and journals downloaded; each journalled tar
that is present remotely with its journalled size becomes a sparse placeholder), then
``shard.main`` resumes after the last uploaded shard or skips a complete set. The staging
folder is ``$DATAEFF_STAGING_DIR/<hash of the URL>`` (default: the system temp folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dataeff.config import ConfigError
from dataeff.constants import CONFIG_NAME, INDEX_NAME, SUMMARY_NAME
from dataeff.data import remote, shard
from dataeff.data.shard import ShardConfig
from dataeff.files import save_resolved, write_json_atomic

_PARTS = ".parts"  # shard.py's journal folder


def staging_dir(url: str) -> Path:
    """The local folder a remote shard set is written through."""
    root = Path(os.environ.get("DATAEFF_STAGING_DIR") or Path(tempfile.gettempdir()) / "dataeff-staging")
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


def _sparse(path: Path, size: int) -> None:
    """Make ``path`` a file of ``size`` bytes that takes no disk space (its data is remote)."""
    with open(path, "wb") as fh:
        fh.truncate(size)


def placeholder_intact(staging: Path, info: dict) -> bool:
    """A finished tar in staging is a placeholder of its journalled size (``mirror`` checked the remote size)."""
    tar = staging / info["file"]
    return tar.is_file() and tar.stat().st_size == info["bytes"]


def mirror(url: str, name: str, staging: Path) -> None:
    """Rebuild ``staging`` from what ``url`` holds: completed outputs and the uploaded, journalled shards."""
    shutil.rmtree(staging, ignore_errors=True)
    (staging / _PARTS).mkdir(parents=True)
    top = remote.list_names(url) or []
    for fname in (SUMMARY_NAME, INDEX_NAME):
        if fname in top:
            (staging / fname).write_bytes(remote.read_bytes(remote.join(url, fname)))
    if SUMMARY_NAME in top:  # a finished set: its tars stand in as placeholders where the remote size matches
        for info in json.loads((staging / SUMMARY_NAME).read_text()).get("shards", []):
            if info["file"] in top and remote.size(remote.join(url, info["file"])) == info["bytes"]:
                _sparse(staging / info["file"], info["bytes"])
    parts = remote.list_names(remote.join(url, _PARTS)) or []
    if "plan.json" in parts:
        (staging / _PARTS / "plan.json").write_bytes(remote.read_bytes(remote.join(url, _PARTS, "plan.json")))
    for journal in parts:
        tar = journal.removesuffix(".json")
        if not (tar.startswith(name + "-") and tar.endswith(".tar")) or tar not in top:
            continue
        data = remote.read_bytes(remote.join(url, _PARTS, journal))
        expected = json.loads(data)["shard"]["bytes"]
        if remote.size(remote.join(url, tar)) == expected:
            (staging / _PARTS / journal).write_bytes(data)
            _sparse(staging / tar, expected)


class Uploader:
    """Uploads each finished shard of a staging folder, then the closing files."""

    def __init__(self, url: str, staging: Path) -> None:
        self.url, self.staging, self.started = url, staging, False

    def _start(self) -> None:
        """Before the first new tar: the remote set is no longer complete, and its plan must be there."""
        if self.started:
            return
        self.started = True
        remote.remove(remote.join(self.url, SUMMARY_NAME))
        remote.upload(self.staging / _PARTS / "plan.json", remote.join(self.url, _PARTS, "plan.json"))

    def shard_done(self, tar: Path) -> None:
        """Upload a finished tar, then its journal; keep only a sparse placeholder locally."""
        self._start()
        size = tar.stat().st_size
        remote.upload(tar, remote.join(self.url, tar.name))
        journal = self.staging / _PARTS / (tar.name + ".json")
        remote.upload(journal, remote.join(self.url, _PARTS, journal.name))
        _sparse(tar, size)

    def finish(self, cfg: ShardConfig, summary: dict) -> None:
        """Upload index, config and summary (last); drop remote journals and tars the summary does not list."""
        summary["config"]["out"] = self.url
        write_json_atomic(self.staging / SUMMARY_NAME, summary, indent=1, sort_keys=True)
        save_resolved(cfg, self.staging)
        remote.remove(remote.join(self.url, SUMMARY_NAME))
        for fname in (INDEX_NAME, CONFIG_NAME, SUMMARY_NAME):
            remote.upload(self.staging / fname, remote.join(self.url, fname))
        keep = {s["file"] for s in summary["shards"]}
        name = summary["name"]
        for fname in remote.list_names(self.url) or []:
            if fname.startswith(name + "-") and fname.endswith(".tar") and fname not in keep:
                remote.remove(remote.join(self.url, fname))
        for fname in remote.list_names(remote.join(self.url, _PARTS)) or []:
            remote.remove(remote.join(self.url, _PARTS, fname))


def main(cfg: ShardConfig) -> dict:
    """``dataeff shard``: :func:`dataeff.data.shard.main` for a local ``out``, through staging for a URL.

    Raises:
        ConfigError: as ``shard.main`` (naming the URL), or an ``out`` URL that cannot be written.
    """
    if not remote.is_url(cfg.out):
        return shard.main(cfg)
    url = cfg.out.rstrip("/")
    remote.check_writable(url)
    name = cfg.name or remote.basename(url)
    staging = staging_dir(url)
    mirror(url, name, staging)
    uploader = Uploader(url, staging)
    try:
        summary = shard.main(
            dataclasses.replace(cfg, out=str(staging), name=name),
            on_shard=uploader.shard_done,
            intact=placeholder_intact,
        )
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(staging), url)) from None
    uploader.finish(cfg, summary)
    shutil.rmtree(staging, ignore_errors=True)
    return summary
