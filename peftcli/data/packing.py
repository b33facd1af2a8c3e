"""Packing: several tokenized examples per row of max_length tokens, each example kept apart.

The model side (attention confined to each example) is `peftcli.models.packed_attention`.
"""

from __future__ import annotations

import bisect
import heapq
import random
from typing import Any

import torch

from peftcli.config.recipe import Recipe
from peftcli.data.batching import Collator
from peftcli.models.losses import IGNORE


def pack_for_training(recipe: Recipe, train: list[dict]) -> list[dict]:
    """The training examples as the loop consumes them: packed rows with data.packing, else as they are."""
    if recipe.data.packing is not True:  # false, or "batch": packed batch by batch (`PackEachBatch`)
        return train
    return pack(train, recipe.data.max_length, recipe.train.seed)


def pack(examples: list[dict], max_length: int, seed: int) -> list[dict[str, Any]]:
    """Tokenized examples packed into rows of at most `max_length` tokens (best fit, longest first).

    Each row keeps its examples apart: `position_ids` restart at 0 for every example (the model
    builds attention confined to each example from them, see `check_packing`), and the label of
    each example's first token is IGNORE, so the last token of one example is never trained to
    predict the first of the next. The loss of a packed batch is then the token-weighted loss of
    the same examples unpacked.

    Packed once per run from (examples, seed): the rows, and so the number of steps per epoch, are
    the same in a resumed run; the loop shuffles the rows each epoch.
    """
    return _packed_rows(examples, _best_fit([len(e["input_ids"]) for e in examples], max_length, seed))


def _best_fit(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Example indices in rows of at most `max_length` tokens: longest first, each into the row it fills best."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)  # ties between equal lengths broken by the seed, not file order
    order.sort(key=lambda j: -lengths[j])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: best fit = first with enough space
    for j in order:
        n = lengths[j]
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(j)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack_balanced(examples: list[dict], max_length: int) -> list[dict[str, Any]]:
    """One batch's examples in rows of at most `max_length` tokens, as even in length as possible.

    A batch is padded to its longest row, so what costs is rows x longest row, not the row count:
    longest example first into the shortest row (the LPT rule for balancing loads), trying a few
    row counts from the fewest that can hold the batch; best fit (`pack`) competes too. The
    packing with the fewest slots wins. Deterministic: a function of the examples' lengths and order.
    """
    lengths = [len(e["input_ids"]) for e in examples]

    def slots(rows: list[list[int]]) -> int:
        return len(rows) * max((sum(lengths[j] for j in row) for row in rows), default=0)

    best = _best_fit(lengths, max_length, seed=0)  # fewest rows; at times fewest slots too, and it never fails
    order = sorted((j for j in range(len(examples)) if lengths[j] > 0), key=lambda j: -lengths[j])
    fewest = max(1, -(-sum(lengths) // max_length))
    for n in range(fewest, min(fewest + 4, len(order) + 1)):
        loads = [(0, r) for r in range(n)]  # (tokens so far, row): a heap, shortest row first
        rows: list[list[int]] = [[] for _ in range(n)]
        for j in order:
            load, r = heapq.heappop(loads)
            rows[r].append(j)
            heapq.heappush(loads, (load + lengths[j], r))
        if max(load for load, _ in loads) <= max_length and slots(rows) < slots(best):
            best = rows
    return _packed_rows(examples, best)


def _packed_rows(examples: list[dict], rows: list[list[int]]) -> list[dict[str, Any]]:
    """Rows of examples joined: positions restart and the first label of each example is IGNORE."""
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for j in members:
            e = examples[j]
            ids += e["input_ids"]
            labels += [IGNORE, *e["labels"][1:]]
            pos += range(len(e["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos, "examples": len(members)})
    return packed


class PackEachBatch:
    """`data.packing: batch`: the examples of each batch packed into even rows of at most `max_length`.

    The batch is the one unpacked training would read, and a packed batch's loss is the
    token-weighted loss of its examples unpacked (see `pack`), so the optimizer takes the same
    steps on the same examples as with padding: only the padding is gone. (Packing the whole
    training set, `data.packing: true`, also fills rows across batches but changes which
    examples share a step and how many steps an epoch has.)
    """

    def __init__(self, collate: Collator, max_length: int) -> None:
        self.collate = collate
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.collate(pack_balanced(examples, self.max_length))
