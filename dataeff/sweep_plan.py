"""The sweep's pure planning: its config, the (cell, seed) units, filled stage configs, digests.

Nothing here runs a stage or writes a file; :mod:`dataeff.sweep` is the shell that does.
The stage configs are sections of :class:`SweepConfig` and act as per-unit templates: the
sweep fills the keys it owns (:data:`FILLED`: method, ratio, paths, seed, exclusions, W&B
names), so setting one in a sweep config is an unknown-key error.

A *cell* is a (method, ratio) pair; a *unit* is one cell run with one seed, with its own
directory ``cells/<cell>/seed<k>/`` and ``cell.json``. The bootstrap encoder, the pool
embedding and the leakage check (``overlap``) are shared by every unit; they run with
``bootstrap.seed``, never with a seed of ``seeds``, so adding a seed reuses all of them and
every finished unit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dataeff.config import ConfigError, EncoderConfig, WandbConfig, option, section, to_dict
from dataeff.constants import MAE_CKPT
from dataeff.finetune import FinetuneConfig
from dataeff.overlap import OverlapConfig
from dataeff.pretrain import PretrainConfig
from dataeff.select.config import SelectConfig
from dataeff.select.embed import EmbedConfig
from dataeff.select.methods import METHODS
from dataeff.select.sam_hard import check_checkpoint
from dataeff.sweep_layout import BOOTSTRAP_DIR, CELLS_DIR, EMBED_DIR, OVERLAP_DIR, SCRATCH, cell_name, seed_dir

T = TypeVar("T")

#: What one sweep run can do, in order: ``embed`` (bootstrap encoder, pool embedding and the
#: leakage check, shared by every unit), then each unit's ``select``, ``pretrain`` and ``finetune``.
STAGES = ("embed", "select", "pretrain", "finetune")
#: Select keys that only one method reads.
METHOD_KEYS = {"meddel": ("meddel",), "semdedup": ("semdedup",), "optidel": ("scorer", "sam", "optidel")}
#: Encoder keys of a fine-tuning that give its shape (copied from ``pretrain.encoder``).
_SHAPE_KEYS = tuple(f.name for f in dataclasses.fields(EncoderConfig) if f.name not in ("weights", "allow_random_init"))


def template(schema: type, filled: Sequence[str], extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A per-unit template of stage config ``schema``: its keys minus the ``filled`` ones.

    The sweep fills ``filled`` (dotted keys, e.g. ``data.shards``; a whole section by its
    name) in every unit, so the template does not offer them: setting one in a sweep config
    is an unknown-key error. A section that keeps none of its keys is left out; a filled key
    the schema lacks is ignored. ``extra`` fields (``(name, type, field)``) are the sweep's
    own keys of that section. The template has no ``__post_init__``: the checks run on each
    filled stage config (see :func:`plan`), before any work.
    """
    hints = typing.get_type_hints(schema)
    fields: list[tuple[str, Any, Any]] = list(extra)
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
    namespace = {"__module__": __name__, "__doc__": f"{schema.__name__} without the keys the sweep fills per unit."}
    cls = dataclasses.make_dataclass(f"{schema.__name__}Template", fields, namespace=namespace)
    cls.TEMPLATE_OF = schema  # type: ignore[attr-defined]
    return cls


#: Keys the sweep sets in every unit: the templates do not offer them. ``select.exclude`` is
#: the leakage check's output; ``finetune.encoder`` is the unit's pre-trained encoder, or for
#: ``scratch`` a random one of the same shape as ``pretrain.encoder``.
FILLED = {
    "embed": ("out", "data.shards", "seed"),
    "overlap": ("embeddings", "datasets", "out", "pool"),
    "select": ("embeddings", "method", "ratio", "out", "seed", "data.shards", "exclude"),
    "pretrain": ("out", "data.shards", "data.selection", "seed", "run_name"),
    "finetune": ("out", "encoder", "seed", "run_name"),
}
_OVERLAP_EXTRA = [
    (
        "enabled",
        bool,
        option(True, help="run the leakage check before any selection and drop matched pool samples for every method"),
    )
]
if TYPE_CHECKING:  # to the type checker a template has its stage config's fields (a superset)
    EmbedTemplate = EmbedConfig
    SelectTemplate = SelectConfig
    PretrainTemplate = PretrainConfig
    FinetuneTemplate = FinetuneConfig

    class OverlapTemplate(OverlapConfig):
        enabled: bool
else:
    EmbedTemplate = template(EmbedConfig, FILLED["embed"])
    OverlapTemplate = template(OverlapConfig, FILLED["overlap"], _OVERLAP_EXTRA)
    SelectTemplate = template(SelectConfig, FILLED["select"])
    PretrainTemplate = template(PretrainConfig, FILLED["pretrain"])
    FinetuneTemplate = template(FinetuneConfig, FILLED["finetune"])


@dataclass
class BootstrapConfig:
    """The shared stages: a short MAE run on the whole pool (the embedding encoder when none is given)."""

    steps: int = option(200, help="MAE steps (0 = no bootstrap: then embed.encoder.weights is required)")
    seed: int = option(
        0, help="seed of the bootstrap MAE and the embedding pass, shared by every unit (not one of seeds)"
    )

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"bootstrap.steps={self.steps}: must be >= 0")


@dataclass
class SweepConfig:
    """Every (method, ratio) cell, once per seed, through select -> pretrain -> finetune, then ``report``."""

    #: Keys older sweep configs set, and what replaced them (an old config fails naming the new key).
    RENAMED: ClassVar[dict[str, str]] = {"seed": "seeds, a list (e.g. seeds=[0,1,2]): every cell runs once per seed"}

    out: str = option("runs/sweep", help="sweep directory (cells/, embed/, overlap/, bootstrap/, report.md)")
    name: str = option("", help="sweep name: W&B group and report title (default: the name of out)")
    shards: str = option("", help="pre-training pool: shard directory written by 'dataeff shard' (required)")
    methods: list = option(
        ["full", "random", "meddel", "optidel", SCRATCH],
        help=f"selection methods to compare; '{SCRATCH}' = fine-tune a random encoder (no pre-training)",
    )
    ratios: list = option([0.05, 0.2, 0.5, 1.0], help="kept fractions R of the pool; 'full' runs at 1.0 only")
    datasets: dict = option({}, help="downstream name -> finetune keys for it, e.g. {kvasir: {data: {root: ...}}}")
    seeds: list = option(
        [0, 1, 2],
        help="seeds: every cell runs once per seed (random subset, k-means init, pre-training order, masks and "
        "init, fine-tune init and order); the report gives mean and 95% t-interval over them",
    )
    alpha: float = option(1.0, help="NormDEL alpha of the final report")
    stages: list = option(
        list(STAGES), help="what this run does (a SLURM job per stage runs one); a unit is done after all three"
    )
    report: bool = option(True, help="write report.md, report.csv and the plots at the end")
    overwrite: bool = option(
        False, help="recompute the units whose cell.json records other settings or inputs (their folder is emptied)"
    )
    bootstrap: BootstrapConfig = section(BootstrapConfig, help="shared stages: embedding encoder and their seed")
    embed: EmbedTemplate = section(EmbedTemplate, help="embedding of the pool (once per sweep)")
    overlap: OverlapTemplate = section(
        OverlapTemplate, help="leakage check against the downstream datasets (once per sweep, before selection)"
    )
    select: SelectTemplate = section(SelectTemplate, help="selection template (audit.truth, cluster, meddel, sam, ...)")
    pretrain: PretrainTemplate = section(PretrainTemplate, help="pre-training template: one budget for every unit")
    finetune: FinetuneTemplate = section(
        FinetuneTemplate, help="fine-tuning template, per dataset completed by datasets.<name>"
    )
    wandb: WandbConfig = section(WandbConfig, help="W&B for every stage: group = name, tags method/ratio/seed")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("shards is empty: set shards=<pool shard directory written by 'dataeff shard'>")
        if not self.datasets:
            raise ConfigError("datasets is empty: set datasets.<name>.data.root=<downstream folder> (one or more)")
        bad = [m for m in self.methods if m not in METHODS and m != SCRATCH]
        if bad or not self.methods:
            raise ConfigError(f"methods={list(self.methods)}: choose from {', '.join([*METHODS, SCRATCH])}")
        for r in self.ratios:
            if not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise ConfigError(f"ratios: {r!r} is not a fraction in (0, 1] (e.g. 0.05 for 5%)")
        if not self.ratios:
            raise ConfigError("ratios is empty: give kept fractions, e.g. ratios=[0.05,0.2,0.5,1.0]")
        seeds = list(self.seeds)
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ConfigError(f"seeds={seeds}: give one or more integers >= 0, e.g. seeds=[0,1,2]")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds={seeds}: a seed is repeated; give distinct seeds")
        if self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha}: must be >= 0")
        if not self.stages or any(st not in STAGES for st in self.stages):
            raise ConfigError(f"stages={list(self.stages)}: choose one or more of {', '.join(STAGES)}")

    @property
    def sweep_name(self) -> str:
        return self.name or Path(self.out).name


# --------------------------------------------------------------------------- cells and units


@dataclass(frozen=True)
class Cell:
    """A (method, ratio) pair; ``scratch`` has ratio 0 (no pre-training data at all)."""

    method: str
    ratio: float

    @property
    def name(self) -> str:
        return cell_name(self.method, self.ratio)


@dataclass(frozen=True)
class Unit:
    """One cell run with one seed: the resumable piece of work with its own ``cell.json``."""

    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}/{seed_dir(self.seed)}"

    def root(self, out: str | Path) -> Path:
        return Path(out) / CELLS_DIR / self.cell.name / seed_dir(self.seed)


def plan_cells(methods: list[str], ratios: list[float], unavailable: dict[str, str]) -> tuple[list[Cell], list[dict]]:
    """The cells to run, and the ones left out with the reason.

    ``full`` runs once, at 1.0 (``full`` at 0.05 would be the same 100% run again);
    ``random`` at 1.0 keeps every sample, i.e. it *is* ``full``, so it is left out when
    ``full`` is in the sweep. ``scratch`` is one cell without a ratio. A method in
    ``unavailable`` is left out with its reason.
    """
    cells, skipped = [], []
    ratios = sorted({float(r) for r in ratios})
    for method in dict.fromkeys(methods):
        if method in unavailable:
            skipped.append({"cell": method, "why": unavailable[method]})
            continue
        if method == SCRATCH:
            cells.append(Cell(SCRATCH, 0.0))
            continue
        for ratio in [1.0] if method == "full" else ratios:
            cell = Cell(method, ratio)
            if method == "random" and ratio == 1.0 and "full" in methods:
                skipped.append({"cell": cell.name, "why": "random at 1.0 keeps every sample: identical to full-r1"})
                continue
            cells.append(cell)
    return cells, skipped


def plan_units(cells: list[Cell], seeds: Sequence[int]) -> list[Unit]:
    """Every cell once per seed, seed-major: all of seed 0 is done before seed 1 starts."""
    return [Unit(cell, int(seed)) for seed in seeds for cell in cells]


def fill(schema: type[T], template: Any, *patches: dict) -> T:
    """A ``schema`` instance from a template's values with ``patches`` merged on top.

    Types are checked and ``schema``'s ``__post_init__`` runs, as in ``load_config``.

    Raises:
        ConfigError: naming the key, for a wrong key, type or value.
    """
    try:
        base = template if isinstance(template, dict) else OmegaConf.to_container(OmegaConf.structured(template))
        merged = OmegaConf.merge(OmegaConf.structured(schema), base, *patches)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"{schema.__name__}: bad key '{getattr(exc, 'full_key', '?')}': {str(exc).splitlines()[0]}"
        ) from None


def _wandb(cfg: SweepConfig, tags: list[str], values: dict[str, Any] | None = None) -> dict:
    """A stage's ``wandb`` patch: the sweep's group, its tags plus ``tags``, and run config ``values``.

    ``values`` (cell, method, ratio, seed, dataset, ...) become top-level W&B config keys, so a
    dashboard can group runs by them and plot against them; tags alone cannot be an axis.
    """
    w = cfg.wandb
    return {
        "wandb": {
            "enabled": w.enabled,
            "project": w.project,
            "group": w.group or cfg.sweep_name,
            "tags": [*w.tags, *tags],
            "config": {**w.config, **(values or {})},
        }
    }


def wandb_values(cfg: SweepConfig, unit: Unit, dataset: str | None = None) -> dict[str, Any]:
    """The W&B config values of a unit's runs (kept_fraction is added once the selection exists)."""
    cell = unit.cell
    values: dict[str, Any] = {
        "sweep": cfg.sweep_name,
        "cell": cell.name,
        "method": cell.method,
        "ratio": cell.ratio,
        "seed": unit.seed,
        "alpha": cfg.alpha,
    }
    if cell.method == SCRATCH:
        values["kept_fraction"] = 0.0  # no pre-training data: a point at x = 0 on a ratio chart
    if dataset is not None:
        values["dataset"] = dataset
    return values


def downstream_roots(cfg: SweepConfig) -> dict[str, str]:
    """Downstream dataset name -> its folder (``datasets.<name>.data.root``, else ``finetune.data.root``)."""
    return {
        ds: ((overrides or {}).get("data") or {}).get("root") or cfg.finetune.data.root
        for ds, overrides in sorted(cfg.datasets.items())
    }


def overlap_config(cfg: SweepConfig) -> OverlapConfig | None:
    """The sweep's leakage check (one for all units), or None when ``overlap.enabled`` is false."""
    if not cfg.overlap.enabled:
        return None
    keys = {k: v for k, v in to_dict(cfg.overlap).items() if k != "enabled"}
    out = Path(cfg.out)
    patch = {
        "embeddings": str(out / EMBED_DIR),
        "datasets": downstream_roots(cfg),
        "out": str(out / OVERLAP_DIR),
        "pool": cfg.shards,
    }
    try:
        return fill(OverlapConfig, keys, patch)
    except ConfigError as exc:
        raise ConfigError(f"overlap: {exc}") from None


def plan(cfg: SweepConfig, embed_weights: str, scorer: str, precheck: bool = False) -> dict[str, Any]:
    """Every stage config of the sweep, filled and checked, before any work.

    Args:
        embed_weights: encoder weights of the embedding pass (the bootstrap output or the
            user's ``embed.encoder.weights``).
        scorer: OptiDEL hardness model (MAE checkpoint) when the select template has
            ``scorer`` empty; '' when none.
        precheck: check the templates before the bootstrap exists: OptiDEL units are
            then checked for their SAM only (their scorer is not written yet).

    Returns:
        ``{"embed": EmbedConfig, "overlap": OverlapConfig | None, "units": [(Unit, {"select",
        "pretrain", "finetune": {ds: cfg}})], "skipped": [{"cell", "why"}]}``; ``select`` and
        ``pretrain`` are None for ``scratch`` units.
    """
    out = Path(cfg.out)
    embed_patch = {"out": str(out / EMBED_DIR), "data": {"shards": cfg.shards}, "seed": cfg.bootstrap.seed}
    if embed_weights:
        embed_patch["encoder"] = {"weights": embed_weights}
    embed = fill(EmbedConfig, cfg.embed, embed_patch)
    overlap = overlap_config(cfg)
    cells, skipped = plan_cells(list(cfg.methods), list(cfg.ratios), unavailable_methods(cfg))
    shape = {key: getattr(cfg.pretrain.encoder, key) for key in _SHAPE_KEYS}
    planned = []
    for unit in plan_units(cells, cfg.seeds):
        cell, root = unit.cell, unit.root(out)
        tags = [f"method={cell.method}", f"ratio={cell.ratio:g}", f"seed={unit.seed}"]
        select = pretrain = None
        encoder = {**shape, "weights": "", "allow_random_init": True}
        if cell.method != SCRATCH:
            select = _select_config(cfg, unit, embed.out, overlap, scorer, precheck)
            pretrain = fill(
                PretrainConfig,
                cfg.pretrain,
                {
                    "out": str(root / "pretrain"),
                    "seed": unit.seed,
                    "run_name": f"{cfg.sweep_name}/{unit.name}/pretrain",
                    "data": {"shards": cfg.shards, "selection": select.out},
                },
                _wandb(cfg, [f"seed={unit.seed}"], wandb_values(cfg, unit)),
            )  # pretrain adds method/ratio tags and kept_fraction itself, from the selection
            encoder = {**shape, "weights": pretrain.out, "allow_random_init": False}
        finetune = {}
        for ds, overrides in cfg.datasets.items():
            try:
                finetune[ds] = fill(
                    FinetuneConfig,
                    cfg.finetune,
                    dict(overrides or {}),
                    {
                        "out": str(root / "finetune" / ds),
                        "seed": unit.seed,
                        "encoder": encoder,
                        "run_name": f"{cfg.sweep_name}/{unit.name}/finetune/{ds}",
                    },
                    _wandb(cfg, [*tags, f"dataset={ds}"], wandb_values(cfg, unit, ds)),
                )
            except ConfigError as exc:
                raise ConfigError(f"datasets.{ds} (finetune keys): {exc}") from None
        planned.append((unit, {"select": select, "pretrain": pretrain, "finetune": finetune}))
    return {"embed": embed, "overlap": overlap, "units": planned, "skipped": skipped}


def _select_config(
    cfg: SweepConfig, unit: Unit, embeddings: str, overlap: OverlapConfig | None, scorer: str, precheck: bool
) -> SelectConfig:
    patch: dict[str, Any] = {
        "embeddings": embeddings,
        "method": unit.cell.method,
        "ratio": unit.cell.ratio,
        "out": str(unit.root(cfg.out) / "selection"),
        "seed": unit.seed,
        "data": {"shards": cfg.shards},
        # Every method loses the same leaked pool samples, before it chooses.
        "exclude": overlap.out if overlap else "",
    }
    if unit.cell.method == "optidel" and not cfg.select.scorer:
        patch["scorer"] = scorer
        if precheck and not Path(scorer).exists():
            check_checkpoint(cfg.select.sam)
            patch["method"] = "random"  # every other key of the template is still checked
    return fill(SelectConfig, cfg.select, patch)


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
    """sha256 of a unit's resolved stage configs: a rerun with other settings is detected.

    Only the unit's own configs count (its seed, not the sweep's seed list), so adding a
    seed leaves every finished unit valid. The select keys that only other methods read
    are left out, so that, say, configuring a SAM checkpoint for new OptiDEL cells leaves
    the finished MedDEL and random units valid.
    """
    text = ""
    if stage_cfgs["select"] is not None:
        select = to_dict(stage_cfgs["select"])
        select.pop("overwrite", None)  # how to treat an old output, not what is computed
        for method, keys in METHOD_KEYS.items():
            if method != select["method"]:
                for key in keys:
                    select.pop(key)
        text = json.dumps(select, sort_keys=True) + _digest_yaml(stage_cfgs["pretrain"])
    text += "".join(_digest_yaml(c) for _, c in sorted(stage_cfgs["finetune"].items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest_yaml(stage_cfg: Any) -> str:
    """A stage config's YAML without ``wandb.config``: the unit's W&B labels (and kept_fraction,
    added at run time) change no result, and leaving them out keeps the digests of units
    finished before W&B run config values existed."""
    values = to_dict(stage_cfg)
    values["wandb"].pop("config", None)
    values.pop("overwrite", None)
    return OmegaConf.to_yaml(OmegaConf.create(values))


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
    out = Path(cfg.out) / BOOTSTRAP_DIR
    return str(out), str(out / MAE_CKPT)


def bootstrap_config(cfg: SweepConfig) -> PretrainConfig:
    """The bootstrap MAE run: the pre-training template on the whole pool, ``bootstrap.steps`` steps."""
    return fill(
        PretrainConfig,
        cfg.pretrain,
        {
            "out": str(Path(cfg.out) / BOOTSTRAP_DIR),
            "seed": cfg.bootstrap.seed,
            "run_name": f"{cfg.sweep_name}/bootstrap",
            "data": {"shards": cfg.shards, "selection": ""},
            "trainer": {"max_steps": cfg.bootstrap.steps},
        },
        _wandb(cfg, ["bootstrap"]),
    )


def runnable(unit: str, todo: list[str], stages: Sequence[str]) -> list[str]:
    """The unfinished steps of a unit that this run does: those of ``stages``, in order.

    Args:
        todo: the unit's unfinished steps in order (``select``, ``pretrain``, ``finetune/<ds>``).
        stages: the stages this run does.

    Raises:
        ConfigError: a requested step would run before an earlier one has finished.
    """
    wanted = [step for step in todo if step.split("/")[0] in stages]
    if wanted and wanted[0] != todo[0]:
        raise ConfigError(
            f"cell {unit}: {wanted[0]} needs {todo[0]}, which has not finished; "
            f"run stages=[{todo[0].split('/')[0]}] for it first"
        )
    gap = next((i for i, step in enumerate(todo) if step not in wanted), len(todo))
    return todo[:gap]


def slurm_jobs(cfg: SweepConfig) -> list[str]:
    """What ``launch/slurm/sweep.sh`` submits: one job chain per (cell, seed) unit, then a report.

    Lines ``unit <job name stem> <stages, comma-separated> <key=value ...>`` (the keys that
    restrict a sweep run to that unit), then ``report <key=value ...>``. A ``scratch`` unit
    has only a ``finetune`` job and needs no embedding.
    """
    cells, _ = plan_cells(list(cfg.methods), list(cfg.ratios), unavailable_methods(cfg))
    lines = []
    for unit in plan_units(cells, cfg.seeds):
        cell = unit.cell
        keys = [f"methods=[{cell.method}]", f"seeds=[{unit.seed}]"]
        stages = "finetune"
        if cell.method != SCRATCH:
            keys.insert(1, f"ratios=[{cell.ratio!r}]")
            stages = "select,pretrain,finetune"
        lines.append(" ".join(["unit", f"{cell.name}-s{unit.seed}", stages, *keys]))
    w = cfg.wandb
    lines.append(
        f"report run={cfg.out} alpha={cfg.alpha} wandb.enabled={w.enabled} wandb.project={w.project} "
        f"wandb.group={w.group or cfg.sweep_name}"
    )
    return lines
