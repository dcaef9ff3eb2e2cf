"""Write docs/cli.md, the reference of every command's flags, from the parsers themselves.

    python docs/make_cli.py            # rewrite docs/cli.md
    python docs/make_cli.py --check    # exit 1 if docs/cli.md is not what the parsers say

Each command builds its parser inside its own ``parse_args`` or ``main``; ``parser_of``
calls that with no arguments and catches the parser at its parse call, so the page shows
exactly what the command would parse (``set_defaults`` and all) without running it.
``tests/test_docs.py`` compares the page with a fresh rendering, and checks the flags the
README's and docs' commands use against the same parsers.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Callable
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "cli.md"
# how a user types each command -> (its module, the function that parses its command line)
COMMANDS = {
    "python server.py": ("server", "parse_args"),
    "python client.py": ("client", "parse_args"),
    "python simulate.py": ("simulate", "parse_args"),
    "python worker.py": ("worker", "parse_args"),
    "python predict.py": ("predict", "main"),
    "python plot.py": ("plot", "main"),
    "python model.py": ("model", "main"),
    "python quantization.py": ("quantization", "main"),
    "python protocol.py": ("protocol", "main"),
    "python -m fl.wire.tls": ("fl.wire.tls", "main"),
}


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(parse: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """The parser ``parse`` builds, caught before it parses anything."""
    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Caught(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch):
        try:
            parse([])
        except _Caught as caught:
            return caught.parser
    raise AssertionError(f"{parse.__module__}.{parse.__name__} parsed no command line")


def parsers() -> dict[str, argparse.ArgumentParser]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return {command: parser_of(getattr(importlib.import_module(module), function))
            for command, (module, function) in COMMANDS.items()}


def one_line(text: str) -> str:
    """Text for one Markdown line or table cell: no line breaks, no table bars, no tags."""
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def flag_rows(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    """One table row per flag: how it is written, and its help with the default --help shows."""
    formatter = parser._get_formatter()
    rows = []
    for action in actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        usage = formatter._format_action_invocation(action)
        rows.append(f"| `{usage}` | {one_line(formatter._expand_help(action) if action.help else '')} |")
    return rows


def render_command(command: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"## `{command}`", "", one_line(parser.description or ""), ""]
    if all(isinstance(a, argparse._HelpAction) for a in parser._actions):
        return lines + ["No flags but `--help`.", ""]
    for group in parser._action_groups:
        if not [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]:
            continue
        lines += [f"**{group.title}**" + (f": {one_line(group.description)}" if group.description else ""), "",
                  "| argument | what it does |", "|---|---|", *flag_rows(parser, group._group_actions), ""]
    return lines


def render() -> str:
    found = parsers()
    lines = ["# Command-line reference", "",
             "Every command's flags, as its `--help` prints them. Generated from the parsers by "
             "`python docs/make_cli.py`; do not edit by hand (`tests/test_docs.py` fails when this page "
             "and the parsers disagree). `simulate.py` passes the flags it does not know to `server.py`.", ""]
    lines += [f"- [`{c}`](#{re.sub(r'[^a-z0-9 -]', '', c.lower()).replace(' ', '-')})" for c in found] + [""]
    for command, parser in found.items():
        lines += render_command(command, parser)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write docs/cli.md from the commands' parsers.")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs instead of writing it")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        same = PAGE.exists() and PAGE.read_text() == text
        print(f"{PAGE} is {'up to date' if same else 'stale: run python docs/make_cli.py'}")
        return 0 if same else 1
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
