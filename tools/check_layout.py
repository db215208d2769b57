"""The package's layout rules, read from its source (AST only; nothing is imported).

    python tools/check_layout.py            # prints the findings; exit 1 if a rule is broken

Rules (issue 21): no import cycles between modules (imports inside functions count: they run too), no
module using another module's underscore names, no function over 120 lines, no module over 700 lines, at
most 20 modules directly in `instructor_jax/`, and the layers' direction: a module imports nothing from a
subpackage above its own (`LAYERS`, lowest first).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

PACKAGE = "instructor_jax"
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 700
MAX_TOP_LEVEL_MODULES = 20
# Lowest first: a module may import its own layer and those before it. A layer is a subpackage or a module
# directly in the package (`instructor`, the public `Instructor`, is what the applications above it build on);
# the package's own `__init__` is the top.
LAYERS = ("runtime", "model", "checkpoints", "encode", "instructor", "evaluation", "train", "search", "mining",
          "serve", "reference", "plots", "demo", "cli",
          "corpus", "distributed")  # the last two: aliases of 0.1's documented paths, importing from below


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_modules(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, ast.Module]]:
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        modules[module_name(path, root)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return modules


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: pathlib.Path, tree: ast.Module, known: set[str]):
    """(imported module, names taken from it, line) for every import of a package module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, path.name == "__init__.py")
            if source not in known:
                continue
            names = []
            for alias in node.names:
                if f"{source}.{alias.name}" in known:  # `from package import submodule`
                    found.append((f"{source}.{alias.name}", [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((source, names, node.lineno))
    return found


def private_uses(module: str, tree: ast.Module, imports) -> list[str]:
    """`from other import _name` and `other_module._name` where `other_module` is a package module."""
    problems = []
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    imported_modules = {target for target, _, _ in imports}
    for target, names, line in imports:
        for name in names:
            if name.startswith("_") and not name.startswith("__") and target != module:
                problems.append(f"{module}:{line} imports {target}.{name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and aliases.get(base.id) in imported_modules:
                if aliases[base.id] != module:
                    problems.append(f"{module}:{node.lineno} uses {aliases[base.id]}.{node.attr}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle or several."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return LAYERS.index("instructor")  # the package's __init__: the public names, `Instructor` and below
    if parts[1] not in LAYERS:
        raise SystemExit(f"{module}: not in check_layout.LAYERS; say which layer it belongs to")
    return LAYERS.index(parts[1])


def long_functions(module: str, tree: ast.Module) -> list[str]:
    return [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def check(root: pathlib.Path) -> dict[str, list]:
    modules = read_modules(root)
    known = set(modules)
    graph, findings = {}, {"cycles": [], "private names": [], "long functions": [], "long modules": [],
                           "layers": [], "top-level modules": []}
    for name, (path, tree) in modules.items():
        imports = imports_of(name, path, tree, known)
        # A package's own __init__ is executed by importing any of its submodules, so it is not an edge of
        # the submodule's; an import of the package itself (for its names) is.
        graph[name] = {target for target, _, _ in imports if target != name}
        findings["private names"] += private_uses(name, tree, imports)
        findings["long functions"] += long_functions(name, tree)
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            findings["long modules"].append(f"{name}: {lines} lines")
        own = layer_of(name)
        for target, _, line in imports:
            other = layer_of(target)
            if other > own:
                findings["layers"].append(f"{name}:{line} imports {target} (a higher layer)")
    findings["cycles"] = cycles(graph)
    top = [n for n in modules if n.count(".") == 1 and not (root / n.replace(".", "/")).is_dir()]
    if len(top) > MAX_TOP_LEVEL_MODULES:
        findings["top-level modules"].append(f"{len(top)} modules directly in {PACKAGE}/: {sorted(top)}")
    return findings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
    args = parser.parse_args(argv)
    findings = check(pathlib.Path(args.root))
    broken = 0
    for rule, items in findings.items():
        print(f"{rule}: {len(items)}")
        for item in items:
            print(f"  {item}")
        broken += len(items)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
