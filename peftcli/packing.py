"""Is packing exact on this model? Checked on the model itself before training starts.

Packed rows rely on the model turning restarting `position_ids` into attention confined to each
example (transformers' packed-sequence detection in its mask builder, or flash attention's varlen
path). An architecture that ignores position ids, a method that prepends virtual tokens or a
prefix cache (prompt and prefix tuning), or a custom attention would silently let examples see
each other. Three forwards of a dozen tokens tell: a packed pair must give the logits of the two
examples run apart.
"""

from __future__ import annotations

import torch
from torch import nn

from .core.precision import forward_inputs
from .data import DataError


@torch.no_grad()
def check_packing(model: nn.Module, device: torch.device, what: str) -> float:
    """Raise DataError (naming `what`, the model type and method) if packed examples are not kept
    apart; returns the largest logit difference seen."""
    was_training = model.training
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, vocab, (1, 7), generator=g), torch.randint(1, vocab, (1, 5), generator=g)
    packed = {"input_ids": torch.cat([a, b], 1), "position_ids": torch.cat([torch.arange(7), torch.arange(5)])[None]}
    fix = "set data.packing: false (train.group_by_length is the alternative)"
    try:
        def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = {k: v.to(device) for k, v in batch.items()}
            return model(**forward_inputs(batch, "causal_lm")).logits.float()

        got = logits(packed)
        apart = torch.cat([logits({"input_ids": x, "attention_mask": torch.ones_like(x)}) for x in (a, b)], 1)
    except Exception as e:  # noqa: BLE001  (a model that cannot take position_ids without a mask)
        raise DataError(f"data.packing: {what} cannot run packed rows ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150] if str(e) else ''}); {fix}") from None
    finally:
        model.train(was_training)
    if got.shape != apart.shape:
        raise DataError(f"data.packing: {what} adds positions of its own to each row (virtual tokens); {fix}")
    diff = float((got - apart).abs().max())
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tol = (3e-2 if half else 1e-4) * max(1.0, float(apart.abs().max()))
    if not diff <= tol:
        raise DataError(f"data.packing: {what} does not keep packed examples apart (a packed pair's logits differ "
                        f"by {diff:.2e} from the examples run apart); {fix}")
    return diff
