"""Quiet the Hugging Face libraries for one call, and only for that call.

Loading a model or a dataset makes transformers, datasets and huggingface_hub print warnings
meant for library authors and progress bars that garble peftcli's own output. Setting their
verbosity globally would also silence them for a program that imports peftcli as a library, so
peftcli lowers them only around its own loading calls and puts every setting back afterwards,
exactly as it found it (an explicit level, NOTSET, per-group progress-bar switches).

Only libraries already imported are touched: importing one here would cost seconds on paths
that never use it, and a library imported inside the block starts from its own defaults anyway.
Callers therefore import the library first, then enter the block.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_LIBRARIES = ("transformers", "datasets", "huggingface_hub")


def _logger_levels() -> list[Callable[[], None]]:
    """Raise each imported library's root logger to ERROR at least; return the undo steps."""
    undo: list[Callable[[], None]] = []
    for name in _LIBRARIES:
        if name not in sys.modules:
            continue
        logger = logging.getLogger(name)
        level = logger.level  # NOTSET stays NOTSET on the way back, not the inherited level
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
        undo.append(lambda logger=logger, level=level: logger.setLevel(level))
    return undo


def _transformers_bars() -> Callable[[], None] | None:
    if "transformers" not in sys.modules:
        return None
    from transformers.utils import logging as tlog

    was_on = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    # transformers' switch also flips huggingface_hub's global one; the hub's own undo runs after
    # this one and restores the hub exactly.
    return tlog.enable_progress_bar if was_on else None


def _datasets_bars() -> Callable[[], None] | None:
    if "datasets" not in sys.modules:
        return None
    # By module path: `datasets.utils.tqdm` as an attribute is the tqdm class, not the module.
    dtqdm = importlib.import_module("datasets.utils.tqdm")
    was_off = dtqdm.are_progress_bars_disabled()
    dtqdm.disable_progress_bars()
    return None if was_off else dtqdm.enable_progress_bars


def _hub_bars() -> Callable[[], None] | None:
    if "huggingface_hub" not in sys.modules:
        return None
    htqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    states = getattr(htqdm, "progress_bar_states", None)
    if isinstance(states, dict):  # per-group switches: keep them all, not just the global one
        saved = dict(states)
        htqdm.disable_progress_bars()

        def restore() -> None:
            states.clear()
            states.update(saved)

        return restore
    was_off = htqdm.are_progress_bars_disabled()
    htqdm.disable_progress_bars()
    return None if was_off else htqdm.enable_progress_bars


@contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Within the block, transformers / datasets / huggingface_hub log errors only and show no
    progress bars; on leaving it (also by an exception) their previous settings come back.

    `verbose=True` leaves everything as it is, for callers that want the libraries' own output.
    """
    if verbose:
        yield
        return
    undo: list[Callable[[], None]] = []
    # An environment variable that pins a progress-bar setting makes the switches warn and do
    # nothing; that is the user's choice, so say nothing about it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            undo += _logger_levels()
            # Order matters on the way back (reversed): the hub is restored last, because
            # transformers' switch also writes the hub's.
            for step in (_hub_bars, _datasets_bars, _transformers_bars):
                fn = step()
                if fn is not None:
                    undo.append(fn)
        except BaseException:
            _run(undo)
            raise
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run(undo)


@contextmanager
def quiet_command(verbose: bool = False) -> Iterator[None]:
    """The whole of a `peftcli train / eval / merge` command: only peftcli's own lines and bar.

    transformers is imported first so that its loading and saving bars ("Loading weights",
    "Writing model shards") and its warnings are covered too, and Python warnings (torch's,
    transformers') are ignored. Everything is put back on leaving, as `quiet_libraries` does;
    `--verbose` (verbose=True) leaves the libraries' output alone.
    """
    if verbose:
        yield
        return
    import transformers  # noqa: F401  (imported so quiet_libraries covers it)

    with warnings.catch_warnings(), quiet_libraries():
        warnings.simplefilter("ignore")
        yield


def _run(undo: list[Callable[[], None]]) -> None:
    for fn in reversed(undo):
        fn()


__all__ = ["quiet_command", "quiet_libraries"]
