"""The resumable, rank-sharded training batch sampler, its DataLoader, and DataLoader worker errors.

`ResumableBatchSampler` yields, for one process, endless batches of `(index, position)` pairs:

* global sample position p = 0, 1, 2, ... lies in epoch p // size, at offset p % size of that
  epoch's permutation of the dataset, seeded with (seed, epoch);
* process `rank` of `world_size` takes positions rank, rank + world_size, rank + 2 * world_size, ...;
* its batch for iteration i holds its samples i * batch_size ... (i + 1) * batch_size - 1, so
  `start_iter` resumes exactly where an interrupted run stopped, on every rank.

A dataset seeds its augmentation with the position (`np.random.default_rng([seed, position])`),
never with worker or global RNG state, so a resumed run sees the very samples of an uninterrupted one.
A dataset smaller than a batch simply repeats within the batch.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import UserError


class ResumableBatchSampler(Sampler):
    """Endless `(index, position)` batches for one rank; see the module docstring."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, shuffle: bool = True):
        if size <= 0:
            raise UserError("the training set is empty")
        if batch_size <= 0:
            raise UserError(f"the batch size per process must be positive, not {batch_size}")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        sample = self.start_iter * self.batch_size  # this rank's samples consumed so far
        epoch, order = -1, np.arange(0)
        while True:
            batch = []
            for _ in range(self.batch_size):
                position = self.rank + sample * self.world_size
                if position // self.size != epoch:
                    epoch = position // self.size
                    order = self.epoch_order(epoch)
                batch.append((int(order[position % self.size]), position))
                sample += 1
            yield batch


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start_iter: int,
                     num_workers: int, collate_fn: Callable | None = None, pin_memory: bool = False) -> DataLoader:
    """An endless training DataLoader over `ResumableBatchSampler` (workers kept alive between batches)."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_iter)
    # A private generator keeps the loader from drawing on the global RNG, which checkpoints restore.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


def worker_batches(loader: Iterable) -> Iterator:
    """Iterate a DataLoader; a UserError raised in a worker comes back as its own one-line message.

    (The DataLoader re-raises it with the worker's whole traceback folded into the message.)
    """
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as exc:
            message = str(exc)
        else:
            yield batch
            continue
        if "Original Traceback" in message:
            lines = [ln for ln in message.splitlines() if "UserError: " in ln]
            message = lines[-1].split("UserError: ", 1)[1] if lines else message.splitlines()[0]
        del iterator  # raised outside the except block: no traceback keeps the loader's workers alive
        raise UserError(message)
