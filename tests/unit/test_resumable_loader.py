"""The fine-tuning loader resumes at any batch with the same items and the same augmentations."""

from __future__ import annotations

import torch

from dataeff.data.datamodules import EpochSampler, ResumableLoader, SegmentationDataConfig, SegmentationDataModule
from tests.unit.test_downstream import build


def _batches(loader: ResumableLoader, n: int) -> list[dict]:
    out, it = [], iter(loader)
    while len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:  # the epoch ended: the next iter() starts the following one
            it = iter(loader)
    return out


def _loader(root, out) -> ResumableLoader:
    cfg = SegmentationDataConfig(root=str(root), image_size=32, batch_size=2, num_workers=0, val_fraction=0.2)
    return SegmentationDataModule(cfg, out).train_dataloader()


def test_resumed_loader_repeats_the_uninterrupted_batches(tmp_path):
    root = build(tmp_path / "k", "kvasir")
    loader = _loader(root, tmp_path / "out")
    per_epoch = len(loader)
    reference = _batches(loader, 3 * per_epoch)
    for stop in (1, per_epoch, per_epoch + 1):
        first = _loader(root, tmp_path / "out")
        _batches(first, stop)
        resumed = _loader(root, tmp_path / "out")
        resumed.load_state_dict(first.state_dict())
        for want, got in zip(reference[stop:], _batches(resumed, 3 * per_epoch - stop), strict=True):
            assert want["key"] == got["key"]
            torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)  # the same random crops
            assert torch.equal(got["mask"], want["mask"])
    # Epochs differ in order; global random state plays no part.
    assert [b["key"] for b in reference[:per_epoch]] != [b["key"] for b in reference[per_epoch : 2 * per_epoch]]


def test_ranks_share_an_epoch_without_overlap():
    shares = [list(EpochSampler(7, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4  # padded by wrapping, as DistributedSampler does
    assert {i for share in shares for i, _ in share} == set(range(7))
    assert [i for i, _ in EpochSampler(5, seed=1, shuffle=False)] == list(range(5))  # validation: in order
