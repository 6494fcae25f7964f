"""Unit tests for MedDEL (dataeff.select.meddel) and its single-process shell on synthetic embeddings."""

import numpy as np
import pandas as pd
import pytest

from dataeff.config import ConfigError, load_config
from dataeff.constants import REASON_CODES, REDUNDANT_PREFIX
from dataeff.select import meddel as M
from dataeff.select.config import SelectConfig
from dataeff.select.manifest import Reasons, decided_reasons, target_count
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


def test_decided_reasons_name_the_earlier_member_only_when_written():
    dropped = np.array([0, REASON_CODES.index("dark"), 0, 0, 0], dtype=np.uint8)
    kept, redundant = np.array([True, False, False, False, False]), np.array([False, False, True, True, False])
    reason = decided_reasons(dropped, kept, redundant, np.array([-1, 0, 0, 2, 1], dtype=np.int32))
    assert reason.code.dtype == np.uint8 and reason.of.tolist() == [-1, -1, 0, 2, -1]
    assert reason.strings(np.array(list("abcde"))).tolist() == [
        "kept",
        "dark",
        "redundant_of:a",
        "redundant_of:c",
        "not_selected",
    ]


def test_reasons_spread_over_the_pool_renumber_the_duplicated_row():
    sub = Reasons(
        np.array([REASON_CODES.index("kept"), REASON_CODES.index(REDUNDANT_PREFIX)], np.uint8), np.array([-1, 0])
    )
    whole = sub.spread(np.array([False, True, False, True]), "downstream_overlap")
    assert whole.of.tolist() == [-1, -1, -1, 1]
    assert whole.strings(np.array(list("abcd"))).tolist() == [
        "downstream_overlap",
        "kept",
        "downstream_overlap",
        "redundant_of:b",
    ]


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
    valid = np.arange(100) >= 10
    for target in (1, 13, 50, 90):
        kept, redundant, info = M.decide(labels, m, pos, valid, target, None)
        assert kept.sum() == target and not kept[:10].any() and not (kept & redundant).any()
        assert "shortfall" not in info
    kept, redundant, info = M.decide(labels, m, pos, valid, 95, None)
    assert kept.sum() == 90 and "only 90 valid samples" in info["shortfall"]
    # Fixed eps leaving too few survivors: topped up to the target from the least redundant.
    kept, redundant, info = M.decide(labels, m, pos, valid, 60, 0.9)
    assert kept.sum() == 60 and info["epsilon"] == pytest.approx(0.9)


def test_meddel_marks_twins_redundant_and_drops_outliers_at_exact_ratio():
    keys, emb, pairs, outs = synthetic_pool()
    n = len(keys)
    quality = quality_frame(n, dark=[5], blurred=[6])
    for ratio in (0.5, 0.2):
        d = run_meddel(emb, keys, quality, select_cfg(ratio=ratio), 0, 1)
        assert d.kept.sum() == target_count(ratio, n)
        assert isinstance(d.reason, Reasons)
        strings = d.reason.strings(keys)
        reason = dict(zip(keys, strings, strict=False))
        for a, b in pairs:
            assert reason[a] == f"redundant_of:{b}" or reason[b] == f"redundant_of:{a}", (a, b, reason[a], reason[b])
        for o in outs:
            assert reason[o] in ("outlier", "small_cluster")
        assert reason[keys[5]] == "dark" and reason[keys[6]] == "blurred"
        assert set(strings) <= {"kept", "not_selected", "outlier", "small_cluster", "dark", "blurred"} | {
            r for r in strings if r.startswith("redundant_of:")
        }
    # Deterministic: same input, same decisions.
    d2 = run_meddel(emb, keys, quality, select_cfg(ratio=0.2), 0, 1)
    assert isinstance(d2.reason, Reasons) and d2.reason.strings(keys).tolist() == strings.tolist()


def test_meddel_without_quality_stats_still_selects():
    keys, emb, _, _ = synthetic_pool(seed=1)
    q = quality_frame(len(keys)) * np.nan
    d = run_meddel(emb, keys, q, select_cfg(ratio=0.1), 0, 1)
    assert d.kept.sum() == target_count(0.1, len(keys))
    assert d.info["quality_checks"] == []


# --------------------------------------------------------------------------- ties at the cut-off


def _one_cluster_decisions(x: np.ndarray, target: int) -> tuple[np.ndarray, list[str]]:
    """Hand-made pool in one cluster, visited in row order: kept mask and reasons (keys k00, k01, ...)."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    keys = np.array([f"k{i:02d}" for i in range(n)])
    sims = np.linspace(0.0, 1.0, n)  # order "hard" visits the lowest centroid similarity first: row order
    m, prev, pos = M.cluster_redundancy(x, sims, "hard", 0, 0)
    kept, redundant, _ = M.decide(np.zeros(n, np.int64), m, pos, np.ones(n, bool), target, None)
    return kept, decided_reasons(np.zeros(n, np.uint8), kept, redundant, prev).strings(keys).tolist()


def _basis(dim: int, *idx: int) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[list(idx)]


def test_ties_at_the_cut_trim_only_the_tied_near_duplicates():
    # Visit order: e0, copy(e0), e1, copy(e1), e2, copy(e2), e3, e4, e5, u with cosine 0.5 to e3.
    # Each copy is at cosine exactly 0.9 to its original, so the three copies tie at the cut.
    e = np.eye(16, dtype=np.float32)
    r = np.float32(np.sqrt(1 - 0.81))

    def copy(i: int) -> np.ndarray:
        return np.float32(0.9) * e[i] + r * e[10 + i]

    u = np.float32(0.5) * e[3] + np.float32(np.sqrt(0.75)) * e[13]
    x = np.stack([e[0], copy(0), e[1], copy(1), e[2], copy(2), e[3], e[4], e[5], u])
    kept, reason = _one_cluster_decisions(x, target=8)
    # The 7 samples below the cut 0.9 (unique, or at 0.5) all stay; one copy of three is kept.
    assert kept.sum() == 8
    assert all(kept[[0, 2, 4, 6, 7, 8, 9]]), reason
    assert reason[9] == "kept"  # the bug dropped this (m = 0.5) and kept two copies at 0.9
    dropped = [i for i in (1, 3, 5) if not kept[i]]
    assert len(dropped) == 2
    for i in dropped:  # trimmed tied copies are redundant of their original, not "not_selected"
        assert reason[i] == f"redundant_of:k{i - 1:02d}"
    assert "not_selected" not in reason


def test_cut_at_the_clip_value_still_removes_exact_duplicates_first():
    # e0, then four exact copies of it (similarity clipped to 1.0), then seven unique frames.
    x = np.concatenate([_basis(16, 0, 0, 0, 0, 0), _basis(16, 1, 2, 3, 4, 5, 6, 7)])
    kept, reason = _one_cluster_decisions(x, target=10)
    # 8 samples are below the cut (1.0): all kept; 2 of the 4 copies fill the target.
    assert kept.sum() == 10 and all(kept[[0] + list(range(5, 12))]), reason
    assert sorted(reason[1:5]) == ["kept", "kept", "redundant_of:k00", "redundant_of:k00"]
    assert "not_selected" not in reason


def test_tied_trim_is_balanced_over_clusters_among_the_tied_only():
    # Cluster 0: 6 tied rows; cluster 1: 2 tied rows and 5 rows below the cut.
    labels = np.array([0] * 6 + [1] * 7)
    m = np.array([1.0] * 6 + [1.0, 1.0] + [0.1] * 5, dtype=np.float32)
    pos = np.arange(13)
    kept, redundant, info = M.decide(labels, m, pos, np.ones(13, bool), 9, None)
    assert info["epsilon"] == pytest.approx(0.0)
    assert kept[8:].all()  # everything below the cut
    assert kept[:8].sum() == 4 and kept[:6].sum() == 2 and kept[6:8].sum() == 2  # 4 tied: 2 + 2
    assert (redundant == ~kept).all()


def test_fixed_epsilon_with_surplus_trims_the_most_redundant():
    labels = np.zeros(6, np.int64)
    m = np.array([-np.inf, 0.1, 0.2, 0.3, 0.35, 0.4], dtype=np.float32)
    kept, redundant, info = M.decide(labels, m, np.arange(6), np.ones(6, bool), 4, 0.5)
    assert kept.tolist() == [True, True, True, True, False, False]
    assert redundant.tolist() == [False, False, False, False, True, True]
    assert info["epsilon"] == pytest.approx(1 - 0.3)


# --------------------------------------------------------------------------- perceptual-hash copies (meddel.phash)


def _signatures(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random, mutually far pHashes and uncorrelated thumbnails for ``n`` distinct images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**63, size=n, dtype=np.uint64), rng.integers(0, 256, size=(n, 16, 16)).astype(np.uint8)


def test_earliest_copy_needs_both_the_hash_and_the_thumbnail():
    phash, thumbs = _signatures(6)
    phash[3] = phash[1] ^ np.uint64(0b111)  # 3 bits from row 1 ...
    thumbs[3] = np.clip(thumbs[1].astype(int) + 9, 0, 255)  # ... and the same picture, brighter: a copy
    phash[4] = phash[1]  # same hash, other picture: not a copy
    phash[5], thumbs[5] = phash[3], thumbs[3]  # copies row 1 and row 3: the earliest (1) is named
    got = M.earliest_copy(phash, thumbs, max_distance=4, min_corr=0.99)
    assert got.tolist() == [-1, -1, -1, 1, -1, 1]
    # At 2 bits row 3 is no longer a copy of row 1, and row 5 (0 bits from row 3) copies row 3.
    assert M.earliest_copy(phash, thumbs, max_distance=2, min_corr=0.99).tolist() == [-1, -1, -1, -1, -1, 3]
    blank = np.zeros_like(thumbs)  # rows without a signature: constant thumbnails never match
    assert (M.earliest_copy(np.zeros(6, np.uint64), blank, 64, 0.5) == -1).all()


def test_earliest_copy_is_the_same_across_blocks(monkeypatch):
    phash, thumbs = _signatures(40, seed=1)
    for i in range(20, 40):  # rows 20.. copy rows 0..19
        phash[i], thumbs[i] = phash[i - 20] ^ np.uint64(1 << (i % 64)), thumbs[i - 20]
    ref = M.earliest_copy(phash, thumbs, 10, 0.99)
    assert ref.tolist() == [-1] * 20 + list(range(20))
    monkeypatch.setattr(M, "_BLOCK_ELEMS", 2 * 40 * 3)  # 3 rows per block
    assert M.earliest_copy(phash, thumbs, 10, 0.99).tolist() == ref.tolist()


def test_signature_copy_counts_as_duplicate_although_embeddings_disagree():
    # Four orthogonal embeddings (nothing redundant to the embedding rule); row 3 is a
    # brightened copy of row 0 by its signatures (a weak encoder put them far apart).
    x = np.eye(4, dtype=np.float32)
    phash, thumbs = _signatures(4, seed=2)
    phash[3], thumbs[3] = phash[0], np.clip(thumbs[0].astype(int) + 20, 0, 255)
    sims = np.array([0.1, 0.2, 0.3, 0.4])
    m, prev, _ = M.cluster_redundancy(x, sims, "hard", 0, 0)
    assert m[3] == 0.0 and prev[3] == 0  # argmax of an all-zero row: earliest member
    m, prev, _ = M.cluster_redundancy(x, sims, "hard", 0, 0, (phash, thumbs), 10, 0.99)
    assert m.tolist()[1:] == [0.0, 0.0, 1.0] and prev[3] == 0
    kept, redundant, _ = M.decide(np.zeros(4, np.int64), m, np.arange(4), np.ones(4, bool), 3, None)
    assert kept.tolist() == [True, True, True, False] and redundant[3]


def _quality_with_signatures(keys, emb, copies):
    """Index rows with signatures: distinct images, except each (original, copy) pair shares its picture."""
    q = quality_frame(len(keys))
    phash, thumbs = _signatures(len(keys), seed=3)
    for a, b in copies:
        phash[b], thumbs[b] = phash[a], np.clip(thumbs[a].astype(int) + 15, 0, 255)
    q["pixel_sha256"] = [f"{i:064x}" for i in range(len(keys))]
    q["phash"] = phash.view(np.int64)
    q["thumb"] = [t.tobytes() for t in thumbs]
    return q


def test_meddel_phash_finds_copies_the_embeddings_miss_and_names_the_twin():
    keys, emb, _, _ = synthetic_pool(seed=4, dups=0, outliers=0)
    plain = run_meddel(emb, keys, quality_frame(len(keys)), select_cfg(ratio=0.8), 0, 1)
    # Three "copies": pairs of kept members of one cluster, different embeddings, same picture.
    assert isinstance(plain.reason, Reasons)
    kept = plain.reason.strings(keys) == "kept"
    members = np.flatnonzero(kept & (plain.cluster == plain.cluster[np.flatnonzero(kept)[0]]))
    assert len(members) >= 6
    copies = [(int(members[i]), int(members[i + 1])) for i in (0, 2, 4)]
    quality = _quality_with_signatures(keys, emb, copies)
    d = run_meddel(emb, keys, quality, select_cfg(ratio=0.8, **{"meddel.phash": "true"}), 0, 1)
    assert d.kept.sum() == plain.kept.sum() == target_count(0.8, len(keys))
    for a, b in copies:  # both were kept on embeddings alone; now one is redundant of the other
        assert plain.kept[a] and plain.kept[b]
        assert isinstance(d.reason, Reasons)
        reason = d.reason.strings(keys)
        assert {reason[a], reason[b]} & {f"redundant_of:{keys[b]}", f"redundant_of:{keys[a]}"}, (a, b)


def test_meddel_phash_without_signature_columns_asks_to_reshard():
    keys, emb, _, _ = synthetic_pool(seed=5)
    cfg = select_cfg(ratio=0.5, **{"meddel.phash": "true"})
    with pytest.raises(ConfigError, match="re-shard"):
        run_meddel(emb, keys, quality_frame(len(keys)), cfg, 0, 1)
    with pytest.raises(ConfigError, match="meddel.min_thumb_corr"):
        select_cfg(**{"meddel.min_thumb_corr": 0})


# --------------------------------------------------------------------------- bounded scan (meddel.max_scan_rows)


def _cluster_with_twins(n=1000, dim=64, twins=40, seed=0):
    """One cluster's unit rows (spread over a few directions, like a real cluster) and planted twin pairs.

    Returns (x float32, centroid similarities, (original, copy) row pairs with cosine > 0.99).
    """
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim)
    spread = rng.normal(size=(8, dim))  # the cluster varies mostly along 8 directions
    base = centre / np.linalg.norm(centre) + 0.3 * rng.normal(size=(n - twins, 8)) @ spread / np.sqrt(dim)
    base += 0.05 * rng.normal(size=base.shape) / np.sqrt(dim)
    originals = rng.choice(n - twins, size=twins, replace=False)
    x = np.concatenate([base, base[originals] + 0.02 * rng.normal(size=(twins, dim)) / np.sqrt(dim)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    perm = rng.permutation(n)  # twins anywhere in row order
    x, where = x[perm], np.argsort(perm)
    pairs = [(int(where[o]), int(where[n - twins + j])) for j, o in enumerate(originals)]
    assert all(float(x[a] @ x[b]) > 0.99 for a, b in pairs)
    centroid = x.mean(axis=0) / np.linalg.norm(x.mean(axis=0))
    return x, x @ centroid, pairs


def test_bounded_scan_equals_the_exact_scan_when_the_cluster_fits():
    x, sims, _ = _cluster_with_twins(n=300)
    exact = M.cluster_redundancy(x, sims, "hard", 0, 7)
    for bound in (300, 4096):
        for a, b in zip(M.cluster_redundancy(x, sims, "hard", 0, 7, max_scan_rows=bound), exact, strict=True):
            assert a.tobytes() == b.tobytes()


def test_bounded_scan_keeps_the_twins_and_only_lowers_similarities(monkeypatch):
    x, sims, pairs = _cluster_with_twins()
    exact_m, _, exact_pos = M.cluster_redundancy(x, sims, "hard", 0, 3)
    scanned = []
    scan = M.max_earlier_similarity
    monkeypatch.setattr(M, "max_earlier_similarity", lambda rows: (scanned.append(len(rows)), scan(rows))[1])
    m, prev, pos = M.cluster_redundancy(x, sims, "hard", 0, 3, max_scan_rows=64)
    assert max(scanned) <= 64 and sum(scanned) == len(x)  # every member scanned once, within a leaf of <= 64
    assert pos.tolist() == exact_pos.tolist()
    # A leaf's product may round differently from the whole cluster's: 1e-6 is float32 noise.
    assert (m <= exact_m + 1e-6).all() and (m < exact_m - 1e-3).any()  # a lower bound, and pairs were cut apart
    for a, b in pairs:  # the later-visited twin still finds the earlier one
        later, earlier = (b, a) if pos[b] > pos[a] else (a, b)
        assert m[later] > 0.99 and prev[later] == earlier, (a, b, m[later], prev[later])
    assert ((prev == -1) == ~np.isfinite(m)).all() and (pos[prev[prev >= 0]] < pos[prev >= 0]).all()


def test_scan_leaves_are_deterministic_bounded_halves_in_visit_order():
    x, _, _ = _cluster_with_twins()
    leaves = M.scan_leaves(x, 64, 0, 3)
    assert sorted(np.concatenate(leaves).tolist()) == list(range(len(x)))
    assert all(28 <= len(leaf) <= 64 and (np.diff(leaf) > 0).all() for leaf in leaves)  # cut within 45-55%
    again = M.scan_leaves(x.copy(), 64, 0, 3)
    assert [leaf.tolist() for leaf in again] == [leaf.tolist() for leaf in leaves]
    assert M.scan_leaves(x, 0, 0, 3)[0].tolist() == list(range(len(x)))  # 0: one leaf, the exact scan
    same = np.repeat(x[:1], 10, axis=0)  # identical rows: cut by visit position
    assert sorted(leaf.tolist() for leaf in M.scan_leaves(same, 4, 0, 0)) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    m1 = M.cluster_redundancy(x, np.zeros(len(x)), "random", 5, 9, max_scan_rows=64)
    m2 = M.cluster_redundancy(x, np.zeros(len(x)), "random", 5, 9, max_scan_rows=64)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(m1, m2, strict=True))


def test_leaf_cut_moves_off_a_near_duplicate_pair_at_the_median():
    # 100 rows on a line at 0, 1, ..., 99, except ranks 49 and 50: twins at 49.5 and 49.5001.
    # A cut at the median rank (50) would part them; the widest nearby gap (1.5) is just below.
    t = np.arange(100.0)
    t[49], t[50] = 49.5, 49.5001
    perm = np.random.default_rng(0).permutation(100)  # visit order unrelated to the line
    x = np.stack([t[perm], np.zeros(100)], axis=1).astype(np.float32)
    leaves = M.scan_leaves(x, 99, 0, 0)
    twins = {int(np.flatnonzero(perm == 49)[0]), int(np.flatnonzero(perm == 50)[0])}
    assert sorted(len(leaf) for leaf in leaves) == [49, 51]
    assert any(twins <= set(leaf.tolist()) for leaf in leaves)


def test_bounded_scan_restricts_signature_copies_to_the_leaf():
    x, sims, _ = _cluster_with_twins(n=200, twins=0)
    phash, thumbs = _signatures(200, seed=4)
    leaves = M.scan_leaves(x[M.visit_order(sims, "hard", 0, 0)], 50, 0, 0)
    perm = M.visit_order(sims, "hard", 0, 0)
    a, b = perm[leaves[0][0]], perm[leaves[0][1]]  # same leaf
    c = perm[leaves[1][-1]]  # another leaf, visited after a
    phash[[b, c]], thumbs[[b, c]] = phash[a], thumbs[a]
    m, prev, _ = M.cluster_redundancy(x, sims, "hard", 0, 0, (phash, thumbs), 10, 0.99, max_scan_rows=50)
    assert m[b] == 1.0 and prev[b] == a
    assert m[c] < 1.0  # its original sits in another leaf
    m, prev, _ = M.cluster_redundancy(x, sims, "hard", 0, 0, (phash, thumbs), 10, 0.99)
    assert m[c] == 1.0 and prev[c] == a


def test_max_scan_rows_is_validated_and_reaches_the_scan(monkeypatch):
    with pytest.raises(ConfigError, match="meddel.max_scan_rows"):
        select_cfg(**{"meddel.max_scan_rows": 1})
    assert select_cfg().meddel.max_scan_rows == 4096 and select_cfg(**{"meddel.max_scan_rows": 0})
    keys, emb, _, _ = synthetic_pool(seed=6, centres=2, per=60)
    scanned = []
    scan = M.max_earlier_similarity
    monkeypatch.setattr(M, "max_earlier_similarity", lambda rows: (scanned.append(len(rows)), scan(rows))[1])
    d = run_meddel(emb, keys, quality_frame(len(keys)), select_cfg(ratio=0.5, **{"meddel.max_scan_rows": 16}), 0, 1)
    assert d.kept.sum() == target_count(0.5, len(keys)) and 0 < max(scanned) <= 16
