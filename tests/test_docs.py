"""The pages agree with the code: docs/cli.md is what the parsers say today, and every
flag a command in README.md or docs/*.md uses exists in that command's parser."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from procs import REPO

import simulate

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# "python server.py", "python3 ./simulate.py", "python -m plot", "python -m fl.wire.tls"
INVOCATION = re.compile(r"\bpython3?\s+(?:\./)?(?:(?P<script>[\w/.-]+\.py)\b|-m\s+(?P<module>[\w.]+))")
SEPARATOR = re.compile(r"\s(?:&&|\|\||[|;&])\s|;|\s#|\$\(|`")  # where a shell command ends
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def make_cli():
    spec = importlib.util.spec_from_file_location("make_cli", REPO / "docs" / "make_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def known_flags() -> dict[str, set[str]]:
    """Each command's flags; simulate.py also takes the server's, but the ones it sets itself."""
    flags = {command: {s for a in parser._actions for s in a.option_strings}
             for command, parser in make_cli().parsers().items()}
    flags["python simulate.py"] |= flags["python server.py"] - set(simulate.OWN_SERVER_FLAGS)
    return flags


def command_name(match: re.Match) -> str:
    if match["script"]:
        return f"python {match['script']}"
    module = match["module"]
    return f"python {module}.py" if "." not in module else f"python -m {module}"


def joined_lines(lines: list[str], number: int):
    """(first line's number, the line with its backslash-continued lines joined)."""
    start, parts = number, []
    for i, line in enumerate(lines, number):
        if not parts:
            start = i
        parts.append(line.rstrip("\\"))
        if not line.endswith("\\"):
            yield start, " ".join(parts)
            parts = []
    if parts:
        yield start, " ".join(parts)


def commands_in(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, command, its --flags) for every python command in the fenced blocks."""
    found = []
    for block in FENCE.finditer(text):
        number = text.count("\n", 0, block.start(1))
        for start, line in joined_lines(block.group(1).split("\n"), number + 1):
            for match in INVOCATION.finditer(line):
                rest = line[match.end():]
                end = SEPARATOR.search(rest)
                found.append((start, command_name(match), FLAG.findall(rest[:end.start() if end else None])))
    return found


def unknown_flags(path: Path, known: dict[str, set[str]]) -> list[str]:
    return [f"{path.name}:{line}: {command} {flag}" for line, command, flags in commands_in(path.read_text())
            if command in known for flag in flags if flag not in known[command]]


def test_cli_reference_is_what_the_parsers_say():
    assert (REPO / "docs" / "cli.md").read_text() == make_cli().render(), \
        "docs/cli.md is stale: run python docs/make_cli.py"


def test_every_flag_in_the_readme_and_docs_commands_exists(known_flags):
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = sum(len(commands_in(p.read_text())) for p in pages)
    assert checked >= 10  # the pages' commands were found at all
    missing = [m for p in pages for m in unknown_flags(p, known_flags)]
    assert not missing, "flags the commands do not have:\n" + "\n".join(missing)


def test_the_checker_reads_commands_as_a_shell_would(tmp_path, known_flags):
    page = tmp_path / "page.md"
    page.write_text("text python server.py --not-in-a-block\n"
                    "```bash\n"
                    "python server.py --rounds 3 --no-such-server-flag &  # --comment-flag\n"
                    "python3 simulate.py --clients 3 --strategy fedadam --server-lr 0.1 \\\n"
                    "    --checkpoint x.pt\n"
                    "python -m plot m.jsonl -o c.png --labels a && python client.py --client-id 0 --rounds 2\n"
                    "python -m fl.wire.tls --host h --out d; python bench/x.py --anything\n"
                    "```\n")
    assert unknown_flags(page, known_flags) == [
        "page.md:3: python server.py --no-such-server-flag",
        "page.md:4: python simulate.py --checkpoint",  # the launcher sets it itself
        "page.md:6: python client.py --rounds",
    ]
