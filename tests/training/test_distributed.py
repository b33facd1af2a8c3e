"""Several processes on CPU (gloo): DDP and FSDP2 follow the single-process run, and resume
across a change of world size.

Everything is local and tiny: a 2-layer BERT with hidden size 32 saved with save_pretrained, a
tokenizer built from a 21-word vocab.txt, and an 80-row csv whose texts all tokenize to the same
length (so a batch of 8 and two batches of 4 see identical, unpadded inputs). Dropout is off and
the learning rate constant, so 2 ranks × batch 4 must give the same loss at every step as
1 rank × batch 8: gradients are averaged over ranks, and the logged loss is the mean over ranks.
The only differences are float summation order, hence TOL.

Cost: two launches of 2 processes (each imports transformers) plus in-process runs.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.adapter_runs import assert_same_adapter

from peftcli.runs.state import read_trainer_state

TOL = 1e-5
GOOD = ["good", "great", "fine", "nice", "happy", "love"]
BAD = ["bad", "awful", "sad", "hate", "poor", "ugly"]
NEUTRAL = ["the", "a", "movie", "food", "day", "it", "was", "is", "this"]
REPO = Path(__file__).resolve().parents[2]


def _make_model_and_data(root: Path) -> tuple[Path, Path]:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = GOOD + BAD + NEUTRAL
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    model_dir = root / "model"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for i in range(80):
        pos = i % 2 == 0
        ws = [rng.choice(NEUTRAL) for _ in range(5)] + [rng.choice(GOOD if pos else BAD)]
        rng.shuffle(ws)
        rows.append((" ".join(ws), "pos" if pos else "neg"))
    data = root / "data.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return model_dir, data


RECIPE = """\
model: {{name: {model}, task: classification}}
data: {{source: {data}, eval_size: 16, max_length: 16}}
method: {{name: lora, r: 4, alpha: 8, targets: [q, v]}}
train:
  max_steps: 6
  batch_size: 8
  lr: 1.0e-2
  warmup_ratio: 0.0
  scheduler: constant
  log_every: 1
  eval_every: 3
  device: cpu
  num_threads: 1
  progress: false
output: {{dir: {out}, overwrite: true, plot: false}}
"""


def _train_here(recipe: Path, overrides: list[str], *, resume: bool = False) -> None:
    from peftcli.config.recipe import load_recipe
    from peftcli.training.loop import train

    train(load_recipe(recipe, overrides), resume=resume)


def _launch(recipe: Path, overrides: list[str], *, resume: bool = False) -> None:
    """`peftcli train --nproc 2`: the launcher starts torchrun, which starts two ranks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "peftcli.cli", "train", str(recipe), *overrides, "--nproc", "2"]
    if resume:
        cmd.append("--resume")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    # Only rank 0 reports: the final lines appear once, not once per rank.
    assert res.stdout.count("run saved to") == 1, res.stdout


def _curve(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    train_loss, eval_loss = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val" in r:
            eval_loss[r["step"]] = r["val"]["loss"]
        elif "test" in r:
            continue
        elif "loss" in r:
            train_loss[r["step"]] = r["loss"]
    return train_loss, eval_loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, data and recipe, plus single-process references of 3 and 6 steps."""
    root = tmp_path_factory.mktemp("dist")
    model_dir, data = _make_model_and_data(root)
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=model_dir, data=data, out=root / "runs" / "ref6"))
    _train_here(recipe, [])
    _train_here(recipe, [f"output.dir={root / 'runs' / 'ref3'}", "train.max_steps=3"])
    ref_train, ref_eval = _curve(root / "runs" / "ref6")
    assert len(ref_train) == 6 and set(ref_eval) == {3, 6}
    return {"root": root, "recipe": recipe, "ref_train": ref_train, "ref_eval": ref_eval}


def _assert_curve(run: Path, setup: dict, steps: range) -> None:
    tr, ev = _curve(run)
    for s in steps:
        assert abs(tr[s] - setup["ref_train"][s]) < TOL, (s, tr[s], setup["ref_train"][s])
    for s in ev:
        assert abs(ev[s] - setup["ref_eval"][s]) < TOL, (s, ev[s], setup["ref_eval"][s])


@pytest.mark.slow
@pytest.mark.ranks
def test_ddp_two_ranks_follow_one_rank_then_resume_on_one_rank(setup):
    root, recipe = setup["root"], setup["recipe"]
    run = root / "runs" / "ddp"
    _launch(recipe, [f"output.dir={run}", "train.batch_size=4", "train.max_steps=3"])
    _assert_curve(run, setup, range(1, 4))
    state = read_trainer_state(run / "last")
    assert state.world == 2 and state.position.step == 3
    # Only rank 0 wrote: one metrics line per step, and the same adapter format as one process.
    assert len(_curve(run)[0]) == 3
    assert_same_adapter(root / "runs" / "ref3" / "last", run / "last")

    # The same run goes on in a single process with batch 8: it picks up at example 24 of the
    # epoch with the saved AdamW moments, so steps 4..6 are those of the uninterrupted run.
    _train_here(recipe, [f"output.dir={run}", "train.max_steps=6"], resume=True)
    _assert_curve(run, setup, range(1, 7))
    assert_same_adapter(root / "runs" / "ref6" / "last", run / "last")


@pytest.mark.slow
@pytest.mark.ranks
def test_fsdp_resumes_a_one_rank_run_on_two_ranks(setup):
    root, recipe = setup["root"], setup["recipe"]
    run = root / "runs" / "fsdp"
    shutil.copytree(root / "runs" / "ref3", run)
    _launch(recipe, [f"output.dir={run}", "train.batch_size=4", "train.distributed=fsdp"], resume=True)
    _assert_curve(run, setup, range(1, 7))
    state = read_trainer_state(run / "last")
    assert state.world == 2 and state.position.step == 6
    # Optimizer state is saved as full tensors keyed by name, whatever the sharding was.
    ref_state = read_trainer_state(root / "runs" / "ref6" / "last")
    assert set(state.optimizer["state"]) == set(ref_state.optimizer["state"])
    for name, st in state.optimizer["state"].items():
        ref_avg = ref_state.optimizer["state"][name]["exp_avg"]
        assert type(st["exp_avg"]) is torch.Tensor and st["exp_avg"].shape == ref_avg.shape, name
        assert torch.allclose(st["exp_avg"], ref_avg, atol=1e-5), name
    assert_same_adapter(root / "runs" / "ref6" / "last", run / "last")


# ---------------------------------------------------------------------------------- no processes


def test_check_setup_rules():
    from peftcli.models.quant import QuantizationUnavailable
    from peftcli.training.distributed import check_setup

    assert check_setup("fsdp", 1, "none") == "none"
    assert check_setup("none", 2, "none") == "ddp"  # torchrun without a choice: DDP, not N copies
    assert check_setup("fsdp", 2, "none") == "fsdp"
    assert check_setup("ddp", 2, "nf4") == "ddp"
    with pytest.raises(QuantizationUnavailable, match="fsdp"):
        check_setup("fsdp", 2, "nf4")


def test_launcher_keeps_the_recipes_mode(tmp_path):
    from peftcli.training.launch import torchrun_command

    cmd = torchrun_command(Path("r.yaml"), ["train.lr=1e-3"], 2, mode="fsdp", resume=True, smoke=False)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[-2:] == ["train.distributed=fsdp", "--resume"]
    cmd = torchrun_command(Path("r.yaml"), ["train.distributed=ddp"], 2, mode="fsdp", resume=False, smoke=True)
    assert "train.distributed=fsdp" not in cmd and cmd[-1] == "--smoke"


def test_resume_position_is_in_examples_not_batches():
    from peftcli.training.distributed import micro_in_epoch

    # 3 batches × 4 × 2 ranks = 24 examples = 3 batches of 8 on one rank
    assert micro_in_epoch(3, 4, 2, batch_size=8) == 3
    assert micro_in_epoch(5, 8, 1, batch_size=8) == 5
