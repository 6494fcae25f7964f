"""OptiDEL pure core: budget, hardness-first selection under diversity caps, mosaics."""

from __future__ import annotations

import numpy as np
import pytest

from dataeff.config import ConfigError
from dataeff.select.compose import compose_mosaic, crop_patch, quadrant
from dataeff.select.optidel import (
    OptidelConfig,
    assign_mosaics,
    budget,
    cluster_cap,
    coverage,
    select_hardest,
)


def _pool(n_images: int = 10, per_image: int = 5, n_clusters: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    sources = np.repeat([f"img{i:03d}" for i in range(n_images)], per_image)
    clusters = np.repeat(np.arange(n_images) % n_clusters, per_image)
    scores = rng.random(len(sources)).astype(np.float32)
    return scores, sources, clusters


def test_budget_is_round_ratio_times_pool():
    assert budget(0.05, 1000, False, 0.5) == (50, 0)
    assert budget(0.25, 10, False, 0.5) == (3, 0)  # round half up, as every select method
    assert budget(0.001, 10, False, 0.5) == (1, 0)  # at least one
    mosaics, originals = budget(0.1, 1000, True, 0.3)
    assert (mosaics, originals) == (70, 30) and mosaics + originals == 100


def test_planted_hard_patch_is_selected_before_easy_ones():
    scores, sources, clusters = _pool()
    scores[:] = 0.1
    scores[17] = 9.0  # one patch the model reconstructs badly
    chosen, passes = select_hardest(scores, sources, clusters, n=4, max_per_image=4, max_per_cluster=0)
    assert chosen[0] == 17
    # Without caps, selection is exactly the top-n by score.
    scores2, *_ = _pool(seed=1)
    chosen2, _ = select_hardest(scores2, sources, clusters, n=8, max_per_image=100, max_per_cluster=0)
    assert set(chosen2) == set(np.argsort(-scores2)[:8])


def test_per_cluster_and_per_image_caps_are_respected():
    scores, sources, clusters = _pool(n_images=12, per_image=6, n_clusters=4)
    scores[clusters == 0] += 10.0  # cluster 0 is hardest everywhere: an uncapped top-n would be all cluster 0
    n = 16
    cap = cluster_cap(n, 4, 1.0)
    assert cap == 4
    chosen, passes = select_hardest(scores, sources, clusters, n=n, max_per_image=2, max_per_cluster=cap)
    assert len(chosen) == n and (passes == 0).all()
    assert np.bincount(clusters[chosen], minlength=4).max() <= cap
    _, per_src = np.unique(sources[chosen], return_counts=True)
    assert per_src.max() <= 2
    # The hardest cluster is filled up to the cap and no further; the rest of the budget spreads out.
    assert (clusters[chosen] == 0).sum() == cap
    assert len(np.unique(clusters[chosen])) == 4


def test_caps_relax_in_order_when_budget_cannot_be_met():
    scores, sources, clusters = _pool(n_images=4, per_image=4, n_clusters=2)
    chosen, passes = select_hardest(scores, sources, clusters, n=12, max_per_image=2, max_per_cluster=2)
    assert len(chosen) == 12 and len(set(chosen)) == 12
    assert list(np.unique(passes)) == [0, 1, 2]
    assert (np.diff(passes) >= 0).all()


def test_selection_is_independent_of_input_row_permutation_given_key_sort():
    scores, sources, clusters = _pool()
    a, _ = select_hardest(scores, sources, clusters, 12, 2, 5)
    perm = np.random.default_rng(3).permutation(len(scores))
    inv = np.argsort(perm)
    # Rows come back key-sorted by the caller; the result refers to the same records.
    b, _ = select_hardest(scores[perm][inv], sources[perm][inv], clusters[perm][inv], 12, 2, 5)
    assert (a == b).all()


def test_nan_scores_are_an_error():
    scores, sources, clusters = _pool()
    scores[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select_hardest(scores, sources, clusters, 4, 2, 0)


def test_assign_mosaics_mixes_sources():
    scores, sources, clusters = _pool(n_images=10, per_image=5, n_clusters=3)
    chosen, _ = select_hardest(scores, sources, clusters, n=20, max_per_image=2, max_per_cluster=0)
    groups = assign_mosaics(chosen, sources, clusters, scores)
    assert groups.shape == (5, 4)
    assert sorted(groups.ravel()) == sorted(chosen)
    for g in groups:
        assert len(set(sources[g])) == 4  # no mosaic repeats a source image
    with pytest.raises(ValueError):
        assign_mosaics(chosen[:7], sources, clusters, scores)


def test_coverage():
    cov = coverage(np.array([0, 0, 2]), np.array([0, 1, 2, 3, -1]))
    assert cov == {"clusters_represented": 2, "clusters_total": 4, "cluster_coverage": 0.5}


def test_compose_quadrants_equal_resized_crops():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 48), (41, 48), (30, 30), (48, 33)]]
    boxes = [(0, 0, 20, 20), (10, 5, 48, 40), (3, 7, 9, 30), (0, 0, 33, 48)]
    mosaic = compose_mosaic(list(zip(images, boxes, strict=False)), width=47, height=41)  # odd sides on purpose
    assert mosaic.shape == (41, 47, 3) and mosaic.dtype == np.uint8
    sizes = [(23, 20), (24, 20), (23, 21), (24, 21)]
    for i, (image, box) in enumerate(zip(images, boxes, strict=False)):
        assert quadrant(mosaic, i).shape[:2] == sizes[i][::-1]
        assert np.array_equal(quadrant(mosaic, i), crop_patch(image, box, sizes[i]))
    # A crop of the whole image resized to its own size is the image itself.
    assert np.array_equal(crop_patch(images[2], (0, 0, 30, 30), 30), images[2])
    with pytest.raises(ValueError):
        crop_patch(images[0], (5, 5, 5, 9), 16)
    with pytest.raises(ValueError):
        compose_mosaic(list(zip(images, boxes, strict=False))[:3], 40, 40)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="optidel.max_per_image"):
        OptidelConfig(max_per_image=0)
    with pytest.raises(ConfigError, match="optidel.originals_fraction"):
        OptidelConfig(originals_fraction=1.5)


def test_missing_sam_checkpoint_fails_before_any_work(tmp_path):
    from dataeff.cli import main as cli_main

    rc = cli_main(["select", "method=optidel", "embeddings=whatever", f"out={tmp_path / 'sel'}", "scorer=x"])
    assert rc == 2
    assert not (tmp_path / "sel").exists()


def test_missing_checkpoint_message(capsys, tmp_path):
    from dataeff.cli import main as cli_main

    cli_main(["select", "method=optidel", "embeddings=e", f"out={tmp_path}/s", "scorer=x"])
    err = capsys.readouterr().err
    assert "sam_vit_b_01ec64.pth" in err and "sam.checkpoint=" in err
    cli_main(["select", "method=optidel", "embeddings=e", f"out={tmp_path}/s", "sam.model=tiny"])
    assert "scorer=" in capsys.readouterr().err


def test_hardness_settings_are_checked():
    with pytest.raises(ConfigError, match="optidel.hardness_masks"):
        OptidelConfig(hardness_masks=0)
    with pytest.raises(ConfigError, match="optidel.hardness"):
        OptidelConfig(hardness="loss")  # type: ignore[arg-type]


def test_mask_seeds_start_at_mask_seed_and_are_fixed_and_distinct():
    from dataeff.select.optidel import mask_seeds

    assert mask_seeds(7, 1) == [7]  # K = 1 scores exactly as the single-mask scorer did
    seeds = mask_seeds(7, 4)
    assert seeds[0] == 7 and len(set(seeds)) == 4 and seeds == mask_seeds(7, 4)
    assert mask_seeds(8, 4)[1:] != seeds[1:]


def _part(keys, sources, skipped):
    n = len(sources)
    return {
        "source": np.array(sources, dtype=str),
        "index": np.arange(n, dtype=np.int32),
        "box": np.zeros((n, 4), np.int32),
        "area": np.ones(n, np.int64),
        "area_frac": np.ones(n, np.float32),
        "pred_iou": np.ones(n, np.float32),
        "stability": np.ones(n, np.float32),
        "score": np.arange(n, dtype=np.float32),
        "image_keys": np.array(keys, dtype=str),
        "image_scores": np.arange(len(keys), dtype=np.float32),
        "skipped_keys": np.array(list(skipped), dtype=str),
        "skipped_reasons": np.array(list(skipped.values()), dtype=str),
        "sam_s": np.float64(1.0),
        "score_s": np.float64(0.5),
    }


def test_a_cached_shard_is_reused_only_when_sam_saw_every_sample_valid_now():
    from dataeff.select.optidel_run import covers, restrict

    part = _part(["a", "b", "c", "d"], ["a", "a", "b", "d"], {"c": "sam_no_mask"})
    assert covers(part, ["a", "b", "c"], {})  # a sample excluded since (d) does not matter
    assert not covers(part, ["a", "e"], {})  # e was never processed
    assert covers(part, ["a", "b"], {"b": "dark"})  # newly invalid: drop its patches, no SAM needed
    cut = restrict(part, ["a", "b", "c"], {"b": "dark"})
    assert cut["source"].tolist() == ["a", "a"] and cut["image_keys"].tolist() == ["a", "b", "c"]
    assert dict(zip(cut["skipped_keys"], cut["skipped_reasons"], strict=True)) == {"b": "dark", "c": "sam_no_mask"}
    # b was skipped for quality then; valid now, it needs SAM: the shard is redone.
    dark_then = _part(["a", "b"], ["a"], {"b": "dark"})
    assert not covers(dark_then, ["a", "b"], {})
    assert covers(dark_then, ["a", "b"], {"b": "blurred"})


def test_prototype_hardness_is_the_cosine_distance_to_the_nearest_sqrt_p_means_centroid():
    from dataeff.select import cluster as C
    from dataeff.select.config import SelectConfig
    from dataeff.select.optidel_run import prototype_hardness

    rng = np.random.default_rng(0)
    tight = np.eye(8, dtype=np.float32)[0] + 0.01 * rng.standard_normal((200, 8)).astype(np.float32)
    loose = np.eye(8, dtype=np.float32)[1] + 0.3 * rng.standard_normal((200, 8)).astype(np.float32)
    x = np.concatenate([tight, loose])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    cfg = SelectConfig(embeddings="e", out="o")
    cfg.cluster.device = "cpu"
    scores, k = prototype_hardness(x, cfg, 0, 1)
    assert k == 20 and scores.shape == (400,) and scores.dtype == np.float32  # k = round(sqrt(400))
    # Reference: seeded spherical k-means (the select stage's functions), distance to the nearest centroid.
    sample = C.kmeans_sample(400, k, cfg.cluster.max_points_per_centroid, cfg.seed)
    centroids = C.train_kmeans(x[sample].astype(np.float32), k, cfg.cluster.niter, cfg.seed)
    np.testing.assert_allclose(scores, 1.0 - C.assign(x, centroids)[1], atol=1e-6)
    # Samples of the spread-out group lie farther from their prototypes: harder.
    assert scores[200:].mean() > 5 * scores[:200].mean()
    assert np.array_equal(prototype_hardness(x, cfg, 0, 1)[0], scores)  # seeded
