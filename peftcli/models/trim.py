"""The last-layer trim: run a classifier's last layer only at the position its head reads.

A speed lever the training loop pulls once, for classification with a BERT-family head; it
changes no logit and no gradient (see `trim_unread_positions`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Families whose sequence-classification head reads one position of the last layer's output
# (BERT's pooler, RoBERTa's and ELECTRA's heads all take position 0).
_HEAD_READS_POSITION = {"bert": 0}


class _KeepPosition:
    """Forward pre-hook: slice the listed positional arguments to sequence position `pos`."""

    def __init__(self, args: tuple[int, ...], pos: int) -> None:
        self.args, self.pos = args, pos

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        out = list(args)
        for i in self.args:
            if i < len(out) and isinstance(out[i], torch.Tensor) and out[i].dim() >= 3:
                out[i] = out[i][:, self.pos : self.pos + 1]
        return tuple(out)


class _QueryAtPosition:
    """Pre- and forward hook on the last layer's query projection: project one position only.

    The attention still sees a full-length query (the one row repeated, so the modeling
    code's reshapes hold), but the rows other than `pos` only feed outputs that
    `_KeepPosition` drops; their gradient is exactly zero, so dL/dq at `pos` is unchanged.
    """

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.length: int | None = None

    def pre(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            self.length = None
            return None
        self.length = x.shape[1]
        return (x[:, self.pos : self.pos + 1], *args[1:])

    def post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.length is None or not isinstance(output, torch.Tensor):
            return None
        n, self.length = self.length, None
        # A real copy, not the stride-0 view: attention code that scales q in place must not
        # write to one element through many positions.
        return output.expand(output.shape[0], n, *output.shape[2:]).contiguous()


def trim_unread_positions(model: nn.Module, arch: Any, positionwise: bool, task: str) -> list:
    """Run the last layer only where the classification head reads it.

    A BERT-family classifier reads position 0 of the last layer. Everything in that layer after
    the attention (output projection, norm, FFN: five sixths of the layer's FLOPs, forward and
    backward) is position by position, so the other positions feed nothing; the same holds for
    the query projection, since other positions' queries only make attention rows nobody reads
    (keys and values still need every position). The head's logits are unchanged (same values
    up to float reordering), and so is every gradient; only dropout draws fewer random numbers.
    Returns the hook handles (remove them to undo); an empty list where the model, task or
    method is not one this is known to be exact for (`positionwise`: the method's spec says so,
    each checked against the untrimmed model in tests/methods/test_lora_kernel.py).
    """
    pos = _HEAD_READS_POSITION.get(arch.spec.family)
    if (
        task != "classification"
        or pos is None
        or not positionwise
        or not type(model).__name__.endswith("ForSequenceClassification")
        or arch.spec.attn_out_block is None
    ):
        return []
    block = arch.get(arch.num_layers - 1, "attn_out_block")
    if block is None:
        return []
    # The block computes LN(dropout(dense(attention output)) + residual): slice both inputs.
    # prepend: run before any other hook on it, so that every hook sees one sequence length.
    handles = [block.register_forward_pre_hook(_KeepPosition((0, 1), pos), prepend=True)]
    q = arch.get(arch.num_layers - 1, "q")
    if q is not None:
        hook = _QueryAtPosition(pos)
        handles.append(q.register_forward_pre_hook(hook.pre, prepend=True))
        handles.append(q.register_forward_hook(hook.post, prepend=True))
    return handles
