"""A method's facts live in its spec, and only there.

1. A toy method, registered from a throw-away module with nothing but `register(...)`, gets the
   last-layer trim, the QLoRA check, count-params, the PEFT export refusal and the merge refusal
   right: no other file of peftcli had to learn its name.
2. No file of peftcli names a registered method as a string, except the method's own file, the
   registry, and the few places listed below with the reason each may.
3. The facts agree with what the methods do: every `positionwise` method has a trim exactness case,
   and every closed-form `budget` equals the parameters the method adds.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_model

from peftcli.methods import all_methods, get_method
from peftcli.methods.attach import attach_method
from peftcli.methods.registry import unregister

PKG = Path(__file__).resolve().parents[2] / "peftcli"

TOY_SOURCE = '''
"""A throw-away method: a learned scale on each layer's FFN output, y = s * (W x + b)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from peftcli.core.arch import linear_dims, set_module
from peftcli.core.adapter import LayerAdapter
from peftcli.methods.registry import register


@dataclass
class ToyConfig:
    init: float = field(default=1.0, metadata={"help": "starting value of every scale"})
    read_base: bool = field(default=False, metadata={"help": "pretend to need the dense base weights"})


class Scale(LayerAdapter):
    def __init__(self, base: nn.Module, init: float) -> None:
        super().__init__(base)
        w = base.weight
        self.toy_scale = nn.Parameter(torch.full((linear_dims(base)[1],), init, device=w.device, dtype=w.dtype))

    def forward(self, x):
        y = self.base(x)
        return y * self.toy_scale.to(y.dtype) if self.adapter_enabled else y


def attach(model, arch, cfg):
    for i in range(arch.num_layers):
        path = arch.path(i, "ffn_out")
        set_module(model, path, Scale(model.get_submodule(path), cfg.init))


def budget(model, arch, cfg):
    return arch.num_layers * arch.hidden_size


register(
    "toy_scale", ToyConfig, summary="toy: a scale on each FFN output",
    merge_refusal="toy scales stay apart from the weights",
    positionwise=True,
    needs_dense_base=lambda cfg: "with method.read_base: the toy reads dense weights" if cfg.read_base else "",
    no_peft_reason="HF PEFT has no toy {name} scales",
    budget=budget,
)(attach)

register(
    "toy_dense", ToyConfig, summary="toy: the same, claiming a dense base and no trim",
    merge_refusal="toy scales stay apart from the weights",
    needs_dense_base="reads the toy's dense weights",
    budget=budget,
)(attach)
'''


@pytest.fixture
def toy(tmp_path):
    """Import the toy module (registering its two methods); unregister them afterwards."""
    path = tmp_path / "peftcli_toy_method.py"
    path.write_text(TOY_SOURCE)
    spec = importlib.util.spec_from_file_location("peftcli_toy_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in ("toy_scale", "toy_dense"):
            if name in all_methods():
                unregister(name)
        sys.modules.pop(spec.name, None)


def _llama_config(path: Path) -> str:
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100, "tie_word_embeddings": False,
        "max_position_embeddings": 64,
    }))
    return str(path)


def _run_folder(tmp_path: Path, method: str) -> Path:
    """A run folder as far as the refusals read it: its recipe.yaml."""
    from peftcli.config.recipe import recipe_from_dict, recipe_yaml

    r = recipe_from_dict({"model": {"name": _llama_config(tmp_path / "config.json"), "task": "causal_lm"},
                          "method": {"name": method}}, "test")
    run = tmp_path / f"run-{method}"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_yaml(r))
    return run


# ------------------------------------------------------------------------------- 1. a toy method


def test_toy_method_trim_follows_positionwise(toy):
    from peftcli.models.trim import trim_unread_positions

    for name, trims in (("toy_scale", True), ("toy_dense", False)):
        m = tiny_model("bert")
        arch, _ = attach_method(m, name, toy.ToyConfig(init=1.5))
        b = batch()
        ref = m(**b).logits
        handles = trim_unread_positions(m, arch, get_method(name).positionwise, "classification")
        assert len(handles) == (3 if trims else 0), name
        torch.testing.assert_close(m(**b).logits, ref, atol=1e-5, rtol=1e-5)
        for h in handles:
            h.remove()


def test_toy_method_is_an_adapter_for_adapterdrop(toy):
    from peftcli.core.switch import adapter_modules, set_dropped_layers

    m = tiny_model("bert")
    base = m(**batch()).logits
    arch, _ = attach_method(m, "toy_scale", toy.ToyConfig(init=2.0))
    assert all(len(adapter_modules(layer)) == 1 for layer in arch.layers)
    assert (m(**batch()).logits - base).abs().max() > 1e-5
    assert set_dropped_layers(m, arch, range(arch.num_layers)) == arch.num_layers
    torch.testing.assert_close(m(**batch()).logits, base, atol=1e-6, rtol=0)


def test_toy_method_qlora_check_follows_needs_dense_base(toy):
    from peftcli.methods.attach import check_qlora_possible, dense_base_refusal
    from peftcli.models.quant import QuantizationUnavailable

    cpu = torch.device("cpu")
    assert dense_base_refusal("toy_scale", toy.ToyConfig()) is None
    with pytest.raises(QuantizationUnavailable, match="needs a CUDA GPU"):  # past the method check
        check_qlora_possible("toy_scale", cpu, toy.ToyConfig())
    with pytest.raises(QuantizationUnavailable, match="nf4 with method.read_base: the toy reads dense weights"):
        check_qlora_possible("toy_scale", cpu, toy.ToyConfig(read_base=True))
    with pytest.raises(QuantizationUnavailable, match="method 'toy_dense' reads the toy's dense weights"):
        check_qlora_possible("toy_dense", cpu, toy.ToyConfig())


def test_toy_method_budget(toy, tmp_path):
    from peftcli.config.recipe import recipe_from_dict
    from peftcli.training.budget import budget

    cfg = _llama_config(tmp_path / "c.json")
    for name, nf4_row in (("toy_scale", True), ("toy_dense", False)):
        r = recipe_from_dict({"model": {"name": cfg, "task": "causal_lm"}, "method": {"name": name}}, "test")
        b = budget(r)
        assert b["trainable"] == b["closed_form"] == 2 * 32  # one [hidden] scale per layer, no task head
        assert ("nf4 QLoRA" in [m["precision"] for m in b["memory"]]) == nf4_row


def test_toy_method_export_and_merge_are_refused_with_its_reasons(toy, tmp_path):
    from peftcli.commands.merge import MergeRefused, merge_run
    from peftcli.commands.peft import export_run
    from peftcli.core.peft_layout import PeftFormatError
    from peftcli.runs.peft_format import export_refusal

    assert export_refusal("toy_scale") == "cannot export method 'toy_scale' to HF PEFT: HF PEFT has no toy toy_scale scales"
    assert "HF PEFT has no method computing the same function" in export_refusal("toy_dense")
    run = _run_folder(tmp_path, "toy_scale")
    with pytest.raises(PeftFormatError, match="HF PEFT has no toy toy_scale scales"):
        export_run(run, tmp_path / "peft")
    with pytest.raises(MergeRefused, match="toy scales stay apart from the weights"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()


def test_toy_method_is_gone_after_unregistering(toy):
    assert "toy_scale" in all_methods()
    unregister("toy_scale")
    unregister("toy_dense")
    assert "toy_scale" not in all_methods() and "toy_dense" not in all_methods()


def test_register_takes_every_spec_field_and_builds_the_spec_from_them(toy):
    """register() builds MethodSpec from its own parameters: they must be the spec's fields (but
    `attach`, which it decorates), and every value given must land in the spec unchanged."""
    import dataclasses
    import inspect

    from peftcli.methods.registry import MethodSpec, register

    params = set(inspect.signature(register).parameters)
    fields = {f.name for f in dataclasses.fields(MethodSpec)}
    assert params == fields - {"attach"}
    spec = get_method("toy_scale")
    assert spec.attach is toy.attach and spec.config_cls is toy.ToyConfig and spec.budget is toy.budget
    assert spec.positionwise is True and spec.merge_refusal == "toy scales stay apart from the weights"
    assert spec.merge is None and spec.combine_hows == () and spec.optimizer_name == ""
    with pytest.raises(ValueError, match="registered twice"):
        register("toy_scale", toy.ToyConfig, summary="again")(toy.attach)
    with pytest.raises(ValueError, match="together or not at all"):
        register("toy_half", toy.ToyConfig, summary="half", combine_hows=("weighted",))(toy.attach)
    assert "toy_half" not in all_methods()


# ------------------------------------------------------------------------------- 2. no name lists

# Methods built from others may name them.
COMPOSES = {
    "fusion": {"houlsby", "pfeiffer"},  # the source adapters it mixes
    "mam": {"prefix", "parallel", "scaled_parallel"},
    "unipelt": {"lora", "prefix", "pfeiffer"},
}
# (name, file under peftcli/) -> why that file says the name.
ALLOWED = {
    ("lora", "config/recipe.py"): "the method of a recipe without `method:`",
    ("lora", "methods/bottleneck.py"): "`init: lora`, a bottleneck initialisation named after LoRA's",
    ("lora", "methods/parallel.py"): "`init: lora`, a bottleneck initialisation named after LoRA's",
    ("lora", "methods/mam.py"): "`init: lora`, a bottleneck initialisation named after LoRA's",
    ("prompt", "data/formats.py"): "the prompt column of instruction data",
    ("prompt", "data/sources.py"): "the prompt column of instruction data",
    ("prompt", "data/splits.py"): "the prompt column of instruction data",
    ("prompt", "data/tokenize.py"): "the prompt column of instruction data",
    ("prompt", "data/preference.py"): "the prompt column of preference data",
    ("prompt", "inference/evaluate.py"): "the prompt column of instruction data",
    ("prompt", "inference/generate.py"): "the prompt key of generate's JSONL lines",
    ("prompt", "inference/multi.py"): "the prompt key of generate's JSONL lines",
    ("prompt", "commands/serve.py"): "the prompt field of an OpenAI completions request",
    ("prompt", "commands/serve_api.py"): "the prompt field of an OpenAI completions request",
}


def _string_literals(path: Path) -> set[str]:
    """Every whole string literal (not the text pieces of f-strings, such as drop's "fusion{k}")."""
    tree = ast.parse(path.read_text())
    pieces = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in pieces}


def test_method_names_live_in_their_own_files():
    specs = all_methods()
    home = {name: Path(sys.modules[spec.attach.__module__].__file__).resolve() for name, spec in specs.items()}
    owner = {path: name for name, path in home.items()}
    stray = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "methods/registry.py":
            continue
        for name in _string_literals(path) & set(specs):
            if home[name] == path.resolve() or name in COMPOSES.get(owner.get(path.resolve(), ""), ()):
                continue
            if (name, rel) not in ALLOWED:
                stray.append(f"peftcli/{rel} names method {name!r}")
    assert not stray, "facts about a method belong in its spec (registry.register):\n" + "\n".join(stray)


def test_name_check_sees_a_stray_name(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('SPECIAL = {"lora", "full"}  # a name list outside the method files\n'
                 '"""the lora docstring"""\nlabel = f"fusion{3}"\n')
    assert _string_literals(f) & set(all_methods()) == {"lora", "full"}


# ------------------------------------------------------------------------------- 3. facts hold


def test_every_positionwise_method_has_an_exactness_case():
    from test_lora_kernel import TRIM_CASES

    assert {m for m, _, _ in TRIM_CASES} == {n for n, s in all_methods().items() if s.positionwise}


BUDGET_KW = {"compacter": {"bottleneck_size": 8}, "compacter++": {"bottleneck_size": 8},
             "houlsby": {"leave_out": [0]}, "parallel": {"attn": True},
             "scaled_parallel": {"learned_scale": True}}


@pytest.mark.parametrize("name", sorted(n for n, s in all_methods().items() if s.budget is not None))
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_closed_form_budget_counts_what_the_method_adds(name, kind):
    m = tiny_model(kind)
    spec = get_method(name)
    cfg = spec.config_cls(**BUDGET_KW.get(name, {}))
    arch, _ = attach_method(m, name, cfg)
    heads = tuple(f"{n}." for n, _ in arch.head_modules())
    added = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and not n.startswith(heads))
    assert spec.budget(m, arch, cfg) == added
