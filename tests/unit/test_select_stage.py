"""Unit tests of the select stage's pure parts: pool alignment, config, audit, gallery picks."""

import numpy as np
import pandas as pd
import pytest

from dataeff.config import ConfigError, load_config
from dataeff.constants import QUALITY_KEYS
from dataeff.select.audit import read_truth
from dataeff.select.config import METHOD_NAMES, SelectConfig
from dataeff.select.gallery import hardness_extremes, pick_redundant_pairs, pick_removed
from dataeff.select.methods import METHODS
from dataeff.select.pool import align_quality, shard_dirs


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
    frame = align_quality(np.array(["a", "b"]), _index(), "emb")
    assert frame["key"].tolist() == ["a", "b"] and frame["std"].tolist() == [1.0, 1.0]
    bare = align_quality(np.array(["a", "b"]), _index(quality=False), "emb")
    assert bare[list(QUALITY_KEYS)].isna().all().all()
    with pytest.raises(ConfigError, match="1 ok sample\\(s\\) without an embedding"):
        align_quality(np.array(["a"]), _index(), "emb")


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
