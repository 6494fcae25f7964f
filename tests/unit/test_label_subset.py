"""Low-label fine-tuning: seeded draws of labelled training pairs (data.n_train)."""

from __future__ import annotations

import pytest

from dataeff.config import ConfigError
from dataeff.data.datamodules import SegmentationDataModule
from dataeff.data.label_subset import draw_labelled
from tests.unit.test_downstream import _cfg, build

PAIRS = [f"p{i:02d}" for i in range(40)]


def test_draw_is_seeded_ordered_and_nested():
    a, again, other = draw_labelled(PAIRS, 10, 3), draw_labelled(PAIRS, 10, 3), draw_labelled(PAIRS, 10, 4)
    assert a == again and a != other
    assert len(set(a)) == 10 and a == sorted(a)  # no repeats; the split's order is kept
    assert set(a) <= set(draw_labelled(PAIRS, 20, 3))  # more labels, same seed: a superset
    assert draw_labelled(PAIRS, 0, 3) == PAIRS


@pytest.mark.parametrize(("n", "message"), [(-1, "must be >= 0"), (41, "only 40 pairs")])
def test_bad_sizes_name_the_key(n, message):
    with pytest.raises(ConfigError, match=f"data.n_train={n}.*{message}"):
        draw_labelled(PAIRS, n, 0)


def test_datamodule_draws_train_pairs_by_label_seed_and_keeps_val_test(tmp_path):
    root = build(tmp_path / "k", "kvasir", n=10)
    full = SegmentationDataModule(_cfg(root), tmp_path / "out")
    full.setup()
    parts = [SegmentationDataModule(_cfg(root, n_train=3), tmp_path / "out", label_seed=s) for s in (0, 0, 1)]
    for dm in parts:
        dm.setup()
        assert dm.pairs["val"] == full.pairs["val"] and dm.pairs["test"] == full.pairs["test"]
        assert len(dm.pairs["train"]) == 3 and set(dm.pairs["train"]) <= set(full.pairs["train"])
    assert parts[0].pairs["train"] == parts[1].pairs["train"] != parts[2].pairs["train"]
    with pytest.raises(ConfigError, match="data.n_train=-2"):
        _cfg(root, n_train=-2)
