"""Budgeting (count-params: parameters and training memory per precision) and QLoRA.

Memory figures are checked against closed forms written out here from the shapes of a Llama
config; the 70B count against the exact parameter formula. QLoRA needs CUDA to train, so on a
machine without it the tests check the refusal; the pieces that bitsandbytes can run on CPU
(a 4-bit load, LoRA on a 4-bit layer, de-quantizing merge) run when bitsandbytes is installed.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from peftcli.config.recipe import recipe_from_dict
from peftcli.training.budget import GIB, NF4_BITS, budget

H, L, HEADS, KV, INTER, VOCAB = 32, 2, 4, 2, 64, 100


def _llama_json(path, **kw) -> str:
    cfg = {"model_type": "llama", "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "intermediate_size": INTER, "vocab_size": VOCAB,
           "tie_word_embeddings": False, "max_position_embeddings": 64}
    cfg.update(kw)
    path.write_text(json.dumps(cfg))
    return str(path)


def _recipe(model: str, method: dict, task: str = "causal_lm"):
    return recipe_from_dict({"model": {"name": model, "task": task}, "method": method}, "test")


def _base_params(h, layers, heads, kv, inter, vocab) -> tuple[int, int]:
    """(total, linear weights inside the layers) of a Llama with an untied LM head."""
    kvd = kv * (h // heads)
    per_layer_linear = 2 * h * h + 2 * h * kvd + 3 * h * inter  # q, o; k, v; gate, up, down
    total = 2 * vocab * h + layers * (per_layer_linear + 2 * h) + h  # embed + head; 2 norms/layer; final norm
    return total, layers * per_layer_linear


def test_memory_matches_closed_forms(tmp_path):
    r = 4
    b = budget(_recipe(_llama_json(tmp_path / "c.json"), {"name": "lora", "r": r, "targets": ["q", "v"]}),
               batch_size=2, seq_len=8)
    base, linear = _base_params(H, L, HEADS, KV, INTER, VOCAB)
    kvd = KV * (H // HEADS)
    trainable = L * r * ((H + H) + (H + kvd))  # A [r, in] + B [out, r] on q and v
    assert b["trainable"] == trainable
    assert b["total"] == base + trainable
    assert b["quantizable"] == linear  # every layer linear; embeddings, norms and lm_head stay dense
    frozen = base
    rows = {m["precision"]: m for m in b["memory"]}
    assert list(rows) == ["fp32", "bf16 mixed", "nf4 QLoRA"]
    expect = {
        "fp32": (frozen * 4 + trainable * 4, trainable * 4, trainable * 8),
        "bf16 mixed": (frozen * 2 + trainable * 2, trainable * 2, trainable * 4),
        "nf4 QLoRA": (linear * NF4_BITS / 8 + (frozen - linear) * 2 + trainable * 2, trainable * 2, trainable * 4),
    }
    for name, (w, g, o) in expect.items():
        m = rows[name]
        assert m["weights_gib"] * GIB == pytest.approx(w, rel=1e-12)
        assert m["grads_gib"] * GIB == pytest.approx(g, rel=1e-12)
        assert m["optimizer_gib"] * GIB == pytest.approx(o, rel=1e-12)
        assert m["total_gib"] * GIB == pytest.approx(w + g + o, rel=1e-12)
    # activations: 34 bytes per token, layer and hidden unit in 16 bits, twice that in fp32
    assert rows["bf16 mixed"]["activations_gib"] * GIB == 34 * 2 * 8 * H * L
    assert rows["fp32"]["activations_gib"] == 2 * rows["bf16 mixed"]["activations_gib"]
    assert NF4_BITS == pytest.approx(4.127, abs=1e-3)  # the QLoRA paper's figure


def test_full_and_bitfit_have_no_qlora_row(tmp_path):
    cfg = _llama_json(tmp_path / "c.json")
    base, _ = _base_params(H, L, HEADS, KV, INTER, VOCAB)
    b = budget(_recipe(cfg, {"name": "full"}))
    rows = {m["precision"]: m for m in b["memory"]}
    assert list(rows) == ["fp32", "bf16 mixed"]
    assert rows["fp32"]["total_gib"] * GIB == pytest.approx(16 * base)  # weight + grad + 2 moments
    assert rows["bf16 mixed"]["total_gib"] * GIB == pytest.approx(8 * base)
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": H, "num_hidden_layers": L,
                                "num_attention_heads": HEADS, "intermediate_size": INTER, "vocab_size": VOCAB}))
    b = budget(_recipe(str(bert), {"name": "bitfit"}, task="classification"))
    assert [m["precision"] for m in b["memory"]] == ["fp32", "bf16 mixed"]


def test_classification_head_stays_dense_and_trainable(tmp_path):
    b = budget(_recipe(_llama_json(tmp_path / "c.json"), {"name": "lora", "r": 2}, task="classification"))
    _, linear = _base_params(H, L, HEADS, KV, INTER, VOCAB)
    assert b["quantizable"] == linear  # the score head (trainable) is not counted as 4-bit


@pytest.mark.slow
def test_a_built_in_sources_classes_size_the_counted_head():
    """tweets has three classes: the count matches the model training builds (it counted two)."""
    from pathlib import Path

    from peftcli.config.recipe import load_recipe
    from peftcli.methods.attach import pick_device, trainable_summary
    from peftcli.runs.load import build

    r = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tweets_lora.yaml")
    built = build(r, pick_device("cpu"), label_names=["negative", "neutral", "positive"])
    assert budget(r)["trainable"] == trainable_summary(built.model)["trainable"]


def test_llama3_70b_on_meta_in_seconds(tmp_path):
    cfg = _llama_json(tmp_path / "70b.json", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192)
    budget(_recipe(_llama_json(tmp_path / "warm.json"), {"name": "lora"}))  # imports out of the timing
    t = time.perf_counter()
    b = budget(_recipe(cfg, {"name": "lora", "r": 16, "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}))
    elapsed = time.perf_counter() - t
    base, linear = _base_params(8192, 80, 64, 8, 28672, 128256)
    assert base == 70_553_706_496  # "70B": 70.55 billion with untied embeddings
    lora = 80 * 16 * ((8192 + 8192) * 2 + (8192 + 1024) * 2 + (8192 + 28672) * 3)
    assert b["total"] == base + lora and b["trainable"] == lora
    assert b["quantizable"] == linear
    rows = {m["precision"]: m for m in b["memory"]}
    assert 130 < rows["bf16 mixed"]["weights_gib"] < 133  # 2 bytes × 70.55 B
    assert 35 < rows["nf4 QLoRA"]["weights_gib"] < 39  # 4.127 bits × 68.45 B + bf16 embeddings and head
    assert elapsed < 60, f"meta build took {elapsed:.1f} s"  # a few seconds on an idle 2-core machine


def test_count_params_cli_prints_memory_table(tmp_path):
    from peftcli.cli import app

    res = CliRunner().invoke(app, ["count-params", _llama_json(tmp_path / "c.json"), "--method", "lora",
                                   "--batch-size", "4", "--seq-len", "128"])
    assert res.exit_code == 0, res.output
    for word in ("fp32", "bf16 mixed", "nf4 QLoRA", "activations"):
        assert word in res.output


# ------------------------------------------------------------------------------------------ QLoRA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("extra", [[], ["--nproc", "2"], ["--smoke"]])
def test_qlora_recipe_refused_without_cuda(tmp_path, extra):
    from peftcli.cli import app

    out = tmp_path / "run"
    t = time.perf_counter()
    res = CliRunner().invoke(app, ["train", "recipes/smollm2_qlora.yaml", f"output.dir={out}", *extra])
    assert res.exit_code == 2, res.output
    assert "nf4 needs a CUDA GPU" in " ".join(res.output.split())
    assert not out.exists() and not (tmp_path / "run-smoke").exists()  # refused before any work
    assert time.perf_counter() - t < 30  # no model, tokenizer or data was loaded


def test_qlora_refuses_methods_that_need_dense_base():
    from peftcli.methods.attach import check_qlora_possible
    from peftcli.methods.lora import LoraConfig
    from peftcli.models.quant import QuantizationUnavailable

    cpu = torch.device("cpu")
    with pytest.raises(QuantizationUnavailable, match="'full'"):
        check_qlora_possible("full", cpu)
    with pytest.raises(QuantizationUnavailable, match="DoRA"):
        check_qlora_possible("lora", cpu, LoraConfig(use_dora=True))


def test_nf4_config_keeps_heads_dense():
    pytest.importorskip("transformers")
    from peftcli.models.quant import nf4_config

    c = nf4_config()
    assert c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16
    assert {"lm_head", "score", "classifier"} <= set(c.llm_int8_skip_modules)


@pytest.fixture
def nf4_llama(tmp_path):
    """A tiny Llama loaded through transformers' NF4 path (bitsandbytes runs it on CPU too)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from peftcli.models.quant import nf4_config

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    try:
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4_config(),
                                                 device_map={"": "cpu"}, dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001  (older bitsandbytes: no CPU 4-bit)
        pytest.skip(f"bitsandbytes cannot load 4-bit on CPU here: {e}")
    return m


def test_lora_on_4bit_base(nf4_llama):
    from peftcli.core.precision import is_4bit
    from peftcli.methods.attach import attach_method
    from peftcli.methods.lora import LoraConfig, LoraLinear

    m = nf4_llama
    arch, _ = attach_method(m, "lora", LoraConfig(r=4, targets=["q", "k", "v", "o", "ffn_in", "ffn_out"]))
    wrapped = [x for x in m.modules() if isinstance(x, LoraLinear)]
    assert len(wrapped) == 2 * 7 and all(is_4bit(x.base) for x in wrapped)
    assert not is_4bit(m.lm_head)
    for x in wrapped:
        assert x.lora_A.weight.dtype == torch.bfloat16 and x.lora_A.weight.requires_grad
        assert (x.in_features, x.out_features) == (x.base.in_features, x.base.out_features)
        assert x.lora_B.weight.shape == (x.base.out_features, 4)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(1, VOCAB, (2, 6))
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(x.lora_B.weight.grad is not None for x in wrapped)
    # y = base4bit(x) + s·B·A·x, with B set non-zero
    x0 = wrapped[0]
    with torch.no_grad():
        x0.lora_B.weight.normal_()
        inp = torch.randn(3, x0.in_features, dtype=torch.bfloat16)
        want = x0.base(inp).float() + x0.scaling * (inp.float() @ x0.lora_A.weight.float().t() @ x0.lora_B.weight.float().t())
        assert torch.allclose(x0(inp).float(), want, atol=0.1, rtol=0.02)


def test_merge_dequantizes_to_a_plain_model(nf4_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftcli.core.precision import is_4bit
    from peftcli.methods.attach import attach_method
    from peftcli.methods.lora import LoraConfig, LoraLinear, merge
    from peftcli.models.quant import dequantize_model

    m = nf4_llama
    arch, _ = attach_method(m, "lora", LoraConfig(r=4, targets=["q", "v", "ffn_out"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for x in m.modules():
            if isinstance(x, LoraLinear):
                x.lora_B.weight.normal_(std=0.05)
    m.eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        before = m(input_ids=ids).logits.float()
        # de-quantized weights are what the 4-bit matmul multiplies by, also after bitsandbytes'
        # CPU kernel has repacked the weight on the forward above
        lin = next(x for x in m.modules() if is_4bit(x))
        from peftcli.models.quant import dense_4bit_weight

        inp = torch.randn(2, lin.in_features, dtype=torch.bfloat16)
        dense = dense_4bit_weight(lin).to(torch.bfloat16)
        assert torch.allclose(lin(inp).float(), (inp @ dense.t()).float(), atol=2e-2, rtol=1e-2)
        n = dequantize_model(m, torch.bfloat16)
        assert n == 2 * 7
        merge(m, arch, LoraConfig(r=4, targets=["q", "v", "ffn_out"]))
        assert not any(is_4bit(x) or hasattr(x, "adapter_enabled") for x in m.modules())
        assert not hasattr(m.config, "quantization_config")
        after = m(input_ids=ids).logits.float()
    assert (before - after).abs().max() < 0.1  # bf16 rounding of W + s·B·A
    m.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(re(input_ids=ids).logits.float(), after)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_merge_of_a_qlora_run_refused_without_cuda(tmp_path):
    import yaml
    from safetensors.torch import save_file

    from peftcli.cli import app
    from peftcli.config.recipe import load_recipe, recipe_yaml

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_yaml(load_recipe("recipes/smollm2_qlora.yaml")))
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["quantization"] == "nf4"
    save_file({"x": torch.zeros(1)}, str(run / "adapter" / "adapter.safetensors"))
    (run / "adapter" / "meta.json").write_text('{"method": "lora"}')
    res = CliRunner().invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 2, res.output
    assert "nf4 needs a CUDA GPU" in " ".join(res.output.split())
    assert not (tmp_path / "merged").exists()
