"""Any adapter whose effect is a change of linear weights, as a plain HF PEFT LoRA (`export --as-lora`).

Multi-adapter servers load LoRA and nothing else. But DoRA, IA³, KronA (and every other method whose
layer adapters give `delta_weight()`, core/adapter.py) change each adapted layer by a weight delta
ΔW, and the best rank-r approximation of ΔW in Frobenius norm is its truncated SVD (Eckart–Young):

    ΔW ≈ U_r S_r V_rᵀ = B A,   A = sqrt(S_r) V_rᵀ  [r, in],   B = U_r sqrt(S_r)  [out, r]

The rank is fixed (`rank`) or, per layer, the smallest keeping a fraction `energy` of the squared
singular values. Every layer's LoRA scaling is 1 (lora_alpha = r, and alpha_pattern = rank_pattern
when ranks differ), so a server that reads one global alpha/r still scales each layer right.
A bias change (IA³ scaling a layer's output, BitFit's trained biases) becomes PEFT's `lora_bias`
(the bias of lora_B). Base parameters a method trained that are neither a linear weight nor its
bias (BitFit's layer-norm biases) travel whole in `modules_to_save`, as the task head does.

Arithmetic is float32; the error of each layer is reported, and a delta of rank ≤ r comes out exact
up to float rounding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.core.adapter import AdapterModule, LayerAdapter
from peftcli.core.arch import Arch, is_conv1d, is_linear, linear_dims
from peftcli.core.peft_layout import Layout, PeftFormatError, linear_targets
from peftcli.methods.lora import merge_into_base
from peftcli.methods.registry import MethodSpec
from peftcli.runs.peft_format import common_config, head_params


def as_lora_refusal(spec: MethodSpec | None, method_name: str) -> str | None:
    """None when the method's effect is a weight delta, else the whole refusal."""
    if spec is None:
        return f"cannot export method {method_name!r} as a LoRA: no such method"
    if spec.as_lora_refusal:
        return f"cannot export method {method_name!r} as a LoRA: {spec.as_lora_refusal}"
    return None


@dataclass
class LayerFit:
    """One adapted linear layer and how well its LoRA reproduces the delta."""

    path: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F; 0 when ΔW is 0
    bias: bool  # whether the layer's bias changes (carried as lora_B.bias)


@dataclass
class LoraExport:
    """The PEFT LoRA folder's content, and what `apply_lora` needs to rebuild base + LoRA."""

    tensors: dict[str, torch.Tensor]  # PEFT key -> tensor
    config: dict[str, Any]
    layers: list[LayerFit]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # path -> (A, B, bias)
    saved: dict[str, torch.Tensor]  # our parameter name -> tensor, for modules_to_save (heads included)
    notes: list[str] = field(default_factory=list)


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank kept from singular values `s` (descending): `rank`, or the smallest keeping the
    fraction `energy` of sum(s²). At least 1 (PEFT needs r ≥ 1) and at most len(s)."""
    if energy is None:
        return max(1, min(int(rank or 1), len(s)))
    s = s.double()
    if len(s) == 0 or float(s[0]) == 0.0:
        return 1
    if energy >= 1.0:  # everything: the numerical rank, leaving out directions that are rounding noise
        return max(1, int((s > s[0] * len(s) * torch.finfo(torch.float32).eps).sum()))
    kept = torch.cumsum(s**2, 0) / float((s**2).sum())
    return max(1, min(int((kept < energy).sum()) + 1, len(s)))


def low_rank(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], relative Frobenius error) of the truncated SVD of `delta` (out, in)."""
    d = delta.detach().float().cpu()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    a = root.view(-1, 1) * vh[:r]
    b = u[:, :r] * root.view(1, -1)
    norm = float(torch.linalg.matrix_norm(d))
    err = float(torch.linalg.matrix_norm(d - b @ a)) / norm if norm > 0 else 0.0
    return a.contiguous(), b.contiguous(), err


def _trained_base(model: nn.Module, heads: set[str]) -> dict[str, nn.Parameter]:
    """Parameters of the base model itself that the method trains (BitFit's biases): trainable, not
    inside an adapter module, not the task head."""
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdapterModule))
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and n not in heads and not n.startswith(inside)}


def layer_deltas(model: nn.Module, base: nn.Module, heads: set[str]) -> tuple[
        dict[str, tuple[torch.Tensor | None, torch.Tensor | None, nn.Module]], list[str]]:
    """Per linear layer path: (ΔW (out, in) or None, Δb or None, the layer as the adapted model has it),
    and the paths of other base modules with trained parameters (for modules_to_save).

    `model` is the adapted model, `base` the same base model untouched (BitFit's trained biases are
    compared with it). Adapters switched off (a run `peftcli drop` wrote) change nothing."""
    deltas: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, nn.Module]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LayerAdapter):
            if not mod.adapter_enabled:
                continue
            try:
                dw = mod.delta_weight()
            except TypeError as e:
                raise PeftFormatError(f"cannot export {name} as a LoRA: {e}") from None
            db = mod.delta_bias()
            deltas[name] = (dw.detach().float(), None if db is None else db.detach().float(), mod)
        elif isinstance(mod, AdapterModule) and not any(name.startswith(p + ".") for p in deltas):
            raise PeftFormatError(f"cannot export {name} ({type(mod).__name__}) as a LoRA: it is not a layer "
                                  "adapter, so its effect is no weight delta")
    others: list[str] = []
    for pname, p in _trained_base(model, heads).items():
        owner_path, _, leaf = pname.rpartition(".")
        owner = model.get_submodule(owner_path)
        if is_linear(owner) and leaf in ("weight", "bias"):
            change = (p.detach().float() - base.get_parameter(pname).detach().float())
            dw, db, _ = deltas.get(owner_path, (None, None, owner))
            if leaf == "weight":
                dw = change.t() if is_conv1d(owner) else change
            else:
                db = change
            deltas[owner_path] = (dw, db, owner)
        elif owner_path not in others:
            others.append(owner_path)
    return deltas, others


def _ranks_config(ranks: dict[str, int]) -> dict[str, Any]:
    """r and lora_alpha (the most common rank; the larger on a tie), and a pattern for the others."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {p: k for p, k in sorted(ranks.items()) if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def to_lora(model: nn.Module, base: nn.Module, arch: Arch, spec: MethodSpec, recipe, *,
            rank: int | None = None, energy: float | None = None) -> LoraExport:
    """The adapted `model` as a plain PEFT LoRA relative to `base` (the untouched base model)."""
    refusal = as_lora_refusal(spec, spec.name)
    if refusal:
        raise PeftFormatError(refusal)
    if (rank is None) == (energy is None):
        raise ValueError("internal: give exactly one of rank and energy")
    heads = head_params(arch) if recipe.model.task == "classification" else []
    deltas, others = layer_deltas(model, base, set(heads))
    if not deltas:
        raise PeftFormatError(f"the {spec.name} adapter changes no linear layer (every adapter switched off?); "
                              "there is nothing to export as a LoRA")
    with_bias = any(db is not None for _, db, _ in deltas.values())
    out = LoraExport(tensors={}, config={}, layers=[], factors={}, saved={})
    ranks: dict[str, int] = {}
    for path, (dw, db, layer) in sorted(deltas.items()):
        in_f, out_f = _dims(layer)
        if dw is None:  # a bias change alone (BitFit): the low-rank part is zero
            a, b, err = torch.zeros(1, in_f), torch.zeros(out_f, 1), 0.0
        else:
            a, b, err = low_rank(dw, rank, energy)
        bias = (torch.zeros(out_f) if db is None else db.cpu()) if with_bias else None
        out.factors[path] = (a, b, bias)
        ranks[path] = a.shape[0]
        out.layers.append(LayerFit(path, (out_f, in_f), a.shape[0], err, db is not None))
        key = f"base_model.model.{path}"
        out.tensors[f"{key}.lora_A.weight"] = a
        out.tensors[f"{key}.lora_B.weight"] = b
        if bias is not None:
            out.tensors[f"{key}.lora_B.bias"] = bias.contiguous()
    params = dict(model.named_parameters())
    for path in others:
        out.saved.update({f"{path}.{n}": p for n, p in model.get_submodule(path).named_parameters()})
    out.saved.update({n: params[n] for n in heads})
    for n, t in out.saved.items():
        out.tensors[f"base_model.model.{n}"] = t.detach().cpu().contiguous()
    out.config = _config(model, arch, recipe, deltas, ranks, with_bias, others)
    if others:
        out.notes.append(f"{len(others)} modules whose own parameters the run trained (e.g. {others[0]}) go whole into "
                         "modules_to_save; PEFT loads them, a LoRA-only server may ignore them")
    if with_bias:
        out.notes.append("the adapter changes biases, carried as lora_B.bias (lora_bias: true); a server "
                         "that ignores LoRA biases drops that part")
    return out


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer or of the one a layer adapter wraps."""
    return linear_dims(getattr(layer, "base", layer))


def _config(model: nn.Module, arch: Arch, recipe, deltas: dict, ranks: dict[str, int], with_bias: bool,
            others: list[str]) -> dict[str, Any]:
    lay = Layout(peft_type="LORA", config=common_config("LORA", recipe, arch), twin=None, task=recipe.model.task)
    linear_targets(model, lay, [(p, layer) for p, (_, _, layer) in sorted(deltas.items())])
    saved = (lay.config.get("modules_to_save") or []) + others
    lay.config.update({
        "modules_to_save": saved or None,
        **_ranks_config(ranks),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_bias": with_bias,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    })
    return lay.config


@torch.no_grad()
def apply_lora(base: nn.Module, exp: LoraExport) -> None:
    """Write the LoRA (B A + bias) and the saved modules into `base`, in place: the model a PEFT
    user gets from the folder, merged, to compare with the adapter it came from."""
    for path, (a, b, bias) in exp.factors.items():
        layer = base.get_submodule(path)
        merge_into_base(layer, b @ a)
        if bias is not None and bool(bias.any()):
            if getattr(layer, "bias", None) is None:
                raise PeftFormatError(f"internal: {path} has a bias change but no bias")
            layer.bias.add_(bias.to(layer.bias.device, layer.bias.dtype))
    params = dict(base.named_parameters())
    for n, t in exp.saved.items():
        params[n].copy_(t.to(params[n].device, params[n].dtype))


__all__ = ["LayerFit", "LoraExport", "apply_lora", "as_lora_refusal", "choose_rank", "layer_deltas", "low_rank",
           "to_lora"]
