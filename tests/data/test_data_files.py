"""Local data files: an empty one is "FILE has no rows" (exit 2), a file the reader cannot parse
names the parser's complaint and the shape the file must have, and only a hub id gets the hint
about the network."""

from __future__ import annotations

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.recipe import DataConfig
from peftcli.core.errors import DataError
from peftcli.data.splits import load_splits

runner = CliRunner()


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("ws.jsonl", "\n  \n"), ("e.csv", ""),
                                       ("header.csv", "text,label\n"), ("e.json", "[]")])
def test_an_empty_file_has_no_rows(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=f"data.source: {p} has no rows") as e:
        load_splits(DataConfig(source=str(p)), "classification")
    assert "network" not in str(e.value)


def test_an_empty_jsonl_exits_2_in_validate_and_train(tmp_path, tiny_gpt2_dir):
    p = tmp_path / "d.jsonl"
    p.write_text("")
    rec = write_recipe(tmp_path / "r.yaml", model={"name": str(tiny_gpt2_dir), "task": "causal_lm"},
                       data={"source": str(p)}, output={"dir": str(tmp_path / "run")})
    for cmd in (["validate", rec, "--data"], ["train", rec]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, res.output
        assert f"{p} has no rows" in " ".join(res.output.split()) and "StopIteration" not in res.output


@pytest.mark.parametrize("lines,where", [
    (['{"text": "a", "label": "x"}', '', '{oops'], "line 3 is not JSON (Expecting property name"),
    (['{"text": "a", "label": "x"}', '["b", "y"]'], "line 2 is a JSON list, not an object"),
])
def test_a_file_that_does_not_parse_names_the_line_and_the_shape(tmp_path, lines, where):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"could not read .*bad\.jsonl: .*\n.*one JSON object per line") as e:
        load_splits(DataConfig(source=str(p)), "classification")
    assert where in str(e.value)
    assert "network" not in str(e.value) and "generating the dataset" not in str(e.value)


def test_a_csv_that_does_not_parse_keeps_the_readers_words(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('text,label\n"a,x\nb,y,z,w\n')
    with pytest.raises(DataError, match=r"could not read .*bad\.csv: .+\n.*comma-separated values under a header row"):
        load_splits(DataConfig(source=str(p)), "classification")


def test_only_a_hub_id_gets_the_network_hint():
    with pytest.raises(DataError, match=r"could not load 'someone/no-such-set' from the hub: .*\n.*without a network"):
        load_splits(DataConfig(source="someone/no-such-set"), "classification")


@pytest.mark.parametrize(("num_labels", "words"), [
    (1, "has 2 classes (neg, pos) but model.num_labels is 1; set model.num_labels: 2 or null"),
    (3, "but model.num_labels is 3; set model.num_labels: 2 or null, or list every class in data.label_names"),
])
def test_class_names_and_num_labels_must_agree(tmp_path, num_labels, words):
    """The head is sized by the class names found: a different model.num_labels is refused, not ignored."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source=str(path), eval_size=4), "classification", num_labels)
    assert words in str(e.value)


def test_class_ids_most_of_which_never_occur_are_refused(tmp_path):
    """Ids 0, 1 and 1000000 built a head of a million classes (1.5 GB of adapter) without a word;
    model.num_labels says the head really is that wide, and ids with a gap or two still read."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{(0, 1, 1000000)[i % 3]}\n" for i in range(30)))
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source=str(path), eval_size=6), "classification")
    assert ("class ids up to 1000000, a head of 1,000,001 classes, but only 3 ids occur (0, 1, 1000000); "
            "renumber them 0..2, or set model.num_labels: 1000001") in str(e.value)
    assert len(load_splits(DataConfig(source=str(path), eval_size=6), "classification", 1000001).label_names) == 1000001
    path.write_text("text,label\n" + "".join(f"row {i},{(0, 2, 3)[i % 3]}\n" for i in range(30)))
    assert load_splits(DataConfig(source=str(path), eval_size=6), "classification").label_names == ["0", "1", "2", "3"]


def test_a_json_object_of_columns_is_named_not_read_as_one_class(tmp_path):
    """{"text": [...], "label": [...]} read as one row whose label is a list: "one class" followed
    by the whole column."""
    import json

    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"text": [f"row {i}" for i in range(20)], "label": ["pos", "neg"] * 10}))
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source=str(path), eval_size=4), "classification")
    assert "'label' of" in str(e.value) and "holds a list, not a class name or id" in str(e.value)
    assert "'pos', 'neg'" not in str(e.value)


@pytest.mark.parametrize("label", ["pos", "0"])
def test_one_class_is_refused(tmp_path, label):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{label}\n" for i in range(20)))
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source=str(path), eval_size=4), "classification")
    assert f"has one class ('{label}') in column 'label'; a classifier needs at least two" in str(e.value)


def test_classification_rows_without_text_are_malformed_not_trained(tmp_path):
    """A number, an object, null or "" as a row's text: listed as malformed and left out (the
    tokenizer stopped the run with its own words, or trained on "")."""
    import json

    path = tmp_path / "d.jsonl"
    bad = {3: 12345, 5: {"a": 1}, 7: None, 9: "  "}
    rows = [{"text": bad.get(i, f"row {i}"), "label": i % 2} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = load_splits(DataConfig(source=str(path), eval_size=4), "classification")
    assert sorted(row for _, row, _ in s.malformed) == [4, 6, 8, 10]
    assert ("train", 4, "'text' holds an int, not text") in s.malformed
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in s.train + s.eval + s.val)


@pytest.mark.parametrize(("key", "words"), [
    ({"eval_size": 1000}, "data.eval_size: 1000 held-out rows of"),
    ({"eval_size": 4, "train_offset": 1000}, "data.train_offset: 1000 skips all"),
])
def test_sizes_that_leave_no_training_rows_name_their_key(tmp_path, key, words):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(40)))
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source=str(path), **key), "classification")
    assert words in str(e.value)


def test_a_train_size_beyond_the_data_is_said(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(40)))
    s = load_splits(DataConfig(source=str(path), eval_size=4, val_size=4, train_size=1000), "classification")
    assert len(s.train) == 32
    assert s.notes == [f"data.train_size 1000: {path} has 32 training rows once the held-out and validation rows "
                       "are set apart; training on those"]
    assert load_splits(DataConfig(source=str(path), eval_size=4, val_size=4, train_size=32), "classification").notes == []


def test_a_file_that_does_not_parse_is_reported_once(tmp_path):
    """datasets' readers log their own parse error before raising; peftcli's message is the only one."""
    import subprocess
    import sys

    p = tmp_path / "bad.csv"
    p.write_text("text,label\na,0\nb,1,2\n")
    code = ("from peftcli.config.recipe import DataConfig\nfrom peftcli.core.errors import DataError\n"
            "from peftcli.data.splits import load_splits\n"
            f"try:\n    load_splits(DataConfig(source={str(p)!r}), 'classification')\n"
            "except DataError as e:\n    print('refused')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "refused", res.stderr[-2000:]
    assert "Failed to read file" not in res.stderr, res.stderr


def test_the_builtin_names_are_the_ones_builtin_rows_answers():
    """BUILTIN_SOURCES (a run folder keeps these names as they are, never as paths) lists what
    builtin_rows reads; BUILTIN_CLASSES counts classes of some of them."""
    from peftcli.data.sources import BUILTIN_CLASSES, BUILTIN_SOURCES, builtin_rows

    assert all(builtin_rows(name) for name in BUILTIN_SOURCES)
    assert builtin_rows("tweets_nosuch") is None and set(BUILTIN_CLASSES) <= BUILTIN_SOURCES
