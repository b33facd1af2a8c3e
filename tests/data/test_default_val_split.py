"""The default validation split scales with the run: val_fraction of data.train_size within
VAL_MIN..VAL_MAX rows, never more than val_fraction of the pool; an explicit val_size or val_split
is taken as it is, and the training rows never depend on the validation size."""

from __future__ import annotations

import pytest

from peftcli.config.recipe import recipe_from_dict
from peftcli.data.splits import VAL_MAX, VAL_MIN, load_splits


def _splits(**data):
    r = recipe_from_dict({"model": {"name": "x", "task": "classification"},
                          "data": {"source": "tweets", "eval_size": 2000, **data}})
    return load_splits(r.data, r.model.task, r.model.num_labels)


@pytest.fixture(scope="module")
def pool_size() -> int:
    return len(_splits(val_fraction=0.0).train)


@pytest.mark.slow
@pytest.mark.parametrize("train_size,expect", [(64, VAL_MIN), (1000, 100), (8000, 800), (30000, VAL_MAX)])
def test_a_small_run_is_scored_on_a_few_rows(train_size, expect):
    s = _splits(train_size=train_size)
    assert len(s.val) == expect
    assert "10 % of data.train_size within 32-2000 rows" in s.val_from
    # The training rows are the same whatever the validation size (validation comes off the end).
    assert s.train == _splits(train_size=train_size, val_size=3000).train[: len(s.train)]


def test_without_train_size_val_fraction_of_the_pool_as_before(pool_size):
    s = _splits()
    assert len(s.val) == int(pool_size * 0.1) and len(s.train) == pool_size - len(s.val)
    assert s.val_from == "10 % of the training pool (data.val_fraction)"


@pytest.mark.slow
def test_explicit_sizes_and_zero_are_taken_as_they_are():
    s = _splits(train_size=64, val_size=500)
    assert len(s.val) == 500 and s.val_from == "data.val_size, held out from the training pool"
    s = _splits(train_size=64, val_fraction=0.0)
    assert s.val == [] and s.val_from == "none: data.val_fraction is 0"
    s = _splits(train_size=1000, val_fraction=0.5)
    assert len(s.val) == 500


def test_a_small_source_keeps_its_rows(tiny_csv):
    # 60 rows, 12 held out: the pool of 48 gives 4 validation rows, as before the bounds.
    r = recipe_from_dict({"model": {"name": "x", "task": "classification"},
                          "data": {"source": str(tiny_csv), "text_column": "sentence", "train_size": 20}})
    s = load_splits(r.data, r.model.task)
    assert len(s.val) == 4 and len(s.train) == 20
