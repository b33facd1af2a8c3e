"""Recipes: YAML in, a fully validated `Recipe` out.

Every key is a dataclass field with a type, a default and a one-line help, so validation, the
README's key table and `--dry-run` all come from the same source. Validation collects every
problem before reporting, because a user fixing a recipe one error per run is a user wasting runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import string
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from peftcli.core.errors import BadInput
from peftcli.methods import all_methods


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A recipe field: default + help + optional min/max."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelConfig:
    name: str = opt("sentence-transformers/all-MiniLM-L6-v2", "hub id or local folder of the base model")
    task: Literal["classification", "causal_lm"] = opt("classification", "what the model is trained to do")
    num_labels: int | None = opt(None, "classification classes; null = taken from the data; when set, the data (or data.label_names) must have exactly that many", min=2)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the frozen base weights; auto = float32 on CPU, bfloat16 on CUDA"
    )
    attn_implementation: Literal["sdpa", "eager"] = opt("sdpa", "attention kernel")
    quantization: Literal["none", "nf4"] = opt(
        "none", "nf4 = QLoRA: frozen base in 4-bit NF4 with double quantization (CUDA + bitsandbytes)"
    )
    gradient_checkpointing: bool = opt(False, "recompute layer activations in backward to save memory")
    train_pooler: bool = opt(
        False, "classification, BERT: also train the pretrained pooler, a 2-layer head like AdapterHub's default"
    )
    revision: str | None = opt(None, "hub revision (branch, tag or commit)")
    trust_remote_code: bool = opt(False, "allow model code from the hub")


@dataclass
class DataConfig:
    source: str = opt(
        "tweets",
        "built-in (tweets, tweets_subjectivity, tweets_agreement, tweets_instruct, tweets_chat, tweets_preference, "
        "tweets_kto), "
        "a hub dataset id, or a local csv/json/jsonl/parquet file",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_response", "text"] = opt(
        "auto", "causal_lm row format; auto = from the columns (messages, conversations, instruction+output, "
        "prompt_column+response_column, text_column)"
    )
    messages_column: str | None = opt(
        None, "causal_lm: column of chat turns (role/content or from/value); null = messages or conversations"
    )
    config_name: str | None = opt(None, "hub dataset configuration, e.g. sst2 for glue")
    train_split: str = opt("train", "split to train on")
    eval_split: str | None = opt(
        None, "split of held-out test rows, scored once at the end; null = hold out eval_fraction of train_split"
    )
    eval_fraction: float = opt(0.2, "fraction held out as test rows when eval_split is null", min=0.0, max=0.9)
    val_split: str | None = opt(
        None, "split whose rows choose the best checkpoint; null = carve val_size / val_fraction from the training rows"
    )
    val_fraction: float = opt(
        0.1, "fraction of the training rows kept for validation, taken from the end of the training pool: of "
        "train_size when set (at least 32, at most 2000 rows), else of the whole pool; never more than this fraction "
        "of the pool; 0 = no validation: the last checkpoint is kept", min=0.0, max=0.9,
    )
    val_size: int | None = opt(None, "validation rows (overrides val_fraction); the LAST rows of the training pool", min=1)
    train_offset: int = opt(
        0, "skip the first N training rows (after the seeded shuffle): keeps a source task's rows apart from a target's", min=0
    )
    train_size: int | None = opt(None, "use the first N training rows (after the seeded shuffle and offset)", min=1)
    eval_size: int | None = opt(None, "use the last N held-out test rows", min=1)
    seed: int = opt(0, "seed of the shuffle that splits and subsamples the data", min=0, max=2**32 - 1)
    text_column: str = opt("text", "input text column")
    text_pair_column: str | None = opt(None, "second text column for pair tasks")
    label_column: str = opt("label", "label column (classification)")
    label_names: list[str] | None = opt(None, "class names in id order; null = from the data")
    prompt_column: str | None = opt(None, "causal_lm: prompt column; the loss covers the response only")
    response_column: str | None = opt(None, "causal_lm: response column")
    chat_template: bool = opt(True, "causal_lm: wrap prompts with the tokenizer's chat template if it has one")
    max_length: int = opt(128, "truncate inputs to this many tokens", min=8)
    packing: bool | Literal["batch"] = opt(
        False, "causal_lm: pack examples into rows of max_length tokens, each attending only to itself. "
        "true: the whole training set, fewest rows (train.batch_size then counts rows); batch: each batch's "
        "examples (the steps and loss of padded batches, without the padding); evaluation stays unpacked"
    )
    strict: bool = opt(False, "refuse malformed rows instead of skipping and reporting them (`--strict`)")


@dataclass
class TrainConfig:
    epochs: float = opt(
        1.0, "passes over the training data", above=0.0, fix="use train.max_steps or a positive epochs"
    )
    max_steps: int | None = opt(
        None, "stop after this many optimizer steps (overrides epochs)", min=1,
        fix="set a positive number of steps, or null to train for train.epochs",
    )
    batch_size: int = opt(32, "examples per micro-batch", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    lr: float = opt(1e-3, "peak learning rate", min=0.0)
    weight_decay: float = opt(0.0, "decoupled weight decay of matrices (AdamW, Adafactor, SGD)", min=0.0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "sgd"] = opt(
        "adamw", "adamw (torch); adamw_8bit, paged_adamw, paged_adamw_8bit (bitsandbytes: CUDA, or CPU with "
        "bitsandbytes >= 0.50, where paged ones page nothing); adafactor (factored second moments); sgd"
    )
    momentum: float = opt(0.0, "train.optimizer sgd: momentum (0 keeps no state)", min=0.0, max=1.0)
    lora_plus_ratio: float | None = opt(
        None, "LoRA+: LoRA's B matrices (and, as in HF PEFT, every 1-D trained tensor) learn at this many times "
        "train.lr, everything else at train.lr; null = off. HF PEFT's create_loraplus_optimizer groups", above=0.0,
        fix="give a positive ratio (the LoRA+ paper uses 16), or null to turn LoRA+ off",
    )
    lisa_layers: int = opt(
        0, "LISA (method full): train this many randomly drawn transformer layers at a time (plus embeddings and "
        "head); 0 = off", min=0,
    )
    lisa_interval: int = opt(20, "LISA: draw new layers every this many optimizer steps", min=1)
    scheduler: Literal["linear", "cosine", "constant"] = opt("linear", "learning-rate schedule after warmup")
    warmup_ratio: float = opt(0.06, "fraction of steps spent warming up", min=0.0, max=1.0)
    max_grad_norm: float | None = opt(1.0, "gradient clipping; null = off", min=0.0)
    seed: int = opt(0, "seed for initialisation, dropout and batch order", min=0, max=2**32 - 1)
    device: Literal["auto", "cpu", "cuda", "mps"] = opt("auto", "auto = cuda if available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "auto = bf16 autocast on CUDA, fp32 on CPU")
    num_threads: int | None = opt(None, "CPU threads for torch; null = torch's default", min=1)
    eval_every: int | None = opt(None, "evaluate every N optimizer steps; null = end of each epoch", min=1)
    log_every: int = opt(10, "append a metrics line every N optimizer steps", min=1)
    drop_layers: int = opt(
        0, "AdapterDrop robust training: each step, drop adapters from a random number (0..N) of lowest layers", min=0
    )
    distributed: Literal["none", "ddp", "fsdp"] = opt("none", "multi-process training under torchrun")
    compile: bool = opt(False, "torch.compile each transformer layer (CUDA)")
    chunked_ce: bool = opt(True, "causal_lm: cross-entropy in chunks, never materialising full fp32 logits")
    progress: bool = opt(True, "show a progress bar")
    group_by_length: bool = opt(
        False, "batches of similar length (seeded, shuffled batch order): less padding without packing"
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = opt(
        [], "experiment trackers that also get metrics.jsonl's records (offline by default; extra packages)"
    )
    objective: Literal["sft", "dpo", "ipo", "hinge", "orpo", "simpo", "kto"] = opt(
        "sft", "causal_lm: sft (next-token loss) or a preference objective on chosen / rejected pairs (dpo, ipo, "
        "hinge, orpo, simpo) or on unpaired rows labelled desirable or not (kto); see docs/preference.md"
    )
    beta: float = opt(
        0.1, "dpo, ipo (its tau), hinge, kto, simpo: how far the policy may move from the reference (simpo: the "
        "reward scale; its paper uses 2 to 2.5)", above=0.0, fix="use a positive beta such as 0.1",
    )
    label_smoothing: float = opt(
        0.0, "dpo and simpo: the chance that a pair's preference is flipped (conservative DPO); 0 = off",
        min=0.0, max=0.49,
    )
    simpo_gamma: float = opt(0.5, "simpo: the target reward margin gamma", min=0.0)
    orpo_lambda: float = opt(
        0.1, "orpo: the weight lambda of the odds-ratio term beside the chosen completion's NLL",
        above=0.0, fix="use a positive weight such as 0.1",
    )
    kto_desirable_weight: float = opt(1.0, "kto: the weight of desirable rows' losses", above=0.0,
                                      fix="use a positive weight")
    kto_undesirable_weight: float = opt(1.0, "kto: the weight of undesirable rows' losses", above=0.0,
                                        fix="use a positive weight")
    precompute_reference: bool = opt(
        False, "dpo, ipo, hinge, kto: compute the reference log-probs once before training and keep them in the run "
        "folder (reference_logps.safetensors), so a step runs the policy only"
    )


@dataclass
class EvalConfig:
    metric: Literal["accuracy", "f1", "loss", "generate_accuracy"] = opt(
        "accuracy", "metric that picks the best checkpoint (generate_accuracy: causal_lm with eval.generate_accuracy)"
    )
    batch_size: int = opt(64, "examples per evaluation batch", min=1)
    generate_samples: int = opt(3, "causal_lm: generated samples shown after evaluation", min=0)
    max_new_tokens: int = opt(16, "causal_lm: tokens generated per sample", min=1)
    generate_accuracy: bool = opt(
        False, "causal_lm: score accuracy by generating each eval answer: a hit opens with the reference's words"
    )


@dataclass
class OutputConfig:
    dir: str = opt("runs/{method}-{data}", "run folder; {method}, {data} and {model} are filled in")
    overwrite: bool = opt(False, "replace an existing run folder instead of refusing")
    plot: bool = opt(True, "write curves.png next to metrics.jsonl")


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    method: Any  # the registered method's config dataclass
    method_name: str
    train: TrainConfig
    eval: EvalConfig
    output: OutputConfig
    # Optional: start from existing adapter weights (a peftcli run folder or an HF PEFT folder).
    init_from: str | None = None
    # The YAML file the recipe was read from (not part of the recipe: never saved or compared).
    source: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "method": {"name": self.method_name, **dataclasses.asdict(self.method)},
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
            "output": dataclasses.asdict(self.output),
        }
        if self.init_from is not None:
            d["init_from"] = self.init_from
        return d

    def run_dir(self) -> Path:
        model_short = self.model.name.rstrip("/").split("/")[-1]
        return Path(
            self.output.dir.format(method=self.method_name, data=Path(self.data.source).stem, model=model_short)
        )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}
TOP_LEVEL = [*SECTIONS, "method", "init_from"]


BUILTIN_SOURCES = ("tweets", "tweets_subjectivity", "tweets_agreement", "tweets_instruct", "tweets_chat",
                   "tweets_preference", "tweets_kto")
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
OUTPUT_PLACEHOLDERS = ("method", "data", "model")


def looks_like_local_file(source: str) -> bool:
    """True when `data.source` can only mean a file on this machine.

    A hub dataset id is `name` or `owner/name`, so a data-file suffix, a leading `/`, `./`, `../`
    or `~`, a backslash or a second `/` rules it out; `owner/name` alone stays a hub id.
    """
    if source in BUILTIN_SOURCES:
        return False
    if Path(source).suffix.lower() in DATA_FILE_SUFFIXES:
        return True
    return source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source or source.count("/") >= 2


def missing_data_file(source: str) -> str | None:
    """Why a local `data.source` cannot be read, or None; relative paths count from the working directory,
    as data/datasets.py opens them."""
    if not looks_like_local_file(source):
        return None
    p = Path(source).expanduser()
    if not p.exists():
        return f"data.source: file not found: {source} (relative paths start at the current directory {Path.cwd()}); fix the path"
    if p.is_dir():
        return f"data.source: {source} is a folder; point it at a csv, tsv, json, jsonl or parquet file"
    if p.suffix.lower() not in DATA_FILE_SUFFIXES:
        return f"data.source: {source}: unsupported file type {p.suffix!r}; use csv, tsv, json, jsonl or parquet"
    return None


def _output_dir_problem(template: str) -> str | None:
    """An unknown placeholder or a stray brace would only fail when the run folder is made, after
    loading the model; an empty dir would put the run in the working directory itself."""
    known = ", ".join("{" + k + "}" for k in OUTPUT_PLACEHOLDERS)
    if not template.strip():
        return f"output.dir: empty; set a run folder, e.g. runs/{{method}}-{{data}} (placeholders: {known})"
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return f"output.dir: {template!r} has an unbalanced brace; write {{{{ or }}}} for a literal one (placeholders: {known})"
    unknown = [n for n in names if n not in OUTPUT_PLACEHOLDERS]
    if unknown:
        shown = ", ".join("{" + n + "}" for n in unknown)
        return f"output.dir: unknown placeholder {shown} in {template!r}; the known ones are {known}"
    try:
        template.format(**{k: "x" for k in OUTPUT_PLACEHOLDERS})
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        return f"output.dir: {template!r} cannot be filled in ({e}); the known placeholders are {known}"
    return None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


class RecipeError(BadInput):
    """All problems found in one recipe. `str()` is the message shown to the user."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the recipe"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted). Ints are accepted for floats; a single string for a list of strings."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return (value in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # `report_to: tensorboard` means [tensorboard]
            ok, v = _coerce(value, inner)
            return (True, [v]) if ok else (False, value)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, cv = _coerce(v, inner)
            if not ok:
                return False, value
            out.append(cv)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def build_section(cls: type, raw: Any, where: str, problems: list[str], skip: tuple[str, ...] = (), *,
                  whose: str = "", elsewhere: dict[str, set[str]] | None = None) -> Any:
    """Validate a mapping against a dataclass; append problems; return an instance (defaults where bad).

    An unknown key that is one of another section's (`elsewhere`: section -> its keys) is pointed
    there (train.r -> method.r: the usual slip is the section, not the spelling); `whose` says whose
    keys the section holds (a method's)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in skip:
            continue
        if key not in fields:
            home = next((sec for sec, names in (elsewhere or {}).items() if key in names), None)
            problems.append(f"{where}.{key}: unknown key; it belongs in {home}: {home}.{key}" if home
                            else f"{where}.{key}: unknown key{whose}{_suggest(str(key), list(fields))}")
            continue
        tp = hints[key]
        ok, conv = _coerce(value, tp)
        if not ok:
            got = "null (YAML reads ~, null and an empty value so; quote a path)" if value is None else repr(value)
            problems.append(f"{where}.{key}: expected {_type_name(tp)}, got {got}")
            continue
        meta = fields[key].metadata
        fix = f"; {meta['fix']}" if "fix" in meta else ""
        if _non_finite(conv):  # .nan passes every min/max comparison, so it must be refused first
            problems.append(f"{where}.{key}: {value!r} is not a finite number; give a real value")
            continue
        if isinstance(conv, (int, float)) and not isinstance(conv, bool):
            if "min" in meta and conv < meta["min"]:
                problems.append(f"{where}.{key}: {conv} is below the minimum {meta['min']}{fix}")
                continue
            if "above" in meta and conv <= meta["above"]:
                problems.append(f"{where}.{key}: {conv:g} must be above {meta['above']:g}{fix}")
                continue
            if "max" in meta and conv > meta["max"]:
                problems.append(f"{where}.{key}: {conv} is above the maximum {meta['max']}{fix}")
                continue
        kwargs[key] = conv
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks
        problems.append(f"{where}: {e}")
        return cls()


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value (e.g. train.lr=3e-4)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"override {text!r}: the value is not YAML ({why}); quote it, or close its brackets "
                         "(e.g. method.targets=[q,v])") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> dict:
    for ov in overrides:
        try:
            path, value = parse_override(ov)
        except (ValueError, yaml.YAMLError) as e:
            problems.append(str(e))
            continue
        if len(path) == 1 and path[0] in SECTIONS and not isinstance(value, dict):  # model=null: every key reset
            problems.append(f"override {ov!r}: {path[0]} is a section; set its keys ({path[0]}.KEY=VALUE)")
            continue
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    problems.append(f"override {ov!r}: {part} is not a section")
                    break
            node = node[part]
        else:
            node[path[-1]] = value
    return raw


def _known_keys(mraw: Any) -> dict[str, set[str]]:
    """Every section's keys; the method's are those of the method the recipe names (LoRA's where it
    names none it knows, as `_method_section` falls back)."""
    methods = all_methods()
    name = mraw.get("name") if isinstance(mraw, dict) else None
    cls = methods[name if isinstance(name, str) and name in methods else "lora"].config_cls
    keys = {sec: {f.name for f in dataclasses.fields(c)} for sec, c in SECTIONS.items()}
    keys["method"] = {f.name for f in dataclasses.fields(cls)} | {"name"}
    return keys


def _others(known: dict[str, set[str]], section: str) -> dict[str, set[str]]:
    return {sec: keys for sec, keys in known.items() if sec != section}


def _method_section(mraw: Any, source: str, problems: list[str], known: dict[str, set[str]]) -> tuple[str, Any]:
    """The method's name and its config dataclass; problems appended, LoRA standing in for a
    missing or unknown name so that the rest of the recipe is still checked."""
    methods = all_methods()
    if mraw is None:
        mraw = {"name": "lora"}
    if not isinstance(mraw, dict):
        problems.append("method: expected a mapping with at least `name:`")
        mraw = {"name": "lora"}
    mname = mraw.get("name")
    if mname is None:
        problems.append(f"method.name: missing; one of {', '.join(sorted(methods))}")
        mname = "lora"
    if mname not in methods:
        problems.append(f"method.name: unknown method {mname!r}{_suggest(str(mname), sorted(methods))}")
        mname = "lora"
    # A key another method takes (method.name=ia3 over a LoRA recipe's r): say whose keys are listed.
    mcfg = build_section(methods[mname].config_cls, mraw, "method", problems, skip=("name",),
                         whose=f" for method {mname!r}", elsewhere=_others(known, "method"))

    if isinstance(mraw, dict) and mraw.get("leave_out") and any(f.name == "layers" for f in dataclasses.fields(mcfg)):
        sys.stderr.write(
            f"note: {source}: method.leave_out is the old spelling; method.layers names the layers that get the "
            "method (e.g. layers: '2-5' or 'top:4'). leave_out still works and removes its layers from those\n"
        )
    return mname, mcfg


def _check_sections_agree(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, output: OutputConfig,
                          problems: list[str], *, check_files: bool) -> None:
    """Problems no one section shows: settings that contradict each other, a missing data file,
    an output folder peftcli may not write."""
    if model.task == "causal_lm" and (data.prompt_column is None) != (data.response_column is None):
        problems.append("data.prompt_column / data.response_column: set both (instruction data) or neither (plain text)")
    if data.label_names is not None and (len(data.label_names) < 2 or len(set(data.label_names)) != len(data.label_names)):
        problems.append(f"data.label_names: {data.label_names} must name at least two classes, each once; "
                        "or set null to take them from the data")
    if model.task == "classification" and model.num_labels and data.label_names:
        if len(data.label_names) != model.num_labels:
            problems.append(
                f"data.label_names: {len(data.label_names)} names but model.num_labels is {model.num_labels}; "
                "make them agree or set model.num_labels: null"
            )
    if model.task == "classification" and data.packing:
        problems.append("data.packing: causal_lm only (a classifier reads one pooled position per row); "
                        "set data.packing: false")
    if model.task == "classification" and data.format != "auto":
        problems.append(f"data.format: {data.format!r} is for causal_lm; classification reads data.text_column "
                        "and data.label_column: remove data.format")
    if data.packing is True and train_cfg.group_by_length:
        problems.append("train.group_by_length: rows packed from the whole training set are all max_length "
                        "already; set either data.packing: true or train.group_by_length (data.packing: batch "
                        "combines with it)")
    _check_objective(model, data, train_cfg, problems)
    if len(set(train_cfg.report_to)) != len(train_cfg.report_to):
        problems.append(f"train.report_to: {train_cfg.report_to} names a tracker twice; list each once")
    if check_files and (why := missing_data_file(data.source)):
        problems.append(why)
    if why := _output_dir_problem(output.dir):
        problems.append(why)


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "hinge", "orpo", "simpo", "kto")
REFERENCE_FREE = ("orpo", "simpo")  # objectives that never run a reference model


def _check_objective(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, problems: list[str]) -> None:
    """A preference objective's keys against the rest of the recipe (eval.metric is checked apart)."""
    obj = train_cfg.objective
    if obj == "sft":
        return
    if model.task != "causal_lm":
        problems.append(f"train.objective: {obj} trains a causal LM on preferences; set model.task: causal_lm "
                        "or train.objective: sft")
    if data.packing:
        problems.append(f"data.packing: train.objective {obj} scores whole chosen / rejected sequences; set "
                        "data.packing: false")
    if train_cfg.distributed == "fsdp":
        problems.append(f"train.objective: {obj} runs the reference on the unwrapped model, which FSDP shards; "
                        "use train.distributed: ddp or none")
    if train_cfg.label_smoothing and obj not in ("dpo", "simpo"):
        problems.append(f"train.label_smoothing: only dpo and simpo smooth labels, not {obj}; set it to 0")
    if train_cfg.precompute_reference and obj in REFERENCE_FREE:
        problems.append(f"train.precompute_reference: {obj} runs no reference model; set it to false")
    if obj == "kto" and train_cfg.batch_size < 2:
        problems.append("train.batch_size: kto estimates its KL term from the other rows of a batch; use a "
                        "batch_size of at least 2")


def recipe_from_dict(
    raw: Any, source: str = "<recipe>", overrides: list[str] | None = None, *, check_files: bool = False
) -> Recipe:
    """Validate a parsed recipe. `check_files` also requires a local `data.source` to exist: on for
    commands that will read the data, off for a finished run's recipe.yaml, which must still load
    for merge or export after its data file is gone."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a YAML mapping with sections " + ", ".join(TOP_LEVEL)])
    raw = apply_overrides(raw, overrides or [], problems)
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown section{_suggest(str(key), TOP_LEVEL)}")
    known = _known_keys(raw.get("method"))
    sections = {name: build_section(cls, raw.get(name), name, problems, elsewhere=_others(known, name))
                for name, cls in SECTIONS.items()}

    methods = all_methods()
    mname, mcfg = _method_section(raw.get("method"), source, problems, known)
    train_cfg: TrainConfig = sections["train"]
    if train_cfg.lisa_layers and not methods[mname].trains_base:
        problems.append(
            f"train.lisa_layers: LISA switches whole layers of the base model on and off, which only a method "
            f"training the base weights does; method {mname!r} trains its own weights. Set train.lisa_layers: 0 "
            "or method.name: full"
        )

    if train_cfg.lora_plus_ratio is not None and methods[mname].optimizer is not None:
        problems.append(
            f"train.lora_plus_ratio: method {mname!r} brings its own optimizer ({methods[mname].optimizer_name}), "
            "which sets each weight's learning rate itself; remove train.lora_plus_ratio"
        )

    init_from = raw.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        problems.append(f"init_from: expected a path to a run or HF PEFT adapter folder, got {init_from!r}")
        init_from = None

    data: DataConfig = sections["data"]
    model: ModelConfig = sections["model"]
    output: OutputConfig = sections["output"]
    _check_sections_agree(model, data, sections["train"], output, problems, check_files=check_files)
    ev = sections["eval"]
    if ev.metric == "generate_accuracy" and train_cfg.objective == "sft":  # else never measured: the last step kept
        if model.task != "causal_lm":
            problems.append("eval.metric: generate_accuracy scores generated answers (causal_lm); a classifier "
                            "picks its checkpoint by accuracy, f1 or loss")
        elif not ev.generate_accuracy:
            problems.append("eval.metric: generate_accuracy needs eval.generate_accuracy: true (validation then "
                            "generates each answer and scores it)")
    if train_cfg.objective != "sft" and sections["eval"].metric not in ("accuracy", "loss"):
        problems.append(f"eval.metric: {sections['eval'].metric!r} is not measured by train.objective "
                        f"{train_cfg.objective}; use accuracy (preference accuracy) or loss")
    if problems:
        raise RecipeError(source, problems)
    return Recipe(
        model=model,
        data=data,
        method=mcfg,
        method_name=mname,
        train=sections["train"],
        eval=sections["eval"],
        output=output,
        init_from=init_from,
    )


def _refuse_repeated_keys(node: yaml.Node | None) -> None:
    """A key given twice in one mapping, refused at its line: plain YAML keeps the last one without
    a word, so `lr: 1e-3` above `lr: 0.5` would train at 0.5. Reads the composed node tree, which
    constructs nothing."""
    if isinstance(node, yaml.MappingNode):
        seen: set[tuple[str, str]] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key.value!r} given twice in one section",
                                                            key.start_mark)
                seen.add((key.tag, key.value))
            _refuse_repeated_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item)


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_files: bool = False) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(str(path), ["file not found; `peftcli recipes` lists the shipped recipes"])
    if path.is_dir():
        raise RecipeError(str(path), ["is a folder, not a recipe; pass a YAML file (`peftcli recipes` lists the shipped ones)"])
    try:
        text = path.read_text(encoding="utf-8")
        _refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise RecipeError(str(path), ["not a text file (not UTF-8); a recipe is a YAML mapping of sections "
                                      + ", ".join(TOP_LEVEL)]) from None
    except OSError as e:
        raise RecipeError(str(path), [f"cannot be read: {e.strerror or e}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(str(path), [f"not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    r = recipe_from_dict(raw, str(path), overrides, check_files=check_files)
    r.source = str(path)
    return r


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def describe_sections() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every recipe key, for the README and `peftcli validate --keys`."""
    rows = []
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{name}.{f.name}", _type_name(hints[f.name]), repr(default), f.metadata.get("help", "")))
    return rows
