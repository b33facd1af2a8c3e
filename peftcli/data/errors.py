"""The data layer's one error: anything wrong with a recipe's data that its author can fix."""

from __future__ import annotations

from peftcli.core.errors import BadInput


class DataError(BadInput, RuntimeError):
    pass
