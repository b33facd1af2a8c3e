"""Bad data and bad files: exit 2 with one message naming the key or file and the fix, before any
training step (issue 15, item 6 and the recipe-level part of item 3)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def refused(res, *needles: str) -> None:
    """Exit 2, every needle in the one message, and no traceback."""
    assert res.exit_code == 2, res.output
    for n in needles:
        assert n in res.output, (n, res.output)
    assert "Traceback" not in res.output


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def labelled_rows(labels: list[object]) -> list[list[object]]:
    return [[f"the film was fine {i}", lab] for i, lab in enumerate(labels)]


def train_refused(tmp_path: Path, model_dir: Path, data: dict, *needles: str, task: str = "classification",
                  model: dict | None = None) -> str:
    """`peftcli train` on a tiny model refuses the data before a single optimizer step; returns the recipe."""
    run = tmp_path / "run"
    rec = write_recipe(
        tmp_path / "r.yaml", model={"name": str(model_dir), "task": task, **(model or {})},
        data={"eval_size": 4, "max_length": 16, **data}, method={"name": "lora", "r": 2},
        train={"max_steps": 2, "batch_size": 4, "progress": False}, output={"dir": str(run), "plot": False},
    )
    refused(invoke("train", rec), *needles)
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "adapter").exists()
    return rec


# ------------------------------------------------------------------------------ 1. labels


@pytest.mark.slow
@pytest.mark.parametrize("labels,extra,needles", [
    ([0, 1, 2, 1] * 4, {"label_names": ["negative", "positive"]}, ["label 2 in", "outside 0..1", "data.label_names"]),
    ([0, 1, 5, 1] * 4, {}, ["label 5 in", "outside 0..1", "model.num_labels"]),
    ([0, 1, -1, 1] * 4, {}, ["negative label -1", "data.label_column"]),
    (["negative", "positive", "meh"] * 5, {"label_names": ["negative", "positive"]}, ["'meh'", "data.label_names"]),
    ([0, 1, "", 1] * 4, {}, ["data.label_column", "4 rows", "no 'label' value", "data row 3"]),
])
def test_bad_labels_refused_before_training(tiny_bert_dir, tmp_path, labels, extra, needles):
    src = write_csv(tmp_path / "toy.csv", ["sentence", "label"], labelled_rows(labels))
    model = {"num_labels": 2} if not extra.get("label_names") else None
    train_refused(tmp_path, tiny_bert_dir, {"source": str(src), "text_column": "sentence", **extra},
                  "toy.csv", *needles, model=model)


# ------------------------------------------------------------------------------ 2. columns


@pytest.mark.slow
@pytest.mark.parametrize("data,key", [
    ({"text_column": "sentence", "label_column": "lable"}, "data.label_column"),
    ({}, "data.text_column"),  # default text_column 'text'
    ({"text_column": "sentence", "text_pair_column": "second"}, "data.text_pair_column"),
])
def test_missing_classification_column_lists_columns(tiny_bert_dir, tmp_path, data, key):
    src = write_csv(tmp_path / "toy.csv", ["sentence", "label"], labelled_rows([0, 1] * 8))
    rec = train_refused(tmp_path, tiny_bert_dir, {"source": str(src), **data}, key, "toy.csv",
                        "its columns are sentence, label", f"set {key}")
    if key == "data.label_column":  # fixed, the same run folder trains: the refused start left nothing to keep
        res = invoke("train", rec, "data.label_column=label")
        assert res.exit_code == 0, res.output
        assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("data,key,cols", [
    ({}, "data.format", "(question, answer)"),
    ({"text_column": "body", "format": "text"}, "data.text_column", "its columns are question, answer"),
    ({"prompt_column": "query", "response_column": "answer"}, "data.prompt_column", "its columns are question, answer"),
])
def test_missing_causal_lm_column_lists_columns(tiny_gpt2_dir, tmp_path, data, key, cols):
    src = tmp_path / "lm.jsonl"
    src.write_text("".join(json.dumps({"question": f"say {i}", "answer": str(i)}) + "\n" for i in range(16)))
    train_refused(tmp_path, tiny_gpt2_dir, {"source": str(src), **data}, key, "lm.jsonl", cols, task="causal_lm")


# ------------------------------------------------------------------------------ 3. local data file


def test_missing_data_file_reported_by_validate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rec = write_recipe(tmp_path / "r.yaml", data={"source": "data/toy.csv"}, method={"name": "lora"})
    refused(invoke("validate", rec), "r.yaml", "data.source: file not found: data/toy.csv", str(tmp_path))
    # relative to the working directory, as data/datasets.py opens it
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "toy.csv", ["text", "label"], labelled_rows([0, 1]))
    res = invoke("validate", rec)
    assert res.exit_code == 0, res.output
    # an owner/name hub id is not a path
    res = invoke("validate", rec, "data.source=some-org/some-dataset")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------ 4. non-finite numbers


def test_non_finite_numbers_refused(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("method:\n  name: lora\n  alpha: .inf\ntrain:\n  lr: .nan\n")
    refused(invoke("validate", rec), "r.yaml", "train.lr: nan is not a finite number",
            "method.alpha: inf is not a finite number")
    refused(invoke("validate", rec, "train.lr=1e-3", "method.alpha=8", "train.weight_decay=-.inf"),
            "train.weight_decay: -inf is not a finite number")


# ------------------------------------------------------------------------------ 5. output.dir


@pytest.mark.parametrize("out_dir,needle", [
    ("runs/{method}-{date}", "unknown placeholder {date}"),
    ("runs/{method", "unbalanced brace"),
    ("runs/method}", "unbalanced brace"),
    ("", "output.dir: empty"),
])
def test_bad_output_dir_refused(tmp_path, out_dir, needle):
    rec = write_recipe(tmp_path / "r.yaml", method={"name": "lora"}, output={"dir": out_dir})
    refused(invoke("validate", rec), "r.yaml", "output.dir", needle, "{method}, {data}, {model}")


# ------------------------------------------------------------------------------ 6. not a recipe file


def test_folder_binary_or_list_as_recipe(tmp_path):
    refused(invoke("validate", tmp_path), str(tmp_path), "is a folder")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(invoke("validate", binary), "weights.yaml", "not a text file")
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- data\n")
    refused(invoke("train", listing), "list.yaml", "must be a YAML mapping")


# ------------------------------------------------------------------------------ 7. epochs / max_steps


def test_zero_epochs_and_steps_refused(tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", method={"name": "lora"}, train={"epochs": 0})
    refused(invoke("validate", rec), "r.yaml", "train.epochs: 0 must be above 0", "use train.max_steps")
    refused(invoke("validate", rec, "train.epochs=1", "train.max_steps=0"),
            "train.max_steps: 0 is below the minimum 1", "null to train for train.epochs")


# ------------------------------------------------------------------------------ targets and layers the model lacks


@pytest.mark.parametrize("method,needles", [
    ({"name": "lora", "targets": ["query_proj"]},
     ["method.targets ['query_proj'] matches no linear layer", "roles (q, k, v, o, ffn_in, ffn_out)",
      "attention.self.query"]),
    ({"name": "lora", "layers": "0-7"}, ["method.layers '0-7': layer 2 is out of range", "the model has 2 layers"]),
    ({"name": "houlsby", "layers": [-3]}, ["method.layers [-3]: layer -3 is out of range", "-1 to -2 from the top"]),
    ({"name": "ia3", "layers": "x-1"}, ["method.layers 'x-1': cannot read 'x-1'", "'top:4'"]),
    ({"name": "unipelt", "lora_targets": ["nope"]}, ["method.lora_targets ['nope'] matches no linear layer"]),
])
def test_targets_and_layers_the_model_lacks(tiny_bert_dir, tiny_csv, tmp_path, method, needles):
    """Only the model knows its layers, but the recipe is still the one to fix: validate (on the
    model's structure), train and count-params say so like any recipe problem, with the recipe
    file, and train writes nothing."""
    run = tmp_path / "run"
    rec = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 4, "max_length": 16},
        method=method, train={"max_steps": 2, "batch_size": 4, "progress": False},
        output={"dir": str(run), "plot": False},
    )
    for command in ("validate", "train", "count-params"):
        refused(invoke(command, rec), "r.yaml: 1 problem in the recipe", *needles)
    assert not (run / "metrics.jsonl").exists() and not (run / "adapter").exists()


# ------------------------------------------------------------------------------ trained run for 8 and 9


@pytest.fixture(scope="module")
def tiny_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    rec = write_recipe(
        d / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 8, "max_length": 16},
        method={"name": "lora", "r": 2}, train={"max_steps": 2, "batch_size": 8, "progress": False},
        output={"dir": str(d / "run"), "plot": False},
    )
    res = invoke("train", rec)
    assert res.exit_code == 0, res.output
    return d / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------------------ 8. meta.json


@pytest.mark.slow
@pytest.mark.parametrize("edit,needles", [
    (lambda m: "{not json", ["not valid JSON"]),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "method"}), ["key 'method' is missing"]),
    (lambda m: json.dumps({**m, "label_names": "negative"}), ["key 'label_names' should be a list"]),
    (lambda m: json.dumps([m]), ["expected a JSON object"]),
    # more classes than the saved head has: meta.json is to blame, not recipe.yaml
    (lambda m: json.dumps({**m, "label_names": ["a", "b", "c", "d"]}),
     ["label_names has 4 classes, but the saved head", "meta.json was changed after training"]),
])
def test_bad_meta_json(tiny_run, tmp_path, edit, needles):
    run = copy_run(tiny_run, tmp_path)
    meta_file = run / "adapter" / "meta.json"
    meta_file.write_text(edit(json.loads(meta_file.read_text())))
    refused(invoke("eval", run), str(meta_file), *needles)


# ------------------------------------------------------------------------------ 9. adapter vs recipe


def edit_recipe(run: Path, **sections: dict) -> None:
    f = run / "recipe.yaml"
    raw = yaml.safe_load(f.read_text())
    for name, value in sections.items():
        raw[name] = {**raw[name], **value} if name != "method" else value
    f.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("command", ["eval", "merge", "export"])
def test_run_recipe_edited_to_other_method(tiny_run, tmp_path, command):
    run = copy_run(tiny_run, tmp_path)
    edit_recipe(run, method={"name": "ia3"})
    args = [command, run] + ([tmp_path / "out"] if command != "eval" else [])
    refused(invoke(*args), str(run / "adapter" / "meta.json"), "method 'lora'", "method.name 'ia3'",
            str(run / "recipe.yaml"))
    assert not (tmp_path / "out").exists()


def test_run_recipe_edited_to_other_base_model(tiny_run, tiny_bert_dir, tmp_path):
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert_dir, other)
    run = copy_run(tiny_run, tmp_path)
    edit_recipe(run, model={"name": str(other)})
    refused(invoke("eval", run), "meta.json", f"base model '{tiny_bert_dir}'", f"model.name '{other}'",
            str(run / "recipe.yaml"))


def test_init_from_other_method_or_base_model(tiny_run, tiny_bert_dir, tiny_csv, tmp_path):
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert_dir, other)
    for method, model, needles in [
        ({"name": "ia3"}, tiny_bert_dir, ["method 'lora'", "method.name 'ia3'"]),
        ({"name": "lora", "r": 2}, other, [f"base model '{tiny_bert_dir}'", f"model.name '{other}'"]),
    ]:
        out = tmp_path / f"run-{method['name']}-{Path(model).name}"
        rec = write_recipe(
            tmp_path / "r.yaml", model={"name": str(model)},
            data={"source": str(tiny_csv), "text_column": "sentence", "eval_size": 8, "max_length": 16},
            method=method, train={"max_steps": 2, "batch_size": 8, "progress": False},
            output={"dir": str(out), "plot": False}, init_from=str(tiny_run),
        )
        refused(invoke("train", rec), "init_from", str(tiny_run / "adapter" / "meta.json"), *needles)
        assert not (out / "metrics.jsonl").exists()


def test_import_peft_names_the_adapter_config_for_layers_the_model_lacks(tiny_run, tmp_path):
    """A PEFT folder's adapter_config.json is the recipe of `import-peft`: a refusal names it."""
    peft_dir = tmp_path / "peft"
    assert invoke("export", tiny_run, "--to", "peft", peft_dir).exit_code == 0
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["layers_to_transform"] = [40]
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    refused(invoke("import-peft", peft_dir, tmp_path / "imported"), f"{peft_dir}/adapter_config.json: 1 problem",
            "layer 40 is out of range")
    assert not (tmp_path / "imported").exists()


def test_peft_folder_with_another_recipe_is_named_as_given(tiny_run, tmp_path):
    """`merge PEFT_DIR --recipe R` and `import-peft PEFT_DIR --recipe R`: a recipe that does not
    describe the adapter is refused naming the folder and R, not an `init_from` the user never wrote."""
    peft_dir = tmp_path / "peft"
    assert invoke("export", tiny_run, "--to", "peft", peft_dir).exit_code == 0
    raw = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    raw["method"]["r"] = 4
    rec = tmp_path / "other.yaml"
    rec.write_text(yaml.safe_dump(raw))
    for args in (("merge", peft_dir, tmp_path / "merged"), ("import-peft", peft_dir, tmp_path / "imported")):
        res = invoke(*args, "--recipe", rec)
        refused(res, f"{peft_dir} (read with --recipe {rec})", "set method.r: 2")
        assert "init_from" not in res.output
        assert not args[2].exists()


def test_eval_maps_labels_to_the_classes_the_run_was_trained_on(tiny_bert_dir, tiny_csv, tmp_path):
    """A data file edited after training: renamed classes used to renumber silently (the scores of
    swapped classes), a new class stopped eval with torch's words; both name the run's classes now,
    and the unedited file scores as before."""
    data = tmp_path / "d.csv"
    shutil.copy(tiny_csv, data)
    rec = write_recipe(
        tmp_path / "r.yaml", model={"name": str(tiny_bert_dir)},
        data={"source": str(data), "text_column": "sentence", "eval_size": 8, "max_length": 16},
        method={"name": "lora", "r": 2}, train={"max_steps": 2, "batch_size": 8, "progress": False},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    assert invoke("train", rec).exit_code == 0
    before = invoke("eval", tmp_path / "run")
    assert before.exit_code == 0, before.output
    text = tiny_csv.read_text()
    for edited, needle in ((text.replace(",negative,", ",znegative,"), "label 'znegative'"),
                           (text.replace("today 3,negative,", "today 3,neutral,"), "label 'neutral'")):
        data.write_text(edited)
        refused(invoke("eval", tmp_path / "run"), str(data), needle,
                f"not among the classes {tmp_path / 'run'} was trained on (negative, positive)")
    data.write_text(text)
    after = invoke("eval", tmp_path / "run")
    assert after.exit_code == 0 and after.output == before.output


def test_a_run_folder_reads_the_same_from_any_folder(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    """Relative model and data paths are kept absolute in the run's recipe.yaml: eval from another
    folder scored the files found there (or loaded nothing), and --resume still compares as equal."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_bert_dir, work / "models" / "bert")
    shutil.copy(tiny_csv, work / "d.csv")
    monkeypatch.chdir(work)
    rec = write_recipe(
        work / "r.yaml", model={"name": "models/bert"},
        data={"source": "d.csv", "text_column": "sentence", "eval_size": 8, "max_length": 16},
        method={"name": "lora", "r": 2}, train={"max_steps": 2, "batch_size": 8, "progress": False},
        output={"dir": "run", "plot": False},
    )
    assert invoke("train", rec).exit_code == 0
    saved = yaml.safe_load((work / "run" / "recipe.yaml").read_text())
    assert saved["model"]["name"] == str(work / "models" / "bert") and saved["data"]["source"] == str(work / "d.csv")
    res = invoke("train", rec, "train.max_steps=3", "--resume")  # relative in the recipe, absolute in the run
    assert res.exit_code == 0 and "resuming at step 2" in res.output, res.output
    assert invoke("eval", "run").exit_code == 0
    scores = (work / "run" / "eval_test.json").read_text()
    (tmp_path / "elsewhere").mkdir()  # a d.csv there with every label the other way round
    swapped = tiny_csv.read_text().replace(",negative,", ",x,").replace(",positive,", ",negative,").replace(",x,", ",positive,")
    (tmp_path / "elsewhere" / "d.csv").write_text(swapped)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert invoke("eval", work / "run").exit_code == 0
    assert (work / "run" / "eval_test.json").read_text() == scores


def test_an_adapter_holding_nan_is_refused_by_every_reader(tiny_run, tmp_path):
    """Training never saves a non-finite step, so NaN in a saved adapter is damage: eval wrote NaN
    into its JSON, merge wrote a NaN model and export a NaN PEFT folder, all with exit 0."""
    from safetensors.torch import load_file, save_file

    run = copy_run(tiny_run, tmp_path)
    peft_dir = tmp_path / "peft"
    assert invoke("export", run, "--to", "peft", peft_dir).exit_code == 0
    f = run / "adapter" / "adapter.safetensors"
    sd = load_file(str(f))
    name = sorted(k for k in sd if "lora_B" in k or "lora_b" in k.lower())[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, str(f))
    for args in (("eval", run), ("merge", run, tmp_path / "merged"), ("export", run, "--to", "peft", tmp_path / "e")):
        refused(invoke(*args), str(f), f"{name} holds 1 NaN or infinite value", "restore the file")
    assert not (run / "eval_test.json").exists() and not (tmp_path / "merged").exists() and not (tmp_path / "e").exists()
    pf = peft_dir / "adapter_model.safetensors"
    sd = load_file(str(pf))
    sd[next(iter(sd))].fill_(float("inf"))
    save_file(sd, str(pf))
    refused(invoke("import-peft", peft_dir, tmp_path / "imported"), str(pf), "NaN or infinite values")
