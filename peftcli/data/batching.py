"""Batches: the epoch's example order (shuffled, grouped by length, split across ranks) and padding."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from peftcli.config.recipe import TrainConfig
from peftcli.models.losses import IGNORE


class Collator:
    """Pads each batch to its own longest example (dynamic padding).

    Packed rows (with `position_ids`) are padded the same way; padding positions count up from 0
    as one more example of their own, so no real token attends to them, and carry no labels.
    """

    def __init__(self, pad_id: int, task: str, pad_to_multiple: int = 1, padding_side: str = "right") -> None:
        self.pad_id = pad_id
        self.task = task
        self.multiple = pad_to_multiple
        self.left = padding_side == "left"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        if self.multiple > 1:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        labels = (
            torch.tensor([e["labels"] for e in examples], dtype=torch.long)
            if self.task == "classification"
            else torch.full((len(examples), n), IGNORE, dtype=torch.long)
        )
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            sl = slice(n - k, n) if self.left else slice(0, k)
            ids[i, sl] = torch.tensor(e["input_ids"])
            mask[i, sl] = 1
            if self.task != "classification":
                labels[i, sl] = torch.tensor(e["labels"])
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "position_ids" in examples[0]:
            pos = torch.zeros((len(examples), n), dtype=torch.long)
            for i, e in enumerate(examples):
                k = len(e["position_ids"])
                pos[i, :k] = torch.tensor(e["position_ids"])
                pos[i, k:] = torch.arange(n - k)
            out["position_ids"] = pos
        return out


def length_group_size(train: TrainConfig, world: int) -> int:
    """Examples per length group with train.group_by_length (0 without): one global batch, a size --resume keeps."""
    return train.batch_size * train.grad_accum * world if train.group_by_length else 0


def group_by_length(order: list[int], lengths: list[int], group: int, rng: random.Random) -> list[int]:
    """The shuffled `order` rearranged so that each run of `group` examples has similar lengths.

    As HF's length-grouped sampler: within mega-chunks of 50 groups, sort by length (longest
    first), cut into groups, then shuffle the groups. Batch order stays random and seeded; the
    last, shorter group stays last, so that a multi-rank run drops it rather than a full one.
    """
    groups: list[list[int]] = []
    mega = group * 50
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        groups += [chunk[k : k + group] for k in range(0, len(chunk), group)]
    tail = [groups.pop()] if groups and len(groups[-1]) < group else []
    rng.shuffle(groups)
    return [j for g in groups + tail for j in g]


def batches(
    examples: list[dict], batch_size: int, collate: Collator, *, shuffle: bool, seed: int = 0, epoch: int = 0,
    rank: int = 0, world: int = 1, start: int = 0, length_group: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Plain batching; with world > 1 each rank takes every world-th example of the same order.

    `start` skips that many batches without collating them (a resumed run's place in its epoch).
    `length_group` > 0 orders the epoch in groups of that many examples of similar length
    (`group_by_length`); the order is still a function of (seed, epoch) alone, so a resumed run
    sees the same batches.
    """
    order = list(range(len(examples)))
    if shuffle:
        rng = random.Random(seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if length_group:
            order = group_by_length(order, [len(e["input_ids"]) for e in examples], length_group, rng)
    if world > 1:
        usable = len(order) - len(order) % (batch_size * world)
        order = order[:usable][rank::world]
    for i in range(start * batch_size, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield collate([examples[j] for j in idx])


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    if world > 1:
        return (n - n % (batch_size * world)) // (batch_size * world)
    return -(-n // batch_size)
