"""Input errors exit 2 with one line naming the key, before any output exists.

One table row per (stage, bad input): ``dataeff.cli.main`` runs in ``tmp_path`` and must
return 2, print exactly one stderr line that names the config key, and leave no ``out``
directory (so no config.yaml, split.json, checkpoint or W&B run either).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dataeff import cli
from dataeff.config import ConfigError, EncoderConfig
from dataeff.data.stream import list_shards, shard_keys
from dataeff.encoder_check import check_encoder
from dataeff.input_checks import check_selection
from dataeff.select.embed import shard_set_hash
from tests.fixtures import REPO, make_shards, write_selection

KVASIR = REPO / "data" / "kvasir-seg"
CONFIGS = REPO / "configs"


def _pairs(root: Path, n: int = 6, size: int = 32) -> Path:
    """``n`` small Kvasir-SEG image/mask pairs in the Kvasir layout."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for path in sorted((KVASIR / "images").glob("*.jpg"))[:n]:
        image = Image.open(path).convert("RGB").resize((size, size))
        image.save(root / "images" / f"{path.stem}.jpg")
        Image.open(KVASIR / "masks" / f"{path.stem}.png").convert("L").resize((size, size)).save(
            root / "masks" / f"{path.stem}.png"
        )
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good shards and pairs, and broken copies: no ok sample, an undecodable image, a mask of the wrong size."""
    tmp = tmp_path_factory.mktemp("inputs")
    shards = make_shards(tmp, n=8, size=32, samples_per_shard=4)
    empty = tmp / "empty_shards"
    shutil.copytree(shards, empty)
    index = pd.read_parquet(empty / "index.parquet")
    index["status"] = "rejected"
    index.to_parquet(empty / "index.parquet")
    pairs = _pairs(tmp / "pairs")
    broken = tmp / "broken_pairs"
    shutil.copytree(pairs, broken)
    first = sorted((broken / "images").iterdir())[0]
    first.write_bytes(b"this is not a JPEG")
    mismatched = tmp / "mismatched_pairs"
    shutil.copytree(pairs, mismatched)
    mask = sorted((mismatched / "masks").iterdir())[0]
    Image.open(mask).resize((16, 16)).save(mask)
    keys = sorted(pd.read_parquet(shards / "index.parquet").query("status == 'ok'")["key"])
    other_pool = write_selection(tmp / "other_pool_selection", keys, set(keys[:4]))
    summary = json.loads((other_pool / "summary.json").read_text())
    summary["inputs"] = {"shard_set_hash": "0" * 64}
    (other_pool / "summary.json").write_text(json.dumps(summary))
    return {
        "shards": shards,
        "empty": empty,
        "pairs": pairs,
        "broken": broken,
        "mismatched": mismatched,
        "other_pool": other_pool,
        "no_selection": tmp,
    }


Args = Callable[[dict[str, Path]], list[str]]
PRETRAIN = ["pretrain", "--config", str(CONFIGS / "pretrain" / "tiny.yaml")]
FINETUNE = ["finetune", "--config", str(CONFIGS / "finetune" / "tiny.yaml"), "encoder.allow_random_init=true"]
EMBED = ["embed", "--config", str(CONFIGS / "embed" / "tiny.yaml")]
SWEEP = ["sweep", "--config", str(CONFIGS / "sweep" / "tiny.yaml")]

#: (row id, dataeff arguments without out=, the key the message must name)
ROWS: list[tuple[str, Args, str]] = [
    ("pretrain-missing-shards", lambda d: ["pretrain", "data.shards=/nope"], "data.shards"),
    ("pretrain-empty-shards", lambda d: [*PRETRAIN, f"data.shards={d['empty']}"], "data.shards"),
    ("pretrain-cnn", lambda d: [*PRETRAIN, f"data.shards={d['shards']}", "encoder.name=resnet50"], "encoder.name"),
    (
        "pretrain-unknown-encoder",
        lambda d: [*PRETRAIN, f"data.shards={d['shards']}", "encoder.name=vit_nonexistent"],
        "encoder.name",
    ),
    (
        "pretrain-selection-of-another-pool",
        lambda d: [*PRETRAIN, f"data.shards={d['shards']}", f"data.selection={d['other_pool']}"],
        "data.selection",
    ),
    (
        "pretrain-no-selection-there",
        lambda d: [*PRETRAIN, f"data.shards={d['shards']}", f"data.selection={d['no_selection']}"],
        "data.selection",
    ),
    ("finetune-missing-root", lambda d: ["finetune", "data.root=/nope", "encoder.allow_random_init=true"], "data.root"),
    ("finetune-undecodable-image", lambda d: [*FINETUNE, f"data.root={d['broken']}"], "data.root"),
    ("finetune-mask-size", lambda d: [*FINETUNE, f"data.root={d['mismatched']}"], "data.root"),
    ("finetune-cnn", lambda d: [*FINETUNE, f"data.root={d['pairs']}", "encoder.name=resnet50"], "encoder.name"),
    (
        "finetune-unknown-encoder",
        lambda d: [*FINETUNE, f"data.root={d['pairs']}", "encoder.name=vit_nonexistent"],
        "encoder.name",
    ),
    ("finetune-bad-shape", lambda d: [*FINETUNE, f"data.root={d['pairs']}", "encoder.embed_dim=65"], "encoder."),
    ("embed-missing-shards", lambda d: [*EMBED, "data.shards=/nope"], "data.shards"),
    (
        "embed-unknown-encoder",
        lambda d: [*EMBED, f"data.shards={d['shards']}", "encoder.name=vit_nonexistent"],
        "encoder.name",
    ),
    ("select-missing-embeddings", lambda d: ["select", "embeddings=/nope"], "embeddings"),
    ("overlap-missing-dataset", lambda d: ["overlap", "embeddings=/nope", "datasets.kvasir=/nope"], "datasets.kvasir"),
    ("sweep-missing-shards", lambda d: [*SWEEP, "shards=/nope", f"datasets.tiny.data.root={d['pairs']}"], "shards"),
    (
        "sweep-missing-dataset",
        lambda d: [*SWEEP, f"shards={d['shards']}", "datasets.tiny.data.root=/nope"],
        "datasets.tiny.data.root",
    ),
    ("shard-missing-src", lambda d: ["shard", "src=/nope"], "src"),
]


@pytest.mark.parametrize(("args", "key"), [pytest.param(a, k, id=i) for i, a, k in ROWS])
def test_input_error_exits_2_with_one_line_before_any_output(
    args: Args, key: str, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = cli.main([*args(inputs), f"out={out}"])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert key in lines[0], lines[0]
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written, not even ./runs or ./wandb"


def test_selection_of_the_same_pool_passes(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The pool check compares what 'dataeff embed' hashed: the same shards pass, another hash fails."""
    tars = list_shards(str(inputs["shards"]))
    keys = shard_keys(tars)
    sel = tmp_path / "sel"
    shutil.copytree(inputs["other_pool"], sel)
    summary = json.loads((sel / "summary.json").read_text())
    summary["inputs"] = {"shard_set_hash": shard_set_hash(tars, keys)}
    (sel / "summary.json").write_text(json.dumps(summary))
    check_selection(str(sel), tars, keys, str(inputs["shards"]), "data.selection")
    with pytest.raises(ConfigError, match="another pool"):
        check_selection(str(inputs["other_pool"]), tars, keys, str(inputs["shards"]), "data.selection")


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_224", "vit_base_patch16_224.augreg_in21k", "deit_small_distilled_patch16_224"]
)
def test_encoder_check_accepts_timm_vits(name: str) -> None:
    """ViT subclasses and tagged names pass; the meta-device build allocates no weights."""
    assert check_encoder(EncoderConfig(name=name, allow_random_init=True)).name == name
