"""Training across machines: two single-process "nodes" on 127.0.0.1 (gloo, CPU), each started by
its own `peftcli train --nproc 1 --nnodes 2 --node-rank K --rdzv-endpoint 127.0.0.1:PORT`, meeting
at torchrun's c10d rendezvous and sharing one run folder (the shared filesystem).

The model is a 2-layer BERT of hidden size 32 with a 21-word vocabulary, and every text tokenizes
to the same length, so two ranks of batch 4 see exactly the inputs of one process of batch 8;
dropout is off and the learning rate constant, so the adapters agree up to float summation order.

Cost: each launch starts two launchers and two ranks that import transformers (tens of seconds on
a loaded 2-core machine), hence `slow`; the flag checks at the end start nothing.
"""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers.adapter_runs import assert_same_adapter
from helpers.processes import kill_tagged, tagged

REPO = Path(__file__).resolve().parents[2]
MARK = "PEFTCLI_TEST_NODES"
LIMIT_S = 300  # one whole launch of two nodes
PROMPT_S = 60  # from the failing node's exit to the other node's
GOOD = ["good", "great", "fine", "nice", "happy", "love"]
BAD = ["bad", "awful", "sad", "hate", "poor", "ugly"]
NEUTRAL = ["the", "a", "movie", "food", "day", "it", "was", "is", "this"]
RECIPE = """\
model: {{name: {model}, task: classification}}
data: {{source: {data}, eval_size: 16, max_length: 16}}
method: {{name: lora, r: 4, alpha: 8, targets: [q, v]}}
train: {{max_steps: 3, batch_size: 8, lr: 1.0e-2, warmup_ratio: 0.0, scheduler: constant, log_every: 1,
         eval_every: 3, device: cpu, num_threads: 1, progress: false}}
output: {{dir: {out}, overwrite: true, plot: false}}
"""


def _make_model_and_data(root: Path) -> tuple[Path, Path]:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = GOOD + BAD + NEUTRAL
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    model_dir = root / "model"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for i in range(80):
        ws = [rng.choice(NEUTRAL) for _ in range(5)] + [rng.choice(GOOD if i % 2 == 0 else BAD)]
        rng.shuffle(ws)
        rows.append((" ".join(ws), "pos" if i % 2 == 0 else "neg"))
    data = root / "data.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return model_dir, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]






def _two_nodes(recipe: Path, overrides: list[str], *, node_env: tuple[dict, dict] = ({}, {}),
               node_overrides: tuple[list, list] = ([], []), resume: bool = False) -> list[dict]:
    """Start node 0 and node 1 as two launchers; wait for both; return each one's status, output and end time."""
    tag, port = uuid.uuid4().hex, _free_port()
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PEFTCLI_DIST_TIMEOUT",
                         "PEFTCLI_RAISE_AT", "PEFTCLI_RAISE_AS", "PEFTCLI_KILL_AT")}
    base.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **{MARK: tag})
    procs = []
    for k in (0, 1):
        cmd = [sys.executable, "-m", "peftcli.cli", "train", str(recipe), *overrides, *node_overrides[k],
               "--nproc", "1", "--nnodes", "2", "--node-rank", str(k), "--rdzv-endpoint", f"127.0.0.1:{port}",
               *(["--resume"] if resume else [])]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**base, **node_env[k]}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=LIMIT_S)
            out.append({"status": p.returncode, "text": text, "ended": time.monotonic()})
    except subprocess.TimeoutExpired:
        kill_tagged(MARK, tag)
        pytest.fail(f"two nodes still running after {LIMIT_S} s")
    finally:
        survivors = tagged(MARK, tag)
        kill_tagged(MARK, tag)  # never left to the next test
    assert survivors == [], survivors
    return out


def _train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "val" not in r and "test" not in r}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, data and recipe, and the one-process run of 3 steps at batch 8."""
    from peftcli.config.recipe import load_recipe
    from peftcli.training.loop import train

    root = tmp_path_factory.mktemp("nodes")
    model_dir, data = _make_model_and_data(root)
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=model_dir, data=data, out=root / "runs" / "one"))
    train(load_recipe(recipe, []))
    return {"root": root, "recipe": recipe}


@pytest.mark.slow
@pytest.mark.ranks
def test_two_nodes_train_the_adapter_of_one_process_and_resume_refuses_an_unshared_folder(setup):
    root, recipe = setup["root"], setup["recipe"]
    run = root / "runs" / "two-nodes"
    nodes = _two_nodes(recipe, [f"output.dir={run}", "train.batch_size=4"])
    for n in nodes:
        assert n["status"] == 0, n["text"][-5000:]
    # Global rank 0 alone wrote the run and reported it: once across both nodes.
    assert sum(n["text"].count("run saved to") for n in nodes) == 1, [n["text"][-2000:] for n in nodes]
    ref = root / "runs" / "one"
    assert_same_adapter(ref / "adapter", run / "adapter", meta=False)
    assert_same_adapter(ref / "last", run / "last", meta=False)
    one, two = _train_losses(ref), _train_losses(run)
    assert set(one) == set(two) == {1, 2, 3}
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    assert not [p.name for p in run.iterdir() if ".peftcli-tmp-" in p.name]  # the probe is gone

    # Node 1 with a run folder of its own (an empty one at its path: not the shared one): both
    # nodes refuse --resume with exit 2 and say why, before any model is loaded.
    elsewhere = root / "runs" / "node1-local"
    res = _two_nodes(recipe, [f"output.dir={run}", "train.batch_size=4", "train.max_steps=6"],
                     node_overrides=([], [f"output.dir={elsewhere}"]), resume=True)
    for n in res:
        assert n["status"] == 2, n["text"][-5000:]
        assert "must be on a filesystem every node shares" in n["text"], n["text"][-3000:]
    assert "no run (no recipe.yaml)" in res[0]["text"]
    assert _train_losses(run) == two  # nothing was trained or trimmed


@pytest.mark.slow
@pytest.mark.ranks
def test_a_failing_node_stops_the_other(setup):
    root, recipe = setup["root"], setup["recipe"]
    # Node 1's rank fails at its 2nd loss all-reduce (step 2); node 0's rank waits in that all-reduce.
    res = _two_nodes(recipe, [f"output.dir={root / 'runs' / 'fail'}", "train.batch_size=4"],
                     node_env=({}, {"PEFTCLI_RAISE_AT": "dist:all-reduce:2"}))
    assert res[1]["status"] == 1, res[1]["text"][-5000:]
    assert "injected failure at dist:all-reduce (pass 2" in res[1]["text"]
    assert res[0]["status"] != 0, res[0]["text"][-5000:]
    assert abs(res[0]["ended"] - res[1]["ended"]) < PROMPT_S
    assert not any("run saved to" in n["text"] for n in res)


# ---------------------------------------------------------------------------------- no processes


@pytest.mark.parametrize(("flags", "needle"), [
    ((2, 2, "h:29500"), "--node-rank 2: expected 0 to 1"),
    ((2, -1, "h:29500"), "--node-rank -1"),
    ((2, 0, None), "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    ((2, 1, "node0"), "expected HOST:PORT"),
    ((2, 1, "node0:99999"), "expected HOST:PORT"),
    ((2, 1, ":29500"), "expected HOST:PORT"),
    ((1, 0, "h:29500"), "--rdzv-endpoint is for a launch across machines"),
    ((0, 0, None), "--nnodes 0"),
])
def test_node_flags_refused(flags, needle):
    from peftcli.core.errors import BadInput
    from peftcli.training.launch import check_nodes

    with pytest.raises(BadInput, match=None) as e:
        check_nodes(*flags)
    assert needle in str(e.value)


def test_node_flags_accepted_and_torchrun_command():
    from peftcli.training.launch import Nodes, check_nodes, torchrun_command

    assert check_nodes(1, 0, None) == Nodes()
    assert check_nodes(4, 3, "[fe80::1]:29500") == Nodes(4, 3, "[fe80::1]:29500")
    assert "--standalone" in torchrun_command(Path("r.yaml"), [], 2, mode="ddp", resume=False, smoke=False)
    cmd = torchrun_command(Path("r.yaml"), [], 2, mode="ddp", resume=True, smoke=False,
                           nodes=check_nodes(2, 1, "10.0.0.1:29500"))
    assert "--standalone" not in cmd
    for arg in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-conf=is_host=0",
                "--nproc_per_node=2", "--resume"):
        assert arg in cmd, cmd
    assert "--rdzv-conf=is_host=1" in torchrun_command(Path("r.yaml"), [], 1, mode="ddp", resume=False, smoke=False,
                                                       nodes=check_nodes(2, 0, "h:1"))


def test_cli_refuses_bad_node_flags_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from peftcli.cli import app

    res = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml"), "--nnodes", "2", "--node-rank", "1"])
    assert res.exit_code == 2, res.output
    assert "--rdzv-endpoint" in res.output


@pytest.mark.slow
@pytest.mark.ranks
def test_a_fresh_run_refuses_a_node_that_does_not_see_the_run_folder(setup):
    """Without --resume the refusal comes once rank 0 has opened the folder, not at the run's end."""
    root, recipe = setup["root"], setup["recipe"]
    run, elsewhere = root / "runs" / "fresh", root / "runs" / "fresh-node1"
    res = _two_nodes(recipe, [f"output.dir={run}", "train.batch_size=4"],
                     node_overrides=([], [f"output.dir={elsewhere}"]))
    for n in res:
        assert n["status"] == 2, n["text"][-5000:]
        assert "finds no such run folder" in n["text"] and "every node shares" in n["text"], n["text"][-3000:]
    assert "step 1:" not in res[0]["text"]  # refused before training
    # Rank 0 removed its probe. Under c10d rendezvous torchrun numbers the ranks, so rank 0 may be on
    # either node: its probe was in that node's output.dir (a folder the refused run may not leave).
    for folder in (run, elsewhere):
        assert not [p.name for p in folder.iterdir() if ".peftcli-tmp-" in p.name] if folder.is_dir() else True
