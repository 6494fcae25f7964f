"""``dataeff sweep``: select -> pretrain -> finetune for every (method, ratio) cell and seed, then report.

The shell around :mod:`dataeff.sweep_plan` (config, units, filled stage configs, digests):
it runs the shared stages once, then each (cell, seed) unit, calling each stage's ``main``
in this process, so under ``torchrun`` every stage runs in the same process group.

Shared by every unit and every seed (run with ``bootstrap.seed``): the bootstrap MAE encoder
(when no embedding encoder is given; also OptiDEL's hardness scorer), the pool embedding,
and the leakage check (``overlap/``: pool samples that copy a downstream image, dropped by
every selection with reason ``downstream_overlap``).

Layout under ``out`` (names in :mod:`dataeff.sweep_layout`)::

    sweep.json                          plan: cells, seeds, skipped cells and why, budget
    bootstrap/  embed/  overlap/        shared by every unit
    cells/<method>-r<ratio>/seed<k>/    selection/, pretrain/, finetune/<dataset>/, cell.json
    cells/scratch/seed<k>/              finetune/<dataset>/, cell.json (random-init encoder)
    report.md  report.csv  report_seeds.csv  report_comparisons.csv  plots/

``cell.json`` (format ``dataeff-cell/1``) records each stage's wall time, the kept count,
the pre-training images seen, the seed and ``done``. A done unit is skipped on a rerun; an
unfinished one resumes from its first unfinished stage (the stages resume themselves too).
``stages=[...]`` limits a run to some of ``embed``, ``select``, ``pretrain``, ``finetune``
(``launch/slurm/sweep.sh`` submits one job chain per unit this way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dataeff import dist, provenance
from dataeff import finetune as finetune_stage
from dataeff import overlap as overlap_stage
from dataeff import pretrain as pretrain_stage
from dataeff import report as report_stage
from dataeff.config import ConfigError, WandbConfig, redact_env
from dataeff.constants import CELL_FORMAT, CELL_NAME, EMBEDDINGS_HEADER, SUMMARY_NAME, SWEEP_FORMAT
from dataeff.files import read_json, save_resolved, write_json_atomic
from dataeff.input_checks import check_downstream, check_shards
from dataeff.lock import output_lock
from dataeff.select import embed as embed_stage
from dataeff.select import stage as select_stage
from dataeff.sweep_layout import BOOTSTRAP_DIR, SWEEP_JSON
from dataeff.sweep_plan import (
    FILLED,
    STAGES,
    Cell,
    SweepConfig,
    Unit,
    bootstrap_config,
    config_digest,
    encoder_paths,
    plan,
    plan_cells,
    runnable,
    unavailable_methods,
)
from dataeff.trainer import stable_run_id

# The planning names tests, launchers and the CLI look up on this module.
__all__ = [
    "FILLED",
    "STAGES",
    "Cell",
    "SweepConfig",
    "Unit",
    "config_digest",
    "main",
    "plan",
    "plan_cells",
    "run_unit",
    "unavailable_methods",
]

log = logging.getLogger("dataeff")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True)


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


@contextlib.contextmanager
def _wandb_run(w: WandbConfig, name: str, job_type: str, out_dir: Path, values: dict[str, Any]) -> Iterator[Any]:
    """A W&B run for a stage without a Lightning logger (embed, select), ended on leaving; None when off.

    Rank 0 only. Its id is derived from the stage's directory and name, like the Lightning
    runs', so a rerun of the stage continues the same run instead of adding one.
    """
    if not w.enabled or not dist.is_main():
        yield None
        return
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=w.project,
        group=w.group or None,
        job_type=job_type,
        name=name,
        tags=list(w.tags) or None,
        dir=os.fspath(out_dir),
        id=stable_run_id(out_dir, name),
        resume="allow",
        mode=w.mode,  # type: ignore[arg-type]  # WANDB_MODE, checked by wandb
        config=redact_env({**w.config, **values}),  # environment values as their ${oc.env:...}
    )
    exit_code = 1
    try:
        yield run
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)


def _log_embed(cfg: SweepConfig, out: str, stats: dict[str, Any]) -> None:
    """The ``<sweep>/embed`` run: pool size and this pass's throughput (nothing when it had nothing to do)."""
    if not stats["wall_s"]:
        return
    values = {"sweep": cfg.sweep_name, "seed": cfg.bootstrap.seed}
    w = dataclasses.replace(cfg.wandb, group=cfg.wandb.group or cfg.sweep_name)
    with _wandb_run(w, f"{cfg.sweep_name}/embed", "embed", Path(out), values) as run:
        if run is not None:
            # images_per_s is rank 0's rate; the ranks embed disjoint shards side by side.
            run.log({f"embed/{k}": v for k, v in stats.items()})


def _log_select(sweep_name: str, unit: Unit, select_cfg: Any, w: WandbConfig) -> None:
    """The ``<sweep>/<cell>/seed<k>/select`` run: counts, counts by reason, the audit, the gallery sheets."""
    summary = read_json(Path(select_cfg.out) / SUMMARY_NAME)
    if summary is None or not w.enabled or not dist.is_main():
        return
    import wandb

    name = f"{sweep_name}/{unit.name}/select"
    values = {"kept_fraction": summary.get("kept_fraction")}
    with _wandb_run(w, name, "select", Path(select_cfg.out), values) as run:
        keys = ("pool_size", "excluded", "eligible", "target", "kept", "kept_fraction", "generated", "wall_s")
        logged: dict[str, Any] = {f"select/{k}": summary[k] for k in keys if summary.get(k) is not None}
        logged |= {f"select/reason/{r}": n for r, n in (summary.get("counts_by_reason") or {}).items()}
        audit = summary.get("audit") or {}
        logged |= {f"audit/{k}": v for k, v in audit.items() if isinstance(v, (int, float))}
        for reason, row in (audit.get("per_reason") or {}).items():
            logged |= {f"audit/{reason}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
        for sheet in summary.get("gallery") or []:
            path = Path(sheet) if Path(sheet).is_absolute() else Path(select_cfg.out) / sheet
            if path.suffix == ".png" and path.is_file():
                logged[f"gallery/{path.stem}"] = wandb.Image(os.fspath(path))
        run.log(logged)


def _with_kept_fraction(stage_cfg: Any, select_out: str) -> Any:
    """A fine-tuning config whose W&B values hold the unit's kept fraction (known once selected):
    the x axis of a ratio chart, and what NormDEL needs."""
    kept = (read_json(Path(select_out) / SUMMARY_NAME) or {}).get("kept_fraction")
    if kept is None:
        return stage_cfg
    w = stage_cfg.wandb
    return dataclasses.replace(stage_cfg, wandb=dataclasses.replace(w, config={**w.config, "kept_fraction": kept}))


def _timed(name: str, fn: Callable[[Any], Any], stage_cfg: Any) -> dict[str, Any]:
    started = _now()
    t0 = time.perf_counter()
    with _job_type(name.split("/")[0]):
        fn(stage_cfg)
    return {"done": True, "wall_s": round(time.perf_counter() - t0, 3), "started": started, "finished": _now()}


def bootstrap_encoder(cfg: SweepConfig) -> None:
    """Run the bootstrap pre-training when :func:`encoder_paths` points at it (a done one is skipped)."""
    out = Path(cfg.out) / BOOTSTRAP_DIR
    if encoder_paths(cfg)[0] != str(out):
        return
    log.info("sweep: bootstrap MAE encoder, %d steps on the whole pool -> %s", cfg.bootstrap.steps, out)
    record = _timed("bootstrap", pretrain_stage.main, bootstrap_config(cfg))
    if dist.is_main() and not (out / "stage.json").is_file():
        _write_json(out / "stage.json", record)


def check_digest(
    record: dict[str, Any] | None,
    digest: str,
    root: Path,
    inputs: dict[str, str] | None = None,
    overwrite: bool = False,
) -> bool:
    """Whether a unit's ``cell.json`` was made with these settings and inputs (True also when there is none).

    Raises:
        ConfigError: it was not and ``overwrite`` is false: resuming or skipping would mix results.
    """
    if not record:
        return True
    if record.get("config_digest") != digest:
        what = f"other settings (config digest {record.get('config_digest')} != {digest})"
    else:
        differs = provenance.difference({"inputs": record.get("inputs", inputs)}, {"inputs": inputs})
        if differs is None:
            return True
        what = f"other inputs: {differs}"
    if overwrite:
        return False
    raise ConfigError(f"{root} was run with {what}; set overwrite=true to recompute it, or use a new sweep out=")


def sweep_inputs(cfg: SweepConfig) -> dict[str, str]:
    """Content identities of what every unit is made from: the pool and each downstream dataset."""
    inputs = {"shards": provenance.pool_identity(cfg.shards)}
    for ds, overrides in sorted(cfg.datasets.items()):
        root = ((overrides or {}).get("data") or {}).get("root") or cfg.finetune.data.root
        inputs[f"datasets.{ds}"] = provenance.path_identity(root)
    return inputs


def _steps(stage_cfgs: dict[str, Any]) -> list[tuple[str, Callable[[Any], Any], Any]]:
    """A unit's steps in order; a scratch unit has only its fine-tunings."""
    steps: list[tuple[str, Callable[[Any], Any], Any]] = []
    if stage_cfgs["select"] is not None:
        steps += [("select", select_stage.main, stage_cfgs["select"])]
        steps += [("pretrain", pretrain_stage.main, stage_cfgs["pretrain"])]
    steps += [(f"finetune/{ds}", finetune_stage.main, c) for ds, c in sorted(stage_cfgs["finetune"].items())]
    return steps


def run_unit(
    unit: Unit,
    stage_cfgs: dict[str, Any],
    digest: str,
    sweep_name: str,
    out: str,
    stages: Sequence[str] = STAGES,
    inputs: dict[str, str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the unfinished steps of one (cell, seed) unit that belong to ``stages``; returns its cell.json.

    Every rank calls this; rank 0 holds the unit folder's lock, alone reads and writes
    ``cell.json`` and broadcasts what it read, so all ranks take the same branch. A unit
    made with other settings or ``inputs`` is refused, or with ``overwrite`` emptied and redone.
    """
    with output_lock(unit.root(out), "sweep", collective=True):
        return _run_unit(unit, stage_cfgs, digest, sweep_name, out, stages, inputs, overwrite)


def _run_unit(
    unit: Unit,
    stage_cfgs: dict[str, Any],
    digest: str,
    sweep_name: str,
    out: str,
    stages: Sequence[str],
    inputs: dict[str, str] | None,
    overwrite: bool,
) -> dict[str, Any]:
    root = unit.root(out)
    path = root / CELL_NAME
    record = dist.broadcast_object(read_json(path) if dist.is_main() else None)
    if not check_digest(record, digest, root, inputs, overwrite):
        log.info("sweep: overwrite=true, emptying %s (made with other settings or inputs)", root)
        if dist.is_main():
            provenance.remove(root, ("*",))
        dist.barrier()
        record = None
    if record and record.get("done"):
        log.info("sweep: cell %s is done (finished %s), skipping", unit.name, record.get("finished"))
        return record
    cell = unit.cell
    record = record or {
        "format": CELL_FORMAT,
        "cell": cell.name,
        "method": cell.method,
        "ratio": cell.ratio,
        "seed": unit.seed,
        "sweep": sweep_name,
        "config_digest": digest,
        "inputs": inputs,
        "stages": {},
        "done": False,
        "started": _now(),
    }
    record["datasets"] = sorted(stage_cfgs["finetune"])
    steps = _steps(stage_cfgs)
    todo = [name for name, _, _ in steps if not record["stages"].get(name, {}).get("done")]
    run = runnable(unit.name, todo, stages)
    for name, fn, stage_cfg in steps:
        if name not in run:
            continue
        log.info("sweep: cell %s: %s", unit.name, name)
        if name.startswith("finetune/") and stage_cfgs["select"] is not None:
            stage_cfg = _with_kept_fraction(stage_cfg, stage_cfgs["select"].out)
        record["stages"][name] = _timed(name, fn, stage_cfg)
        if name == "select" and stage_cfgs["pretrain"] is not None:
            # The pretrain config carries the unit's W&B group, tags and values.
            _log_select(sweep_name, unit, stage_cfg, stage_cfgs["pretrain"].wandb)
        if dist.is_main():
            _write_json(path, record)
        dist.barrier()
    if len(run) < len(todo):
        return record
    record.update(_unit_facts(stage_cfgs), done=True, finished=_now())
    record["wall_s"] = round(sum(s["wall_s"] for s in record["stages"].values()), 3)
    if dist.is_main():
        _write_json(path, record)
    dist.barrier()
    return record


def _unit_facts(stage_cfgs: dict[str, Any]) -> dict[str, Any]:
    """Kept count and pre-training budget of a finished unit (zero data for scratch)."""
    if stage_cfgs["select"] is None:
        return {"kept": 0, "kept_fraction": 0.0, "images_seen": 0, "pretrain_steps": 0}
    selection = read_json(Path(stage_cfgs["select"].out) / SUMMARY_NAME) or {}
    summary = read_json(Path(stage_cfgs["pretrain"].out) / SUMMARY_NAME) or {}
    return {
        "kept": selection.get("kept"),
        "pool_size": selection.get("pool_size"),
        "kept_fraction": selection.get("kept_fraction"),
        "images_seen": summary.get("images_seen"),
        "pretrain_steps": summary.get("steps"),
    }


def _check_inputs(cfg: SweepConfig, full: dict[str, Any]) -> None:
    """Fail before any work on a missing pool or downstream folder, or on a stage run too early."""
    check_shards(cfg.shards, "shards")
    for ds, overrides in cfg.datasets.items():
        data = (overrides or {}).get("data") or {}
        root = data.get("root") or cfg.finetune.data.root
        check_downstream(root, data.get("layout") or cfg.finetune.data.layout, f"datasets.{ds}.data.root")
    stages = list(cfg.stages)
    if "embed" in stages or "select" not in stages:
        return
    missing = []
    if not (Path(full["embed"].out) / EMBEDDINGS_HEADER).is_file():
        missing.append(f"the pool embeddings in {full['embed'].out}")
    if full["overlap"] is not None and not (Path(full["overlap"].out) / SUMMARY_NAME).is_file():
        missing.append(f"the leakage check in {full['overlap'].out}")
    if missing:
        raise ConfigError(
            f"stages={stages}: select needs {' and '.join(missing)}, which are not finished; run stages=[embed] first"
        )


def _sweep_record(cfg: SweepConfig, full: dict[str, Any], weights: str) -> dict[str, Any]:
    pre = cfg.pretrain
    return {
        "format": SWEEP_FORMAT,
        "name": cfg.sweep_name,
        "seeds": [int(s) for s in cfg.seeds],
        "shared_seed": cfg.bootstrap.seed,
        "methods": list(cfg.methods),
        "ratios": list(cfg.ratios),
        "datasets": sorted(cfg.datasets),
        "embed_encoder": weights,
        "overlap": full["overlap"].out if full["overlap"] is not None else None,
        "budget": pre.budget,
        "pretrain_epochs": pre.epochs if pre.budget == "epochs" else None,
        "pretrain_steps": pre.trainer.max_steps if pre.budget == "steps" else None,
        "batch_size": pre.data.batch_size,
        "cells": sorted({u.cell.name for u, _ in full["units"]}),
        "units": [u.name for u, _ in full["units"]],
        "skipped": full["skipped"],
    }


def main(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep and write its report; returns the report's paths."""
    dist.init()
    out = Path(cfg.out)
    weights, scorer = encoder_paths(cfg)
    # Every config is checked before any work; OptiDEL's scorer (the bootstrap) may not exist yet.
    full = plan(cfg, weights, scorer, precheck=True)
    _check_inputs(cfg, full)
    if dist.is_main():
        save_resolved(cfg, out)
    stages = list(cfg.stages)
    if "embed" in stages:
        bootstrap_encoder(cfg)
        full = plan(cfg, weights, scorer)  # now with the scorer checked too
    inputs = sweep_inputs(cfg)
    for unit, stage_cfgs in full["units"]:
        root = unit.root(out)
        check_digest(
            dist.broadcast_object(read_json(root / CELL_NAME) if dist.is_main() else None),
            config_digest(stage_cfgs),
            root,
            inputs,
            cfg.overwrite,
        )
    t0 = time.perf_counter()
    if "embed" in stages:
        with _job_type("embed"):
            stats = embed_stage.main(full["embed"])
        _log_embed(cfg, full["embed"].out, stats)
        if full["overlap"] is not None:
            # Before any selection: every method then drops the same leaked pool samples.
            with _job_type("overlap"):
                if dist.is_main():  # one process: the stage reads files and embeds a few images
                    overlap_stage.main(full["overlap"])
                dist.barrier()
    # The run that does the shared stages owns the plan; a per-unit SLURM job (methods=[m] seeds=[k])
    # must not overwrite it with its one unit.
    if dist.is_main() and ("embed" in stages or not (out / SWEEP_JSON).is_file()):
        _write_json(out / SWEEP_JSON, _sweep_record(cfg, full, weights))
    for skipped in full["skipped"]:
        log.warning("sweep: skipping %s: %s", skipped["cell"], skipped["why"])
    records = [
        run_unit(unit, c, config_digest(c), cfg.sweep_name, cfg.out, stages, inputs, cfg.overwrite)
        for unit, c in full["units"]
    ]
    log.info(
        "sweep: %s: %d of %d units done, in %.1f s",
        ",".join(stages),
        sum(bool(r.get("done")) for r in records),
        len(full["units"]),
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
