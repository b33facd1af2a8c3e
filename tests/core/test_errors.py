"""Exit 2 is one class: every error a user can fix derives from BadInput, which the CLI maps."""

from __future__ import annotations

import ast
from pathlib import Path

from peftcli.core.errors import BadInput

PKG = Path(__file__).resolve().parents[2] / "peftcli"


def test_the_cli_maps_one_class_and_commands_do_not_rewrap():
    src = (PKG / "cli.py").read_text()
    tree = ast.parse(src)
    handlers = [ast.unparse(h.type) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type is not None]
    assert "(BadInput, FileNotFoundError)" in handlers
    rewraps = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler)
               and any(isinstance(n, ast.Raise) and n.exc is not None and "UsageError" in ast.unparse(n.exc)
                       for n in h.body)]
    assert not rewraps, [ast.unparse(h) for h in rewraps]


def test_every_error_class_a_user_can_fix_is_bad_input():
    import peftcli.cli  # noqa: F401  (imports every command module on use; load the library here)
    from peftcli.commands import drop, serve, sweep
    from peftcli.config import recipe
    from peftcli.core import adapter_merging, arch, errors, faults
    from peftcli.inference import generate, multi
    from peftcli.methods import fusion
    from peftcli.models import loading, quant
    from peftcli.runs import folder, state
    from peftcli.training import distributed, loop, optim

    for cls in (recipe.RecipeError, errors.DataError, loading.ModelLoadError, errors.CheckpointError,
                loop.RunExistsError, folder.UnsafePathError, state.ResumeError, faults.InjectedBadInput,
                distributed.DistributedEnvError, optim.OptimizerUnavailable, multi.MultiAdapterError,
                sweep.SweepError, arch.UnsupportedArchitecture, quant.QuantizationUnavailable,
                adapter_merging.CombineError, generate.GenerateError, serve.ServeUnavailable, serve.ServeAddressError,
                fusion.FusionError,
                drop.DropError):
        assert issubclass(cls, BadInput), cls
