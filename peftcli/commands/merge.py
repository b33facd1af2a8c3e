"""Merging: bake an adapter into the base weights and write a plain HF model folder.

The point of merging is a model that runs exactly as fast as the base model, so the merged folder
is checked to be the base model and nothing else: no module a method added survives, every module
is a transformers class again, and the saved folder reloads with `from_pretrained` to the same
parameter names and (within float error) the same logits as the adapted model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftcli.core.errors import CheckpointError
from peftcli.methods.attach import pick_device
from peftcli.runs.load import build_saved, open_run, peek_recipe, refuse_dropped, sample_batch
from peftcli.runs.lock import hold, writes_folders


class MergeRefused(CheckpointError):
    pass


@torch.no_grad()
@writes_folders
def merge_run(run: Path, dest: Path, *, force: bool = False, device: str = "cpu", recipe: Path | None = None,
              trust_remote_code: bool = False) -> float:
    """Merge, save, reload the saved folder, and return max |logit difference| on a sample batch.

    `run` may also be an HF PEFT adapter folder: it is imported first (with `recipe`, or with a
    recipe made from its adapter_config.json).
    """
    from peftcli.commands.peft import temporary_run
    from peftcli.runs.folder import check_destination, check_paths, local_inputs
    from peftcli.runs.peft_format import is_peft_folder

    dest, run = Path(dest), Path(run)
    hold(dest, what="merge destination", sources=[run, recipe])
    check_destination(dest, what="merge destination", sources=[run, recipe], replace=force)
    if is_peft_folder(run) and not (run / "recipe.yaml").exists():
        with temporary_run(run, recipe, trust_remote_code=trust_remote_code) as tmp_run:
            return merge_run(tmp_run, dest, force=force, device=device, trust_remote_code=trust_remote_code)
    if recipe is not None:  # a run folder merges by its own recipe.yaml; this one would go unread
        raise MergeRefused(f"--recipe {recipe}: only for an HF PEFT adapter folder; {run} is a run folder, "
                           "merged by its own recipe.yaml: leave --recipe out")
    refusal = _refusal_from_recipe(run)
    if refusal:
        raise MergeRefused(refusal)
    if (run / "recipe.yaml").exists():  # the base model (and the rest the run was made from) stays untouched too
        from peftcli.config.recipe import load_recipe

        check_paths(dest, what="merge destination", sources=local_inputs(load_recipe(run / "recipe.yaml")))
    nf4 = _is_nf4_run(Path(run))
    # A 4-bit base only loads on CUDA; "auto" lets the QLoRA check explain when there is none.
    dev = pick_device("auto" if nf4 else device)
    saved = open_run(run, trust_remote_code=trust_remote_code)
    refuse_dropped(saved, "merge", "merge the run it was made from (a merged model has no adapters to switch off)")
    built = build_saved(saved, dev, trust_remote_code=trust_remote_code)
    spec = built.spec
    if spec.merge is None:
        raise MergeRefused(f"method {spec.name!r} cannot be merged: {spec.merge_refusal or 'it is not a weight delta'}")
    model, tok = built.model, built.tokenizer
    model.eval()
    sample = sample_batch(tok, dev)
    before = model(**sample).logits.float()
    if nf4:
        # QLoRA: the update is added to the de-quantized weights the 4-bit matmul used, in bf16.
        from peftcli.models.quant import dequantize_model

        dequantize_model(model, torch.bfloat16)
    spec.merge(model, built.arch, built.recipe.method)
    check_plain(model)
    for p in model.parameters():
        p.requires_grad_(False)

    from peftcli.models.loading import auto_class
    from peftcli.runs.folder import replacing

    # Written beside DEST and checked there: a folder that does not reload never replaces the old one.
    with replacing(dest, kind="merge") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        trust = {"trust_remote_code": True} if trust_remote_code else {}
        reloaded = auto_class(built.recipe.model.task).from_pretrained(str(tmp), dtype=next(model.parameters()).dtype,
                                                                       **trust)
        reloaded.to(dev).eval()
        merged_names = [n for n, _ in model.named_parameters()]
        reloaded_names = [n for n, _ in reloaded.named_parameters()]
        if merged_names != reloaded_names:
            extra = sorted(set(merged_names) ^ set(reloaded_names))
            raise RuntimeError(f"the merged folder does not reload to the same parameters (e.g. {extra[:1]})")
        after = reloaded(**sample).logits.float()
    return float((before - after).abs().max())


def check_plain(model: torch.nn.Module) -> None:
    """Raise unless `model` is a plain transformers model again: no adapter module, no peftcli class,
    no attention function or hook left behind by a method."""
    from peftcli.core.adapter import is_adapter_module

    leftovers = [n for n, m in model.named_modules() if is_adapter_module(m)]
    if leftovers:
        raise RuntimeError(f"merge left adapter modules in place (e.g. {leftovers[0]})")
    ours = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if type(m).__module__.startswith("peftcli")]
    if ours:
        raise RuntimeError(f"merge left peftcli modules in place (e.g. {ours[0]})")
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if impl.startswith("peftcli"):
        raise RuntimeError(f"merge left the attention function {impl!r} in the model config")
    hooked = [n for n, m in model.named_modules()
              if any(_is_ours(h) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))]
    if hooked:
        raise RuntimeError(f"merge left forward hooks on {hooked[0]}")


def _is_ours(fn) -> bool:
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    return str(mod).startswith("peftcli")


def _refusal_from_recipe(run: Path) -> str | None:
    """Refuse a non-mergeable method before loading any weights."""
    from peftcli.methods import all_methods

    name = peek_recipe(run).get("method", {}).get("name")
    spec = all_methods().get(name) if isinstance(name, str) else None
    if spec is None or spec.merge is not None:
        return None
    return f"method {name!r} cannot be merged: {spec.merge_refusal or 'it is not a weight delta'}"


def _is_nf4_run(run: Path) -> bool:
    return peek_recipe(run).get("model", {}).get("quantization") == "nf4"
