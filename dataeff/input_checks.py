"""Input checks a stage runs before it writes anything: shard sets, selections, downstream pairs.

Each raises :class:`~dataeff.config.ConfigError` with one line naming the config key and
the fix, so ``dataeff <stage>`` exits 2 before ``config.yaml``, a checkpoint or a W&B run
exists. They read only indexes, summaries and image headers (a 1000-pair downstream set
is checked in about 0.3 s); the stage reads the data itself later.
"""

from __future__ import annotations

import json
from pathlib import Path

from dataeff.config import ConfigError, DataConfig, first_line
from dataeff.constants import SUMMARY_NAME
from dataeff.data import downstream, remote
from dataeff.data.stream import list_shards, shard_keys
from dataeff.provenance import check_same_pool
from dataeff.select import manifest
from dataeff.select.embed import shard_set_hash

#: What ``data.root`` must hold, for the messages.
_LAYOUT_HINT = "a folder with images/ + masks/ (Kvasir-SEG) or Original/ + Ground Truth/ (CVC-ClinicDB)"


def check_shards(spec: str, key: str, allow_empty: bool = False) -> tuple[list[str], list[list[str]]]:
    """The tars of a shard spec and the ok keys of each, or a one-line error naming ``key``.

    Args:
        spec: a shard directory, several joined by ``,``, or a brace pattern (see ``list_shards``).
        key: the config key that holds ``spec`` (``data.shards``, ``shards``).
        allow_empty: accept a shard set without ok samples (extra shard sets may be empty).

    Raises:
        ConfigError: an empty spec, a missing directory or tar, a directory not written by
            ``dataeff shard``, or (unless ``allow_empty``) no ok sample at all.
    """
    if not spec:
        raise ConfigError(f"{key} is empty: give a shard directory written by 'dataeff shard'")
    if "{" not in spec and "," not in spec and not remote.is_url(spec) and not Path(spec).exists():
        raise ConfigError(f"{key}={spec}: no such shard directory; run 'dataeff shard src=<images> out={spec}' first")
    try:
        tars = list_shards(spec)
        keys = shard_keys(tars)
    except ValueError as exc:
        raise ConfigError(f"{key}={spec}: {first_line(exc)}") from None
    if not allow_empty and not any(keys):
        raise ConfigError(
            f"{key}={spec}: empty shard set (no ok samples in its index); shard a folder with valid images"
        )
    return tars, keys


def check_selection(selection: str, tars: list[str], keys: list[list[str]], shards: str, key: str) -> None:
    """Refuse a selection that is incomplete or was made from another pool than ``tars``.

    The pool is identified as in the embeddings header: :func:`shard_set_hash` over the
    tar names and their ok keys, then by content (``inputs.pool_id``,
    :func:`dataeff.provenance.pool_identity`). A summary without them (written by hand or
    by an older dataeff) is not compared; the stream still checks its keys.

    Args:
        selection: the ``data.selection`` directory ('' = no selection: nothing to check).
        tars, keys: the pool, from :func:`check_shards` of ``shards``.
        shards: the pool's spec, for the message.
        key: the config key of ``selection``.

    Raises:
        ConfigError: no complete selection there, or its shard-set hash is another pool's.
    """
    if not selection:
        return
    if not manifest.is_complete(selection):
        raise ConfigError(
            f"{key}={selection}: no complete selection there (selection.parquet + summary.json); "
            "point it at a 'dataeff select' output"
        )
    summary = json.loads(remote.read_text(remote.join(selection, SUMMARY_NAME)))
    inputs = summary.get("inputs") or {}
    theirs = inputs.get("shard_set_hash")
    ours = shard_set_hash(tars, keys)
    if theirs is not None and theirs != ours:
        raise ConfigError(
            f"{key}={selection} was made from another pool (shard_set_hash {theirs[:12]} != {ours[:12]} of "
            f"data.shards={shards}); set data.shards to the shards it was selected from, or re-run 'dataeff select'"
        )
    # Same names and keys can still be other pictures: the content identity tells them apart.
    check_same_pool(inputs.get("pool_id"), shards, f"{key}={selection}", "data.shards")


def check_stream_data(cfg: DataConfig) -> None:
    """The pre-training ``data`` section: the pool, the extra shard sets and the selection."""
    tars, keys = check_shards(cfg.shards, "data.shards")
    for i, spec in enumerate(cfg.extra_shards):
        check_shards(str(spec), f"data.extra_shards[{i}]", allow_empty=True)
    check_selection(cfg.selection, tars, keys, cfg.shards, "data.selection")


#: Unusable pairs named in one error message; the rest are counted.
_LISTED = 10


def check_downstream(root: str, layout: str, key: str, groups: str = "") -> list[tuple[str, Path, Path]]:
    """The image/mask pairs of a downstream folder, each readable and of matching sizes.

    Every file is decoded in full as training will read it (``downstream.pair_problems``:
    TIFFs through tifffile, JPEGs with DCT scaling, which still reads every coded block), so
    a damaged or unsupported file, or a mask whose size differs from its image's, stops the
    run here with the list of them, instead of stopping training at that pair.

    Args:
        root: the dataset folder (``data.root``).
        layout: ``auto``, ``kvasir``, ``cvc`` or ``generic`` (see ``downstream.find_pairs``).
        key: the config key of ``root``.
        groups: a ``data.groups`` spec to check against the pairs ('' = none; its
            messages name ``data.groups`` themselves).

    Returns:
        ``(stem, image_path, mask_path)`` of every pair, sorted by stem.

    Raises:
        ConfigError: a missing folder, unpaired or no files, undecodable files or size
            mismatches (listed), or a groups spec that does not cover every pair.
    """
    if not root:
        raise ConfigError(f"{key} is empty: give the downstream dataset, {_LAYOUT_HINT}")
    if not Path(root).is_dir():
        raise ConfigError(f"{key}={root}: no such directory; give the downstream dataset, {_LAYOUT_HINT}")
    try:
        pairs = downstream.find_pairs(root, layout)
    except ValueError as exc:
        raise ConfigError(f"{key}={root}: {first_line(exc)}") from None
    problems = downstream.pair_problems(root, pairs)
    if problems:
        more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise ConfigError(
            f"{key}={root}: {len(problems)} unusable image/mask file(s): {'; '.join(problems[:_LISTED])}{more}; "
            "replace or remove those pairs"
        )
    if groups:
        try:
            downstream.read_groups(groups, pairs)
        except ValueError as exc:
            raise ConfigError(first_line(exc)) from None
    return pairs
