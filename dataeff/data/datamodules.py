"""Lightning data modules: streamed pre-training shards and downstream segmentation pairs.

``PretrainDataModule`` design (DESIGN.md "Distribution"): the index of every shard set
gives each shard's kept-sample count, so every rank computes the same epoch plan
without talking to the others (``stream.plan_epoch``): a ``(seed, epoch)``-seeded
permutation of shards, samples in tar order, a seeded remainder of fewer than one global
batch (micro-batch x ranks x accumulation) dropped, rank ``r`` the contiguous slice
``[r*M/W, (r+1)*M/W)`` of the ``M`` kept. Every rank therefore yields exactly
``batches_per_epoch`` full batches (no uneven-shard DDP hang, and images seen = steps x
global batch, exactly) and every sample appears at most once per epoch (a different
remainder is left out each epoch). Dataloader workers split the rank's slice in
whole batches, and a shuffle buffer mixes samples within a worker. The loader is
stateful (``state_dict``/``load_state_dict``, which Lightning saves in checkpoints),
so a resumed run skips exactly the batches it already consumed, without decoding them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
from torch.utils.data import DataLoader, DistributedSampler

from dataeff import dist
from dataeff.config import ConfigError, DataConfig, option
from dataeff.constants import SPLIT_NAME
from dataeff.data import downstream
from dataeff.data.label_subset import draw_labelled
from dataeff.data.stream import (
    StreamDataset,
    full_batches,
    list_shards,
    selection_keys,
    shard_samples,
    train_transform,
)

log = logging.getLogger("dataeff")
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _process_place(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    An attached Trainer knows it best (its strategy made the group, whichever launcher
    started the process); without one, a joined process group, else the launcher's
    environment (torchrun / SLURM variables, read by ``dataeff.dist``), else rank 0 of 1.
    """
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if dist.is_initialized():
        return dist.rank(), dist.world_size()
    env = dist.env_from(os.environ)
    return env.rank, env.world_size


def kept_rows(samples: list[pd.DataFrame], kept: set[str]) -> list[pd.DataFrame]:
    """Each shard's sample rows whose key is in ``kept``, by one membership test over all shards.

    A test per shard would turn ``kept`` into an array again for every shard: shards x
    selection work, minutes for a 5% selection of a million-image pool in 1,000 shards.
    """
    if not samples:
        return samples
    mask = pd.concat([s["key"] for s in samples], ignore_index=True).isin(kept).to_numpy()
    bounds = np.cumsum([0] + [len(s) for s in samples])
    return [s[mask[a:b]] for s, a, b in zip(samples, bounds[:-1], bounds[1:], strict=True)]


class StreamLoader(DataLoader):
    """A DataLoader over a ``StreamDataset`` that remembers its position (epoch, batches).

    Each ``iter()`` starts where the previous one stopped; after a full epoch the next
    ``iter()`` starts the following epoch. ``state_dict`` / ``load_state_dict`` make it a
    resumable loader for Lightning.
    """

    def __init__(self, dataset: StreamDataset, num_workers: int, pin_memory: bool = False) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,  # workers must receive the new position every epoch
            # Workers start anew every epoch, so they must be cheap to start: fork, even in a
            # process started by 'spawn' (which would otherwise re-import torch per worker).
            multiprocessing_context=_FORK if num_workers > 0 else None,
        )
        self._position = (0, 0)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_consumed"}``; a finished epoch reads as the start of the next."""
        epoch, consumed = self._position
        if consumed >= len(self.dataset):  # type: ignore[arg-type]
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "batches_consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_position(int(state["epoch"]), int(state["batches_consumed"]))

    def set_position(self, epoch: int, batches_consumed: int = 0) -> None:
        """Make the next ``iter()`` start at batch ``batches_consumed`` of ``epoch``."""
        self.dataset.set_position(epoch, batches_consumed)  # type: ignore[attr-defined]  # validates
        self._position = (epoch, batches_consumed)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        state = self.state_dict()
        self.set_position(state["epoch"], state["batches_consumed"])
        epoch, consumed = self._position
        for batch in super().__iter__():
            consumed += 1
            self._position = (epoch, consumed)
            yield batch


class PretrainDataModule(pl.LightningDataModule):
    """Streams the kept samples of ``cfg.shards`` (+ extra/generated shard sets) for pre-training.

    Batches: ``{"image": FloatTensor (B, 3, S, S) ImageNet-normalised, "key": list[str]}``.

    The rank and world size are settled in :meth:`setup`, not in the constructor: in a
    user's own script the module is built before ``pl.Trainer(strategy="ddp")`` (or
    torchrun) has made the process group, and a place read then would give every rank the
    same slice. ``setup`` takes them from the attached Trainer, else from ``dataeff.dist``
    (a joined group, else the launcher's environment). Reading ``batches_per_epoch`` before
    the Trainer is attached plans with that fallback place; ``setup`` re-plans when the
    Trainer's differs.

    Args:
        cfg: the ``data`` section (shards, selection, extra_shards, transforms, loader).
        seed: seeds the epoch plans, the shuffle buffers and the augmentations.
        rank, world_size: this process's place, fixed; None = resolved as above.
        accumulate: the trainer's gradient accumulation; batches per epoch are a multiple of it.

    Raises:
        ConfigError: (at ``setup``) the samples cannot fill one global batch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        accumulate: int = 1,
    ) -> None:
        super().__init__()
        self.cfg, self.seed, self.accumulate = cfg, seed, accumulate
        self._fixed_place = (rank, world_size)
        self.rank, self.world_size = self._place()
        self._dataset: StreamDataset | None = None
        self._loader: StreamLoader | None = None
        self._pending: dict[str, int] | None = None

    def _place(self) -> tuple[int, int]:
        """``(rank, world_size)``: the constructor's, else the attached Trainer's, else ``dataeff.dist``'s."""
        rank, world = _process_place(self.trainer)
        fixed_rank, fixed_world = self._fixed_place
        return (rank if fixed_rank is None else fixed_rank), (world if fixed_world is None else fixed_world)

    def setup(self, stage: str | None = None) -> None:
        place = self._place()
        if self._dataset is not None:
            if place == (self.rank, self.world_size):
                return
            # Planned for another place (read before the Trainer was attached): plan again,
            # keeping the loader's position.
            if self._loader is not None:
                self._pending, self._loader = self._loader.state_dict(), None
            self._dataset = None
        self.rank, self.world_size = place
        cfg = self.cfg
        if not cfg.shards:
            raise ConfigError("data.shards is empty: give a shard directory written by 'dataeff shard'")
        tars = list_shards(cfg.shards)
        samples = shard_samples(tars)
        extra = list(cfg.extra_shards)
        if cfg.selection:
            kept, generated = selection_keys(cfg.selection)
            extra += generated
            samples = kept_rows(samples, kept)
        extra_tars = [t for spec in extra for t in list_shards(spec)]
        tars, samples = tars + extra_tars, samples + shard_samples(extra_tars)
        if cfg.selection:
            missing = kept - {k for s in samples for k in s["key"]}
            if missing:
                raise ValueError(
                    f"selection {cfg.selection} keeps {len(missing)} key(s) found in no shard of "
                    f"data.shards={cfg.shards} (e.g. {sorted(missing)[0]}): was it made from these shards?"
                )
        pairs = [(t, s) for t, s in zip(tars, samples, strict=True) if len(s)]
        if not pairs:
            raise ValueError(f"empty shard set: no kept samples in {cfg.shards} (selection={cfg.selection!r})")
        total = sum(len(s) for _, s in pairs)
        if full_batches(total, cfg.batch_size, self.world_size, self.accumulate) == 0:
            # Refused rather than padded with repeats: a repeated sample would be counted as
            # another image seen, and epochs_seen would no longer mean passes over the subset.
            unit = cfg.batch_size * self.world_size * self.accumulate
            raise ConfigError(
                f"{total} samples to stream (data.shards={cfg.shards}, data.selection={cfg.selection!r}) cannot fill "
                f"one global batch of {unit} = data.batch_size={cfg.batch_size} x {self.world_size} rank(s) x "
                f"trainer.accumulate_grad_batches={self.accumulate}: lower data.batch_size or select more samples"
            )
        self._dataset = StreamDataset(
            [t for t, _ in pairs],
            [list(s["key"]) for _, s in pairs],
            [s[["offset", "length"]].to_numpy(dtype=np.int64) for _, s in pairs],
            train_transform(cfg),
            batch_size=cfg.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=cfg.num_workers,
            shuffle_buffer=cfg.shuffle_buffer,
            accumulate=self.accumulate,
        )
        log.info(
            "pretrain stream: %d shards, %d samples, %d per rank, %d full batches per epoch (rank %d/%d)",
            len(pairs),
            total,
            self.samples_per_rank,
            self.batches_per_epoch,
            self.rank,
            self.world_size,
        )

    @property
    def subset_size(self) -> int:
        """Samples the stream draws from (kept pool samples + extra and generated ones)."""
        self.setup()
        return self._dataset.total  # type: ignore[union-attr]

    @property
    def samples_per_rank(self) -> int:
        """Samples every rank streams per epoch (``batches_per_epoch * batch_size``, no repeats)."""
        self.setup()
        return self._dataset.samples_per_rank  # type: ignore[union-attr]

    @property
    def batches_per_epoch(self) -> int:
        """Full batches every rank yields per epoch (identical on all ranks, a multiple of ``accumulate``)."""
        self.setup()
        return len(self._dataset)  # type: ignore[arg-type]

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch: ``batches_per_epoch / accumulate``."""
        return self.batches_per_epoch // self.accumulate

    def train_dataloader(self) -> StreamLoader:
        self.setup()
        if self._loader is None:
            self._loader = StreamLoader(self._dataset, self.cfg.num_workers)  # type: ignore[arg-type]
            if self._pending is not None:
                self._loader.load_state_dict(self._pending)
        return self._loader

    def state_dict(self) -> dict[str, int]:
        if self._loader is not None:
            return self._loader.state_dict()
        return dict(self._pending or {"epoch": 0, "batches_consumed": 0})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = {"epoch": int(state["epoch"]), "batches_consumed": int(state["batches_consumed"])}
        if self._loader is not None:
            self._loader.load_state_dict(self._pending)


class EpochSampler(DistributedSampler):
    """One rank's share of a ``(seed, epoch)``-seeded order of ``n`` items, each with its augmentation seed.

    Yields ``(index, seed)``: the order and every item's random augmentation depend only on
    ``(seed, epoch, position)``, never on what ran before, so a run resumed at any batch
    sees exactly the items and crops of an uninterrupted one. As with
    ``DistributedSampler``, the order is padded by wrapping to a multiple of the world
    size (every rank gets as many items), and rank ``r`` takes every ``world_size``-th item
    from ``r``. Without ``shuffle`` the order is ``0..n-1`` (validation). A
    ``DistributedSampler`` subclass, so Lightning keeps it instead of wrapping it in its own.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.n, self.world_size, self.start = n, world_size, 0

    def set_position(self, epoch: int, start: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` from its ``start``-th item on."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        )
        padded = np.resize(order, self.total_size)
        share = padded[self.rank :: self.world_size]
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(share))
        for position in range(self.start, len(share)):
            yield int(share[position]), int(seeds[position])


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` that remembers its position, like :class:`StreamLoader`.

    Each ``iter()`` continues where the previous one stopped and the next epoch starts a new
    order; ``state_dict`` / ``load_state_dict`` (``{"epoch", "batches_consumed"}``) let
    Lightning put a resumed run back at the same batch.
    """

    def __init__(self, dataset: Any, sampler: EpochSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **kwargs)
        self.epoch_sampler, self.batch_items = sampler, batch_size
        self._position = (0, 0)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_consumed"}``; a finished epoch reads as the start of the next."""
        epoch, consumed = self._position
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "batches_consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._position = (int(state["epoch"]), int(state["batches_consumed"]))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        state = self.state_dict()
        epoch, consumed = state["epoch"], state["batches_consumed"]
        self.epoch_sampler.set_position(epoch, consumed * self.batch_items)
        self._position = (epoch, consumed)
        for batch in super().__iter__():
            consumed += 1
            self._position = (epoch, consumed)
            yield batch


@dataclass
class SegmentationDataConfig:
    """A downstream segmentation dataset (image + mask folders) and how it is loaded."""

    root: str = option("", help="dataset folder (Kvasir-SEG, CVC-ClinicDB or generic layout)")
    layout: str = option("auto", help="'auto', 'kvasir' (images/+masks/), 'cvc' (Original/+Ground Truth/), 'generic'")
    image_size: int = option(224, help="side of the square model input, px")
    batch_size: int = option(8, help="pairs per rank per step")
    num_workers: int = option(2, help="dataloader worker processes per rank")
    val_fraction: float = option(0.1, help="share of pairs for validation when no split.json exists")
    test_fraction: float = option(0.2, help="share of pairs for test when no split.json exists")
    seed: int = option(0, help="seed of the split (when made here) and of the augmentation")
    groups: str = option(
        "",
        help="images that must stay in one split part (video, patient): 'regex:<pattern>' whose first capture "
        "group, searched in the image stem, is the group; a CSV with columns file (name or stem), group; or a "
        "shard directory whose index maps each image stem (a sample key) to its group (the video)",
    )
    num_classes: int = option(2, help="2 = binary masks thresholded at 128; more = index masks of class ids")
    augment: bool = option(True, help="random resized crop + flips on training pairs")
    hflip: bool = option(True, help="random horizontal flip (train)")
    vflip: bool = option(True, help="random vertical flip (train; endoscopy has no up/down)")
    min_scale: float = option(0.5, help="random resized crop lower scale bound (train)")
    n_train: int = option(
        0,
        help="labelled training pairs: a seeded draw of this many from the train split (0 = all); "
        "the fine-tuning seed picks the draw (val and test splits are unchanged)",
    )

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *downstream.LAYOUTS):
            raise ConfigError(f"data.layout={self.layout!r}: choose 'auto', 'kvasir', 'cvc' or 'generic'")
        if self.num_classes < 2:
            raise ConfigError(f"data.num_classes={self.num_classes}: must be at least 2 (background + one class)")
        if not (
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
        if self.image_size < 8 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("data.image_size >= 8, data.batch_size >= 1 and data.num_workers >= 0 are required")
        if not 0.0 < self.min_scale <= 1.0:
            raise ConfigError(f"data.min_scale={self.min_scale}: must be in (0, 1]")
        if self.n_train < 0:
            raise ConfigError(f"data.n_train={self.n_train}: must be >= 0 (0 = every training pair)")


class SegmentationDataModule(pl.LightningDataModule):
    """Train/val/test loaders of image/mask pairs.

    The split is ``<root>/split.json`` when present, else ``<out_dir>/split.json`` from a
    previous run, else a new seeded split saved there (so reruns reuse it). With
    ``cfg.groups`` a new split keeps every group whole, and a split read from disk that
    puts one group in two parts is an error. With ``cfg.n_train`` the train part is a
    ``label_seed``-seeded draw of that many pairs (:mod:`dataeff.data.label_subset`).

    Batches: ``{"image": (B, 3, S, S), "mask": LongTensor (B, S, S), "key": list[str]}``.
    """

    def __init__(self, cfg: SegmentationDataConfig, out_dir: str | os.PathLike, label_seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.out_dir, self.label_seed = cfg, Path(out_dir), label_seed
        self.split: dict[str, Any] | None = None
        self.split_path: Path | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        cfg = self.cfg
        if not cfg.root:
            raise ConfigError("data.root is empty: give the segmentation dataset folder")
        pairs = downstream.find_pairs(cfg.root, cfg.layout)
        stems = [s for s, _, _ in pairs]
        try:
            group_of = downstream.read_groups(cfg.groups, pairs) if cfg.groups else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for path in (Path(cfg.root) / SPLIT_NAME, self.out_dir / SPLIT_NAME):
            if path.is_file():
                self.split, self.split_path = downstream.read_split(path, stems), path
                break
        else:
            self.split_path = self.out_dir / SPLIT_NAME
            if group_of is None:
                self.split = downstream.split_pairs(stems, cfg.val_fraction, cfg.test_fraction, cfg.seed)
            else:
                self.split = downstream.split_groups(
                    group_of, cfg.val_fraction, cfg.test_fraction, cfg.seed, spec=cfg.groups
                )
            # One writer: the Trainer's rank 0 when attached; before that (a user's script
            # calling setup() ahead of fit under torchrun) the launcher's rank 0, not every rank.
            if _process_place(self.trainer)[0] == 0:
                downstream.write_split(self.split, self.split_path)
        if group_of is not None:
            # Also a split found on disk: a given split that mixes a video's frames would leak.
            downstream.check_groups(self.split, group_of, str(self.split_path))
        by_stem = {s: (s, i, m) for s, i, m in pairs}
        self.pairs = {part: [by_stem[s] for s in self.split[part]] for part in ("train", "val", "test")}
        self.pairs["train"] = draw_labelled(self.pairs["train"], cfg.n_train, self.label_seed)
        log.info(
            "segmentation %s: %s (split %s)", cfg.root, {k: len(v) for k, v in self.pairs.items()}, self.split_path
        )

    def _dataset(self, part: str) -> downstream.SegmentationDataset:
        self.setup()
        cfg = self.cfg
        train = part == "train"
        transform = downstream.JointTransform(
            cfg.image_size, train and cfg.augment, cfg.hflip, cfg.vflip, cfg.min_scale
        )
        dataset = downstream.SegmentationDataset(self.pairs[part], transform, cfg.num_classes)
        if len(dataset) == 0:
            raise ValueError(f"segmentation {cfg.root}: the {part} split is empty ({self.split_path})")
        return dataset

    def _resumable(self, part: str) -> ResumableLoader:
        dataset, cfg = self._dataset(part), self.cfg
        rank, world = _process_place(self.trainer)
        sampler = EpochSampler(len(dataset), cfg.seed, rank, world, shuffle=part == "train")
        workers = cfg.num_workers
        return ResumableLoader(dataset, sampler, cfg.batch_size, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        return self._resumable("train")

    def val_dataloader(self) -> ResumableLoader:
        return self._resumable("val")

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)
