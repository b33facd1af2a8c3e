"""Text generation from a trained run, or from a recipe with a fresh (untrained) adapter.

Prompts are formatted exactly as the training data was (the tokenizer's chat template when the
recipe uses it), so a run answers in the format it learned. Decoding is greedy with the KV cache,
through `evaluate.generate_texts`, the same path that scores generated answers during training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftcli.config.recipe import load_recipe
from peftcli.core.errors import BadInput
from peftcli.data.chat import format_prompt
from peftcli.inference.evaluate import generate_texts
from peftcli.methods.attach import pick_device
from peftcli.runs.load import Built, build, load_run


class GenerateError(BadInput, ValueError):
    """The run or recipe cannot generate text (wrong task, not found)."""


def load_for_generation(target: str | Path, device: torch.device, overrides: list[str] | None = None) -> Built:
    """A run folder (its saved adapter) or a recipe file (a fresh adapter, or its `init_from`)."""
    target = Path(target)
    if target.is_dir():
        recipe_file = target / "recipe.yaml"
    elif target.suffix in (".yaml", ".yml") and target.is_file():
        recipe_file = target
    elif not target.exists():
        raise GenerateError(f"{target}: no such run folder or recipe")
    else:
        raise GenerateError(f"{target}: expected a run folder or a .yaml recipe")
    if recipe_file.exists():  # checked before any weights are read
        task = load_recipe(recipe_file, overrides or []).model.task
        if task != "causal_lm":
            raise GenerateError(f"{target}: model.task is {task!r}; generation needs a causal_lm run or recipe")
    if target.is_dir():
        built, _ = load_run(target, device, overrides)
        return built
    return build(load_recipe(target, overrides or []), device)


def generate(
    target: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    device: str = "auto",
    overrides: list[str] | None = None,
    chat_template: bool | None = None,
) -> list[str]:
    """Greedy continuations of `prompts`; `chat_template` None = as the recipe's data section says."""
    if max_new_tokens < 1:
        raise GenerateError("max_new_tokens must be at least 1")
    dev = pick_device(device)
    built = load_for_generation(target, dev, overrides)
    use_template = built.recipe.data.chat_template if chat_template is None else chat_template
    formatted = [format_prompt(built.tokenizer, p, use_template) for p in prompts]
    return generate_texts(built.model, built.tokenizer, formatted, device=dev, max_new_tokens=max_new_tokens)
