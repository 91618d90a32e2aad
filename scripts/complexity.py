"""Cyclomatic complexity and size of functions, read from the syntax tree.

    python scripts/complexity.py bridge/validate.py bridge/executor.py [--min 10]
    python scripts/complexity.py bridge/validate.py:infer_shapes

Counts as radon's ``cc`` does (radon is not installed here, so this is a small stand-in):
1 per function, +1 per ``if``/``elif``, conditional expression, ``for``/``while`` (and their
``else``), ``except``, ``assert``, comprehension ``for`` and its ``if``s, ``match`` case, and
+(n-1) per boolean operator joining n operands. Nested functions and classes count on their
own. ``ruff check --select C901`` gives McCabe's count, which leaves boolean operators out.
Lines are the function's source lines, docstring and comments included.
"""
from __future__ import annotations

import ast
import sys


class _Counter(ast.NodeVisitor):
    def __init__(self):
        self.score = 1

    def generic_visit(self, node):
        if isinstance(node, (ast.If, ast.IfExp, ast.Assert, ast.ExceptHandler)):
            self.score += 1
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            self.score += 1 + bool(node.orelse)
        elif isinstance(node, ast.comprehension):
            self.score += 1 + len(node.ifs)
        elif isinstance(node, ast.BoolOp):
            self.score += len(node.values) - 1
        elif isinstance(node, ast.match_case):
            self.score += 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                             ast.ClassDef)) and node is not self.root:
            return  # counted on its own
        super().generic_visit(node)


def complexity(func: ast.AST) -> int:
    counter = _Counter()
    counter.root = func
    counter.generic_visit(func)
    return counter.score


def functions(path: str):
    """(qualified name, complexity, lines) of every function in the file."""
    tree = ast.parse(open(path).read(), path)
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((name, complexity(child), child.end_lineno - child.lineno + 1))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
    walk(tree, "")
    return out


def main(argv: list[str]) -> None:
    minimum = 0
    if "--min" in argv:
        i = argv.index("--min")
        minimum = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    for arg in argv:
        path, _, only = arg.partition(":")
        for name, cc, lines in functions(path):
            if (only and name.split(".")[-1] != only and name != only) or cc < minimum:
                continue
            print(f"{path}:{name}  cc={cc}  lines={lines}")


if __name__ == "__main__":
    main(sys.argv[1:])
