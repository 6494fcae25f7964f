"""``dataeff [-v] <stage> [--config FILE] [key=value ...]``: load a stage's config, run the stage.

Each stage module exposes a config dataclass and ``main(cfg)``; this file only maps
names to them, builds ``--help`` from the dataclass fields, and tears down.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataeff import __version__, dist
from dataeff.config import ConfigError, describe_keys, load_config
from dataeff.quiet import quiet_third_party

#: A stage's ``(main, config class)``. Each loader imports its stage module when called, so
#: ``dataeff --help`` starts without torch; the imports are plain ``from ... import`` lines.
Loader = Callable[[], tuple[Callable[[Any], Any], type]]


def _demo_data() -> tuple[Callable[[Any], Any], type]:
    from dataeff.data.demo import DemoDataConfig, main

    return main, DemoDataConfig


def _shard() -> tuple[Callable[[Any], Any], type]:
    from dataeff.data.remote_shard import ShardConfig, main  # a local out goes straight to shard.main

    return main, ShardConfig


def _index() -> tuple[Callable[[Any], Any], type]:
    from dataeff.data.wds_index import IndexConfig, main

    return main, IndexConfig


def _embed() -> tuple[Callable[[Any], Any], type]:
    from dataeff.select.embed import EmbedConfig, main

    return main, EmbedConfig


def _select() -> tuple[Callable[[Any], Any], type]:
    from dataeff.select.stage import SelectConfig, main

    return main, SelectConfig


def _pretrain() -> tuple[Callable[[Any], Any], type]:
    from dataeff.pretrain import PretrainConfig, main

    return main, PretrainConfig


def _finetune() -> tuple[Callable[[Any], Any], type]:
    from dataeff.finetune import FinetuneConfig, main

    return main, FinetuneConfig


def _sweep() -> tuple[Callable[[Any], Any], type]:
    from dataeff.sweep import SweepConfig, main

    return main, SweepConfig


def _overlap() -> tuple[Callable[[Any], Any], type]:
    from dataeff.overlap import OverlapConfig, main

    return main, OverlapConfig


def _report() -> tuple[Callable[[Any], Any], type]:
    from dataeff.report import ReportConfig, main

    return main, ReportConfig


@dataclass(frozen=True)
class Stage:
    load: Loader
    summary: str
    positional: str | None = None  # config key a bare argument sets (``dataeff report runs/x``)


STAGES: dict[str, Stage] = {
    "demo-data": Stage(
        _demo_data, "build the demo downstream split and messy pre-training pool from the vendored Kvasir-SEG"
    ),
    "shard": Stage(_shard, "convert a tree of raw images into WebDataset shards + index.parquet"),
    "index": Stage(
        _index, "write index.parquet for WebDataset shards another tool wrote (webdataset, img2dataset)", "shards"
    ),
    "embed": Stage(_embed, "embed every sample of a shard set with a ViT encoder, on every rank"),
    "select": Stage(_select, "select a subset (full, random, semdedup, meddel, optidel) and write a manifest"),
    "pretrain": Stage(_pretrain, "pre-train a masked autoencoder on a timm ViT over selected shards"),
    "finetune": Stage(_finetune, "fine-tune a segmentation head on a pre-trained encoder; report mIoU/Dice"),
    "sweep": Stage(_sweep, "run select -> pretrain -> finetune for every (method, ratio) cell and seed, then report"),
    "overlap": Stage(
        _overlap, "find pool samples that copy downstream images (exact, pHash, embedding): the leakage guard"
    ),
    "report": Stage(
        _report, "tabulate a sweep: mIoU, Dice, NormDEL per method and ratio, t-intervals over seeds, plots", "run"
    ),
}


def _stage_help(name: str) -> str:
    _, schema = STAGES[name].load()
    rows = describe_keys(schema)
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in --config YAML or as key=value):"]
    for key, default, text in rows:
        lines.append(f"  {key.ljust(width)}  {text} [default: {default}]")
    return "\n".join(lines) + "\n"


def _with_positional(stage: Stage, overrides: list[str]) -> list[str]:
    if stage.positional and overrides and "=" not in overrides[0]:
        return [f"{stage.positional}={overrides[0]}", *overrides[1:]]
    return overrides


def build_parser(with_stage_help: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataeff",
        description="Data-effective pre-training of medical vision foundation models.",
        epilog="Run 'dataeff <stage> --help' for a stage's config keys.",
    )
    parser.add_argument("--version", action="version", version=f"dataeff {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show all third-party output (Lightning tips and info lines, library warnings) that is muted by default",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(
            name,
            help=stage.summary,
            description=stage.summary,
            epilog=_stage_help(name) if name == with_stage_help else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", metavar="FILE", help="YAML config (e.g. configs/<stage>/tiny.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after --config")
    return parser


def load_stage_config(schema: type, config: str | None, overrides: list[str]) -> Any:
    """:func:`load_config`, naming the replacement when a key is one the schema's ``RENAMED`` lists.

    A stage whose key was renamed (the sweep's ``seed`` became ``seeds``) keeps the old
    name out of its config, so an old file fails as an unknown key; this says what to write.
    """
    try:
        return load_config(schema, config, overrides)
    except ConfigError as exc:
        for old, new in getattr(schema, "RENAMED", {}).items():
            if f"unknown config key '{old}'" in str(exc):
                raise ConfigError(f"{exc}: '{old}' was replaced by {new}") from None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only import a stage's module (and torch) when its --help is asked for.
    wanted = next((a for a in argv if a in STAGES), None) if any(a in ("-h", "--help") for a in argv) else None
    args = build_parser(with_stage_help=wanted).parse_args(argv)
    log = dist.setup_logging()
    cfg: Any = None
    try:
        run, schema = STAGES[args.stage].load()
        cfg = load_stage_config(schema, args.config, _with_positional(STAGES[args.stage], args.overrides))
        # A dead or hung peer inside Lightning or DDP exits 3 naming the collective, like dataeff's own.
        with quiet_third_party(verbose=args.verbose), dist.collective_failures():
            run(cfg)
    except ConfigError as exc:
        print(f"dataeff {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except dist.DistributedError as exc:
        log.error("%s", exc)
        return 3
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every output is written under a temp name and renamed when complete, so what is
        # finished stays valid and a re-run with space continues from it.
        where = f" writing {exc.filename}" if exc.filename else ""
        out = f" (out={cfg.out})" if getattr(cfg, "out", "") else ""
        print(
            f"dataeff {args.stage}: error: {os.strerror(exc.errno)}{where}{out}; "
            "free space and re-run the same command: finished work is kept",
            file=sys.stderr,
        )
        return 1
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
