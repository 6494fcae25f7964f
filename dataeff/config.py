"""Typed configs: dataclass defaults, merged with YAML and ``key=value`` overrides.

Every stage owns one dataclass (next to its code); the sub-configs shared by
several stages (data stream, encoder, trainer, W&B) live here. Loading goes
through OmegaConf in struct mode, so an unknown key or a value of the wrong
type fails before any work starts, with the offending key in the message.

``--config`` takes a YAML file, or the name of a config shipped inside the package
(``pretrain/tiny`` = ``dataeff/configs/pretrain/tiny.yaml``), so an installed wheel
runs the documented commands without a checkout of the repository.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; annotations only, so 3.10 never imports it
    from importlib.resources.abc import Traversable

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it and the fix."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line (its type name when it has none), for a ConfigError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text shown by ``dataeff <stage> --help``."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def section(cls: type, help: str = "") -> Any:
    """A nested config section (a dataclass field holding another config dataclass)."""
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------- shared sub-configs


@dataclass
class DataConfig:
    """Where pre-training samples come from and how they are streamed."""

    shards: str = option("", help="shard directory (with index.parquet), or several joined by ','")
    selection: str = option("", help="selection directory (selection.parquet); empty = every ok sample")
    extra_shards: list = option([], help="more shard directories streamed in addition (generated samples)")
    image_size: int = option(224, help="side of the square crop fed to the model, px")
    batch_size: int = option(64, help="samples per rank per step")
    num_workers: int = option(2, help="dataloader worker processes per rank")
    shuffle_buffer: int = option(1000, help="samples held in the shuffle buffer (0 = no shuffling)")
    min_scale: float = option(0.2, help="RandomResizedCrop lower scale bound (MAE recipe: 0.2)")
    hflip: bool = option(True, help="random horizontal flip")

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"data.image_size={self.image_size}: must be at least 8 px")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be at least 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: must be >= 0")
        if not 0.0 < self.min_scale <= 1.0:
            raise ConfigError(f"data.min_scale={self.min_scale}: must be in (0, 1]")


@dataclass
class EncoderConfig:
    """A timm ViT encoder: a model name plus a local weights file, or a dataeff export.

    ``encoder=<path>`` on the command line is shorthand for ``encoder.weights=<path>``.
    """

    SHORTHAND: ClassVar[str] = "weights"

    name: str = option("vit_base_patch16_224", help="timm model name")
    weights: str = option(
        "",
        help="local weights: a timm checkpoint (.pth/.bin/.safetensors) or a dataeff pretrain "
        "output (directory or its encoder.safetensors; name and shape then come from encoder.json)",
    )
    img_size: int = option(224, help="input image side, px")
    patch_size: int | None = option(None, help="ViT patch size (None = the model's)")
    depth: int | None = option(None, help="transformer blocks (None = the model's)")
    embed_dim: int | None = option(None, help="token width (None = the model's)")
    num_heads: int | None = option(None, help="attention heads (None = the model's)")
    allow_random_init: bool = option(
        False, help="permit a randomly initialised encoder when no weights are given (tests only)"
    )


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by pre-training and fine-tuning."""

    accelerator: str = option("auto", help="'auto', 'cpu' or 'gpu'")
    devices: str = option("auto", help="'auto' or a number of devices per node")
    num_nodes: int = option(1, help="nodes (torchrun --nnodes / SLURM --nodes)")
    strategy: str = option(
        "auto",
        help="'auto' = deepspeed_stage_2 on GPUs, ddp on CPU; or any Lightning strategy name",
    )
    precision: str = option("auto", help="'auto' = bf16-mixed on GPU, 32-true on CPU")
    max_steps: int = option(1000, help="optimiser steps")
    accumulate_grad_batches: int = option(1, help="gradient accumulation")
    gradient_clip_val: float = option(1.0, help="gradient norm clip (0 = off)")
    log_every_n_steps: int = option(10, help="metrics logging period, steps")
    checkpoint_every_n_steps: int = option(200, help="checkpoint period, steps")
    progress_bar: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps={self.max_steps}: must be at least 1")
        if self.accumulate_grad_batches < 1:
            raise ConfigError("trainer.accumulate_grad_batches must be at least 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging; offline unless the user sets WANDB_MODE."""

    enabled: bool = option(True, help="log to W&B (offline files unless WANDB_MODE=online)")
    project: str = option("dataeff", help="W&B project")
    group: str = option("", help="W&B group (sweeps set it so runs compare by ratio/method)")
    tags: list = option([], help="W&B tags")
    config: dict = option(
        {},
        help="extra W&B run config values (a sweep sets method, ratio, kept_fraction, seed, cell, dataset, alpha)",
    )

    @property
    def mode(self) -> str:
        return os.environ.get("WANDB_MODE", "offline")


# --------------------------------------------------------------------------- loading


def _apply_shorthands(schema: type, dotlist: list[str]) -> list[str]:
    """Rewrite ``node=value`` into ``node.<SHORTHAND>=value`` for dataclass nodes that declare one."""
    hints = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for item in dotlist:
        key, sep, value = item.partition("=")
        f = hints.get(key)
        if sep and f is not None and isinstance(f.default_factory, type):
            shorthand = getattr(f.default_factory, "SHORTHAND", None)
            if shorthand:
                item = f"{key}.{shorthand}={value}"
        out.append(item)
    return out


def _describe(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = getattr(exc, "msg", str(exc)).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"{source}: unknown config key '{key}'"
    return f"{source}: bad value for config key '{key}': {msg}"


def _open_mappings(node: DictConfig) -> None:
    """Let fields typed ``dict`` take new keys (e.g. a sweep's ``datasets.<name>``); dataclass sections stay strict."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (None, dict):
                OmegaConf.set_struct(child, False)
            else:
                _open_mappings(child)


#: Package folder holding the shipped configs, ``<stage>/<name>.yaml`` (package data in pyproject.toml).
PACKAGED_CONFIGS = "configs"
_YAML_SUFFIXES = (".yaml", ".yml")


def _packaged_root() -> Traversable:
    return resources.files("dataeff") / PACKAGED_CONFIGS


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``pretrain/tiny``, ``shard/default``, ...), sorted."""
    names: list[str] = []
    # Traversable, not Path: the package may be imported from a zip, where only this API works.
    todo: list[tuple[str, Traversable]] = [("", _packaged_root())]
    while todo:
        prefix, node = todo.pop()
        if not node.is_dir():
            continue
        for child in node.iterdir():
            if child.is_dir():
                todo.append((f"{prefix}{child.name}/", child))
            elif child.name.endswith(_YAML_SUFFIXES):
                names.append(prefix + child.name.rsplit(".", 1)[0])
    return sorted(names)


def _parse_yaml(source: str, read: Callable[[], Any]) -> DictConfig:
    """``read()`` (an ``OmegaConf.load``) as a mapping, or a one-line ConfigError naming ``source``.

    PyYAML's errors (bad syntax, a ``!!python`` tag it refuses to construct) carry a
    multi-line message and the position; the message keeps the position and the problem.
    """
    try:
        loaded = read()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}; fix the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot be read as a YAML text file ({first_line(exc)})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{source}: the top level must be a mapping of config keys (key: value), not a list")
    return loaded


def _read_config(config: str) -> tuple[str, Any]:
    """``(source shown in errors, parsed YAML)`` for ``--config``: an existing file, else a packaged name.

    A value ending in ``.yaml``/``.yml`` is a path only: a typo in a file name should say the
    file is missing, not look it up among the packaged names.
    """
    path = Path(config)
    if path.is_file():
        return str(path), _parse_yaml(str(path), lambda: OmegaConf.load(path))
    name = config.strip("/")
    if config.endswith(_YAML_SUFFIXES) or not name:
        raise ConfigError(f"config file not found: {config}")
    available = packaged_configs()
    if name not in available:
        raise ConfigError(
            f"config {config!r} is neither a file nor a packaged config name; packaged configs: {', '.join(available)}"
        )
    node = _packaged_root().joinpath(*f"{name}.yaml".split("/"))
    source = f"dataeff/{PACKAGED_CONFIGS}/{name}.yaml"
    return source, _parse_yaml(source, lambda: OmegaConf.load(io.StringIO(node.read_text(encoding="utf-8"))))


def load_config(schema: type[T], config_path: str | None = None, overrides: list[str] | None = None) -> T:
    """Merge ``schema`` defaults, a YAML config and ``key=value`` overrides into a ``schema`` instance.

    Args:
        config_path: a YAML file, or a packaged config name (``pretrain/tiny``; see
            :func:`packaged_configs`) when no file of that name exists.

    Raises:
        ConfigError: naming the file, key and problem, for a missing file or unknown config
            name (listing the packaged names), an unknown key, a wrongly typed value or a
            value rejected by the dataclass's checks.
    """
    merged = OmegaConf.structured(schema)
    OmegaConf.set_struct(merged, True)
    _open_mappings(merged)
    if config_path:
        try:
            source, loaded = _read_config(config_path)
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, config_path)) from None
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, source)) from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(_apply_shorthands(schema, overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, "command line")) from None
    try:
        _record_env_values(merged)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "config")) from None


# --------------------------------------------------------------------------- secrets

#: String values that ``${oc.env:...}`` interpolations of the configs loaded in this process
#: resolved to, each with the expression as written. Kept by value, not by key, so a value
#: copied into another config (a sweep's stage configs, W&B run config) is still recognised.
_ENV_VALUES: dict[str, str] = {}
#: Shorter values are replaced only where they are a whole value, never inside other text.
_MIN_EMBEDDED = 8
_ENV_NAME = re.compile(r"\$\{oc\.env:\s*([^,}\s]+)")


def _record_env_values(node: DictConfig | ListConfig) -> None:
    """Remember the value of every string node whose interpolation reads the environment."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        child = node._get_node(key)  # type: ignore[arg-type]  # int keys index a ListConfig
        if OmegaConf.is_interpolation(node, key):  # type: ignore[arg-type]
            written = str(child._value())  # type: ignore[union-attr]
            value = node[key]  # type: ignore[index]
            if "oc.env" in written and isinstance(value, str) and value and value != written:
                _ENV_VALUES[value] = written
                # The variables themselves too: a value built on one later (a cell's path) is caught.
                for name in _ENV_NAME.findall(written):
                    if os.environ.get(name):
                        _ENV_VALUES.setdefault(os.environ[name], f"${{oc.env:{name}}}")
        elif isinstance(child, (DictConfig, ListConfig)):
            _record_env_values(child)


def redact_env(obj: T) -> T:
    """``obj`` (plain dicts, lists, strings) with environment-derived values written as their ``${oc.env:...}``.

    Every string that an ``${oc.env:...}`` interpolation of a loaded config resolved to is
    put back as the expression, and so is each variable's own value; values of 8 characters
    or more also inside longer strings (a path built on one). Longest values are tried first. Saved configs and W&B run configs go
    through this, so an API key or a site path given through the environment is never
    written out; loading the saved file again resolves it from the environment again.
    """
    if isinstance(obj, str):
        if obj in _ENV_VALUES:
            return _ENV_VALUES[obj]  # type: ignore[return-value]
        for value, written in sorted(_ENV_VALUES.items(), key=lambda item: -len(item[0])):
            if len(value) >= _MIN_EMBEDDED and value in obj:
                obj = obj.replace(value, written)  # type: ignore[assignment]
        return obj
    if isinstance(obj, dict):
        return {k: redact_env(v) for k, v in obj.items()}  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_env(v) for v in obj)
    return obj


def to_yaml(cfg: Any) -> str:
    """A config as YAML, environment-derived values written as their ``${oc.env:...}`` (:func:`redact_env`)."""
    values = redact_env(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return OmegaConf.to_yaml(OmegaConf.create(values))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def describe_keys(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key of ``schema``, for ``--help``."""
    rows = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            rows += describe_keys(f.default_factory, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
