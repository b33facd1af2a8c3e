"""Several trained runs on one base model, each row of a batch with its own adapter, nothing merged.

Serving many adapters of one base one at a time wastes the base: each request batch is as small
as the traffic of one adapter, and swapping (or merging) adapters between batches costs time of
its own. Here the base runs once per batch and each row gets its own adapter's update:

- LoRA runs (plain LoRA and rsLoRA): every adapted linear of any run becomes one
  `StackedLoraLinear` holding all runs' A and B stacked along a leading adapter axis, zero-padded
  to the largest rank at that site, with row 0 all zeros (the base model, no adapter). A run that
  does not adapt a site, or whose meta.json switched it off, has zeros there too. The per-row
  adapter index is set on the model for the duration of a call (`MultiAdapter.rows`), and each
  site computes base(x) + s[idx] · (x A[idx]ᵀ) B[idx]ᵀ with a gather and two batched matmuls, so
  the prompt pass and every KV-cache decode step of `generate` work unchanged: rows keep their
  index. A trained task head (classification) is stacked the same way (`StackedLinear`).
- Every other method (DoRA, UniPELT, prefix, bottleneck adapters, ...), and LoRA runs whose head
  cannot be stacked: the rows of each such run form a sub-batch that runs through that run's own
  model, built as `load_run` builds it, whose frozen base tensors are the shared model's (equal
  values, one copy in memory).

Each row's numbers are those of its adapter alone: zero padding and zero rows add exact zeros,
and the per-row products differ from the single-adapter ones only in summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.config.recipe import Recipe
from peftcli.core.adapter import LayerAdapter
from peftcli.core.arch import dense_weight, is_conv1d, is_linear, linear_dims, set_module
from peftcli.core.errors import BadInput
from peftcli.core.precision import autocast_ctx, float_dtype, forward_inputs
from peftcli.data.batching import Collator
from peftcli.data.chat import format_prompt
from peftcli.inference.decode import eos_ids, greedy_ids, is_unicode, pad_id
from peftcli.inference.evaluate import Scores
from peftcli.methods import get_method
from peftcli.methods.lora import site_scalings
from peftcli.runs.load import SavedRun, base_model, load_run, open_run, same_model

BASE = 0  # adapter index of "no adapter"


class MultiAdapterError(BadInput, ValueError):
    """Runs that cannot be served together, or a request naming no loaded adapter."""


class _Route:
    """The per-row adapter index every stacked module of one model reads during a call."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None
        self.version = 0


class StackedLoraLinear(LayerAdapter):
    """A frozen linear with the LoRA updates of many adapters, one chosen per batch row."""

    def __init__(self, base: nn.Module, route: _Route, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__(base)
        self.route = route
        # Buffers, not parameters: nothing here trains, and .to(device) still moves them.
        self.register_buffer("lora_A", a)  # [K, r_max, in]
        self.register_buffer("lora_B", b)  # [K, out, r_max]
        self.register_buffer("scaling", scale)  # [K]
        # Decode steps reuse one batch's gathered A and B: rows keep their adapter for the call.
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gathered is None or self._gathered[0] != self.route.version:
            a = self.lora_A.index_select(0, idx)
            b = (self.lora_B.index_select(0, idx) * self.scaling.index_select(0, idx).view(-1, 1, 1))
            self._gathered = (self.route.version, a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous())
        return self._gathered[1], self._gathered[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.route.idx
        if idx is None or not self.adapter_enabled:
            return y
        rows = idx.shape[0]
        if x.shape[0] != rows:
            raise RuntimeError(f"a batch of {x.shape[0]} rows reached a site routed for {rows} rows")
        at, bt = self._rows(idx)
        h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(at.dtype), at)  # [rows, T, r_max]
        return y + torch.bmm(h, bt).view(y.shape).to(y.dtype)

    def merged_base(self) -> nn.Module:
        raise TypeError("a stacked multi-adapter layer holds one update per row; merge each run on its own")


class StackedLinear(nn.Module):
    """A task-head linear with one weight (and bias) per adapter, chosen per batch row."""

    def __init__(self, route: _Route, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.route = route
        self.register_buffer("weight", weight)  # [K, out, in]
        self.register_buffer("bias", bias)  # [K, out] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.route.idx
        if idx is None:
            idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        rows = x.shape[0]
        w = self.weight.index_select(0, idx)
        y = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(w.dtype), w.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias.index_select(0, idx).unsqueeze(1)
        return y.view(*x.shape[:-1], w.shape[1])


@dataclass
class Adapter:
    name: str
    run: Path
    recipe: Recipe
    meta: dict
    index: int = BASE  # row of the stacked tensors; BASE for a grouped run
    model: nn.Module | None = None  # grouped runs only: its own model (sharing the base's tensors)

    @property
    def stacked(self) -> bool:
        return self.index != BASE


@dataclass
class MultiAdapter:
    """One base model with several runs' adapters; `base_name` is the plain base (no adapter)."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    base_name: str
    recipe: Recipe  # the first run's: base model settings shared by all
    adapters: dict[str, Adapter] = field(default_factory=dict)
    route: _Route = field(default_factory=_Route)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def adapter(self, name: str) -> Adapter | None:
        """None for the base model; raises for a name that is neither."""
        if name == self.base_name:
            return None
        if name not in self.adapters:
            raise MultiAdapterError(
                f"no adapter named {name!r}; loaded: {', '.join(self.adapters)} (and the base {self.base_name!r})")
        return self.adapters[name]

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Route batch row i of the shared model through adapter names[i] (stacked runs or the base)."""
        idx = []
        for n in names:
            a = self.adapter(n)
            if a is not None and not a.stacked:
                raise MultiAdapterError(f"adapter {n!r} ({a.recipe.method_name}) runs in its own sub-batch")
            idx.append(BASE if a is None else a.index)
        self.route.idx = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.route.version += 1
        try:
            yield
        finally:
            self.route.idx = None
            self.route.version += 1

    def groups(self, names: Sequence[str]) -> list[tuple[nn.Module, list[int], Adapter | None]]:
        """Positions of `names` split into sub-batches: (model, positions, adapter or None).

        The shared model (stacked runs and the base) comes first with every row it can take,
        then one sub-batch per grouped run, in order of first appearance.
        """
        shared: list[int] = []
        own: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            a = self.adapter(n)
            if a is None or a.stacked:
                shared.append(i)
            else:
                own.setdefault(n, []).append(i)
        out: list[tuple[nn.Module, list[int], Adapter | None]] = []
        if shared:
            out.append((self.model, shared, None))
        for n, pos in own.items():
            out.append((self.adapters[n].model, pos, self.adapters[n]))
        return out

    def routed(self, model: nn.Module, names: Sequence[str]) -> contextlib.AbstractContextManager:
        return self.rows(names) if model is self.model else contextlib.nullcontext()

    def recipe_of(self, name: str) -> Recipe:
        a = self.adapter(name)
        return self.recipe if a is None else a.recipe


# ------------------------------------------------------------------------------------------ loading


def parse_run_args(args: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """`RUN` or `NAME=RUN` arguments -> (name, folder); a bare run is named after its folder."""
    out: list[tuple[str, Path]] = []
    for a in args:
        s = str(a)
        name, sep, path = s.partition("=")
        if sep and name and not Path(s).exists():
            out.append((name, Path(path)))
        else:
            p = Path(s)
            out.append((p.resolve().name if p.name in ("", ".", "..") else p.name, p))
    seen: dict[str, Path] = {}
    for name, p in out:
        if name in seen:
            raise MultiAdapterError(
                f"two runs are named {name!r} ({seen[name]} and {p}); name them apart as NAME=RUN, e.g. {name}2={p}")
        seen[name] = p
    return out


_SHARED_KEYS = ("name", "task", "revision", "dtype", "quantization", "trust_remote_code")


def _check_same_base(first: tuple[Path, Recipe], other: tuple[Path, Recipe]) -> None:
    (r0, a), (r1, b) = first, other
    for key in _SHARED_KEYS:
        va, vb = getattr(a.model, key), getattr(b.model, key)
        same = same_model(va, vb) if key == "name" else va == vb
        if not same:
            raise MultiAdapterError(
                f"{r1 / 'recipe.yaml'}: model.{key} is {vb!r}, but {r0 / 'recipe.yaml'} has {va!r}; runs served "
                f"together share one base model: pass only runs trained with the same model.{key}")


def _lora_sites(sd: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """A LoRA run's tensors: {linear path: (A, B)} and the rest (its task head), by name."""
    sites, rest = {}, {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            path = k[: -len(".lora_A.weight")]
            sites[path] = (v, sd[path + ".lora_B.weight"])
        elif not k.endswith(".lora_B.weight"):
            rest[k] = v
    return sites, rest


def _stacks(recipe: Recipe) -> bool:
    """The method's spec says its adapter stacks per row (LoRA's A and B)."""
    spec = get_method(recipe.method_name)
    return bool(spec.stacks_rows and spec.stacks_rows(recipe.method))


def _stackable(recipe: Recipe, rest: dict[str, torch.Tensor], model: nn.Module, sites: dict) -> bool:
    """Whether a run's update can live in the stacked modules: plain LoRA with a linear head."""
    if not _stacks(recipe):
        return False
    params = dict(model.named_parameters())
    for k, v in rest.items():
        mod_path, _, leaf = k.rpartition(".")
        if k not in params or params[k].shape != v.shape or leaf not in ("weight", "bias"):
            return False
        if not isinstance(model.get_submodule(mod_path), nn.Linear):
            return False
    for path, (a, b) in sites.items():
        try:
            m = model.get_submodule(path)
        except AttributeError:
            return False
        if not is_linear(m) or linear_dims(m) != (a.shape[1], b.shape[0]):
            return False
    return True


def _strip_base(name: str) -> str:
    return ".".join(p for p in name.split(".") if p != "base")


@torch.no_grad()
def _share_base_tensors(model: nn.Module, shared: nn.Module) -> int:
    """Point a grouped run's frozen tensors at the shared model's equal ones; returns how many."""
    pool = {_strip_base(n): p for n, p in shared.named_parameters()}
    tied = 0
    for name, p in list(model.named_parameters()):
        q = pool.get(_strip_base(name))
        if q is None or q is p or p.requires_grad or q.shape != p.shape or q.dtype != p.dtype or q.device != p.device:
            continue
        if torch.equal(p, q):
            mod_path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(mod_path) if mod_path else model, leaf, q)
            tied += 1
    return tied


def load_runs(runs: Sequence[str | Path], device: torch.device, *, trust_remote_code: bool = False) -> MultiAdapter:
    """Several run folders (`RUN` or `NAME=RUN`) on one base model; refuses runs on different bases.
    `trust_remote_code` is the command line's flag, never the runs' saved recipes (`open_run`)."""
    named = parse_run_args(runs)
    if not named:
        raise MultiAdapterError("no runs given; pass one or more run folders written by `peftcli train`")
    loaded: list[tuple[str, SavedRun]] = []
    for name, run in named:
        saved = open_run(run, trust_remote_code=trust_remote_code)
        if loaded:
            _check_same_base((loaded[0][1].folder, loaded[0][1].recipe), (run, saved.recipe))
        loaded.append((name, saved))

    first = next((s for _, s in loaded if _stacks(s.recipe)), loaded[0][1])
    r0 = first.recipe
    model, tok = base_model(r0, device, first.meta.get("label_names"), trust_remote_code)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    multi = MultiAdapter(model=model, tokenizer=tok, device=device, base_name=loaded[0][1].recipe.model.name, recipe=r0)
    if multi.base_name in {n for n, _ in loaded}:
        raise MultiAdapterError(f"a run is named {multi.base_name!r}, the base model's name; name it apart as NAME=RUN")

    stacked: list[tuple[Adapter, dict, dict]] = []
    for name, saved in loaded:
        a = Adapter(name=name, run=saved.folder, recipe=saved.recipe, meta=saved.meta)
        sites, rest = _lora_sites(saved.state) if _stacks(saved.recipe) else ({}, {})
        off = set(saved.meta.get("disabled_modules") or [])
        if _stackable(saved.recipe, rest, model, sites):
            a.index = len(stacked) + 1
            stacked.append((a, {p: ab for p, ab in sites.items() if p not in off}, rest))
        multi.adapters[name] = a
    _build_stacks(multi, stacked, float_dtype)

    for a in multi.adapters.values():
        if a.stacked:
            continue
        built, _ = load_run(a.run, device, trust_remote_code=trust_remote_code)
        built.model.eval()
        _share_base_tensors(built.model, model)
        a.model = built.model
    return multi


@torch.no_grad()
def _build_stacks(multi: MultiAdapter, stacked: list[tuple[Adapter, dict, dict]], float_dtype: Callable) -> None:
    model, route = multi.model, multi.route
    k = len(stacked) + 1
    paths = list(dict.fromkeys(p for _, sites, _ in stacked for p in sites))
    # Each run's scaling at each site: its own rank and alpha there (rank_pattern / alpha_pattern).
    scalings = {ad.index: site_scalings(model, ad.recipe.method, list(sites)) for ad, sites, _ in stacked}
    for path in paths:
        lin = model.get_submodule(path)
        in_f, out_f = linear_dims(lin)
        dt, dev = float_dtype(lin), lin.weight.device
        r_max = max(sites[path][0].shape[0] for _, sites, _ in stacked if path in sites)
        a_all = torch.zeros(k, r_max, in_f, dtype=dt, device=dev)
        b_all = torch.zeros(k, out_f, r_max, dtype=dt, device=dev)
        s_all = torch.zeros(k, dtype=dt, device=dev)
        for ad, sites, _ in stacked:
            if path not in sites:
                continue
            a, b = sites[path]
            r = a.shape[0]
            a_all[ad.index, :r] = a.to(dt)
            b_all[ad.index, :, :r] = b.to(dt)
            s_all[ad.index] = scalings[ad.index][path]
        set_module(model, path, StackedLoraLinear(lin, route, a_all, b_all, s_all))
    heads = list(dict.fromkeys(key.rpartition(".")[0] for _, _, rest in stacked for key in rest))
    for path in heads:
        lin = model.get_submodule(path)
        w_all = dense_weight(lin).detach().unsqueeze(0).repeat(k, 1, 1)
        has_bias = lin.bias is not None
        b_all = lin.bias.detach().unsqueeze(0).repeat(k, 1) if has_bias else None
        for ad, _, rest in stacked:
            if f"{path}.weight" in rest:
                w = rest[f"{path}.weight"]
                w_all[ad.index] = (w.t() if is_conv1d(lin) else w).to(w_all.dtype)
            if has_bias and f"{path}.bias" in rest:
                b_all[ad.index] = rest[f"{path}.bias"].to(b_all.dtype)
        set_module(model, path, StackedLinear(route, w_all, b_all))


# --------------------------------------------------------------------------------------- generation


def prompt_ids(multi: MultiAdapter, requests: Sequence[tuple[str, str]],
               chat_template: bool | None = None) -> list[list[int]]:
    """The token ids of (adapter name, prompt) pairs, each prompt formatted as its run's training
    data was (`chat_template` None: as the run's recipe says)."""
    tok = multi.tokenizer
    out = []
    for n, p in requests:
        use = multi.recipe_of(n).data.chat_template if chat_template is None else chat_template
        out.append(tok(format_prompt(tok, p, use), add_special_tokens=False)["input_ids"])
    return out


def generate_mixed(
    multi: MultiAdapter,
    requests: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    batch_size: int = 16,
    chat_template: bool | None = None,
    logits: list[list[torch.Tensor]] | None = None,
    ids: list[list[int]] | None = None,
) -> list[str]:
    """Greedy continuations of (adapter name, prompt) pairs, each prompt formatted as its run's
    training data was; the order of the answers is the order of the requests. `ids`: the requests'
    `prompt_ids`, where the caller has them already."""
    tok = multi.tokenizer
    names = [n for n, _ in requests]
    limits = [max_new_tokens] * len(requests) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if any(m < 1 for m in limits):
        raise MultiAdapterError("max_new_tokens must be at least 1")
    if ids is None:
        ids = prompt_ids(multi, requests, chat_template)
    outs: list[list[int]] = [[] for _ in requests]
    row_logits: list[list[torch.Tensor]] = [[] for _ in requests]
    pad = pad_id(tok)
    for model, pos, _ in multi.groups(names):
        eos = eos_ids(model, tok)
        for c in range(0, len(pos), batch_size):
            chunk = pos[c: c + batch_size]
            got: list[list[torch.Tensor]] | None = [] if logits is not None else None
            with multi.routed(model, [names[i] for i in chunk]):
                res = greedy_ids(model, [ids[i] for i in chunk], [limits[i] for i in chunk], pad_id=pad, eos=eos,
                                 device=multi.device, logits=got)
            for j, i in enumerate(chunk):
                outs[i] = res[j]
                if got is not None:
                    row_logits[i] = got[j]
    if logits is not None:
        logits.extend(row_logits)
    return [t.strip() for t in tok.batch_decode(outs, skip_special_tokens=True)]


PROMPT_KEYS = {"adapter", "prompt", "max_new_tokens"}


def prompt_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """A JSONL prompts file's lines as (where, row), checked before any model loads.

    Each line is {"adapter": NAME, "prompt": TEXT} with an optional "max_new_tokens". Any other
    key is refused: a misspelt or OpenAI-style one ("max_tokens") would otherwise be dropped unseen.
    """
    import json

    path = Path(path)
    shape = '{"adapter": NAME, "prompt": TEXT} per line'
    if path.is_dir():
        raise MultiAdapterError(f"--prompts {path} is a folder; pass a JSONL file, one {shape}")
    if not path.is_file():
        raise MultiAdapterError(f"--prompts {path}: no such file; pass a JSONL file, one {shape}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is no line
    except UnicodeDecodeError:
        raise MultiAdapterError(f"--prompts {path}: not a text file (not UTF-8); pass a JSONL file, one {shape}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MultiAdapterError(f"{where}: not JSON ({e.msg}); write one {shape.replace(' per line', '')} "
                                    "object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise MultiAdapterError(f'{where}: needs a "prompt" string, e.g. {{"adapter": "NAME", "prompt": "..."}}')
        unknown = sorted(set(row) - PROMPT_KEYS)
        if unknown:
            raise MultiAdapterError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                                    f"{', '.join(map(repr, unknown))}; a line takes {', '.join(sorted(PROMPT_KEYS))}")
        if not is_unicode(row["prompt"]):
            raise MultiAdapterError(f'{where}: "prompt" is not valid Unicode text (a lone surrogate); fix the text')
        limit = row.get("max_new_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise MultiAdapterError(f"{where}: max_new_tokens must be a positive integer, not {limit!r}")
        if "adapter" in row and not isinstance(row["adapter"], str):
            raise MultiAdapterError(f'{where}: "adapter" must be a name (a string), not {row["adapter"]!r}')
        rows.append((where, row))
    if not rows:
        raise MultiAdapterError(f"{path}: no prompts; write one " + shape.replace(" per line", "") + " object per line")
    return rows


def read_prompts(rows: list[tuple[str, dict[str, Any]]], multi: MultiAdapter,
                 max_new_tokens: int) -> tuple[list[tuple[str, str]], list[int]]:
    """`prompt_rows`' lines -> (adapter, prompt) pairs and per-prompt token limits. "adapter" may
    be left out when one run is loaded, and may name the base model (no adapter)."""
    only = multi.names[0] if len(multi.names) == 1 else None
    known = ", ".join([*multi.names, multi.base_name])
    reqs: list[tuple[str, str]] = []
    limits: list[int] = []
    for where, row in rows:
        name = row.get("adapter", only)
        if name is None:
            raise MultiAdapterError(f'{where}: no "adapter"; with several runs each line names one of: {known}')
        if name != multi.base_name and name not in multi.adapters:
            raise MultiAdapterError(f"{where}: adapter {name!r} is not loaded; use one of: {known} "
                                    "(a run is named after its folder, or NAME=RUN on the command line)")
        reqs.append((name, row["prompt"]))
        limits.append(row.get("max_new_tokens", max_new_tokens))
    return reqs, limits


# --------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_runs(multi: MultiAdapter, examples: dict[str, list[dict]], *, batch_size: int = 64) -> dict[str, dict]:
    """Each run's metrics on its own examples, all runs' examples in shared mixed batches.

    The metrics are those `evaluate.evaluate` gives the run alone: per-example sums and counts
    gathered per run, so neither batch order nor batch company changes them.
    """
    task = multi.recipe.model.task
    collate = Collator(multi.tokenizer.pad_token_id, task)
    tagged = [(n, e) for n, exs in examples.items() for e in exs]
    scores = {n: Scores(task) for n in examples}
    names_all = [n for n, _ in tagged]
    for model, pos, _ in multi.groups(names_all):
        pos = sorted(pos, key=lambda i: len(tagged[i][1]["input_ids"]))
        for c in range(0, len(pos), batch_size):
            chunk = pos[c: c + batch_size]
            batch = {k: v.to(multi.device) for k, v in collate([tagged[i][1] for i in chunk]).items()}
            with multi.routed(model, [names_all[i] for i in chunk]), \
                    autocast_ctx(multi.device, multi.recipe.train.precision):
                logits = model(**forward_inputs(batch, task)).logits.float()
            for j, i in enumerate(chunk):
                scores[names_all[i]].add(logits[j: j + 1], batch["labels"][j: j + 1])
    out: dict[str, dict] = {}
    for name, sc in scores.items():
        labels = multi.adapters[name].meta.get("label_names") if name in multi.adapters else None
        out[name] = sc.metrics(len(examples[name]), len(labels or []) or None)
    return out


__all__ = [
    "Adapter", "MultiAdapter", "MultiAdapterError", "StackedLinear", "StackedLoraLinear", "evaluate_runs",
    "generate_mixed", "load_runs", "parse_run_args", "prompt_ids", "prompt_rows", "read_prompts",
]
