"""Importing this package registers every method. One file per method."""

from . import bitfit, full, lora  # noqa: F401
