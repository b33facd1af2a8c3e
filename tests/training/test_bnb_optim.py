"""bitsandbytes' optimizers (`adamw_8bit`, `paged_adamw`, `paged_adamw_8bit`) off CUDA: they run
on CPU where bitsandbytes has CPU kernels, refuse with exit 2 where it has none, keep their state
bit-exactly through a checkpoint, and cost what `count-params` says they cost."""

from __future__ import annotations

import importlib.util
import json
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.training import optim

BNB = ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
runner = CliRunner()


def bnb_on_cpu() -> None:
    """Skip unless bitsandbytes steps on CPU here (imported the way peftcli imports it, quietly)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    if (problem := optim.bnb_cpu_problem()) is not None:
        pytest.skip(f"no CPU path here: {problem}")


def _recipe(path: Path, model_dir, csv, optimizer: str, **train) -> str:
    t = {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False, "log_every": 1, "eval_every": 2,
         "warmup_ratio": 0.0, "scheduler": "constant", "optimizer": optimizer, **train}
    return write_recipe(
        path / "r.yaml", model={"name": str(model_dir)},
        data={"source": str(csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method={"name": "full"}, train=t, output={"dir": str(path / "run"), "plot": False},
    )


# ------------------------------------------------------------------------------- where they run


@pytest.mark.parametrize("name", BNB)
def test_without_bitsandbytes_exit_2_names_the_install(name, tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    real = optim.importlib.util.find_spec
    monkeypatch.setattr(optim.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    res = runner.invoke(app, ["train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, name)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert f"train.optimizer {name} needs bitsandbytes, which is not installed" in out
    assert "pip install 'bitsandbytes>=0.50'" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", BNB)
def test_bitsandbytes_without_a_cpu_path_exit_2_names_the_limit(name, tiny_bert_dir, tiny_csv, tmp_path,
                                                                monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: train.device auto picks it")
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    monkeypatch.setattr(optim, "bnb_cpu_problem", lambda: "bitsandbytes 0.44.1 has none (RuntimeError: no kernel)")
    res = runner.invoke(app, ["train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, name)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert f"train.optimizer {name} on CPU needs bitsandbytes' CPU optimizer kernels" in out
    assert "bitsandbytes 0.44.1 has none" in out and "pip install 'bitsandbytes>=0.50'" in out
    assert not (tmp_path / "run").exists()


def test_other_devices_are_refused_by_name():
    with pytest.raises(optim.OptimizerUnavailable, match="run on CUDA or CPU, not on mps"):
        optim.check_optimizer("adamw_8bit", torch.device("mps"))


@pytest.mark.parametrize("name", BNB)
def test_runs_on_cpu_and_paged_ones_say_they_page_nothing(name, tiny_bert_dir, tiny_csv, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: train.device auto picks it")
    bnb_on_cpu()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = runner.invoke(app, ["train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, name)])
    assert res.exit_code == 0, res.output
    note = "paging is a CUDA unified-memory feature"
    assert res.output.count(note) == (1 if name.startswith("paged_") else 0), res.output
    assert not any("Paged optimizers" in str(w.message) for w in caught)
    assert "Paged optimizers" not in res.output and "kernels-community" not in res.output


# ------------------------------------------------------------------------------- state round trip


def _model_and_optimizer(name: str, seed: int = 0):
    """A model whose largest weight gets 8-bit state and whose small ones keep 32-bit state."""
    from peftcli.training.optim import build_optimizer

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 32), torch.nn.Linear(32, 8))
    tcfg = SimpleNamespace(optimizer=name, lr=1e-2, weight_decay=0.01, momentum=0.0)
    spec = SimpleNamespace(name="full", optimizer=None)
    return model, build_optimizer(model, model, spec, None, None, tcfg, torch.device("cpu"))


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (4, 9), generator=g)
    model(ids).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", BNB)
def test_state_round_trips_bit_exactly_and_shares_the_code_books(name, tmp_path):
    from peftcli.runs.state import Position, read_trainer_state, trainer_state, write_trainer_state
    from peftcli.training.distributed import load_optimizer_state, optimizer_state

    bnb_on_cpu()
    model, opt = _model_and_optimizer(name)
    for s in range(3):
        _step(model, opt, s)
    js, tensors = trainer_state(Position(step=3), optimizer=optimizer_state(opt, model), scheduler={}, scaler=None,
                                drop_rng=random.Random(0), world=1, batch_size=4)
    write_trainer_state(tmp_path, js, tensors)
    if name in optim.BNB_8BIT:
        emb = opt.state[model[0].weight]
        assert emb["state1"].dtype == torch.uint8 and emb["absmax1"].dtype == torch.float32
        assert sum(k.endswith("/qmap1") for k in tensors) == 1  # one code book, written once
    saved = read_trainer_state(tmp_path)
    json.dumps(saved.optimizer["param_groups"])  # plain data: no pickled settings

    model2, opt2 = _model_and_optimizer(name, seed=1)
    model2.load_state_dict(model.state_dict())
    load_optimizer_state(opt2, model2, saved.optimizer)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        a, b = opt.state[p], opt2.state[p2]
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k] and type(a[k]) is type(b[k]), k
    for g, g2 in zip(opt.param_groups, opt2.param_groups, strict=True):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in g2.items() if k != "params"}
    assert optim.state_bytes(opt2) == optim.state_bytes(opt)  # the code books are shared again
    for s in (3, 4):
        _step(model, opt, s)
        _step(model2, opt2, s)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


# ------------------------------------------------------------------------------- what count-params says


@pytest.mark.parametrize("name", ["adamw", *BNB])
def test_count_params_gives_the_bytes_the_optimizer_holds(name, tmp_path):
    """The estimate is the measured state to the byte (fp32 weights), scalars `step` aside."""
    from peftcli.config.recipe import recipe_from_dict
    from peftcli.methods.attach import attach_method
    from peftcli.models.loading import auto_class, load_config
    from peftcli.training.budget import GIB, budget
    from peftcli.training.optim import build_optimizer, state_bytes

    if name != "adamw":
        bnb_on_cpu()
    cfg = tmp_path / "llama.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 160,
                               "vocab_size": 200, "max_position_embeddings": 64, "tie_word_embeddings": True}))
    r = recipe_from_dict({"model": {"name": str(cfg), "task": "causal_lm"}, "method": {"name": "full"},
                          "train": {"optimizer": name}})
    estimate = {row["precision"]: row for row in budget(r)["memory"]}["fp32"]["optimizer_gib"] * GIB

    torch.manual_seed(0)
    model = auto_class("causal_lm").from_config(load_config(str(cfg)))
    arch, spec = attach_method(model, "full", r.method)
    opt = build_optimizer(model, model, spec, arch, r.method, r.train, torch.device("cpu"))
    ids = torch.randint(0, 200, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert len(opt.state) == sum(1 for p in model.parameters() if p.requires_grad)
    scalars = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                  if torch.is_tensor(v) and v.ndim == 0)
    assert state_bytes(opt) - scalars == estimate
    if name in optim.BNB_8BIT:  # some 8-bit state and some 32-bit state, both counted
        dtypes = {st["state1"].dtype for st in opt.state.values()}
        assert dtypes == {torch.uint8, torch.float32}
