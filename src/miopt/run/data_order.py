"""The order training sees the data in: the same micro-batches on every run, resumed or not."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


class DataOrder:
    """Deterministic micro-batches: a seeded permutation per epoch, cut into global batches;
    each process takes its share. Micro-batch ``i`` is the same on every run, so a resumed run
    continues at exactly the data it would have seen."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, rank: int, world: int) -> None:
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, num_examples // global_batch) if num_examples >= global_batch else 1

    def global_micro_batch(self, index: int) -> list[int]:
        """Micro-batch ``index`` of every process together."""
        epoch, position = divmod(index, self.per_epoch)
        order = _epoch_order(self.num_examples, self.seed, epoch)
        return order[position * self.global_batch : (position + 1) * self.global_batch]

    def micro_batch(self, index: int) -> list[int]:
        return self.global_micro_batch(index)[self.rank :: self.world]

    def iterate(self, start: int) -> Iterator[list[int]]:
        index = start
        while True:
            yield self.micro_batch(index)
            index += 1
