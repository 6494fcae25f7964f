"""Downstream segmentation datasets: image/mask pairs in their published folder layouts.

Layouts (``find_pairs``):
- ``kvasir``: Kvasir-SEG, ``images/`` + ``masks/``, same stem, ``.jpg``/``.png``;
- ``cvc``: CVC-ClinicDB style, ``Original/`` + ``Ground Truth/``, same file names (TIFF,
  PNG or BMP);
- ``generic``: ``images/`` + ``masks/``, any supported image extension;
- ``auto``: ``cvc`` when ``Original/`` and ``Ground Truth/`` exist, else ``generic``.

Masks: with 2 classes a mask is read as grayscale and thresholded at 128 -> {0, 1};
with more classes it must be an index (``L``/``P``) image whose values are class ids.

Decoding (:mod:`dataeff.data.decode`, shared with ``dataeff shard``): TIFFs through tifffile
(RGB data labelled MinIsBlack, 16-bit, multi-page: the first page), 16-bit images scaled to
8 bits, and EXIF orientation applied to images and masks alike. :func:`pair_problems` decodes
every pair in full when the dataset is scanned, so an unreadable file stops a run before any
training or output, with the list of files.

Splits (``split_pairs``, ``split_groups``): seeded train/val/test lists of stems. When the
images come in groups (frames of one video, images of one patient), ``split_groups`` puts
whole groups in one part, so no group is seen in training and scored in test (frames of a
video are near-duplicates: sharing them inflates test scores). Groups are declared by
``data.groups`` (``read_groups``: a pattern, a CSV, or the ``index.parquet`` of the shard set
the images were exported from, whose ``group`` column names each frame's video) and recorded
in ``split.json``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from dataeff.constants import IMAGENET_MEAN, IMAGENET_STD, INDEX_NAME, SPLIT_FORMAT, SPLIT_FORMATS_READ
from dataeff.data.decode import decoded_size, read_image, read_rgb
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
    """A seeded train/val/test split of ``stems`` (``SPLIT_FORMAT``, ``groups`` null).

    Each of val and test gets ``round(fraction * n)`` stems, at least one when its
    fraction is positive; train keeps the rest (at least one).
    """
    n = len(stems)
    n_val, n_test = _targets(n, val_fraction, test_fraction)
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
        "groups": None,
    }


# --------------------------------------------------------------------------- groups

#: ``data.groups`` prefix of a regular expression applied to image stems.
REGEX_PREFIX = "regex:"


def read_groups(spec: str, pairs: Sequence[tuple[str, Path, Path]]) -> dict[str, str]:
    """The group (video, patient) of every pair, from a ``data.groups`` spec.

    Args:
        spec: ``regex:<pattern>`` — searched in each image stem (anchor with ``^``/``$`` as
            needed); its first capture group is the group — or the path of a CSV with
            columns ``file`` (image file name or stem) and ``group`` — or a shard directory or
            its ``index.parquet`` (``dataeff-shards/4``): each image stem is a sample key there
            (frames exported from the shards for annotation) and its ``group`` the group.
        pairs: ``(stem, image_path, mask_path)`` from :func:`find_pairs`.

    Returns:
        stem -> group, for every pair.

    Raises:
        ValueError: a bad pattern or CSV, or a stem the pattern does not match / the CSV
            does not list (named in the message).
    """
    if spec.startswith(REGEX_PREFIX):
        try:
            pattern = re.compile(spec[len(REGEX_PREFIX) :])
        except re.error as exc:
            raise ValueError(f"data.groups={spec!r}: not a regular expression ({exc})") from None
        if pattern.groups < 1:
            raise ValueError(f"data.groups={spec!r}: the pattern needs a capture group, e.g. regex:^(.+)_\\d+$")
        out: dict[str, str] = {}
        for stem, _, _ in pairs:
            match = pattern.search(stem)
            if match is None or not match.group(1):
                raise ValueError(f"data.groups={spec!r}: image stem {stem!r} does not match (no group for it)")
            out[stem] = match.group(1)
        return out
    path = Path(spec)
    if path.is_dir() or path.suffix == ".parquet":
        return _index_groups(spec, path / INDEX_NAME if path.is_dir() else path, pairs)
    if not path.is_file():
        raise ValueError(f"data.groups={spec!r}: neither 'regex:<pattern>', a shard index, nor an existing CSV file")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"file", "group"} <= set(reader.fieldnames or ()):
            raise ValueError(f"data.groups={spec}: the CSV needs columns 'file' and 'group', has {reader.fieldnames}")
        listed = {row["file"].strip(): row["group"].strip() for row in reader}
    out = {}
    for stem, image, _ in pairs:
        group = listed.get(image.name, listed.get(stem))
        if not group:
            raise ValueError(f"data.groups={spec}: image {image.name} has no group in the CSV (by file name or stem)")
        out[stem] = group
    return out


def _index_groups(spec: str, path: Path, pairs: Sequence[tuple[str, Path, Path]]) -> dict[str, str]:
    """stem -> ``group`` of the shard index row whose key is the stem (see :func:`read_groups`)."""
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"data.groups={spec}: no {INDEX_NAME} there; give a shard directory or its index")
    index = pd.read_parquet(path)
    if not {"key", "group"} <= set(index.columns):
        raise ValueError(
            f"data.groups={spec}: {path} has no group column (written before dataeff-shards/4); re-shard, "
            "or give a CSV (file,group)"
        )
    group_of = dict(zip(index["key"], index["group"], strict=True))
    missing = [stem for stem, _, _ in pairs if stem not in group_of]
    if missing:
        raise ValueError(
            f"data.groups={spec}: {len(missing)} image stem(s) are not sample keys of {path}, e.g. {missing[0]!r}"
        )
    return {stem: str(group_of[stem]) for stem, _, _ in pairs}


def _targets(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Requested val and test sizes: ``round(fraction * n)``, at least 1 when the fraction is positive."""
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    return n_val, n_test


def _closest_prefix(cum: np.ndarray, target: int, lo: int, hi: int) -> int:
    """The prefix length k in [lo, hi] whose size ``cum[k-1]`` (0 for k = 0) is closest to ``target``."""
    sizes = np.concatenate([[0], cum])[lo : hi + 1]
    return lo + int(np.argmin(np.abs(sizes - target)))


def split_groups(
    group_of: dict[str, str], val_fraction: float, test_fraction: float, seed: int, trials: int = 256, spec: str = ""
) -> dict[str, Any]:
    """A seeded train/val/test split that keeps every group whole, sizes close to the fractions.

    Finding the groups whose sizes sum closest to a target is a subset-sum problem, so the
    split is searched: each of ``trials`` seeded group orders gives test = the prefix of the
    order whose image count is closest to the test target, val = the next prefix closest to
    the val target, train = the rest (never empty); the order with the smallest total
    deviation (in images) wins, the first one on ties. Same seed, same split.

    Args:
        group_of: stem -> group, for every pair (from :func:`read_groups`).
        spec: the ``data.groups`` spec, recorded in the split.

    Returns:
        the split (``SPLIT_FORMAT``) with ``groups = {"spec", "train", "val", "test"}``: the
        sorted group names of each part.

    Raises:
        ValueError: too few groups for the non-empty parts requested.
    """
    names = sorted(set(group_of.values()))
    members: dict[str, list[str]] = {g: [] for g in names}
    for stem in sorted(group_of):
        members[group_of[stem]].append(stem)
    sizes = np.array([len(members[g]) for g in names], dtype=np.int64)
    n_val, n_test = _targets(len(group_of), val_fraction, test_fraction)
    need = 1 + (n_val > 0) + (n_test > 0)
    if len(names) < need:
        raise ValueError(
            f"{len(names)} group(s) cannot fill train/val/test with whole groups; "
            "declare finer groups or set data.val_fraction/test_fraction to 0"
        )
    rng = np.random.default_rng(seed)
    best: tuple[int, np.ndarray, int, int] | None = None
    g = len(names)
    for _ in range(trials):
        order = rng.permutation(g)
        cum = np.cumsum(sizes[order])
        # test takes >= 1 group when requested and leaves one for val (if requested) and one for train
        k_test = _closest_prefix(cum, n_test, int(n_test > 0), g - 1 - int(n_val > 0)) if n_test else 0
        rest = np.cumsum(sizes[order[k_test:]])
        k_val = _closest_prefix(rest, n_val, int(n_val > 0), len(rest) - 1) if n_val else 0
        got_test = int(cum[k_test - 1]) if k_test else 0
        got_val = int(rest[k_val - 1]) if k_val else 0
        cost = abs(got_test - n_test) + abs(got_val - n_val)
        if best is None or cost < best[0]:
            best = (cost, order, k_test, k_val)
        if cost == 0:
            break
    assert best is not None  # trials >= 1
    _, order, k_test, k_val = best
    parts = {
        "test": [names[i] for i in order[:k_test]],
        "val": [names[i] for i in order[k_test : k_test + k_val]],
        "train": [names[i] for i in order[k_test + k_val :]],
    }
    split: dict[str, Any] = {"format": SPLIT_FORMAT, "seed": seed}
    for part in ("train", "val", "test"):
        split[part] = sorted(s for grp in parts[part] for s in members[grp])
    split["groups"] = {"spec": spec, **{part: sorted(parts[part]) for part in ("train", "val", "test")}}
    return split


def check_groups(split: dict[str, Any], group_of: dict[str, str], where: str) -> None:
    """Raise when a group has stems in more than one part of ``split``.

    Raises:
        ValueError: naming the first such group, its parts, and the fix.
    """
    seen: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for stem in split[part]:
            if stem in group_of:
                seen.setdefault(group_of[stem], set()).add(part)
    crossing = sorted(g for g, parts in seen.items() if len(parts) > 1)
    if crossing:
        parts = "/".join(p for p in ("train", "val", "test") if p in seen[crossing[0]])
        raise ValueError(
            f"{where}: {len(crossing)} group(s) cross the split, e.g. {crossing[0]!r} in {parts}; delete that "
            "split.json to make a group-aware one, or leave data.groups empty to keep it"
        )


def read_split(path: str | os.PathLike, stems: list[str]) -> dict[str, Any]:
    """A ``split.json`` (current or ``dataeff-split/1`` format), checked against the dataset's stems.

    Returns:
        the split, with ``groups`` (None for a ``/1`` file or an ungrouped split).
    """
    split = json.loads(Path(path).read_text())
    if split.get("format") not in SPLIT_FORMATS_READ or not all(
        isinstance(split.get(k), list) for k in ("train", "val", "test")
    ):
        raise ValueError(f"{path}: not a {' or '.join(SPLIT_FORMATS_READ)} file with train/val/test lists")
    unknown = sorted(set(split["train"] + split["val"] + split["test"]) - set(stems))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} stem(s) not in the dataset, e.g. {unknown[0]}; delete or fix it")
    split.setdefault("groups", None)
    return split


def write_split(split: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a split (from :func:`split_pairs`) as JSON, atomically; the folder is created if needed."""
    write_json_atomic(path, split, indent=1)


def pair_problems(root: str | os.PathLike, pairs: Sequence[tuple[str, Path, Path]]) -> list[str]:
    """One line per pair that training could not read: a file that does not decode in full
    (named relative to ``root``, with the error type), or a mask whose size differs from its
    image's (both upright, as the reader sees them). Empty when every pair is usable."""
    problems = []
    for stem, image, mask in pairs:
        sizes = []
        for path in (image, mask):
            try:
                sizes.append(decoded_size(path))
            except Exception as exc:  # PIL and tifffile raise many types for a damaged file
                problems.append(f"{Path(path).relative_to(root)} cannot be decoded ({type(exc).__name__})")
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            problems.append(f"pair {stem!r} has image size {sizes[0]} but mask size {sizes[1]}")
    return problems


def read_mask(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """A mask as class ids.

    Shape:
        output: (H, W) int64 in [0, num_classes).
    """
    image = read_image(path, values=True)
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
    """Image/mask pairs -> ``{"image": (3, S, S), "mask": (S, S) int64, "key": stem}``.

    With ``native=True`` an item also holds ``"native_mask"`` (H, W) int64, the mask at the
    image's own resolution, and ``"file"``, the image file name, for scoring at native
    resolution; batch such items with :func:`collate_native`.
    """

    def __init__(
        self, pairs: list[tuple[str, Path, Path]], transform: Callable, num_classes: int, native: bool = False
    ) -> None:
        self.pairs, self.transform, self.num_classes, self.native = pairs, transform, num_classes, native

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        """Pair ``i``; ``(i, seed)`` draws its random augmentation from ``seed`` alone (a resumable order)."""
        i, seed = i if isinstance(i, tuple) else (i, None)
        stem, image_path, mask_path = self.pairs[i]
        image = read_rgb(image_path)
        mask = read_mask(mask_path, self.num_classes)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{mask_path}: mask {mask.shape[::-1]} and image {image.size} sizes differ")
        if seed is None:
            x, m = self.transform(image, mask)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x, m = self.transform(image, mask)
        item: dict[str, Any] = {"image": x, "mask": m, "key": stem}
        if self.native:
            item["native_mask"], item["file"] = torch.from_numpy(mask), image_path.name
        return item


def collate_native(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of a ``native=True`` dataset: native masks (sizes differ) stay a list.

    Shape:
        "image": (B, 3, S, S), "mask": (B, S, S), "native_mask": B tensors (H_i, W_i)
    """
    native = [item.pop("native_mask") for item in items]
    batch = default_collate(items)
    batch["native_mask"] = native
    return batch
