"""AdapterFusion (Pfeiffer et al. 2021), stage 2: learn to mix frozen task adapters.

Stage 1 is ordinary training of one bottleneck adapter per source task (`pfeiffer` or `houlsby`
runs). Stage 2 freezes the base model and every source adapter and, at each adapter site of each
layer, puts a small attention over the sources' outputs:

    x        the tensor the source adapters read at this site (post-LN Pfeiffer: LN(h + r))
    up_i     f_i(x), source adapter i's output before its residual add
    p        softmax_i( Q(x) · K(up_i) / T )               one distribution per token
    out      Σ_i p_i V(up_i)                                replaces f(x) in the placement

so on a post-LN model the layer computes LN(z + Σ p_i V(up_i)), z = h + r: AdapterHub's
LN(Σ p_i V(up_i) + h + r). Q and K are N(0, 0.02²) with zero bias, V has no bias and starts at
the identity with 1e-6 off the diagonal, so stage 2 starts at (nearly) the average of the
sources' outputs. The loss gets 0.01 · Σ_layers ‖I − W_V‖²_F through the spec's `aux_loss`.
Because V is linear without bias, Σ p_i V(up_i) = V(Σ p_i up_i), which is what is computed.

Self-contained runs. The source adapters' weights are frozen but saved into the fused run's
adapter file (export_state), and `peftcli fuse` writes each source's method options into the
run's recipe (`method.sources`), so a fused run reloads without the source folders.

Pruning. A site can record the mean attention each source receives on real (non-padding) tokens;
`peftcli drop --prune-fusion K` keeps the K most attended sources per site by switching the
others' `adapter_enabled` off, and the site then mixes only the enabled ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.core.adapter import AdapterModule
from peftcli.core.adapter_files import find_run_adapter, read_adapter, read_run_recipe
from peftcli.core.arch import Arch
from peftcli.core.errors import BadInput, CheckpointError
from peftcli.core.hf_call import SequenceMask, sequence_mask
from peftcli.methods.bottleneck import (
    adapted_layers,
    add_after,
    add_post_ln,
    dense_bottleneck,
    factory_kwargs,
    get_role,
)
from peftcli.methods.registry import get_method, register

# Source methods that can be fused, and the sites each one adapts.
SITES = {"pfeiffer": ("ffn",), "houlsby": ("attn", "ffn")}
PREFIX = "fusion"  # layer children are named fusion_attn / fusion_ffn


@dataclass
class FusionConfig:
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "run folders of trained pfeiffer (or houlsby) adapters of the same base model, two or more"},
    )
    temperature: float = field(default=1.0, metadata={"min": 1e-6, "help": "T in p = softmax(Q(x)·K(up_i) / T)"})
    query: bool = field(default=True, metadata={"help": "learn Q (false: the adapter input itself is the query)"})
    key: bool = field(default=True, metadata={"help": "learn K (false: the source outputs are the keys)"})
    value: bool = field(default=True, metadata={"help": "learn V, initialised to the identity (+1e-6 off the diagonal)"})
    value_regularization: float = field(
        default=0.01, metadata={"min": 0.0, "help": "weight of Σ_layers ‖I − W_V‖² added to the training loss"}
    )
    sources: list[str] = field(
        default_factory=list,
        metadata={"help": "written by `peftcli fuse`: each source's method options as JSON, so the fused run "
                          "reloads without the source folders; leave empty"},
    )


@dataclass
class Source:
    index: int
    run: str
    method: str
    options: dict

    @property
    def name(self) -> str:
        return Path(self.run).name or self.run

    def config(self) -> Any:
        return get_method(self.method).config_cls(**self.options)

    def to_json(self) -> str:
        return json.dumps({"run": self.run, "method": self.method, "options": self.options}, sort_keys=True)


def source_names(sources: list[Source]) -> list[str]:
    """The sources' names in reports: their folders' names, each with its index where two share one
    (runs/a and other/a), so that neither's attention is reported under the other's."""
    names = [s.name for s in sources]
    return [f"{s.index}:{n}" if names.count(n) > 1 else n for s, n in zip(sources, names, strict=True)]


class FusionError(BadInput, ValueError):
    pass


def read_sources(cfg: FusionConfig) -> list[Source]:
    """The sources' methods and options: from `cfg.sources` when `peftcli fuse` filled it, else
    from each adapter run's recipe.yaml."""
    if cfg.sources:
        if len(cfg.sources) != len(cfg.adapters):
            raise FusionError(
                f"method.sources has {len(cfg.sources)} entries for {len(cfg.adapters)} method.adapters; "
                "empty method.sources to read them again from the runs"
            )
        out = []
        for i, text in enumerate(cfg.sources):
            d = json.loads(text)
            out.append(Source(i, d["run"], d["method"], d["options"]))
        return _check(out)
    # The runs' recipe.yaml files were written resolved by peftcli: their `method:` mapping is all a
    # source needs (read as data; the recipe layer sits above the methods).
    out = []
    for i, run in enumerate(cfg.adapters):
        try:
            method = read_run_recipe(Path(run)).get("method")
        except CheckpointError as e:
            raise FusionError(f"method.adapters[{i}]: {e}") from None
        method = dict(method) if isinstance(method, dict) else {}
        name = method.pop("name", None)
        if not isinstance(name, str):
            raise FusionError(f"method.adapters[{i}]: {Path(run) / 'recipe.yaml'} names no method (method.name)")
        out.append(Source(i, str(run), name, method))
    return _check(out)


def _check(sources: list[Source]) -> list[Source]:
    if not sources:
        raise FusionError("method.adapters is empty: name two or more trained adapter runs to fuse")
    seen: dict[str, int] = {}
    for s in sources:
        real = os.path.realpath(s.run)
        if real in seen:  # the same adapter twice: fusion would weigh one source against itself
            raise FusionError(f"method.adapters[{seen[real]}] and method.adapters[{s.index}] name the same run "
                              f"({s.run}); name each source run once")
        seen[real] = s.index
    for s in sources:
        if s.method not in SITES:
            raise FusionError(
                f"{s.run}: method {s.method!r} cannot be fused; train the sources with "
                + " or ".join(sorted(SITES))
            )
    kinds = {s.method for s in sources}
    if len(kinds) > 1:
        raise FusionError(f"sources mix methods {sorted(kinds)}: fused adapters must share one placement")
    return sources


# ---------------------------------------------------------------------------------------- module


class FusionSite(AdapterModule):
    """The frozen source adapters of one site and the attention that mixes them."""

    def __init__(
        self, hidden: int, adapters: dict[str, nn.Module], cfg: FusionConfig, mask: SequenceMask,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query = nn.Linear(hidden, hidden, **fk) if cfg.query else None
        self.key = nn.Linear(hidden, hidden, **fk) if cfg.key else None
        self.value = nn.Linear(hidden, hidden, bias=False, **fk) if cfg.value else None
        self.temperature = cfg.temperature
        self._mask = (mask,)
        # False until the sources' weights are in (from their runs, or from the fused run's file).
        self.ready = False
        self.recording = False
        self.attention_sum: torch.Tensor | None = None
        self.attention_tokens = 0.0
        if device.type != "meta":
            with torch.no_grad():
                for lin in (self.query, self.key):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=0.02)
                        nn.init.zeros_(lin.bias)
                if self.value is not None:
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def active(self) -> list[str]:
        return [k for k, a in self.adapters.items() if a.adapter_enabled]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError(
                "fusion: the source adapters' weights were never loaded (their run folders are missing and "
                "no fused adapter file was loaded)"
            )
        names = self.active()
        if not names:
            return torch.zeros_like(x)
        w = next(p for p in self.parameters() if p.dtype.is_floating_point)
        ups = torch.stack([self.adapters[k](x).to(w.dtype) for k in names], dim=-2)  # [..., N, d]
        xq = x.to(w.dtype)
        q = self.query(xq) if self.query is not None else xq
        k = self.key(ups) if self.key is not None else ups
        p = torch.softmax((q.unsqueeze(-2) * k).sum(-1) / self.temperature, dim=-1)  # [..., N]
        if self.recording:
            self._record(names, p.detach())
        ctx = (p.unsqueeze(-1) * ups).sum(-2)
        out = self.value(ctx) if self.value is not None else ctx
        return out.to(x.dtype)

    def _record(self, names: list[str], p: torch.Tensor) -> None:
        if self.attention_sum is None:
            self.attention_sum = torch.zeros(len(self.adapters), dtype=torch.float64)
        pos = {k: i for i, k in enumerate(self.adapters)}
        idx = torch.tensor([pos[k] for k in names])
        if p.dim() == 3:
            m = self._mask[0].weights(p.shape[0], p.shape[1], p.device)  # [B, S] 1 on real tokens
            summed = (p * m.unsqueeze(-1).to(p.dtype)).sum((0, 1))
            n = float(m.sum())
        else:
            summed = p.reshape(-1, p.shape[-1]).sum(0)
            n = float(p.numel() // p.shape[-1])
        self.attention_sum.index_add_(0, idx, summed.double().cpu())
        self.attention_tokens += n

    def mean_attention(self) -> dict[str, float]:
        if self.attention_sum is None or self.attention_tokens == 0:
            return {}
        return {k: float(v) / self.attention_tokens for k, v in zip(self.adapters, self.attention_sum, strict=True)}

    def value_distance(self) -> torch.Tensor:
        """‖I − W_V‖²_F."""
        w = self.value.weight
        eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
        return (eye - w).pow(2).sum()


class FusionRegularizer:
    """Σ_layers ‖I − W_V‖²_F times its weight; kept as `model.peftcli_aux_loss`, which the training
    loop reads until it asks the spec's `aux_loss` instead."""

    def __init__(self, sites: list[FusionSite], weight: float) -> None:
        self.sites = tuple(sites)
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        return self.weight * sum(s.value_distance() for s in self.sites)


# ---------------------------------------------------------------------------------------- attach


def fusion_sites(model: nn.Module) -> list[tuple[str, FusionSite]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FusionSite)]


def _source_key(arch: Arch, layer: int, method: str, site: str) -> str:
    return f"{arch.layers_path}.{layer}.{method}_{site}."


def attach(model: nn.Module, arch: Arch, cfg: FusionConfig) -> None:
    sources = read_sources(cfg)
    method = sources[0].method
    d = arch.hidden_size
    mask = sequence_mask(model)
    configs = [s.config() for s in sources]
    layer_sets = [set(adapted_layers(arch, c)) for c in configs]
    sites: list[FusionSite] = []
    for i in range(arch.num_layers):
        layer = arch.layer(i)
        for site in SITES[method]:
            host = get_role(arch, i, "o" if site == "attn" else "ffn_out")
            members = {str(s.index): dense_bottleneck(d, c, host)
                       for s, c, ls in zip(sources, configs, layer_sets, strict=True) if i in ls}
            if not members:
                continue
            for a in members.values():
                a.requires_grad_(False)
            fs = FusionSite(d, members, cfg, mask, **factory_kwargs(host))
            if site == "ffn" and method == "pfeiffer" and arch.post_norm:
                add_post_ln(layer, f"{PREFIX}_{site}", get_role(arch, i, "ffn_norm"), fs)
            else:
                add_after(layer, f"{PREFIX}_{site}", host, fs)
            sites.append(fs)
    if not sites:
        raise FusionError("the source adapters adapt no layer of this model")
    if cfg.value and cfg.value_regularization > 0:
        model.peftcli_aux_loss = FusionRegularizer(sites, cfg.value_regularization)
    if next(model.parameters()).device.type != "meta":
        _load_source_weights(model, arch, sources)


def _load_source_weights(model: nn.Module, arch: Arch, sources: list[Source]) -> None:
    """Copy each source run's adapter into the sites, when the runs are there."""

    files = {}
    for s in sources:
        try:
            folder = find_run_adapter(Path(s.run))
        except CheckpointError:
            return  # a fused run reloading without its sources: load_state supplies the weights
        files[s.index] = read_adapter(folder)[0]  # present but unreadable is an error, never skipped
    for name, fs in fusion_sites(model):
        layer = int(name[len(arch.layers_path) + 1:].split(".")[0])
        site = name.rsplit("_", 1)[1]
        for key, adapter in fs.adapters.items():
            s = sources[int(key)]
            prefix = _source_key(arch, layer, s.method, site)
            sd = {k[len(prefix):]: v for k, v in files[s.index].items() if k.startswith(prefix)}
            try:
                adapter.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(
                    f"{s.run}: its adapter does not fit layer {layer} ({site}) of this model; same base model "
                    f"and method options? ({str(e).splitlines()[0]})"
                ) from None
        fs.ready = True


# ---------------------------------------------------------------------------------------- saving


def export_state(model: nn.Module, arch: Arch, cfg: FusionConfig) -> dict[str, torch.Tensor]:
    """Trainable tensors (fusion Q, K, V and the head) plus copies of the frozen source adapters."""
    sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, fs in fusion_sites(model):
        for pn, p in fs.named_parameters():
            sd[f"{name}.{pn}"] = p
    return sd


def load_state(model: nn.Module, arch: Arch, cfg: FusionConfig, sd: dict[str, torch.Tensor]) -> None:
    from peftcli.core.adapter import copy_into_params

    params = dict(model.named_parameters())
    unknown = [k for k in sd if k not in params]
    if unknown:
        raise CheckpointError(f"fused adapter has {len(unknown)} tensors this model lacks (e.g. {unknown[0]})")
    wanted = set(export_state(model, arch, cfg))
    missing = sorted(wanted - set(sd))
    if missing:
        raise CheckpointError(f"fused adapter is missing {len(missing)} tensors (e.g. {missing[0]})")
    copy_into_params(params, sd)
    for _, fs in fusion_sites(model):
        fs.ready = True


# ---------------------------------------------------------------------------------------- analysis


def record_attention(model: nn.Module, on: bool = True) -> None:
    """Start (clearing earlier counts) or stop recording the attention each source receives."""
    for _, fs in fusion_sites(model):
        fs.recording = on
        if on:
            fs.attention_sum, fs.attention_tokens = None, 0.0


def attention_table(model: nn.Module, names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """{site path: {source: mean attention on real tokens}} from the last recording."""
    out = {}
    for path, fs in fusion_sites(model):
        mean = fs.mean_attention()
        out[path] = {(names[int(k)] if names else k): v for k, v in mean.items()}
    return out


def prune(model: nn.Module, keep: int) -> list[str]:
    """Keep the `keep` most attended sources at every site; returns the paths switched off."""
    off = []
    for path, fs in fusion_sites(model):
        if not fs.adapter_enabled:  # the whole site is dropped already
            continue
        mean = fs.mean_attention()
        if not mean:
            raise RuntimeError("prune: no attention recorded; run the model with record_attention(model) first")
        ranked = sorted((k for k in fs.active()), key=lambda k: -mean[k])
        for k in ranked[keep:]:
            fs.adapters[k].adapter_enabled = False
            off.append(f"{path}.adapters.{k}")
    return off


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """0.01 · Σ_layers ‖I − W_V‖²_F (the configured weight), when the recipe trains V with it."""
    reg = getattr(model, "peftcli_aux_loss", None)
    return reg() if isinstance(reg, FusionRegularizer) else None


register(
    "fusion",
    FusionConfig,
    summary="AdapterFusion: attention over frozen source adapters (pfeiffer/houlsby runs); use `peftcli fuse`",
    merge_refusal="fusion mixes non-linear adapters with input-dependent weights; it cannot be folded into a weight",
    as_lora_refusal="fusion mixes non-linear bottleneck adapters with input-dependent attention; no weight matrix "
                    "changes, so no LoRA computes it",
    export_state=export_state,
    load_state=load_state,
    # Not positionwise: not checked against the untrimmed model (tests/methods/test_lora_kernel.py).
    aux_loss=aux_loss,
    combine_refusal=("a fused run already mixes its sources with learned, input-dependent attention; combine "
                     "the source runs instead"),
    no_peft_reason=(
        "HF PEFT has no AdapterFusion (attention over several bottleneck adapters); "
        "use the run folder with peftcli"
    ),
)(attach)

__all__ = [
    "FusionConfig", "FusionError", "FusionRegularizer", "FusionSite", "Source", "attach", "attention_table", "aux_loss",
    "export_state", "fusion_sites", "load_state", "prune", "read_sources", "record_attention",
]
