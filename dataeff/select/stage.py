"""``dataeff select``: gather embeddings, run a selection method, write the manifest.

Every rank loads a share of the embedding files; the rows are all-gathered and
sorted by key, so every later step sees the same pool whatever the world size.
A method is one registry entry (name -> ``"module:function"``, imported lazily),
``fn(embeddings, keys, quality, cfg, rank, world) -> Decisions``, returning the same
decisions on every rank; rank 0 writes ``selection.parquet`` and ``summary.json``
(docs/architecture.md "Selection directory"), plus the audit and gallery if asked.
The method shells below only distribute work and gather results; their cores are
pure (``cluster.py``, ``meddel.py``, ``baselines.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dataeff import dist
from dataeff.config import ConfigError, DataConfig, option, save_resolved, section, to_dict
from dataeff.select import cluster as C
from dataeff.select import manifest
from dataeff.select import meddel as M
from dataeff.select.baselines import SemDeDupConfig, select_random, semdedup_decide
from dataeff.select.embed import load_embeddings, read_header
from dataeff.select.meddel import MedDELConfig, target_count
from dataeff.select.optidel import OptidelConfig
from dataeff.select.optidel import check_inputs as check_optidel_inputs
from dataeff.select.sam_hard import SamConfig

log = logging.getLogger("dataeff")

MethodFn = Callable[[np.ndarray, np.ndarray, pd.DataFrame, "SelectConfig", int, int], manifest.Decisions]

#: Selection methods: name -> "module:function". Adding a method = adding a line here.
METHODS: dict[str, str] = {
    "full": "dataeff.select.stage:run_full",
    "random": "dataeff.select.stage:run_random",
    "semdedup": "dataeff.select.stage:run_semdedup",
    "meddel": "dataeff.select.stage:run_meddel",
    "optidel": "dataeff.select.optidel_run:run_optidel",
}
QUALITY_COLUMNS = ("mean", "std", "laplacian_var", "dark_frac", "bright_frac")


@dataclass
class ClusterConfig:
    """Spherical k-means (faiss) shared by the clustering methods."""

    k: int = option(0, help="clusters; 0 = round(sqrt(N)), at least 2 (PAPERS.md MedDEL step 2)")
    niter: int = option(100, help="k-means iterations (PAPERS.md: about 100)")
    max_points_per_centroid: int = option(256, help="k-means trains on at most k * this many seeded-sampled points")
    device: str = option("auto", help="'auto' = faiss GPU index when faiss sees a GPU, else CPU; or 'cpu', 'gpu'")

    def __post_init__(self) -> None:
        if self.k < 0 or self.niter < 1 or self.max_points_per_centroid < 1:
            raise ConfigError(
                "cluster.k must be >= 0 (0 = sqrt(N)); cluster.niter and cluster.max_points_per_centroid >= 1"
            )
        if self.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"cluster.device={self.device!r}: choose auto, cpu or gpu")


@dataclass
class AuditConfig:
    truth: str = option("", help="planted-defect ground truth CSV (format dataeff-truth/1); empty = no audit")


@dataclass
class GalleryConfig:
    gallery: bool = option(False, help="write PNG contact sheets of removed samples and of a few clusters")
    per_sheet: int = option(12, help="examples per contact sheet")
    clusters: int = option(4, help="clusters shown with kept vs dropped members")


@dataclass
class SelectConfig:
    """Select a subset of an embedded pool and write a manifest."""

    embeddings: str = option("", help="embeddings directory written by 'dataeff embed'")
    method: str = option("meddel", help="selection method: " + ", ".join(METHODS))
    ratio: float = option(0.05, help="fraction R of the pool to keep, in (0, 1]; kept = round(R*N)")
    out: str = option("", help="selection directory to write (selections/<run>)")
    seed: int = option(0, help="seed of k-means sampling, random choices and galleries")
    data: DataConfig = section(DataConfig, help="data.shards overrides the shard directory recorded by embed")
    cluster: ClusterConfig = section(ClusterConfig)
    meddel: MedDELConfig = section(MedDELConfig)
    semdedup: SemDeDupConfig = section(SemDeDupConfig)
    audit: AuditConfig = section(AuditConfig)
    report: GalleryConfig = section(GalleryConfig)
    scorer: str = option(
        "", help="optidel: pre-trained MAE scoring hardness ('dataeff pretrain' output dir or its mae.ckpt)"
    )
    sam: SamConfig = section(SamConfig, help="optidel: Segment Anything model and mask generator")
    optidel: OptidelConfig = section(OptidelConfig, help="optidel: hardness selection, diversity caps, mosaics")

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio={self.ratio}: must be in (0, 1] (e.g. ratio=0.05 keeps 5%)")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.embeddings:
            raise ConfigError("embeddings is empty: set embeddings=<dir written by 'dataeff embed'>")
        if not self.out:
            raise ConfigError("out is empty: set out=selections/<run>")
        if self.method == "optidel":
            check_optidel_inputs(self.sam, self.scorer)


def resolve_method(name: str) -> MethodFn:
    """The registered function for ``name``; a clear error when its module is not in this build."""
    module_name, _, fn_name = METHODS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(
                f"method={name!r} is not available in this build of dataeff ({module_name} is missing)"
            ) from None
        raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ConfigError(f"method={name!r} is not available in this build of dataeff ({METHODS[name]} is missing)")
    return fn


def shard_dirs(spec: str) -> list[Path]:
    """Shard directories of a shard spec (a directory, several joined by ',', or a brace pattern)."""
    items = [spec] if "{" in spec else [s.strip() for s in spec.split(",") if s.strip()]
    return [Path(i) if Path(i).is_dir() else Path(i).parent for i in items]


def read_pool_index(spec: str) -> pd.DataFrame:
    """index.parquet rows of every shard directory of ``spec`` (all statuses)."""
    from dataeff.data.stream import read_index

    frames = []
    for d in shard_dirs(spec):
        try:
            frames.append(read_index(d).assign(shard_dir=str(d)))
        except ValueError as exc:
            raise ConfigError(f"shard directory {d}: {exc}; set data.shards=<shard dir> for select") from None
    return pd.concat(frames, ignore_index=True)


def gather_pool(emb_dir: str, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the embeddings directory on every rank, sorted by key (float16).

    Rank r reads rank files r, r+W, ...; the gather order does not matter after the sort.

    Shape:
        -> keys (N,) str, embeddings (N, D) float16.
    """
    header = read_header(emb_dir)
    keys, emb = load_embeddings(emb_dir, header["files"][rank::world], dtype=np.float16)
    keys = dist.all_gather_concat(keys)
    emb = dist.all_gather_concat(emb)
    order = np.argsort(keys, kind="stable")
    keys, emb = keys[order], emb[order]
    if len(keys) and (keys[1:] == keys[:-1]).any():
        dup = keys[1:][keys[1:] == keys[:-1]][0]
        raise ConfigError(f"embeddings={emb_dir}: key {dup} appears twice; re-embed into a fresh directory")
    return keys, emb


def _check_pool(keys: np.ndarray, index: pd.DataFrame, emb_dir: str) -> pd.DataFrame:
    """The ok rows of the index aligned to ``keys`` (errors if the sets differ)."""
    ok = index[index["status"] == "ok"].drop_duplicates("key").set_index("key")
    missing = np.setdiff1d(ok.index.to_numpy(dtype=str), keys)
    extra = np.setdiff1d(keys, ok.index.to_numpy(dtype=str))
    if len(missing) or len(extra):
        raise ConfigError(
            f"embeddings={emb_dir} do not match the shard index: {len(missing)} ok sample(s) without an embedding, "
            f"{len(extra)} embedding(s) not ok in the index; re-run 'dataeff embed' on the same shards"
        )
    frame = ok.loc[keys].reset_index()
    if not set(QUALITY_COLUMNS) <= set(frame.columns):
        log.warning("index has no quality statistics; quality checks are skipped")
        for c in QUALITY_COLUMNS:
            frame[c] = np.nan
    return frame


def main(cfg: SelectConfig) -> None:
    """Select a subset of the pool; identical manifest for any world size."""
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    method = resolve_method(cfg.method)
    out = Path(cfg.out)
    if manifest.is_complete(out):
        log.info("selection already complete in %s; nothing to do", out)
        return
    header = read_header(cfg.embeddings)  # also checks dims of every file
    spec = cfg.data.shards or header["shards"]
    index = read_pool_index(spec)
    n_ok = int((index["status"] == "ok").sum())
    if n_ok == 0:
        raise ConfigError(f"shard set {spec}: empty shard set (no ok samples)")
    if cfg.cluster.k > 0:
        C.resolve_k(n_ok, cfg.cluster.k)
    truth = _read_truth(cfg.audit.truth) if cfg.audit.truth else None
    if rank == 0:
        save_resolved(cfg, out)

    t0 = time.time()
    keys, emb = gather_pool(cfg.embeddings, rank, world)
    quality = _check_pool(keys, index, cfg.embeddings)
    decisions = method(emb, keys, quality, cfg, rank, world)
    target = target_count(cfg.ratio, len(keys))
    decisions.info.setdefault("target", target)
    decisions.info["wall_s"] = round(time.time() - t0, 3)
    if rank == 0:
        frame = manifest.selection_frame(keys, decisions)
        inputs = {
            "embeddings": cfg.embeddings,
            "shard_set_hash": header["shard_set_hash"],
            "encoder_sha256": header["encoder"]["sha256"],
        }
        summary = manifest.build_summary(cfg.method, cfg.ratio, frame, to_dict(cfg), inputs, decisions.info)
        if truth is not None:
            from dataeff.select.audit import audit_selection, format_audit

            summary["audit"] = audit_selection(frame, index, truth)
            print(format_audit(summary["audit"]))
        if cfg.report.gallery:
            from dataeff.select.gallery import write_gallery

            summary["gallery"] = [str(p) for p in write_gallery(out, frame, index, cfg.report, cfg.seed)]
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


def _read_truth(path: str) -> pd.DataFrame:
    if not Path(path).is_file():
        raise ConfigError(f"audit.truth={path}: no such file")
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = {"source", "planted", "kind", "twin"}
    if not need <= set(truth.columns):
        raise ConfigError(f"audit.truth={path}: needs columns {sorted(need)} (format dataeff-truth/1)")
    return truth


# --------------------------------------------------------------------------- method shells


def cluster_pool(
    emb: np.ndarray, cfg: SelectConfig, rank: int, world: int, timings: dict
) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means trained once on rank 0 (seeded sample), centroids broadcast, chunks assigned per rank.

    Shape:
        emb: (N, D) float16 unit rows, key-sorted -> labels (N,) int64, sims (N,) float32, k.
    """
    n = len(emb)
    k = C.resolve_k(n, cfg.cluster.k)
    use_gpu = cfg.cluster.device == "gpu" or (cfg.cluster.device == "auto" and C.gpu_available())
    t = time.time()
    centroids = None
    if rank == 0:
        sample = C.kmeans_sample(n, k, cfg.cluster.max_points_per_centroid, cfg.seed)
        centroids = C.train_kmeans(emb[sample].astype(np.float32), k, cfg.cluster.niter, cfg.seed, use_gpu)
    centroids = dist.broadcast_array(centroids)
    timings["kmeans"] = time.time() - t
    t = time.time()
    bounds = C.chunk_bounds(n)
    parts = [C.assign(emb[s:e], centroids) for s, e in (bounds[c] for c in C.owned_chunks(len(bounds), rank, world))]
    labels = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    sims = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
    labels = C.reorder_chunks(dist.all_gather_array(labels), n)
    sims = C.reorder_chunks(dist.all_gather_array(sims), n)
    timings["assign"] = time.time() - t
    return labels, sims, k


def redundancy_stats(
    emb: np.ndarray,
    labels: np.ndarray,
    sims: np.ndarray,
    valid: np.ndarray,
    k: int,
    order: str,
    seed: int,
    rank: int,
    world: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster redundancy (clusters partitioned over ranks), gathered into pool arrays.

    Shape:
        -> m (N,) float32 (+inf for invalid rows), prev (N,) int64 row of the duplicated
        earlier member (-1), pos (N,) int64 visit position in its cluster.
    """
    n = len(emb)
    members = C.members_by_cluster(np.where(valid, labels, -1), k)
    owned = C.partition_clusters(np.array([len(r) for r in members]), world)[rank]
    rows_l, m_l, prev_l, pos_l = (
        [np.zeros(0, np.int64)],
        [np.zeros(0, np.float32)],
        [np.zeros(0, np.int64)],
        [np.zeros(0, np.int64)],
    )
    # Per-cluster products are small: BLAS threads only add start-up and, on a busy node,
    # spin-wait cost (measured 25x on 141-member clusters); parallelism comes from ranks.
    with _single_blas_thread():
        for c in owned:
            rows = members[c]
            if len(rows) == 0:
                continue
            m, prev, pos = M.cluster_redundancy(emb[rows].astype(np.float32), sims[rows], order, seed, int(c))
            rows_l.append(rows)
            m_l.append(m)
            prev_l.append(np.where(prev >= 0, rows[np.maximum(prev, 0)], -1))
            pos_l.append(pos)
    rows, m, prev, pos = (dist.all_gather_concat(np.concatenate(x)) for x in (rows_l, m_l, prev_l, pos_l))
    m_full, prev_full, pos_full = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64), np.zeros(n, np.int64)
    m_full[rows], prev_full[rows], pos_full[rows] = m, prev, pos
    return m_full, prev_full, pos_full


def _single_blas_thread():
    """Limit numpy's BLAS to one thread (threadpoolctl, installed with scikit-learn), else no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _redundant_reasons(reason: np.ndarray, redundant: np.ndarray, prev: np.ndarray, keys: np.ndarray) -> np.ndarray:
    out = reason.copy()
    for i in np.flatnonzero(redundant):
        out[i] = f"redundant_of:{keys[prev[i]]}"
    return out


def run_full(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame, cfg: SelectConfig, rank: int, world: int
) -> manifest.Decisions:
    """Every sample kept (the 100% reference)."""
    n = len(keys)
    kept = np.ones(n, dtype=bool)
    return manifest.Decisions(
        kept, manifest.reasons_for(kept, np.full(n, "", object)), np.full(n, -1, np.int64), np.zeros(n, np.float32)
    )


def run_random(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame, cfg: SelectConfig, rank: int, world: int
) -> manifest.Decisions:
    """round(R*N) samples uniformly at random (seeded)."""
    n = len(keys)
    kept, score = select_random(n, target_count(cfg.ratio, n), cfg.seed)
    return manifest.Decisions(
        kept, manifest.reasons_for(kept, np.full(n, "", object)), np.full(n, -1, np.int64), score.astype(np.float32)
    )


def run_semdedup(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame, cfg: SelectConfig, rank: int, world: int
) -> manifest.Decisions:
    """SemDeDup with a fixed eps inside k-means clusters, then a seeded random fill to round(R*N)."""
    n, timings = len(keys), {}
    labels, sims, k = cluster_pool(emb, cfg, rank, world, timings)
    t = time.time()
    m, prev, _ = redundancy_stats(emb, labels, sims, np.ones(n, bool), k, "hard", cfg.seed, rank, world)
    timings["dedup"] = time.time() - t
    kept, redundant = semdedup_decide(m, cfg.semdedup.epsilon, target_count(cfg.ratio, n), cfg.seed)
    reason = _redundant_reasons(np.full(n, "", object), redundant, prev, keys)
    info = {"k": k, "epsilon": cfg.semdedup.epsilon, "timings_s": _rounded(timings)}
    return manifest.Decisions(kept, manifest.reasons_for(kept, reason), labels, (1.0 - sims).astype(np.float32), info)


def run_meddel(
    emb: np.ndarray, keys: np.ndarray, quality: pd.DataFrame, cfg: SelectConfig, rank: int, world: int
) -> manifest.Decisions:
    """MedDEL (PAPERS.md): invalid frames and embedding outliers out, redundancy by bisected eps, exact ratio."""
    n, mc, timings = len(keys), cfg.meddel, {}
    has_quality = quality is not None and not quality[list(QUALITY_COLUMNS)].isna().all().all()
    qreason = M.quality_reasons(quality, mc) if has_quality else np.full(n, "", object)
    labels, sims, k = cluster_pool(emb, cfg, rank, world, timings)
    invalid = np.where(
        qreason != "",
        qreason,
        M.embedding_outliers(labels, sims, qreason == "", k, mc.outlier_quantile, mc.min_cluster_size),
    )
    t = time.time()
    m, prev, pos = redundancy_stats(emb, labels, sims, invalid == "", k, mc.order, cfg.seed, rank, world)
    timings["dedup"] = time.time() - t
    t = time.time()
    kept, redundant, info = M.decide(labels, m, pos, invalid, target_count(cfg.ratio, n), mc.epsilon)
    reason = _redundant_reasons(invalid, redundant, prev, keys)
    timings["ratio_fill"] = time.time() - t
    info.update(k=k, quality_checks=mc.quality_checks if has_quality else [], timings_s=_rounded(timings))
    return manifest.Decisions(kept, manifest.reasons_for(kept, reason), labels, (1.0 - sims).astype(np.float32), info)


def _rounded(timings: dict) -> dict:
    return {k: round(v, 4) for k, v in timings.items()}
