"""Phi-3 is refused by name: its attention and FFN projections are fused, and the architecture map
has no split for them, so mapping it to the Llama spec could only fail later and less clearly."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.core.arch import UnsupportedArchitecture, resolve
from peftcli.methods import get_method
from peftcli.methods.attach import attach_method
from peftcli.models.loading import model_from_config


def tiny_phi3_config():
    from transformers import Phi3Config

    return Phi3Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def phi3():
    return model_from_config(tiny_phi3_config(), "causal_lm")


def test_phi3_really_fuses_its_projections(phi3):
    """The premise of the refusal; should transformers ever split them, this says so first."""
    names = {n.rsplit(".", 1)[-1] for n, _ in phi3.named_modules()}
    assert {"qkv_proj", "gate_up_proj"} <= names
    assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & names


def test_phi3_is_refused_by_name(phi3):
    with pytest.raises(UnsupportedArchitecture, match="phi3") as e:
        resolve(phi3)
    assert "qkv_proj" in str(e.value) and "gate_up_proj" in str(e.value)
    with pytest.raises(UnsupportedArchitecture, match="qkv_proj"):
        attach_method(phi3, "lora", get_method("lora").config_cls())


def test_count_params_refuses_phi3_with_exit_2(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_phi3_config().to_dict()))
    res = CliRunner().invoke(app, ["count-params", "--model", str(cfg), "--method", "lora"])
    assert res.exit_code == 2, res.output
    assert "model_type 'phi3' is not supported" in res.output
    assert "qkv_proj" in res.output and "gate_up_proj" in res.output
    assert "Traceback" not in res.output
