"""Downstream segmentation layouts, splits, masks and joint augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataeff.config import ConfigError
from dataeff.constants import SPLIT_FORMAT
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
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    masks = torch.cat([b["mask"] for loader in loaders for b in loader])
    assert set(masks.unique().tolist()) == {0, 1}
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["format"] == SPLIT_FORMAT and split["groups"] is None
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


# --------------------------------------------------------------------------- group-aware splits

#: Planted videos of uneven length: 30 frames in 6 groups.
VIDEOS = {"vidA": 7, "vidB": 3, "vidC": 5, "vidD": 4, "vidE": 6, "vidF": 5}


def _planted() -> dict[str, str]:
    return {f"{v}_{i:03d}": v for v, n in VIDEOS.items() for i in range(n)}


def _parts_of_groups(split: dict, group_of: dict[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for stem in split[part]:
            out.setdefault(group_of[stem], set()).add(part)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_split_groups_keeps_groups_whole_and_close_to_the_fractions(seed):
    group_of = _planted()
    split = downstream.split_groups(group_of, 0.2, 0.2, seed=seed, spec="regex:^(vid[A-Z])_")
    assert all(len(parts) == 1 for parts in _parts_of_groups(split, group_of).values()), "a group crosses parts"
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(group_of)
    # targets: 6 and 6 images. Only vidE makes 6, so the best split is off by one image in the other part.
    assert abs(len(split["val"]) - 6) + abs(len(split["test"]) - 6) <= 1
    assert split["groups"]["spec"] == "regex:^(vid[A-Z])_"
    for part in ("train", "val", "test"):
        assert split["groups"][part] == sorted({group_of[s] for s in split[part]})
    assert downstream.split_groups(group_of, 0.2, 0.2, seed=seed, spec="x")["test"] == split["test"]  # seeded


def test_split_groups_seed_changes_the_split_and_too_few_groups_fail():
    group_of = _planted()
    tests = {tuple(downstream.split_groups(group_of, 0.2, 0.2, seed=s)["test"]) for s in range(6)}
    assert len(tests) > 1
    two = {"a_1": "a", "a_2": "a", "b_1": "b"}
    with pytest.raises(ValueError, match="2 group"):
        downstream.split_groups(two, 0.3, 0.3, seed=0)
    split = downstream.split_groups(two, 0.0, 0.3, seed=0)  # no val: 2 groups suffice
    assert split["val"] == [] and len(split["test"]) >= 1 and len(split["train"]) >= 1


def _pairs(stems: list[str]) -> list:
    return [(s, Path(f"/x/images/{s}.jpg"), Path(f"/x/masks/{s}.png")) for s in stems]


def test_read_groups_regex_and_csv(tmp_path):
    pairs = _pairs(["vidA_001", "vidA_002", "vidB_001"])
    assert downstream.read_groups("regex:^(vid[A-Z])_", pairs) == {
        "vidA_001": "vidA",
        "vidA_002": "vidA",
        "vidB_001": "vidB",
    }
    with pytest.raises(ValueError, match="'other_1' does not match"):
        downstream.read_groups("regex:^(vid[A-Z])_", _pairs(["vidA_001", "other_1"]))
    with pytest.raises(ValueError, match="capture group"):
        downstream.read_groups("regex:^vid", pairs)
    table = tmp_path / "groups.csv"
    table.write_text("file,group\nvidA_001.jpg,p1\nvidA_002,p2\nvidB_001.jpg,p1\n")  # by file name or stem
    assert downstream.read_groups(str(table), pairs) == {"vidA_001": "p1", "vidA_002": "p2", "vidB_001": "p1"}
    table.write_text("file,group\nvidA_001.jpg,p1\n")
    with pytest.raises(ValueError, match="vidA_002.jpg has no group"):
        downstream.read_groups(str(table), pairs)
    with pytest.raises(ValueError, match="neither"):
        downstream.read_groups(str(tmp_path / "missing.csv"), pairs)


def build_videos(root: Path) -> Path:
    """Kvasir pairs renamed as frames of the planted videos (vidA_000 ...)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = sorted(_planted())
    for stem, path in zip(stems, kvasir_images(len(stems)), strict=True):
        Image.open(path).convert("RGB").resize((24, 20)).save(root / "images" / f"{stem}.jpg")
        mask = Image.open(KVASIR / "masks" / f"{path.stem}.png").convert("L").resize((24, 20), Image.NEAREST)
        mask.save(root / "masks" / f"{stem}.png")
    return root


def test_datamodule_group_aware_split_saved_and_leaking_split_refused(tmp_path):
    root = build_videos(tmp_path / "videos")
    cfg = _cfg(root, groups="regex:^(vid[A-Z])_", val_fraction=0.2, test_fraction=0.2)
    dm = SegmentationDataModule(cfg, tmp_path / "out")
    dm.setup()
    saved = json.loads((tmp_path / "out" / "split.json").read_text())
    assert saved["format"] == SPLIT_FORMAT and saved["groups"]["spec"] == "regex:^(vid[A-Z])_"
    parts = _parts_of_groups(saved, _planted())
    assert all(len(p) == 1 for p in parts.values()) and len(parts) == len(VIDEOS)
    assert [s for s, _, _ in dm.pairs["test"]] == saved["test"]
    # a given split that mixes frames of one video is refused, naming the group
    leaky = downstream.split_pairs(sorted(_planted()), 0.2, 0.2, seed=0)
    downstream.write_split(leaky, root / "split.json")
    with pytest.raises(ValueError, match="cross the split, e.g. 'vid"):
        SegmentationDataModule(cfg, tmp_path / "out2").setup()
    with pytest.raises(ConfigError, match="does not match"):
        SegmentationDataModule(_cfg(root, groups="regex:^(x)"), tmp_path / "out3").setup()


def test_old_split_format_is_still_read(tmp_path):
    root = build(tmp_path / "k", "kvasir")
    stems = sorted(p.stem for p in kvasir_images(N))
    old = {"format": "dataeff-split/1", "seed": 0, "train": stems[:4], "val": stems[4:5], "test": stems[5:]}
    (root / "split.json").write_text(json.dumps(old))
    dm = SegmentationDataModule(_cfg(root), tmp_path / "out")
    dm.setup()
    assert [s for s, _, _ in dm.pairs["test"]] == stems[5:] and dm.split["groups"] is None
