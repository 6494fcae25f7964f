"""What an output was made from, checked before a stage resumes into it or skips it.

Each stage writes ``<out>/provenance.json`` (format ``dataeff-provenance/1``) before its
first output file: its resolved config (flattened ``section.key`` values, without the
keys that change how a run goes but not what it writes) and the identities of its
inputs, each a content hash:

- a shard set: :func:`pool_identity`, over every ok sample's key, sha256 of its source
  bytes and stored length (two pools with the same relative paths but other pictures
  differ; the same pool copied elsewhere does not);
- an embeddings directory: its header without the run layout (:func:`embeddings_identity`);
- a selection: the sha256 of its ``selection.parquet``; a file (weights, a checkpoint):
  its sha256; a folder of files (a downstream dataset): a hash over their paths and sha256.

A later run into the same ``out`` compares its own record first (:func:`settle`): the same
record resumes or skips, another one is refused with one line naming the first config
key or input that differs and the ``overwrite=true`` way out; with ``overwrite=true`` the
stage's old output is removed first. Output without a record (an older dataeff) is
treated as made from something else.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dataeff.config import ConfigError
from dataeff.constants import (
    EMBEDDINGS_HEADER,
    INDEX_NAME,
    LOCK_NAME,
    PROVENANCE_FORMAT,
    PROVENANCE_NAME,
    SELECTION_NAME,
)
from dataeff.data import remote
from dataeff.files import file_sha256, read_json, write_json_atomic

log = logging.getLogger("dataeff")

#: Config keys (or ``prefix.`` sections) that change how a run goes, never what it writes.
RUN_ONLY = (
    "out", "overwrite", "resume", "run_name", "progress", "progress_bar", "workers", "chunksize",
    "keep_checkpoints", "data.num_workers", "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "panel_every_n_steps", "panel_images", "wandb.",
)  # fmt: skip


# --------------------------------------------------------------------------- identities


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_values(values: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """The flattened config without :data:`RUN_ONLY` keys and the ``skip`` keys (``prefix.`` = a section).

    A stage skips its inputs (compared by identity instead) and keys that only shape side
    outputs (select's gallery and audit).
    """
    dropped = (*RUN_ONLY, *skip)

    def kept(key: str) -> bool:
        return not any(key == r or (r.endswith(".") and key.startswith(r)) for r in dropped)

    return {k: v for k, v in flatten(values).items() if kept(k)}


def _shard_dirs(spec: str) -> list[str]:
    from dataeff.data.stream import list_shards

    dirs = dict.fromkeys(remote.parent(t) for t in list_shards(spec))
    return list(dirs)


@functools.lru_cache(maxsize=32)
def _index_identity(index: str, mtime_ns: int, size: int) -> str:
    """``mtime_ns`` and ``size`` only key the cache (an object store gives no mtime: 0)."""
    import pandas as pd

    source = io.BytesIO(remote.read_bytes(index)) if remote.is_url(index) else index
    frame = pd.read_parquet(source, columns=["key", "status", "sha256", "length"])
    ok = frame[frame["status"] == "ok"].sort_values("key", kind="stable")
    h = hashlib.sha256()
    for key, sha, length in zip(ok["key"], ok["sha256"], ok["length"], strict=True):
        h.update(f"{key}\t{sha}\t{length}\n".encode())
    return h.hexdigest()


def pool_identity(spec: str) -> str:
    """Content identity of the ok samples of a shard set (a directory, several by ',', a brace pattern).

    Raises:
        ValueError: the spec names no shards or a directory without ``index.parquet``.
    """
    parts = []
    for folder in _shard_dirs(spec):
        index = remote.join(folder, INDEX_NAME)
        if not remote.is_file(index):
            raise ValueError(f"no {INDEX_NAME} in {folder}")
        if remote.is_url(index):
            parts.append(_index_identity(index, 0, remote.size(index)))
        else:
            st = Path(index).stat()
            parts.append(_index_identity(os.fspath(Path(index).resolve()), st.st_mtime_ns, st.st_size))
    return parts[0] if len(parts) == 1 else digest(parts)


def embeddings_identity(emb_dir: str | os.PathLike) -> str:
    """Identity of a complete embeddings directory: its header without how the run was laid out."""
    path = remote.join(emb_dir, EMBEDDINGS_HEADER)
    header = json.loads(remote.read_text(path)) if remote.is_file(path) else {}
    return digest({k: v for k, v in header.items() if k not in ("world_size", "files", "shards")})


def selection_identity(selection_dir: str | os.PathLike) -> str:
    """sha256 of a selection's ``selection.parquet`` ('' for no selection)."""
    if not selection_dir:
        return ""
    path = remote.join(selection_dir, SELECTION_NAME)
    return hashlib.sha256(remote.read_bytes(path)).hexdigest() if remote.is_url(path) else file_sha256(path)


def path_identity(path: str | os.PathLike) -> str:
    """sha256 of a file, or a hash over the relative paths and sha256 of a folder's files ('' = none)."""
    if not path:
        return ""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return digest([[p.relative_to(path).as_posix(), file_sha256(p)] for p in files])


def check_same_pool(recorded: str | None, spec: str, what: str, key: str) -> None:
    """Refuse ``what`` (a selection, embeddings) made from another pool than the shard set ``spec``.

    ``recorded`` is the pool identity ``what`` was made from (None when it predates pool
    identities: not compared).
    """
    if recorded is None:
        return
    ours = pool_identity(spec)
    if recorded != ours:
        raise ConfigError(
            f"{what} was made from another pool than {key}={spec} (pool {recorded[:12]} != {ours[:12]}: other "
            f"images, perhaps under the same names); set {key} to the shards it was made from, or redo it"
        )


# --------------------------------------------------------------------------- records


def record(stage: str, config: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A provenance record: the stage, its output-changing config values and its input identities."""
    return {
        "format": PROVENANCE_FORMAT,
        "stage": stage,
        "config": dict(config),
        "inputs": dict(inputs),
        "config_digest": digest(config),
        "inputs_digest": digest(inputs),
    }


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text[:12] if isinstance(value, str) and len(value) == 64 else text[:60]


def difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first input, then config key, whose recorded value differs: a phrase for a message."""
    for section, phrase in (("inputs", "another {k} ({a} recorded, {b} now)"), ("config", "{k}={a} (now {b})")):
        a, b = old.get(section) or {}, new.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<unset>") != b.get(k, "<unset>"):
                return phrase.format(k=k, a=_short(a.get(k, "<unset>")), b=_short(b.get(k, "<unset>")))
    return None


def check(out: Path, rec: Mapping[str, Any], overwrite: bool, has_output: Callable[[], bool]) -> str:
    """Compare ``rec`` with ``<out>/provenance.json``: ``"new"``, ``"same"`` or ``"replaced"`` (overwrite).

    Raises:
        ConfigError: the output was made from other inputs or settings (or has no record)
            and ``overwrite`` is false; one line naming what differs.
    """
    stage = rec["stage"]
    old = read_json(out / PROVENANCE_NAME)
    if old is None:
        what = None if not has_output() else f"no {PROVENANCE_NAME} (written by an older dataeff or by hand)"
    else:
        what = difference(old, rec)
        if what is None:
            return "same"
        what = f"other inputs or settings: {what}"
    if what is None:
        return "new"
    if not overwrite:
        raise ConfigError(
            f"{stage}: out={out} holds output made with {what}; resuming or skipping would mix the two: "
            "set overwrite=true to replace it, or choose another out"
        )
    log.info("%s: overwrite=true, replacing the output in %s (%s)", stage, out, what)
    return "replaced"


def check_checkpoint(ckpt: str | os.PathLike, rec: Mapping[str, Any], key: str = "resume") -> None:
    """Refuse a checkpoint given by path whose run (its folder or the one above) was made differently.

    A checkpoint without a ``provenance.json`` beside it (copied on its own) is not compared.
    """
    ckpt = Path(ckpt)
    for folder in (ckpt.parent, ckpt.parent.parent):
        old = read_json(folder / PROVENANCE_NAME)
        if old is None:
            continue
        what = difference(old, rec)
        if what is not None:
            raise ConfigError(
                f"{key}={ckpt} is a checkpoint of a run made with other inputs or settings: {what}; "
                "resume from a checkpoint of a run like this one, or set resume=never"
            )
        return


def settle(
    out: str | os.PathLike,
    rec: Mapping[str, Any],
    overwrite: bool,
    clear: Callable[[], None],
    has_output: Callable[[], bool],
) -> str:
    """:func:`check` on rank 0, ``clear()`` the old output when replaced, write the record; every rank returns.

    Call it after the stage's input checks and before its first output file.
    """
    from dataeff import dist

    out = Path(out)
    state, error = "", None
    if dist.is_main():
        try:
            state = check(out, rec, overwrite, has_output)
        except ConfigError as exc:
            error = str(exc)
        if state == "replaced":
            clear()
        if state in ("new", "replaced"):
            write_json_atomic(out / PROVENANCE_NAME, rec, indent=1, sort_keys=True, default=str)
    state, error = dist.broadcast_object((state, error))
    if error:
        raise ConfigError(error)
    return state


def remove(out: str | os.PathLike, patterns: Iterable[str]) -> None:
    """Remove the files and folders of a stage's output matching ``patterns`` (the ``clear`` of :func:`settle`)."""
    import shutil

    for pattern in patterns:
        for path in Path(out).glob(pattern):
            if path.name == LOCK_NAME:  # held by this very run
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def holds_any(out: str | os.PathLike, patterns: Iterable[str]) -> bool:
    """Whether ``out`` holds a file or folder matching one of ``patterns`` (the ``has_output`` of :func:`settle`)."""
    return any(next(Path(out).glob(p), None) is not None for p in patterns)
