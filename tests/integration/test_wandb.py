"""A tiny sweep with W&B on (offline): one ended run per stage and unit, with the unit as config values.

The offline ``run-*.wandb`` files are read back record by record with wandb's own protobuf
``Record`` type. wandb 0.31 has no Python reader for them (its Go core writes them), so
the file framing is read here: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
LevelDB-log blocks of 32 KiB whose chunks are ``crc32c (4) | length (2) | type (1) | data``,
type 1 = a whole record, 2/3/4 = its first/middle/last part.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from dataeff import metrics
from dataeff.config import load_config
from dataeff.sweep import SweepConfig, main
from tests.e2e.test_sweep import TINY, make_downstream
from tests.fixtures import make_shards

_BLOCK = 32 * 1024
_CHUNK_HEADER = 7


def read_records(path: Path) -> list[Any]:
    """Every ``wandb_internal_pb2.Record`` of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B run file"
    records, parts, pos = [], b"", 7
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def read_run(path: Path) -> dict[str, Any]:
    """Name, id, group, job type, config, summary and whether it ended, of one offline run file."""
    run: dict[str, Any] = {"config": {}, "summary": {}, "ended": False, "file": path}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run |= {"id": r.run_id, "name": r.display_name, "group": r.run_group, "job_type": r.job_type}
            for item in r.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                run["summary"][key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                run["summary"][key] = json.loads(item.value_json)
        elif kind == "exit":
            run["ended"] = True
    # wandb stores a config value as {"value": v} (with {"desc": ...} beside it).
    run["config"] = {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in run["config"].items()}
    return run


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("wandb")
    old = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb-dir"), WANDB_SILENT="true")
    (tmp / "wandb-dir").mkdir()
    try:
        shards = make_shards(tmp, n=24, size=48, samples_per_shard=8)
        # One pool image leaks into the downstream set: the leakage check drops it from every
        # selection, which gives the random selection a gallery sheet to log.
        down = make_downstream(tmp / "down", leak=sorted((tmp / "raw").rglob("*.jpg"))[0])
        keys = [
            f"out={tmp / 'run'}",
            "name=wb",
            f"shards={shards}",
            f"datasets.tiny.data.root={down}",
            "methods=[random,scratch]",
            "ratios=[0.5]",
            "seeds=[0]",
            "select.report.gallery=true",
            "wandb.enabled=true",
            "wandb.project=dataeff-test",
        ]
        main(load_config(SweepConfig, str(TINY), keys))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    files = sorted((tmp / "run").rglob("run-*.wandb"))
    return tmp / "run", [read_run(p) for p in files]


@pytest.mark.timeout(300)
def test_one_ended_run_per_stage_and_unit(wandb_sweep: tuple[Path, list[dict[str, Any]]]) -> None:
    _, runs = wandb_sweep
    names = sorted(r["name"] for r in runs)
    assert names == [
        "wb/bootstrap",
        "wb/embed",
        "wb/random-r0.5/seed0/finetune/tiny",
        "wb/random-r0.5/seed0/pretrain",
        "wb/random-r0.5/seed0/select",
        "wb/report",
        "wb/scratch/seed0/finetune/tiny",
    ]
    assert len({r["id"] for r in runs}) == len(runs), "two stages logged into one run"
    for r in runs:
        assert r["ended"], f"{r['name']} was never finished"
        assert r["group"] == "wb"
        stage = r["name"].split("/")[-2] if r["name"].endswith("/tiny") else r["name"].split("/")[-1]
        assert r["job_type"] == stage, r["name"]


def test_unit_runs_carry_the_unit_as_config(wandb_sweep: tuple[Path, list[dict[str, Any]]]) -> None:
    _, runs = wandb_sweep
    by_name = {r["name"]: r["config"] for r in runs}
    for stage in ("select", "pretrain", "finetune/tiny"):
        config = by_name[f"wb/random-r0.5/seed0/{stage}"]
        assert {k: config[k] for k in ("method", "ratio", "seed", "cell")} == {
            "method": "random",
            "ratio": 0.5,
            "seed": 0,
            "cell": "random-r0.5",
        }, stage
        assert config["kept_fraction"] == pytest.approx(12 / 24), stage
    assert by_name["wb/random-r0.5/seed0/finetune/tiny"]["dataset"] == "tiny"
    scratch = by_name["wb/scratch/seed0/finetune/tiny"]
    assert (scratch["method"], scratch["kept_fraction"], scratch["dataset"]) == ("scratch", 0.0, "tiny")


def test_stage_runs_log_their_numbers(wandb_sweep: tuple[Path, list[dict[str, Any]]]) -> None:
    out, runs = wandb_sweep
    by_name = {r["name"]: r["summary"] for r in runs}
    tuned = by_name["wb/random-r0.5/seed0/finetune/tiny"]
    results = json.loads((out / "cells/random-r0.5/seed0/finetune/tiny/results.json").read_text())
    assert tuned["test/miou"] == pytest.approx(results["miou"])
    for key in ("test/dice", "test/per_image_dice", "test/normdel"):
        assert key in tuned, key
    assert tuned["kept_fraction"] == pytest.approx(0.5)  # a metric too: a line plot's x axis
    assert tuned["test/normdel"] == pytest.approx(metrics.normdel(results["miou"], 0.5))
    scratch = by_name["wb/scratch/seed0/finetune/tiny"]
    assert "test/miou" in scratch and "test/normdel" not in scratch  # no pre-training data, no NormDEL
    embed = by_name["wb/embed"]
    assert embed["embed/count"] == 24 and embed["embed/images_per_s"] > 0
    select = by_name["wb/random-r0.5/seed0/select"]
    assert select["select/kept"] == 12 and select["select/reason/downstream_overlap"] == 1
    assert any(k.startswith("gallery/") for k in select), "the gallery sheets were not logged"
    # A logged table shows in the summary as nested keys (report/_type, report/path, ...).
    assert by_name["wb/report"]["report/_type"] == "table-file"
    assert by_name["wb/report"]["normdel/_type"] == "image-file"
