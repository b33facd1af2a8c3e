"""`peftcli validate --data`: what the loss covers, on the data as training reads it.

A recipe shows the settings but not their effect on the data: how long the examples are, how many
are cut, how full packed rows are, and which tokens of an example the loss covers. This module
measures those; cli.py prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftcli.config.recipe import Recipe, RecipeError
from peftcli.core.errors import BadInput
from peftcli.data.batching import batches, length_group_size
from peftcli.data.packing import pack_for_training
from peftcli.data.splits import malformed_summary
from peftcli.models.loading import load_tokenizer
from peftcli.runs.load import collator, prepare_data, train_collator


@dataclass
class DataReport:
    rows: tuple[int, int, int]  # train / val / test examples
    kind: str  # "format chat" etc. for causal_lm, else the task
    malformed: str = ""  # the malformed-rows summary, "" when none
    notes: list[str] = field(default_factory=list)  # examples left out (no trained token after truncation)
    causal_lm: bool = False  # the rest is measured for causal_lm only
    lengths: list[int] = field(default_factory=list)  # tokens per training example
    trained_tokens: int = 0
    packing: str = ""  # what packing does to the rows, "" without packing
    # The first training example as consecutive pieces of text, each marked trained (in the loss) or not.
    pieces: list[tuple[str, bool]] = field(default_factory=list)
    # Preference data: the first pair's rejected side (same shape), or a KTO row's label in words.
    rejected_pieces: list[tuple[str, bool]] = field(default_factory=list)
    kto_label: str = ""


def method_placement(r: Recipe) -> str:
    """Attach the recipe's method to its model on the meta device (no weights read), so that targets
    and layers the model lacks are refused by `validate` as `train` would refuse them. Returns what
    was checked, in words. Only a model whose config is on this machine (a local folder, an embedded
    model) is checked: validate never waits on the network."""
    from peftcli.models.skeleton import local_config
    from peftcli.runs.load import check_positions
    from peftcli.training.budget import method_on_meta

    if local_config(r.model.name) is None:
        return ("method placement not checked: the model's config.json is not on this machine "
                "(`peftcli count-params` fetches it and checks)")
    try:
        _, arch, _, built_from = method_on_meta(r)
        check_positions(arch, r)
    except RecipeError:
        raise
    except BadInput as e:  # a model that will not load here, AdapterFusion's source runs not trained yet
        return f"method placement not checked ({str(e).splitlines()[0]})"
    return f"method {r.method_name} fits {r.model.name}: targets and layers checked on its {built_from}"


def data_report(r: Recipe) -> DataReport:
    """Tokenize the recipe's data as training does and measure what the loss covers."""
    tok = load_tokenizer(r.model.name, trust_remote_code=r.model.trust_remote_code)  # the user's own recipe
    splits, train_ex, val, test = prepare_data(r, tok)
    rep = DataReport(rows=(len(train_ex), len(val), len(test)),
                     kind=f"format {splits.format}" if splits.format else r.model.task,
                     malformed=malformed_summary(splits.malformed) if splits.malformed else "",
                     notes=list(splits.notes))
    if r.model.task != "causal_lm":
        return rep
    rep.causal_lm = True
    # A pair is two sequences: both are counted (a KTO row's mismatched row only estimates a KL term).
    sides = [(e["input_ids"], e["labels"]) for e in train_ex]
    sides += [(e["rejected_ids"], e["rejected_labels"]) for e in train_ex if "rejected_ids" in e]
    rep.lengths = [len(ids) for ids, _ in sides]
    rep.trained_tokens = sum(sum(1 for y in labels if y != -100) for _, labels in sides)
    rep.packing = _packing_fill(r, tok, train_ex, sum(rep.lengths))
    first = train_ex[0]
    rep.pieces = _trained_pieces(tok, first)
    if "rejected_ids" in first:
        rep.rejected_pieces = _trained_pieces(tok, {"input_ids": first["rejected_ids"], "labels": first["rejected_labels"]})
    if "desirable" in first:
        rep.kto_label = "desirable" if first["desirable"] else "undesirable"
    return rep


def _packing_fill(r: Recipe, tok, train_ex: list[dict], tokens: int) -> str:
    """How full packing leaves the rows, in words; "" without packing."""
    if r.data.packing is True:
        rows = pack_for_training(r, train_ex)
        fill = tokens / (len(rows) * r.data.max_length)
        return f"packing: {len(rows)} rows of {r.data.max_length} tokens, {100 * fill:.1f} % filled"
    if r.data.packing == "batch":
        # Epoch 0's batches as training reads them: slots (rows x length) padded, and packed batch by batch.
        order = dict(shuffle=True, seed=r.train.seed, length_group=length_group_size(r.train, world=1))
        slots = [sum(b["input_ids"].numel() for b in batches(train_ex, r.train.batch_size, c, **order))
                 for c in (collator(r, tok), train_collator(r, tok))]
        return (f"packing: each batch of {r.train.batch_size} examples packed into rows of {r.data.max_length} tokens: "
                f"{100 * tokens / slots[1]:.1f} % of the slots hold tokens ({100 * tokens / slots[0]:.1f} % "
                "padded)")
    return ""


def _trained_pieces(tok, e: dict) -> list[tuple[str, bool]]:
    """An example decoded in runs of tokens that the loss covers, or does not."""
    pieces: list[tuple[str, bool]] = []
    run: list[int] = []
    run_trained = False
    for tid, y in [*zip(e["input_ids"], e["labels"], strict=True), (None, None)]:
        is_trained = y is not None and y != -100
        if tid is None or (is_trained != run_trained and run):
            pieces.append((tok.decode(run), run_trained))
            run = []
        if tid is not None:
            run.append(tid)
            run_trained = is_trained
    return pieces
