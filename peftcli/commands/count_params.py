"""`peftcli count-params`: the recipe to count, from a recipe file or from --model and --method alone."""

from __future__ import annotations

from pathlib import Path

from peftcli.config.recipe import Recipe, load_recipe, recipe_from_dict
from peftcli.core.errors import UsageError


def recipe_to_count(recipe: Path | None, overrides: list[str] | None, *, model: str | None, method: str | None,
                    task: str | None, num_labels: int | None) -> Recipe:
    """A YAML recipe as given (its data file need not exist: counting reads no data), or a recipe
    made of a model and a method; `count-params config.json --method lora` names the model
    positionally, and a first argument with `=` is an override."""
    if recipe is not None and recipe.suffix in (".yaml", ".yml"):
        given = {"--model": ("model.name", model), "--method": ("method.name", method),
                 "--task": ("model.task", task), "--num-labels": ("model.num_labels", num_labels)}
        flags = [(flag, key, v) for flag, (key, v) in given.items() if v is not None]
        if flags:  # the recipe's own values would win without a word
            raise UsageError(f"count-params {recipe}: {', '.join(f for f, _, _ in flags)} apply without a recipe; "
                             f"with one, override its keys: {' '.join(f'{k}={v}' for _, k, v in flags)}")
        return load_recipe(recipe, overrides or [], check_files=False)
    task = task or "causal_lm"
    num_labels = num_labels or 2
    if recipe is not None:  # `count-params config.json --method lora`
        overrides = [str(recipe), *(overrides or [])] if "=" in str(recipe) else overrides
        model = model or (str(recipe) if "=" not in str(recipe) else None)
    if model is None or method is None:
        hint = ""
        if recipe is not None and "=" not in str(recipe):
            if (recipe / "recipe.yaml").is_file():
                hint = f"; {recipe} is a run folder: pass {recipe / 'recipe.yaml'}"
            elif recipe.is_file() or recipe.is_dir():
                hint = f"; {recipe} is not a .yaml recipe: as a model, add --method (e.g. --method lora)"
            else:
                hint = f"; {recipe}: no such file"
        raise UsageError("count-params needs a recipe, or --model and --method (e.g. --model gpt2 --method lora)" + hint)
    raw = {"model": {"name": model, "task": task, "num_labels": num_labels if task == "classification" else None},
           "method": {"name": method}}
    return recipe_from_dict(raw, "count-params", overrides or [])
