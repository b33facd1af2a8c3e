"""Memory-frugal training: optimizers (`train.optimizer`), GaLore, LISA, the sparse method and the
one `layers` option; each resumes exactly and each state size matches its closed form."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import batch, tiny_model, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.methods import get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.targets import parse_layers
from peftcli.training.optim import BNB_OPTIMIZERS, bnb_cpu_problem, state_bytes, state_bytes_estimate

runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _recipe(path: Path, model_dir, csv, method: dict, **train) -> str:
    t = {"max_steps": 4, "batch_size": 8, "lr": 5e-3, "progress": False, "log_every": 1, "eval_every": 2,
         "warmup_ratio": 0.0, "scheduler": "constant", **train}
    return write_recipe(
        path / "r.yaml", model={"name": str(model_dir)},
        data={"source": str(csv), "text_column": "sentence", "eval_size": 12, "max_length": 32},
        method=method, train=t, output={"dir": str(path / "run"), "plot": False},
    )


# ------------------------------------------------------------------------------- GaLore by hand


def test_galore_step_matches_the_formula():
    m = tiny_model("llama")
    spec = get_method("galore")
    cfg = spec.config_cls(rank=3, update_interval=5, scale=0.5, targets=["q", "ffn_in"], others="adamw")
    arch, _ = attach_method(m, "galore", cfg)
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    opt = spec.optimizer(m, arch, cfg, SimpleNamespace(lr=lr, weight_decay=wd))
    q = arch.get(0, "q").weight  # 32 × 32: P on the left
    up = arch.get_all(1, "ffn_in")[0][1].weight  # 64 × 32: m > n, P on the right
    emb = arch.embeddings().weight  # plain AdamW (others: adamw)
    ref = torch.optim.AdamW([emb.detach().clone().requires_grad_(True)], lr=lr, weight_decay=wd)
    m.train()
    moments: dict = {}
    for step in (1, 2):
        loss = m(**batch()).logits.square().mean()
        loss.backward()
        expect = {}
        for w, left in ((q, True), (up, False)):
            g = w.grad.detach().clone()
            if step == 1:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                moments[id(w)] = [u[:, :3] if left else vh[:3].t(), 0.0, 0.0]
            p, mm, vv = moments[id(w)]
            r = p.t() @ g if left else g @ p
            mm = b1 * mm + (1 - b1) * r
            vv = b2 * vv + (1 - b2) * r * r
            moments[id(w)] = [p, mm, vv]
            n = (mm / (1 - b1**step)) / ((vv / (1 - b2**step)).sqrt() + eps)
            delta = cfg.scale * (p @ n if left else n @ p.t())
            expect[id(w)] = w.detach() * (1 - lr * wd) - lr * delta
        ref.param_groups[0]["params"][0].grad = emb.grad.detach().clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        for w in (q, up):
            torch.testing.assert_close(w.detach(), expect[id(w)], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb.detach(), ref.param_groups[0]["params"][0].detach(), rtol=0, atol=0)
    st = opt.state[q]
    assert st["exp_avg"].shape == (3, 32) and st["proj"].shape == (32, 3)
    assert opt.state[up]["exp_avg"].shape == (64, 3) and opt.state[up]["proj"].shape == (32, 3)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_galore_basis_is_the_svds_top_singular_vectors(shape):
    """The basis comes from an eigensolver on G Gᵀ (or Gᵀ G): the same vectors as the SVD's, up to
    each one's sign, which is fixed so that its largest entry is positive."""
    from peftcli.methods.galore import GaLoreAdamW

    gen = torch.Generator().manual_seed(0)
    m, n = shape
    k = min(m, n)
    # a decaying spectrum, as gradients have: singular values from 1 down to 1e-3
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    g = (u * torch.logspace(0, -3, k)) @ v.t()
    p = GaLoreAdamW._basis(g, 8)
    su, _, svh = torch.linalg.svd(g, full_matrices=False)
    ref = su[:, :8] if m <= n else svh[:8].t()
    signs = torch.sign((p * ref).sum(0))
    torch.testing.assert_close(p, ref * signs, rtol=0, atol=1e-5)
    peaks = p[p.abs().argmax(dim=0), torch.arange(8)]
    assert (peaks > 0).all()


def test_galore_state_matches_its_closed_form_and_others_frozen_saves_only_targets():
    m = tiny_model("llama")
    spec = get_method("galore")
    cfg = spec.config_cls(rank=4)
    arch, _ = attach_method(m, "galore", cfg)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".weight") and ".layers." in n or n.startswith("score.") for n in trainable)
    opt = spec.optimizer(m, arch, cfg, SimpleNamespace(lr=1e-3, weight_decay=0.0))
    m(**batch()).logits.square().mean().backward()
    opt.step()
    scalars = 4 * len(opt.state)  # one float32 `step` per tensor
    assert state_bytes(opt) - scalars == 4 * sum(spec.optimizer_state(m, arch, cfg).values())


# ------------------------------------------------------------------------------- exact resume


RESUME_CASES = [
    ("adamw", {"name": "lora", "r": 4}, {}),
    ("adafactor", {"name": "lora", "r": 4}, {"optimizer": "adafactor", "lr": 1e-2}),
    ("sgd", {"name": "lora", "r": 4}, {"optimizer": "sgd", "momentum": 0.9, "lr": 5e-2}),
    ("galore", {"name": "galore", "rank": 4, "update_interval": 3, "others": "adamw"}, {"lr": 1e-3}),
    ("lisa", {"name": "full"}, {"lisa_layers": 1, "lisa_interval": 3, "lr": 1e-3}),
    ("sparse", {"name": "sparse", "density": 0.05, "calibration_batches": 2}, {}),
    # full: the word embeddings are large enough for 8-bit state, the rest keeps 32-bit state
    ("adamw_8bit", {"name": "full"}, {"optimizer": "adamw_8bit", "lr": 1e-3}),
    ("paged_adamw", {"name": "full"}, {"optimizer": "paged_adamw", "lr": 1e-3}),
    ("paged_adamw_8bit", {"name": "full"}, {"optimizer": "paged_adamw_8bit", "lr": 1e-3}),
]


@pytest.mark.slow
@pytest.mark.parametrize("label,method,train", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_is_exact(label, method, train, tiny_bert_dir, tiny_csv, tmp_path):
    if train.get("optimizer") in BNB_OPTIMIZERS and not torch.cuda.is_available():
        if (problem := bnb_cpu_problem()) is not None:
            pytest.skip(f"no CUDA, and {problem}")
    whole, half = tmp_path / "whole", tmp_path / "half"
    whole.mkdir()
    half.mkdir()
    res = invoke("train", _recipe(whole, tiny_bert_dir, tiny_csv, method, **train))
    assert res.exit_code == 0, res.output
    rec = _recipe(half, tiny_bert_dir, tiny_csv, method, **{**train, "max_steps": 2})
    assert invoke("train", rec).exit_code == 0
    state = (half / "run" / "last" / "trainer_state.safetensors")
    assert any(k.startswith("opt/") for k in load_file(str(state)))
    res = invoke("train", rec, "train.max_steps=4", "--resume")
    assert res.exit_code == 0, res.output
    a = load_file(str(whole / "run" / "last" / "adapter.safetensors"))
    b = load_file(str(half / "run" / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    if label == "sparse":  # indices + values, nothing else of the layers
        assert any(k.endswith("sparse_index") for k in a)
        assert all(k.endswith(("sparse_index", "sparse_values")) or k.startswith("classifier.") for k in a)
    if label == "galore":
        opt = load_file(str(whole / "run" / "last" / "trainer_state.safetensors"))
        assert any(k.endswith("/proj") for k in opt)
    if label.endswith("8bit"):  # uint8 moments and their block scales went through the checkpoint
        opt = load_file(str(state))
        assert opt["opt/bert.embeddings.word_embeddings.weight/state1"].dtype == torch.uint8
        assert any(k.endswith("/absmax2") for k in opt)


def test_galore_refuses_another_optimizer(tiny_bert_dir, tiny_csv, tmp_path):
    res = invoke("train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "galore"}, optimizer="adafactor"))
    assert res.exit_code == 2 and "train.optimizer adafactor" in res.output and "adamw" in res.output


def test_lisa_is_refused_for_adapters(tiny_bert_dir, tiny_csv, tmp_path):
    res = invoke("validate", _recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "lora"}, lisa_layers=1))
    assert res.exit_code == 2 and "train.lisa_layers" in res.output and "method.name: full" in res.output


def test_metrics_log_the_learning_rate_each_step_applied(tiny_bert_dir, tiny_csv, tmp_path):
    """The log read the schedule after it had moved on: warm-up looked a step ahead and a linear
    run's last step showed lr 0."""
    import json

    res = invoke("train", _recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "lora", "r": 2}, lr=1e-3,
                                  scheduler="linear", warmup_ratio=1.0))
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 10) for r in lines if "loss" in r and "lr" in r] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]


def test_compile_on_cpu_says_it_trains_eager(tiny_bert_dir, tiny_csv, tmp_path):
    from rich.console import Console

    from peftcli.config.recipe import load_recipe
    from peftcli.training.loop import _refuse_what_this_run_cannot_do

    console = Console(record=True, width=200)
    rec = load_recipe(_recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "lora"}, compile=True))
    _refuse_what_this_run_cannot_do(rec, torch.device("cpu"), 1, 0, console)
    assert "train.compile compiles on CUDA only; training eager on cpu" in console.export_text()


# ------------------------------------------------------------------------------- LISA


def test_lisa_trains_drawn_layers_and_keeps_state_only_for_them(tiny_bert_dir, tiny_csv, tmp_path):
    from peftcli.config.recipe import load_recipe
    from peftcli.training.loop import set_up, train_step

    rec = load_recipe(_recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "full"}, lisa_layers=1, lisa_interval=2))
    s, pos, _ = set_up(rec, resume=False, smoke=False, console=None)
    groups = [s.collate(s.train_ex[i * 8:(i + 1) * 8]) for i in range(4)]
    draws = []
    for step, g in enumerate(groups):
        pos.step = step
        train_step(s, [g], pos)
        draws.append(tuple(s.lisa_active))
        layer_params = {id(p): i for i, layer in enumerate(s.arch.layers) for p in layer.parameters()}
        with_state = {layer_params[id(p)] for p in s.optimizer.state if id(p) in layer_params}
        assert with_state == set(s.lisa_active)
        assert s.arch.embeddings().weight in s.optimizer.state  # embeddings always train
    assert draws[0] == draws[1] and draws[2] == draws[3]  # re-drawn every lisa_interval steps


# ------------------------------------------------------------------------------- sparse


def test_sparse_keeps_the_top_entries_by_squared_gradient_and_merges():
    m = tiny_model("bert")
    spec = get_method("sparse")
    cfg = spec.config_cls(density=0.1, calibration_batches=2, targets=["q"])
    arch, _ = attach_method(m, "sparse", cfg)
    mod = arch.get(0, "q")
    w = mod.base.weight
    score = torch.zeros(w.numel())
    for i in range(2):
        w.requires_grad_(True)
        g, = torch.autograd.grad(m(**batch(seed=i)).logits.square().mean(), [w])
        w.requires_grad_(False)
        score += g.reshape(-1).square()

    def losses():
        for i in range(5):
            yield m(**batch(seed=i)).logits.square().mean()

    spec.calibrate(m, arch, cfg, losses())
    k = round(0.1 * w.numel())
    assert mod.sparse_index.numel() == k
    assert set(mod.sparse_index.tolist()) == set(torch.topk(score, k).indices.tolist())
    with torch.no_grad():
        mod.sparse_values.normal_()
    b = batch()
    before = m(**b).logits
    # only the masked entries receive a gradient, and the optimizer state is k numbers
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    m(**b).logits.square().mean().backward()
    opt.step()
    assert opt.state[mod.sparse_values]["exp_avg"].numel() == k
    with torch.no_grad():
        before = m(**b).logits
    spec.merge(m, arch, cfg)
    assert type(arch.get(0, "q")).__name__ == "Linear"
    torch.testing.assert_close(m(**b).logits, before)


def test_sparse_count_params(tmp_path, tiny_bert_dir, tiny_csv):
    from peftcli.config.recipe import load_recipe
    from peftcli.training.budget import budget

    rec = _recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "sparse", "density": 0.01})
    res = invoke("count-params", rec)
    assert res.exit_code == 0, res.output
    b = budget(load_recipe(rec))
    # 2 layers × (4 · 32² + 2 · 32·64) weights, 1 % of each (at least one), + the 2-class head
    assert b["closed_form"] == 2 * (4 * 10 + 2 * 20) and b["trainable"] == b["closed_form"] + 32 * 2 + 2
    assert f"trainable: {b['trainable']:,}" in res.output


# ------------------------------------------------------------------------------- layers


def test_layers_have_one_reading():
    assert parse_layers("top:2", 6) == [4, 5]
    assert parse_layers("bottom:2", 6) == [0, 1]
    assert parse_layers("bottom:1,top:1", 6) == [0, 5]
    assert parse_layers("0-2,-1", 6) == [0, 1, 2, 5]
    assert parse_layers([1, 3], 6) == [1, 3] and parse_layers(4, 6) == [4]
    with pytest.raises(ValueError, match="top:9"):
        parse_layers("top:9", 6)


@pytest.mark.parametrize("name,kw", [("lora", {}), ("ia3", {}), ("houlsby", {}), ("krona", {}), ("full", {}),
                                     ("bitfit", {}), ("galore", {"rank": 2}), ("sparse", {}),
                                     ("compacter", {"bottleneck_size": 8})])
def test_every_layered_method_reads_layers_the_same_way(name, kw):
    m = tiny_model("bert")
    arch, _ = attach_method(m, name, get_method(name).config_cls(layers="top:1", **kw))
    trained = {int(n.split(".")[3]) for n, p in m.named_parameters()
               if p.requires_grad and n.startswith(arch.layers_path + ".")}
    assert trained == {1}


def test_leave_out_still_works_with_a_note(tmp_path, tiny_bert_dir, tiny_csv, capsys):
    from peftcli.config.recipe import load_recipe

    rec = load_recipe(_recipe(tmp_path, tiny_bert_dir, tiny_csv, {"name": "houlsby", "leave_out": [0]}))
    assert "method.leave_out is the old spelling" in capsys.readouterr().err
    m = tiny_model("bert")
    arch, _ = attach_method(m, "houlsby", rec.method)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith(arch.layers_path + ".0."))


# ------------------------------------------------------------------------------- count-params


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_estimate_matches_the_real_state(optimizer):
    m = tiny_model("llama")
    arch, _ = attach_method(m, "lora", get_method("lora").config_cls(r=2))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = {"adamw": lambda: torch.optim.AdamW(params), "adafactor": lambda: torch.optim.Adafactor(params),
           "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9)}[optimizer]()
    m(**batch()).logits.square().mean().backward()
    opt.step()
    scalars = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                  if torch.is_tensor(v) and v.ndim == 0)
    est = sum(state_bytes_estimate(tuple(p.shape), 4, optimizer, 0.9) for p in params)
    assert state_bytes(opt) - scalars == est


def test_count_params_knows_the_optimizer(tmp_path):
    import json

    from peftcli.config.recipe import recipe_from_dict
    from peftcli.training.budget import GIB, budget

    cfg = tmp_path / "llama.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
                               "vocab_size": 1000, "max_position_embeddings": 64}))

    def opt_bytes(method: dict, **train) -> float:
        r = recipe_from_dict({"model": {"name": str(cfg), "task": "causal_lm"}, "method": method, "train": train})
        return {row["precision"]: row for row in budget(r)["memory"]}["fp32"]["optimizer_gib"] * GIB

    full = opt_bytes({"name": "full"})
    assert opt_bytes({"name": "full"}, optimizer="paged_adamw") == full  # fp32 weights: the same bytes
    assert opt_bytes({"name": "full"}, optimizer="adamw_8bit") < 0.3 * full
    assert opt_bytes({"name": "full"}, optimizer="adafactor") < 0.05 * full
    assert opt_bytes({"name": "full"}, optimizer="sgd") == 0
    assert opt_bytes({"name": "full"}, lisa_layers=1) < 0.5 * full
    # GaLore rank 16 on every linear of the layers: r·max(m, n) per moment + r·min(m, n) for P
    lin = [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
    expect = 4 * sum(2 * 16 * max(a, b) + 16 * min(a, b) for a, b in lin) * 4
    assert opt_bytes({"name": "galore", "rank": 16}) == expect
