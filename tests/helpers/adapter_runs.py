"""Run folders made without training: a recipe, its method attached, every adapter tensor random.

Shared by tests in several folders; tests/ is on the path (pyproject's `pythonpath`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import write_recipe
from safetensors.torch import load_file


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


def randomize(model: torch.nn.Module, seed: int = 3, scale: float = 0.15) -> None:
    """Non-zero adapter weights, so that every tensor's name and layout matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def spread(model: torch.nn.Module, seed: int = 7) -> None:
    """Base matrices redrawn at std 1/sqrt(fan-in): at HF's std 0.02 a tiny model's weights have
    nearly equal singular values and flat attention, which hides a wrong start or a wrong key."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def make_run_on_data(tmp: Path, model_dir: Path, method: dict, data: Path, *, task: str = "classification",
             seed: int = 3, model: dict | None = None) -> Path:
    """A run folder as `peftcli train` writes it, with random adapter weights (no training)."""
    from peftcli.config.recipe import load_recipe, recipe_yaml
    from peftcli.core.files import atomic_file_write
    from peftcli.methods.attach import pick_device
    from peftcli.runs.checkpoint import save_adapter
    from peftcli.runs.load import build

    run = tmp / "run"
    data_cfg = {"source": str(data), "text_column": "sentence", "max_length": 32}
    if task == "causal_lm":
        data_cfg.update(prompt_column="prompt", response_column="response")
    path = write_recipe(tmp / "recipe.yaml", model={"name": str(model_dir), "task": task, **(model or {})}, data=data_cfg,
                        method=method, output={"dir": str(run)})
    r = load_recipe(path)
    labels = ["negative", "positive"] if task == "classification" else None
    built = build(r, pick_device("cpu"), label_names=labels)
    randomize(built.model, seed=seed, scale=0.1)
    run.mkdir(parents=True)
    atomic_file_write(run / "recipe.yaml", recipe_yaml(r))
    save_adapter(run / "adapter", built.model, built.spec, built.arch, r.method,
                 {"base_model": str(model_dir), "task": task, "label_names": labels})
    return run


def run_logits(run: Path, b: dict) -> torch.Tensor:
    from peftcli.runs.load import load_run

    built, _ = load_run(run, torch.device("cpu"))
    built.model.eval()
    with torch.no_grad():
        return built.model(**b).logits


def text_batch(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(["the film was great today", "awful"], return_tensors="pt", padding=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def assert_same_adapter(a_dir: Path, b_dir: Path, tol: float = 1e-4, *, meta: bool = True) -> None:
    """Two adapter folders in the same file format (keys, shapes, dtypes and, with `meta`, the meta
    fields a reader uses) with the same values up to `tol`: what a distributed run must leave beside
    its one-process twin."""
    a, b = load_file(str(a_dir / "adapter.safetensors")), load_file(str(b_dir / "adapter.safetensors"))
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    if meta:
        ma, mb = json.loads((a_dir / "meta.json").read_text()), json.loads((b_dir / "meta.json").read_text())
        assert set(ma) == set(mb)
        for k in ("method", "tensors", "adapter_parameters", "label_names", "trainable", "total"):
            assert ma[k] == mb[k], k
