"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

metrics.jsonl stays the record of a run; a tracker gets a copy of each of its lines (loss, lr,
grad norm, tokens/s, evaluation metrics) plus the resolved recipe, so that runs can be compared
in the tool a team already uses. Each tracker is an optional package, checked before anything is
loaded, and each works without a network by default:

    tensorboard  event files in <run>/tensorboard (`tensorboard --logdir runs`)
    wandb        offline run in <run>/wandb unless WANDB_MODE says otherwise (`wandb sync` uploads it)
    mlflow       file store in <run>/mlruns unless MLFLOW_TRACKING_URI names a server

A resumed run logs the steps after its checkpoint again; metrics.jsonl drops the superseded lines,
the trackers keep both (each shows the later value at a repeated step, or ignores it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from peftcli.config.recipe import Recipe, RecipeError

# tracker -> (module to import, package to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def check_trackers(recipe: Recipe) -> None:
    """Refuse a tracker whose package is missing, before a model is loaded or a file written."""
    problems = []
    for name in recipe.train.report_to:
        module, package = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            problems.append(f"train.report_to: {name} needs the {package} package, which is not installed; "
                            f"`pip install {package}` or remove {name} from train.report_to")
    if problems:
        raise RecipeError(recipe.source or "recipe", problems)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as flat tracker tags: train/loss, train/lr, eval/loss, ..."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("step", "elapsed_s"):
            continue
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items()
                        if isinstance(vv, (int, float)) and not isinstance(vv, bool)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"train/{k}"] = float(v)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` inside the block unless the user set it; put back afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class TensorBoard:
    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        self.writer.add_text("recipe", "```\n" + text + "```", 0)
        self.where = f"tensorboard: {run_dir / 'tensorboard'}"

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        import wandb

        # Offline unless the user asks for more: a CLI must never stop at a login prompt.
        # silent: wandb's own banner would break peftcli's terminal output; `where` says it instead.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "peftcli"), name=run_dir.name,
                              dir=str(run_dir), config=recipe.to_dict(),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous",
                              settings=wandb.Settings(silent=True))
        self.where = f"wandb: {self.run.settings.mode} run in {Path(self.run.dir).parent}"

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """Through an explicit client: the fluent API would set a process-wide tracking URI and active run."""

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if uri is None and importlib.util.find_spec("sqlalchemy") is not None:
            uri, artifacts = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}", (run_dir / "mlartifacts").resolve().as_uri()
        elif uri is None:
            # mlflow-skinny has no database backend; MLflow 3 keeps its file store behind an opt-in,
            # given here for this client only (the variable is put back at once).
            uri = (run_dir / "mlruns").resolve().as_uri()
        with _env("MLFLOW_ALLOW_FILE_STORE", "true"):
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "peftcli")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                name, artifact_location=artifacts)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        for k, v in _flat(recipe.to_dict()).items():
            self.client.log_param(self.run_id, k, str(v)[:500])
        self.client.log_text(self.run_id, yaml.safe_dump(recipe.to_dict(), sort_keys=False), "recipe.yaml")
        self.where = f"mlflow: run {self.run_id} at {uri}"

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.client.log_metric(self.run_id, k, v, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The run's trackers; `log` takes metrics.jsonl records as they are written."""

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        self.open: list[Any] = []
        try:
            for name in recipe.train.report_to:
                self.open.append(KINDS[name](run_dir, recipe))
        except BaseException:
            self.close()
            raise

    def where(self) -> str:
        """One line saying where each tracker writes."""
        return " · ".join(t.where for t in self.open)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        values = scalars(record)
        if not isinstance(step, int) or not values:
            return
        for t in self.open:
            t.log(values, step)

    def close(self) -> None:
        while self.open:
            self.open.pop().close()
