"""``SelectConfig``: every key ``dataeff select`` reads, assembled from the methods' own configs.

Each method's section is defined beside its core (``cluster.py``, ``meddel.py``,
``semdedup.py``, ``sam_hard.py``, ``optidel.py``) and the outputs' beside their writers
(``audit.py``, ``gallery.py``); this module only puts them together, so the method
shells can take a typed ``SelectConfig`` without importing the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dataeff.config import ConfigError, option, section
from dataeff.select.audit import AuditConfig
from dataeff.select.cluster import ClusterConfig
from dataeff.select.gallery import GalleryConfig
from dataeff.select.meddel import MedDELConfig
from dataeff.select.optidel import OptidelConfig, check_inputs
from dataeff.select.sam_hard import SamConfig
from dataeff.select.semdedup import SemDeDupConfig

#: Selection methods; ``methods.METHODS`` maps each to its function.
MethodName = Literal["full", "random", "semdedup", "meddel", "optidel"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
#: How the embeddings reach the ranks (``pool.py``): the whole matrix on every rank, or each rank's own rows.
GatherMode = Literal["auto", "all", "partitioned"]
GATHER_MODES: tuple[str, ...] = get_args(GatherMode)


@dataclass
class SelectDataConfig:
    """The pool's shards (select reads nothing else of the data section)."""

    shards: str = option(
        "", help="shard directory (with index.parquet), several joined by ','; empty = the one recorded by embed"
    )


@dataclass
class SelectConfig:
    """Select a subset of an embedded pool and write a manifest."""

    embeddings: str = option("", help="embeddings directory written by 'dataeff embed'")
    method: MethodName = option("meddel", help="selection method: " + ", ".join(METHOD_NAMES))
    ratio: float = option(0.05, help="fraction R of the pool to keep, in (0, 1]; kept = round(R*N)")
    out: str = option("", help="selection directory to write (selections/<run>)")
    seed: int = option(0, help="seed of k-means sampling, random choices and galleries")
    exclude: str = option(
        "",
        help="'dataeff overlap' output dir of these embeddings: its matched pool samples are removed before any "
        "method runs (reason downstream_overlap); the method keeps round(R*(N - excluded)); '' = none",
    )
    gather: GatherMode = option(
        "auto",
        help="all = every rank holds the whole (N, D) embedding matrix; partitioned = each rank keeps the rows it "
        "read and each cluster's rows move to the rank that owns it (same manifest, memory ~ N/W + a cluster); "
        "auto = partitioned when the gathered matrices of a node exceed gather_memory_fraction of its memory",
    )
    gather_memory_fraction: float = option(
        0.25,
        help="with gather=auto: share of the node's physical memory the gathered float16 matrices "
        "(N x D x 2 bytes x ranks per node) may take before partitioning; gathering peaks near 3x that",
    )
    data: SelectDataConfig = section(
        SelectDataConfig, help="data.shards overrides the shard directory recorded by embed"
    )
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
    overwrite: bool = option(
        False, help="replace an out holding a selection made with another config or from other inputs"
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio={self.ratio}: must be in (0, 1] (e.g. ratio=0.05 keeps 5%)")
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHOD_NAMES)}")
        if not self.embeddings:
            raise ConfigError("embeddings is empty: set embeddings=<dir written by 'dataeff embed'>")
        if not self.out:
            raise ConfigError("out is empty: set out=selections/<run>")
        if self.gather not in GATHER_MODES:
            raise ConfigError(f"gather={self.gather!r}: choose one of {', '.join(GATHER_MODES)}")
        if not 0.0 < self.gather_memory_fraction <= 1.0:
            raise ConfigError(f"gather_memory_fraction={self.gather_memory_fraction}: must be in (0, 1]")
        if self.gather == "partitioned" and self.partition_blocker():
            raise ConfigError(f"gather=partitioned: {self.partition_blocker()}; set gather=all or auto")
        if self.method == "optidel":
            check_inputs(self.sam, self.scorer)

    def partition_blocker(self) -> str:
        """Why this run needs the whole embedding matrix on rank 0 ('' = it can be partitioned)."""
        if self.report.gallery:
            return "report.gallery=true compares the embeddings of removed pairs on rank 0"
        return ""
