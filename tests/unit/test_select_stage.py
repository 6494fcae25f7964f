"""Unit tests of the select stage's pure parts: pool alignment, config, audit, gallery picks."""

import numpy as np
import pandas as pd
import pytest

from dataeff.config import ConfigError, load_config
from dataeff.constants import INDEX_NAME, QUALITY_KEYS
from dataeff.select.audit import read_truth
from dataeff.select.config import METHOD_NAMES, SelectConfig
from dataeff.select.gallery import hardness_extremes, pick_redundant_pairs, pick_removed
from dataeff.select.methods import METHODS, index_columns
from dataeff.select.pool import align_quality, read_pool_index, shard_dirs


def test_methods_registry_is_a_dict_of_functions_matching_the_config_choices():
    assert tuple(METHODS) == METHOD_NAMES and all(callable(f) for f in METHODS.values())
    with pytest.raises(ConfigError, match="method='nope'"):
        SelectConfig(embeddings="e", out="o", method="nope")  # type: ignore[arg-type]


def test_select_config_has_only_the_data_key_select_reads():
    cfg = load_config(SelectConfig, None, ["embeddings=e", "out=o", "data.shards=s"])
    assert cfg.data.shards == "s"
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(SelectConfig, None, ["embeddings=e", "out=o", "data.batch_size=4"])


def test_shard_dirs_of_dirs_lists_and_patterns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert shard_dirs(f"{tmp_path / 'a'}, {tmp_path / 'b'}") == [tmp_path / "a", tmp_path / "b"]
    assert shard_dirs(f"{tmp_path / 'a'}/x-{{000000..000002}}.tar") == [tmp_path / "a"]


def _index(quality: bool = True) -> pd.DataFrame:
    index = pd.DataFrame({"key": ["b", "a", "c", "a"], "status": ["ok", "ok", "rejected", "ok"], "shard": "s.tar"})
    if quality:
        for i, c in enumerate(QUALITY_KEYS):
            index[c] = float(i)
    return index


def test_align_quality_orders_ok_rows_by_key_and_fills_missing_stats():
    columns = ("key", "status", *QUALITY_KEYS)
    frame = align_quality(np.array(["a", "b"]), _index(), "emb", columns)
    assert frame["key"].tolist() == ["a", "b"] and frame["std"].tolist() == [1.0, 1.0]
    assert "shard" not in frame  # only the columns the method reads
    assert align_quality(np.array(["a", "b"]), _index(), "emb", (*columns, "shard"))["shard"].tolist() == ["s.tar"] * 2
    bare = align_quality(np.array(["a", "b"]), _index(quality=False), "emb", columns)
    assert bare[list(QUALITY_KEYS)].isna().all().all()
    with pytest.raises(ConfigError, match="1 ok sample\\(s\\) without an embedding"):
        align_quality(np.array(["a"]), _index(), "emb", columns)


def test_pool_index_reads_the_columns_a_method_needs(tmp_path):
    """Every rank holds the pool's index: only the method's columns, of those the index has."""
    for d, quality in (("a", True), ("b", False)):  # b: an index without quality statistics
        (tmp_path / d).mkdir()
        _index(quality).assign(thumb=b"x" * 256).to_parquet(tmp_path / d / INDEX_NAME)
    spec = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    assert "thumb" in read_pool_index(spec)
    meddel = load_config(SelectConfig, None, ["embeddings=e", "out=o"])
    narrow = read_pool_index(spec, index_columns(meddel))
    # b's missing statistics are asked for and skipped (NaN there); shard_dir is one string per directory
    assert list(narrow) == ["key", "status", *QUALITY_KEYS, "shard_dir"]
    assert narrow["mean"].isna().tolist() == [False] * 4 + [True] * 4
    assert narrow["shard_dir"].dtype == "category" and len(narrow) == 8
    phash = load_config(SelectConfig, None, ["embeddings=e", "out=o", "meddel.phash=true"])
    assert "thumb" in read_pool_index(spec, index_columns(phash))


def test_read_truth_checks_file_and_columns(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_truth(str(tmp_path / "missing.csv"))
    (tmp_path / "t.csv").write_text("source,planted\na.jpg,none\n")
    with pytest.raises(ConfigError, match="needs columns"):
        read_truth(str(tmp_path / "t.csv"))
    (tmp_path / "t.csv").write_text("source,planted,kind,twin\na.jpg,none,original,\n")
    assert read_truth(str(tmp_path / "t.csv"))["twin"].tolist() == [""]


def test_gallery_picks_and_hardness_extremes():
    frame = pd.DataFrame(
        {
            "key": list("abcde"),
            "kept": [True, False, False, True, False],
            "reason": ["kept", "redundant_of:a", "dark", "kept", "redundant_of:e"],
        }
    )
    assert pick_removed(frame, ("dark", "blurred"), 5, 0) == ["c"]
    assert pick_redundant_pairs(frame, 5, 0) == [("b", "a")]  # twins that were kept come first
    hard, easy = hardness_extremes(np.array([0.2, 0.9, 0.1, 0.9], np.float32), 2)
    assert hard.tolist() == [1, 3] and easy.tolist() == [2, 0]


def test_audit_scores_planted_defects():
    from dataeff.select.audit import audit_selection

    index = pd.DataFrame(
        {
            "key": ["a", "b", "c", "d", "e", "f"],
            "source": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"],
            "status": ["ok"] * 5 + ["rejected"],
        }
    )
    truth = pd.DataFrame(
        {
            "source": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"],
            "planted": ["none", "near_duplicate", "invalid", "invalid", "none", "invalid"],
            "kind": ["original", "shift", "black", "blur", "original", "truncated"],
            "twin": ["", "a.jpg", "", "", "", ""],
        }
    )
    frame = pd.DataFrame(
        {
            "key": list("abcde"),
            "kept": [True, False, False, True, False],
            "reason": ["kept", "redundant_of:a", "dark", "kept", "outlier"],
            "cluster": 0,
            "score": 0.0,
            "generated": False,
        }
    )
    a = audit_selection(frame, index, truth)
    assert a["caught_at_shard_time"] == {"truncated": 1}
    assert a["per_reason"]["redundant"]["precision"] == 1.0 and a["per_reason"]["dark"]["precision"] == 1.0
    assert a["per_reason"]["outlier"]["precision"] == 0.0
    assert a["per_category"]["invalid"]["recall"] == 0.5 and a["per_category"]["near_duplicate"]["recall"] == 1.0
    assert a["precision"] == pytest.approx(2 / 3, abs=1e-4) and a["recall"] == pytest.approx(2 / 3, abs=1e-4)
    # Kept: a (original) and d (planted blur): 1 invalid of 2, no excess copy (b was dropped).
    assert a["kept"] == {
        "samples": 2,
        "invalid": 1,
        "invalid_share": 0.5,
        "excess_duplicates": 0,
        "excess_duplicate_share": 0.0,
    }
    # The pool that reached selection (a-e): c and d invalid; a and its copy b are one group, one excess.
    assert a["pool"] == {
        "samples": 5,
        "invalid": 2,
        "invalid_share": 0.4,
        "excess_duplicates": 1,
        "excess_duplicate_share": 0.2,
    }
    random_like = frame.assign(kept=[True, True, False, False, False], reason=["kept", "kept"] + ["not_selected"] * 3)
    assert audit_selection(random_like, index, truth)["kept"]["excess_duplicate_share"] == 0.5


# --------------------------------------------------------------------------- leakage exclusion


def _overlap_dir(tmp_path, pool_keys, shard_set_hash="set", encoder_sha="enc", matches=None):
    """A hand-made 'dataeff overlap' output: matches.parquet with the match-table columns + summary.json."""
    import json

    from dataeff.constants import OVERLAP_FORMAT
    from dataeff.overlap_core import MATCH_COLUMNS

    out = tmp_path / "overlap"
    out.mkdir(exist_ok=True)
    if matches is None:
        matches = pd.DataFrame(
            {
                "pool_key": pool_keys,
                "dataset": "kvasir",
                "file": [f"images/{k}.jpg" for k in pool_keys],
                "kind": "exact",
                "signals": "exact+phash",
                "phash_distance": 0,
                "thumb_corr": 1.0,
                "cosine": 0.999,
            },
            columns=list(MATCH_COLUMNS),
        )
    matches.to_parquet(out / "matches.parquet", index=False)
    inputs = {"embeddings": "/x", "encoder_sha256": encoder_sha, "shard_set_hash": shard_set_hash, "signals": ["exact"]}
    (out / "summary.json").write_text(json.dumps({"format": OVERLAP_FORMAT, "inputs": inputs}))
    return out


HEADER = {"shard_set_hash": "set", "encoder": {"sha256": "enc"}}


def test_read_exclusion_returns_matched_keys_and_records_the_summary_hash(tmp_path):
    from dataeff.files import file_sha256
    from dataeff.select.exclude import read_exclusion

    out = _overlap_dir(tmp_path, ["b", "d"])
    ex = read_exclusion(out, HEADER, ["a", "b", "c", "d"])
    assert ex.keys == {"b", "d"} and ex.matched["b"] == "kvasir/images/b.jpg"
    assert ex.inputs["exclude_summary_sha256"] == file_sha256(out / "summary.json")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shard_set_hash": "other"}, "another shard set"),
        ({"encoder_sha": "other"}, "another encoder"),
    ],
)
def test_read_exclusion_refuses_an_overlap_made_from_other_embeddings(tmp_path, kwargs, match):
    from dataeff.select.exclude import read_exclusion

    out = _overlap_dir(tmp_path, ["b"], **kwargs)
    with pytest.raises(ConfigError, match=match):
        read_exclusion(out, HEADER, ["a", "b"])


def test_an_overlap_without_matches_excludes_nothing(tmp_path):
    from dataeff.overlap_core import MATCH_COLUMNS
    from dataeff.select.exclude import read_exclusion

    empty = pd.DataFrame({c: [] for c in MATCH_COLUMNS})  # float columns, as an empty match list gives
    ex = read_exclusion(_overlap_dir(tmp_path, [], matches=empty), HEADER, ["a"])
    assert ex.keys == set() and ex.matched == {} and ex.inputs["exclude_summary_sha256"]


def test_read_exclusion_refuses_missing_incomplete_or_foreign_outputs(tmp_path):
    from dataeff.select.exclude import read_exclusion

    with pytest.raises(ConfigError, match="no complete 'dataeff overlap' output"):
        read_exclusion(tmp_path / "nowhere", HEADER, ["a"])
    out = _overlap_dir(tmp_path, ["b"])
    (out / "summary.json").unlink()  # the summary is written last: without it the run did not finish
    with pytest.raises(ConfigError, match="no complete"):
        read_exclusion(out, HEADER, ["a", "b"])
    out = _overlap_dir(tmp_path, ["zz"])
    with pytest.raises(ConfigError, match="not ok samples of this pool"):
        read_exclusion(out, HEADER, ["a", "b"])


def test_expand_decisions_marks_excluded_rows_and_keeps_the_method_rows():
    from dataeff.select.exclude import eligible_mask, expand_decisions
    from dataeff.select.manifest import Decisions

    keys = np.array(["a", "b", "c", "d"])
    eligible = eligible_mask(keys, {"b"})
    assert eligible.tolist() == [True, False, True, True]
    sub = Decisions(
        np.array([True, False, True]),
        np.array(["kept", "not_selected", "kept"], dtype=object),
        np.array([0, 1, 0]),
        np.array([0.1, 0.2, 0.3], np.float32),
        {"x": 1},
    )
    d = expand_decisions(sub, eligible)
    assert d.kept.tolist() == [True, False, False, True]
    assert d.reason.tolist() == ["kept", "downstream_overlap", "not_selected", "kept"]
    assert d.cluster.tolist() == [0, -1, 1, 0] and np.isnan(d.score[1]) and d.info == {"x": 1}
    assert expand_decisions(sub, np.ones(3, bool)) is sub


def test_gallery_captions_name_the_tripped_statistic_and_the_pair_similarity():
    from dataeff.select.gallery import pair_similarity, pick_per_reason, tripped_statistic
    from dataeff.select.meddel import MedDELConfig

    cfg = MedDELConfig()
    stats = {"mean": 12.0, "std": 3.0, "laplacian_var": 40.0, "dark_frac": 0.9, "bright_frac": 0.0}
    assert tripped_statistic("dark", stats, cfg) == "mean 12<25"
    assert tripped_statistic("dark", {**stats, "mean": 60.0}, cfg) == "dark px 0.90>0.8"
    assert tripped_statistic("blank", stats, cfg) == "std 3.0<8"
    assert tripped_statistic("blurred", stats, cfg) == "lap var 40<80"
    keys = np.array(["a", "b", "c"])
    emb = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float16)
    assert pair_similarity(keys, emb, [("b", "a"), ("c", "x")])[0] == pytest.approx(0.6, abs=1e-3)
    assert np.isnan(pair_similarity(keys, emb, [("c", "x")])[0])
    frame = pd.DataFrame({"key": list("abcde"), "reason": ["dark", "dark", "dark", "blurred", "kept"]})
    picked = pick_per_reason(frame, ("dark", "overexposed", "blurred"), 4, 0)
    # 4 tiles shared by the 2 reasons present (2 each, fewer where fewer exist), in reason order.
    assert list(picked) == ["dark", "blurred"] and len(picked["dark"]) == 2 and picked["blurred"] == ["d"]
