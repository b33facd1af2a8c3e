"""HF PEFT's adapter folder format, both ways.

A PEFT adapter folder is `adapter_config.json` + `adapter_model.safetensors`. Four of our methods
have a PEFT twin computing the same function (LoRA with rsLoRA and DoRA, IA³, prefix tuning,
prompt tuning), so their weights can go to PEFT users and come back from them. Everything here is
a key rename plus bookkeeping, decided by one `Layout` computed from the live model. This file does
what every type shares; the method's spec (`MethodSpec.peft`, a `PeftTwin` in the method's own
file) fills in its type's config entries and tensor names, turns a PEFT config back into recipe
options, and says which settings must agree. A method without a twin says why (`no_peft_reason`).

- LoRA/DoRA/IA³ tensors sit at `base_model.model.<module path>.<tensor>`, exactly our module path,
  because our wrappers take the place of the layer they adapt as PEFT's do.
- Prompt learning has one `prompt_embeddings` tensor and keeps trained heads at `base_model.<path>`
  (PEFT does not wrap the model there), the other methods at `base_model.model.<path>`.
- `target_modules` is written as the shortest module-name suffixes that select exactly the wrapped
  layers under PEFT's matching rule, so a PEFT user reads e.g. `["query", "value"]`, not paths.
- GPT-2's fused c_attn under IA³ with only some of q/k/v targeted: PEFT scales whole rows of the
  fused output, so the exported vector is the full [out, 1] one with the untargeted rows at 1.

Export never reads base weights: the model is built on the meta device, so it is instant and also
works for QLoRA runs on a machine without CUDA. Importing (`init_from:` a PEFT folder) loads into
a built model and refuses, with the recipe key to change, when the recipe describes a different
adapter than the folder holds.

Three ways in for a PEFT folder:
    init_from: DIR in a recipe         train on from its weights (the method must match the folder)
    peftcli import-peft DIR RUN        a run folder; eval, merge, generate and export then work on it
    peftcli merge DIR DEST             straight to a merged HF model folder
The last two take `--recipe R`; without it the recipe is made from adapter_config.json
(base_model_name_or_path, task_type, the method's settings; classes from the head's shape).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.core.adapter_files import finite, load_tensors
from peftcli.core.arch import Arch
from peftcli.core.files import write_dir
from peftcli.core.peft_layout import (
    Layout,
    PeftFormatError,
)
from peftcli.methods import all_methods
from peftcli.methods.registry import MethodSpec, PeftTwin
from peftcli.runs.checkpoint import load_adapter_state

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"

TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}

# Why a method has no PEFT adapter to become, when its spec does not say.
_NO_TWIN = (
    "HF PEFT has no method computing the same function, so its format cannot hold a {name} adapter; "
    "use the run folder with peftcli"
)


def export_refusal(method_name: str) -> str | None:
    """None when the method has a PEFT twin, else why not."""
    spec = all_methods().get(method_name)
    if spec is not None and spec.peft is not None:
        return None
    reason = (spec.no_peft_reason if spec is not None else "") or _NO_TWIN
    return f"cannot export method {method_name!r} to HF PEFT: " + reason.format(name=method_name)


def _twin(method_name: str) -> PeftTwin:
    refusal = export_refusal(method_name)
    if refusal:
        raise PeftFormatError(refusal)
    return all_methods()[method_name].peft


def peft_type_for(method_name: str) -> str:
    return _twin(method_name).peft_type


def _twins_by_type() -> dict[str, tuple[str, PeftTwin]]:
    """PEFT's peft_type -> (our method name, its twin)."""
    return {spec.peft.peft_type: (name, spec.peft) for name, spec in sorted(all_methods().items())
            if spec.peft is not None}


# ------------------------------------------------------------------------------ the layout


def head_params(arch: Arch) -> list[str]:
    """Our names of the task head's tensors (PEFT keeps them through modules_to_save)."""
    return [f"{name}.{pn}" for name, head in arch.head_modules() for pn, _ in head.named_parameters()]


def common_config(peft_type: str, recipe, arch: Arch) -> dict[str, Any]:
    """The adapter_config.json entries every PEFT type shares: task, base model, the head to save."""
    heads = [name for name, _ in arch.head_modules()] if recipe.model.task == "classification" else []
    return {
        "peft_type": peft_type,
        "task_type": TASK_TYPES[recipe.model.task],
        "base_model_name_or_path": recipe.model.name,
        "revision": recipe.model.revision,
        "inference_mode": True,
        "modules_to_save": heads or None,
    }


def layout(model: nn.Module, arch: Arch, spec: MethodSpec, recipe) -> Layout:
    """The PEFT config and key names for a model with `spec` attached as `recipe.method` says."""
    twin = _twin(spec.name)
    lay = Layout(peft_type=twin.peft_type, config=common_config(twin.peft_type, recipe, arch), twin=twin,
                 task=recipe.model.task)
    head_prefix = "base_model." if twin.prompt_learning else "base_model.model."
    lay.heads = head_params(arch) if recipe.model.task == "classification" else []
    for name in lay.heads:
        lay.to_peft[name] = head_prefix + name
    twin.layout(model, arch, recipe.method, lay)
    return lay


# ------------------------------------------------------------------------------ for the twins


# ------------------------------------------------------------------------------ export


def to_peft_state(sd: dict[str, torch.Tensor], lay: Layout) -> dict[str, torch.Tensor]:
    """Our adapter tensors renamed (and IA³ row subsets widened) for PEFT. Refuses leftovers."""
    if lay.transform is not None:
        sd = lay.transform(sd)
    out: dict[str, torch.Tensor] = {}
    left = [k for k in sd if k not in lay.to_peft and k not in lay.ignored]
    if left:
        raise PeftFormatError(
            f"the adapter holds {len(left)} tensors PEFT's {lay.peft_type} format has no place for "
            f"(e.g. {left[0]}); it cannot be exported without losing them"
        )
    missing = [k for k in lay.to_peft if k not in sd]
    if missing:
        raise PeftFormatError(f"the adapter file lacks {missing[0]}, which the recipe's method creates; "
                              "was the run trained with another recipe?")
    for ours, key in lay.to_peft.items():
        t = sd[ours].detach().to("cpu")
        if ours in lay.rows:
            rows, full = lay.rows[ours]
            wide = torch.ones(full, 1, dtype=t.dtype)
            wide[torch.tensor(rows)] = t.reshape(-1, 1)
            t = wide
        out[key] = t.contiguous()
    return out


def write_peft_folder(dest: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_dir(Path(dest), write)


def export_model(model: nn.Module, arch: Arch, spec: MethodSpec, recipe, sd: dict[str, torch.Tensor],
                 dest: Path) -> Layout:
    """Write `sd` (the adapter tensors of `model`, as checkpoint.adapter_state gives them) as a PEFT folder."""
    lay = layout(model, arch, spec, recipe)
    write_peft_folder(dest, to_peft_state(sd, lay), lay.config)
    return lay


def read_peft_folder(src: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    src = Path(src)
    cfg_file = src / PEFT_CONFIG
    if not cfg_file.exists():
        raise PeftFormatError(f"{src}: no {PEFT_CONFIG}; is this an HF PEFT adapter folder?")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{cfg_file}: holds a JSON {type(config).__name__}, not PEFT's config object")
    weights = next((src / n for n in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (src / n).exists()), None)
    if weights is None:
        raise PeftFormatError(f"{src}: no {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_BIN}) next to {PEFT_CONFIG}")
    return config, finite(weights, load_tensors(weights))


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def method_from_peft(config: dict[str, Any], where: str = "adapter_config.json") -> dict[str, Any]:
    """The recipe `method:` block that builds the adapter a PEFT config describes; `where` names
    the config file for a value of the wrong type (lora_alpha: null, a list for rank_pattern)."""
    pt = str(config.get("peft_type", "")).upper()
    twins = _twins_by_type()
    if pt not in twins:
        raise PeftFormatError(
            f"PEFT adapter type {config.get('peft_type')!r} has no peftcli counterpart; "
            f"peftcli reads {', '.join(sorted(twins))}"
        )
    name, twin = twins[pt]
    try:
        return {"name": name, **twin.import_config(config)}
    except (TypeError, ValueError, AttributeError) as e:
        raise PeftFormatError(f"{where}: a {pt} setting has a value of the wrong type ({e}); fix it to what "
                              "HF PEFT writes, or pass --recipe with a recipe that describes the adapter") from None


def _check_settings(src: Path, config: dict[str, Any], recipe, where: str) -> None:
    """The recipe's method must describe the adapter in the folder; say which keys differ."""
    pt = str(config.get("peft_type", "")).upper()
    block = method_from_peft(config, str(src / "adapter_config.json"))
    want = block["name"]
    if recipe.method_name != want:
        shown = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in block.items())
        raise PeftFormatError(
            f"{where}: the folder holds a PEFT {pt} adapter but the recipe's method.name is "
            f"{recipe.method_name!r}; set method.name: {want} (the folder's settings: {shown})"
        )
    task = recipe.model.task
    tt = config.get("task_type")
    if tt and tt != TASK_TYPES[task]:
        fix = {v: k for k, v in TASK_TYPES.items()}.get(tt)
        raise PeftFormatError(
            f"{where}: adapter_config.json has task_type {tt} but the recipe's model.task is {task!r}"
            + (f"; set model.task: {fix}" if fix else "; peftcli reads SEQ_CLS and CAUSAL_LM adapters")
        )
    twin = _twins_by_type()[pt][1]
    # (peft key, recipe key, theirs, ours), and what no recipe key can fix
    pairs, problems = twin.settings(config, recipe.method) if twin.settings is not None else ([], [])
    for pk, rk, theirs, ours in pairs:
        if theirs != ours:
            problems.append(f"adapter_config.json has {pk}: {_yaml_value(theirs)} but the recipe has "
                            f"method.{rk}: {_yaml_value(ours)}; set method.{rk}: {_yaml_value(theirs)}")
    if problems:
        raise PeftFormatError(f"{where}: the recipe does not describe this adapter:\n  - " + "\n  - ".join(problems))


def _strip_head_key(key: str) -> str:
    for p in ("base_model.model.", "base_model."):
        if key.startswith(p):
            return key[len(p):]
    return key


def from_peft_state(peft_sd: dict[str, torch.Tensor], lay: Layout, where: str,
                    config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """PEFT tensors renamed to ours; explains what the recipe would need to change on a mismatch.
    `config` is the folder's adapter_config.json; `where` names the folder in messages."""
    config = config or {}
    target_modules = config.get("target_modules")
    inverse = {v: k for k, v in lay.to_peft.items()}
    for ours in lay.heads:  # PEFT keeps heads under base_model. or base_model.model. depending on the type
        inverse.setdefault("base_model.model." + ours, ours)
        inverse.setdefault("base_model." + ours, ours)
    ours_sd: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in peft_sd.items():
        name = inverse.get(key)
        if name is None:
            unknown.append(key)
            continue
        if lay.twin.check_tensor is not None:
            lay.twin.check_tensor(key, name, t, lay, where, config)
        if name in lay.rows:
            rows, full = lay.rows[name]
            flat = t.reshape(-1)
            if flat.numel() != full:
                raise PeftFormatError(f"{where}: {key} has {flat.numel()} entries, the model's layer {full}")
            others = torch.ones(full, dtype=torch.bool)
            others[torch.tensor(rows)] = False
            if not torch.allclose(flat[others].float(), torch.ones(int(others.sum()))):
                raise PeftFormatError(
                    f"{where}: {key} scales rows of the fused q/k/v projection that the recipe's method.targets "
                    "leave fixed; add the missing roles (q, k, v) to method.targets"
                )
            t = flat[torch.tensor(rows)].reshape(-1, 1)
        ours_sd[name] = t
    adapted_there = sorted({_module_of(k) for k in unknown if _module_of(k)} |
                           {lay.module_of[k] for k in peft_sd if k in lay.module_of})
    adapted_here = sorted(set(lay.module_of.values()))
    if adapted_there != adapted_here:
        extra = [m for m in adapted_there if m not in adapted_here]
        lacking = [m for m in adapted_here if m not in adapted_there]
        msg = [f"{where}: the adapter and the recipe adapt different layers"]
        if extra:
            msg.append(f"the adapter adapts {len(extra)} layers the recipe does not (e.g. {extra[0]})")
        if lacking:
            msg.append(f"the recipe adapts {len(lacking)} layers the adapter does not (e.g. {lacking[0]})")
        if target_modules:
            msg.append(f"the folder's target_modules are {target_modules}; set method.targets accordingly")
        raise PeftFormatError("; ".join(msg))
    if unknown:
        hint = ("was it made for another base model or with other settings?" if _module_of(unknown[0]) else
                "PEFT trained it as a full copy (modules_to_save), which peftcli only does for the task head")
        raise PeftFormatError(
            f"{where}: the adapter holds {len(unknown)} tensors this model has no place for (e.g. {unknown[0]}); {hint}"
        )
    heads = [k for k in lay.heads if k not in ours_sd]
    if heads:
        raise PeftFormatError(
            f"{where}: the adapter has no weights for the classification head ({heads[0]}); PEFT saves them "
            "when the head is in modules_to_save (task_type SEQ_CLS does that by itself)"
        )
    return ours_sd


def _module_of(peft_key: str) -> str | None:
    """`base_model.model.<path>.lora_A.weight` -> <path>; None for keys that are not adapter tensors."""
    for suffix in (sfx for _, twin in _twins_by_type().values() for sfx in twin.key_suffixes):
        if peft_key.endswith(suffix):
            return _strip_head_key(peft_key[: -len(suffix)])
    return None


def load_peft_weights(model: nn.Module, arch: Arch, spec: MethodSpec, recipe, src: Path,
                      where: str | None = None) -> None:
    """Load an HF PEFT adapter folder into a model built from `recipe`. `where` is how messages
    name the folder, as the user gave it: the recipe's `init_from` unless the caller says otherwise
    (import-peft and merge read the folder from the command line)."""
    src = Path(src)
    where = where or f"init_from {src}"
    config, peft_sd = read_peft_folder(src)
    _check_settings(src, config, recipe, where)
    lay = layout(model, arch, spec, recipe)
    sd = from_peft_state(peft_sd, lay, where, config)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for name, t in sd.items():
        if name in lay.heads and tuple(shapes[name]) != tuple(t.shape):
            raise PeftFormatError(
                f"{where}: {name} has shape {tuple(t.shape)} in the adapter, {tuple(shapes[name])} here; "
                f"set model.num_labels: {t.shape[0]} (or data.label_names with {t.shape[0]} names)"
            )
    load_adapter_state(model, spec, arch, recipe.method, sd)


# ------------------------------------------------------------------------------ PEFT folder -> run folder


def recipe_from_peft(src: Path, overrides: list[str] | None = None):
    """A recipe for a PEFT folder from its adapter_config.json alone (base model, task, method)."""
    from peftcli.config.recipe import recipe_from_dict

    config, sd = read_peft_folder(src)
    name = config.get("base_model_name_or_path")
    if not name:
        raise PeftFormatError(f"{src}/{PEFT_CONFIG} has no base_model_name_or_path; pass --recipe")
    task = {v: k for k, v in TASK_TYPES.items()}.get(config.get("task_type") or "CAUSAL_LM")
    if task is None:
        raise PeftFormatError(f"{src}: task_type {config.get('task_type')!r}; peftcli reads SEQ_CLS and CAUSAL_LM "
                              "adapters (pass --recipe to say which)")
    raw: dict[str, Any] = {"model": {"name": name, "task": task},
                           "method": method_from_peft(config, f"{src}/{PEFT_CONFIG}")}
    if config.get("revision"):
        raw["model"]["revision"] = config["revision"]
    if task == "classification":
        rows = head_rows(sd)
        if rows:
            raw["model"]["num_labels"] = rows
    where = f"{src}/{PEFT_CONFIG}"
    recipe = recipe_from_dict(raw, where, overrides or [])
    recipe.source = where  # what a later refusal (targets, layers) names as the file to fix
    return recipe


def head_rows(sd: dict[str, torch.Tensor]) -> int | None:
    for k, t in sd.items():
        if _module_of(k) is None and k.endswith(".weight") and t.ndim == 2 and "prompt_embeddings" not in k:
            return int(t.shape[0])
    return None


def is_peft_folder(path: Path) -> bool:
    return (Path(path) / PEFT_CONFIG).exists()


__all__ = [
    "common_config", "export_model", "export_refusal", "head_params", "is_peft_folder", "layout", "load_peft_weights", "method_from_peft",
    "read_peft_folder", "recipe_from_peft", "write_peft_folder",
]
