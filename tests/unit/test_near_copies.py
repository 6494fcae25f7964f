"""Unit tests for MedDEL's pool-wide near-copy pass (dataeff.select.near_copies) on real Kvasir-SEG frames."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataeff.config import ConfigError, load_config
from dataeff.data.demo import render
from dataeff.data.signatures import gray_base, image_signature, thumbnail
from dataeff.select import near_copies as NC
from dataeff.select.config import SelectConfig
from dataeff.select.manifest import Reasons
from dataeff.select.meddel_run import run_meddel

IMAGES = Path(__file__).resolve().parents[2] / "data" / "kvasir-seg" / "images"
#: Different scenes (the first vendored frames, none a duplicate of another).
STEMS = sorted(p.name for p in IMAGES.glob("*.jpg"))[:6] if IMAGES.is_dir() else []
needs_kvasir = pytest.mark.skipif(len(STEMS) < 6, reason="needs the vendored data/kvasir-seg images")


def _thumb(data: bytes) -> np.ndarray:
    return thumbnail(gray_base(Image.open(io.BytesIO(data)).convert("RGB")))


def _copy(data: bytes, kind: str, param: float) -> bytes:
    return render({"kind": kind, "param": param}, data)


def test_resample_matrix_identity_and_zoom_keeps_rows_normalised():
    assert np.allclose(NC.resample_matrix(16, 1.0, 0.0), np.eye(16))
    m = NC.resample_matrix(16, 1.2, 0.5)
    assert np.allclose(m.sum(axis=1), 1.0) and (m >= 0).all()
    assert len(NC.warps((1.1, 1.2), 0.5)) == 3 * 9


def test_copy_score_is_symmetric_and_brightness_invariant():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(3, 16, 16)).astype(np.uint8)
    b = np.clip(a.astype(int) * 0.8 + 10, 0, 255).astype(np.uint8)
    assert (NC.copy_score(a, b) > 0.999).all()
    c = rng.integers(0, 255, size=(3, 16, 16)).astype(np.uint8)
    assert np.allclose(NC.copy_score(a, c), NC.copy_score(c, a))
    assert (NC.copy_score(a, c) < 0.5).all()


@needs_kvasir
@pytest.mark.parametrize(
    "kind,param", [("crop", 0.0), ("crop", 1.0), ("shift", 0.0), ("shift", 1.0), ("brightness", 0.1), ("reencode", 0.0)]
)
def test_planted_copy_of_a_kvasir_frame_is_confirmed(kind, param):
    data = (IMAGES / STEMS[0]).read_bytes()
    orig, copy = _thumb(data), _thumb(_copy(data, kind, param))
    assert NC.copy_score(orig[None], copy[None])[0] >= NC.MIN_COPY_CORR


@needs_kvasir
def test_different_kvasir_frames_are_not_confirmed():
    t = np.stack([_thumb((IMAGES / s).read_bytes()) for s in STEMS])
    i, j = np.triu_indices(len(t), 1)
    assert (NC.copy_score(t[i], t[j]) < NC.MIN_COPY_CORR).all()


@needs_kvasir
def test_near_copy_parents_groups_each_frame_with_its_copies_only():
    datas = [(IMAGES / s).read_bytes() for s in STEMS]
    # rows 0-5 originals; 6: zoom of 0, 7: shift of 1, 8: darker 2, 9: zoom of the darker copy of 2
    extra = [_copy(datas[0], "crop", 0.5), _copy(datas[1], "shift", 0.7), _copy(datas[2], "brightness", 0.2)]
    extra.append(_copy(extra[2], "crop", 0.3))
    thumbs = np.stack([_thumb(d) for d in datas + extra])
    sharp = np.full(len(thumbs), 100.0)
    sharp[8] = 500.0  # the darker copy is the sharpest of its group: it stays
    parent, info = NC.near_copy_parents(thumbs, np.ones(len(thumbs), bool), sharp)
    group = {0: 0, 6: 0, 1: 1, 7: 1, 2: 2, 8: 2, 9: 2}
    removed = np.flatnonzero(parent >= 0).tolist()
    assert removed == [2, 6, 7, 9]
    for r in removed:
        assert group[int(parent[r])] == group[r]
    assert info["removed"] == 4 and info["groups"] == 3
    # an excluded row (e.g. an invalid frame) takes no part
    valid = np.ones(len(thumbs), bool)
    valid[6] = False
    parent2, _ = NC.near_copy_parents(thumbs, valid, sharp)
    assert parent2[6] == -1 and parent2[0] == -1


def test_copy_groups_are_deterministic_keep_the_sharpest_and_name_a_confirmed_partner():
    pairs = np.array([[0, 1], [1, 2], [5, 4], [7, 8], [8, 9]])
    sharp = np.array([1.0, 3.0, 2.0, 0, 5.0, 5.0, 0, np.nan, np.nan, 1.0])
    parent = NC.copy_groups(10, pairs, sharp)
    rng = np.random.default_rng(1)
    for _ in range(5):  # any order and orientation of the pairs gives the same result
        p = pairs[rng.permutation(len(pairs))]
        p = np.where(rng.random((len(p), 1)) < 0.5, p[:, ::-1], p)
        assert (NC.copy_groups(10, p, sharp) == parent).all()
    assert parent.tolist() == [1, -1, 1, -1, -1, 4, -1, 8, 9, -1]  # 1 sharpest; 4/5 tie -> 4; NaN lowest
    confirmed = {tuple(sorted(x)) for x in pairs.tolist()}
    assert all(tuple(sorted((i, int(p)))) in confirmed for i, p in enumerate(parent) if p >= 0)


def _select_cfg(**overrides):
    base = ["embeddings=unused", "out=unused", "cluster.niter=20"]
    return load_config(SelectConfig, None, base + [f"{k}={v}" for k, v in overrides.items()])


@needs_kvasir
def test_meddel_near_copies_removes_copies_the_embeddings_scatter():
    datas = [(IMAGES / s).read_bytes() for s in STEMS]
    copies = [_copy(datas[0], "crop", 0.6), _copy(datas[3], "brightness", 0.9)]
    images = datas + copies  # rows 6, 7: copies of rows 0, 3
    n = len(images)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 16))  # unrelated embeddings: nothing redundant to the embedding rule
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    keys = np.array([f"k{i:02d}" for i in range(n)])
    sigs = [image_signature(Image.open(io.BytesIO(d)).convert("RGB")) for d in images]
    q = pd.DataFrame(
        {"mean": 100.0, "std": 50.0, "laplacian_var": 400.0, "dark_frac": 0.1, "bright_frac": 0.0}, index=range(n)
    )
    q.loc[6, "laplacian_var"] = 900.0  # the zoom copy is the sharper: it stays; 3 and 7 tie: row 3 stays
    for col in ("pixel_sha256", "phash", "thumb"):
        q[col] = [s[col] for s in sigs]
    cfg = _select_cfg(
        ratio=1.0, **{"meddel.near_copies": "true", "meddel.outlier_quantile": 1.0, "meddel.min_cluster_size": 0}
    )
    d = run_meddel(emb, keys, q, cfg, 0, 1)
    assert isinstance(d.reason, Reasons)
    reason = d.reason.strings(keys)
    assert reason[0] == "redundant_of:k06" and reason[6] == "kept"
    assert reason[7] == "redundant_of:k03" and reason[3] == "kept"
    assert d.kept.sum() == n - 2 and d.info["near_copies"]["removed"] == 2
    off = {"meddel.outlier_quantile": 1.0, "meddel.min_cluster_size": 0}
    plain = run_meddel(emb, keys, q, _select_cfg(ratio=1.0, **off), 0, 1)
    assert plain.kept.all()
    with pytest.raises(ConfigError, match="meddel.near_copy_min_corr"):
        _select_cfg(**{"meddel.near_copy_min_corr": 0})
    with pytest.raises(ConfigError, match="re-shard"):
        run_meddel(emb, keys, q.drop(columns=["thumb"]), cfg, 0, 1)


def test_pair_scores_match_a_per_pair_reference_across_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    thumbs = rng.integers(0, 255, size=(9, 16, 16)).astype(np.uint8)
    thumbs[4] = np.clip(thumbs[1] * 1.1, 0, 255)
    pairs = np.array([[0, 1], [1, 4], [2, 4], [4, 8], [0, 8], [3, 5], [1, 2]])
    regs = NC.warps(NC.ZOOMS, NC.SHIFT)

    def ref(a, b):  # every registration of each side, against the other as it is
        wa, wb = NC.standardise(NC.warp(a[None], regs))[0], NC.standardise(NC.warp(b[None], regs))[0]
        return max((wa @ NC.standardise(b)).max(), (wb @ NC.standardise(a)).max())

    expect = np.array([ref(thumbs[i], thumbs[j]) for i, j in pairs])
    monkeypatch.setattr(NC, "_ROW_BLOCK", 2)
    assert np.allclose(NC.pair_scores(thumbs, pairs), expect, atol=1e-5)
    assert NC.pair_scores(thumbs, np.zeros((0, 2), np.int64)).shape == (0,)
