"""The commands: each one a library function a Python user can call, above everything else.

`peftcli/cli.py` parses arguments and calls these. They may import any part of peftcli; nothing
outside this package imports them (tests/test_imports.py checks), so the library below never
depends on a command and the layers never circle.
"""
