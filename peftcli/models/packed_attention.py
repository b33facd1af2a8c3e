"""Is packing exact on this model? Checked on the model itself before training starts.

Packed rows rely on the model turning restarting `position_ids` into attention confined to each
example (transformers' packed-sequence detection in its mask builder, or flash attention's varlen
path). An architecture that ignores position ids, a method that prepends virtual tokens or a
prefix cache (prompt and prefix tuning), or a custom attention would silently let examples see
each other. Three forwards of a dozen tokens tell: a packed pair must give the logits of the two
examples run apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from peftcli.core.errors import DataError
from peftcli.core.precision import forward_inputs

# --------------------------------------------------------------- per-example attention on CPU
#
# Without a varlen kernel, a packed row attends through a block-diagonal mask over the whole row:
# every query scores every key of the row and the mask throws most of it away, and a masked
# kernel cannot skip blocks as a causal one does. Per example, causal, the same attention costs
# (example length / row length) as much. This is that path: registered with transformers'
# attention interface (no modeling code is touched), used only inside `packed_rows()` and only
# where the model hands the attention function its `position_ids` (Llama-like models do; others
# keep the mask, which is exact too). `check_packing` verifies it on the model before training.

PACKED_ATTENTION = "peftcli_packed_sdpa"
_IN_PACKED_ROWS: ContextVar[bool] = ContextVar("peftcli_packed_rows", default=False)


@contextmanager
def packed_rows(active: bool = True) -> Iterator[None]:
    """Forwards inside this block run packed rows: attention is split at each restart of position_ids."""
    token = _IN_PACKED_ROWS.set(active)
    try:
        yield
    finally:
        _IN_PACKED_ROWS.reset(token)


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    if not _IN_PACKED_ROWS.get() or pos is None or query.shape[2] != key.shape[2] or pos.shape[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = key.shape[1] != query.shape[1]
    length = query.shape[2]
    rows = []
    for b in range(query.shape[0]):
        starts = [*(pos[b if pos.shape[0] > 1 else 0] == 0).nonzero().flatten().tolist(), length]
        if starts[0] != 0:
            starts.insert(0, 0)
        pieces = [
            torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], is_causal=True,
                dropout_p=dropout, scale=scaling, enable_gqa=gqa,
            )
            for s, e in zip(starts[:-1], starts[1:], strict=True) if e > s
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # unpacked batches keep sdpa's masks


def use_packed_attention(model: nn.Module, device: torch.device, what: str) -> bool:
    """Switch an sdpa model on CPU to per-example attention for packed rows, if it is exact there;
    returns whether it did. Elsewhere (CUDA: masked kernels or flash attention's varlen) nothing changes."""
    if device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        check_packing(model, device, what)
    except DataError:
        model.set_attn_implementation("sdpa")
        return False
    return True


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

        with packed_rows():
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
