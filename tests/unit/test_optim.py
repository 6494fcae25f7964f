"""The shared optimiser helpers: one warm-up + cosine schedule for both stages, the lr scaling rule."""

from __future__ import annotations

import math

import pytest
import torch

from dataeff.optim import make_adamw, scaled_lr, warmup_cosine, warmup_cosine_scheduler


def mae_lr_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The pre-training schedule as ``models/mae.py:lr_factor`` wrote it before the merge."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def segment_warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The fine-tuning schedule as ``models/segment.py:warmup_cosine`` wrote it before the merge."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 8), (2, 8), (4, 14), (4, 20), (7, 8), (40, 1000), (8, 8)])
@pytest.mark.parametrize("floor", [0.0, 0.01, 0.05, 0.1])
def test_bit_identical_to_both_former_schedules(warmup, total, floor):
    for step in range(total + 5):  # past the end too: the floor holds
        got = warmup_cosine(step, warmup, total, floor)
        assert got == mae_lr_factor(step, warmup, total, floor), (step, warmup, total, floor)
        assert got == segment_warmup_cosine(step, warmup, total, floor), (step, warmup, total, floor)


def test_warmup_then_cosine_values():
    f = [warmup_cosine(s, warmup=4, total=20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(20, 4, 20, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 4, 14, floor=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 4, 14, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 0, 10) == 1.0  # no warm-up: the cosine starts at the peak


def test_scheduler_steps_the_optimiser_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_adamw([p], 0.1, (0.9, 0.95), 0.05, torch.device("cpu"))
    sched = warmup_cosine_scheduler(opt, warmup=2, total=6, floor=0.1)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.1 * warmup_cosine(s, 2, 6, 0.1) for s in range(7)]


def test_cpu_adamw_and_scaling_rule():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_adamw([{"params": [p], "weight_decay": 0.0}], 1e-3, (0.9, 0.95), 0.05, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.95)
    assert opt.param_groups[0]["weight_decay"] == 0.0  # a group's own decay wins
    assert scaled_lr(1.5e-4, 64, 2, 8) == pytest.approx(1.5e-4 * 1024 / 256)
