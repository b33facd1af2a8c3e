"""`peftcli train`: the flags that do not go together, and `--smoke`'s last step: the run just
written must reload to the model that was trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.config.recipe import Recipe
from peftcli.core.errors import UsageError
from peftcli.inference.evaluate import evaluate
from peftcli.methods.attach import pick_device
from peftcli.runs.load import SMOKE_SCORED, SMOKE_TOKENIZED, collator, load_run, prepare_data
from peftcli.training.preference import Objective, reference_for_run


def check_train_flags(r: Recipe, *, resume: bool, smoke: bool, dry_run: bool) -> None:
    """Refuse flags that would be ignored without a word, and, for --dry-run, a run folder that
    `train` itself would refuse (the dry run says what train would do)."""
    from peftcli.runs.folder import check_paths, protected_inputs

    if resume and (smoke or dry_run):
        other = "--smoke trains a fresh <output.dir>-smoke every time" if smoke else "--dry-run trains nothing"
        raise UsageError(f"--resume with {'--smoke' if smoke else '--dry-run'}: {other}; drop one of the two")
    if dry_run:
        check_paths(Path(r.run_dir()), what="output.dir", sources=protected_inputs(r))


def smoke_reload_loss(r: Recipe, test: dict[str, Any], trust_remote_code: bool = False) -> float:
    """The eval loss of the saved run, reloaded on CPU, on the held-out rows training scored; raises when it differs
    from the trained model's test loss, which means the run folder does not rebuild the model."""
    cpu = pick_device("cpu")
    if r.train.objective != "sft":  # scored against the reference it trained with, as `peftcli eval` scores it
        built, reference = reference_for_run(r.run_dir(), cpu, trust_remote_code=trust_remote_code)
        _, _, _, held = prepare_data(built.recipe, built.tokenizer, (SMOKE_TOKENIZED, SMOKE_TOKENIZED))
        head = built.arch.spec.lm_head if r.train.chunked_ce else None
        m = Objective(built.recipe, reference, head, cpu).evaluate(built.model, held[:SMOKE_SCORED],
                                                                 collator(built.recipe, built.tokenizer), 16)
    else:
        built, _ = load_run(r.run_dir(), cpu, trust_remote_code=trust_remote_code)
        _, _, _, held = prepare_data(built.recipe, built.tokenizer, (SMOKE_TOKENIZED, SMOKE_TOKENIZED))
        m = evaluate(built.model, held[:SMOKE_SCORED], collator(built.recipe, built.tokenizer), task=built.recipe.model.task,
                     device=cpu, num_labels=len(built.label_names or []) or None)
    if abs(m["loss"] - test.get("loss", m["loss"])) > 1e-3:
        raise RuntimeError(f"smoke: reloaded adapter gives test loss {m['loss']:.5f}, trained model gave {test['loss']:.5f}")
    return m["loss"]
