"""Every `apet ...` command line in README.md and docs/ names a real subcommand and only flags that
subcommand's parser has (the CLI is the truth: `apet <command> --help`). Command lines are read
from fenced code blocks (continuation lines joined) and from inline code spans."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from apet_trt.scripts.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = ("", "bash", "sh", "shell", "console")
INLINE = re.compile(r"`(apet (?:[a-z][a-z-]*|--[a-z-]+)[^`]*)`")  # `apet <command>` is a placeholder
COMMAND = re.compile(r"(?:^\s*|[;&|(]\s*)apet\s+([a-z][a-z-]*|--[a-z-]+)([^#\n;&|)]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def command_lines(text: str) -> list[str]:
    """`apet ...` invocations of a markdown text: in code blocks (with `\\` continuations joined,
    comments cut) and in inline code."""
    found = []
    for language, block in FENCE.findall(text):
        if language.strip() not in SHELL:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0]
            found += [f"apet {cmd}{rest}".rstrip() for cmd, rest in COMMAND.findall(line)]
    prose = FENCE.sub("", text)
    found += [m.split(" # ")[0] for m in INLINE.findall(prose)]
    return found


def problems(line: str, commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    words = line.split()
    name = words[1]
    if name in ("--version", "--help", "-h"):
        return []
    if name not in commands:
        return [f"{line!r}: no subcommand {name!r} (apet has {', '.join(sorted(commands))})"]
    known = {s for action in commands[name]._actions for s in action.option_strings}
    return [f"{line!r}: `apet {name}` has no {flag}" for flag in FLAG.findall(line) if flag not in known]


def test_the_parser_reading_finds_commands_and_flags():
    """The reader itself (an independent statement of what it must find), so the check can fail."""
    block = "```bash\napet run --engine e \\\n    --grid  # --not-this\nfoo && apet --version\n```"
    block += "\n```jsonc\napet x\n```"
    text = f"x\n{block}\nsay `apet build --keep 3`"
    assert command_lines(text) == ["apet run --engine e      --grid", "apet --version", "apet build --keep 3"]
    commands = _subcommands()
    assert problems("apet run --engine e --grid", commands) == []
    assert problems("apet run --engin e", commands) == ["'apet run --engin e': `apet run` has no --engin"]
    assert problems("apet runn --engine e", commands)[0].startswith("'apet runn --engine e': no subcommand 'runn'")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_documented_command_matches_the_cli(doc):
    commands = _subcommands()
    wrong = [p for line in command_lines(doc.read_text(encoding="utf-8")) for p in problems(line, commands)]
    assert not wrong, "\n".join(wrong)
