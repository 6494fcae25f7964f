"""Segmentation metrics (mIoU, Dice, foreground IoU) and the benchmark's DEL / NormDEL.

Conventions, chosen to match the MedDEL / OptiDEL papers (arXiv 2401.17542, 2408.07107):

* **mIoU is a fraction** (0.7095, not 70.95) and the **mean over all classes including
  background** (binary polyp task: {background, polyp}).
* Scores come from **one confusion matrix accumulated over the whole evaluation set**
  (every pixel of every image counts once), not from a mean of per-image scores. This is
  how semantic-segmentation benchmarks (mmseg, ADE20K) compute mIoU; it weights large
  and small lesions by their pixel count and is well defined for images with empty masks.
* A class **absent from both prediction and target over the whole set** has an undefined
  IoU (0/0). It is **excluded from the mean** — counted neither as 1 nor as 0 — and is
  reported as ``NaN`` (``null`` in ``results.json``). A class that is predicted but absent
  from the target has IoU 0 and does count.
* **Per-image scores** (``foreground_dice_iou``, ``per_image_summary``) are the figure polyp
  papers quote: Dice and IoU of the foreground (all classes > 0 merged) of each image,
  averaged over images. An image whose mask *and* prediction are both empty scores 1.0
  (``BOTH_EMPTY_SCORE``: nothing to find and nothing found is a correct answer; excluding
  it would make a model that flags every negative frame look no worse than one that does
  not, and 1.0 is what the smoothed Dice of common polyp evaluation code gives there). An
  empty mask with a non-empty prediction, or the reverse, scores 0.

The pure functions here take tensors/arrays and return numbers; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Pixel confusion matrix, rows = target class, columns = predicted class.

    Summing the matrices of several batches gives the matrix of the whole set.

    Args:
        pred: predicted class per pixel.
        target: true class per pixel; pixels equal to ``ignore_index`` are skipped.
        num_classes: number of classes C (background included).
        ignore_index: target value to skip (e.g. 255 for "void"), or None.

    Returns:
        int64 tensor on ``pred``'s device.

    Shape:
        pred, target: any shape, identical (e.g. (B, H, W)) -> (C, C)

    Raises:
        ValueError: shapes differ, or a value is outside ``[0, num_classes)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if pred.numel():
        lo = min(int(pred.min()), int(target.min()))
        hi = max(int(pred.max()), int(target.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"class ids must be in [0, {num_classes}); found values in [{lo}, {hi}]")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _as_matrix(cm: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 2:
        raise ValueError(f"confusion matrix must be square with >= 2 classes, got shape {arr.shape}")
    return arr.astype(np.float64)


def per_class_iou(cm: torch.Tensor | np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) of every class; NaN where the class is absent from both.

    Shape:
        cm: (C, C) -> (C,)
    """
    m = _as_matrix(cm)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def per_class_dice(cm: torch.Tensor | np.ndarray) -> np.ndarray:
    """Dice = 2 TP / (2 TP + FP + FN) of every class; NaN where the class is absent from both.

    Shape:
        cm: (C, C) -> (C,)
    """
    m = _as_matrix(cm)
    tp = np.diag(m)
    denom = m.sum(0) + m.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), np.nan)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def segmentation_scores(cm: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """mIoU, Dice, foreground IoU and per-class IoU from a whole-set confusion matrix.

    * ``miou``: mean IoU over classes **including background** (class 0), as a fraction,
      classes absent from both prediction and target excluded.
    * ``dice``: foreground Dice — binary: Dice of class 1; multi-class: mean Dice over the
      foreground classes 1..C-1 (absent ones excluded).
    * ``fg_iou``: IoU of "any foreground" vs background (all classes > 0 merged); for a
      binary task this is the polyp IoU that polyp papers quote.
    * ``per_class_iou``: list of C floats (NaN for absent classes).

    All values are NaN when undefined (e.g. no foreground anywhere in prediction or target).

    Shape:
        cm: (C, C), rows = target, columns = prediction
    """
    m = _as_matrix(cm)
    iou = per_class_iou(m)
    dice = per_class_dice(m)
    fg = np.array([[m[0, 0], m[0, 1:].sum()], [m[1:, 0].sum(), m[1:, 1:].sum()]])
    return {
        "miou": _nanmean(iou),
        "dice": _nanmean(dice[1:]),
        "fg_iou": float(per_class_iou(fg)[1]),
        "per_class_iou": [float(v) for v in iou],
        "pixel_accuracy": float(np.trace(m) / m.sum()) if m.sum() > 0 else float("nan"),
    }


#: Dice and IoU of an image whose mask and prediction are both empty (see the module docstring).
BOTH_EMPTY_SCORE = 1.0
#: How results.json states that rule.
BOTH_EMPTY_RULE = "scored 1.0"


def foreground_dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of the foreground (every class > 0 merged) of one image.

    ``Dice = 2|P∩T| / (|P| + |T|)``, ``IoU = |P∩T| / |P∪T|``; both are
    :data:`BOTH_EMPTY_SCORE` when prediction and mask are both empty.

    Shape:
        pred, target: (H, W) class ids, identical shapes -> (dice, iou)

    Raises:
        ValueError: the shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p, t = pred.reshape(-1) > 0, target.reshape(-1).to(pred.device) > 0
    inter = int((p & t).sum())
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return BOTH_EMPTY_SCORE, BOTH_EMPTY_SCORE
    return 2.0 * inter / total, inter / (total - inter)


def per_image_summary(dice: Sequence[float], iou: Sequence[float], both_empty: int) -> dict[str, Any]:
    """Mean per-image foreground Dice and IoU, and how many images they average.

    Args:
        dice, iou: one value per image (from :func:`foreground_dice_iou`).
        both_empty: how many of those images had empty mask and prediction (scored 1.0).

    Returns:
        ``{"dice_mean", "iou_mean", "n", "both_empty", "n_both_empty"}`` (means NaN when ``n`` is 0).
    """
    if len(dice) != len(iou):
        raise ValueError(f"{len(dice)} Dice values but {len(iou)} IoU values")
    n = len(dice)
    return {
        "dice_mean": float(np.mean(dice)) if n else float("nan"),
        "iou_mean": float(np.mean(iou)) if n else float("nan"),
        "n": n,
        "both_empty": BOTH_EMPTY_RULE,
        "n_both_empty": int(both_empty),
    }


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats (recursively) with None so the result is valid JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_del_inputs(miou: float, ratio: float, alpha: float) -> None:
    if not isinstance(miou, (int, float, np.floating)) or math.isnan(miou):
        raise ValueError(f"mIoU must be a number in [0, 1], got {miou!r}")
    if not 0.0 <= miou <= 1.0:
        hint = f" (a percentage? pass {miou / 100:.4f})" if 1.0 < miou <= 100.0 else ""
        raise ValueError(f"mIoU must be a fraction in [0, 1], got {miou}{hint}")
    if not 0.0 < ratio <= 1.0:
        hint = f" (a percentage? pass {ratio / 100:g})" if 1.0 < ratio <= 100.0 else ""
        raise ValueError(f"ratio R (kept fraction of the pre-training pool) must be in (0, 1], got {ratio}{hint}")
    if not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")


def del_score(miou: float, ratio: float, alpha: float = 1.0) -> float:
    """Data-effective score ``DEL = mIoU · exp(−α·R)`` (MedDEL benchmark, α = 1).

    Args:
        miou: downstream mIoU as a fraction in [0, 1] (0.7095, not 70.95).
        ratio: R, the fraction of the pre-training pool kept, in (0, 1].
        alpha: weight of the data-cost penalty; the papers use 1.

    Raises:
        ValueError: mIoU outside [0, 1] (e.g. a percentage), R outside (0, 1], alpha < 0.
    """
    _check_del_inputs(miou, ratio, alpha)
    return float(miou) * math.exp(-alpha * float(ratio))


def normdel(miou: float, ratio: float, alpha: float = 1.0) -> float:
    """``NormDEL = 1 / (1 + exp(−DEL))``, the benchmark's headline number.

    Paper check values: (0.7095, 0.05) -> 0.6626 and (0.7202, 1.0) -> 0.5659.

    Raises:
        ValueError: as :func:`del_score`.
    """
    return 1.0 / (1.0 + math.exp(-del_score(miou, ratio, alpha)))
