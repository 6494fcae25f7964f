"""Metrics against hand-computed values: confusion matrix, mIoU, Dice, fg IoU, DEL, NormDEL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dataeff.metrics import (
    confusion_matrix,
    del_score,
    foreground_dice_iou,
    json_safe,
    normdel,
    per_class_iou,
    per_image_summary,
    segmentation_scores,
)


def test_confusion_matrix_counts_rows_target_cols_pred():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    expected = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 2]])
    assert torch.equal(cm, expected)
    assert int(cm.sum()) == target.numel()


def test_confusion_matrix_ignore_index_and_bad_values():
    target = torch.tensor([0, 1, 255, 1])
    pred = torch.tensor([0, 1, 0, 0])
    cm = confusion_matrix(pred, target, 2, ignore_index=255)
    assert cm.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="class ids"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(4), 2)


def test_binary_scores_hand_computed():
    # 1 image, 10 pixels: target fg = 4 px, pred fg = 3 px of which 2 are right.
    target = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 0])
    s = segmentation_scores(confusion_matrix(pred, target, 2))
    # background: TP 5, FP 2, FN 1 -> 5/8; polyp: TP 2, FP 1, FN 2 -> 2/5
    assert s["per_class_iou"] == pytest.approx([5 / 8, 2 / 5])
    assert s["miou"] == pytest.approx((5 / 8 + 2 / 5) / 2)
    assert s["fg_iou"] == pytest.approx(2 / 5)
    assert s["dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)


def test_whole_set_accumulation_is_not_a_mean_of_per_image_scores():
    # Image A: large polyp, perfectly found. Image B: empty mask, one false-positive pixel.
    ta, pa = torch.ones(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long)
    tb, pb = torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)
    pb[0, 0] = 1
    cm = confusion_matrix(pa, ta, 2) + confusion_matrix(pb, tb, 2)
    s = segmentation_scores(cm)
    # fg: TP 16, FP 1, FN 0 -> 16/17 ; bg: TP 15, FP 0, FN 1 -> 15/16
    assert s["fg_iou"] == pytest.approx(16 / 17)
    assert s["miou"] == pytest.approx((15 / 16 + 16 / 17) / 2)


def test_empty_masks_everywhere():
    # No foreground in target nor prediction over the whole set: polyp IoU is undefined
    # and excluded, so mIoU is the background IoU alone; fg scores are NaN (null in JSON).
    t = torch.zeros(2, 3, 3, dtype=torch.long)
    s = segmentation_scores(confusion_matrix(t.clone(), t, 2))
    assert s["miou"] == 1.0
    assert math.isnan(s["per_class_iou"][1])
    assert math.isnan(s["dice"]) and math.isnan(s["fg_iou"])
    assert json.loads(json.dumps(json_safe(s)))["dice"] is None


def test_empty_target_with_false_positives_scores_zero():
    t = torch.zeros(9, dtype=torch.long)
    p = t.clone()
    p[:3] = 1
    s = segmentation_scores(confusion_matrix(p, t, 2))
    assert s["per_class_iou"] == pytest.approx([6 / 9, 0.0])
    assert s["miou"] == pytest.approx(6 / 9 / 2)
    assert s["dice"] == 0.0 and s["fg_iou"] == 0.0


def test_class_absent_from_prediction_and_target_is_excluded():
    # 4 classes; class 3 never appears. Counted as 1 it would give (.5+.5+1+1)/4, as 0 (…+0)/4.
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    s = segmentation_scores(confusion_matrix(pred, target, 4))
    # class 0: TP1 FP1 FN1 -> 1/3 ; class 1: TP1 FP1 FN1 -> 1/3 ; class 2: 1/3 ; class 3: NaN
    iou = s["per_class_iou"]
    assert iou[:3] == pytest.approx([1 / 3] * 3) and math.isnan(iou[3])
    assert s["miou"] == pytest.approx(1 / 3)
    # multi-class Dice: mean over foreground classes 1, 2 (class 3 excluded): 2/4 each
    assert s["dice"] == pytest.approx(0.5)
    # fg IoU merges classes 1..3: fg target {2,3,4,5}, fg pred {1,2,3,4} -> 3/5
    assert s["fg_iou"] == pytest.approx(3 / 5)


def test_per_class_iou_matches_reference_on_random_data():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(4, 16, 16))
    pred = rng.integers(0, 3, size=(4, 16, 16))
    iou = per_class_iou(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 3))
    for c in range(3):
        inter = np.logical_and(pred == c, target == c).sum()
        union = np.logical_or(pred == c, target == c).sum()
        assert iou[c] == pytest.approx(inter / union)


def test_normdel_paper_check_values():
    # MedDEL benchmark figure: 5% -> mIoU 70.95 -> NormDEL 0.6626; 100% -> 72.02 -> 0.5659
    assert normdel(0.7095, 0.05) == pytest.approx(0.6626, abs=5e-5)
    assert normdel(0.7202, 1.0) == pytest.approx(0.5659, abs=5e-5)
    assert del_score(0.7202, 1.0) == pytest.approx(0.7202 * math.exp(-1))
    assert del_score(0.5, 0.2, alpha=0.0) == 0.5


def test_del_inputs_validated():
    with pytest.raises(ValueError, match="fraction.*0.7095"):
        normdel(70.95, 0.05)
    with pytest.raises(ValueError, match="R"):
        normdel(0.7, 0.0)
    with pytest.raises(ValueError, match="R"):
        del_score(0.7, 5)
    with pytest.raises(ValueError, match="alpha"):
        normdel(0.7, 0.5, alpha=-1)
    with pytest.raises(ValueError):
        normdel(float("nan"), 0.5)


def test_per_image_foreground_dice_iou_hand_computed():
    # target fg 4 px, pred fg 3 px, 2 shared: Dice 2*2/(3+4) = 4/7, IoU 2/(3+4-2) = 2/5
    target = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    pred = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]])
    assert foreground_dice_iou(pred, target) == pytest.approx((4 / 7, 2 / 5))
    # classes > 0 are merged: a class-2 pixel on a class-1 pixel is foreground found
    assert foreground_dice_iou(torch.tensor([2, 0]), torch.tensor([1, 0])) == (1.0, 1.0)
    empty = torch.zeros(3, 3, dtype=torch.long)
    assert foreground_dice_iou(empty, empty) == (1.0, 1.0)  # both empty: scored 1.0 (documented choice)
    fp = empty.clone()
    fp[0, 0] = 1
    assert foreground_dice_iou(fp, empty) == (0.0, 0.0) and foreground_dice_iou(empty, fp) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        foreground_dice_iou(torch.zeros(2, 2), torch.zeros(2, 3))


def test_per_image_mean_differs_from_the_pooled_score():
    # Image A: 16-px polyp found exactly (1.0, 1.0). Image B: 4-px polyp, 2 px found, no FP:
    # Dice 2*2/(2+4) = 2/3, IoU 2/4. Per-image means weight both images alike; the pooled
    # (whole-set) IoU is 18/20 because A's pixels dominate.
    ta, pa = torch.ones(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long)
    tb, pb = torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)
    tb[0, :] = 1
    pb[0, :2] = 1
    rows = [foreground_dice_iou(pa, ta), foreground_dice_iou(pb, tb)]
    summary = per_image_summary([d for d, _ in rows], [i for _, i in rows], both_empty=0)
    assert summary["dice_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert summary["iou_mean"] == pytest.approx((1 + 1 / 2) / 2)
    assert (summary["n"], summary["n_both_empty"], summary["both_empty"]) == (2, 0, "scored 1.0")
    pooled = segmentation_scores(confusion_matrix(pa, ta, 2) + confusion_matrix(pb, tb, 2))["fg_iou"]
    assert pooled == pytest.approx(18 / 20) and pooled != pytest.approx(summary["iou_mean"])
    assert math.isnan(per_image_summary([], [], 0)["dice_mean"])
