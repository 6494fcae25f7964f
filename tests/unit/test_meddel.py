"""Unit tests for MedDEL (dataeff.select.meddel) and its single-process shell on synthetic embeddings."""

import numpy as np
import pandas as pd
import pytest

from dataeff.config import ConfigError, load_config
from dataeff.select import meddel as M
from dataeff.select.config import SelectConfig
from dataeff.select.manifest import redundant_reasons, target_count
from dataeff.select.meddel_run import run_meddel


def synthetic_pool(seed=0, centres=8, per=40, dim=32, dups=10, outliers=3):
    """Clustered unit vectors with planted near-duplicate pairs and far-away outliers.

    Returns (keys, float16 embeddings, twin pairs as (original, copy) keys, outlier keys).
    """
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.repeat(c, per, axis=0) + 0.35 * rng.normal(size=(centres * per, dim)) / np.sqrt(dim)
    originals = rng.choice(len(x), size=dups, replace=False)
    copies = x[originals] + 0.002 * rng.normal(size=(dups, dim)) / np.sqrt(dim)
    far = rng.normal(size=(outliers, dim))
    x = np.concatenate([x, copies, far])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = np.array([f"s{i:05d}" for i in range(len(x))])
    perm = rng.permutation(len(x))  # keys unrelated to structure
    keys = keys[perm]
    pairs = [(keys[o], keys[centres * per + j]) for j, o in enumerate(originals)]
    outs = list(keys[centres * per + dups :])
    order = np.argsort(keys)
    return keys[order], x[order].astype(np.float16), pairs, outs


def quality_frame(n, dark=(), blurred=()):
    q = pd.DataFrame(
        {"mean": 100.0, "std": 50.0, "laplacian_var": 400.0, "dark_frac": 0.1, "bright_frac": 0.0}, index=range(n)
    )
    for i in dark:
        q.loc[i, ["mean", "dark_frac"]] = [3.0, 1.0]
    for i in blurred:
        q.loc[i, "laplacian_var"] = 10.0
    return q


def select_cfg(**overrides):
    base = ["embeddings=unused", "out=unused", "cluster.niter=20"]
    return load_config(SelectConfig, None, base + [f"{k}={v}" for k, v in overrides.items()])


def test_target_count_rounds_half_up():
    assert target_count(0.05, 1000) == 50
    assert target_count(0.25, 10) == 3  # 2.5 -> 3, not banker's 2
    assert target_count(0.01, 10) == 1  # never empty for a non-empty pool
    assert target_count(0.5, 0) == 0


def test_redundant_reasons_name_the_earlier_member():
    reason = np.array(["", "dark", "", ""], dtype=object)
    out = redundant_reasons(
        reason, np.array([False, False, True, True]), np.array([-1, -1, 0, 2]), np.array(list("abcd"))
    )
    assert out.tolist() == ["", "dark", "redundant_of:a", "redundant_of:c"] and reason[2] == ""


def test_quality_reasons_most_specific_first_and_switchable():
    q = pd.DataFrame(
        {
            "mean": [3.0, 250.0, 120.0, 100.0, 100.0],
            "std": [2.0, 10.0, 3.0, 50.0, 50.0],
            "laplacian_var": [1.0, 900.0, 2.0, 5.0, 500.0],
            "dark_frac": [1.0, 0.0, 0.0, 0.1, 0.1],
            "bright_frac": [0.0, 0.9, 0.0, 0.0, 0.0],
        }
    )
    cfg = M.MedDELConfig()
    assert M.quality_reasons(q, cfg).tolist() == ["dark", "overexposed", "blank", "blurred", ""]
    cfg = M.MedDELConfig(quality_checks=["blurred"])
    assert M.quality_reasons(q, cfg).tolist() == ["blurred", "", "blurred", "blurred", ""]
    with pytest.raises(ConfigError, match="meddel.quality_checks"):
        M.MedDELConfig(quality_checks=["noisy"])


def test_max_earlier_similarity_matches_brute_force_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    ref_m = np.array([-np.inf] + [s[j, :j].max() for j in range(1, 57)], dtype=np.float32)
    ref_a = np.array([-1] + [s[j, :j].argmax() for j in range(1, 57)])
    for block in (1 << 24, 57 * 5, 57):  # one block, several, one row each
        monkeypatch.setattr(M, "_BLOCK_ELEMS", block)
        m, a = M.max_earlier_similarity(x)
        np.testing.assert_allclose(m, ref_m, rtol=1e-6)
        np.testing.assert_array_equal(a, ref_a)


def test_bisect_threshold_is_the_exact_step():
    rng = np.random.default_rng(0)
    m = np.round(rng.random(200), 2)  # many ties
    for target in (1, 7, 50, 199, 200):
        t = M.bisect_threshold(m, target)
        assert (m <= t).sum() >= target
        assert (m < t).sum() < target  # no smaller cut reaches the target
    assert M.bisect_threshold(m, 201) == np.inf


def test_balanced_pick_spreads_over_clusters():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    priority = np.arange(19, dtype=float)[::-1]  # inside a cluster, later rows first
    pick = M.balanced_pick(labels, priority, np.ones(19, bool), 10)
    assert pick.sum() == 10
    assert np.bincount(labels[pick]).tolist() == [4, 3, 3] or np.bincount(labels[pick]).tolist() == [4, 3, 3]
    assert pick[9] and not pick[0]  # lowest priority value goes first
    assert M.balanced_pick(labels, priority, labels == 1, 10).sum() == 3  # all there is


def test_decide_hits_target_exactly_or_reports_shortfall():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 100)
    m = rng.random(100).astype(np.float32)
    pos = np.arange(100)
    invalid = np.full(100, "", object)
    invalid[:10] = "dark"
    for target in (1, 13, 50, 90):
        kept, redundant, info = M.decide(labels, m, pos, invalid, target, None)
        assert kept.sum() == target and not kept[:10].any() and not (kept & redundant).any()
        assert "shortfall" not in info
    kept, redundant, info = M.decide(labels, m, pos, invalid, 95, None)
    assert kept.sum() == 90 and "only 90 valid samples" in info["shortfall"]
    # Fixed eps leaving too few survivors: topped up to the target from the least redundant.
    kept, redundant, info = M.decide(labels, m, pos, invalid, 60, 0.9)
    assert kept.sum() == 60 and info["epsilon"] == pytest.approx(0.9)


def test_meddel_marks_twins_redundant_and_drops_outliers_at_exact_ratio():
    keys, emb, pairs, outs = synthetic_pool()
    n = len(keys)
    quality = quality_frame(n, dark=[5], blurred=[6])
    for ratio in (0.5, 0.2):
        d = run_meddel(emb, keys, quality, select_cfg(ratio=ratio), 0, 1)
        assert d.kept.sum() == target_count(ratio, n)
        reason = dict(zip(keys, d.reason, strict=False))
        for a, b in pairs:
            assert reason[a] == f"redundant_of:{b}" or reason[b] == f"redundant_of:{a}", (a, b, reason[a], reason[b])
        for o in outs:
            assert reason[o] in ("outlier", "small_cluster")
        assert reason[keys[5]] == "dark" and reason[keys[6]] == "blurred"
        assert set(d.reason) <= {"kept", "not_selected", "outlier", "small_cluster", "dark", "blurred"} | {
            r for r in d.reason if r.startswith("redundant_of:")
        }
    # Deterministic: same input, same decisions.
    d2 = run_meddel(emb, keys, quality, select_cfg(ratio=0.2), 0, 1)
    assert d2.reason.tolist() == d.reason.tolist()


def test_meddel_without_quality_stats_still_selects():
    keys, emb, _, _ = synthetic_pool(seed=1)
    q = quality_frame(len(keys)) * np.nan
    d = run_meddel(emb, keys, q, select_cfg(ratio=0.1), 0, 1)
    assert d.kept.sum() == target_count(0.1, len(keys))
    assert d.info["quality_checks"] == []
