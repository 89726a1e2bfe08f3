"""Which examples make each optimizer step, and that step's collated micro-batches: made in the
training process, or ahead of time by `data_workers` worker processes (a torch `DataLoader` over
step numbers, so the batches are the same either way and resuming needs only the step).

Data order: epoch e uses `randperm(N, seed * 1_000_003 + e)`; step s takes batch `s % (N // B)` of
epoch `s // (N // B)` (the remainder is dropped); rank r takes every `world`-th example of it, cut
into micro-batches of `micro_batch`.

An example that cannot be used (`collate.ExampleError`: an unreadable image, a row over max_len) stops
the run naming its file and line, or with `skip_bad` (strict_data=false) is dropped from its
micro-batch and reported with the step. A worker that fails hands its message back and the training
process raises it as a `ValueError` naming the step: no worker traceback dump.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .collate import ExampleError
from .data import Example

Batch = dict[str, torch.Tensor]
StepData = tuple[list["Batch"], list[str]]  # a step's micro-batches and the examples skipped from them


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` over a training set of `n` examples."""
    spe = n // batch_size
    epoch, k = divmod(step, spe)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


@dataclass(frozen=True)
class StepPlan:
    """This rank's share of every step: `examples(step)` -> its micro-batches of examples."""

    train_set: Sequence[Example]
    batch_size: int
    micro_batch: int
    seed: int
    rank: int = 0
    world: int = 1

    def examples(self, step: int) -> list[list[Example]]:
        idx = batch_indices(step, len(self.train_set), self.batch_size, self.seed)
        local = idx[self.rank::self.world]
        m = self.micro_batch
        return [[self.train_set[i] for i in local[j:j + m]] for j in range(0, len(local), m)]


@dataclass(frozen=True)
class _Failed:
    message: str


def collate_step(plan: StepPlan, collate: Callable[[Sequence[Example]], Batch], step: int,
                 skip_bad: bool = False) -> StepData:
    """Step `step`'s collated micro-batches; with `skip_bad` an `ExampleError` drops that example (its
    message is returned) and the rest of its micro-batch is collated again."""
    out, skipped = [], []
    for exs in plan.examples(step):
        exs = list(exs)
        while exs:
            try:
                out.append(collate(exs))
                break
            except ExampleError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                exs = [x for x in exs if x is not e.example]
    if not out:
        raise ValueError(f"every example of step {step + 1} was skipped: {'; '.join(skipped[:3])}")
    return out, skipped


class _StepBatches(torch.utils.data.Dataset):
    """Item k: step `start + k`'s `StepData` (or a `_Failed` with the error)."""

    def __init__(self, plan: StepPlan, collate: Callable[[Sequence[Example]], Batch], start: int, stop: int,
                 skip_bad: bool = False):
        self.plan, self.collate, self.start, self.stop, self.skip_bad = plan, collate, start, stop, skip_bad

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, k: int):
        try:
            return collate_step(self.plan, self.collate, self.start + k, self.skip_bad)
        except Exception as e:  # noqa: BLE001 - carried to the training process as a message
            return _Failed(f"step {self.start + k + 1}: {e}")


def step_batches(plan: StepPlan, collate: Callable[[Sequence[Example]], Batch], start: int, stop: int,
                 workers: int = 0, prefetch: int = 2, skip_bad: bool = False) -> Iterator[StepData]:
    """The micro-batches (and skipped examples) of steps start .. stop-1, in order. `workers` > 0: made
    by that many processes, each `prefetch` steps ahead (each worker runs torch on one thread, and keeps
    its own `cache_images` cache)."""
    steps = _StepBatches(plan, collate, start, stop, skip_bad)
    if workers <= 0:
        source = (steps[k] for k in range(len(steps)))
    else:
        source = iter(torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                                  prefetch_factor=prefetch, persistent_workers=False))
    for item in source:
        if isinstance(item, _Failed):
            raise ValueError(item.message)
        yield item
