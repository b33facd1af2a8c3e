"""core/arch: the map's position table, which bounds data.max_length."""

from __future__ import annotations

import pytest
import transformers as tf

from peftcli.config.recipe import RecipeError, recipe_from_dict
from peftcli.core.arch import resolve
from peftcli.runs.load import attach_recipe, check_positions

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize("config,model_class,limit", [
    (tf.BertConfig(**SMALL, max_position_embeddings=64), tf.BertForSequenceClassification, 64),
    # RoBERTa's positions start after its padding index (1): 66 rows hold 64 tokens
    (tf.RobertaConfig(**SMALL, max_position_embeddings=66, pad_token_id=1), tf.RobertaForSequenceClassification, 64),
    (tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=48), tf.GPT2LMHeadModel, 48),
    (tf.LlamaConfig(**SMALL, max_position_embeddings=64), tf.LlamaForCausalLM, None),  # rotary: no table
    (tf.BertConfig(**SMALL, position_embedding_type="relative_key"), tf.BertForSequenceClassification, None),
])
def test_position_limit(config, model_class, limit):
    assert resolve(model_class(config)).position_limit() == limit


def test_max_length_beyond_the_position_table_is_a_recipe_problem():
    """It passed validate and stopped training at the first long example with torch's words."""
    model = tf.BertForSequenceClassification(tf.BertConfig(**SMALL, max_position_embeddings=64))
    r = recipe_from_dict({"model": {"name": "tiny-bert"}, "data": {"max_length": 65}, "method": {"name": "lora"}},
                         "r.yaml", check_files=False)
    with pytest.raises(RecipeError) as e:
        check_positions(attach_recipe(model, r)[0], r)
    assert e.value.problems == ["data.max_length: 65 tokens, but tiny-bert reads at most 64 (its position table); "
                                "set data.max_length: 64 or less"]
    r.data.max_length = 64
    check_positions(resolve(model), r)
