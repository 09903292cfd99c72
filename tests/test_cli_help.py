"""``vdsr --help`` and each subcommand's: a description, every default shown (the value itself where
there is one, the behaviour where it is None: ``-o``'s output place), no RST markup (backticks) in
any text argparse prints. Walks the real parser of :func:`vdsr.cli.build_parser`."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from vdsr.cli import build_parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: parser} of every subcommand of ``parser``, nested ones as "a b"."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found |= {f"{name} {inner}": p for inner, p in subcommands(sub).items()}
    return found


PARSER = build_parser()
COMMANDS = subcommands(PARSER)


def shown_default(default) -> list[str]:
    """The ways a help text may write ``default``: 2 3 4 for a list, 4,000,000 or 4000000 for a number."""
    if isinstance(default, (list, tuple)):
        return [" ".join(map(str, default))]
    if isinstance(default, int) and not isinstance(default, bool):
        return [str(default), f"{default:,}"]
    return [str(default)]


def test_every_subcommand_is_walked():
    assert set(COMMANDS) == {"evaluate", "upscale", "export", "register"}, sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help_is_complete(name):
    parser = COMMANDS[name]
    assert parser.description and len(parser.description) > 40, (name, parser.description)
    text = parser.format_help()
    assert "`" not in text, (name, [line for line in text.splitlines() if "`" in line])
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or (not action.option_strings and action.nargs not in ("?", "*")):
            continue  # -h; the positionals one must give
        label = f"vdsr {name} {'/'.join(action.option_strings) or action.metavar}"
        assert action.help and action.help != argparse.SUPPRESS, f"{label}: no help"
        if action.required or action.nargs == 0:  # required; or a flag, off unless given
            if action.required:
                assert "default" not in action.help, f"{label} is required but its help names a default"
            continue
        assert "default" in action.help, f"{label}: help does not say what happens without it: {action.help!r}"
        if action.default is not None:
            assert any(shown in action.help for shown in shown_default(action.default)), \
                f"{label}: default {action.default!r} not shown in {action.help!r}"


def test_output_options_name_their_place():
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            if "-o" in action.option_strings:
                assert action.required or "default: " in action.help, (name, action.help)
                assert action.required or "beside" in action.help or "folder" in action.help, (name, action.help)


def test_top_level_help_has_no_markup_and_names_each_command():
    done = subprocess.run([sys.executable, "-m", "vdsr.cli", "--help"], check=False, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "`" not in done.stdout, done.stdout
    assert done.stdout.startswith("usage: vdsr "), done.stdout
    for name in COMMANDS:
        assert name in done.stdout
    assert PARSER.description and "`" not in PARSER.description
