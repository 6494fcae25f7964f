"""Downstream segmentation datasets: image/mask pairs in their published folder layouts.

Layouts (``find_pairs``):
- ``kvasir``: Kvasir-SEG, ``images/`` + ``masks/``, same stem, ``.jpg``/``.png``;
- ``cvc``: CVC-ClinicDB style, ``Original/`` + ``Ground Truth/``, same file names (TIFF,
  PNG or BMP);
- ``generic``: ``images/`` + ``masks/``, any supported image extension;
- ``auto``: ``cvc`` when ``Original/`` and ``Ground Truth/`` exist, else ``generic``.

Masks: with 2 classes a mask is read as grayscale and thresholded at 128 -> {0, 1};
with more classes it must be an index (``L``/``P``) image whose values are class ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from dataeff.constants import IMAGENET_MEAN, IMAGENET_STD, SPLIT_FORMAT
from dataeff.files import write_json_atomic

SUPPORTED_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
LAYOUTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "kvasir": ("images", "masks", (".jpg", ".jpeg", ".png")),
    "cvc": ("Original", "Ground Truth", (".tif", ".tiff", ".png", ".bmp")),
    "generic": ("images", "masks", SUPPORTED_EXTS),
}


def detect_layout(root: str | os.PathLike) -> str:
    """``cvc`` when ``Original/`` and ``Ground Truth/`` exist, else ``generic``."""
    root = Path(root)
    return "cvc" if (root / "Original").is_dir() and (root / "Ground Truth").is_dir() else "generic"


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"segmentation dataset: folder {folder} not found")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in exts:
            continue
        if path.stem in out:
            raise ValueError(f"segmentation dataset: {out[path.stem].name} and {path.name} in {folder} share a stem")
        out[path.stem] = path
    return out


def find_pairs(root: str | os.PathLike, layout: str = "auto") -> list[tuple[str, Path, Path]]:
    """``(stem, image_path, mask_path)`` of every pair, sorted by stem.

    Raises:
        ValueError: for an unknown layout, a missing folder, images without a mask or
            masks without an image (naming the first few), or no pairs at all.
    """
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose 'auto', " + ", ".join(repr(k) for k in LAYOUTS))
    image_dir, mask_dir, exts = LAYOUTS[layout]
    images, masks = _by_stem(Path(root) / image_dir, exts), _by_stem(Path(root) / mask_dir, exts)
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_images:
        raise ValueError(
            f"{root} ({layout}): {len(lonely_images)} image(s) without a mask in {mask_dir}/: "
            + ", ".join(images[s].name for s in lonely_images[:5])
        )
    if lonely_masks:
        raise ValueError(
            f"{root} ({layout}): {len(lonely_masks)} mask(s) without an image in {image_dir}/: "
            + ", ".join(masks[s].name for s in lonely_masks[:5])
        )
    if not images:
        raise ValueError(f"{root} ({layout}): empty dataset, no {'/'.join(exts)} files in {image_dir}/")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def split_pairs(stems: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, Any]:
    """A seeded train/val/test split of ``stems`` in the ``dataeff-split/1`` format.

    Each of val and test gets ``round(fraction * n)`` stems, at least one when its
    fraction is positive; train keeps the rest (at least one).
    """
    n = len(stems)
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} pairs cannot fill val={n_val} and test={n_test} and leave a training pair")
    order = np.random.default_rng(seed).permutation(n)
    pick = [stems[i] for i in order]
    return {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "train": sorted(pick[n_val + n_test :]),
        "val": sorted(pick[:n_val]),
        "test": sorted(pick[n_val : n_val + n_test]),
    }


def read_split(path: str | os.PathLike, stems: list[str]) -> dict[str, Any]:
    """A ``split.json``, checked against the dataset's stems (unknown stems name the fix)."""
    split = json.loads(Path(path).read_text())
    if split.get("format") != SPLIT_FORMAT or not all(isinstance(split.get(k), list) for k in ("train", "val", "test")):
        raise ValueError(f"{path}: not a {SPLIT_FORMAT} file with train/val/test lists")
    unknown = sorted(set(split["train"] + split["val"] + split["test"]) - set(stems))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} stem(s) not in the dataset, e.g. {unknown[0]}; delete or fix it")
    return split


def write_split(split: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a split (from :func:`split_pairs`) as JSON, atomically; the folder is created if needed."""
    write_json_atomic(path, split, indent=1)


def read_mask(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """A mask as class ids.

    Shape:
        output: (H, W) int64 in [0, num_classes).
    """
    image = Image.open(path)
    if num_classes == 2:
        return (np.asarray(image.convert("L")) >= 128).astype(np.int64)
    if image.mode not in ("L", "P", "I;16", "I"):
        raise ValueError(f"{path}: mode {image.mode}; {num_classes}-class masks must be index images (L or P)")
    mask = np.asarray(image).astype(np.int64)
    if mask.max() >= num_classes:
        raise ValueError(f"{path}: class id {mask.max()} >= num_classes={num_classes}")
    return mask


class JointTransform:
    """Same geometry for image and mask: train = random resized crop + flips, eval = resize.

    Images are resampled bilinearly, masks with nearest neighbour (class ids stay ids).

    Shape:
        output: image (3, S, S) float32 ImageNet-normalised, mask (S, S) int64.
    """

    def __init__(self, size: int, train: bool, hflip: bool = True, vflip: bool = True, min_scale: float = 0.5):
        self.size, self.train, self.hflip, self.vflip, self.min_scale = size, train, hflip, vflip, min_scale

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.from_numpy(mask)[None]
        x = TF.pil_to_tensor(image)
        if self.train:
            i, j, h, w = T.RandomResizedCrop.get_params(x, scale=(self.min_scale, 1.0), ratio=(3 / 4, 4 / 3))
            x, m = x[:, i : i + h, j : j + w], m[:, i : i + h, j : j + w]
            if self.hflip and torch.rand(()) < 0.5:
                x, m = x.flip(-1), m.flip(-1)
            if self.vflip and torch.rand(()) < 0.5:
                x, m = x.flip(-2), m.flip(-2)
        size = [self.size, self.size]
        x = TF.resize(x, size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        m = TF.resize(m, size, interpolation=T.InterpolationMode.NEAREST)
        x = TF.normalize(x.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        return x, m[0].long()


class SegmentationDataset(Dataset):
    """Image/mask pairs -> ``{"image": (3, S, S), "mask": (S, S) int64, "key": stem}``."""

    def __init__(self, pairs: list[tuple[str, Path, Path]], transform: Callable, num_classes: int) -> None:
        self.pairs, self.transform, self.num_classes = pairs, transform, num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        stem, image_path, mask_path = self.pairs[i]
        image = Image.open(image_path).convert("RGB")
        mask = read_mask(mask_path, self.num_classes)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{mask_path}: mask {mask.shape[::-1]} and image {image.size} sizes differ")
        x, m = self.transform(image, mask)
        return {"image": x, "mask": m, "key": stem}
