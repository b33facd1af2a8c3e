"""`peftcli count-params`: the recipe to count, from a recipe file or from --model and --method alone."""

from __future__ import annotations

from pathlib import Path

from peftcli.config.recipe import Recipe, load_recipe, recipe_from_dict
from peftcli.core.errors import UsageError


def recipe_to_count(recipe: Path | None, overrides: list[str] | None, *, model: str | None, method: str | None,
                    task: str, num_labels: int) -> Recipe:
    """A YAML recipe as given (its data file need not exist: counting reads no data), or a recipe
    made of a model and a method; `count-params config.json --method lora` names the model
    positionally, and a first argument with `=` is an override."""
    if recipe is not None and recipe.suffix in (".yaml", ".yml"):
        return load_recipe(recipe, overrides or [], check_files=False)
    if recipe is not None:  # `count-params config.json --method lora`
        overrides = [str(recipe), *(overrides or [])] if "=" in str(recipe) else overrides
        model = model or (str(recipe) if "=" not in str(recipe) else None)
    if model is None or method is None:
        raise UsageError("count-params needs a recipe, or --model and --method (e.g. --model gpt2 --method lora)")
    raw = {"model": {"name": model, "task": task, "num_labels": num_labels if task == "classification" else None},
           "method": {"name": method}}
    return recipe_from_dict(raw, "count-params", overrides or [])
