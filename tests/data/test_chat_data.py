"""Causal-LM data formats: detection, assistant-only labels, malformed rows, `validate --data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import recipe_from_dict
from peftcli.core.errors import DataError
from peftcli.data.chat import chat_segments
from peftcli.data.sources import tweets_chat_rows
from peftcli.models.loading import load_tokenizer
from peftcli.models.losses import IGNORE
from peftcli.runs.load import prepare_data

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
runner = CliRunner()

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Sentiment of: I love rain"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "First two words?"},
    {"role": "assistant", "content": "I love"},
]


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(SMOL)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(source: str, model: str = SMOL, **data) -> object:
    return recipe_from_dict({"model": {"name": model, "task": "causal_lm"},
                             "data": {"source": source, "eval_size": 1, "max_length": 256, **data}})


def _trained_text(tok, ex: dict) -> str:
    return tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"], strict=True) if y != IGNORE])


@pytest.mark.parametrize("shape,fmt", [
    ({"messages": CHAT}, "messages"),
    ({"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                         "value": m["content"]} for m in CHAT]}, "sharegpt"),
])
def test_conversations_train_every_assistant_turn_and_nothing_else(tmp_path, smol_tok, shape, fmt):
    src = _jsonl(tmp_path / "d.jsonl", [shape] * 4)
    splits, train, _, _ = prepare_data(_recipe(src), smol_tok)
    assert splits.format == fmt
    # SmolLM2's template has no {% generation %} markers: the turns are found by incremental rendering.
    assert "{% generation %}" not in smol_tok.chat_template
    assert _trained_text(smol_tok, train[0]) == "positive<|im_end|>I love<|im_end|>"
    full = smol_tok.decode(train[0]["input_ids"])
    assert full == smol_tok.apply_chat_template(CHAT, tokenize=False)


def test_alpaca_prompt_response_and_text_are_detected(tmp_path, smol_tok):
    alp = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}] * 3)
    splits, train, _, _ = prepare_data(_recipe(alp), smol_tok)
    assert splits.format == "alpaca" and _trained_text(smol_tok, train[0]) == "5<|im_end|>"
    assert "Add\n\n2 and 3" in smol_tok.decode(train[0]["input_ids"])
    txt = _jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}] * 3)
    splits, train, _, _ = prepare_data(_recipe(txt), smol_tok)
    assert splits.format == "text" and all(y != IGNORE for y in train[0]["labels"])
    pr = _jsonl(tmp_path / "p.jsonl", [{"q": "Say hi", "a": "hi"}] * 3)
    splits, train, _, _ = prepare_data(_recipe(pr, prompt_column="q", response_column="a"), smol_tok)
    assert splits.format == "prompt_response" and _trained_text(smol_tok, train[0]) == "hi<|im_end|>"


def test_a_template_without_markers_of_another_layout_masks_correctly(smol_tok):
    llama3_like = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    pieces = chat_segments(smol_tok, CHAT, llama3_like)
    assert [t for t, trained in pieces if trained] == ["positive<|eot_id|>", "I love<|eot_id|>"]
    assert "".join(t for t, _ in pieces) == smol_tok.apply_chat_template(CHAT, chat_template=llama3_like, tokenize=False)


def test_an_opening_assistant_turn_is_context_not_a_reply(smol_tok):
    """SmolLM2's template puts its default system prompt before a conversation that opens with the
    assistant: that prompt and the header were trained as if the model had to produce them."""
    t = smol_tok.chat_template
    assert [x for x, trained in chat_segments(smol_tok, [{"role": "assistant", "content": "hello"}], t) if trained] == []
    greeting = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "a1"}]
    assert [x for x, trained in chat_segments(smol_tok, greeting, t) if trained] == ["a1<|im_end|>"]


def test_tokenizer_without_a_template_uses_chatml(tmp_path, tiny_gpt2_dir):
    src = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    tok = load_tokenizer(str(tiny_gpt2_dir))
    _, train, _, _ = prepare_data(_recipe(src, model=str(tiny_gpt2_dir)), tok)
    trained = _trained_text(tok, train[0]).replace(" ", "")
    assert trained.startswith("positive<") and "ilove" in trained and "rain" not in trained


BAD_ROWS = [
    {"messages": CHAT},
    {"messages": [{"role": "bot", "content": "hi"}]},  # row 2: unknown role
    {"messages": []},  # row 3: empty
    {"messages": CHAT},
    {"messages": [{"role": "user", "content": "only a question"}]},  # row 5: nothing to train on
    {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]},  # row 6: template refuses tools
    {"messages": CHAT},
]
NO_TOOLS = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_malformed_rows_are_counted_by_row_number_and_strict_refuses_them(tmp_path, smol_tok, monkeypatch):
    src = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    monkeypatch.setattr(smol_tok, "chat_template", NO_TOOLS)
    splits, train, val, held = prepare_data(_recipe(src, eval_size=None, eval_fraction=0.2), smol_tok)
    bad = {row: why for _, row, why in splits.malformed}
    assert set(bad) == {2, 3, 5, 6}
    assert "unknown role 'bot'" in bad[2] and bad[3] == "empty conversation"
    assert "no assistant turn" in bad[5] and "no tool role" in bad[6]
    assert len(train) + len(val) + len(held) == 3
    with pytest.raises(DataError, match=r"data\.strict: .*4 malformed rows: .*row 2 \(turn 1: unknown role 'bot'"):
        prepare_data(_recipe(src, strict=True), smol_tok)


def test_strict_flag_exits_2_before_any_model_is_loaded(tmp_path, tiny_gpt2_dir):
    src = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    rec = write_recipe(tmp_path / "r.yaml", model={"name": str(tiny_gpt2_dir), "task": "causal_lm"},
                       data={"source": src, "eval_size": 1}, output={"dir": str(tmp_path / "run")})
    res = runner.invoke(app, ["train", rec, "--strict"])
    assert res.exit_code == 2, res.output
    assert "row 2" in res.output and "data.strict" in res.output
    assert not (tmp_path / "run").exists()


def test_validate_data_shows_what_the_loss_covers(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3 + [{"messages": []}])
    rec = write_recipe(tmp_path / "r.yaml", model={"name": SMOL, "task": "causal_lm"},
                       data={"source": src, "eval_size": 1, "packing": True})
    res = runner.invoke(app, ["validate", rec, "--data"])
    assert res.exit_code == 0, res.output
    assert "⟦positive<|im_end|>⟧" in res.output and "⟦I love<|im_end|>⟧" in res.output
    assert "Sentiment of: I love rain<|im_end|>" in res.output  # the prompt, not highlighted
    assert "1 malformed row skipped: train row 4 (empty conversation)" in res.output
    assert "format messages" in res.output and "packing:" in res.output


def test_tweets_chat_is_deterministic_and_varied():
    tweets = [{"text": f"@someone word{i} " + "x " * (i % 9) + "#tag http://t.co/a", "sentiment": "neutral"}
              for i in range(40)]
    rows = tweets_chat_rows(tweets)
    assert rows == tweets_chat_rows(tweets)
    turns = {sum(m["role"] == "assistant" for m in r["messages"]) for r in rows}
    assert turns == {1, 2, 3, 4}
    assert sum(r["messages"][0]["role"] == "system" for r in rows) == 8
    clean = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant" and "word" in m["content"]
             and "@" not in m["content"]]
    assert clean and all("#" not in c and "http" not in c for c in clean)


def test_an_empty_answer_is_malformed_in_every_format():
    """An empty assistant turn or prompt/response answer trained the end-of-turn marker alone, while
    alpaca's and preference data's empty outputs were refused."""
    from peftcli.config.recipe import DataConfig
    from peftcli.data.formats import lm_row

    cfg = DataConfig(source="x")
    for answer in ("", "  "):
        conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]}
        assert lm_row(conv, "messages", cfg, None, None, "text") == "turn 2: an empty assistant answer"
        row = {"prompt": "hi", "response": answer}
        assert lm_row(row, "prompt_response", cfg, "prompt", "response", "text") == "no prompt or no response"
        assert lm_row({"instruction": "hi", "output": answer}, "alpaca", cfg, None, None, "text") == \
            "alpaca row without instruction or output"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    assert lm_row(ok, "messages", cfg, None, None, "text") == {"messages": ok["messages"]}
