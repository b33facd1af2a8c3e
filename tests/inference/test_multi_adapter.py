"""Mixed-adapter batches: every row of one batch through its own run's adapter, equal to that run alone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.adapter_runs import make_run
from typer.testing import CliRunner

from peftcli.cli import app

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def decoder_runs(tiny_gpt2_dir, tmp_path_factory):
    """Four LoRA runs of different ranks and targets, and two methods that cannot be stacked."""
    root = tmp_path_factory.mktemp("dec-runs")
    specs = {
        "a": {"name": "lora", "r": 2, "targets": ["q", "v"]},
        "b": {"name": "lora", "r": 8, "targets": ["all-linear"]},
        "c": {"name": "lora", "r": 4, "targets": ["ffn_in"], "rslora": True, "layers": "1"},
        "d": {"name": "lora", "r": 3, "alpha": 5.0, "targets": ["o", "ffn_out"]},
        "e": {"name": "houlsby", "reduction_factor": 8},
        "f": {"name": "lora", "r": 2, "use_dora": True},
        # per-module ranks and alphas stack, each site scaled by the run's own scaling there; a frozen A is saved
        "g": {"name": "lora", "r": 2, "targets": ["q", "v", "ffn_out"], "rank_pattern": {"ffn_out": 5},
              "alpha_pattern": {r"h\.1\.mlp\.c_proj": 9.0}, "freeze_a": True},
        "h": {"name": "lora", "r": 2, "init": "olora"},  # a moved base: a sub-batch of its own
    }
    return {n: make_run(root, n, tiny_gpt2_dir, "causal_lm", m, seed=i + 1) for i, (n, m) in enumerate(specs.items())}


def _alone(run, tok, prompt: str, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    from peftcli.inference.decode import eos_ids, greedy_ids
    from peftcli.runs.load import load_run

    built, _ = load_run(run, CPU)
    ids = tok(prompt + "\n", add_special_tokens=False)["input_ids"]
    got: list = []
    out = greedy_ids(built.model, [ids], [steps], pad_id=tok.pad_token_id, eos=eos_ids(built.model, tok), device=CPU,
                     logits=got)
    return out[0], got[0]


@pytest.mark.slow
def test_mixed_generate_rows_equal_single_adapter(decoder_runs, tiny_gpt2_dir):
    from peftcli.inference.generate import generate
    from peftcli.inference.multi import generate_mixed, load_runs

    multi = load_runs(list(decoder_runs.values()), CPU)
    assert [multi.adapters[n].stacked for n in "abcdefgh"] == [True] * 4 + [False] * 2 + [True, False]
    # A grouped run's frozen base weights are the shared model's tensors, not a second copy.
    wte = multi.model.get_input_embeddings().weight
    assert multi.adapters["e"].model.get_input_embeddings().weight is wte
    base = str(tiny_gpt2_dir)
    reqs = [("a", "the film was great"), ("b", "hi"), ("c", "a much longer prompt with several more words"),
            ("d", "x y z"), ("e", "what a day"), ("f", "short"), (base, "no adapter here"), ("b", "the film"),
            ("g", "the film was awful"), ("h", "a day")]
    logits: list = []
    texts = generate_mixed(multi, reqs, max_new_tokens=6, logits=logits)
    for (name, prompt), text, row_logits in zip(reqs, texts, logits, strict=True):
        if name == base:
            continue
        ids, single_logits = _alone(decoder_runs[name], multi.tokenizer, prompt, 6)
        assert len(row_logits) == len(single_logits) == 6  # the cache's decode steps, all compared
        for mixed, alone in zip(row_logits, single_logits, strict=True):
            torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
        assert text == generate(decoder_runs[name], [prompt], max_new_tokens=6, device="cpu")[0]


def test_base_row_is_the_plain_base(decoder_runs, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    from peftcli.inference.multi import load_runs

    multi = load_runs([decoder_runs["a"], decoder_runs["b"]], CPU)
    plain = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad(), multi.rows([str(tiny_gpt2_dir), "a"]):
        mixed = multi.model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], plain(input_ids=ids[:1]).logits[0], atol=1e-5, rtol=0)
    assert (mixed[1] - plain(input_ids=ids[1:]).logits[0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def encoder_runs(tiny_bert_dir, tiny_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("enc-runs")
    data = {"source": str(tiny_csv), "text_column": "sentence", "eval_size": 12, "max_length": 32}
    two = ["negative", "positive"]
    runs = {
        "a": make_run(root, "a", tiny_bert_dir, "classification", {"name": "lora", "r": 2, "targets": ["q", "v"]},
                      seed=1, data=data, label_names=two),
        "b": make_run(root, "b", tiny_bert_dir, "classification", {"name": "lora", "r": 8, "targets": ["all-linear"]},
                      seed=2, data=data, label_names=two),
        "c": make_run(root, "c", tiny_bert_dir, "classification",
                      {"name": "lora", "r": 4, "targets": ["ffn_out"], "layers": "0", "rslora": True},
                      seed=3, data=data, label_names=two),
        "d": make_run(root, "d", tiny_bert_dir, "classification", {"name": "lora", "r": 6, "targets": ["k", "o"]},
                      seed=4, data=data, label_names=two, train_pooler=True),
        "e": make_run(root, "e", tiny_bert_dir, "classification", {"name": "pfeiffer"}, seed=5, data=data,
                      label_names=two),
    }
    return runs


@pytest.mark.slow
def test_mixed_encoder_rows_equal_single_adapter(encoder_runs):
    from peftcli.inference.multi import load_runs
    from peftcli.runs.load import load_run

    multi = load_runs(list(encoder_runs.values()), CPU)
    assert [multi.adapters[n].stacked for n in "abcde"] == [True] * 4 + [False]
    tok = multi.tokenizer
    texts = ["the film was great", "awful", "a long sentence about a film that was lovely today", "bad", "fine film",
             "sad", "superb acting"]
    names = ["a", "b", "c", "d", "e", "a", "c"]
    enc = tok(texts, padding=True, return_tensors="pt")
    got = {}
    for model, pos, _ in multi.groups(names):
        with torch.no_grad(), multi.routed(model, [names[i] for i in pos]):
            logits = model(input_ids=enc["input_ids"][pos], attention_mask=enc["attention_mask"][pos]).logits
        got.update({i: logits[j] for j, i in enumerate(pos)})
    for i, (name, text) in enumerate(zip(names, texts, strict=True)):
        built, _ = load_run(encoder_runs[name], CPU)
        alone = tok([text], return_tensors="pt")
        with torch.no_grad():
            want = built.model(**alone).logits[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_mixed_eval_equals_each_run_alone(encoder_runs):
    res = CliRunner().invoke(app, ["eval", *(str(r) for r in encoder_runs.values()), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    mixed = {n: json.loads((r / "eval_test.json").read_text()) for n, r in encoder_runs.items()}
    for name in ("b", "e"):
        res = CliRunner().invoke(app, ["eval", str(encoder_runs[name]), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        alone = json.loads((encoder_runs[name] / "eval_test.json").read_text())
        assert alone["examples"] == mixed[name]["examples"] == 12
        assert alone["accuracy"] == mixed[name]["accuracy"] and alone["f1"] == mixed[name]["f1"]
        assert abs(alone["loss"] - mixed[name]["loss"]) < 1e-5


@pytest.mark.slow
def test_generate_cli_prompts_file(decoder_runs, tmp_path):
    from peftcli.inference.multi import generate_mixed, load_runs

    lines = [{"adapter": "a", "prompt": "the film"}, {"adapter": "e", "prompt": "hello there"},
             {"adapter": "b", "prompt": "x", "max_new_tokens": 2}]
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), str(decoder_runs["b"]),
                                   str(decoder_runs["e"]), "--prompts", str(p), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    multi = load_runs([decoder_runs["a"], decoder_runs["b"], decoder_runs["e"]], CPU)
    want = generate_mixed(multi, [(x["adapter"], x["prompt"]) for x in lines], max_new_tokens=[4, 4, 2])
    assert [r["generated"] for r in rows] == want
    assert [r["adapter"] for r in rows] == ["a", "e", "b"]


def test_generate_cli_bad_input_exits_2(decoder_runs, encoder_runs, tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"adapter": "a", "prompt": "ok"}\n{"adapter": "zz", "prompt": "no such adapter"}\n')
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), "--prompts", str(p)])
    assert res.exit_code == 2
    assert "line 2: adapter 'zz' is not loaded" in res.output
    # An OpenAI-style key is refused, not dropped: the answer would run to the default length.
    typo = tmp_path / "typo.jsonl"
    typo.write_text('{"adapter": "a", "prompt": "ok", "max_tokens": 3}\n')
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), "--prompts", str(typo)])
    assert res.exit_code == 2, res.output
    assert "line 1: unknown key 'max_tokens'; a line takes adapter, max_new_tokens, prompt" in " ".join(res.output.split())
    typo.write_text('{"adapter": ["a"], "prompt": "ok"}\n')
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), "--prompts", str(typo)])
    assert res.exit_code == 2 and "\"adapter\" must be a name" in res.output, res.output
    typo.write_bytes(b"\xff\xfe{")
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), "--prompts", str(typo)])
    assert res.exit_code == 2 and "not a text file (not UTF-8)" in res.output, res.output
    # Runs on different base models are refused before any model is built.
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), f"x={encoder_runs['a']}", "--prompts", str(p)])
    assert res.exit_code == 2
    assert "recipe.yaml: model.name is" in res.output and "share one base model" in res.output
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), str(decoder_runs["b"]), "hello"])
    assert res.exit_code == 2 and "--prompts" in res.output
    res = CliRunner().invoke(app, ["generate", str(decoder_runs["a"]), f"a={decoder_runs['b']}", "--prompts", str(p)])
    assert res.exit_code == 2 and "two runs are named 'a'" in res.output


def test_generate_refuses_prompts_it_cannot_answer(decoder_runs, tmp_path, monkeypatch):
    """A folder as --prompts, a lone surrogate, a prompt beyond the model's context: each was
    "no such file", exit 1 with the tokenizer's words, or an empty answer with exit 0. A file
    with a byte-order mark reads."""
    run = str(decoder_runs["a"])

    def gen(*args: str):
        return CliRunner().invoke(app, ["generate", run, *args])

    res = gen("--prompts", str(tmp_path))
    assert res.exit_code == 2 and "is a folder" in res.output, res.output
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "\\ud800"}\n')
    res = gen("--prompts", str(p))
    assert res.exit_code == 2 and "line 2" in res.output and "not valid Unicode" in res.output, res.output
    p.write_text('{"prompt": "' + "word " * 400 + '"}\n')
    res = gen("--prompts", str(p), "--max-new-tokens", "2")
    assert res.exit_code == 2 and "line 1 is" in res.output and "more than the model's context of 128" in " ".join(
        res.output.split()), res.output
    res = gen("word " * 400, "--max-new-tokens", "2")
    assert res.exit_code == 2 and "the prompt is" in res.output and "context of 128" in " ".join(res.output.split())
    res = gen("word " * 60, "--max-new-tokens", "100")
    assert res.exit_code == 2 and "lower --max-new-tokens" in " ".join(res.output.split()), res.output
    res = gen("caf\udce9")  # a command-line argument that was not UTF-8
    assert res.exit_code == 2 and "not valid Unicode" in res.output, res.output
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "ok"}\n')
    res = gen("--prompts", str(p), "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output


def test_generate_refuses_4bit_run_without_cuda(decoder_runs, tmp_path):
    """A QLoRA run's base is 4-bit: loading it for mixed batches says what the machine lacks."""
    import shutil

    import yaml

    run = tmp_path / "q"
    shutil.copytree(decoder_runs["a"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["quantization"] = "nf4"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"adapter": "q", "prompt": "ok"}\n')
    res = CliRunner().invoke(app, ["generate", str(run), "--prompts", str(p)])
    assert res.exit_code == 2, res.output
    assert "nf4 needs a CUDA GPU" in res.output
