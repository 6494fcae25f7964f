"""SAM patch extraction: checkpoint errors, the tiny SAM, mask filtering, per-image skip reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataeff.config import ConfigError
from dataeff.select.compose import crop_patch
from dataeff.select.sam_batch import OneImageAtATime
from dataeff.select.sam_hard import (
    SamConfig,
    build_sam,
    build_tiny_sam,
    check_checkpoint,
    extract_and_score,
    filter_masks,
    mask_pass,
)

KVASIR = Path(__file__).resolve().parents[2] / "data" / "kvasir-seg" / "images"
TINY = dict(model="tiny", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_area_frac=1.0)


def _images(n: int, side: int = 64) -> list[tuple[str, np.ndarray]]:
    files = sorted(KVASIR.glob("*.jpg"))[:n]
    return [(f"img{i}", np.asarray(Image.open(f).convert("RGB").resize((side, side)))) for i, f in enumerate(files)]


def _mask(box, area, iou, stab):
    x0, y0, x1, y1 = box  # SAM reports XYWH with inclusive ends: w = x1_incl - x0
    return {"bbox": [x0, y0, x1 - 1 - x0, y1 - 1 - y0], "area": area, "predicted_iou": iou, "stability_score": stab}


def test_missing_checkpoint_names_the_file_to_download():
    with pytest.raises(ConfigError) as err:
        check_checkpoint(SamConfig())
    msg = str(err.value)
    assert "sam_vit_b_01ec64.pth" in msg and "sam.checkpoint=" in msg and "segment-anything README" in msg
    with pytest.raises(ConfigError, match="sam_vit_h_4b8939.pth"):
        check_checkpoint(SamConfig(model="vit_h"))
    with pytest.raises(ConfigError, match="no such file"):
        check_checkpoint(SamConfig(checkpoint="nowhere/sam_vit_b_01ec64.pth"))
    with pytest.raises(ConfigError, match="no such file"):
        build_sam(SamConfig(checkpoint="nowhere/sam.pth"), torch.device("cpu"))
    check_checkpoint(SamConfig(model="tiny"))  # the tiny SAM needs no file
    with pytest.raises(ConfigError, match="sam.model"):
        SamConfig(model="vit_x")


def test_checkpoint_is_loaded(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_tiny_sam(3).state_dict(), path)
    loaded = build_sam(SamConfig(model="tiny", seed=0, checkpoint=str(path)), torch.device("cpu"))
    for pa, pb in zip(loaded.parameters(), build_tiny_sam(3).parameters(), strict=False):
        assert torch.equal(pa, pb)
    # A pickled object that is not a plain state dict is refused (weights_only loading).
    torch.save({"model": object()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_sam(SamConfig(model="tiny", checkpoint=str(path)), torch.device("cpu"))


def test_tiny_sam_is_small_and_seeded():
    a, b, c = build_tiny_sam(0), build_tiny_sam(0), build_tiny_sam(1)
    n_params = sum(p.numel() for p in a.parameters())
    assert 100_000 < n_params < 300_000
    assert a.image_encoder.img_size == 256
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=False))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_tiny_sam(0)
    assert torch.equal(torch.rand(3), expected)  # building it leaves the global stream alone


def test_filter_masks_drops_tiny_and_near_full_and_orders_by_iou():
    cfg = SamConfig(min_area_frac=0.02, max_area_frac=0.8, min_box_side=4, max_masks_per_image=2)
    masks = [
        _mask((0, 0, 100, 100), 9500, 0.99, 0.99),  # near-full
        _mask((10, 10, 12, 12), 4, 0.98, 0.99),  # tiny
        _mask((5, 5, 40, 30), 600, 0.90, 0.95),
        _mask((50, 50, 90, 95), 1500, 0.95, 0.97),
        _mask((20, 60, 60, 99), 1200, 0.80, 0.99),
        _mask((1, 1, 3, 80), 150, 0.99, 0.99),  # too thin a box
    ]
    out = filter_masks(masks, 100, 100, cfg)
    assert out["box"].tolist() == [[50, 50, 90, 95], [5, 5, 40, 30]]
    assert out["pred_iou"].tolist() == pytest.approx([0.95, 0.90])
    assert out["area"].tolist() == [1500, 600]
    assert out["area_frac"].tolist() == pytest.approx([0.15, 0.06])
    empty = filter_masks([], 10, 10, cfg)
    assert empty["box"].shape == (0, 4)


class _Fixed:
    """A stand-in generator with scripted answers per call (SAM's interface: generate(image))."""

    def __init__(self, answers):
        self.answers = list(answers)

    def generate(self, image):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_images_without_usable_masks_are_skipped_with_a_reason():
    cfg = SamConfig(min_area_frac=0.01, max_area_frac=0.8, min_box_side=2)
    images = [(f"k{i}", np.full((32, 32, 3), 10 * i, np.uint8)) for i in range(4)]
    gen = _Fixed(
        [[], [_mask((0, 0, 32, 32), 1024, 0.9, 0.9)], RuntimeError("bad"), [_mask((2, 2, 20, 12), 150, 0.9, 0.9)]]
    )
    out = extract_and_score(images, OneImageAtATime(gen), cfg, 8, lambda x: x.reshape(len(x), -1).mean(1), batch_size=2)
    assert out["skipped_keys"].tolist() == ["k0", "k1", "k2"]
    assert out["skipped_reasons"].tolist() == ["sam_no_mask", "sam_masks_filtered", "sam_error:RuntimeError"]
    assert out["source"].tolist() == ["k3"] and out["box"].tolist() == [[2, 2, 20, 12]]
    assert out["score"].tolist() == pytest.approx([30.0])
    assert out["image_keys"].tolist() == ["k0", "k1", "k2", "k3"]
    assert out["image_scores"].tolist() == pytest.approx([0.0, 10.0, 20.0, 30.0])


def test_tiny_sam_extracts_scored_patches_deterministically():
    torch.set_num_threads(1)
    cfg = SamConfig(**TINY)
    images = _images(3)

    def score(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32).std(axis=1)

    runs = [
        extract_and_score(images, mask_pass(build_sam(cfg, torch.device("cpu")), cfg), cfg, 16, score, 4)
        for _ in range(2)
    ]
    a, b = runs
    assert len(a["source"]) >= 1 and len(a["source"]) + len(a["skipped_keys"]) >= 3
    for name in ("source", "index", "box", "area", "pred_iou", "stability", "score", "image_scores"):
        assert np.array_equal(a[name], b[name]), name
    images_by_key = dict(images)
    for src, box, s in zip(a["source"], a["box"], a["score"], strict=False):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert s == pytest.approx(score(crop_patch(images_by_key[src], box, 16)[None])[0])


def test_invalid_frames_never_reach_sam_and_are_skipped_with_their_reason():
    cfg = SamConfig(min_area_frac=0.01, max_area_frac=0.8, min_box_side=2)
    images = [(f"k{i}", np.full((32, 32, 3), 10 * i, np.uint8)) for i in range(3)]
    mask = _mask((2, 2, 20, 12), 150, 0.9, 0.9)
    seen: list[int] = []

    class Recording:
        def generate(self, image):
            seen.append(int(image[0, 0, 0]))
            return [mask]

    out = extract_and_score(
        images,
        OneImageAtATime(Recording()),
        cfg,
        8,
        lambda x: x.reshape(len(x), -1).mean(1),
        batch_size=2,
        skip={"k1": "dark"},
    )
    assert seen == [0, 20]  # k1 was never given to SAM
    assert out["skipped_keys"].tolist() == ["k1"] and out["skipped_reasons"].tolist() == ["dark"]
    assert out["source"].tolist() == ["k0", "k2"]  # no patch of the invalid frame
    # The image arrays stay aligned with the samples (the whole image is still scored).
    assert out["image_keys"].tolist() == ["k0", "k1", "k2"] and len(out["image_scores"]) == 3


def test_vector_scorers_keep_their_embedding_rows():
    cfg = SamConfig(min_area_frac=0.01, max_area_frac=0.8, min_box_side=2)
    images = [(f"k{i}", np.full((32, 32, 3), 10 * i, np.uint8)) for i in range(3)]
    gen = _Fixed([[], [_mask((2, 2, 20, 12), 150, 0.9, 0.9)], [_mask((4, 4, 20, 20), 200, 0.9, 0.9)]])

    def embed(x: np.ndarray) -> np.ndarray:  # (B, S, S, 3) -> (B, 2) float16, as the prototype scorer
        m = x.reshape(len(x), -1).mean(1)
        return np.stack([m, -m], axis=1).astype(np.float16)

    out = extract_and_score(images, OneImageAtATime(gen), cfg, 8, embed, batch_size=2)
    assert out["score"].shape == (2, 2) and out["score"].dtype == np.float16
    assert out["image_scores"].shape == (3, 2)
