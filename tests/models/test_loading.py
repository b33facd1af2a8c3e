"""models/loading: a base model loaded for a recipe."""

from __future__ import annotations

import torch

from peftcli.models.loading import load_base_model


def test_a_classifier_checkpoint_of_another_class_count_gets_a_fresh_head(tiny_bert_dir):
    """tiny_bert_dir is saved as a 2-class classifier: a 3-class task stopped at load with
    transformers' "ignore_mismatched_sizes" error. The body loads as saved; the head is new."""
    two = load_base_model(str(tiny_bert_dir), "classification", num_labels=2)
    three = load_base_model(str(tiny_bert_dir), "classification", num_labels=3, label_names=["a", "b", "c"])
    assert three.classifier.weight.shape == (3, 32) and three.config.id2label == {0: "a", 1: "b", 2: "c"}
    body = {k: v for k, v in two.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(v, three.state_dict()[k]) for k, v in body.items())
