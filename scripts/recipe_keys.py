"""The README's recipe-key and method-option tables, generated from the dataclasses that validate recipes.

    python scripts/recipe_keys.py            # print
    python scripts/recipe_keys.py --write    # replace the generated block in README.md
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import typing
from pathlib import Path

from peftcli.config.recipe import _type_name, describe_sections
from peftcli.methods import all_methods


def esc(text: str) -> str:
    """Literal types print as a | b; a bare | would split the markdown cell."""
    return text.replace("|", "\\|")


def main() -> None:
    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, tp, default, help_ in describe_sections():
        print(f"| `{key}` | {esc(tp)} | `{default}` | {help_} |")
    print("| `init_from` | str or null | `None` | start from a peftcli run/adapter folder or an HF PEFT adapter folder |")
    print()
    for name, spec in sorted(all_methods().items()):
        fields = dataclasses.fields(spec.config_cls)
        hints = typing.get_type_hints(spec.config_cls)
        print(f"**`method.name: {name}`** — {spec.summary}\n")
        if not fields:
            print("(no options)\n")
            continue
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for f in fields:
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"| `method.{f.name}` | {esc(_type_name(hints[f.name]))} | `{d!r}` | {f.metadata.get('help', '')} |")
        print()


START, END = "<!-- recipe-keys:start -->", "<!-- recipe-keys:end -->"


def write_readme(path: Path) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main()
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{buf.getvalue()}{END}{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        main()
