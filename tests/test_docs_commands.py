"""Every runnable ``qig`` command in the README and docs parses as written (flags that exist, values they take).

Synopsis lines (with ``[...]`` or ``A|B`` placeholders) are left out; a loop
variable stands for its first value, other shell variables stay as they are. What the parser
cannot see (a recipe key a method refuses) is checked by the commands' own tests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qig.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
PROGRAMS = ("qig", ".venv/bin/qig", "python -m qig", ".venv/bin/python -m qig")
SEPARATORS = {";", "&&", "||", "|", "&"}


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(the line as written, its argv after the program) for each qig command in the file's shell blocks."""
    found = []
    for block in BLOCK.findall(path.read_text()):
        # a loop variable stands for its first value (``for method in rtn gptq awq``)
        loops = {m.group(1): m.group(2).split()[0] for m in re.finditer(r"for (\w+) in ([^;\n]+);", block)}
        block = re.sub(r"\$\{?(\w+)\}?", lambda m, loops=loops: loops.get(m.group(1), m.group(0)), block)
        for line in block.replace("\\\n", " ").splitlines():
            if "qig" not in line or line.lstrip().startswith("#"):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            for start in [0] + [i + 1 for i, w in enumerate(words) if w in SEPARATORS]:
                part = words[start:]
                part = part[: next((i for i, w in enumerate(part) if w in SEPARATORS), len(part))]
                for program in PROGRAMS:
                    n = len(program.split())
                    if part[:n] == program.split() and len(part) > n and not _synopsis(part[n:]):
                        found.append((" ".join(part), part[n:]))
    return found


def _synopsis(argv: list[str]) -> bool:
    return any("[" in w or "|" in w or w in ("...", "DIR", "FILE", "OUT") for w in argv)


CASES = [(f"{p.relative_to(ROOT)}: {line}", argv) for p in DOCS for line, argv in commands(p)]


def test_the_docs_hold_commands_to_check():
    assert len(CASES) >= 20, [c for c, _ in CASES]
    assert any("--calib" in argv for _, argv in CASES)


@pytest.mark.parametrize(("where", "argv"), CASES, ids=[c for c, _ in CASES])
def test_a_documented_command_parses(where, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{where}: argparse refused it (exit {exc.code})")
