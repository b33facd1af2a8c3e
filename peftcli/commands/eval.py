"""`peftcli eval`: a run's saved adapter scored on a split, or several runs of one base model in
shared batches (each on its own recipe's split); each run's metrics saved in its folder as
eval_<split>.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.core.errors import DataError, UsageError
from peftcli.core.files import atomic_file_write
from peftcli.data.splits import MissingSplit, UnknownLabels
from peftcli.inference.evaluate import evaluate, generation_eval
from peftcli.inference.multi import evaluate_runs, load_runs
from peftcli.methods.attach import pick_device
from peftcli.runs.load import collator, load_run, peek_recipe, prepare_data
from peftcli.training.preference import Objective, reference_for_run


def split_examples(rec, tokenizer, split: str, label_names: list[str] | None = None, run: Path | None = None) -> list[dict]:
    """A run's examples of one split: its recipe's train / val / test rows, or a named split as test rows.

    A classifier's labels map to the classes the run was trained on (`label_names`, from its
    meta.json), not to the classes the data file holds today: a file edited since training (a class
    renamed, one added) would otherwise renumber the classes and score the wrong ones without a word."""
    if split not in ("test", "val", "train"):
        rec.data.eval_split = split
    if label_names and rec.model.task == "classification":
        rec.data.label_names = list(label_names)
    try:
        _, train_ex, val, test = prepare_data(rec, tokenizer)
    except MissingSplit as e:  # the split named by --split, not by the recipe's data.eval_split
        if e.key != "data.eval_split" or e.split != split:
            raise
        raise UsageError(f"--split {split}: {e.where}; or use test, val or train (the run's own splits)") from None
    except UnknownLabels as e:
        raise DataError(f"{e.source}: {e.shown} not among the classes {run or 'the run'} was trained on "
                        f"({', '.join(e.names)}); fix those rows, or train a run on the new classes") from None
    if split == "val" and not val:
        raise UsageError("--split val: the run's recipe has no validation rows (data.val_fraction is 0); "
                         "use --split test")
    return {"train": train_ex, "val": val}.get(split, test)


@dataclass
class RunScore:
    metrics: dict[str, Any]
    examples: int
    samples: list[dict]  # generated answers to show (causal_lm with prompts), at most eval.generate_samples
    unsaved: str | None = None  # why eval_<split>.json could not be written


def evaluate_run(run: Path, split: str, limit: int | None, device: str, trust_remote_code: bool = False) -> RunScore:
    """Score one run on `split` (its first `limit` examples) and save the metrics in the run folder."""
    dev = pick_device(device)
    reference = None
    if _objective(run) != "sft":  # the reference is built on the way: the run's starting weights are read first
        built, reference = reference_for_run(run, dev, trust_remote_code=trust_remote_code)
    else:
        built, _ = load_run(run, dev, trust_remote_code=trust_remote_code)
    rec = built.recipe
    examples = split_examples(rec, built.tokenizer, split, built.label_names, Path(run))
    if limit:
        examples = examples[:limit]
    if reference is not None:
        head = built.arch.spec.lm_head if rec.train.chunked_ce else None
        m = Objective(rec, reference, head, dev).evaluate(built.model, examples, collator(rec, built.tokenizer),
                                                         rec.eval.batch_size)
    else:
        m = evaluate(built.model, examples, collator(rec, built.tokenizer), task=rec.model.task, device=dev,
                     batch_size=rec.eval.batch_size, precision=rec.train.precision,
                     num_labels=len(built.label_names or []) or None)
    shown: list[dict] = []
    if rec.model.task == "causal_lm" and examples and "prompt_len" in examples[0]:
        g, samples = generation_eval(built.model, built.arch, built.tokenizer, examples, device=dev,
                                     max_new_tokens=rec.eval.max_new_tokens,
                                     limit=None if rec.eval.generate_accuracy else rec.eval.generate_samples)
        if rec.eval.generate_accuracy:
            m.update(g)
        shown = samples[: rec.eval.generate_samples]
    return RunScore(m, len(examples), shown, _save(Path(run) / f"eval_{split}.json", m))


def _save(path: Path, m: dict) -> str | None:
    """Write the scores beside the run; where the folder cannot be written (read-only, full), say
    so instead of losing the scores just computed."""
    try:
        atomic_file_write(path, json.dumps(m, indent=2))
    except OSError as e:
        return f"could not save {path}: {e.strerror or e}; the scores above are not kept"
    return None


def evaluate_many(runs: Sequence[Path], split: str, limit: int | None, device: str,
                  trust_remote_code: bool = False) -> tuple[str, dict[str, dict], list[str]]:
    """Score several runs of one base model in shared batches; returns the base model's name, each
    run's metrics (also saved in each run folder) and why any of them could not be saved."""
    for run in runs:
        if (obj := _objective(Path(str(run).partition("=")[2] or str(run)))) != "sft":
            raise UsageError(f"{run}: a run trained with train.objective {obj} is scored against its reference, "
                             "one run at a time: `peftcli eval RUN` for each")
    dev = pick_device(device)
    multi = load_runs(runs, dev, trust_remote_code=trust_remote_code)
    examples: dict[str, list[dict]] = {}
    for name, a in multi.adapters.items():
        rec = a.recipe
        examples[name] = split_examples(rec, multi.tokenizer, split, a.meta.get("label_names"), a.run)[: limit or None]
    metrics = evaluate_runs(multi, examples, batch_size=multi.recipe.eval.batch_size)
    unsaved = [_save(multi.adapters[name].run / f"eval_{split}.json", m) for name, m in metrics.items()]
    return multi.base_name, metrics, [u for u in unsaved if u]


def _objective(run: Path) -> str:
    """The run's train.objective, from its recipe.yaml (sft when it cannot be read: open_run says why later)."""
    return str(peek_recipe(run).get("train", {}).get("objective", "sft"))
