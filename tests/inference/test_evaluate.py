"""inference/evaluate: what counts as a generated answer that matches its reference."""

from __future__ import annotations

from peftcli.inference.evaluate import label_match


def test_an_answer_matches_when_it_opens_with_the_reference():
    assert label_match("Positive. The tweet is upbeat", "positive")
    assert not label_match("negative", "positive") and not label_match("", "positive")
    # A reference of several words: the first word alone compared with all of it never matched,
    # so generate_accuracy was 0 on any free-text data, even for an exact copy.
    assert label_match("hello 0 there", "hello 0 there")
    assert label_match("Hello, 0 there. And more", "hello 0 there")
    assert not label_match("hello 0", "hello 0 there") and not label_match("hello 1 there", "hello 0 there")
    assert not label_match("anything", "  ")
