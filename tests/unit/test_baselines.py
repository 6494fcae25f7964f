"""Unit tests for the baselines: full, random (seeded), semdedup (dedup then random fill)."""

import numpy as np
import pytest

from dataeff.config import ConfigError
from dataeff.select import baselines as B
from dataeff.select.baselines_run import run_full, run_random
from dataeff.select.manifest import Reasons, target_count
from dataeff.select.semdedup import SemDeDupConfig, semdedup_decide
from dataeff.select.semdedup_run import run_semdedup
from tests.unit.test_meddel import select_cfg, synthetic_pool


def test_full_keeps_everything():
    keys = np.array(["a", "b", "c"])
    d = run_full(np.zeros((3, 2), np.float16), keys, None, select_cfg(method="full"), 0, 1)
    assert d.kept.all() and (d.reason == "kept").all() and (d.cluster == -1).all()


def test_random_is_seeded_exact_and_seed_dependent():
    k1, s1 = B.select_random(1000, 50, seed=0)
    k2, _ = B.select_random(1000, 50, seed=0)
    k3, _ = B.select_random(1000, 50, seed=1)
    assert k1.sum() == 50 and (k1 == k2).all() and not (k1 == k3).all()
    assert s1[k1].max() < s1[~k1].min()  # the lowest draws are kept


def test_semdedup_trims_survivors_or_refills_from_removed():
    m = np.array([-np.inf, 0.5, 0.99, 0.2, 0.97, 0.1, 0.999, 0.3])
    kept, red = semdedup_decide(m, epsilon=0.05, target=3, seed=0)
    survivors = m <= 0.95
    assert kept.sum() == 3 and not (kept & ~survivors).any()
    assert (red == ~survivors).all()
    kept, red = semdedup_decide(m, epsilon=0.05, target=7, seed=0)
    assert kept.sum() == 7 and kept[survivors].all()
    assert red.sum() == 1 and not (kept & red).any()


def test_semdedup_epsilon_validated():
    with pytest.raises(ConfigError, match="semdedup.epsilon"):
        SemDeDupConfig(epsilon=-0.1)


def test_semdedup_shell_marks_planted_twins():
    keys, emb, pairs, _ = synthetic_pool(seed=3)
    d = run_semdedup(emb, keys, None, select_cfg(method="semdedup", ratio=0.5, **{"semdedup.epsilon": 0.01}), 0, 1)
    assert isinstance(d.reason, Reasons)
    reason = dict(zip(keys, d.reason.strings(keys), strict=False))
    assert d.kept.sum() == target_count(0.5, len(keys))  # 166.5 -> 167, half up
    for a, b in pairs:
        assert reason[a] == f"redundant_of:{b}" or reason[b] == f"redundant_of:{a}"
    r = run_random(emb, keys, None, select_cfg(method="random", ratio=0.1), 0, 1)
    assert r.kept.sum() == target_count(0.1, len(keys)) and (r.cluster == -1).all()
