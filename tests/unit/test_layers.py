"""The layout's floors: every import inside fileproxy goes to the same floor or a lower one.

    0  adaptive/      pure brains: no I/O, no asyncio, nothing of fileproxy outside adaptive/
       cache/         the cache's pure rules (RFC 9111, eviction): the same floor, the same purity
    1  settings, runtime, lifecycle, loop_lag, exchange   the one config object, the record of
       an exchange, facts every floor reads
    2  state/, upstream/             shared state and the upstream side (neither imports the other;
                                     both may use http/connection.py's pure HTTP/1.1 rules)
    3  http/, delivery/, app_keys    the client-facing edge, the proxy path, the spool
       (http/connection.py, the sans-IO connection machine, imports pure stdlib only)
    4  ops/                          /health /ready /stats /metrics, logs, check
    5  app, cli, server, gunicorn_worker, sample_upstream, __main__   assembly and entry points

Brains import no shell; nothing imports upward. The test reads the source (ast), so a
forbidden import fails here whether or not it is ever executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fileproxy"

FLOORS = {
    "adaptive": 0,
    "cache": 0,
    "settings": 1,
    "runtime": 1,
    "lifecycle": 1,
    "loop_lag": 1,
    "exchange": 1,
    "state": 2,
    "upstream": 2,
    "http": 3,
    "delivery": 3,
    "app_keys": 3,
    "ops": 4,
    "app": 5,
    "cli": 5,
    "server": 5,
    "gunicorn_worker": 5,
    "sample_upstream": 5,
    "__main__": 5,
    "__init__": 5,
}
# modules that may be imported from anywhere (no fileproxy imports of their own): the sans-IO
# HTTP/1.1 rules (http/connection.py, pure by PURE_MODULES) serve both sides of the proxy,
# the upstream connections' protocol (upstream/protocol.py) reads responses by them
ANYWHERE = {"fileproxy", "fileproxy.__init__", "fileproxy.http.connection"}
# floors whose modules may not import each other though they share a floor
SIBLINGS_APART = {
    ("state", "upstream"),
    ("upstream", "state"),
    ("adaptive", "cache"),
    ("cache", "adaptive"),
}
# the pure floors: what they may import besides the standard library's pure modules
PURE = {"adaptive", "cache"}
BRAINS_FORBIDDEN = {"asyncio", "aiohttp", "redis", "socket", "uvloop", "gunicorn", "os", "time"}
# pure modules on higher floors: the standard library's pure modules only, nothing of fileproxy
PURE_MODULES = {"fileproxy/http/connection.py"}
PURE_STDLIB = {"__future__", "collections", "dataclasses", "enum", "re", "typing"}


def unit_of(module: str) -> str:
    """fileproxy.http.edge -> http; fileproxy.settings -> settings."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("fileproxy"):
                if module == "fileproxy" or (
                    module.count(".") == 1
                    and unit_of(module) in ("adaptive", "cache", "state", "upstream", "http", "ops")
                ):
                    found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
                else:
                    found.append((module, node.lineno))
            else:
                found.append((module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        unit = unit_of(module)
        floor = FLOORS[unit]
        for imported, line in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if unit in PURE and imported.split(".")[0] in BRAINS_FORBIDDEN:
                bad.append(f"{where}: the brains import {imported} (no I/O in {unit}/)")
            if not imported.startswith("fileproxy") or imported in ANYWHERE:
                continue
            target = unit_of(imported)
            if target == "__version__":
                continue
            if target not in FLOORS:
                bad.append(f"{where}: {imported} is on no floor (add it to FLOORS)")
                continue
            if FLOORS[target] > floor:
                bad.append(
                    f"{where}: {module} (floor {floor}) imports {imported} (floor {FLOORS[target]})"
                )
            elif (unit, target) in SIBLINGS_APART:
                bad.append(f"{where}: {unit}/ imports {target}/, its sibling")
    return bad


def test_imports_flow_downward() -> None:
    assert violations() == []


def test_pure_modules_import_only_pure_stdlib() -> None:
    bad = [
        f"{name}:{line}: imports {imported}"
        for name in sorted(PURE_MODULES)
        for imported, line in imports_of(PACKAGE.parent / name)
        if imported.split(".")[0] not in PURE_STDLIB
    ]
    assert bad == []


def test_every_module_is_on_a_floor() -> None:
    units = {
        unit_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts))
        for p in PACKAGE.rglob("*.py")
    }
    assert units <= set(FLOORS), units - set(FLOORS)
