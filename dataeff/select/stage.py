"""``dataeff select``: gather the embedded pool, run a selection method, write the manifest.

The stage is a thin shell: load the pool (``pool.py``), call the method's function
(``methods.py``), and on rank 0 write ``selection.parquet`` and ``summary.json``
(``manifest.py``; docs/architecture.md "Selection directory"), plus the audit and the
gallery if asked. Every method returns the same decisions on every rank, so the
manifest is the same for any world size.

With ``exclude=<overlap dir>`` the pool samples that copy downstream images are removed
before the method runs, whatever the method (``exclude.py``): the method sees only the
eligible rows and the stage spreads its decisions back over the whole pool.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import cast

import numpy as np

from dataeff import dist, outputs, provenance
from dataeff.config import ConfigError, to_dict
from dataeff.constants import GENERATED_DIR, MAE_CKPT, SELECTION_NAME, SUMMARY_NAME
from dataeff.files import read_json, save_resolved
from dataeff.lock import locked
from dataeff.select import manifest
from dataeff.select.audit import audit_selection, format_audit, read_truth
from dataeff.select.cluster import resolve_k
from dataeff.select.config import SelectConfig
from dataeff.select.distributed_cluster import Embeddings
from dataeff.select.embed import read_header
from dataeff.select.exclude import Exclusion, eligible_mask, expand_decisions, read_exclusion
from dataeff.select.gallery import GALLERY_DIR, write_gallery
from dataeff.select.methods import METHODS, READS_KEYS, index_columns
from dataeff.select.optidel_run import PATCHES_NAME
from dataeff.select.pool import (
    align_quality,
    choose_gather,
    gather_pool,
    local_rows,
    partition_keys,
    pool_keys,
    read_pool_index,
)

# SelectConfig and METHODS are the names the CLI (and the sweep) look up on this module.
__all__ = ["METHODS", "SelectConfig", "main"]

log = logging.getLogger("dataeff")

#: Config sections that shape only the audit and the galleries, never the selection.
_SIDE_OUTPUTS = ("audit.", "report.")
#: What a selection directory holds (removed by ``overwrite=true``; OptiDEL's SAM cache in ``sam/``
#: checks itself and stays).
_OUTPUTS = (SELECTION_NAME, SUMMARY_NAME, GALLERY_DIR, GENERATED_DIR, PATCHES_NAME)


def _scorer_file(scorer: str) -> str:
    """OptiDEL's scorer as a file: a pre-training output directory stands for its ``mae.ckpt``."""
    return str(Path(scorer) / MAE_CKPT) if scorer and Path(scorer).is_dir() else scorer


@locked("select", collective=True)
def main(cfg: SelectConfig) -> None:
    """Select a subset of the pool; identical manifest for any world size."""
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    method = METHODS[cfg.method]
    out = Path(cfg.out)
    header = read_header(cfg.embeddings)  # also checks dims of every file
    spec = cfg.data.shards or header["shards"]
    # The method's columns only (rank 0's audit and gallery read the whole index when they run).
    index = read_pool_index(spec, index_columns(cfg))
    pool_id = provenance.pool_identity(spec)
    provenance.check_same_pool(header.get("pool_id"), spec, f"embeddings={cfg.embeddings}", "data.shards")
    n_ok = int((index["status"] == "ok").sum())
    if n_ok == 0:
        raise ConfigError(f"shard set {spec}: empty shard set (no ok samples)")
    if cfg.cluster.k > 0:
        resolve_k(n_ok, cfg.cluster.k)  # a k larger than the pool fails here, before any work
    truth = read_truth(cfg.audit.truth) if cfg.audit.truth else None
    ok_keys = index.loc[index["status"] == "ok", "key"]
    exclusion = read_exclusion(cfg.exclude, header, ok_keys) if cfg.exclude else Exclusion()
    del ok_keys  # a string per sample, not kept while the method runs
    if cfg.exclude:
        log.info("exclude: %d pool samples copy downstream images; removed before %s", len(exclusion.keys), cfg.method)
    inputs = {
        "embeddings": provenance.embeddings_identity(cfg.embeddings),
        "data.shards": pool_id,
        "exclude": provenance.path_identity(Path(cfg.exclude) / SUMMARY_NAME if cfg.exclude else ""),
        "scorer": provenance.path_identity(_scorer_file(cfg.scorer)),
    }
    provenance.settle(
        out,
        provenance.record("select", provenance.config_values(to_dict(cfg), [*inputs, *_SIDE_OUTPUTS]), inputs),
        cfg.overwrite,
        clear=lambda: provenance.remove(out, _OUTPUTS),
        has_output=lambda: provenance.holds_any(out, (SELECTION_NAME, SUMMARY_NAME)),
    )
    if manifest.is_complete(out) and outputs.intact(out, read_json(out / SUMMARY_NAME).get("outputs"), "select"):
        log.info("selection already complete in %s (same inputs and settings); nothing to do", out)
        return
    if rank == 0:
        save_resolved(cfg, out)

    t0 = time.time()
    gather = choose_gather(cfg.gather, cfg.gather_memory_fraction, cfg.partition_blocker(), n_ok, header["dim"])
    emb: Embeddings
    keys: np.ndarray | None
    if gather == "partitioned":
        log.info("gather=partitioned: each rank keeps its own embedding rows (pool of %d x %d)", n_ok, header["dim"])
        keys, mine = partition_keys(cfg.embeddings, header, rank, world)  # the rows come once the strings are gone
    else:
        keys, emb = gather_pool(cfg.embeddings, rank, world)
    quality = align_quality(keys, index, cfg.embeddings, index_columns(cfg))
    # Removed before the method runs, so no method can keep (or even look at) a downstream copy.
    eligible = eligible_mask(keys, exclusion.keys)
    del index
    if gather == "partitioned" and cfg.method not in READS_KEYS:
        # A pool past one rank's memory: no rank holds its strings (4 bytes per key character)
        # while the method runs; rank 0 reads the keys again for the manifest.
        keys = None
        quality = quality.drop(columns=["key", "status"])
    if gather == "partitioned":
        emb = local_rows(cfg.embeddings, header, rank, world, mine, len(eligible))
        del mine
    sub_emb, sub_keys, sub_quality = emb, keys, quality
    if not eligible.all():  # no copy of the (N, D) embeddings when nothing is excluded
        sub_emb = emb[eligible] if isinstance(emb, np.ndarray) else emb.subset(eligible)
        sub_keys = None if keys is None else keys[eligible]
        sub_quality = quality[eligible].reset_index(drop=True)
    # The methods hand the embeddings only to distributed_cluster.py, which takes either form.
    sub = method(cast(np.ndarray, sub_emb), sub_keys, sub_quality, cfg, rank, world)
    # Only the gallery reads the rows again: the manifest's strings are built without them.
    gallery_emb = emb if cfg.report.gallery else None
    del sub_emb, emb
    decisions = expand_decisions(sub, eligible)
    decisions.info.setdefault("target", manifest.target_count(cfg.ratio, int(eligible.sum())))
    decisions.info["gather"] = gather
    decisions.info["wall_s"] = round(time.time() - t0, 3)
    if rank == 0:
        keys = pool_keys(cfg.embeddings, header) if keys is None else keys
        frame = manifest.selection_frame(keys, decisions)
        inputs = {
            "embeddings": cfg.embeddings,
            "shard_set_hash": header["shard_set_hash"],
            "pool_id": pool_id,
            "encoder_sha256": header["encoder"]["sha256"],
            **exclusion.inputs,
        }
        gallery = decisions.info.pop("optidel_gallery", [])
        summary = manifest.build_summary(cfg.method, cfg.ratio, frame, to_dict(cfg), inputs, decisions.info)
        if truth is not None or cfg.report.gallery:
            index = read_pool_index(spec)  # every column, now that the method's memory is freed
        if truth is not None:
            summary["audit"] = audit_selection(frame, index, truth)
            print(format_audit(summary["audit"]))
        if cfg.report.gallery:
            assert isinstance(gallery_emb, np.ndarray), "config: a gallery blocks gather=partitioned"
            sheets = write_gallery(
                out, frame, index, cfg.report, cfg.seed, keys, gallery_emb, cfg.meddel, exclusion.matched
            )
            summary["gallery"] = [str(p) for p in sheets] + list(gallery)
        manifest.write_selection(out, frame, summary)
        log.info(
            "%s: kept %d of %d (%.4f) -> %s",
            cfg.method,
            summary["kept"],
            summary["pool_size"],
            summary["kept_fraction"],
            out,
        )
        if "shortfall" in summary:
            log.warning("%s", summary["shortfall"])
    dist.barrier()
