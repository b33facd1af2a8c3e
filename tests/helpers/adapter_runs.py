"""Run folders made without training: a recipe, its method attached, every adapter tensor random."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import write_recipe


def make_run(root: Path, name: str, model_dir: Path, task: str, method: dict, *, seed: int,
             data: dict | None = None, label_names: list[str] | None = None, train_pooler: bool = False,
             scale: float = 0.2) -> Path:
    """A run folder as `peftcli train` leaves it, with random (nonzero) adapter weights."""
    from peftcli.config.recipe import load_recipe, recipe_yaml
    from peftcli.methods.attach import pick_device
    from peftcli.runs.checkpoint import save_adapter
    from peftcli.runs.load import build

    run = root / name
    run.mkdir(parents=True)
    model = {"name": str(model_dir), "task": task}
    if task == "classification":
        model["num_labels"] = len(label_names or ["a", "b"])
        model["train_pooler"] = train_pooler
    src = write_recipe(root / f"{name}.yaml", model=model, data=data or {"source": "unused.csv"},
                       method=method, output={"dir": str(run)})
    recipe = load_recipe(src)
    built = build(recipe, pick_device("cpu"), label_names=label_names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    meta = {"base_model": recipe.model.name, "task": task, "label_names": label_names}
    save_adapter(run / "adapter", built.model, built.spec, built.arch, recipe.method, meta)
    (run / "recipe.yaml").write_text(recipe_yaml(recipe))
    return run
