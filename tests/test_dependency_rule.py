"""The dependency rule, read from the code: adapters and the server import the core
(``bridge/`` = ``hookwire``); the core imports neither the server nor an adapter; an adapter
imports neither the server nor another adapter; the server imports no adapter.

Every import counts: module-level and lazy (inside functions), ``import a.b``,
``from a import b`` (``from hookwire import server`` is an import of ``hookwire.server``),
relative imports, and ``importlib.import_module("literal")`` / ``__import__("literal")``
calls. Checked on the syntax tree (ast), so comments and strings do not count. Tests,
benchmarks, examples and scripts sit above all three layers and may import anything.

Two more rules of the same kind: no module imports another module's private (``_name``)
name -- what one module shares with others gets a public name and a docstring -- and within
the server only the package itself and the command import the websocket front
(``server/app.py``): the engines (the Ray replica) build on ``prepare.py``, not on it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Package folder -> the module it is installed as (pyproject.toml's package-dir).
PACKAGES = {
    "bridge": "hookwire",
    "adapters/transformerlens": "hookwire.transformerlens",
    "adapters/pyvene": "hookwire.pyvene",
    "adapters/hf": "hookwire.hf",
    "adapters/nnsight": "hookwire.nnsight",
    "server": "hookwire.server",
}
ADAPTERS = ("hookwire.transformerlens", "hookwire.pyvene", "hookwire.hf", "hookwire.nnsight")
SERVER = "hookwire.server"

# (file, imported module) -> why this import is allowed although the rule forbids it.
ALLOWED = {
    ("bridge/__main__.py", "hookwire.server.cli"):
        "`python -m hookwire` runs the `hookwire` command (tests and benchmarks start servers "
        "that way); a __main__ module is run, never imported, so no core module depends on "
        "the server through it",
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def allowed(rel: str, imported: str) -> bool:
    # ``from m import name`` reads as m.name too: an entry for m covers it.
    return any(rel == file and _within(imported, module) for file, module in ALLOWED)


def layer_of(module: str) -> str:
    """'core', 'server' or the adapter's package name, for a ``hookwire...`` module."""
    if _within(module, SERVER):
        return "server"
    for adapter in ADAPTERS:
        if _within(module, adapter):
            return adapter
    return "core"


def forbidden(importer: str, imported: str) -> bool:
    """Whether a module in ``importer``'s layer may not import ``imported``."""
    if not _within(imported, "hookwire"):
        return False  # third-party and standard library: not this rule's business
    src, dst = layer_of(importer), layer_of(imported)
    if src == dst or dst == "core":
        return False
    if src == "core":
        return True  # the core imports neither the server nor an adapter
    if src == "server":
        return dst != "core"  # the server imports no adapter
    return True  # an adapter imports neither the server nor another adapter


def module_name(path: Path) -> tuple[str, bool]:
    """The installed module name of a product file, and whether it is a package __init__."""
    rel = path.relative_to(ROOT)
    for folder, package in PACKAGES.items():
        try:
            inner = rel.relative_to(folder)
        except ValueError:
            continue
        parts = list(inner.with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts.pop()
        return ".".join([package, *parts]), is_init
    raise ValueError(f"{rel} is in no package")


def _resolve_relative(module: str | None, level: int, importer: str, is_init: bool) -> str:
    base = importer.split(".")
    if not is_init:
        base.pop()  # a module's relative imports start from its package
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, importer: str, is_init: bool = False) -> list[tuple[int, str]]:
    """Every module the source imports, with its line: for ``from a import b`` both ``a``
    and ``a.b`` (b may be a submodule; a name that is not one is harmless here, since it
    lies in a's layer anyway)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "") if node.level == 0 else _resolve_relative(
                node.module, node.level, importer, is_init)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if alias.name != "*"]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
                else:  # a computed name hides what is imported: the rule cannot be read
                    found.append((node.lineno, "<computed module name>"))
    return found


def product_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def violations() -> list[str]:
    out = []
    for path in product_files():
        importer, is_init = module_name(path)
        rel = path.relative_to(ROOT).as_posix()
        seen_lines = set()  # one message per import statement
        for line, imported in imports_of(path.read_text(encoding="utf-8"), importer, is_init):
            if line in seen_lines:
                continue
            if imported == "<computed module name>":
                out.append(f"{rel}:{line}: imports a computed module name")
            elif forbidden(importer, imported) and not allowed(rel, imported):
                out.append(f"{rel}:{line}: {layer_of(importer)} imports {imported} "
                           f"({layer_of(imported)})")
            else:
                continue
            seen_lines.add(line)
    return out


def private_imports(source: str, importer: str, is_init: bool = False) -> list[str]:
    """``from hookwire.x import _name`` of another module's private name, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = (node.module or "") if node.level == 0 else _resolve_relative(
            node.module, node.level, importer, is_init)
        if not _within(base, "hookwire") or base == importer:
            continue
        found += [f"{node.lineno}: {alias.name} from {base}" for alias in node.names
                  if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_the_dependency_rule_holds():
    found = violations()
    assert not found, "imports against the dependency rule:\n" + "\n".join(found)


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in product_files():
        importer, is_init = module_name(path)
        rel = path.relative_to(ROOT).as_posix()
        found += [f"{rel}:{hit}" for hit in private_imports(path.read_text(encoding="utf-8"),
                                                             importer, is_init)]
    assert not found, "private names imported from other modules:\n" + "\n".join(found)


FRONT = "hookwire.server.app"
FRONT_USERS = {"server/__init__.py", "server/cli.py"}


def test_only_the_package_and_the_command_import_the_websocket_front():
    found = []
    for path in product_files():
        importer, is_init = module_name(path)
        rel = path.relative_to(ROOT).as_posix()
        if rel in FRONT_USERS or importer == FRONT:
            continue
        found += [f"{rel}:{line}: imports {m}" for line, m in imports_of(
            path.read_text(encoding="utf-8"), importer, is_init) if _within(m, FRONT)]
    assert not found, "\n".join(found)


def test_every_allowed_exception_is_still_needed():
    # An entry whose import is gone would let a new one in unnoticed: keep the list exact.
    present = set()
    for path in product_files():
        importer, is_init = module_name(path)
        rel = path.relative_to(ROOT).as_posix()
        present |= {(rel, m) for _, m in imports_of(path.read_text(encoding="utf-8"),
                                                     importer, is_init)}
    assert set(ALLOWED) <= present, f"stale ALLOWED entries: {set(ALLOWED) - present}"


def test_the_package_map_matches_pyproject():
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    assert {v: k for k, v in package_dir.items()} == PACKAGES


# The reader itself: each kind of import is seen, each layer pair judged as the rule says.
@pytest.mark.parametrize("source,importer,expected", [
    ("import hookwire.server.app", "hookwire.trace", "hookwire.server.app"),
    ("from hookwire.server import app", "hookwire.trace", "hookwire.server.app"),
    ("from hookwire import server", "hookwire.trace", "hookwire.server"),
    ("def f():\n    import hookwire.hf\n", "hookwire.trace", "hookwire.hf"),
    ("import importlib\nimportlib.import_module('hookwire.pyvene')", "hookwire.trace",
     "hookwire.pyvene"),
    ("__import__('hookwire.nnsight')", "hookwire.trace", "hookwire.nnsight"),
    ("from ..hf import remote", "hookwire.pyvene.model", "hookwire.hf.remote"),
    ("from . import app", "hookwire.server.cli", "hookwire.server.app"),
])
def test_the_reader_sees_every_kind_of_import(source, importer, expected):
    assert expected in [m for _, m in imports_of(source, importer)]


def test_private_names_are_seen():
    assert private_imports("from hookwire.validate import resolve, _walk", "hookwire.executor")
    assert private_imports("from .validate import _walk", "hookwire.executor")
    assert not private_imports("from hookwire.validate import walk as _walk", "hookwire.x")
    assert not private_imports("from torch import _C", "hookwire.x")


def test_computed_names_are_reported():
    assert (1, "<computed module name>") in imports_of("import_module(name)", "hookwire.x")


@pytest.mark.parametrize("importer,imported,bad", [
    ("hookwire.trace", "hookwire.server.app", True),
    ("hookwire.trace", "hookwire.transformerlens", True),
    ("hookwire.trace", "hookwire.validate", False),
    ("hookwire.trace", "torch", False),
    ("hookwire.hf.remote", "hookwire.server", True),
    ("hookwire.hf.remote", "hookwire.pyvene.model", True),
    ("hookwire.hf.remote", "hookwire.hf.hooks", False),
    ("hookwire.hf.remote", "hookwire.client", False),
    ("hookwire.server.app", "hookwire.transformerlens.weights", True),
    ("hookwire.server.app", "hookwire.graph", False),
    ("hookwire.server.ray_replica", "hookwire.server.prepare", False),
])
def test_the_rule(importer, imported, bad):
    assert forbidden(importer, imported) is bad
