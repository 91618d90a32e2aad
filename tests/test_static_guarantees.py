"""No module of the product (bridge/, server/, adapters/) can turn wire data into code: none
imports a deserializer that runs code (pickle and friends, importlib), calls eval / exec /
compile / __import__, loads with torch.load / torch.jit.load / torch.hub / numpy.load, or
defines or touches __reduce__ and its kin. Checked on the syntax tree (ast), so comments
and strings do not count, and an assignment like pyvene's ``eval = _eval_mode`` is not a
call of the builtin."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("bridge", "server", "adapters")

BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                  "joblib", "importlib", "copyreg", "jsonpickle"}
BANNED_BUILTIN_CALLS = {"eval", "exec", "compile", "__import__"}
# Dotted call targets (and what ``from X import Y`` would bind) that deserialize or run code.
BANNED_CALLS = {"torch.load", "torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                "torch.utils.cpp_extension.load", "torch.utils.cpp_extension.load_inline",
                "torch.package.PackageImporter", "numpy.load", "np.load", "yaml.load",
                "yaml.unsafe_load"}
# (file, what) -> why it is not data turned into code. Matched without line numbers.
ALLOWED = {
    ("bridge/trace.py", "touches .__reduce_ex__"):
        "a key of the table of calls a hook may not make: tracing refuses pickling a tensor",
}
BANNED_DUNDERS = {"__reduce__", "__reduce_ex__", "__setstate__", "__getstate__",
                  "__getnewargs__", "__getnewargs_ex__"}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every banned construct in one module's source, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    found = []

    def hit(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    hit(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in BANNED_MODULES:
                hit(node, f"from {module} import ...")
            for alias in node.names:
                if f"{module}.{alias.name}" in BANNED_CALLS or alias.name in BANNED_DUNDERS:
                    hit(node, f"from {module} import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in BANNED_BUILTIN_CALLS:
                hit(node, f"call of {node.func.id}()")
            elif name in BANNED_CALLS:
                hit(node, f"call of {name}()")
            elif name in ("getattr", "builtins.getattr") and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and node.args[1].value in \
                    BANNED_BUILTIN_CALLS | BANNED_DUNDERS:
                hit(node, f"getattr(..., {node.args[1].value!r})")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.name in BANNED_DUNDERS:
            hit(node, f"defines {node.name}")
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_DUNDERS:
            hit(node, f"touches .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__import__") and \
                isinstance(node.ctx, ast.Load):
            hit(node, f"uses {node.id}")
    return found


def product_files() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py"))


def test_product_modules_are_found():
    files = product_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"bridge/graph.py", "bridge/frames.py", "server/app.py",
            "adapters/pyvene/model.py"} <= names
    assert len(files) >= 30


def test_no_product_module_turns_data_into_code():
    found = []
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        found += [v for v in violations(path.read_text(), rel)
                  if (rel, v.split(": ", 1)[1]) not in ALLOWED]
    assert found == []


@pytest.mark.parametrize("source, caught", [
    ("import pickle", True),
    ("import importlib.util", True),
    ("from importlib import import_module", True),
    ("from pickle import loads as l", True),
    ("import cloudpickle as cp", True),
    ("x = eval('1')", True),
    ("exec(code)", True),
    ("m = __import__('os')", True),
    ("f = compile(src, 'f', 'exec')", True),
    ("t = torch.load(buf)", True),
    ("t = torch.load(buf, weights_only=True)", True),
    ("from torch import load", True),
    ("a = np.load(f, allow_pickle=True)", True),
    ("torch.hub.load('x', 'y')", True),
    ("torch.utils.cpp_extension.load_inline('m', src)", True),
    ("class A:\n    def __reduce__(self):\n        return (print, ())", True),
    ("y = x.__reduce_ex__(2)", True),
    ("f = getattr(builtins, 'eval')", True),
    ("b = __builtins__", True),
    # not code from data:
    ("# eval(x) and torch.load(f) in a comment", False),
    ("s = 'pickle.loads(data) exec( eval('", False),
    ("class M:\n    eval = _eval_mode", False),
    ("model.eval()", False),
    ("pattern = re.compile('x')", False),
    ("value = json.loads(text)", False),
    ("torch.save(t, path)", False),
])
def test_checker_catches_what_it_should(source, caught):
    assert bool(violations(source)) == caught, violations(source)
