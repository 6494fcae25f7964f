"""Pure leakage-guard core: blockwise pair searches and match tables."""

import numpy as np
import pandas as pd
import pytest

from dataeff import overlap_core as core


def test_phash_pairs_blockwise_equals_brute_force():
    rng = np.random.default_rng(2)
    pool = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    queries = np.concatenate([pool[[5, 77]] ^ np.uint64(0b1011), rng.integers(0, 2**63, size=4, dtype=np.uint64)])
    brute = np.argwhere(core.hamming(pool, queries) <= 3)
    for block in (1, 7, 6 * 300):  # one pool row per block ... everything at once
        i, j, d = core.phash_pairs(pool, queries, 3, block_elems=block)
        assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(map(tuple, brute.tolist()))
        assert (d <= 3).all()
    i, j, d = core.phash_pairs(pool, queries, 3)
    assert {(5, 0), (77, 1)} <= set(zip(i.tolist(), j.tolist(), strict=True)) and d.max() <= 3


def test_confirmed_phash_pairs_drops_candidates_whose_thumbnails_differ():
    rng = np.random.default_rng(3)
    hashes = np.array([1, 1], dtype=np.uint64)  # identical hashes ...
    thumbs = rng.integers(0, 255, size=(2, 16, 16)).astype(np.uint8)  # ... different pictures
    i, j, _ = core.confirmed_phash_pairs(hashes, hashes[:1], thumbs, thumbs[:1], max_distance=0, min_corr=0.99)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 0)]


def test_confirmed_phash_pairs_with_no_candidate_is_empty():
    thumbs = np.zeros((2, 16, 16), dtype=np.uint8)
    hashes = np.array([0, 0], dtype=np.uint64)
    far = np.array([np.iinfo(np.uint64).max], dtype=np.uint64)  # 64 bits from both
    i, j, d = core.confirmed_phash_pairs(hashes, far, thumbs, thumbs[:1], max_distance=10)
    assert len(i) == len(j) == len(d) == 0


def test_cosine_pairs_blockwise_float16_pool():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(500, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = np.stack([pool[10], pool[400] + 0.05 * rng.normal(size=32).astype(np.float32), rng.normal(size=32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    expect = set(map(tuple, np.argwhere(pool @ queries.T >= 0.95).tolist()))
    for block in (1, 50, 10**6):
        i, j, c = core.cosine_pairs(pool.astype(np.float16), queries, 0.95, block_elems=block)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == expect and (c >= 0.95).all()
    assert {(10, 0), (400, 1)} <= expect
    with pytest.raises(ValueError, match="dim"):
        core.cosine_pairs(pool, queries[:, :8], 0.9)


def test_exact_pairs_ignores_empty_hashes():
    i, j = core.exact_pairs(["a", "", "b", "a"], ["a", "", "c"])
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 0), (3, 0)]


def test_match_table_kind_is_strongest_signal_and_values_filled():
    keys = np.array(["p0", "p1", "p2"])
    phash = np.array([0, 0b111, 2**40], dtype=np.uint64)
    emb = np.eye(3, dtype=np.float32)
    found = {
        "embedding": (np.array([0, 2]), np.array([0, 1])),
        "exact": (np.array([0]), np.array([0])),
        "phash": (np.array([1]), np.array([1])),
    }
    table = core.match_table(
        keys, ["ds", "ds"], ["images/a.jpg", "images/b.jpg"], found, phash, np.array([0, 0], np.uint64),
        emb, np.stack([emb[0], emb[2]]),
    )  # fmt: skip
    assert list(table.columns) == list(core.MATCH_COLUMNS)
    rows = {r.pool_key: r for r in table.itertuples()}
    assert (rows["p0"].kind, rows["p0"].signals) == ("exact", "exact+embedding")
    assert (rows["p1"].kind, rows["p1"].phash_distance) == ("phash", 3)
    assert (rows["p2"].kind, rows["p2"].file, rows["p2"].cosine) == ("embedding", "images/b.jpg", pytest.approx(1.0))
    assert np.isnan(table["thumb_corr"]).all()  # no thumbnails given
    assert core.excluded_keys(table) == {"p0", "p1", "p2"}
    assert core.excluded_keys(table, ["exact"]) == {"p0"}
    assert core.excluded_keys(table, ["phash"]) == {"p1"}
    summary = core.summarise(table, ["ds", "other"])
    assert summary["ds"] == {"pairs": 3, "files": 2, "pool_keys": 3, "exact": 1, "phash": 1, "embedding": 0}
    assert summary["other"]["pairs"] == 0
    empty = core.match_table(keys, ["ds"], ["x"], {})
    assert len(empty) == 0 and list(empty.columns) == list(core.MATCH_COLUMNS)
    with pytest.raises(ValueError, match="unknown kinds"):
        core.match_table(keys, ["ds"], ["x"], {"near": (np.array([0]), np.array([0]))})


def test_nearest_other_cosine_skips_same_group():
    emb = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    nn = core.nearest_other_cosine(emb, ["a", "a", "b", "c"], block_elems=2)
    np.testing.assert_allclose(nn, [0.6, 0.6, 0.8, 0.8], atol=1e-6)
    assert np.isneginf(core.nearest_other_cosine(emb[:1], ["a"]))[0]
    assert isinstance(core.summarise(pd.DataFrame(columns=list(core.MATCH_COLUMNS)), ["x"])["x"], dict)
