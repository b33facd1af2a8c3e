"""Reading and rewriting the calls an HF model makes, for methods that act through forward hooks.

Methods change what a model computes without copying or patching modeling code, so they need the
arguments of calls they do not make: the backbone's (token ids, attention mask, position ids,
cache) and each sub-layer's input. Argument names and positions differ between model families
and transformers versions; everything that has to cope with that lives here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

MASK_ATTR = "peftcli_sequence_mask"


class BackboneCall:
    """The arguments of one backbone forward call, by name, whatever was passed positionally."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sig = _signature(module)
        self._bound = sig.bind_partial(*args, **kwargs)
        self.a = self._bound.arguments
        self._var_kw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def get(self, name: str) -> Any:
        if name in self.a:
            return self.a[name]
        if self._var_kw and self._var_kw in self.a:
            return self.a[self._var_kw].get(name)
        return None

    def set(self, name: str, value: Any) -> None:
        if name in self._bound.signature.parameters:
            self.a[name] = value
        elif self._var_kw:
            self.a.setdefault(self._var_kw, {})[name] = value
        else:
            raise TypeError(f"{name} is not an argument of this model's forward")

    def call_args(self) -> tuple[tuple, dict]:
        # All by keyword: HF's forward decorators fill some arguments (use_cache, ...) from the
        # config when they are missing from kwargs, which would clash with positional ones.
        kwargs = {k: v for k, v in self.a.items() if k != self._var_kw}
        kwargs.update(self.a.get(self._var_kw, {}) if self._var_kw else {})
        return (), kwargs

    def seq_len(self) -> int:
        ids = self.get("input_ids")
        return (ids if ids is not None else self.get("inputs_embeds")).shape[1]

    def batch_size(self) -> int:
        ids = self.get("input_ids")
        return (ids if ids is not None else self.get("inputs_embeds")).shape[0]

    def device(self) -> torch.device:
        ids = self.get("input_ids")
        return (ids if ids is not None else self.get("inputs_embeds")).device

    def past_len(self) -> int:
        # transformers renamed the argument from past_key_values to cache (5.2x); accept both.
        past = self.get("past_key_values")
        if past is None:
            past = self.get("cache")
        if past is None:
            return 0
        if hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
        return int(past[0][0].shape[-2])  # legacy tuple cache


_SIGS: dict[type, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    t = type(module)
    if t not in _SIGS:
        _SIGS[t] = inspect.signature(module.forward)
    return _SIGS[t]


def backbone(model: nn.Module) -> nn.Module:
    """The module that maps token ids to hidden states (HF's `base_model`)."""
    return getattr(model, "base_model", model)


def accepts(module: nn.Module, name: str) -> bool:
    params = _signature(module).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Capture:
    """Forward pre-hook keeping a sub-layer's input until the adapter that reads it takes it.

    Adapters that read a sub-layer's input but act elsewhere (a parallel adapter adds to the
    output projection; UniPELT's gates scale other modules) get that input here. Under gradient
    checkpointing the layer's forward is replayed, pre-hook then reader again, so the pair stays
    in step; `take` releases the tensor as soon as it has been used. An object rather than a
    closure, so that `copy.deepcopy` of an adapted model points the copy at the copied adapter;
    the kept tensor is not copied.
    """

    def __init__(self, adapter: nn.Module, who: str) -> None:
        self.adapter = adapter
        self.who = who  # for the error message
        self.x: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "x": None}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.adapter.adapter_enabled:
            self.x = None
        elif args:
            self.x = args[0]
        elif "hidden_states" in kwargs:
            self.x = kwargs["hidden_states"]
        else:
            raise RuntimeError(f"{self.who}: cannot find the input of {type(module).__name__}")
        return None

    def take(self) -> torch.Tensor | None:
        x, self.x = self.x, None
        return x


class SequenceMask:
    """The current batch's 2-D attention mask, for averages over real tokens only.

    A forward pre-hook on the backbone stores it; modules deep inside the layers read it. When
    the tensor being averaged does not line up with it (another batch size, or a sequence length
    longer than the mask) the plain mean over positions is used.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {"mask": None}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        m = BackboneCall(module, args, kwargs).get("attention_mask")
        self.mask = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
        return None

    def weights(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """[batch, seq]: 1 on real tokens (the last `seq` columns of the mask), 0 on padding."""
        m = self.mask
        if m is None or m.shape[0] != batch or m.shape[1] < seq:
            return torch.ones(batch, seq, device=device)
        return m[:, -seq:].to(device=device, dtype=torch.float32)

    def mean(self, g: torch.Tensor) -> torch.Tensor:
        """[batch, seq, k] -> [batch, k], averaged over real tokens."""
        if g.dim() == 2:
            return g
        w = self.weights(g.shape[0], g.shape[1], g.device).to(g.dtype).unsqueeze(-1)
        return (g * w).sum(1) / w.sum(1).clamp_min(1.0)


def sequence_mask(model: nn.Module) -> SequenceMask:
    """The model's SequenceMask, installed on first use."""
    holder = getattr(model, MASK_ATTR, None)
    if isinstance(holder, SequenceMask):
        return holder
    holder = SequenceMask()
    backbone(model).register_forward_pre_hook(holder, with_kwargs=True)
    setattr(model, MASK_ATTR, holder)
    return holder


__all__ = ["MASK_ATTR", "BackboneCall", "Capture", "SequenceMask", "accepts", "backbone", "sequence_mask"]
