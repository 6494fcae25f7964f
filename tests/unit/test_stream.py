"""Shard reading, epoch planning and PretrainDataModule streaming (single process)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dataeff.config import ConfigError, DataConfig
from dataeff.data import stream
from dataeff.data.datamodules import PretrainDataModule
from tests.fixtures import kvasir_images, make_shards, small_jpeg, write_selection


def write_shards(out: Path, sizes: list[int], name: str = "set", offset: int = 0) -> Path:
    """A shard directory in the documented format with deliberately uneven shard sizes."""
    out.mkdir(parents=True, exist_ok=True)
    images = kvasir_images(offset + sum(sizes))[offset:]
    rows, k = [], 0
    for s, n in enumerate(sizes):
        tar_name = f"{name}-{s:06d}.tar"
        with tarfile.open(out / tar_name, "w") as tar:
            for _ in range(n):
                key = f"{name}_{k:04d}"
                for ext, data in (("jpg", small_jpeg(images[k], 40)), ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"key": key, "status": "ok", "shard": tar_name})
                k += 1
        with tarfile.open(out / tar_name) as tar:  # where tarfile put each image, for the index
            spans = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        for row in rows[-n:] if n else []:
            row["offset"], row["length"] = spans[f"{row['key']}.jpg"]
    pd.DataFrame(rows).to_parquet(out / "index.parquet")
    return out


def epoch_batches(dm: PretrainDataModule) -> list[dict]:
    return list(dm.train_dataloader())


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("stream"), n=24, samples_per_shard=8)


def test_list_shards_dir_pattern_and_errors(shards, tmp_path):
    tars = stream.list_shards(str(shards))
    assert [Path(t).name for t in tars] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert stream.list_shards(f"{shards}/demo-{{000000..000002}}.tar") == tars
    assert stream.list_shards(f"{shards},{shards}") == tars
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="empty shard set.*empty"):
        stream.list_shards(str(tmp_path / "empty"))
    (tmp_path / "noindex").mkdir()
    with pytest.raises(ValueError, match="noindex.*index.parquet"):
        stream.list_shards(str(tmp_path / "noindex"))
    with pytest.raises(ValueError, match="7 tar.s. missing, first .*demo-000003.tar"):
        stream.list_shards(f"{shards}/demo-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="empty shard set"):
        stream.list_shards("")


def test_iter_shard_decodes_image_and_json_in_index_order(shards):
    index = stream.read_index(shards)
    tar = stream.list_shards(str(shards))[1]
    samples = list(stream.iter_shard(tar))
    expected = list(index.loc[(index["status"] == "ok") & (index["shard"] == Path(tar).name), "key"])
    assert [s["key"] for s in samples] == expected and len(samples) == 8
    assert all(s["image"].mode == "RGB" and s["meta"]["key"] == s["key"] for s in samples)
    picked = list(stream.iter_shard(tar, keys={expected[2], expected[5]}))
    assert [s["key"] for s in picked] == [expected[2], expected[5]]


class _Boom:
    """Unpickling this creates a marker directory: proof that pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_iter_shard_never_unpickles(tmp_path):
    marker = tmp_path / "pickle_ran"
    payload = pickle.dumps(_Boom(str(marker)))
    jpg = small_jpeg(kvasir_images(1)[0], 32)
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for name, data in (
            ("a.jpg", jpg),
            ("a.pyd", payload),
            ("a.pickle", payload),
            ("a.pth", payload),
            ("b.pyd", payload),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(stream.iter_shard(str(tmp_path / "evil.tar")))
    assert [s["key"] for s in samples] == ["a"]
    assert set(samples[0]) == {"key", "image", "meta"}
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: loading it does create the marker
    assert marker.exists()


def test_index_out_of_step_with_its_shard_fails_clearly(tmp_path, shards):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    index = pd.read_parquet(bad / "index.parquet")
    first = index.index[index["status"] == "ok"][0]
    index.loc[first, "offset"] += 512  # the JSON member or the next sample, not this image
    index.to_parquet(bad / "index.parquet")
    dm = PretrainDataModule(
        DataConfig(shards=str(bad), image_size=32, batch_size=4, num_workers=0), seed=0, rank=0, world_size=1
    )
    with pytest.raises(ValueError, match=f"no image of sample {index.loc[first, 'key']} at byte .*disagree"):
        epoch_batches(dm)
    index.drop(columns=["offset"]).to_parquet(bad / "index.parquet")
    with pytest.raises(ValueError, match="has no offset column .*overwrite=true"):
        PretrainDataModule(DataConfig(shards=str(bad), num_workers=0), seed=0, rank=0, world_size=1).setup()


def test_transforms_shape_and_normalisation():
    image = Image.open(kvasir_images(1)[0]).convert("RGB")
    x = stream.eval_transform(32)(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -3 < float(x.min()) < 0 < float(x.max()) < 3  # ImageNet-normalised, not [0, 1]
    y = stream.train_transform(DataConfig(image_size=24, min_scale=0.5))(image)
    assert y.shape == (3, 24, 24)


@pytest.mark.parametrize(("world", "multiple"), [(1, 1), (2, 1), (3, 1), (4, 3), (7, 1), (2, 4), (3, 2)])
def test_plan_epoch_full_batches_every_sample_at_most_once(world, multiple):
    counts = [10, 3, 0, 7]
    unit = world * multiple
    per_rank = 20 // unit * multiple
    seen: list[tuple[int, int]] = []
    for rank in range(world):
        shard, local = stream.plan_epoch(counts, seed=3, epoch=1, rank=rank, world_size=world, multiple=multiple)
        assert len(shard) == per_rank and per_rank % multiple == 0  # whole batches, same count on every rank
        seen += list(zip(shard.tolist(), local.tolist(), strict=True))
    everything = {(s, i) for s, n in enumerate(counts) for i in range(n)}
    assert len(seen) == len(set(seen)) and set(seen) <= everything  # no repeats, no padding
    assert len(everything) - len(seen) == 20 % unit < unit  # the dropped remainder is under one global batch


def test_plan_epoch_drops_a_different_remainder_each_epoch():
    counts = [22]  # one shard: dropping the tail would drop the same two samples every epoch
    dropped = []
    for epoch in range(6):
        shard, local = stream.plan_epoch(counts, seed=0, epoch=epoch, rank=0, world_size=1, multiple=4)
        assert len(local) == 20 and np.all(np.diff(local) > 0)  # tar order kept: sequential reads
        dropped.append(frozenset(range(22)) - frozenset(local.tolist()))
    assert all(len(d) == 2 for d in dropped) and len(set(dropped)) > 1
    again = stream.plan_epoch(counts, seed=0, epoch=5, rank=0, world_size=1, multiple=4)[1]
    assert frozenset(range(22)) - frozenset(again.tolist()) == dropped[5]  # seeded


def test_plan_epoch_seeded_by_epoch():
    counts = [4] * 12
    a = stream.plan_epoch(counts, seed=0, epoch=0, rank=0, world_size=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, stream.plan_epoch(counts, 0, 0, 0, 1), strict=False))
    assert not np.array_equal(a[0], stream.plan_epoch(counts, 0, 1, 0, 1)[0])
    with pytest.raises(ValueError, match="global batch of 2"):
        stream.plan_epoch([1], 0, 0, 0, 2)
    with pytest.raises(ValueError, match="only 7 samples for a global batch of 8"):
        stream.plan_epoch([3, 4], 0, 0, 0, 2, multiple=4)
    assert stream.full_batches(23, batch_size=4, world_size=2, accumulate=1) == 2
    assert stream.full_batches(23, batch_size=2, world_size=2, accumulate=2) == 4  # a multiple of accumulate
    assert stream.full_batches(7, batch_size=4, world_size=2) == 0


def test_shuffle_order_and_worker_batches():
    order = stream.shuffle_order(50, 8, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert all(order[k] <= k + 8 for k in range(50))  # bounded delay = bounded memory
    assert list(stream.worker_batches(7, 3, 1, 2)) == [4, 6]


def _cfg(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), image_size=16, batch_size=4, num_workers=2, shuffle_buffer=6)
    base.update(kw)
    return DataConfig(**base)


def test_epoch_streams_every_sample_once_and_is_seeded(tmp_path):
    uneven = write_shards(tmp_path / "u", [10, 3, 7])
    dm = PretrainDataModule(_cfg(uneven), seed=1)
    assert (dm.samples_per_rank, dm.batches_per_epoch) == (20, 5)
    e0, e1 = epoch_batches(dm), epoch_batches(dm)
    assert sorted(keys_of(e0)) == sorted(keys_of(e1)) == [f"set_{i:04d}" for i in range(20)]
    assert keys_of(e0) != keys_of(e1)  # a new epoch is a new order
    assert e0[0]["image"].shape == (4, 3, 16, 16)
    again = epoch_batches(PretrainDataModule(_cfg(uneven), seed=1))
    assert keys_of(again) == keys_of(e0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, e0, strict=False))  # augmentation too


def test_batches_do_not_depend_on_worker_count(tmp_path):
    uneven = write_shards(tmp_path / "u", [10, 3, 7])
    runs = [epoch_batches(PretrainDataModule(_cfg(uneven, batch_size=3, num_workers=w), seed=2)) for w in (0, 2, 3)]
    for other in runs[1:]:
        assert [b["key"] for b in other] == [b["key"] for b in runs[0]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(other, runs[0], strict=False))


def test_only_full_batches_and_a_fresh_remainder_each_epoch(tmp_path):
    uneven = write_shards(tmp_path / "u", [10, 3, 9])  # 22 samples, batch 4: 5 full batches, 2 left out
    dm = PretrainDataModule(_cfg(uneven), seed=1)
    assert (dm.subset_size, dm.samples_per_rank, dm.batches_per_epoch, dm.steps_per_epoch) == (22, 20, 5, 5)
    epochs = [epoch_batches(dm) for _ in range(4)]
    assert all(len(b["key"]) == 4 and b["image"].shape[0] == 4 for e in epochs for b in e)
    left_out = [frozenset(f"set_{i:04d}" for i in range(22)) - set(keys_of(e)) for e in epochs]
    assert all(len(keys_of(e)) == len(set(keys_of(e))) == 20 for e in epochs)
    assert all(len(d) == 2 for d in left_out) and len(set(left_out)) > 1
    # with accumulation the epoch is a whole number of optimiser steps
    acc = PretrainDataModule(_cfg(uneven, batch_size=3), seed=1, accumulate=2)
    assert (acc.batches_per_epoch, acc.steps_per_epoch) == (6, 3)
    assert len(epoch_batches(acc)) == 6


def test_subset_smaller_than_a_global_batch_is_a_config_error(tmp_path):
    small = write_shards(tmp_path / "s", [3, 2])
    with pytest.raises(ConfigError, match=r"5 samples .* global batch of 8 = data.batch_size=4 x 2 rank"):
        PretrainDataModule(_cfg(small), seed=0, rank=0, world_size=2).setup()
    with pytest.raises(ConfigError, match="accumulate_grad_batches=2"):
        PretrainDataModule(_cfg(small, batch_size=3), seed=0, accumulate=2).setup()
    assert PretrainDataModule(_cfg(small), seed=0).batches_per_epoch == 1


def test_resume_mid_epoch_skips_exactly_the_consumed_batches(tmp_path):
    uneven = write_shards(tmp_path / "u", [10, 3, 7])
    dm = PretrainDataModule(_cfg(uneven, batch_size=3), seed=5)
    epoch_batches(dm)
    full = epoch_batches(dm)  # epoch 1
    loader = dm.train_dataloader()
    assert loader.state_dict() == {"epoch": 2, "batches_consumed": 0}
    for k in range(len(full)):
        resumed = PretrainDataModule(_cfg(uneven, batch_size=3), seed=5)
        resumed.load_state_dict({"epoch": 1, "batches_consumed": k})
        rest = epoch_batches(resumed)
        assert [b["key"] for b in rest] == [b["key"] for b in full[k:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[k:], strict=False))
    it = iter(loader)
    next(it), next(it)
    assert dm.state_dict() == {"epoch": 2, "batches_consumed": 2}


def test_selection_filters_keys_and_streams_extra_and_generated(tmp_path, shards):
    keys = list(stream.read_index(shards)["key"])
    kept = set(keys[::3])
    sel = write_selection(tmp_path / "sel", keys, kept)
    dm = PretrainDataModule(_cfg(shards, selection=str(sel)), seed=0)
    assert sorted(keys_of(epoch_batches(dm))) == sorted(kept)
    extra = write_shards(tmp_path / "extra", [2, 3], name="extra")
    write_shards(sel / "generated", [3], name="gen", offset=5)
    dm = PretrainDataModule(_cfg(shards, selection=str(sel), extra_shards=[str(extra)]), seed=0)
    got = Counter(keys_of(epoch_batches(dm)))
    expected = kept | {f"extra_{i:04d}" for i in range(5)} | {f"gen_{i:04d}" for i in range(3)}
    assert set(got) == expected and set(got.values()) == {1}
    assert stream.selection_keys(sel) == (kept, [str(sel / "generated")])


def test_selection_of_other_shards_and_empty_selection_fail(tmp_path, shards):
    keys = list(stream.read_index(shards)["key"])
    other = write_selection(tmp_path / "other", keys + ["alien"], set(keys[:2]) | {"alien"})
    with pytest.raises(ValueError, match="alien"):
        PretrainDataModule(_cfg(shards, selection=str(other))).setup()
    none = write_selection(tmp_path / "none", keys, set())
    with pytest.raises(ValueError, match="empty shard set"):
        PretrainDataModule(_cfg(shards, selection=str(none))).setup()


def test_kept_rows_filters_every_shard_with_one_membership_test(monkeypatch):
    import pandas as pd

    from dataeff.data.datamodules import kept_rows

    samples = [pd.DataFrame({"key": [f"s{i}-{j}" for j in range(5)], "offset": range(5)}) for i in range(40)]
    kept = {f"s{i}-{j}" for i in range(0, 40, 3) for j in (1, 4)}
    expected = [s[s["key"].isin(kept)] for s in samples]
    calls = []
    isin = pd.Series.isin
    monkeypatch.setattr(pd.Series, "isin", lambda self, values: calls.append(1) or isin(self, values))
    got = kept_rows(samples, kept)
    # Per-shard tests would cost shards x selection (minutes at a million images in 1,000 shards).
    assert len(calls) == 1
    assert len(got) == 40 and all(a.equals(b) for a, b in zip(got, expected, strict=True))
    assert sum(len(s) for s in got) == len(kept)
    assert kept_rows([], kept) == []
