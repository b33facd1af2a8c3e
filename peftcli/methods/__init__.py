"""Importing this package registers every method. One file per method.

Import `get_method` / `all_methods` from here: it guarantees every method is registered first.
"""

from peftcli.methods import (  # noqa: F401  (importing a method registers it)
    bitfit,
    compacter,
    full,
    fusion,
    galore,
    houlsby,
    ia3,
    krona,
    loha,
    lokr,
    lora,
    mam,
    parallel,
    pfeiffer,
    prefix,
    prompt,
    sparse,
    unipelt,
    vera,
)
from peftcli.methods.registry import all_methods, get_method  # noqa: E402  (after every method registered)

__all__ = ["all_methods", "get_method"]
