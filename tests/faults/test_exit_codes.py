"""Damaged inputs exit 2 with one line naming the file, never a traceback: one table row per case.

Rows cover the shapes a cluster user meets: a raw tree without images, config files that
are not valid YAML, tars cut short or overwritten, index values that point outside their
tar, embeddings files that are damaged. ``dataeff.cli.main`` runs in-process; the last
stderr line must be ``dataeff <stage>: error: ...`` naming the damaged file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataeff import cli
from dataeff.constants import INDEX_NAME
from tests.fixtures import REPO, make_shards

CONFIGS = REPO / "configs"
EMBED = ["embed", "--config", str(CONFIGS / "embed" / "tiny.yaml")]
PRETRAIN = ["pretrain", "--config", str(CONFIGS / "pretrain" / "tiny.yaml"), "trainer.max_steps=2"]
SELECT = ["select", "--config", str(CONFIGS / "select" / "tiny.yaml"), "method=random", "ratio=0.5"]


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _scramble_tars(shards: Path) -> Path:
    """Every tar overwritten by the same number of seeded random bytes: headers no longer parse."""
    rng = np.random.default_rng(0)
    for tar in sorted(shards.glob("*.tar")):
        tar.write_bytes(rng.integers(0, 256, tar.stat().st_size, dtype=np.uint8).tobytes())
    return shards


def _cut_tar(shards: Path) -> Path:
    tar = sorted(shards.glob("*.tar"))[-1]
    tar.write_bytes(tar.read_bytes()[:1500])
    return shards


def _index_value(shards: Path, column: str, value: int) -> Path:
    index = pd.read_parquet(shards / INDEX_NAME)
    first_ok = index.index[index["status"] == "ok"][0]
    index.loc[first_ok, column] = value
    index.to_parquet(shards / INDEX_NAME)
    return shards


def _damage(path: Path, keep: int = 40) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good shards of 16 images and their embeddings."""
    tmp = tmp_path_factory.mktemp("pool")
    shards = make_shards(tmp, n=16, size=32, samples_per_shard=8)
    emb = tmp / "emb"
    assert cli.main([*EMBED, f"data.shards={shards}", f"out={emb}"]) == 0
    return {"shards": shards, "emb": emb}


#: What a row builds in its own folder: (arguments, the file the message must name).
Case = Callable[[dict[str, Path], Path], tuple[list[str], str]]


def _empty_tree(pool: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    (tmp / "raw" / "a").mkdir(parents=True)
    return ["shard", f"src={tmp / 'raw'}", f"out={tmp / 'out'}"], "no images under src"


def _no_image_names(pool: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    (tmp / "raw").mkdir()
    (tmp / "raw" / "notes.txt").write_text("frame list\n")
    return ["shard", f"src={tmp / 'raw'}", f"out={tmp / 'out'}"], "no images under src"


def _yaml(text: bytes) -> Case:
    def case(pool: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
        path = tmp / "bad.yaml"
        path.write_bytes(text)
        return ["shard", "--config", str(path), f"src={tmp}", f"out={tmp / 'out'}"], str(path)

    return case


def _embed_on(damage: Callable[[Path], Path], named: str) -> Case:
    def case(pool: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
        shards = damage(_copy(pool["shards"], tmp / "shards"))
        return [*EMBED, f"data.shards={shards}", f"out={tmp / 'out'}"], named

    return case


def _pretrain_on(damage: Callable[[Path], Path], named: str, workers: int = 0) -> Case:
    def case(pool: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
        shards = damage(_copy(pool["shards"], tmp / "shards"))
        args = [*PRETRAIN, f"data.shards={shards}", f"data.num_workers={workers}", f"out={tmp / 'out'}"]
        return args, named

    return case


def _select_with(damage: Callable[[dict[str, Path]], Path], named: str) -> Case:
    def case(pool: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
        copied = {"shards": _copy(pool["shards"], tmp / "shards"), "emb": _copy(pool["emb"], tmp / "emb")}
        damage(copied)
        return [*SELECT, f"embeddings={copied['emb']}", f"data.shards={copied['shards']}", f"out={tmp / 'out'}"], named

    return case


ROWS: list[tuple[str, Case]] = [
    ("shard-empty-tree", _empty_tree),
    ("shard-no-image-names", _no_image_names),
    ("yaml-syntax", _yaml(b"workers: [1, 2\nmin_side: 3\n")),
    ("yaml-python-tag", _yaml(b"workers: !!python/object/apply:os.system ['true']\n")),
    ("yaml-tab-indent", _yaml(b"workers: 1\n\tmin_side: 2\n")),
    ("yaml-top-level-list", _yaml(b"- workers\n- 1\n")),
    ("yaml-binary", _yaml(b"\xff\xfe\x00\x81 not text")),
    ("embed-scrambled-tar", _embed_on(_scramble_tars, "demo-000000.tar")),
    ("embed-cut-tar", _embed_on(_cut_tar, "demo-000001.tar")),
    ("embed-negative-offset", _embed_on(lambda s: _index_value(s, "offset", -512), INDEX_NAME)),
    ("embed-huge-length", _embed_on(lambda s: _index_value(s, "length", 1 << 60), INDEX_NAME)),
    ("embed-damaged-index", _embed_on(lambda s: _damage(s / INDEX_NAME).parent, INDEX_NAME)),
    ("pretrain-negative-offset", _pretrain_on(lambda s: _index_value(s, "offset", -4096), INDEX_NAME)),
    ("pretrain-huge-length", _pretrain_on(lambda s: _index_value(s, "length", 1 << 62), INDEX_NAME)),
    ("pretrain-unaligned-offset", _pretrain_on(lambda s: _index_value(s, "offset", 1000), INDEX_NAME)),
    ("pretrain-cut-tar", _pretrain_on(_cut_tar, INDEX_NAME)),
    ("pretrain-scrambled-tar", _pretrain_on(_scramble_tars, ".tar")),
    ("pretrain-scrambled-tar-loader-worker", _pretrain_on(_scramble_tars, ".tar", workers=1)),
    ("select-damaged-index", _select_with(lambda p: _damage(p["shards"] / INDEX_NAME), INDEX_NAME)),
    ("select-damaged-embeddings", _select_with(lambda p: _damage(p["emb"] / "rank-00000.npz"), "rank-00000.npz")),
    ("select-damaged-header", _select_with(lambda p: _damage(p["emb"] / "header.json", 10), "header.json")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for i, c in ROWS])
def test_damaged_input_exits_2_naming_the_file(
    case: Case, pool: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    args, named = case(pool, tmp_path)
    code = cli.main(args)
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert last.startswith(f"dataeff {args[0]}: error: "), err
    assert named in last, last
