"""The user docs name only commands, settings and pages that exist.

Every ``fileproxy`` / ``curl`` / ``make`` command in a fenced block of README.md and
docs/*.md either runs in a test (its block is marked ``<!-- runs: NAME -->`` and the
test of RUN_BY[NAME] runs it) or is marked as needing root or a system service. On top
of that, every ``fileproxy`` command must parse with the real command line (a removed
subcommand or option fails here), every ``make`` target must exist (``make -n``), and
every FILEPROXY_* / HTTP_* / REDIS_* name must be a row of SETTINGS_TABLE.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fileproxy.cli import build_parser
from fileproxy.settings import SETTINGS_TABLE
from tests.docs_blocks import (
    NEEDS,
    ROOT,
    Block,
    Command,
    all_commands,
    anchors,
    commands,
    doc_paths,
    fenced_blocks,
    setting_names,
)

#: The test that runs each marked block (the test finds the block by its name).
RUN_BY = {
    "first-session": "tests/integration/test_docs_commands.py::test_first_session",
    "endpoints": "tests/integration/test_docs_commands.py::test_endpoints_block",
    "check": "tests/integration/test_docs_commands.py::test_check_block",
    "bad-setting": "tests/integration/test_docs_commands.py::test_bad_setting_block",
    "bind-in-use": "tests/integration/test_docs_commands.py::test_bind_in_use_block",
}

#: Commands in unmarked blocks that no test can run literally, and the test that stands
#: for them: ``make test`` runs the whole suite (this test included) and ``make venv``
#: builds the venv the suite runs in; that their targets exist and what they run is
#: checked by a dry run below.
RUN_ELSEWHERE = {
    "make test": "tests/unit/test_docs.py::test_make_targets_exist",
    "make venv": "tests/unit/test_docs.py::test_make_targets_exist",
}

WORK_ITEM = re.compile(r"\bissues? #?\d+|\bwork[- ]items?\b|\bi\d{2}-[a-z]", re.IGNORECASE)


def checked(cmds: list[Command]) -> list[Command]:
    return [c for c in cmds if c.program in {"fileproxy", "curl", "make"}]


def _test_exists(node: str) -> bool:
    """``path::name`` names a test function defined in that file."""
    path, _, name = node.partition("::")
    source = ROOT / path
    if not source.is_file():
        return False
    tree = ast.parse(source.read_text())
    return any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
        for n in ast.walk(tree)
    )


def unaccounted(blocks: list[Block]) -> list[str]:
    """Commands that neither run in a test nor are marked as needing root or a service."""
    problems = []
    for block in blocks:
        for cmd in checked(commands(block)):
            if block.needs:
                continue
            if cmd.sudo:
                problems.append(f"{block.where}: `{cmd.line}` uses sudo: mark <!-- needs: root -->")
            elif block.runs is not None:
                if block.runs not in RUN_BY:
                    problems.append(f"{block.where}: no test runs <!-- runs: {block.runs} -->")
            elif " ".join(cmd.argv) not in RUN_ELSEWHERE:
                problems.append(f"{block.where}: `{cmd.line}` runs in no test and is not marked")
    return problems


def unparsable(cmds: list[Command]) -> list[str]:
    """``fileproxy`` commands the real command line refuses (a removed subcommand, option)."""
    problems = []
    for cmd in cmds:
        if cmd.program != "fileproxy":
            continue
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                build_parser().parse_args(list(cmd.argv[1:]))
            except SystemExit:
                problems.append(f"{cmd.block.where}: `{cmd.line}`: {err.getvalue().strip()}")
    return problems


def unknown_settings(text: str) -> set[str]:
    return setting_names(text) - {spec.env for spec in SETTINGS_TABLE}


# the docs as they are


def test_every_command_runs_in_a_test_or_is_marked():
    blocks = [b for path in doc_paths() for b in fenced_blocks(path)]
    assert checked(all_commands()), "no fileproxy/curl/make command found: is the parser broken?"
    assert unaccounted(blocks) == []
    for block in blocks:
        assert block.needs <= NEEDS, f"{block.where}: unknown needs {sorted(block.needs - NEEDS)}"


def test_the_tests_named_for_the_docs_exist():
    for name, node in {**RUN_BY, **RUN_ELSEWHERE}.items():
        assert _test_exists(node), f"{name}: {node} does not exist"
    marked = {b.runs for path in doc_paths() for b in fenced_blocks(path) if b.runs}
    assert marked == set(RUN_BY), "every runs: marker has its test, every test its block"


def test_every_fileproxy_command_parses():
    assert unparsable(all_commands()) == []


def test_make_targets_exist():
    make = shutil.which("make")
    assert make is not None, "make is required: apt-get install -y make"
    targets = {c.argv[1] for c in all_commands() if c.program == "make" and len(c.argv) > 1}
    assert {"test", "venv"} <= targets
    for target in sorted(targets):
        # -B: print the recipe even when the target is up to date (a file named like
        # a target without a rule would otherwise be "Nothing to be done")
        done = subprocess.run(
            [make, "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"make {target}: {done.stderr.strip()}"
        assert "Nothing to be done" not in done.stdout, f"make {target}: no recipe"
    dry = subprocess.run(
        [make, "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert "pytest" in dry.stdout and "ruff" in dry.stdout and "mypy" in dry.stdout


def test_every_setting_named_exists():
    for path in doc_paths():
        assert unknown_settings(path.read_text()) == set(), path.name


def test_no_internal_work_item_numbers():
    for path in doc_paths():
        hits = WORK_ITEM.findall(path.read_text())
        assert hits == [], f"{path.name}: {hits}"


def test_links_lead_somewhere():
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
    for path in doc_paths():
        for target, anchor in link.findall(path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            dest = (path.parent / target).resolve() if target else path
            assert dest.exists(), f"{path.name}: link to {target} leads nowhere"
            if anchor:
                assert dest.suffix == ".md", f"{path.name}: anchor into {target}"
                assert anchor in anchors(dest), f"{path.name}: no #{anchor} in {dest.name}"


def test_readme_is_short_and_leads_to_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"


def _help(*argv: str) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def test_help_points_to_the_docs(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a file name
    texts = {"fileproxy": _help()}
    choices = re.search(r"\{([a-z,-]+)\}", texts["fileproxy"])
    assert choices is not None, texts["fileproxy"]
    for name in choices.group(1).split(","):
        texts[f"fileproxy {name}"] = _help(name)
    assert len(texts) >= 5, texts.keys()
    for command, text in texts.items():
        named = re.findall(r"(?:docs/[a-z-]+\.md|README\.md)", text.replace("\n", " "))
        assert named, f"`{command} --help` names no docs file"
        for doc in named:
            assert (ROOT / doc).is_file(), f"`{command} --help` names {doc}, which does not exist"
        assert WORK_ITEM.findall(text) == [], command


# the checks themselves: each fails on what it is there to catch


def _doc(tmp_path: Path, text: str) -> list[Block]:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return fenced_blocks(path)


def test_an_unmarked_command_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.docs_blocks.ROOT", tmp_path)
    blocks = _doc(tmp_path, "```sh\nFILEPROXY_BIND=x fileproxy serve &\ncurl -s http://h/\n```\n")
    assert [p.split(": ", 1)[1] for p in unaccounted(blocks)] == [
        "`FILEPROXY_BIND=x fileproxy serve &` runs in no test and is not marked",
        "`curl -s http://h/` runs in no test and is not marked",
    ]
    marked = _doc(tmp_path, "<!-- needs: root -->\n```sh\nsudo make bench\n```\n")
    assert unaccounted(marked) == []
    sudo = _doc(tmp_path, "```sh\nsudo make bench\n```\n")
    assert "uses sudo" in unaccounted(sudo)[0]
    unknown = _doc(tmp_path, "<!-- runs: nobody -->\n```sh\nfileproxy check\n```\n")
    assert "no test runs" in unaccounted(unknown)[0]


def test_only_prompted_lines_are_commands_in_a_block_with_output(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.docs_blocks.ROOT", tmp_path)
    (block,) = _doc(tmp_path, "```\n$ X=1 fileproxy serve\nfileproxy: invalid X\n```\n")
    assert [(c.argv, c.env) for c in commands(block)] == [(("fileproxy", "serve"), (("X", "1"),))]


def test_a_removed_subcommand_or_option_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.docs_blocks.ROOT", tmp_path)
    blocks = _doc(
        tmp_path,
        "```sh\nfileproxy config --format json\nfileproxy purge\nfileproxy check --deep\n```\n",
    )
    problems = unparsable([c for b in blocks for c in commands(b)])
    assert len(problems) == 2
    assert "purge" in problems[0] and "--deep" in problems[1]


def test_an_unknown_setting_is_caught():
    text = "Set `FILEPROXY_SPOOL_DIR` and `FILEPROXY_SPOOL_DIRS`; `HTTP_TOTAL_TIMEOUT=90`."
    assert unknown_settings(text) == {"FILEPROXY_SPOOL_DIRS"}


@pytest.mark.parametrize(
    "text", ["as issue 12 says", "(issue #7)", "work item 3", "the i20-trial branch"]
)
def test_work_item_numbers_are_caught(text):
    assert WORK_ITEM.findall(text)
