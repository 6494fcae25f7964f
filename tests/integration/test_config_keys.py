"""Every key a stage's ``--help`` lists is read by that stage: a key that does nothing is a bug.

Each stage runs (``main(cfg)``) on tiny inputs, over a set of runs that covers its options,
while every config dataclass reachable from its schema logs which of its fields are read.
Reads are counted only after ``load_config`` returns, and not while a config is built
(``__post_init__`` checks) or copied wholesale (OmegaConf, ``dataclasses.replace``): a key
counts only when stage code reads it. A sweep's template sections (``embed.*``,
``select.*``, ``pretrain.*``, ``finetune.*``) are copied whole into each cell's stage
config, so such a key passes when the stage reads it; the sweep's own keys (including those
it adds to a section, like ``overlap.enabled``) must be read by the sweep run. Reads are logged per (class, field), so two sections of one stage that
share a class share their reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from dataeff.config import describe_keys, load_config
from tests.fixtures import KVASIR, make_raw_tree, make_shards

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

#: Keys no CPU test can make a stage read, with the reason. Keep it tiny.
ALLOWED_UNREAD: dict[str, set[str]] = {}


# --------------------------------------------------------------------------- read log


class ReadLog:
    """(class, field) reads of config dataclasses, while ``active`` and not ``suspended``."""

    def __init__(self) -> None:
        self.reads: set[tuple[type, str]] = set()
        self.active = False
        self.suspended = 0

    @contextlib.contextmanager
    def suspend(self) -> Iterator[None]:
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1


def config_classes(schema: type) -> set[type]:
    """``schema`` and every dataclass reachable through its section fields."""
    found = {schema}
    for f in dataclasses.fields(schema):
        sub = f.default_factory
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            found |= config_classes(sub)
    return found


def key_owners(schema: type, prefix: str = "") -> dict[str, tuple[type, str]]:
    """Leaf key -> (class that holds it, field name), for every key of ``describe_keys(schema)``."""
    owners = {}
    for f in dataclasses.fields(schema):
        sub = f.default_factory
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            owners |= key_owners(sub, prefix + f.name + ".")
        else:
            owners[prefix + f.name] = (schema, f.name)
    assert set(owners) == {k for k, _, _ in describe_keys(schema)} if not prefix else True
    return owners


@contextlib.contextmanager
def logging_reads(classes: set[type], log: ReadLog) -> Iterator[None]:
    """Log field reads on instances of ``classes``; building and wholesale copies do not count."""
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        patched.append(
            (owner, name, owner.__dict__.get(name, _ABSENT) if isinstance(owner, type) else getattr(owner, name))
        )
        setattr(owner, name, value)

    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self: Any, name: str, _names: set[str] = names) -> Any:
            value = object.__getattribute__(self, name)
            if log.active and not log.suspended and name in _names:
                log.reads.add((type(self), name))
            return value

        def init(self: Any, *args: Any, _init: Callable[..., None] = cls.__init__, **kwargs: Any) -> None:
            with log.suspend():
                _init(self, *args, **kwargs)

        patch(cls, "__getattribute__", getattribute)
        patch(cls, "__init__", init)

    def quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with log.suspend():
                return fn(*args, **kwargs)

        return wrapper

    for name in ("structured", "create", "merge", "to_yaml", "to_container"):
        patch(OmegaConf, name, staticmethod(quiet(getattr(OmegaConf, name))))
    for name in ("replace", "asdict", "astuple"):
        patch(dataclasses, name, quiet(getattr(dataclasses, name)))
    try:
        yield
    finally:
        for owner, name, old in reversed(patched):
            if old is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


_ABSENT = object()


# --------------------------------------------------------------------------- stage runs


def has_key(schema: type, dotted: str) -> bool:
    """Whether ``schema`` has the (dotted) key: runs for options still being added cover them once they land."""
    return dotted in {k for k, _, _ in describe_keys(schema)}


def _load(log: ReadLog, schema: type, config: Path | None, overrides: list[str]) -> Any:
    log.active = False
    cfg = load_config(schema, str(config) if config else None, overrides)
    log.active = True
    return cfg


def run_shard(log: ReadLog, tmp: Path) -> None:
    from dataeff.data.shard import ShardConfig, main

    raw = make_raw_tree(tmp / "raw", n=12, size=48)
    first = next(raw.rglob("*.jpg"))
    shutil.copy(first, first.with_name("copy.jpg"))  # exact duplicate
    (raw / "site0" / "broken.jpg").write_bytes(first.read_bytes()[:200])  # rejected
    out = tmp / "shards"
    main(_load(log, ShardConfig, CONFIGS / "shard/tiny.yaml", [f"src={raw}", f"out={out}", "workers=1"]))
    main(_load(log, ShardConfig, CONFIGS / "shard/tiny.yaml", [f"src={raw}", f"out={out}", "workers=2"]))
    main(
        _load(
            log,
            ShardConfig,
            CONFIGS / "shard/tiny.yaml",
            [f"src={raw}", f"out={out}", "max_side=32", "keep_duplicates=true", "overwrite=true", "name=x"],
        )
    )


def run_demo_data(log: ReadLog, tmp: Path) -> None:
    from dataeff.data.demo import DemoDataConfig, main

    small = ["n_downstream=6", "n_val=2", "n_test=2", "n_pool=12", "n_near_duplicates=3", "n_invalid=3"]
    small += ["n_truncated=1", "n_not_image=1", "n_centres=2", "video_length=4", f"src={KVASIR}"]
    main(_load(log, DemoDataConfig, CONFIGS / "demo-data.yaml", [f"out={tmp / 'demo'}", *small]))
    main(
        _load(
            log, DemoDataConfig, CONFIGS / "demo-data.yaml", [f"out={tmp / 'demo'}", *small, "seed=1", "overwrite=true"]
        )
    )


def run_embed(log: ReadLog, tmp: Path, shards: Path) -> Path:
    from dataeff.select.embed import EmbedConfig, main

    out = tmp / "emb"
    main(_load(log, EmbedConfig, CONFIGS / "embed/tiny.yaml", [f"data.shards={shards}", f"out={out}"]))
    return out


def run_index(log: ReadLog, tmp: Path, shards: Path) -> None:
    from dataeff.data.wds_index import IndexConfig, main

    tmp.mkdir(parents=True)
    for tar in shards.glob("*.tar"):  # dataeff's tars are WebDataset tars like any other
        shutil.copy(tar, tmp / tar.name)
    main(_load(log, IndexConfig, None, [f"shards={tmp}", "progress=false"]))


def run_pretrain(log: ReadLog, tmp: Path, shards: Path) -> Path:
    from dataeff.pretrain import PretrainConfig, main

    out = tmp / "pretrain"
    steps = [
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=1",
        "panel_every_n_steps=1",
        "optim.warmup_steps=1",
    ]
    keys = [f"data.shards={shards}", f"out={out}", "wandb.enabled=true", "wandb.tags=[keys]", *steps]
    main(_load(log, PretrainConfig, CONFIGS / "pretrain/tiny.yaml", keys))
    if has_key(PretrainConfig, "budget"):  # an epoch budget reads `epochs` (full batches: 24 // 8 = 3 steps each)
        epochs = [f"data.shards={shards}", f"out={tmp / 'epochs'}", "budget=epochs", "epochs=1", "wandb.enabled=false"]
        main(_load(log, PretrainConfig, CONFIGS / "pretrain/tiny.yaml", [*epochs, "optim.warmup_steps=1"]))
    return out


def run_select(log: ReadLog, tmp: Path, shards: Path, emb: Path, scorer: Path, overlap: Path | None) -> None:
    from dataeff.select.stage import SelectConfig, main

    common = [f"embeddings={emb}", f"data.shards={shards}"]
    for method in ("full", "random", "semdedup", "meddel"):
        keys = [*common, f"method={method}", f"out={tmp / method}", f"report.gallery={method == 'meddel'}"]
        main(_load(log, SelectConfig, CONFIGS / "select/tiny.yaml", keys))
    if overlap is not None and has_key(SelectConfig, "exclude"):  # the sweep's leakage guard
        keys = [*common, "method=random", f"out={tmp / 'exclude'}", f"exclude={overlap}"]
        main(_load(log, SelectConfig, CONFIGS / "select/tiny.yaml", keys))
    if has_key(SelectConfig, "meddel.phash"):  # MedDEL's shard-signature options (dataeff-shards/3)
        keys = [*common, "method=meddel", f"out={tmp / 'meddel-phash'}", "meddel.phash=true"]
        keys += ["meddel.near_copies=true"] if has_key(SelectConfig, "meddel.near_copies") else []
        main(_load(log, SelectConfig, CONFIGS / "select/tiny.yaml", keys))
    opti = [*common, f"scorer={scorer}", "sam.points_per_side=2", f"sam.cache_dir={tmp / 'sam-cache'}"]
    main(_load(log, SelectConfig, CONFIGS / "select/optidel_tiny.yaml", [*opti, f"out={tmp / 'optidel'}"]))
    if has_key(SelectConfig, "optidel.hardness"):  # the other hardness definition (same SAM pass, cached)
        keys = [*opti, f"out={tmp / 'optidel-proto'}", "optidel.hardness=prototype_distance"]
        main(_load(log, SelectConfig, CONFIGS / "select/optidel_tiny.yaml", keys))


def run_finetune(log: ReadLog, tmp: Path, down: Path) -> None:
    from dataeff.finetune import FinetuneConfig, main

    steps = ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "val_every_n_steps=1", "optim.warmup_steps=1"]
    main(
        _load(
            log,
            FinetuneConfig,
            CONFIGS / "finetune/tiny.yaml",
            [f"data.root={down}", f"out={tmp / 'finetune'}", "encoder.allow_random_init=true", "data.image_size=32"]
            + ["wandb.enabled=true", *steps],
        )
    )


def run_sweep(log: ReadLog, tmp: Path, shards: Path, down: Path) -> Path:
    from dataeff.sweep import SweepConfig, main

    out = tmp / "sweep"
    keys = [f"out={out}", f"shards={shards}", f"datasets.tiny.data.root={down}", "methods=[random,scratch]"]
    keys += ["ratios=[0.5]", "seeds=[0]", "bootstrap.seed=1", "overlap.enabled=true"]
    keys += ["bootstrap.steps=1", "pretrain.trainer.max_steps=1", "pretrain.trainer.checkpoint_every_n_steps=1"]
    keys += [
        "finetune.trainer.max_steps=1",
        "finetune.trainer.checkpoint_every_n_steps=1",
        "finetune.val_every_n_steps=1",
    ]
    keys += ["finetune.optim.warmup_steps=0", "pretrain.optim.warmup_steps=0", "name=keys"]
    main(_load(log, SweepConfig, CONFIGS / "sweep/tiny.yaml", keys))
    main(_load(log, SweepConfig, CONFIGS / "sweep/tiny.yaml", [*keys, "stages=[select]", "report=false"]))
    return out


def run_overlap(log: ReadLog, tmp: Path, emb: Path, down: Path) -> Path:
    from dataeff.overlap import OverlapConfig, main

    out = tmp / "overlap"
    keys = [f"embeddings={emb}", f"datasets.tiny={down}", f"out={out}", "device=cpu"]
    main(_load(log, OverlapConfig, None, keys))
    return out


def run_report(log: ReadLog, sweep_out: Path) -> None:
    from dataeff.report import ReportConfig, main

    keys = [f"run={sweep_out}", "alpha=0.5", "plots=true"]
    main(_load(log, ReportConfig, None, [*keys, "wandb.enabled=false"]))
    main(_load(log, ReportConfig, None, [*keys, "wandb.enabled=true", "wandb.tags=[keys]", "wandb.group=keys"]))


# --------------------------------------------------------------------------- the check


def _schemas() -> dict[str, type | BaseException]:
    """Stage -> its config class, or the error importing it raised (that stage's test reports it)."""
    from dataeff.cli import STAGES

    schemas: dict[str, type | BaseException] = {}
    for name, stage in STAGES.items():
        try:
            schemas[name] = stage.load()[1]
        except Exception as exc:
            schemas[name] = exc
    return schemas


@pytest.fixture(scope="module")
def read_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str] | BaseException]:
    """Stage -> the keys of its ``--help`` that its runs read, or the error its runs raised."""
    from tests.e2e.test_sweep import make_downstream

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    tmp = tmp_path_factory.mktemp("keys")
    schemas = {name: s for name, s in _schemas().items() if isinstance(s, type)}
    classes = set().union(*(config_classes(s) for s in schemas.values()))
    log = ReadLog()
    shards = make_shards(tmp / "pool", n=24, size=48, samples_per_shard=8)
    down = make_downstream(tmp / "down", n=8, size=32)
    reads: dict[str, set[tuple[type, str]]] = {}
    errors: dict[str, BaseException] = {}

    def stage(name: str, run: Callable[[], Any]) -> Any:
        log.reads = set()
        try:
            return run()
        except Exception as exc:  # reported by this stage's test; the other stages still run
            errors[name] = exc
            return None
        finally:
            log.active = False
            reads[name] = log.reads

    with logging_reads(classes, log):
        stage("shard", lambda: run_shard(log, tmp / "shard"))
        stage("demo-data", lambda: run_demo_data(log, tmp / "demo-data"))
        stage("index", lambda: run_index(log, tmp / "index", shards))
        emb = stage("embed", lambda: run_embed(log, tmp / "embed", shards))
        pre = stage("pretrain", lambda: run_pretrain(log, tmp / "pretrain", shards))
        over = stage("overlap", lambda: run_overlap(log, tmp / "overlap", emb, down))
        stage("select", lambda: run_select(log, tmp / "select", shards, emb, pre, over))
        stage("finetune", lambda: run_finetune(log, tmp / "finetune", down))
        sweep_out = stage("sweep", lambda: run_sweep(log, tmp / "sweep", shards, down))
        stage("report", lambda: run_report(log, sweep_out))
    result: dict[str, set[str] | BaseException] = {}
    for name, schema in _schemas().items():
        if not isinstance(schema, type) or name in errors:
            result[name] = errors.get(name) or schema  # type: ignore[assignment]
            continue
        done = {_origin(r) for r in reads[name]}
        result[name] = {key for key, owner in key_owners(schema).items() if _origin(owner) in done}
    return result


def _origin(owner: tuple[type, str]) -> tuple[type, str]:
    """A sweep template class stands for the stage config class it was made from."""
    cls, name = owner
    return getattr(cls, "TEMPLATE_OF", cls), name


@pytest.mark.parametrize(
    "stage", ["shard", "demo-data", "index", "embed", "select", "pretrain", "finetune", "overlap", "sweep", "report"]
)
def test_every_help_key_is_read(stage: str, read_keys: dict[str, set[str] | BaseException]) -> None:
    from dataeff.sweep import FILLED

    for name in [stage, *(FILLED if stage == "sweep" else ())]:
        if isinstance(read_keys[name], BaseException):
            raise AssertionError(f"dataeff {name} could not run on tiny inputs") from read_keys[name]  # type: ignore[misc]
    schema = _schemas()[stage]
    assert isinstance(schema, type)
    unread = []
    schemas = _schemas()
    for key in key_owners(schema):
        section, _, rest = key.partition(".")
        section_schema = schemas.get(section)
        in_stage = isinstance(section_schema, type) and rest in key_owners(section_schema)
        if stage == "sweep" and section in FILLED and in_stage:  # copied whole into the unit's stage config
            read = rest in read_keys[section]  # type: ignore[operator]
        else:
            read = key in read_keys[stage]  # type: ignore[operator]
        if not read and key not in ALLOWED_UNREAD.get(stage, set()):
            unread.append(key)
    assert not unread, f"dataeff {stage} --help lists keys the stage never reads: {unread}"
