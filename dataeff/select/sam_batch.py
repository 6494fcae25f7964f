"""SAM's automatic masks for many images at once: OptiDEL's fast SAM pass (``sam.mask_pass=batched``).

The same model, point grid, mask decoding and filters as segment-anything's
``SamAutomaticMaskGenerator`` with one crop layer and no small-region clean-up (the
settings OptiDEL uses), built from SAM's own modules and utilities, with three changes
that leave the masks as they are:

- the image encoder runs over ``images_per_batch`` images in one forward pass instead of one;
- masks whose predicted IoU is below ``pred_iou_thresh`` are dropped before they are upscaled
  to the image (the generator upscales every mask, then drops them);
- each mask is reduced on the device to what OptiDEL keeps (box, area, predicted IoU,
  stability) instead of being run-length encoded, copied and decoded again, which is where
  most of the generator's CPU time goes.

A mask record has the generator's keys (``bbox`` XYWH, ``area``, ``predicted_iou``,
``stability_score``, ``point_coords``) without ``segmentation`` and ``crop_box``, so
``sam_hard.filter_masks`` reads either. The generator itself stays available behind the
same interface (:class:`OneImageAtATime`, ``sam.mask_pass=generator``) as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

#: One image's masks, or the error that stopped SAM on it (one bad image must not end a job).
ImageMasks = list[dict[str, Any]] | Exception


class MaskPass(Protocol):
    """Anything that turns a list of (H, W, 3) uint8 images into one :data:`ImageMasks` per image."""

    images_per_batch: int

    def generate_batch(self, images: Sequence[np.ndarray]) -> list[ImageMasks]: ...


class OneImageAtATime:
    """``SamAutomaticMaskGenerator.generate`` on each image in turn, behind :class:`MaskPass`."""

    images_per_batch = 1

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def generate_batch(self, images: Sequence[np.ndarray]) -> list[ImageMasks]:
        out: list[ImageMasks] = []
        for image in images:
            try:
                out.append(self.generator.generate(image))
            except (RuntimeError, ValueError) as exc:
                out.append(exc)
        return out


class BatchedMaskPass:
    """SAM's automatic masks with the image encoder batched over images (module docstring).

    Args:
        sam: a ``segment_anything.modeling.Sam`` in eval mode, on the device to use.
        points_per_side: prompt grid side (``points_per_side``² single-point prompts per image).
        points_per_batch: prompts per mask-decoder forward.
        pred_iou_thresh, stability_score_thresh, box_nms_thresh: the generator's filters (0 = off
            for the first two, as in the generator).
        images_per_batch: images per image-encoder forward.
    """

    def __init__(
        self,
        sam: Any,
        points_per_side: int,
        points_per_batch: int,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        box_nms_thresh: float,
        images_per_batch: int,
    ) -> None:
        from segment_anything.utils.amg import build_point_grid
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.grid = build_point_grid(points_per_side)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.box_nms_thresh = box_nms_thresh
        self.images_per_batch = images_per_batch

    @property
    def device(self) -> torch.device:
        return torch.device(self.sam.device)

    @torch.no_grad()
    def generate_batch(self, images: Sequence[np.ndarray]) -> list[ImageMasks]:
        out: list[ImageMasks] = []
        for start in range(0, len(images), self.images_per_batch):
            chunk = images[start : start + self.images_per_batch]
            try:
                features, sizes = self.encode(chunk)
            except (RuntimeError, ValueError) as exc:
                # Encode one at a time, so only the image that fails is lost.
                out.extend([exc] if len(chunk) == 1 else [self._one(image) for image in chunk])
                continue
            for i, image in enumerate(chunk):
                try:
                    out.append(self.decode(features[i : i + 1], sizes[i], image.shape[:2]))
                except (RuntimeError, ValueError) as exc:
                    out.append(exc)
        return out

    def _one(self, image: np.ndarray) -> ImageMasks:
        try:
            features, sizes = self.encode([image])
            return self.decode(features, sizes[0], image.shape[:2])
        except (RuntimeError, ValueError) as exc:
            return exc

    def encode(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image embeddings (B, C, h, w) and each image's resized (unpadded) input size, as ``SamPredictor.set_image``."""
        inputs, sizes = [], []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"SAM takes (H, W, 3) uint8 images, got {image.shape} {image.dtype}")
            resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
            resized = resized.permute(2, 0, 1).contiguous()[None]
            sizes.append((int(resized.shape[-2]), int(resized.shape[-1])))
            inputs.append(self.sam.preprocess(resized))
        return self.sam.image_encoder(torch.cat(inputs)), sizes

    def decode(
        self, features: torch.Tensor, input_size: tuple[int, int], size: tuple[int, ...]
    ) -> list[dict[str, Any]]:
        """One image's masks from its embedding (1, C, h, w): the generator's prompts, filters and box NMS."""
        from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, calculate_stability_score
        from torchvision.ops.boxes import batched_nms

        sam, (h, w) = self.sam, size[:2]
        # The generator's grid scaled to the image, then into the encoder's input frame.
        points = self.grid * np.array([[w, h]])
        kept: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            coords = torch.as_tensor(self.transform.apply_coords(batch, (h, w)), device=self.device)
            labels = torch.ones(len(coords), dtype=torch.int, device=self.device)
            sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
            low_res, iou = sam.mask_decoder(
                image_embeddings=features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            n_out = low_res.shape[1]
            low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
            point = torch.as_tensor(batch, device=self.device).repeat_interleave(n_out, dim=0)
            if self.pred_iou_thresh > 0.0:
                keep = iou > self.pred_iou_thresh
                low_res, iou, point = low_res[keep], iou[keep], point[keep]
            if len(iou) == 0:
                continue
            logits = sam.postprocess_masks(low_res[:, None], input_size, (h, w))[:, 0]
            stability = calculate_stability_score(logits, sam.mask_threshold, 1.0)
            if self.stability_score_thresh > 0.0:
                keep = stability >= self.stability_score_thresh
                logits, iou, point, stability = logits[keep], iou[keep], point[keep], stability[keep]
            masks = logits > sam.mask_threshold
            # The generator's crop-edge filter is a no-op with one crop layer (the crop is the image).
            kept.append((batched_mask_to_box(masks), masks.flatten(1).sum(1), iou, stability, point))
        if not kept:
            return []
        boxes, areas, iou, stability, point = (torch.cat(parts) for parts in zip(*kept, strict=True))
        order = batched_nms(
            boxes.float(), iou, torch.zeros(len(boxes), device=boxes.device), iou_threshold=self.box_nms_thresh
        )
        boxes, areas, iou, stability, point = (t[order].cpu() for t in (boxes, areas, iou, stability, point))
        return [
            {
                "bbox": box_xyxy_to_xywh(boxes[i]).tolist(),
                "area": int(areas[i]),
                "predicted_iou": float(iou[i]),
                "stability_score": float(stability[i]),
                "point_coords": [point[i].tolist()],
            }
            for i in range(len(order))
        ]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of end-exclusive ``(x0, y0, x1, y1)`` boxes. Shape: a (M, 4), b (K, 4) -> (M, K)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def matched_boxes(a: np.ndarray, b: np.ndarray, min_iou: float) -> int:
    """How many boxes of ``a`` pair one-to-one with a box of ``b`` at IoU >= ``min_iou`` (greedy, best pairs first)."""
    iou = box_iou(a, b)
    pairs = sorted(((-iou[i, j], i, j) for i, j in zip(*np.nonzero(iou >= min_iou), strict=True)))
    used_a: set[int] = set()
    used_b: set[int] = set()
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(int(i))
            used_b.add(int(j))
    return len(used_a)
