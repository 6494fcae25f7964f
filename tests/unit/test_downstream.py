"""Downstream segmentation layouts, splits, masks and joint augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataeff.data import downstream
from dataeff.data.datamodules import SegmentationDataConfig, SegmentationDataModule
from tests.fixtures import KVASIR, kvasir_images

N = 6


def build(root: Path, layout: str, n: int = N) -> Path:
    """A tiny dataset from real Kvasir-SEG pairs (40 px) in the given published layout."""
    image_dir, mask_dir, image_ext, mask_ext = {
        "kvasir": ("images", "masks", ".jpg", ".png"),
        "cvc": ("Original", "Ground Truth", ".tif", ".tif"),
        "generic": ("images", "masks", ".bmp", ".png"),
    }[layout]
    (root / image_dir).mkdir(parents=True)
    (root / mask_dir).mkdir(parents=True)
    for path in kvasir_images(n):
        image = Image.open(path).convert("RGB").resize((48, 40))
        mask = Image.open(KVASIR / "masks" / f"{path.stem}.png").convert("L").resize((48, 40), Image.NEAREST)
        image.save(root / image_dir / f"{path.stem}{image_ext}")
        mask.save(root / mask_dir / f"{path.stem}{mask_ext}")
    return root


@pytest.mark.parametrize("layout", ["kvasir", "cvc", "generic"])
def test_find_pairs_layouts(tmp_path, layout):
    root = build(tmp_path / layout, layout)
    pairs = downstream.find_pairs(root, layout)
    assert [s for s, _, _ in pairs] == sorted(p.stem for p in kvasir_images(N))
    assert all(i.stem == m.stem for _, i, m in pairs)
    assert downstream.find_pairs(root, "auto") == pairs
    assert downstream.detect_layout(root) == ("cvc" if layout == "cvc" else "generic")


def test_find_pairs_errors_name_the_files(tmp_path):
    root = build(tmp_path / "k", "kvasir")
    lonely = root / "images" / "lonely.jpg"
    Image.new("RGB", (8, 8)).save(lonely)
    with pytest.raises(ValueError, match="1 image.*without a mask.*lonely.jpg"):
        downstream.find_pairs(root, "kvasir")
    lonely.unlink()
    Image.new("L", (8, 8)).save(root / "masks" / "orphan.png")
    with pytest.raises(ValueError, match="without an image.*orphan.png"):
        downstream.find_pairs(root, "kvasir")
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        downstream.find_pairs(tmp_path / "e", "auto")
    with pytest.raises(ValueError, match="not found"):
        downstream.find_pairs(tmp_path / "nowhere", "kvasir")


def _cfg(root: Path, **kw) -> SegmentationDataConfig:
    base = dict(root=str(root), image_size=32, batch_size=2, num_workers=0, val_fraction=0.2, test_fraction=0.2)
    base.update(kw)
    return SegmentationDataConfig(**base)


@pytest.mark.parametrize("layout", ["kvasir", "cvc"])
def test_batches_masks_and_split_saved_then_reused(tmp_path, layout):
    root = build(tmp_path / layout, layout)
    dm = SegmentationDataModule(_cfg(root), tmp_path / "out")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.long
    masks = torch.cat([b["mask"] for part in ("train", "val", "test") for b in dm._loader(part)])
    assert set(masks.unique().tolist()) == {0, 1}
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["format"] == "dataeff-split/1"
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(p.stem for p in kvasir_images(N))
    assert (len(split["val"]), len(split["test"])) == (1, 1)
    # a saved split is reused, even when another seed would split differently
    split["train"], split["test"] = split["train"][1:], split["test"] + split["train"][:1]
    (tmp_path / "out" / "split.json").write_text(json.dumps(split))
    again = SegmentationDataModule(_cfg(root, seed=99), tmp_path / "out")
    assert sorted(k for b in again.test_dataloader() for k in b["key"]) == sorted(split["test"])
    # <root>/split.json wins over the one beside the output
    root_split = downstream.split_pairs(sorted(split["train"] + split["val"] + split["test"]), 0.5, 0.0, seed=3)
    downstream.write_split(root_split, root / "split.json")
    third = SegmentationDataModule(_cfg(root), tmp_path / "out")
    assert sorted(k for b in third.val_dataloader() for k in b["key"]) == root_split["val"]


def test_split_unknown_stem_fails(tmp_path):
    root = build(tmp_path / "k", "kvasir")
    bad = {"format": "dataeff-split/1", "seed": 0, "train": ["ghost"], "val": [], "test": []}
    (root / "split.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="ghost"):
        SegmentationDataModule(_cfg(root), tmp_path / "out").setup()


def test_joint_augmentation_keeps_image_and_mask_aligned():
    # the image is white exactly where the mask is 1, so any misalignment shows
    mask = np.zeros((60, 80), dtype=np.int64)
    mask[10:35, 20:70] = 1
    image = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    transform = downstream.JointTransform(32, train=True, min_scale=0.3)
    torch.manual_seed(0)
    for _ in range(20):
        x, m = transform(image, mask)
        assert set(m.unique().tolist()) <= {0, 1}
        bright = x.mean(0) > 0.5
        agree = (bright == (m == 1)).float().mean()
        assert agree > 0.9


def test_multiclass_index_masks(tmp_path):
    ids = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "m.png")
    assert downstream.read_mask(tmp_path / "m.png", num_classes=4).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="class id 3"):
        downstream.read_mask(tmp_path / "m.png", num_classes=3)
    assert downstream.read_mask(tmp_path / "m.png", num_classes=2).tolist() == [[0, 0], [0, 0]]
