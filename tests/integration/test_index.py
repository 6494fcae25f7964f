"""``dataeff index`` on shards written by ``webdataset.ShardWriter``, then embed, select and stream them."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from dataeff.cli import main as cli_main
from dataeff.config import DataConfig
from dataeff.data.datamodules import PretrainDataModule
from dataeff.data.quality import InspectOptions, inspect_bytes
from dataeff.select.embed import load_embeddings
from dataeff.select.manifest import read_selection
from tests.fixtures import jpeg_bytes, kvasir_images, make_shards, png_bytes, small_jpeg

REPO = Path(__file__).resolve().parents[2]


class _Boom:
    """Unpickling this creates a marker directory: proof that pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 samples in 4 tars written by webdataset.ShardWriter: 12 good images and 4 quirky samples."""
    tmp = tmp_path_factory.mktemp("wds")
    marker = tmp / "pickle_ran"
    jpgs = [small_jpeg(p, 48) for p in kvasir_images(12)]
    samples = [{"__key__": f"frame{i:03d}", "jpg": data, "cls": i % 3, "json": {"i": i}} for i, data in enumerate(jpgs)]
    samples[3] = {"__key__": "frame003", "png": png_bytes(Image.open(io.BytesIO(jpgs[3])).convert("RGB")), "cls": 0}
    samples[5]["pyd"] = pickle.dumps(_Boom(str(marker)))  # an untrusted member next to a good image
    samples += [
        {"__key__": "black", "jpg": jpeg_bytes(Image.new("RGB", (48, 40))), "cls": 1},
        {"__key__": "caption_only", "txt": "no image here"},
        {"__key__": "cut", "jpg": jpgs[0][: len(jpgs[0]) // 2]},
        {"__key__": "copy_of_1", "jpg": jpgs[1]},
    ]
    out = tmp / "corpus"
    out.mkdir()
    with wds.ShardWriter(str(out / "corpus-%06d.tar"), maxcount=4, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    assert cli_main(["index", str(out), "progress=false", "min_side=16"]) == 0
    return {"tmp": tmp, "dir": out, "marker": marker, "jpgs": jpgs}


def test_index_has_the_shard_format_and_a_row_per_sample(corpus, tmp_path):
    index = pd.read_parquet(corpus["dir"] / "index.parquet")
    shard_index = pd.read_parquet(make_shards(tmp_path, n=2) / "index.parquet")
    assert list(index.columns) == list(shard_index.columns)
    assert (index.dtypes == shard_index.dtypes).all()
    assert len(index) == 16 and not corpus["marker"].exists()
    by_key = index.set_index("key")
    assert by_key.loc["caption_only", ["status", "reason"]].tolist() == ["rejected", "no_image_member"]
    assert by_key.loc["cut", ["status", "reason"]].tolist() == ["rejected", "truncated"]
    assert by_key.loc["copy_of_1", ["status", "reason"]].tolist() == ["duplicate", "exact_duplicate_of:frame001"]
    assert by_key.loc["frame003", "source"] == "frame003.png"
    ok = index[index["status"] == "ok"]
    assert len(ok) == 13 and set(ok["shard"]) == {f"corpus-{i:06d}.tar" for i in range(4)}
    # The quality statistics and signatures are those `dataeff shard` computes for the same bytes.
    expected = inspect_bytes(corpus["jpgs"][7], "frame007.jpg", InspectOptions(min_side=16)).row
    for column in ("mean", "std", "laplacian_var", "dark_frac", "bright_frac", "phash", "sha256", "width"):
        assert by_key.loc["frame007", column] == expected[column], column


def test_index_refuses_to_replace_an_index_without_overwrite(corpus, capsys):
    assert cli_main(["index", str(corpus["dir"]), "progress=false"]) == 2
    assert "index.parquet exists already" in capsys.readouterr().err


def test_embed_select_and_stream_run_on_indexed_shards(corpus, tmp_path):
    emb, sel = tmp_path / "emb", tmp_path / "sel"
    embed = ["embed", "--config", str(REPO / "configs/embed/tiny.yaml"), f"data.shards={corpus['dir']}"]
    assert cli_main([*embed, f"out={emb}"]) == 0
    keys, _ = load_embeddings(emb)
    assert len(keys) == 13 and not corpus["marker"].exists()
    select = ["select", "--config", str(REPO / "configs/select/tiny.yaml"), f"embeddings={emb}"]
    assert cli_main([*select, f"out={sel}", "report.gallery=false"]) == 0
    frame, _ = read_selection(sel)
    assert frame.set_index("key").loc["black", "reason"] == "dark"  # MedDEL's invalid-frame rule
    data = PretrainDataModule(
        DataConfig(shards=str(corpus["dir"]), selection=str(sel), image_size=32, batch_size=2, num_workers=0),
        rank=0,
        world_size=1,
    )
    data.setup("fit")
    streamed = [k for b in data.train_dataloader() for k in b["key"]]
    kept = set(frame.loc[frame["kept"], "key"])
    assert streamed and set(streamed) <= kept and len(streamed) == len(kept) // 2 * 2
