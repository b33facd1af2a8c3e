"""Importing this package registers every method. One file per method."""

from . import (  # noqa: F401
    bitfit,
    compacter,
    dora,
    full,
    fusion,
    galore,
    houlsby,
    ia3,
    krona,
    lora,
    mam,
    parallel,
    pfeiffer,
    prefix,
    prompt,
    sparse,
    unipelt,
)
