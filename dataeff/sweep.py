"""``dataeff sweep``: select -> pretrain -> finetune for every (method, ratio) cell, then report.

The stage configs are sections of :class:`SweepConfig` and act as per-cell templates:
the sweep fills the keys it owns (method, ratio, paths, seeds, W&B group) and calls each
stage's ``main`` in this process, so under ``torchrun`` every stage runs in the same
process group. The pool is embedded once for all cells; with no encoder weights given,
a short MAE pre-training on the whole pool (``bootstrap``) provides the embedding
encoder (and OptiDEL's hardness scorer).

Layout under ``out``::

    sweep.json                      plan: cells, skipped cells and why, seed, budget
    bootstrap/  embed/              shared by every cell
    cells/<method>-r<ratio>/        selection/, pretrain/, finetune/<dataset>/, cell.json
    report.md  report.csv  plots/   written by ``dataeff report`` at the end

``cell.json`` (format ``dataeff-cell/1``) records each stage's wall time, the kept count,
the pre-training images seen and ``done``. A done cell is skipped on a rerun; an
unfinished one resumes from its first unfinished stage (the stages resume themselves too).
``stages=[...]`` limits a run to some of ``embed``, ``select``, ``pretrain``, ``finetune``
(``launch/slurm/sweep.sh`` submits one job per stage of each cell this way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dataeff import dist
from dataeff import finetune as finetune_stage
from dataeff import pretrain as pretrain_stage
from dataeff import report as report_stage
from dataeff.config import ConfigError, WandbConfig, option, section, to_dict, to_yaml
from dataeff.constants import (
    CELL_FORMAT,
    CELL_NAME,
    EMBEDDINGS_HEADER,
    MAE_CKPT,
    SUMMARY_NAME,
    SWEEP_FORMAT,
)
from dataeff.files import save_resolved, write_json_atomic
from dataeff.finetune import FinetuneConfig
from dataeff.pretrain import PretrainConfig
from dataeff.select import embed as embed_stage
from dataeff.select import stage as select_stage
from dataeff.select.config import SelectConfig
from dataeff.select.embed import EmbedConfig
from dataeff.select.methods import METHODS
from dataeff.select.sam_hard import check_checkpoint

log = logging.getLogger("dataeff")
T = TypeVar("T")

#: What one sweep run can do, in order: ``embed`` (bootstrap encoder + pool embedding, shared
#: by every cell), then each cell's ``select``, ``pretrain`` and ``finetune``.
STAGES = ("embed", "select", "pretrain", "finetune")
#: Select keys that only one method reads.
METHOD_KEYS = {"meddel": ("meddel",), "semdedup": ("semdedup",), "optidel": ("scorer", "sam", "optidel")}


def template(schema: type, filled: Sequence[str]) -> type:
    """A per-cell template of stage config ``schema``: its keys minus the ``filled`` ones.

    The sweep fills ``filled`` (dotted keys, e.g. ``data.shards``) in every cell, so the
    template does not offer them: setting one in a sweep config is an unknown-key error.
    A section that keeps none of its keys is left out. The template has no
    ``__post_init__``: the checks run on each filled stage config (see :func:`plan`),
    before any work. Sections without filled keys are the stage's own classes.
    """
    hints = typing.get_type_hints(schema)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(schema):
        if f.name in filled:
            continue
        inner = [key.partition(".")[2] for key in filled if key.startswith(f.name + ".")]
        if inner:
            sub = template(f.default_factory, inner)  # type: ignore[arg-type]
            if dataclasses.fields(sub):
                fields.append((f.name, sub, section(sub, help=f.metadata.get("help", ""))))
            continue
        kept = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
        fields.append((f.name, hints[f.name], kept))
    namespace = {"__module__": __name__, "__doc__": f"{schema.__name__} without the keys the sweep fills per cell."}
    cls = dataclasses.make_dataclass(f"{schema.__name__}Template", fields, namespace=namespace)
    cls.TEMPLATE_OF = schema  # type: ignore[attr-defined]
    return cls


#: Keys the sweep sets in every cell: the templates do not offer them.
FILLED = {
    "embed": ("out", "data.shards", "seed"),
    "select": ("embeddings", "method", "ratio", "out", "seed", "data.shards"),
    "pretrain": ("out", "data.shards", "data.selection", "seed", "run_name"),
    "finetune": ("out", "encoder.weights", "seed", "run_name"),
}
if TYPE_CHECKING:  # to the type checker a template has its stage config's fields (a superset)
    EmbedTemplate = EmbedConfig
    SelectTemplate = SelectConfig
    PretrainTemplate = PretrainConfig
    FinetuneTemplate = FinetuneConfig
else:
    EmbedTemplate = template(EmbedConfig, FILLED["embed"])
    SelectTemplate = template(SelectConfig, FILLED["select"])
    PretrainTemplate = template(PretrainConfig, FILLED["pretrain"])
    FinetuneTemplate = template(FinetuneConfig, FILLED["finetune"])


@dataclass
class BootstrapConfig:
    """A short MAE run on the whole pool, used as the embedding encoder when none is given."""

    steps: int = option(200, help="MAE steps (0 = no bootstrap: then embed.encoder.weights is required)")

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"bootstrap.steps={self.steps}: must be >= 0")


@dataclass
class SweepConfig:
    """Every (method, ratio) cell through select -> pretrain -> finetune, then ``report``."""

    out: str = option("runs/sweep", help="sweep directory (cells/, embed/, bootstrap/, report.md)")
    name: str = option("", help="sweep name: W&B group and report title (default: the name of out)")
    shards: str = option("", help="pre-training pool: shard directory written by 'dataeff shard' (required)")
    methods: list = option(["full", "random", "meddel", "optidel"], help="selection methods to compare")
    ratios: list = option([0.05, 0.2, 0.5, 1.0], help="kept fractions R of the pool; 'full' runs at 1.0 only")
    datasets: dict = option({}, help="downstream name -> finetune keys for it, e.g. {kvasir: {data: {root: ...}}}")
    seed: int = option(0, help="the one seed of every stage of every cell (comparison protocol)")
    alpha: float = option(1.0, help="NormDEL alpha of the final report")
    stages: list = option(
        list(STAGES), help="what this run does (a SLURM job per stage runs one); a cell is done after all three"
    )
    report: bool = option(True, help="write report.md, report.csv and the plots at the end")
    bootstrap: BootstrapConfig = section(BootstrapConfig, help="embedding encoder when embed.encoder.weights is empty")
    embed: EmbedTemplate = section(EmbedTemplate, help="embedding of the pool (once per sweep)")
    select: SelectTemplate = section(SelectTemplate, help="selection template (audit.truth, cluster, meddel, sam, ...)")
    pretrain: PretrainTemplate = section(PretrainTemplate, help="pre-training template: one step budget for every cell")
    finetune: FinetuneTemplate = section(
        FinetuneTemplate, help="fine-tuning template, per dataset completed by datasets.<name>"
    )
    wandb: WandbConfig = section(WandbConfig, help="W&B for every stage: group = name, tags method/ratio")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("shards is empty: set shards=<pool shard directory written by 'dataeff shard'>")
        if not self.datasets:
            raise ConfigError("datasets is empty: set datasets.<name>.data.root=<downstream folder> (one or more)")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods={list(self.methods)}: choose from {', '.join(METHODS)}")
        for r in self.ratios:
            if not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise ConfigError(f"ratios: {r!r} is not a fraction in (0, 1] (e.g. 0.05 for 5%)")
        if not self.ratios:
            raise ConfigError("ratios is empty: give kept fractions, e.g. ratios=[0.05,0.2,0.5,1.0]")
        if self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha}: must be >= 0")
        if not self.stages or any(st not in STAGES for st in self.stages):
            raise ConfigError(f"stages={list(self.stages)}: choose one or more of {', '.join(STAGES)}")

    @property
    def sweep_name(self) -> str:
        return self.name or Path(self.out).name


# --------------------------------------------------------------------------- pure planning


@dataclass(frozen=True)
class Cell:
    method: str
    ratio: float

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.ratio:g}"


def plan_cells(methods: list[str], ratios: list[float], unavailable: dict[str, str]) -> tuple[list[Cell], list[dict]]:
    """The cells to run, and the ones left out with the reason.

    ``full`` runs once, at 1.0 (``full`` at 0.05 would be the same 100% run again);
    ``random`` at 1.0 keeps every sample, i.e. it *is* ``full``, so it is left out when
    ``full`` is in the sweep. A method in ``unavailable`` is left out with its reason.
    """
    cells, skipped = [], []
    ratios = sorted({float(r) for r in ratios})
    for method in dict.fromkeys(methods):
        if method in unavailable:
            skipped.append({"cell": method, "why": unavailable[method]})
            continue
        for ratio in [1.0] if method == "full" else ratios:
            cell = Cell(method, ratio)
            if method == "random" and ratio == 1.0 and "full" in methods:
                skipped.append({"cell": cell.name, "why": "random at 1.0 keeps every sample: identical to full-r1"})
                continue
            cells.append(cell)
    return cells, skipped


def fill(schema: type[T], template: Any, *patches: dict) -> T:
    """A ``schema`` instance from a template's values with ``patches`` merged on top.

    Types are checked and ``schema``'s ``__post_init__`` runs, as in ``load_config``.

    Raises:
        ConfigError: naming the key, for a wrong key, type or value.
    """
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(schema), OmegaConf.to_container(OmegaConf.structured(template)), *patches
        )
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"{schema.__name__}: bad key '{getattr(exc, 'full_key', '?')}': {str(exc).splitlines()[0]}"
        ) from None


def _wandb(cfg: SweepConfig, tags: list[str]) -> dict:
    w = cfg.wandb
    return {
        "wandb": {
            "enabled": w.enabled,
            "project": w.project,
            "group": w.group or cfg.sweep_name,
            "tags": [*w.tags, *tags],
        }
    }


def plan(cfg: SweepConfig, embed_weights: str, scorer: str, precheck: bool = False) -> dict[str, Any]:
    """Every stage config of the sweep, filled and checked, before any work.

    Args:
        embed_weights: encoder weights of the embedding pass (the bootstrap output or the
            user's ``embed.encoder.weights``).
        scorer: OptiDEL hardness model (MAE checkpoint) when the select template has
            ``scorer`` empty; '' when none.
        precheck: check the templates before the bootstrap exists: OptiDEL cells are
            then checked for their SAM only (their scorer is not written yet).

    Returns:
        ``{"embed": EmbedConfig, "cells": [(Cell, {"select", "pretrain", "finetune": {ds: cfg}})],
        "skipped": [{"cell", "why"}]}``.
    """
    out = Path(cfg.out)
    embed_patch = {"out": str(out / "embed"), "data": {"shards": cfg.shards}, "seed": cfg.seed}
    if embed_weights:
        embed_patch["encoder"] = {"weights": embed_weights}
    embed = fill(EmbedConfig, cfg.embed, embed_patch)
    cells, skipped = plan_cells(list(cfg.methods), list(cfg.ratios), unavailable_methods(cfg))
    planned = []
    for cell in cells:
        root = out / "cells" / cell.name
        tags = [f"method={cell.method}", f"ratio={cell.ratio:g}"]
        sel_patch: dict[str, Any] = {
            "embeddings": embed.out,
            "method": cell.method,
            "ratio": cell.ratio,
            "out": str(root / "selection"),
            "seed": cfg.seed,
            "data": {"shards": cfg.shards},
        }
        if cell.method == "optidel" and not cfg.select.scorer:
            sel_patch["scorer"] = scorer
            if precheck and not Path(scorer).exists():
                check_checkpoint(cfg.select.sam)
                sel_patch["method"] = "random"  # every other key of the template is still checked
        select = fill(SelectConfig, cfg.select, sel_patch)
        pretrain = fill(
            PretrainConfig,
            cfg.pretrain,
            {
                "out": str(root / "pretrain"),
                "seed": cfg.seed,
                "run_name": f"{cfg.sweep_name}/{cell.name}/pretrain",
                "data": {"shards": cfg.shards, "selection": select.out},
            },
            _wandb(cfg, []),
        )  # pretrain adds method/ratio tags itself, from the selection
        finetune = {}
        for ds, overrides in cfg.datasets.items():
            try:
                finetune[ds] = fill(
                    FinetuneConfig,
                    cfg.finetune,
                    dict(overrides or {}),
                    {
                        "out": str(root / "finetune" / ds),
                        "seed": cfg.seed,
                        "encoder": {"weights": pretrain.out},
                        "run_name": f"{cfg.sweep_name}/{cell.name}/finetune/{ds}",
                    },
                    _wandb(cfg, [*tags, f"dataset={ds}"]),
                )
            except ConfigError as exc:
                raise ConfigError(f"datasets.{ds} (finetune keys): {exc}") from None
        planned.append((cell, {"select": select, "pretrain": pretrain, "finetune": finetune}))
    return {"embed": embed, "cells": planned, "skipped": skipped}


def unavailable_methods(cfg: SweepConfig) -> dict[str, str]:
    """Methods of the sweep that cannot run here, with the reason (they are skipped, not faked)."""
    why: dict[str, str] = {}
    if "optidel" in cfg.methods:
        sam = cfg.select.sam
        if not sam.checkpoint and sam.model != "tiny":
            why["optidel"] = (
                "no SAM checkpoint configured: set select.sam.checkpoint=<sam_vit_b.pth>, "
                "or select.sam.model=tiny for a pipeline demonstration with a random tiny SAM"
            )
    return why


def config_digest(stage_cfgs: dict[str, Any]) -> str:
    """sha256 of a cell's resolved stage configs: a rerun with other settings is detected.

    The select keys that only other methods read are left out, so that, say, configuring a
    SAM checkpoint for new OptiDEL cells leaves the finished MedDEL and random cells valid.
    """
    select = to_dict(stage_cfgs["select"])
    for method, keys in METHOD_KEYS.items():
        if method != select["method"]:
            for key in keys:
                select.pop(key)
    text = json.dumps(select, sort_keys=True) + to_yaml(stage_cfgs["pretrain"])
    text += "".join(to_yaml(c) for _, c in sorted(stage_cfgs["finetune"].items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- shell


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def _job_type(name: str) -> Iterator[None]:
    """W&B job_type of the runs a stage opens (wandb reads WANDB_JOB_TYPE at init)."""
    old = os.environ.get("WANDB_JOB_TYPE")
    os.environ["WANDB_JOB_TYPE"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WANDB_JOB_TYPE", None)
        else:
            os.environ["WANDB_JOB_TYPE"] = old


def _timed(name: str, fn: Callable[[Any], Any], stage_cfg: Any) -> dict[str, Any]:
    started = _now()
    t0 = time.perf_counter()
    with _job_type(name.split("/")[0]):
        fn(stage_cfg)
    return {"done": True, "wall_s": round(time.perf_counter() - t0, 3), "started": started, "finished": _now()}


def encoder_paths(cfg: SweepConfig) -> tuple[str, str]:
    """(embedding encoder weights, OptiDEL scorer checkpoint): the user's, or the bootstrap's."""
    if cfg.embed.encoder.weights:
        return cfg.embed.encoder.weights, cfg.select.scorer
    if cfg.bootstrap.steps == 0:
        if cfg.embed.encoder.allow_random_init:
            return "", ""
        raise ConfigError(
            "no embedding encoder: set embed.encoder.weights=<local checkpoint>, or bootstrap.steps>0 to pre-train "
            "one on the pool first"
        )
    out = Path(cfg.out) / "bootstrap"
    return str(out), str(out / MAE_CKPT)


def bootstrap_encoder(cfg: SweepConfig) -> None:
    """Run the bootstrap pre-training when :func:`encoder_paths` points at it (a done one is skipped)."""
    out = Path(cfg.out) / "bootstrap"
    if encoder_paths(cfg)[0] != str(out):
        return
    boot = fill(
        PretrainConfig,
        cfg.pretrain,
        {
            "out": str(out),
            "seed": cfg.seed,
            "run_name": f"{cfg.sweep_name}/bootstrap",
            "data": {"shards": cfg.shards, "selection": ""},
            "trainer": {"max_steps": cfg.bootstrap.steps},
        },
        _wandb(cfg, ["bootstrap"]),
    )
    log.info("sweep: bootstrap MAE encoder, %d steps on the whole pool -> %s", cfg.bootstrap.steps, out)
    record = _timed("bootstrap", pretrain_stage.main, boot)
    if dist.is_main() and not (out / "stage.json").is_file():
        _write_json(out / "stage.json", record)


def check_digest(record: dict[str, Any] | None, digest: str, root: Path) -> None:
    """Refuse to resume or skip a cell that was run with other settings (results would mix)."""
    if record and record.get("config_digest") != digest:
        raise ConfigError(
            f"{root} was run with other settings (config digest {record.get('config_digest')} != {digest}); "
            "use a new sweep out= or delete that cell directory to recompute it"
        )


def runnable(cell: str, todo: list[str], stages: Sequence[str]) -> list[str]:
    """The unfinished steps of a cell that this run does: those of ``stages``, in order.

    Args:
        todo: the cell's unfinished steps in order (``select``, ``pretrain``, ``finetune/<ds>``).
        stages: the stages this run does.

    Raises:
        ConfigError: a requested step would run before an earlier one has finished.
    """
    wanted = [step for step in todo if step.split("/")[0] in stages]
    if wanted and wanted[0] != todo[0]:
        raise ConfigError(
            f"cell {cell}: {wanted[0]} needs {todo[0]}, which has not finished; "
            f"run stages=[{todo[0].split('/')[0]}] for it first"
        )
    gap = next((i for i, step in enumerate(todo) if step not in wanted), len(todo))
    return todo[:gap]


def run_cell(
    cell: Cell, stage_cfgs: dict[str, Any], digest: str, sweep_name: str, stages: Sequence[str] = STAGES
) -> dict[str, Any]:
    """Run the unfinished steps of one cell that belong to ``stages``; returns its cell.json record.

    Every rank calls this; rank 0 alone reads and writes ``cell.json`` and broadcasts
    what it read, so all ranks take the same branch.
    """
    root = Path(stage_cfgs["pretrain"].out).parent
    path = root / CELL_NAME
    record = dist.broadcast_object(_read_json(path) if dist.is_main() else None)
    check_digest(record, digest, root)
    if record and record.get("done"):
        log.info("sweep: cell %s is done (finished %s), skipping", cell.name, record.get("finished"))
        return record
    record = record or {
        "format": CELL_FORMAT,
        "cell": cell.name,
        "method": cell.method,
        "ratio": cell.ratio,
        "sweep": sweep_name,
        "config_digest": digest,
        "stages": {},
        "done": False,
        "started": _now(),
    }
    record["datasets"] = sorted(stage_cfgs["finetune"])
    steps: list[tuple[str, Callable[[Any], Any], Any]] = [
        ("select", select_stage.main, stage_cfgs["select"]),
        ("pretrain", pretrain_stage.main, stage_cfgs["pretrain"]),
    ]
    steps += [(f"finetune/{ds}", finetune_stage.main, c) for ds, c in sorted(stage_cfgs["finetune"].items())]
    todo = [name for name, _, _ in steps if not record["stages"].get(name, {}).get("done")]
    run = runnable(cell.name, todo, stages)
    for name, fn, stage_cfg in steps:
        if name not in run:
            continue
        log.info("sweep: cell %s: %s", cell.name, name)
        record["stages"][name] = _timed(name, fn, stage_cfg)
        if dist.is_main():
            _write_json(path, record)
        dist.barrier()
    if len(run) < len(todo):
        return record
    selection = _read_json(Path(stage_cfgs["select"].out) / SUMMARY_NAME) or {}
    summary = _read_json(Path(stage_cfgs["pretrain"].out) / SUMMARY_NAME) or {}
    record.update(
        kept=selection.get("kept"),
        pool_size=selection.get("pool_size"),
        kept_fraction=selection.get("kept_fraction"),
        images_seen=summary.get("images_seen"),
        pretrain_steps=summary.get("steps"),
        wall_s=round(sum(s["wall_s"] for s in record["stages"].values()), 3),
        done=True,
        finished=_now(),
    )
    if dist.is_main():
        _write_json(path, record)
    dist.barrier()
    return record


def main(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep and write its report; returns the report's paths."""
    dist.init()
    out = Path(cfg.out)
    if not Path(cfg.shards).is_dir():
        raise ConfigError(f"shards={cfg.shards}: no such shard directory; run 'dataeff shard' first")
    for ds, overrides in cfg.datasets.items():
        root = ((overrides or {}).get("data") or {}).get("root") or cfg.finetune.data.root
        if not root or not Path(root).is_dir():
            raise ConfigError(f"datasets.{ds}.data.root={root!r}: no such downstream folder")
    weights, scorer = encoder_paths(cfg)
    # Every config is checked before any work; OptiDEL's scorer (the bootstrap) may not exist yet.
    full = plan(cfg, weights, scorer, precheck=True)
    if dist.is_main():
        save_resolved(cfg, out)
    stages = list(cfg.stages)
    if "embed" in stages:
        bootstrap_encoder(cfg)
        full = plan(cfg, weights, scorer)  # now with the scorer checked too
    elif "select" in stages and not (Path(full["embed"].out) / EMBEDDINGS_HEADER).is_file():
        raise ConfigError(
            f"stages={stages}: select needs the pool embeddings in {full['embed'].out}, which are not "
            "finished; run stages=[embed] first"
        )
    for cell, stage_cfgs in full["cells"]:
        root = Path(cfg.out) / "cells" / cell.name
        check_digest(
            dist.broadcast_object(_read_json(root / CELL_NAME) if dist.is_main() else None),
            config_digest(stage_cfgs),
            root,
        )
    t0 = time.perf_counter()
    if "embed" in stages:
        with _job_type("embed"):
            embed_stage.main(full["embed"])
    if dist.is_main():
        _write_json(
            out / "sweep.json",
            {
                "format": SWEEP_FORMAT,
                "name": cfg.sweep_name,
                "seed": cfg.seed,
                "methods": list(cfg.methods),
                "ratios": list(cfg.ratios),
                "datasets": sorted(cfg.datasets),
                "embed_encoder": weights,
                "pretrain_steps": cfg.pretrain.trainer.max_steps,
                "batch_size": cfg.pretrain.data.batch_size,
                "cells": [c.name for c, _ in full["cells"]],
                "skipped": full["skipped"],
            },
        )
    for skipped in full["skipped"]:
        log.warning("sweep: skipping %s: %s", skipped["cell"], skipped["why"])
    records = [run_cell(cell, c, config_digest(c), cfg.sweep_name, stages) for cell, c in full["cells"]]
    log.info(
        "sweep: %s: %d of %d cells done, in %.1f s",
        ",".join(stages),
        sum(bool(r.get("done")) for r in records),
        len(records),
        time.perf_counter() - t0,
    )
    paths: dict[str, Any] = {}
    if cfg.report and dist.is_main():
        report_cfg = report_stage.ReportConfig(
            run=str(out), alpha=cfg.alpha, wandb=dataclasses.replace(cfg.wandb, group=cfg.wandb.group or cfg.sweep_name)
        )
        paths = report_stage.main(report_cfg)
        # The one thing a user of `make demo` looks for at the end.
        print(f"report: {paths['md']}\ntable:  {paths['csv']}\nplots:  {', '.join(paths['plots'])}", flush=True)
    dist.barrier()
    return dist.broadcast_object(paths)
