"""The README and the docs site say only what the code does.

A front door that names a flag the command lost, a link to a page that moved, or a key table that
drifted from the dataclasses misleads the first user who copies it, so each of these is checked
against the code itself: the site builds with `mkdocs build --strict`, every relative link lands on
a file (and heading), every `peftcli …` line names a real subcommand with flags it has and recipes
that exist, the generated key pages equal what the code writes, and the architecture page names
every module of peftcli/.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import typer.main

from peftcli.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# docs/_incoming/ holds other work's snippets waiting to be folded in: not part of the site yet.
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
FLAG = re.compile(r"^--?[A-Za-z][\w-]*$")
RECIPE = re.compile(r"^recipes/[\w./-]+\.ya?ml$")
TEST_FILE = re.compile(r"\btests/[\w/]+\.py\b")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text outside fenced code blocks, where links and inline code live."""
    return FENCE.sub("", text)


def _slugs(md: Path) -> set[str]:
    """Heading ids as both mkdocs (python-markdown toc) and GitHub spell them."""
    out = set()
    for title in HEADING.findall(_prose(md.read_text())):
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
        out.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-"))  # mkdocs
        out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))  # GitHub
    return out


def test_mkdocs_build_strict(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    """mkdocs warns about pages left out of the nav; this names them before a build is read."""
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if not re.search(rf":\s*{re.escape(p.name)}\s*$", nav, re.M)]
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"


def test_relative_links_point_at_files_and_headings():
    bad = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _slugs(dest):
                bad.append(f"{_rel(page)}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_test_files_named_in_the_docs_exist():
    """The trust page names the test holding each promise; a moved test must move its line too."""
    bad = [f"{_rel(page)}: {name}" for page in PAGES for name in sorted(set(TEST_FILE.findall(page.read_text())))
           if not (ROOT / name).is_file()]
    assert not bad, "test files named in the docs that do not exist:\n" + "\n".join(bad)


def _command_lines(text: str) -> list[str]:
    """Every `peftcli …` line: in code blocks (continuations joined) and in inline code."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("peftcli "):
                lines.append(line)
    for code in INLINE_CODE.findall(_prose(text)):
        code = " ".join(code.replace("\\|", "|").split())
        if code.startswith("peftcli "):
            lines.append(code)
    return lines


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # a placeholder such as <the task's run> leaves a quote open
        return line.split(" #")[0].split()


def _flags(cmd) -> set[str]:
    """The option names a (typer/click) command accepts; typer may vendor click, so no isinstance."""
    names = {"--help"}
    for p in cmd.params:
        if p.param_type_name == "option":
            names.update(p.opts, p.secondary_opts)
    return names


def _problems(line: str, root) -> list[str]:
    """What in one command line the CLI would refuse: the subcommand, a flag, a recipe path."""
    words = _tokens(line)[1:]
    if not words:
        return []
    cmd = root
    allowed = _flags(root)
    if not words[0].startswith("-"):
        if words[0] not in root.commands:
            return [f"no subcommand {words[0]!r}"]
        cmd = root.commands[words[0]]
        allowed = _flags(cmd)
        if hasattr(cmd, "commands") and len(words) > 1 and words[1] in cmd.commands:
            allowed |= _flags(cmd.commands[words[1]])
    out = []
    for word in words:
        word = word.strip("[](),;")
        flag = word.split("=")[0]
        if FLAG.match(flag) and flag not in allowed:
            out.append(f"`{cmd.name}` has no flag {flag}")
        if RECIPE.match(word) and not (ROOT / word).is_file():
            out.append(f"no recipe {word}")
    return out


def test_every_peftcli_command_line_names_real_commands_flags_and_recipes():
    root = typer.main.get_command(app)
    bad, seen = [], 0
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            seen += 1
            bad += [f"{_rel(page)}: {line}\n    {p}" for p in _problems(line, root)]
    assert seen > 50, f"only {seen} `peftcli` lines found: the extraction is broken"
    assert not bad, "command lines the CLI would refuse:\n" + "\n".join(bad)


def test_the_command_check_catches_mistakes():
    root = typer.main.get_command(app)
    assert _problems("peftcli train recipes/quickstart.yaml --resume", root) == []
    assert _problems("peftcli recipes copy tweets_lora my.yaml", root) == []
    assert _problems("peftcli --install-completion", root) == []
    assert _problems("peftcli trian recipes/quickstart.yaml", root) == ["no subcommand 'trian'"]
    assert _problems("peftcli eval runs/x [--splits val]", root) == ["`eval` has no flag --splits"]
    assert _problems("peftcli train recipes/nope.yaml", root) == ["no recipe recipes/nope.yaml"]


def _recipe_keys_script():
    """scripts/tools/recipe_keys.py, loaded from its file (scripts/ is not a package)."""
    path = next(ROOT.glob("scripts/**/recipe_keys.py"))
    spec = importlib.util.spec_from_file_location("recipe_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_key_pages_match_the_code():
    stale = [name for name, text in _recipe_keys_script().pages().items() if (DOCS / name).read_text() != text]
    assert not stale, f"{stale} differ from the code: run `python scripts/tools/recipe_keys.py --write`"


def test_architecture_page_lists_every_module_and_no_other():
    page = (DOCS / "architecture.md").read_text()
    files = sorted(str(p.relative_to(ROOT / "peftcli")) for p in (ROOT / "peftcli").rglob("*.py"))
    packages = sorted({f.split("/")[0] for f in files if "/" in f})
    missing = [f for f in files if not f.endswith("__init__.py") and f"`{f}`" not in page]
    missing += [f"{p}/" for p in packages if f"`{p}/`" not in page]
    assert not missing, f"modules and packages missing from docs/architecture.md: {missing}"
    listed = re.findall(r"^\| `([\w/]+\.py)` \|", page, re.M)
    gone = [m for m in listed if m not in files]
    assert not gone, f"docs/architecture.md lists modules that do not exist: {gone}"
    assert "core < models < methods < config < data < runs < inference < training < commands < cli" in page


def test_readme_is_a_front_door_with_the_two_set_up_commands():
    """.ci/run runs the second set-up command; users copy the first. Both stay word for word."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for command in ("bash scripts/install.sh && peftcli train recipes/quickstart.yaml",
                    "bash scripts/install.sh --test && python -m pytest -q -n 3"):
        assert f"```\n{command}\n```" in text, command
    # CI runs the second one (less pytest's cache folder, which a clean clone has no use for)
    assert "bash scripts/install.sh --test && python -m pytest -q -n 3 " in (ROOT / ".ci" / "run").read_text()
    assert 'python -m pytest -m "not slow"' in text
