"""The bottom layer: helpers every other part of peftcli may use and that use nothing above them.

Methods, the training loop and the commands import from here; nothing here imports a method, the
pipeline or a command, so this package can never close an import circle.
"""
