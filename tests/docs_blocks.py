"""What the user docs (README.md, docs/*.md) tell people to type, read from the Markdown.

A fenced block may be marked by an HTML comment on the line before it:

- ``<!-- needs: root -->``, ``<!-- needs: systemd -->`` (or ``root, systemd``): its commands
  need root or a system service, so no test runs them;
- ``<!-- runs: NAME ... -->``: a test runs this block; ``NAME`` is how the test finds it.

In a block whose lines start with ``$ `` only those lines are commands (the others are
their output); otherwise every line is. A command is one segment of a line between
``&&``, ``||``, ``;``, ``|`` and ``&``, without its leading ``NAME=value`` assignments
and ``sudo``; the commands the docs test cares about are ``fileproxy``, ``curl`` and
``make``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED_PROGRAMS = frozenset({"fileproxy", "curl", "make"})
NEEDS = frozenset({"root", "systemd"})

_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
_MARKER = re.compile(r"^<!--\s*(needs|runs):\s*(.*?)\s*-->$")
_OPERATORS = frozenset({"&&", "||", ";", "|", "&"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def doc_paths() -> list[Path]:
    """The files a user reads: the README and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lines: tuple[str, ...]
    needs: frozenset[str]  # from <!-- needs: ... -->
    runs: str | None  # the NAME of <!-- runs: NAME ... -->

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def command_lines(self) -> list[str]:
        """The lines a user types (``$ `` removed when the block uses prompts)."""
        prompted = [line[2:] for line in self.lines if line.startswith("$ ")]
        if prompted:
            return prompted
        return [line for line in self.lines if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class Command:
    block: Block
    line: str  # the whole line it is part of
    argv: tuple[str, ...]  # the program and its arguments, assignments and sudo removed
    env: tuple[tuple[str, str], ...]  # the NAME=value assignments before it
    sudo: bool

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of one Markdown file, with the marker before it, if any."""
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence.group(1)):
            body.append(lines[i])
            i += 1
        i += 1  # past the closing fence
        needs: frozenset[str] = frozenset()
        runs = None
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = _MARKER.match(lines[before].strip()) if before >= 0 else None
        if marker is not None:
            kind, value = marker.groups()
            if kind == "needs":
                needs = frozenset(part.strip() for part in value.split(","))
            else:
                runs = value.split()[0] if value.split() else ""
        blocks.append(Block(path, start + 1, tuple(body), needs, runs))
    return blocks


def commands(block: Block) -> list[Command]:
    """The commands of a block, every program (filter on ``program``)."""
    found: list[Command] = []
    for line in block.command_lines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # not shell (a config line): not a command
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _OPERATORS:
                segment.append(token)
                continue
            env: list[tuple[str, str]] = []
            while segment and _ASSIGNMENT.match(segment[0]):
                name, _, value = segment.pop(0).partition("=")
                env.append((name, value))
            sudo = bool(segment) and segment[0] == "sudo"
            if sudo:
                segment.pop(0)
            if segment:
                found.append(Command(block, line, tuple(segment), tuple(env), sudo))
            segment = []
    return found


def all_commands() -> list[Command]:
    return [cmd for path in doc_paths() for block in fenced_blocks(path) for cmd in commands(block)]


def block_named(name: str) -> Block:
    """The one block marked ``<!-- runs: name -->`` in the docs."""
    found = [b for path in doc_paths() for b in fenced_blocks(path) if b.runs == name]
    assert len(found) == 1, f"expected one block marked <!-- runs: {name} -->, found {len(found)}"
    return found[0]


SETTING_NAME = re.compile(
    r"\b(?:FILEPROXY|HTTP|REDIS)_[A-Z0-9_]*[A-Z0-9]\b|\bSTREAM_CHUNK_SIZE\b|\bBUFFER_SIZE\b"
)


def setting_names(text: str) -> set[str]:
    """Every name in ``text`` that reads as one of fileproxy's environment variables."""
    return set(SETTING_NAME.findall(text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading's text."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_fence = False
    for line in path.read_text().split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found
