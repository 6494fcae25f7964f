"""OptiDEL end to end on a tiny pool with the tiny random SAM: manifest, mosaics, cache, originals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dataeff.select.optidel import select_hardest

# --------------------------------------------------------------------------- the tiny path, end to end

REPO = Path(__file__).resolve().parents[2]
RATIO = 0.125  # 16 images -> 2 mosaics -> 8 of the ~16 tiny-SAM patches


def build_inputs(root: Path, n: int = 16) -> dict[str, str]:
    """A tiny pool (shards + embeddings) and a tiny MAE scorer checkpoint under ``root``."""
    from dataeff.config import load_config
    from dataeff.models.mae import MAE, MAEConfig
    from dataeff.select import embed
    from tests.fixtures import make_shards, tiny_encoder_config

    shards = make_shards(root, n=n, size=48, samples_per_shard=6)
    emb = root / "emb"
    embed.main(
        load_config(embed.EmbedConfig, str(REPO / "configs/embed/tiny.yaml"), [f"data.shards={shards}", f"out={emb}"])
    )
    torch.manual_seed(0)
    enc = tiny_encoder_config(32)
    mae = MAE(enc, MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2)).eval()
    scorer = root / "pretrain"
    scorer.mkdir()
    torch.save(mae.scoring_state(), scorer / "mae.ckpt")
    return {"shards": str(shards), "embeddings": str(emb), "scorer": str(scorer)}


def run_select(inputs: dict[str, str], out: Path, *extra: str) -> Path:
    from dataeff.config import load_config
    from dataeff.select import stage

    overrides = [
        f"embeddings={inputs['embeddings']}",
        f"scorer={inputs['scorer']}",
        f"out={out}",
        f"ratio={RATIO}",
        *extra,
    ]
    stage.main(load_config(stage.SelectConfig, str(REPO / "configs/select/optidel_tiny.yaml"), overrides))
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("optidel")
    inputs = build_inputs(root)
    out = run_select(inputs, root / "selections" / "tiny", "report.gallery=true")
    return inputs, out


def test_tiny_sam_end_to_end_writes_a_streamable_selection(tiny_run):
    from dataeff.data.stream import iter_shard, list_shards, read_index, read_member, selection_keys
    from dataeff.select.compose import crop_patch, quadrant

    inputs, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_parquet(out / "selection.parquet")
    pool = read_index(inputs["shards"])
    pool = pool[pool["status"] == "ok"]
    n = len(pool)
    # The mosaic count equals round(R * |D|) and only mosaics are kept (no originals asked for).
    assert summary["mosaics"] == round(RATIO * n) == int(table["generated"].sum())
    assert summary["kept"] == round(RATIO * n)
    assert summary["sam_model"].startswith("tiny")
    for key in (
        "mean_hardness_selected",
        "mean_hardness_all",
        "cluster_coverage",
        "clusters_represented",
        "clusters_total",
    ):
        assert key in summary
    assert summary["mean_hardness_selected"] >= summary["mean_hardness_all"] - 1e-6
    assert set(table.loc[~table["generated"], "reason"]) <= {"not_selected", "sam_no_mask", "sam_masks_filtered"}
    # The generated shard dir is standard: index.parquet, every mosaic there and kept in the manifest.
    gen = out / "generated"
    index = read_index(gen)
    assert sorted(index["key"]) == sorted(table.loc[table["generated"], "key"])
    kept, generated_dirs = selection_keys(out)
    assert generated_dirs == [str(gen)] and set(index["key"]) <= kept
    # Mosaics decode, have their top-left source's size, and each quadrant is the resized source crop.
    patches = pd.read_parquet(out / "patches.parquet")
    sources = {s["key"]: np.asarray(s["image"]) for tar in list_shards(inputs["shards"]) for s in iter_shard(tar)}
    seen = 0
    for tar in list_shards(str(gen)):
        for sample in iter_shard(tar):
            meta, mosaic = sample["meta"], np.asarray(sample["image"])
            assert meta["key"].startswith("tiny_mosaic") and len(meta["patches"]) == 4
            first = sources[meta["patches"][0]["source"]]
            assert mosaic.shape == first.shape
            assert len({p["source"] for p in meta["patches"]}) == 4  # mixes source images
            for q, p in enumerate(meta["patches"]):
                part = quadrant(mosaic, q)
                expected = crop_patch(sources[p["source"]], p["box"], (part.shape[1], part.shape[0]))
                assert np.array_equal(part, expected)
                row = patches[(patches["source"] == p["source"]) & (patches["mosaic"] == meta["key"])]
                assert len(row) == 1 and bool(row["selected"].iloc[0]) and int(row["quadrant"].iloc[0]) == q
            seen += 1
    assert seen == summary["mosaics"]
    # The index locates each mosaic's PNG, as PretrainDataModule reads it.
    for row in index.itertuples():
        with open(gen / row.shard, "rb") as fh:
            assert read_member(fh, row.shard, row.key, row.offset, row.length).startswith(b"\x89PNG")
    # Selected patches are the hardest available under the caps (per source image: 2).
    assert patches.loc[patches["selected"]].groupby("source").size().max() <= 2
    # PretrainDataModule streams exactly the mosaics (the only kept samples) with data.selection.
    from dataeff.config import DataConfig
    from dataeff.data.datamodules import PretrainDataModule

    dm = PretrainDataModule(
        DataConfig(
            shards=inputs["shards"], selection=str(out), image_size=32, batch_size=2, num_workers=0, shuffle_buffer=0
        )
    )
    dm.setup("fit")
    streamed = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert sorted(streamed) == sorted(index["key"])
    # Gallery PNGs were written.
    assert {p.name for p in (out / "gallery").glob("*.png")} >= {
        "sources_sam_boxes.png",
        "hardest_patches.png",
        "mosaics.png",
    }


def test_rerun_is_a_no_op_and_cached_shards_are_reused(tiny_run, tmp_path):
    inputs, out = tiny_run
    before = {p.name: p.read_bytes() for p in (out / "generated").glob("*.tar")}
    # A fresh run over the same cache: the SAM results of every shard are reused, output identical.
    fresh = tmp_path / "tiny"  # same run name -> same mosaic keys
    shutil.copytree(out / "sam", fresh / "sam")
    stamps = {p.name: p.stat().st_mtime_ns for p in (fresh / "sam").glob("*.npz")}
    run_select(inputs, fresh)
    assert {p.name: p.stat().st_mtime_ns for p in (fresh / "sam").glob("*.npz")} == stamps
    assert {p.name: p.read_bytes() for p in (fresh / "generated").glob("*.tar")} == before


def test_cells_share_a_sam_cache_dir_and_never_rerun_sam(tiny_run, tmp_path, monkeypatch):
    from dataeff.select import optidel_run

    inputs, out = tiny_run
    cache = tmp_path / "sam-cache"
    shutil.copytree(out / "sam", cache)
    # Every shard is cached: building SAM at all would mean the shared cache was ignored.
    monkeypatch.setattr(optidel_run, "build_sam", lambda *a, **k: pytest.fail("SAM rebuilt despite sam.cache_dir"))
    for ratio in ("0.25", "0.5"):
        cell = run_select(inputs, tmp_path / f"cell-{ratio}", f"sam.cache_dir={cache}", f"ratio={ratio}")
        assert (cell / "selection.parquet").is_file() and not (cell / "sam").exists()


def test_a_changed_sam_setting_redoes_the_shared_cache_and_a_repeat_reuses_it(tiny_run, tmp_path, monkeypatch):
    from dataeff.select import optidel_run
    from dataeff.select.sam_hard import build_tiny_sam

    inputs, out = tiny_run
    cache = tmp_path / "sam-cache"
    shutil.copytree(out / "sam", cache)

    def stamps() -> dict[str, str]:
        return {p.name: str(np.load(p)["fingerprint"]) for p in sorted(cache.glob("*.npz"))}

    built = []
    real_build = optidel_run.build_sam
    monkeypatch.setattr(optidel_run, "build_sam", lambda *a, **k: built.append(1) or real_build(*a, **k))
    first = stamps()
    # The reference generator gives the same masks, but entries it made are its own.
    for n, setting in enumerate(["sam.mask_pass=generator", "sam.images_per_batch=2", "sam.points_per_side=3"], 1):
        run_select(inputs, tmp_path / f"cell{n}", f"sam.cache_dir={cache}", setting)
        now = stamps()
        assert len(built) == n and all(now[name] != first[name] for name in first), setting
        first = now
    # The same settings again: every entry is reused, SAM is not built.
    run_select(inputs, tmp_path / "again", f"sam.cache_dir={cache}", "sam.points_per_side=3")
    assert len(built) == 3 and stamps() == first

    # A SAM checkpoint replaced in place (same path) is not the one the entries were made with.
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(build_tiny_sam(0).state_dict(), ckpt)
    run_select(inputs, tmp_path / "ckpt1", f"sam.cache_dir={cache}", f"sam.checkpoint={ckpt}")
    made = stamps()
    mtime = ckpt.stat().st_mtime_ns
    torch.save(build_tiny_sam(1).state_dict(), ckpt)
    os.utime(ckpt, ns=(mtime + 10**9, mtime + 10**9))  # a later write, also where file times are coarse
    run_select(inputs, tmp_path / "ckpt2", f"sam.cache_dir={cache}", f"sam.checkpoint={ckpt}")
    assert len(built) == 5 and all(stamps()[name] != made[name] for name in made)


def test_include_originals_keeps_the_hardest_originals_within_the_budget(tiny_run, tmp_path):
    inputs, out = tiny_run
    fresh = tmp_path / "tiny"
    shutil.copytree(out / "sam", fresh / "sam")  # reuse the SAM + hardness results
    run_select(
        inputs,
        fresh,
        "ratio=0.25",
        "optidel.include_originals=true",
        "optidel.originals_fraction=0.5",
        "optidel.cluster_cap_factor=0",
    )
    summary = json.loads((fresh / "summary.json").read_text())
    table = pd.read_parquet(fresh / "selection.parquet")
    pool = table[~table["generated"]]
    assert summary["kept"] == 4 and summary["mosaics"] == 2 and summary["originals"] == 2
    kept = pool[pool["kept"]]
    assert len(kept) == 2 and kept["score"].min() >= pool.loc[~pool["kept"], "score"].max()


def test_planted_hard_patch_wins_through_the_real_mae_scorer(tmp_path):
    from dataeff.select.optidel_run import mae_scorer
    from dataeff.select.sam_batch import OneImageAtATime
    from dataeff.select.sam_hard import SamConfig, extract_and_score

    torch.manual_seed(0)
    enc_kwargs = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    from dataeff.config import EncoderConfig
    from dataeff.models.mae import MAE, MAEConfig

    # Pixel-space loss (no per-patch normalisation): with a random decoder the error then tracks
    # the target's energy, so a noisy region has a planted high reconstruction error.
    mae_cfg = MAEConfig(decoder_depth=1, decoder_dim=32, decoder_heads=2, norm_pix_loss=False)
    mae = MAE(EncoderConfig(allow_random_init=True, **enc_kwargs), mae_cfg)
    torch.save(mae.eval().scoring_state(), tmp_path / "mae.ckpt")
    score_fn, side = mae_scorer(str(tmp_path), torch.device("cpu"), mask_seed=0)
    assert side == 32
    image = np.full((64, 64, 3), 120, np.uint8)
    image[20:44, 36:60] = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)  # the hard region

    class Boxes:  # SAM stand-in: three smooth regions and one noisy one
        def generate(self, img):
            boxes = [(0, 0, 30, 30), (2, 34, 30, 62), (36, 20, 60, 44), (34, 2, 62, 18)]
            return [
                {"bbox": [x0, y0, x1 - 1 - x0, y1 - 1 - y0], "area": 300, "predicted_iou": 0.9, "stability_score": 0.9}
                for x0, y0, x1, y1 in boxes
            ]

    cfg = SamConfig(min_area_frac=0.0, max_area_frac=1.0, min_box_side=2)
    out = extract_and_score([("img", image)], OneImageAtATime(Boxes()), cfg, side, score_fn, batch_size=2)
    noisy = int(np.flatnonzero((out["box"] == [36, 20, 60, 44]).all(axis=1))[0])
    chosen, _ = select_hardest(
        out["score"], out["source"], np.zeros(4, np.int64), n=1, max_per_image=4, max_per_cluster=0
    )
    assert chosen[0] == noisy and out["score"][noisy] > 2 * np.delete(out["score"], noisy).max()
    # Fixed mask seed: the same scores again, whatever the batch they are scored in.
    again = extract_and_score([("img", image)], OneImageAtATime(Boxes()), cfg, side, score_fn, batch_size=3)
    assert np.allclose(again["score"], out["score"], rtol=1e-5, atol=1e-6)


def test_invalid_and_excluded_frames_are_never_patch_sources(tiny_run, tmp_path, monkeypatch):
    from dataeff.data.stream import read_index
    from dataeff.select import optidel_run
    from tests.integration.test_select_stage import hand_made_overlap

    inputs, out = tiny_run
    pool = read_index(inputs["shards"])
    pool = pool[pool["status"] == "ok"].sort_values("key")
    lap = np.sort(pool["laplacian_var"].to_numpy())
    threshold = float(lap[4] + lap[5]) / 2  # the 5 least sharp frames count as blurred
    blurred = set(pool.loc[pool["laplacian_var"] < threshold, "key"])
    leaked = [k for k in pool["key"] if k not in blurred][:2]
    overlap = hand_made_overlap(tmp_path, Path(inputs["embeddings"]), leaked)
    # The cached SAM pass saw every frame: a stricter quality rule and an exclusion need no new SAM run.
    cache = tmp_path / "cache"
    shutil.copytree(out / "sam", cache)
    monkeypatch.setattr(optidel_run, "build_sam", lambda *a, **k: pytest.fail("SAM rebuilt although cached"))
    run = run_select(
        inputs, tmp_path / "strict", f"meddel.blur_var={threshold}", f"exclude={overlap}", f"sam.cache_dir={cache}"
    )
    table = pd.read_parquet(run / "selection.parquet").set_index("key")
    patches = pd.read_parquet(run / "patches.parquet")
    summary = json.loads((run / "summary.json").read_text())
    assert len(blurred) == 5 and (table.loc[sorted(blurred), "reason"] == "blurred").all()
    assert (table.loc[leaked, "reason"] == "downstream_overlap").all()
    assert not set(patches["source"]) & (blurred | set(leaked))
    assert table.loc[sorted(blurred), "score"].isna().all()  # no hardness: never a candidate original
    assert summary["images_skipped"]["blurred"] == 5 and summary["excluded"] == 2
    # Budget: round(R * eligible) mosaics from the 14 eligible frames.
    assert summary["mosaics"] == round(RATIO * 14) and summary["quality_checks"]


def test_more_hardness_masks_invalidate_the_cache_and_average_single_mask_losses(tiny_run, tmp_path):
    from dataeff.models.mae import MAE
    from dataeff.select.optidel import mask_seeds
    from dataeff.select.optidel_run import fingerprint, mae_scorer, scorer_input

    inputs, out = tiny_run
    cache = tmp_path / "cache"
    shutil.copytree(out / "sam", cache)
    run = run_select(inputs, tmp_path / "k1", "optidel.hardness_masks=1", f"sam.cache_dir={cache}")
    with np.load(next(cache.glob("*.npz"))) as z:
        stamp = str(z["fingerprint"])
    with np.load(next((out / "sam").glob("*.npz"))) as z:
        assert stamp != str(z["fingerprint"])  # K is part of the fingerprint: the K=4 entries were redone
    assert json.loads((run / "summary.json").read_text())["hardness_masks"] == 1

    batch = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mae = MAE.load_for_scoring(inputs["scorer"])
    singles = [mae.reconstruction_loss(scorer_input(batch), s).numpy() for s in mask_seeds(0, 4)]
    four, _ = mae_scorer(inputs["scorer"], torch.device("cpu"), 0, 4)
    one, _ = mae_scorer(inputs["scorer"], torch.device("cpu"), 0, 1)
    np.testing.assert_allclose(four(batch), np.mean(singles, axis=0), rtol=1e-6)
    assert np.array_equal(one(batch), singles[0])  # K = 1: today's single-mask score, bit for bit
    assert np.allclose(four(batch[1:]), four(batch)[1:], rtol=1e-5)  # independent of the batch
    from dataeff.config import load_config
    from dataeff.select.stage import SelectConfig

    base = [f"embeddings={inputs['embeddings']}", f"scorer={inputs['scorer']}", "out=x"]
    cfgs = [
        load_config(SelectConfig, str(REPO / "configs/select/optidel_tiny.yaml"), [*base, *extra])
        for extra in ([], ["optidel.hardness_masks=2"], ["optidel.hardness=prototype_distance"])
    ]
    assert len({fingerprint(c, inputs["scorer"]) for c in cfgs}) == 3


def test_prototype_distance_hardness_end_to_end(tiny_run, tmp_path):
    inputs, _ = tiny_run
    run = run_select(inputs, tmp_path / "proto", "optidel.hardness=prototype_distance", "report.gallery=true")
    summary = json.loads((run / "summary.json").read_text())
    patches = pd.read_parquet(run / "patches.parquet")
    assert summary["hardness"] == "prototype_distance" and "hardness_masks" not in summary
    assert summary["prototypes_patches"] == round(np.sqrt(len(patches)))
    assert patches["score"].between(0.0, 2.0).all() and patches["score"].nunique() > 1
    assert summary["mosaics"] == round(RATIO * 16)
    names = {Path(p).name for p in summary["gallery"]}
    assert {"mosaic_sources.png", "mosaics.png", "hardest_patches.png"} <= names
