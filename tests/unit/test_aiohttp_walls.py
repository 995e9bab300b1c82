"""The walls around aiohttp's internals: every private name used is checked here.

``aiohttp_server`` and ``aiohttp_client`` list what fileproxy takes from aiohttp
beyond its public API; against another aiohttp these tests fail naming what moved
(and the daemon refuses to start with the same message).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import aiohttp
import pytest

from fileproxy.http import aiohttp_server
from fileproxy.upstream import aiohttp_client

ROOT = Path(__file__).resolve().parents[2]
WALLS = {"aiohttp_client.py", "aiohttp_server.py"}


def test_installed_aiohttp_is_the_one_the_walls_were_checked_against() -> None:
    assert aiohttp.__version__ == aiohttp_client.PINNED, (
        f"aiohttp {aiohttp.__version__} is installed; the walls were checked against "
        f"{aiohttp_client.PINNED}: run this module's tests, update the walls, then PINNED"
    )
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"aiohttp=={aiohttp_client.PINNED}" in pyproject["project"]["dependencies"]


def test_client_internals_are_where_the_wall_expects_them() -> None:
    aiohttp_client.check()


def test_server_internals_are_where_the_wall_expects_them() -> None:
    aiohttp_server.check()


def test_a_moved_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiohttp_client.ConnectionKey, "_fields", ("host",))
    with pytest.raises(aiohttp_client.AiohttpMoved, match=r"ConnectionKey fields"):
        aiohttp_client.check()
    monkeypatch.delattr(aiohttp.web.Application, "_make_handler")
    with pytest.raises(aiohttp_client.AiohttpMoved, match=r"Application\._make_handler"):
        aiohttp_server.check()


# aiohttp's modules whose public names fileproxy may import outside the walls
_PUBLIC_MODULES = {
    "aiohttp",
    "aiohttp.web",
    "aiohttp.abc",
    "aiohttp.http",
    "aiohttp.worker",
}
_IMPORT = re.compile(
    r"^\s*(?:from\s+(aiohttp(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n]*)"
    r"|import\s+(aiohttp(?:\.\w+)*)\s*$)",
    re.M,
)
# attributes of aiohttp objects the walls hide: their names must not appear elsewhere
_PRIVATE_ATTRIBUTES = re.compile(
    r"\._(messages|waiter|request_count|force_close|upgraded|keepalive_handle|manager"
    r"|request_handler|kwargs|make_handler|send_headers_immediately|drain_helper"
    r"|pause_reading_for_buffer|resume_reading_if_drained|server|notify_waiter_done)\b"
)


_PRIVATE_BY_NAME = re.compile(r"(?:get|set|has)attr\([^()]*\"_\w+\"")


def test_no_private_aiohttp_name_outside_the_walls() -> None:
    offenders = []
    for path in sorted((ROOT / "fileproxy").rglob("*.py")):
        if path.name in WALLS:
            continue
        text = path.read_text()
        for module, names, plain in _IMPORT.findall(text):
            module = module or plain
            private_names = [n for n in re.split(r"[\s,()]+", names) if n.startswith("_")]
            if module not in _PUBLIC_MODULES or private_names:
                offenders.append(f"{path.relative_to(ROOT)}: {module} {private_names or ''}")
        offenders += [
            f"{path.relative_to(ROOT)}: {m.group(0)}" for m in _PRIVATE_BY_NAME.finditer(text)
        ]
        offenders += [
            f"{path.relative_to(ROOT)}: .{m.group(0)[1:]}"
            for m in _PRIVATE_ATTRIBUTES.finditer(text)
        ]
    assert not offenders, "aiohttp internals outside the walls:\n" + "\n".join(offenders)
