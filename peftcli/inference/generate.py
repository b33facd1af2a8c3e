"""Text generation from a trained run, or from a recipe with a fresh (untrained) adapter.

Prompts are formatted exactly as the training data was (the tokenizer's chat template when the
recipe uses it), so a run answers in the format it learned. Decoding is greedy with the KV cache,
through `decode.generate_texts`, the same path that scores generated answers during training;
several runs of one base model answer a prompts file in mixed batches (`multi.generate_mixed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftcli.config.recipe import load_recipe
from peftcli.core.errors import BadInput
from peftcli.data.chat import format_prompt
from peftcli.inference.decode import context_length, generate_texts, is_unicode
from peftcli.inference.multi import generate_mixed, load_runs, prompt_ids, prompt_rows, read_prompts
from peftcli.methods.attach import pick_device
from peftcli.runs.load import Built, build, load_run, untrusted


class GenerateError(BadInput, ValueError):
    """The run or recipe cannot generate text (wrong task, not found)."""


def load_for_generation(target: str | Path, device: torch.device, overrides: list[str] | None = None, *,
                        trust_remote_code: bool = False) -> Built:
    """A run folder (its saved adapter) or a recipe file (a fresh adapter, or its `init_from`).
    Either may be a run's own recipe.yaml, so code runs only with `trust_remote_code` (the flag)."""
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
        built, _ = load_run(target, device, overrides, trust_remote_code=trust_remote_code)
        return built
    return build(untrusted(load_recipe(target, overrides or []), trust_remote_code), device,
                 trust_remote_code=trust_remote_code)


def generate(
    target: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    device: str = "auto",
    overrides: list[str] | None = None,
    chat_template: bool | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts`; `chat_template` None = as the recipe's data section says."""
    if max_new_tokens < 1:
        raise GenerateError("max_new_tokens must be at least 1")
    for i, p in enumerate(prompts):
        if not is_unicode(p):
            raise GenerateError(f"{_nth(i, len(prompts))} is not valid Unicode text (bytes that are not UTF-8); "
                                "pass UTF-8 text")
    dev = pick_device(device)
    built = load_for_generation(target, dev, overrides, trust_remote_code=trust_remote_code)
    use_template = built.recipe.data.chat_template if chat_template is None else chat_template
    formatted = [format_prompt(built.tokenizer, p, use_template) for p in prompts]
    _check_fits(built.model, [len(built.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in formatted],
                [max_new_tokens] * len(prompts), [_nth(i, len(prompts)) for i in range(len(prompts))],
                "--max-new-tokens")
    return generate_texts(built.model, built.tokenizer, formatted, device=dev, max_new_tokens=max_new_tokens)


def _nth(i: int, n: int) -> str:
    return "the prompt" if n == 1 else f"prompt {i + 1}"


def _check_fits(model, lengths: list[int], limits: list[int], where: list[str], flag: str) -> None:
    """Each prompt (of `lengths` tokens) and its new tokens within the model's context: beyond it,
    generation runs past the position table and returns nothing (or garbage) with exit 0 and one
    warning from transformers."""
    ctx = context_length(model)
    if ctx is None:
        return
    for n, m, w in zip(lengths, limits, where, strict=True):
        if n + m > ctx:
            raise GenerateError(f"{w} is {n:,} tokens; with {m} new ones that is more than the model's context of "
                                f"{ctx:,} tokens: shorten it" + (f" or lower {flag}" if n < ctx else ""))


def generate_for_runs(runs: Sequence[str | Path], prompts: Path, *, max_new_tokens: int,
                      device: str = "auto", trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Answers to a JSONL prompts file, each prompt with the adapter its line names, several runs
    of one base model sharing each batch; one {"adapter", "prompt", "generated"} per line, in order."""
    rows = prompt_rows(prompts)  # a bad file is refused before minutes of loading
    multi = load_runs(runs, pick_device(device), trust_remote_code=trust_remote_code)
    if multi.recipe.model.task != "causal_lm":
        raise GenerateError(f"{runs[0]}: model.task is {multi.recipe.model.task!r}; generation needs causal_lm runs")
    reqs, limits = read_prompts(rows, multi, max_new_tokens)
    ids = prompt_ids(multi, reqs)
    _check_fits(multi.model, [len(x) for x in ids], limits, [w for w, _ in rows], "max_new_tokens")
    texts = generate_mixed(multi, reqs, max_new_tokens=limits, ids=ids)
    return [{"adapter": name, "prompt": prompt, "generated": text}
            for (name, prompt), text in zip(reqs, texts, strict=True)]
