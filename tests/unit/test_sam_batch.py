"""The batched SAM pass: the generator's masks, batching-invariant, quality skips, bad images, box matching."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataeff.config import ConfigError
from dataeff.select.sam_batch import BatchedMaskPass, OneImageAtATime, box_iou, matched_boxes
from dataeff.select.sam_hard import SamConfig, build_sam, extract_and_score, mask_generator, mask_pass

KVASIR = Path(__file__).resolve().parents[2] / "data" / "kvasir-seg" / "images"
RELAXED = dict(model="tiny", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_area_frac=1.0)


def _images(n: int) -> list[np.ndarray]:
    """Real frames at mixed sizes and aspect ratios (the encoder batch pads each to its square)."""
    sizes = [(64, 48), (48, 64), (56, 56), (72, 40), (40, 40)]
    files = sorted(KVASIR.glob("*.jpg"))[:n]
    return [np.asarray(Image.open(f).convert("RGB").resize(sizes[i % len(sizes)])) for i, f in enumerate(files)]


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    torch.set_num_threads(1)
    return build_sam(SamConfig(model="tiny"), torch.device("cpu"))


def _same_masks(a: list[dict], b: list[dict]) -> None:
    assert [(m["bbox"], m["area"]) for m in a] == [(m["bbox"], m["area"]) for m in b]
    for x, y in zip(a, b, strict=True):
        assert x["predicted_iou"] == pytest.approx(y["predicted_iou"], abs=1e-5)
        assert x["stability_score"] == pytest.approx(y["stability_score"], abs=1e-5)
        np.testing.assert_allclose(x["point_coords"], y["point_coords"])


def _sharpened(sam: torch.nn.Module, factor: float) -> torch.nn.Module:
    """The tiny SAM with mask logits scaled by ``factor``: its logits (|x| < 0.2) then cross SAM's
    stability offsets (+-1), so the stability filter has something to keep and to drop."""
    sharp = copy.deepcopy(sam)
    with torch.no_grad():
        for mlp in sharp.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(factor)
            mlp.layers[-1].bias.mul_(factor)
    return sharp


@pytest.mark.parametrize(
    ("sharpen", "settings"),
    [
        # No box NMS: every mask of the grid is compared, in order.
        (1.0, dict(RELAXED, box_nms_thresh=1.0, images_per_batch=3)),
        # Both quality filters drop part of the masks; decoder batches split the grid unevenly.
        (100.0, dict(RELAXED, points_per_side=5, points_per_batch=7, pred_iou_thresh=0.3, stability_score_thresh=0.2)),
        # SAM's default duplicate suppression.
        (1.0, dict(RELAXED, images_per_batch=2)),
    ],
)
def test_batched_pass_gives_the_generators_masks(sam, sharpen, settings):
    model = _sharpened(sam, sharpen)
    cfg = SamConfig(**settings)
    images = _images(5)
    expected = [mask_generator(model, cfg).generate(image) for image in images]
    chosen = mask_pass(model, cfg)
    assert isinstance(chosen, BatchedMaskPass)
    got = chosen.generate_batch(images)
    assert all(len(m) >= 1 for m in expected), "the comparison needs masks to compare"
    for a, b in zip(got, expected, strict=True):
        assert isinstance(a, list)
        _same_masks(a, b)
    if cfg.stability_score_thresh > 0:  # the filters did drop masks
        assert sum(map(len, expected)) < len(images) * 3 * cfg.points_per_side**2


def test_generator_setting_runs_sams_own_generator(sam):
    cfg = SamConfig(**RELAXED, mask_pass="generator")
    chosen = mask_pass(sam, cfg)
    assert isinstance(chosen, OneImageAtATime) and chosen.images_per_batch == 1
    image = _images(1)[0]
    (got,) = chosen.generate_batch([image])
    expected = mask_generator(sam, cfg).generate(image)
    assert isinstance(got, list) and "segmentation" in got[0]
    _same_masks(got, expected)


def test_batching_gives_the_same_patches_as_one_image_at_a_time(sam):
    images = [(f"k{i}", im) for i, im in enumerate(_images(5))]

    def score(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32).mean(axis=1)

    runs = []
    for per_batch in (1, 2, 5):
        cfg = SamConfig(**RELAXED, images_per_batch=per_batch)
        runs.append(extract_and_score(images, mask_pass(sam, cfg), cfg, 16, score, batch_size=3))
    one = runs[0]
    assert len(one["source"]) >= 3
    for other in runs[1:]:
        for name in ("source", "index", "box", "area", "score", "image_keys", "image_scores", "skipped_keys"):
            assert np.array_equal(one[name], other[name]), name
        np.testing.assert_allclose(one["pred_iou"], other["pred_iou"], atol=1e-5)
        np.testing.assert_allclose(one["stability"], other["stability"], atol=1e-5)


class _Recording:
    """A MaskPass stand-in that records the batches it is given and finds one box per image."""

    def __init__(self, images_per_batch: int) -> None:
        self.images_per_batch = images_per_batch
        self.batches: list[list[int]] = []

    def generate_batch(self, images):
        self.batches.append([int(im[0, 0, 0]) for im in images])
        return [[{"bbox": [2, 2, 17, 9], "area": 150, "predicted_iou": 0.9, "stability_score": 0.9}] for _ in images]


def test_quality_skipped_images_never_reach_sam_and_are_accounted_for_in_order():
    cfg = SamConfig(min_area_frac=0.01, max_area_frac=0.8, min_box_side=2)
    images = [(f"k{i}", np.full((32, 32, 3), i, np.uint8)) for i in range(7)]
    skip = {"k0": "dark", "k3": "blurred", "k4": "blank"}
    masks = _Recording(images_per_batch=2)
    seen: list[int] = []
    out = extract_and_score(
        images, masks, cfg, 8, lambda x: x.reshape(len(x), -1).mean(1), 2, lambda: seen.append(1), skip
    )
    assert masks.batches == [[1, 2], [5, 6]]  # SAM batches hold valid images only, full where possible
    assert out["skipped_keys"].tolist() == ["k0", "k3", "k4"]
    assert out["skipped_reasons"].tolist() == ["dark", "blurred", "blank"]
    assert out["source"].tolist() == ["k1", "k2", "k5", "k6"]
    assert out["image_keys"].tolist() == [k for k, _ in images] and len(out["image_scores"]) == 7
    assert len(seen) == 7  # progress counts every image, skipped ones too
    # Every image is accounted for: a patch source or skipped with a reason.
    assert set(out["source"]) | set(out["skipped_keys"]) == {k for k, _ in images}


def test_a_bad_image_fails_alone_and_the_rest_of_its_batch_is_kept(sam):
    cfg = SamConfig(**RELAXED, images_per_batch=3)
    good = _images(2)
    out = mask_pass(sam, cfg).generate_batch([good[0], np.zeros((16, 16), np.uint8), good[1]])
    assert isinstance(out[1], ValueError) and "(H, W, 3) uint8" in str(out[1])
    expected = [mask_generator(sam, cfg).generate(image) for image in good]
    _same_masks(out[0], expected[0])
    _same_masks(out[2], expected[1])


def test_mask_pass_settings_are_checked():
    with pytest.raises(ConfigError, match="sam.mask_pass"):
        SamConfig(mask_pass="fast")
    with pytest.raises(ConfigError, match="sam.images_per_batch"):
        SamConfig(images_per_batch=0)


def test_box_iou_and_one_to_one_matching():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 11], [50, 50, 60, 60]])
    iou = box_iou(a, b)
    assert iou.shape == (3, 2) and iou[0, 0] == pytest.approx(100 / 110) and iou[1, 0] == 0.0
    assert matched_boxes(a, b, 0.9) == 1  # the duplicate of a[0] finds no second partner
    assert matched_boxes(a, b, 0.95) == 0
    assert matched_boxes(np.zeros((0, 4)), b, 0.5) == 0
